"""``cnn-train status``, ``gc``, ``runs`` and ``trigger``: what runs and what it leaves behind, the
recent flow runs, and triggering a deployment with the reason shown when its run fails."""

from __future__ import annotations

import enum
import json
import os
from typing import Annotated, Any, Optional

import typer

from cnn_train.flows.cli.app import app, fail
from cnn_train.flows.flow_runs import STATE_TYPES
from cnn_train.flows.errors import did_you_mean

_SERVER_STATES = {(True, True): "ready", (True, False): "started, not answering", (False, True): "answering (not started here)"}


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print servers and disk use as JSON.")] = False,
) -> None:
    """Show the servers started by `cnn-train up` and how much disk the project's state uses; say when this
    shell's MLFLOW_TRACKING_URI or PREFECT_API_URL sends its runs elsewhere."""
    from cnn_train.flows import housekeeping
    from cnn_train.flows.ops import services

    servers = services.status()
    refusal = _prefect_refusal(servers)
    usage = housekeeping.disk_usage()
    if as_json:
        typer.echo(json.dumps({
            "servers": servers, "prefect_api_refusal": refusal, "disk_bytes": {place.label: place.size for place in usage}
        }, indent=2))
        return
    # The serve process's and the worker's readiness is the Prefect API's to tell, which refused this shell.
    unknown = {services.serve_process.name, services.worker_process.name} if refusal else set()
    for name, server in servers.items():
        state = _SERVER_STATES.get((server["pid"] is not None, bool(server["ready"])), "not running")
        if name in unknown and server["pid"] is not None and not server["ready"]:
            state = "started, ready or not: the Prefect API would not tell this shell"
        pid = f", pid {server['pid']}" if server["pid"] else ""
        if server["running_port"] not in (None, server["port"]):  # a port variable names another server's
            answers = "another server answers there" if server["ready"] else "nothing answers there"
            state = f"runs on port {server['running_port']}, not on {server['port']} that this shell asks for ({answers})"
        typer.echo(f"{name}: {state}{pid} (log: {server['log']})")
        if server["code_changed"]:
            typer.echo(f"  {server['code_changed']}")
    if refusal:
        typer.echo(refusal)
    for line in _elsewhere():
        typer.echo(line)
    typer.echo("disk:")
    width = max(len(label) for label in ("total", *(place.label for place in usage)))  # a long path keeps the sizes lined up
    for place in usage:
        typer.echo(f"  {place.label:<{width}} {housekeeping.human_size(place.size):>10}")
    typer.echo(f"  {'total':<{width}} {housekeeping.human_size(sum(place.size for place in usage)):>10}")
    typer.echo("(`cnn-train gc --dry-run` lists what can be pruned)")


def _prefect_refusal(servers: dict[str, dict[str, object]]) -> str | None:
    """Why the project's Prefect server, which answers, refuses this shell's credentials; None if it does not."""
    from cnn_train.flows.ops import services

    if not servers[services.prefect_server.name]["ready"]:
        return None
    return services.prefect_api_refusal(services.prefect_api_url())


def _elsewhere() -> list[str]:
    """A line per variable of this shell that sends its runs somewhere other than the project's servers
    and store, whatever the lines above say about those."""
    from cnn_train.flows.ops import services
    from cnn_train.flows.ops.addresses import same_server
    from cnn_train.flows.settings import default_tracking_uri

    pointed = (
        ("MLFLOW_TRACKING_URI", "runs", "mlflow-server or mlflow.db", (services.mlflow_url(), default_tracking_uri())),
        ("PREFECT_API_URL", "flow runs", "prefect-server", (services.prefect_api_url(),)),
    )
    return [
        f"{variable} is set in this shell: its {what} go to {value}, not to this project's {place}"
        for variable, what, place, project in pointed
        if (value := os.environ.get(variable, "").rstrip("/")) and not any(same_server(value, mine) for mine in project)
    ]


