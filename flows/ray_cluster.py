"""Trials on Ray: prefect-ray's task runner on a new local Ray or an existing cluster (joined as
:mod:`cnn_train.flows.ray_join` says), what a trial asks Ray for, and what the driver hands to the workers.

Ray's own task retries are off for trials (``max_retries=0``): a trial whose worker died is submitted
again by the flow (:func:`worker_died`), and resumes from its MLflow child run's checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prefect.context import FlowRunContext

from cnn_train.flows.ops import temporary_server
from cnn_train.flows.params import RAY_RESOURCE_NAME, RunnerOptions
from cnn_train.flows.placement import ray_resources
from cnn_train.flows.quiet import quiet_libraries, quieted, run_logger
from cnn_train.flows.ray_join import (
    RayClusterError, RayOptionError, check_answers, join_failure, keep_token_private, local_start_failure, send_token_when_provided,
)

__all__ = ["node_tags", "parse_resources", "ray_task_runner", "trials_on", "trials_on_ray", "worker_died"]

#: Credentials trials need from the driver. They travel inside each trial's pickled entry point
#: (:func:`_in_trial`), not in the job's runtime environment, which Ray writes to its nodes'
#: logs (runtime_env_agent.log; ray_client_server.err for a Ray Client) and shows on its dashboard.
_CREDENTIALS_ENV = (
    "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
)
#: The rest trials need from the driver, in the job's runtime environment: where to report and keep state,
#: no telemetry, and the command's quiet (cnn_train.flows.quiet): Ray prints its workers' output on the
#: driver's terminal, where each trial's MLflow "View run ... at:" and system-metrics INFO lines appeared.
_FORWARDED_ENV = (
    "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CNN_TRAIN_ROOT", "CNN_TRAIN_STATE_DIR",
    "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED",
    "MLFLOW_LOGGING_LEVEL", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
)

def parse_resources(items: list[str] | None) -> dict[str, float]:
    """``["a100=1", "fast_disk=0.5"]`` as Ray custom resources every trial asks for."""
    resources: dict[str, float] = {}
    for item in items or []:
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not re.fullmatch(RAY_RESOURCE_NAME, name) or value <= 0:
            raise RayOptionError(
                f"--ray-resource takes NAME=AMOUNT with a positive amount (a resource a node advertises with "
                f"`ray start --resources`, e.g. a100=1); got {item!r}"
            )
        resources[name] = value
    return resources


@functools.cache
def _runner_class() -> type:
    """prefect-ray's runner, translating a failed join into :class:`RayClusterError` (defined on first
    use: prefect-ray is an optional extra)."""
    from prefect_ray import RayTaskRunner

    class RayClusterTaskRunner(RayTaskRunner):
        """prefect-ray's ``RayTaskRunner`` that also carries the custom resources every trial asks for."""

        def __init__(
            self,
            address: str | None = None,
            init_kwargs: dict[str, Any] | None = None,
            trial_resources: Mapping[str, float] | None = None,
            credentials: Mapping[str, str] | None = None,
        ) -> None:
            super().__init__(address=address, init_kwargs=init_kwargs)
            self.trial_resources = dict(trial_resources or {})
            self.credentials = dict(credentials or {})
            self.submitted: list[Any] = []  # the trials' futures, to stop them with the flow run (stop_trials)
            # The remote entry point submit() hands to Ray.
            self._run_prefect_task = _in_trial(self.credentials, quieted(), RayTaskRunner._run_prefect_task)

        def duplicate(self) -> RayClusterTaskRunner:
            return type(self)(self.address, self.init_kwargs, self.trial_resources, self.credentials)

        def __eq__(self, other: object) -> bool:
            mine = (self.trial_resources, self.credentials)
            return super().__eq__(other) and mine == (getattr(other, "trial_resources", None), getattr(other, "credentials", None))

        def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
            with _api_for_trials(self.address):
                future = super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
            self.submitted.append(future)
            return future

        def stop_trials(self, wait_seconds: float) -> None:
            """Cancel the trials still running (``ray.cancel``: a KeyboardInterrupt in the trial, which ends its
            MLflow run KILLED and its task run Crashed, as in threads) and wait up to ``wait_seconds`` for them.
            Left running, the runner's exit shut Ray down under them: runs FAILED, task runs Running for good."""
            import ray

            refs = {future.wrapped_future: future for future in self.submitted}
            if not refs:
                return
            _, running = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            for ref in running:
                ray.cancel(ref)
            if running:
                _, stuck = ray.wait(running, num_returns=len(running), timeout=wait_seconds)
                for ref in stuck:
                    mark_crashed(refs[ref].task_run_id, f"its flow run was interrupted and its Ray task did not stop within {wait_seconds:g} s")

        def __enter__(self) -> RayClusterTaskRunner:
            with _sigterm_handler_kept():
                return self._enter()

        def _enter(self) -> RayClusterTaskRunner:
            if not self.address:  # a new local Ray: a failure to start it is not the user's to fix, but for
                keep_token_private()
                try:  # permissions on this machine
                    started = super().__enter__()
                except PermissionError as error:
                    raise local_start_failure(error) from None
                keep_token_private()
                return started
            try:
                return self._join()
            except RayClusterError as failure:
                if not _client_server_failed_to_start(failure):
                    raise
            # A second client: the head's proxy starts it a new server (Prefect's runner refuses a second start).
            self._started = False
            import ray

            ray.shutdown()
            return self._join()

        def _join(self) -> RayClusterTaskRunner:
            """prefect-ray's join, a refusal as one line (:class:`RayClusterError`)."""
            try:
                return super().__enter__()
            except Exception as error:
                if not _refused_join(error):
                    raise
                raise join_failure(self.address, error) from None

    return RayClusterTaskRunner


