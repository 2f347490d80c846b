"""``cnn-train up``: bring up the servers, trigger ``cnn-train/default`` and follow it to the end."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cnn_train.flows import flow_runs
from cnn_train.flows.ops import services
from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.settings import default_tracking_uri, env_number, state_dir

Echo = Callable[[str], None]

#: Seconds a server may take to answer (a fresh Prefect database on a busy 2-core machine took 90 s).
START_TIMEOUT = env_number("CNN_TRAIN_START_TIMEOUT", 300.0, minimum=1)

_FINAL_EPOCH_METRIC = "val_accuracy"


class ForeignServerError(ExpectedFailure):
    """A server on this project's port that this project did not start, which `up` cannot use as its own."""


class RestartNeededError(ExpectedFailure):
    """A server up started earlier listens on another host or port than this `up` asks for."""


def _host_of(command: list[str]) -> str | None:
    return command[command.index("--host") + 1] if "--host" in command[:-1] else None


def check_same_port(service: services.Service) -> None:
    """Refuse a port variable that moves a server of this project's that runs: `up` took the live pid for
    the server on the new port (another account's), waited 300 s for a serve process that could not be
    ready there, and pointed the Prefect profile at that server."""
    if problem := service.moved():
        raise RestartNeededError(problem)


def check_same_host(service: services.Service) -> None:
    """Refuse to go on with a running server of ours on loopback when ``--host`` now asks for more: `up --host
    0.0.0.0` over servers on 127.0.0.1 printed the addresses teammates use, where nothing listened. (Servers on
    every interface answer on 127.0.0.1 too: a plain `up` over them adopts them, as before.)"""
    import psutil

    from cnn_train.flows.ops.auth import LOOPBACK

    pid = service.pid()
    wanted = _host_of(service.command())
    if pid is None or wanted is None or wanted in LOOPBACK:
        return
    try:
        running = _host_of(psutil.Process(pid).cmdline())
    except psutil.Error:
        return
    if running is not None and running != wanted:
        raise RestartNeededError(
            f"{service.name} already runs on {running}, not {wanted}: `cnn-train down`, then `cnn-train up --host {wanted}` "
            "(it starts the servers on that host, with the credentials configured then)"
        )


def start_service(service: services.Service, echo: Echo, *, timeout: float) -> None:
    """Start ``service`` unless it answers, saying which it was."""
    if not service.ready():
        echo(f"{service.name}: starting")
    elif service.port is not None and service.pid() is None:  # answering (just probed), not started here
        # Adopted as it is (up starts what does not answer), but a server of another checkout or of the
        # user's keeps its own store: say so, where the user would otherwise look for their runs here.
        echo(f"{service.name}: already running on port {service.port()}, but {_not_ours(service)}: runs are "
             f"recorded where that server keeps them; stop it, or choose another port with "
             f"{service.port_variable}, to have this project's own")
    else:
        echo(f"{service.name}: already running" + (f", but {changed}" if (changed := service.code_changed()) else ""))
    if service.start(timeout=timeout):
        echo(f"{service.name}: ready (log: {service.log_file})")


def point_prefect_cli_at_server(echo: Echo) -> None:
    """Make a plain `prefect deployment run cnn-train/default` in the user's shell reach our server,
    as Prefect's self-hosting guide does (`prefect config set`): set PREFECT_API_URL in the active profile."""
    from prefect.settings import PREFECT_API_URL, PREFECT_PROFILES_PATH, update_current_profile

    url = services.prefect_api_url()
    try:
        if (before := _profile_api_url()) == url:
            return
        update_current_profile({PREFECT_API_URL: url})
        _profile_before().parent.mkdir(parents=True, exist_ok=True)
        _profile_before().write_text(before or "")
    except OSError as error:  # a convenience for the user's shell: the servers and the run go on without it
        echo(f"prefect profile: not updated, {PREFECT_PROFILES_PATH.value()} cannot be written ({error}); "
             f"a plain `prefect` command reaches this server with PREFECT_API_URL={url} set in its shell")
        return
    # Another checkout's `up` may have set it: its plain `prefect` commands now reach this server instead.
    was = f", in place of {before} (`cnn-train down` sets it back)" if before else " (`cnn-train down` unsets it)"
    echo(f"prefect profile: PREFECT_API_URL set to {url}{was}")


def _profile_api_url() -> str | None:
    """PREFECT_API_URL as the active Prefect profile sets it (not the environment), in the profiles file the
    user's shell reads: the one under a PREFECT_HOME they set, else ~/.prefect's (every command starts with
    settings.keep_library_state_in_project, which points PREFECT_PROFILES_PATH there when it gives the
    command a PREFECT_HOME of the project's). Read here, not through the prefect CLI: a second of start-up each."""
    from prefect.context import get_settings_context
    from prefect.settings import PREFECT_API_URL, load_profiles

    profiles, name = load_profiles(), get_settings_context().profile.name
    return profiles[name].settings.get(PREFECT_API_URL) if name in profiles.names else None


def _profile_before() -> Path:
    """Where `up` keeps the PREFECT_API_URL it replaced in the profile, for `down` to put back."""
    return state_dir() / "run" / "prefect-profile-before"


