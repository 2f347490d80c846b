"""What every cnn-train flow does around its MLflow runs: tag them with the Prefect flow run, reap
abandoned ones at start, and end each one FINISHED, KILLED or FAILED, never left RUNNING."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prefect import Flow, get_run_logger, runtime
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.states import Failed
from pydantic import BaseModel

from cnn_train.flows import crashes, diskspace, steps, tracking
from cnn_train.flows.diskspace import disk_full, disk_full_line
from cnn_train.flows.ops import services
from cnn_train.flows.errors import ExpectedFailure, debugging, did_you_mean, hide_expected_tracebacks, one_line_reason
from cnn_train.flows.flow_runs import FLOW_NAMES
from cnn_train.flows.params import RunnerOptions
from cnn_train.flows.quiet import run_logger
from cnn_train.flows.signatures import takes_parameters
from cnn_train.flows.tracking import RunTracker


#: Set on an MLflow run of a flow run that was run again (Retry in the Prefect UI): the later attempt's run.
SUPERSEDED_TAG = "cnn_train.superseded_by"
#: Set on the later attempt's run: the earlier attempts' runs, comma-separated.
EARLIER_ATTEMPTS_TAG = "cnn_train.earlier_attempts"


def flow_run_tags() -> dict[str, str]:
    """The Prefect flow run an MLflow run belongs to; a link only where a Prefect UI exists."""
    tags = {
        tracking.FLOW_RUN_TAG: str(runtime.flow_run.id or ""),
        "prefect.flow_run_name": str(runtime.flow_run.name or ""),
        "prefect.deployment": str(runtime.deployment.name or ""),
        "prefect.flow_run_url": prefect_flow_run_url() or "",
    }
    return {key: value for key, value in tags.items() if value}


def prefect_flow_run_url() -> str | None:
    """The flow run's page in the Prefect UI, or None on a temporary server (no UI to link to)."""
    url = runtime.flow_run.ui_url
    return url if url and url.startswith("http") else None


def figures_from_mlflow(report_md: Path, uri: str, run_id: str, folder: str) -> str:
    """The report about to be logged under ``folder`` of run ``run_id``, rewritten with its figures linked
    to the MLflow server's copies, and its text: MLflow's own preview of report.md shows only images at
    absolute http addresses, and the Prefect UI has no files beside it. Unchanged where MLflow is no
    server (nothing to link to; a reader of the folder has the figures beside it)."""
    from cnn_train.flows.reporting import relink_figures

    markdown = report_md.read_text(encoding="utf-8")
    markdown = relink_figures(markdown, lambda name: tracking.artifact_url(uri, run_id, f"{folder}/{name}") or name)
    report_md.write_text(markdown, encoding="utf-8")
    return markdown


def _start_flow_run(experiment: str, *, run_name: str, role: str | None = None) -> RunTracker:
    """The flow's top-level MLflow run, after checking the store answers and reaping abandoned runs."""
    logger = get_run_logger()
    crashes.record_this_process()
    tracking.check_reachable(tracking.tracking_uri())
    diskspace.check_free_space(diskspace.run_folders(tracking.tracking_uri()))
    tracking.ready_store(tracking.tracking_uri())
    # Records an earlier run left on this machine while the server was away go first: their run's
    # end is among them, so it is not mistaken for abandoned below.
    for waiting, delivery in tracking.sync_spools():
        logger.info("delivered %d waiting record(s) of MLflow run %s", delivery.delivered, waiting.run_id)
    # Flow runs whose process died go first: the stale MLflow heartbeat is one of the ways to tell.
    for orphan in crashes.crash_orphans():
        logger.warning("marked flow run %s Crashed and its MLflow runs FAILED: %s", orphan.name, orphan.reason)
    for run_id in tracking.reap_stale_runs():
        logger.warning("marked abandoned MLflow run %s FAILED (its heartbeat had stopped)", run_id)
    tags = flow_run_tags() | ({"cnn_train.role": role} if role else {})
    # What ran, then the flow run's own name: runs of one kind ("torch-cnn") read apart, and each
    # names its Prefect flow run as the flow run's page names it.
    if context := FlowRunContext.get():
        run_name = f"{run_name}-{context.flow_run.name}"
    services.check_port_variables()  # the run's link reads them: refused before the run exists
    return RunTracker.start(experiment, run_name=run_name, tags=tags)