@contextlib.contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """Put back the SIGTERM handler ``ray.init`` replaces with ``sys.exit`` in the driver: Prefect's, which turns
    a SIGTERM or a cancellation into ``TerminationSignal`` (an interrupted search's runs end KILLED; they
    ended FAILED with 'SystemExit: 15'), and which Prefect's runner checks for before it cancels a flow run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


def stop_trials_on_ray(wait_seconds: float) -> None:
    """Stop this flow run's trials on Ray, when its tasks go to a runner of this module (see ``stop_trials``)."""
    context = FlowRunContext.get()
    if (stop := getattr(getattr(context, "task_runner", None), "stop_trials", None)) is None:
        return
    try:
        stop(wait_seconds)
    except Exception as error:  # on the interruption's way out: it goes on, not this
        run_logger(__name__).warning("could not stop the trials on Ray (%s: %s); Ray's shutdown ends them", type(error).__name__, error)


def _in_trial(credentials: dict[str, str], quiet: bool, run: Callable[..., Any]) -> Callable[..., Any]:
    """``run`` (prefect-ray's remote entry point) that first sets ``credentials`` in the Ray worker's
    environment (Ray pickles the function with them, by value) and, for a quiet driver, silences the
    libraries there as the command did: Ray prints its workers' logs on the driver's terminal."""

    def run_in_trial(*args: Any, **kwargs: Any) -> Any:
        os.environ.update(credentials)
        if quiet:
            quiet_libraries()
        return run(*args, **kwargs)

    return run_in_trial


def _trials_may_use(api_url: str | None, address: str | None) -> bool:
    """Whether trials on the Ray at ``address`` may be handed ``api_url``. On an existing cluster a trial
    may run on another machine, which cannot reach the command's temporary server on this machine's
    loopback: it gets no API, and starts a server of its own as Prefect does. (The flow run itself stays
    on the temporary server, which outlasts a terminal's Ctrl-C to record it.)"""
    return bool(api_url) and not (address and temporary_server.serves(api_url))