@app.command()
def gc(
    older_than: Annotated[str, typer.Option(help="Prune what was untouched this long: 7d, 12h, 1d12h, 30m.")] = "7d",
    dry_run: Annotated[bool, typer.Option(help="List what would go; remove nothing.")] = False,
) -> None:
    """Prune what accumulates: checkpoints of FAILED or KILLED runs, the temporary Prefect server's
    results and database, logs of stopped servers (FINISHED runs' checkpoints go at once)."""
    from cnn_train.flows import housekeeping

    try:
        age = housekeeping.parse_duration(older_than)
    except housekeeping.DurationError as error:
        fail(f"--older-than: {error}")
    from cnn_train.flows import tracking  # MLflow: only once the age is known to be good
    from cnn_train.flows.ops import services

    uri = tracking.tracking_uri()
    try:
        tracking.check_reachable(uri)
        statuses = housekeeping.run_statuses(housekeeping.checkpointed_runs(), uri)
    except tracking.TrackingUnavailableError as error:
        typer.echo(f"note: {error}; checkpoints are pruned by age only", err=True)
        statuses = {}
    running = [service.name for service in services.SERVICES if service.pid() is not None]
    removals = housekeeping.plan_gc(age, run_status=statuses.get, running_services=running)
    if not dry_run:
        housekeeping.remove(removals)
    verb = "would remove" if dry_run else "removed"
    for removal in removals:
        typer.echo(f"{verb} {removal.path} ({housekeeping.human_size(removal.size)}): {removal.reason}")
    freed = housekeeping.human_size(sum(removal.size for removal in removals))
    typer.echo(f"{'would free' if dry_run else 'freed'} {freed}" if removals else "nothing to prune")


def _prefect_api(*, required: bool) -> str | None:
    """The configured Prefect API URL (checked to answer), or None for a temporary server."""
    from prefect.settings import get_current_settings

    from cnn_train.flows.ops.addresses import start_hint
    from cnn_train.flows.ops.services import prefect_api_answers, prefect_api_mistake, prefect_api_refusal

    api_url = get_current_settings().api.url
    if api_url is None:
        if required:
            fail("no Prefect server is configured (PREFECT_API_URL); start one with `cnn-train up --no-trigger`")
        return None
    if not prefect_api_answers(api_url):
        fail(
            prefect_api_mistake(api_url)
            or f"the Prefect API at {api_url} does not answer; {start_hint(api_url, 'start it with `cnn-train up --no-trigger`')}"
        )
    if refusal := prefect_api_refusal(api_url):
        fail(refusal)
    return api_url


#: The state types ``runs --state`` takes (an Enum, so a wrong one is refused with the list).
RunState = enum.Enum("RunState", {name: name for name in STATE_TYPES}, type=str)