def run_links(tracker: RunTracker) -> dict[str, str | None]:
    """What a flow returns about its MLflow run's page: ``mlflow_run_url``, its address or None where no
    MLflow server holds the run (a script opens it as it is), and ``mlflow_open``, how a person sees it."""
    return {"mlflow_run_url": tracker.url, "mlflow_open": tracker.url or tracking.open_hint(tracker)}


def _link_attempts(tracker: RunTracker, logger: Any) -> None:
    """A flow run run again starts a new MLflow run; its earlier ones (each attempt's) point at it, and it at them."""
    earlier = [
        run.info.run_id for run in tracking.find_runs_for_flow_run(str(runtime.flow_run.id), uri=tracker.uri)
        if run.info.run_id != tracker.run_id and "mlflow.parentRunId" not in run.data.tags
    ]
    if not earlier:
        return
    mlflow_client = tracking.client(tracker.uri)
    for run_id in earlier:
        mlflow_client.set_tag(run_id, SUPERSEDED_TAG, tracker.run_id)
    tracker.set_tags({EARLIER_ATTEMPTS_TAG: ",".join(earlier)})
    logger.info("this flow run ran before: MLflow run(s) %s now name %s as their successor", ", ".join(earlier), tracker.run_id)


@contextlib.contextmanager
def flow_run_tracker(experiment: str, *, run_name: str, role: str | None = None) -> Iterator[RunTracker]:
    """The flow's top-level MLflow run (:func:`_start_flow_run`), :func:`ended` as the block ends."""
    tracker = _start_flow_run(experiment, run_name=run_name, role=role)
    with ended(tracker):  # from its first line on: whatever fails next, the run does not stay RUNNING
        logger = get_run_logger()
        logger.info("MLflow run %s: %s", tracker.run_id, tracker.url or tracking.open_hint(tracker))
        if (runtime.flow_run.run_count or 1) > 1:  # run again: Retry in the Prefect UI
            _link_attempts(tracker, logger)
        yield tracker


def trial_runner_params(runner: RunnerOptions) -> dict[str, Any]:
    """Where a search's trials run, as its parent MLflow run records it (inside ``ray_cluster.trials_on``):
    the class of the task runner that takes them and, on Ray, the cluster and each trial's resources."""
    context = FlowRunContext.get()
    params: dict[str, Any] = {"task_runner": type(context.task_runner).__name__ if context else "none"}
    if runner.task_runner == "ray":
        params |= {"ray_address": runner.ray_address or "local", "ray_resources": runner.ray_resources}
    return params


def _status_for(error: BaseException) -> str:
    """KILLED for interruptions and cancellations, FAILED for everything else."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, TerminationSignal)) else "FAILED"


@contextlib.contextmanager
def ended(tracker: RunTracker) -> Iterator[None]:
    """Heartbeat the MLflow run while the block runs, then end it FINISHED (and drop its checkpoint),
    or KILLED when interrupted (Ctrl-C, SIGTERM, a cancellation), or FAILED: never left RUNNING.
    When the tracking server is away at the end, the run's records and its end wait in its spool,
    said in one warning line; `cnn-train sync` delivers them."""
    try:
        with tracker.heartbeat():
            yield
    except BaseException as error:
        # A failed or killed run keeps its checkpoint: a retry resumes from it (`cnn-train gc` prunes).
        tracker.describe(ending_note(_status_for(error), error), unless_described=True)
        _warn_if_waiting(tracker, tracker.finish(_status_for(error)))
        raise
    _warn_if_waiting(tracker, tracker.finish("FINISHED"))
    steps.discard_checkpoint(tracker.run_id)


def ending_note(status: str, error: BaseException) -> str:
    """What stopped a run, at the top of its MLflow page (a run cancelled in Prefect said nothing)."""
    if status == "KILLED":
        return tracking.ending_description(status, "interrupted, or its flow run cancelled. What it recorded "
                                           "until then stays, and so does its checkpoint until `cnn-train gc`.")
    if disk_full(error):
        reason = disk_full_line(error)
    else:
        reason = one_line_reason(error)
    return tracking.ending_description(status, reason[:500])


def _warn_if_waiting(tracker: RunTracker, waiting: int) -> None:
    if waiting:
        run_logger(__name__).warning(tracker.waiting_message())


def _mark_runs_hook(status: str) -> Any:
    """A Prefect state hook marking this flow run's MLflow runs, for when the flow body could not."""

    # Prefect's flow engine passes these positionally, its runner (a cancellation from the UI) by name.
    def hook(flow: Any, flow_run: Any, state: Any) -> None:
        message = getattr(state, "message", None)
        reason = f"its flow run {'crashed' if status == 'FAILED' else 'was cancelled'}" + (f" ({message})" if message else "")
        for run in tracking.find_runs_for_flow_run(str(flow_run.id)):
            tracking.mark_unfinished(run.info.run_id, status, reason=reason)

    # Prefect logs a hook by its name ("Running hook ... in response to entering state 'Crashed'").
    hook.__name__ = hook.__qualname__ = f"end_unfinished_mlflow_runs_{status.lower()}"
    return hook