def forget_server_in_prefect_cli(echo: Echo, api_url: str) -> None:
    """Undo :func:`point_prefect_cli_at_server` when the profile still points at our server, ``api_url``
    (read before the server stopped: its recorded port goes with it)."""
    from prefect.context import get_settings_context
    from prefect.settings import PREFECT_API_URL, load_profiles, save_profiles

    try:
        if _profile_api_url() != api_url:
            return
    except OSError:  # no profile up could have written
        return
    # What up replaced goes back (another checkout's server, still up): unset, its plain `prefect` commands lost it.
    try:
        before = _profile_before().read_text().strip() or None
        _profile_before().unlink()
    except OSError:
        before = None
    profiles = load_profiles()  # as `prefect config unset PREFECT_API_URL` does
    profiles.update_profile(name=get_settings_context().profile.name, settings={PREFECT_API_URL: before})
    save_profiles(profiles)
    echo(f"prefect profile: PREFECT_API_URL set back to {before}, as before `cnn-train up`" if before else
         "prefect profile: PREFECT_API_URL unset (flows called directly use a temporary server again)")


def up(*, trigger: bool, watch_timeout: float, echo: Echo, worker: bool = False) -> int:
    """Start what is not running, then (optionally) run the deployment; returns an exit code.

    The deployments run either served by this machine's serve process, or (``worker``) from a work
    pool through this machine's worker; starting one mode stops the other and takes the deployments
    over (the serve process clears their pool, `--worker` deploys them to it)."""
    if worker:  # a pool name Prefect refuses starts and stops nothing
        from cnn_train.flows.ops import worker as work_pool

        work_pool.pool_name()
    refuse_foreign_mlflow_server()
    for server in (services.prefect_server, services.mlflow_server):  # before anything starts or stops
        check_same_port(server)
        check_same_host(server)
        if server.pid() is None and not server.ready():  # to start: its port must be free (Prefect's started first)
            server.check_port_free()
    start_service(services.prefect_server, echo, timeout=START_TIMEOUT)
    refuse_taking_the_deployments(worker=worker)  # before anything of this project's starts
    start_service(services.mlflow_server, echo, timeout=START_TIMEOUT)
    point_prefect_cli_at_server(echo)
    clean_up_after_crashes(echo)
    if worker:
        _start_worker(echo)
    else:
        if services.worker_process.stop():
            echo(f"{services.worker_process.name}: stopped (the serve process takes over the deployments)")
        start_service(services.serve_process, echo, timeout=START_TIMEOUT)
    echo(f"Prefect UI: {services.prefect_ui_url()}")
    echo(f"MLflow UI:  {_mlflow_ui_link()}")
    if team := services.team_host():
        echo(f"from other machines: Prefect UI http://{team}:{services.prefect_port()}, API http://{team}:"
             f"{services.prefect_port()}/api, MLflow http://{team}:{services.mlflow_port()} (with the credentials)")
    if not trigger:
        return 0
    return trigger_and_watch(watch_timeout=watch_timeout, echo=echo)


def _foreign(service: services.Service) -> bool:
    return service.port is not None and service.pid() is None and service.ready()


def _not_ours(service: services.Service) -> str:
    return f"not started from this project (no pid in {service.pid_file.parent})"


def refuse_foreign_mlflow_server() -> None:
    """Refuse an MLflow server this project did not start: the serve process would log there, while
    `cnn-train run` and every other command log to the project's own store (tracking_uri trusts only
    the server `up` started), so one project's runs would be split between two stores."""
    server = services.mlflow_server
    elsewhere = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if _foreign(server) and elsewhere.rstrip("/") != services.mlflow_url():  # unless this shell logs there too
        raise ForeignServerError(
            f"{server.name}: port {server.port()} answers, but {_not_ours(server)}; this project's deployment runs "
            f"would be recorded there and its other runs in {elsewhere}: stop that server, or choose another port "
            f"with {server.port_variable}"
        )


def refuse_taking_the_deployments(*, worker: bool) -> None:
    """Refuse to take the deployments on a Prefect server this project did not start while something else
    runs them there: serving them beside another checkout's serve process (the two would take turns at the
    runs, each with its own code) or taking them off a pool its workers poll, and, with ``worker``, moving
    them from another serve process onto the pool. Joining a pool that workers already poll is allowed."""
    server = services.prefect_server
    if not _foreign(server) or services.serve_process.pid() is not None or services.worker_process.pid() is not None:
        return
    deployment = services.deployment_record()
    if deployment is None or deployment.get("status") != "READY":
        return
    where = f"the Prefect server on port {server.port()}, which was {_not_ours(server)}"
    if pool := deployment.get("work_pool_name"):
        if worker:
            return
        raise ForeignServerError(
            f"{services.DEPLOYMENT} runs from work pool {pool!r} on {where}; serving it here would take it off "
            f"that pool: join the pool with `cnn-train up --worker`, or choose another port with {server.port_variable}"
        )
    raise ForeignServerError(
        f"{services.DEPLOYMENT} is already served on {where}; a second {'worker' if worker else 'serve process'} "
        f"would run some of its runs with this checkout's code: stop the other (`cnn-train down` in its project), "
        f"or choose another port with {server.port_variable}"
    )