@contextlib.contextmanager
def _api_for_trials(address: str | None) -> Iterator[None]:
    """The Prefect settings a trial is submitted under (prefect-ray sends them along with it)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    api_url = get_current_settings().api.url
    if api_url and not _trials_may_use(api_url, address):
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            yield
    else:
        yield


def ray_task_runner(
    address: str | None = None,
    *,
    init_kwargs: Mapping[str, Any] | None = None,
    trial_resources: Mapping[str, float] | None = None,
) -> Any:
    """prefect-ray's runner: a new local Ray, or the cluster at ``address`` (``HOST:PORT``, ``auto`` or
    ``ray://HOST:PORT``). ``trial_resources`` are Ray custom resources every trial asks for.

    Trials pick their device inside Ray (``assigned_by_scheduler``), so Ray's GPU assignment, not a local
    lease, decides which card a trial gets. The driver's Prefect and MLflow locations and credentials
    (out of Ray's logs: :data:`_CREDENTIALS_ENV`) are forwarded so trials report where the flow run does."""
    from prefect.settings import get_current_settings

    try:
        runner_class = _runner_class()
    except ImportError as error:
        raise RayClusterError(
            f"task runner 'ray' needs prefect-ray and ray ({error}); install them with: pip install 'cnn-train[ray]'"
        ) from None
    if address and address != "auto":
        check_answers(address)
        send_token_when_provided()

    env = {name: os.environ[name] for name in _FORWARDED_ENV if os.environ.get(name)}
    if _trials_may_use(api_url := get_current_settings().api.url, address):
        env["PREFECT_API_URL"] = api_url
    credentials = {name: os.environ[name] for name in _CREDENTIALS_ENV if os.environ.get(name)}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}}
    if not address:
        # "local" so that a cluster named by RAY_ADDRESS or a `ray start` on this machine is not joined
        # by surprise; no dashboard (its extra dependencies are not installed) and a modest object
        # store: the arrays of one prepared dataset are what trials share.
        kwargs |= {"address": "local", "include_dashboard": False, "object_store_memory": 1_000_000_000}
    elif address == "auto":
        # prefect-ray turns "auto" into a bare ray.init(), which starts a new local Ray when it finds
        # none; Ray's own "auto" fails instead, and finds the cluster the same way otherwise.
        kwargs["address"] = "auto"
    return runner_class(address, kwargs | dict(init_kwargs or {}), trial_resources, credentials)


@contextlib.contextmanager
def trials_on(runner: RunnerOptions) -> Iterator[None]:
    """Tasks this flow run submits inside the block run where ``runner`` says. For ``task_runner='ray'``
    a Ray runner (a new local Ray, or the cluster at ``ray_address``) is entered here and takes this
    flow run's submissions until the block ends, so a deployment's parameters, not only a command's
    options, put trials on Ray; a flow already on a Ray runner (``flow.with_options(task_runner=...)``)
    keeps it."""
    if runner.task_runner != "ray" or _on_ray():
        yield
        return
    context = FlowRunContext.get()
    with ray_task_runner(runner.ray_address, trial_resources=runner.ray_resources) as ray:
        # A copy of the flow run's context with the Ray runner (model_copy clears the copy's token so it
        # can be entered); leaving it restores the original, as nesting any Prefect context does.
        with context.model_copy(update={"task_runner": ray}):
            yield


def _on_ray() -> bool:
    """Whether this flow run's tasks go to Ray (outside a flow run, nothing does)."""
    if (context := FlowRunContext.get()) is None:
        return False
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        return False
    return isinstance(context.task_runner, RayTaskRunner)


def trials_on_ray(runner: RunnerOptions) -> bool:
    """Whether a search's trials run on Ray: asked for, or this flow run's own task runner is Ray's
    (``flow.with_options(task_runner=ray_task_runner(...))``)."""
    return runner.task_runner == "ray" or _on_ray()


@contextlib.contextmanager
def _ray_request(device_request: str, on_ray: bool) -> Iterator[None]:
    """The trial's needs as Ray options on the task submitted inside this block: its GPU, the runner's
    custom resources, and no Ray retries (the flow resubmits a trial whose worker died)."""
    if not on_ray:
        yield
        return
    import ray
    from prefect_ray.context import remote_options

    custom = getattr(FlowRunContext.get().task_runner, "trial_resources", None)
    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else None  # the cluster's
    options = ray_resources(device_request, cluster_gpus=gpus, custom=custom)
    if ray.is_initialized():
        wait_for_a_node_offering(options)
    with remote_options(**options, max_retries=0):
        yield