def fails_in_one_line(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A flow body whose expected failures (bad input or dataset, unreachable server, missing GPU, a full
    disk) end the flow run Failed with that one line as its state message, logged without a traceback;
    other errors (bugs) propagate with theirs. Goes between ``@flow`` and ``@takes_parameters``."""

    @functools.wraps(fn)
    def body(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            if debugging() or not (isinstance(error, ExpectedFailure) or disk_full(error)):
                raise
            line = disk_full_line(error) if disk_full(error) else str(error)
            get_run_logger().error(line)
            return Failed(message=line)

    return body


def recorded_flow() -> dict[str, Any]:
    """Options every cnn-train flow shares: its MLflow runs end KILLED or FAILED with the flow run, even
    when the flow body never reaches its own cleanup; results stay in memory (MLflow holds what lasts);
    parameters are validated by the flow itself, once, with messages naming the field.
    Fresh hook lists per flow, since Prefect appends to them in place."""
    hide_expected_tracebacks()
    return {
        "on_cancellation": [_mark_runs_hook("KILLED")],
        "on_crashed": [_mark_runs_hook("FAILED")],
        "persist_result": False,
        "validate_parameters": False,
    }


def cnn_train_flow(
    name: str, *parameters: type[BaseModel], exclude: Iterable[str] = ()
) -> Callable[[Callable[..., Any]], Flow[..., Any]]:
    """How every cnn-train flow is declared: a ``def body(**values)`` whose parameters are the fields of
    ``parameters`` (each declared once, in ``params.py``), recorded as :func:`recorded_flow` says, and
    failing in one line as :func:`fails_in_one_line` says. Its docstring is the flow's description in
    the Prefect UI."""

    if name not in FLOW_NAMES:
        raise TypeError(f"flow name {name!r} is not in cnn_train.flows.flow_runs.FLOW_NAMES, which `cnn-train runs` lists")

    def decorate(fn: Callable[..., Any]) -> Flow[..., Any]:
        if not (fn.__doc__ or "").strip():
            raise TypeError(f"flow {name!r} needs a docstring: it is the flow's description in the Prefect UI")
        body = fails_in_one_line(takes_parameters(*parameters, exclude=exclude)(fn))
        return CnnTrainFlow(fn=body, name=name, **recorded_flow())

    return decorate


class CnnTrainFlow(Flow[..., Any]):
    """A Prefect flow whose call from Python refuses a misspelt or positional argument in one line.
    Prefect's own ``ParameterBindError`` quotes the whole signature, ~3,000 characters of the
    parameters' declarations (their pydantic ``FieldInfo`` defaults feed the forms)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        refuse_unknown_arguments(f"{self.fn.__name__}()", inspect.signature(self.fn), args, kwargs)
        return super().__call__(*args, **kwargs)


#: Keywords ``Flow.__call__`` takes for itself.
_CALL_OPTIONS = ("return_state", "wait_for")


def refuse_unknown_arguments(
    name: str, signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """A ``TypeError`` naming what a flow's call got wrong and what it takes, as Python's own would."""
    parameters = list(signature.parameters)
    if args:
        raise TypeError(f"{name} takes its parameters as keywords ({', '.join(parameters)}), not {len(args)} positional")
    for keyword in kwargs:
        if keyword not in signature.parameters and keyword not in _CALL_OPTIONS:
            raise TypeError(
                f"{name} got an unexpected keyword argument {keyword!r}{did_you_mean(keyword, parameters)}; "
                f"its parameters: {', '.join(parameters)}"
            )