def _start_worker(echo: Echo) -> None:
    """The work pool, the deployments on it and this machine's worker, unless the worker already polls."""
    from cnn_train.flows.ops import worker

    if services.serve_process.stop():
        echo(f"{services.serve_process.name}: stopped (the work pool takes over the deployments)")
    if not services.worker_process.ready():
        worker.deploy(os.environ | services.quiet_environment(), echo)
    start_service(services.worker_process, echo, timeout=START_TIMEOUT)


@contextlib.contextmanager
def _on_the_servers() -> Iterator[None]:
    """This process's Prefect client on the server `up` started, and the servers' environment for what
    reads it at call time. Prefect reads its settings once, when first imported: set only in os.environ,
    the server's address would not reach a process that had imported Prefect before (its automation
    then went to a throwaway temporary server)."""
    os.environ.update(services.quiet_environment())
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: services.prefect_api_url()}
    if auth := services.client_credentials().get("PREFECT_API_AUTH_STRING"):
        updates[PREFECT_API_AUTH_STRING] = auth
    with temporary_settings(updates=updates):
        yield


def clean_up_after_crashes(echo: Echo) -> None:
    """Let the Prefect server crash flow runs whose heartbeat stops, and crash those whose process already
    died (a killed serve process, a lost machine) with their MLflow runs, before serving again."""
    with _on_the_servers():
        _clean_up_after_crashes(echo)


def _clean_up_after_crashes(echo: Echo) -> None:
    from cnn_train.flows import crashes, tracking

    if change := crashes.ensure_zombie_automation():
        echo(
            f"prefect automation: {crashes.AUTOMATION_NAME!r} {change} "
            f"(cnn-train's flow runs, after {crashes.ZOMBIE_AFTER_SECONDS} s without a heartbeat)"
        )
    for spool, delivery in tracking.sync_spools():
        echo(f"delivered {delivery.delivered} waiting tracking record(s) of MLflow run {spool.run_id}")
    for orphan in crashes.crash_orphans(tracking_uri=services.mlflow_url()):
        echo(orphan.marked)
    for run_id in tracking.reap_stale_runs(uri=services.mlflow_url()):
        echo(f"MLflow run {run_id} marked FAILED: its heartbeat had stopped")


def _mlflow_ui_link() -> str:
    """The default experiment's runs, in the MLflow UI's model-training view (its home page opens the GenAI
    view, whatever the experiment's kind); the server's address when the experiment cannot be had."""
    from mlflow.exceptions import MlflowException

    from cnn_train.flows import tracking
    from cnn_train.flows.params import RunParameters

    uri = services.mlflow_url()
    try:
        experiment_id = tracking.ensure_experiment(tracking.client(uri), RunParameters.model_fields["experiment"].default)
    except (MlflowException, OSError, ExpectedFailure):
        return uri
    return tracking.experiment_url(uri, experiment_id) or uri


def trigger_and_watch(*, watch_timeout: float, echo: Echo, parameters: dict | None = None) -> int:
    """What `prefect deployment run cnn-train/default --watch` does, plus the MLflow side: epochs as
    they land, then the run's URL and test accuracy."""
    with _on_the_servers():
        return _trigger_and_watch(watch_timeout=watch_timeout, echo=echo, parameters=parameters)


def _trigger_and_watch(*, watch_timeout: float, echo: Echo, parameters: dict | None) -> int:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from cnn_train.flows import tracking

    flow_run = run_deployment(services.DEPLOYMENT, parameters=parameters or {}, timeout=0)
    echo(f"Prefect flow run: {services.prefect_ui_url()}/runs/flow-run/{flow_run.id}")
    mlflow_uri = services.mlflow_url()
    shown: set[int] = set()
    run = None
    deadline = time.monotonic() + watch_timeout
    with flow_runs.watching(flow_run.name, str(flow_run.id)), get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run.id).state
            run = flow_runs.main_mlflow_run(str(flow_run.id), mlflow_uri) or run
            if run is not None:
                for metric in tracking.client(mlflow_uri).get_metric_history(run.info.run_id, _FINAL_EPOCH_METRIC):
                    if metric.step not in shown:
                        shown.add(metric.step)
                        echo(f"  epoch {metric.step}: val_accuracy {metric.value:.4f}")
            if state is not None and state.is_final():
                break
            if time.monotonic() > deadline:
                echo(f"gave up waiting after {watch_timeout:.0f} s; the flow run is still {state.name if state else 'unknown'}")
                return 1
            time.sleep(3)
    echo(f"flow run state: {state.name}")
    if flow_runs.is_failure(state):
        for line in flow_runs.failure_reason(str(flow_run.id)):
            echo(line)
    run = flow_runs.main_mlflow_run(str(flow_run.id), mlflow_uri)
    for line in flow_runs.outcome_lines(run, mlflow_uri):
        echo(line)
    return 0 if state.is_completed() and run is not None else 1