#: How long a search waits for its Ray cluster to offer what each trial asks for (a GPU, a custom
#: resource) before it fails: as long as a gpu-required task waits for a free card on its machine.
RESOURCE_WAIT_SECONDS = 600.0


def wait_for_a_node_offering(options: Mapping[str, Any], *, timeout: float | None = None, poll: float = 2.0) -> None:
    """Return once the cluster's live nodes offer what the Ray ``options`` ask for (a node may join
    meanwhile, started by hand or by an autoscaler), else fail in one line: Ray itself queues such a
    task for good, saying so only in autoscaler lines on the terminal."""
    import time

    import ray

    wanted = {"GPU": float(options.get("num_gpus") or 0), **{k: float(v) for k, v in (options.get("resources") or {}).items()}}
    wanted = {name: amount for name, amount in wanted.items() if amount > 0}
    deadline = time.monotonic() + (RESOURCE_WAIT_SECONDS if timeout is None else timeout)
    waiting = False
    while True:
        offered = ray.cluster_resources()
        missing = {name: amount for name, amount in wanted.items() if offered.get(name, 0.0) < amount}
        if not missing:
            return
        asked = ", ".join(f"{name}={amount:g}" for name, amount in missing.items())
        if time.monotonic() >= deadline:
            has = ", ".join(f"{name}={offered[name]:g}" for name in sorted(offered) if "node:" not in name and "memory" not in name)
            raise RayClusterError(
                f"no node of the Ray cluster offers {asked}, which each trial asks for (its nodes offer {has or 'nothing'}); "
                "start one that does (`ray start --address HEAD:PORT --num-gpus N` or `--resources '{\"NAME\": N}'`), "
                "or ask for less (train_device gpu-preferred or cpu; fewer --ray-resource)"
            )
        if not waiting:
            waiting = True
            run_logger(__name__).warning("the trials wait up to %.0f s for a node of the Ray cluster offering %s", deadline - time.monotonic(), asked)
        time.sleep(poll)


#: Ray's errors for a task whose worker process or node died under it (not a task that failed).
_WORKER_DEATHS = frozenset({"WorkerCrashedError", "NodeDiedError", "OutOfMemoryError"})


def _is_ray_error(error: BaseException, names: frozenset[str]) -> bool:
    """Whether ``error`` is one of ``ray.exceptions``' ``names``. By name: inside a flow run
    ``ray.exceptions`` can be executed twice (prefect-ray imports Ray lazily), so the class Ray raises
    need not be the one ``import ray.exceptions`` gives here."""
    return any(cls.__module__ == "ray.exceptions" and cls.__name__ in names for cls in type(error).__mro__)


def _client_server_failed_to_start(error: BaseException) -> bool:
    """Whether a Ray Client's head failed to start the server it starts for each client: on a busy head it
    missed its 30 s to answer, or died starting (seen in CI on 2 cores). A second client gets a new one."""
    return "Initialization failure from server" in str(error)


def _refused_join(error: BaseException) -> bool:
    """Whether ``error`` is how ``ray.init`` says it could not join a cluster."""
    return isinstance(error, (ConnectionError, RuntimeError)) or _is_ray_error(error, frozenset({"AuthenticationError"}))


def worker_died(error: BaseException) -> bool:
    """Whether ``error`` says the Ray worker or node running a task died (not that the task failed)."""
    return _is_ray_error(error, _WORKER_DEATHS)


def mark_crashed(task_run_id: Any, message: str) -> None:
    """Record a task run whose Ray worker died as Crashed; its engine died with the worker and left it Running."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_task_run_state(task_run_id, Crashed(message=message), force=True)


def node_tags() -> dict[str, str]:
    """The Ray node this code runs on, as MLflow run tags."""
    import ray
    import ray.util

    return {"ray.node_id": ray.get_runtime_context().get_node_id(), "ray.node_ip": ray.util.get_node_ip_address()}