@app.command()
def runs(
    limit: Annotated[int, typer.Option(min=1, max=200, help="How many flow runs, newest first (Prefect's API gives 200 at most).")] = 10,
    all_flows: Annotated[bool, typer.Option("--all-flows", help="Also other flows' runs on the same Prefect server, not only cnn-train's.")] = False,
    state: Annotated[
        Optional[list[RunState]],
        typer.Option(
            metavar="STATE",
            case_sensitive=False,  # the listing's header says FAILED; either spelling is the state
            help=f"Only flow runs in this state type, one of {', '.join(STATE_TYPES)} (repeat for several: --state failed --state crashed).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """List recent flow runs of cnn-train's flows with their state and its message."""
    import pandas as pd

    from cnn_train.flows import flow_runs

    api_url = _prefect_api(required=False)
    where = api_url or "the temporary server's database (runs made without servers)"
    states = list(dict.fromkeys(chosen.value for chosen in state or ()))
    which = ("flow runs" if all_flows else "cnn-train flow runs") + (
        f" in state {' or '.join(name.upper() for name in states)}" if states else ""
    )
    summaries, total = flow_runs.recent_flow_runs(limit, all_flows=all_flows, states=states)
    if api_url is None and _crash_orphans_listed(summaries):
        summaries, total = flow_runs.recent_flow_runs(limit, all_flows=all_flows, states=states)
    if not summaries:
        typer.echo(f"no {which} on {where}" + ("" if all_flows else " (--all-flows lists other flows' runs too)"))
        return
    shown = f"the newest {len(summaries)} of {total}" if total > len(summaries) else f"all {total}"
    typer.echo(f"{shown} {which} on {where}, newest first:")
    table = pd.DataFrame(
        {
            "started": [s.started.astimezone().strftime("%Y-%m-%d %H:%M") if s.started else "" for s in summaries],
            "flow": [s.flow for s in summaries],
            "name": [s.name for s in summaries],
            "state": [s.state for s in summaries],
            "message": [_one_line(s.message) for s in summaries],
        }
    )
    typer.echo(left_aligned(table))


def _crash_orphans_listed(summaries: list[Any]) -> bool:
    """Mark Crashed the orphans among runs made without servers, as every flow's start does; whether any was.
    With servers, Prefect's automation and doctor see a killed run; made without them, nothing did until the
    next run started, and this listing showed it Running. Only when one is listed Running or Pending: the
    check reads MLflow (a second or two)."""
    if not any(summary.state in ("Running", "Pending") for summary in summaries):
        return False
    from cnn_train.flows import crashes

    orphans = crashes.crash_orphans()
    for orphan in orphans:
        typer.echo(orphan.marked)
    return bool(orphans)


def left_aligned(table: Any) -> str:
    """A table of strings as text, each column left-aligned under its header (pandas right-aligns text
    cells, so a short flow name or an empty message stood apart from the rest), no trailing blanks."""
    widths = {column: max(len(column), *map(len, table[column])) for column in table.columns}
    text = table.to_string(index=False, justify="left", formatters={c: f"{{:<{w}}}".format for c, w in widths.items()})
    return "\n".join(line.rstrip() for line in text.splitlines())


def _one_line(message: str, width: int = 90) -> str:
    line = " ".join(message.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def parse_parameters(items: list[str]) -> dict[str, Any]:
    """``["epochs=1", "backend=keras"]`` as flow parameters; a value is JSON when it parses, else text."""
    parameters: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--param takes NAME=VALUE; got {item!r}")
        if key.strip() in parameters:  # the last one won, without a word
            fail(f"--param gives {key.strip()} twice; give each parameter once")
        try:
            parameters[key.strip()] = json.loads(value)
        except ValueError:
            parameters[key.strip()] = value
    return parameters


@app.command()
def trigger(
    deployment: Annotated[str, typer.Argument(metavar="DEPLOYMENT", help="FLOW/DEPLOYMENT to run.")] = "cnn-train/default",
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", metavar="NAME=VALUE", help="A flow parameter, repeatable.")] = None,  # noqa: UP045
    watch: Annotated[bool, typer.Option(help="Follow the flow run to its end; on failure, show why.")] = False,
    watch_timeout: Annotated[int, typer.Option(min=1, help="Seconds to follow it.")] = 7200,
) -> None:
    """Run a deployment on the Prefect server; with --watch, wait for the end, then print the flow run's
    MLflow run and headline metrics, and when it failed, its state message and last error log lines."""
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    from cnn_train.flows import flow_runs

    if deployment.count("/") != 1 or not all(deployment.split("/")):
        fail(f"{deployment!r} is not a deployment name; give FLOW/DEPLOYMENT, e.g. cnn-train/default", 2)
    parameters = parse_parameters(param or [])  # a mistake in the command line first: it needs no server
    api_url = _prefect_api(required=True)
    try:
        flow_run = flow_runs.start_deployment_run(deployment, parameters)
    except flow_runs.RunRefusedError as error:  # a parameter the deployment does not have or take
        fail(str(error))
    except ObjectNotFound:
        served = flow_runs.deployment_names()
        there = f"; deployments there: {', '.join(served)}" if served else "; `cnn-train up --no-trigger` serves cnn-train/default"
        fail(f"no deployment {deployment} on {api_url}{did_you_mean(deployment, served)}{there}")
    ui_url = (get_current_settings().ui_url or "").rstrip("/")  # Prefect keeps an API URL's trailing slash
    link = f": {ui_url}/runs/flow-run/{flow_run.id}" if ui_url else f" ({flow_run.id})"
    typer.echo(f"flow run {flow_run.name}{link}")
    if not watch:
        return
    with flow_runs.watching(flow_run.name, str(flow_run.id)):
        final = flow_runs.wait_for_end(
            str(flow_run.id), timeout=watch_timeout, on_state=lambda name: typer.echo(f"flow run {flow_run.name}: {name}")
        )
    if final is None:
        pool = flow_run.work_pool_name
        nobody = f"no worker polls work pool {pool!r}" if pool else f"nothing serves {deployment}"
        fail(f"gave up after {watch_timeout} s; a run left Scheduled means {nobody} (`cnn-train doctor`)", 1)
    if flow_runs.is_failure(final):
        for line in flow_runs.failure_reason(str(flow_run.id)):
            typer.echo(line, err=True)
    for line in _mlflow_outcome(str(flow_run.id)):
        typer.echo(line)
    if not final.is_completed():
        raise typer.Exit(1)


def _mlflow_outcome(flow_run_id: str) -> list[str]:
    """The ended flow run's MLflow run and headline metrics; a tracking store this shell cannot read
    costs one line, not the exit code the flow run's own end decides."""
    from mlflow.exceptions import MlflowException

    from cnn_train.flows import flow_runs, tracking

    uri = tracking.tracking_uri()
    try:
        tracking.check_reachable(uri)
        return flow_runs.outcome_lines(flow_runs.main_mlflow_run(flow_run_id, uri), uri)
    except (tracking.TrackingUnavailableError, MlflowException, OSError) as error:
        return [f"MLflow run: not looked up ({error})"]
