"""Prefect flow runs read back through the API: the recent ones with their state, following one to
its end, and why one failed (its state message and the last lines of its error logs), so a failure
shows in the terminal that triggered it instead of only in a server log or the UI."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cnn_train.flows.errors import ExpectedFailure, debugging, did_you_mean

#: States whose reason is worth showing: the run did not do what was asked.
_FAILED_STATES = frozenset({"FAILED", "CRASHED"})
#: How the engine of a served or worker flow run restates a failure already logged above it.
_ENGINE_RESTATEMENT = "Engine execution exited with unexpected exception"


#: What a flow run's main MLflow run ends with, as a watching terminal shows it, in this order. A compare
#: run's ``<backend>.test_accuracy`` metrics are shown too, after ``test_accuracy``.
_HEADLINE_METRICS = {
    "test_accuracy": "test accuracy: {:.4f}",
    "dense.test_accuracy": "dense network test accuracy: {:.4f}",
    "best_test_accuracy": "best trial's test accuracy: {:.4f}",
    "best_value": "best trial's objective: {:.4f}",
    "accuracy_gap_points": "accuracy gap: {:.2f} points",
    "images_classified": "images classified: {:.0f}",
    "images_failed": "images not classified (unreadable, or nothing to classify): {:.0f}",
}
#: Runs whose description's first line is their verdict, worth a line of its own.
_VERDICT_ROLES = frozenset({"compare", "sweep", "tune"})
#: Headline metrics worth a line only when they are not zero.
_SHOWN_WHEN_NOT_ZERO = frozenset({"images_failed"})


class RunRefusedError(ExpectedFailure, ValueError):
    """The Prefect server would not create the flow run: a parameter breaks the deployment's schema."""


def deployment_names() -> list[str]:
    """Every deployment on the Prefect server, as FLOW/DEPLOYMENT, sorted."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flows = {flow.id: flow.name for flow in client.read_flows()}
        return sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments())


def start_deployment_run(deployment: str, parameters: dict[str, Any]) -> Any:
    """A new flow run of ``deployment``, not waited for. The server checks the parameters against the
    deployment's schema (the declared bounds, choices and types) first; a refusal is one line."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    # The server takes names the flow does not have, and the flow-run process then crashes without a word.
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
    known = list((found.parameter_openapi_schema or {}).get("properties", {}))
    if known and (unknown := sorted(set(parameters) - set(known))):
        named = ", ".join(f"{name}{did_you_mean(name, known)}" for name in unknown)
        raise RunRefusedError(f"{deployment} has no parameter {named}; its parameters: {', '.join(known)}")
    try:
        return run_deployment(found.id, parameters=parameters, timeout=0)  # by id: no second lookup by name
    except PrefectHTTPStatusError as error:
        if error.response.status_code != 409:  # Prefect's answer to parameters its schema refuses
            raise
        detail = str(error.response.json().get("detail", error)).removeprefix("Error creating flow run: ")
        schema = found.parameter_openapi_schema or {}
        if (field := re.search(r"for field '([^']+)'", detail)) and (allowed := schema.get("properties", {}).get(field[1])):
            # Prefect's reason for a choice of types is only "not valid under any of the given schemas".
            detail = f"{detail.rstrip('.')}; {field[1]} takes {what_schema_takes(allowed, schema.get('definitions', {}))}"
        raise RunRefusedError(f"{deployment} refused the parameters {parameters}: {detail}") from None


def what_schema_takes(schema: dict[str, Any], definitions: dict[str, Any]) -> str:
    """A JSON schema of one parameter in words: "a whole number of at least 1, or null"."""
    if "$ref" in schema:
        schema = definitions.get(schema["$ref"].rsplit("/", 1)[-1], {})
    alternatives = [what_schema_takes(choice, definitions) for choice in schema.get("anyOf", [])]
    if alternatives:
        return ", or ".join(alternatives)
    if "enum" in schema:
        return "one of " + ", ".join(repr(value) for value in schema["enum"])
    if schema.get("pattern") == r"\S":  # a name that must not be blank (params.py: experiment)
        return "text with a character other than spaces"
    if "pattern" in schema:  # the title is the form's name for it ("one card (cuda:N)", "name")
        named = schema.get("title") or f"text matching {schema['pattern']}"
        return f"a {named} of {schema['description']}" if "description" in schema else named
    kind = schema.get("type")
    words = {"integer": "a whole number", "number": "a number", "string": "text", "boolean": "true or false",
             "array": "a list", "object": "a mapping", "null": "null"}.get(kind, "a value")
    if kind == "array" and "items" in schema:
        rules = [f"at least {schema['minItems']} items"] if schema.get("minItems") else []
        rules += ["each once"] if schema.get("uniqueItems") else []
        shown = f" ({', '.join(rules)})" if rules else ""
        return f"a list{shown} of {what_schema_takes(schema['items'], definitions)}"
    if kind == "string" and schema.get("minLength") == 1:
        return "non-empty text"
    if "minimum" in schema and "maximum" in schema:
        return f"{words} from {schema['minimum']} to {schema['maximum']}"
    bounds = [f"{relation} {schema[key]}" for key, relation in _BOUNDS.items() if key in schema]
    return f"{words} {' and '.join(bounds)}" if bounds else words


#: JSON schema's bounds, as they read after "a number".
_BOUNDS = {"minimum": "of at least", "exclusiveMinimum": "above", "maximum": "of at most", "exclusiveMaximum": "below"}


@dataclass(frozen=True)
class FlowRunSummary:
    """One flow run as a line of `cnn-train runs`."""

    id: str
    flow: str
    name: str
    state: str
    message: str
    started: datetime | None


#: The flows cnn-train declares (cnn_train.flows.runs.cnn_train_flow takes no other name): `cnn-train runs`
#: lists theirs, not those of other flows on a shared Prefect server.
FLOW_NAMES = ("cnn-train", "cnn-train-compare", "cnn-train-sweep", "cnn-train-tune", "cnn-train-predict")


#: Prefect's state types, lower case (its StateType, without importing Prefect for a command's options).
STATE_TYPES = ("scheduled", "pending", "running", "completed", "failed", "cancelled", "crashed", "paused", "cancelling")


def recent_flow_runs(
    limit: int = 10, *, all_flows: bool = False, states: Sequence[str] = ()
) -> tuple[list[FlowRunSummary], int]:
    """The newest ``limit`` flow runs of cnn-train's flows (of every flow with ``all_flows``; only in one of
    the state types ``states`` when given), by start, not yet started ones first, with their flow's name;
    and how many such flow runs the server holds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterId,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    ours = None if all_flows else FlowFilter(name=FlowFilterName(any_=list(FLOW_NAMES)))
    in_states = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(state.upper()) for state in states]))
    ) if states else None
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=ours, flow_run_filter=in_states, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit
        )
        total = client.count_flow_runs(flow_filter=ours, flow_run_filter=in_states) if len(runs) == limit else len(runs)
        flow_ids = list({run.flow_id for run in runs})
        flows = client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=flow_ids))) if flow_ids else []
    names = {flow.id: flow.name for flow in flows}
    summaries = [
        FlowRunSummary(
            id=str(run.id),
            flow=names.get(run.flow_id, "?"),
            name=run.name,
            state=run.state.name if run.state else "unknown",
            message=(run.state.message or "") if run.state else "",
            started=run.start_time or run.expected_start_time,
        )
        for run in runs
    ]
    return summaries, total


class PrefectServerGone(ExpectedFailure, ConnectionError):
    """The Prefect server stopped answering while a command waited on one of its flow runs."""


def wait_for_end(
    flow_run_id: str, *, timeout: float, on_state: Callable[[str], None], poll_seconds: float = 2.0
) -> Any:
    """Poll the flow run until its state is final, telling ``on_state`` each new state's name; returns
    the final state, or None when ``timeout`` seconds passed first."""
    import httpx
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    seen = None
    with get_client(sync_client=True) as client:
        while True:
            try:
                state = client.read_flow_run(flow_run_id).state
            except httpx.TransportError as error:  # after the client's own retries, about a minute
                raise PrefectServerGone(
                    f"the Prefect API at {str(client.api_url).rstrip('/')} stopped answering while this command watched flow "
                    f"run {flow_run_id} ({error}); the run goes on where it runs: `cnn-train runs` shows how it "
                    "ended once the server is back"
                ) from None
            if state is not None and state.name != seen:
                seen = state.name
                on_state(state.name)
            if state is not None and state.is_final():
                return state
            if time.monotonic() > deadline:
                return None
            time.sleep(poll_seconds)


@contextlib.contextmanager
def watching(flow_run_name: str, flow_run_id: str) -> Iterator[None]:
    """A Ctrl-C while a command follows a flow run stops the following, not the run (it runs where it was
    served): one line saying so and how to follow or stop it, then exit 130 as an interrupted command."""
    try:
        yield
    except KeyboardInterrupt:
        print(
            f"stopped watching flow run {flow_run_name}; it goes on: `cnn-train runs` shows how it ends, "
            f"`prefect flow-run cancel {flow_run_id}` stops it",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


def is_failure(state: Any) -> bool:
    """Failed or Crashed: the flow run broke (a cancellation or a completion has no reason to show)."""
    return state is not None and state.type.value in _FAILED_STATES


def failure_reason(flow_run_id: str, *, lines: int = 12, settle_seconds: float = 20.0, poll_seconds: float = 1.0) -> list[str]:
    """Why the flow run failed: its state message, then the last ``lines`` lines of its (and its task
    runs') error logs, oldest first, which end with the exception that stopped it.

    The process that ran the flow ships its logs in batches (every couple of seconds) and may do so
    after the server already shows the final state, so the error logs are read until two reads agree
    and hold something, or ``settle_seconds`` pass (a run whose logs never reach the API has none)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + settle_seconds
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
        logs = _error_logs(client, flow_run_id)
        while time.monotonic() < deadline:
            time.sleep(poll_seconds)
            again = _error_logs(client, flow_run_id)
            if again and len(again) == len(logs):
                break
            logs = again
    message = state.message if state is not None and state.message else ""
    reason = [f"state message: {message}"] if message else []
    error_lines = [
        line
        for log in logs
        if debugging() or not _restates(log.message, message)
        for line in log.message.splitlines()
        if line.strip()
    ]
    if error_lines:
        reason += ["last error log lines:", *(f"  {line}" for line in error_lines[-lines:])]
    return reason


def _restates(log_message: str, state_message: str) -> bool:
    """Whether an error log only says again what the state message says: Prefect logs an expected
    failure's message as the task's exception, as its Failed state, then as itself, and the engine of a
    served flow run ends with its restatement. A bug's traceback lines do not contain the message."""
    return log_message.startswith(_ENGINE_RESTATEMENT) or (bool(state_message) and state_message in log_message)


def _error_logs(client: Any, flow_run_id: str) -> list[Any]:
    """The flow run's ERROR-and-above log records so far, oldest first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel
    from prefect.client.schemas.sorting import LogSort

    return client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]), level=LogFilterLevel(ge_=logging.ERROR)),
        sort=LogSort.TIMESTAMP_ASC,
    )


def main_mlflow_run(flow_run_id: str, uri: str) -> Any:
    """The MLflow run a flow run recorded itself in (not a sweep's or a study's trial runs), or None. A
    SQLite store that does not exist holds none, and is not created by looking."""
    from cnn_train.flows import tracking

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    runs = tracking.find_runs_for_flow_run(flow_run_id, uri=uri)
    return next((run for run in runs if "mlflow.parentRunId" not in run.data.tags), None)


def outcome_lines(run: Any | None, uri: str) -> list[str]:
    """Where a flow run's results are and what they came to, from its main MLflow ``run`` in ``uri``: the
    run's link (or how to open it) and its headline metrics (a training run's test accuracy, a sweep's
    best trial, a prediction's counts...), for the terminal that watched the flow run end."""
    from cnn_train.flows import tracking

    if run is None:
        return ["no MLflow run was recorded for this flow run"]
    found = _RunAddress(uri, run.info.experiment_id, run.info.run_id)
    lines = [f"MLflow run: {tracking.run_url(uri, found.experiment_id, found.run_id) or tracking.open_hint(found)}"]
    metrics = run.data.metrics
    for name, line in _HEADLINE_METRICS.items():
        if name in metrics and (metrics[name] or name not in _SHOWN_WHEN_NOT_ZERO):
            lines.append(line.format(metrics[name]))
        if name == "test_accuracy":
            per_backend = sorted(k for k in metrics if k.endswith(".test_accuracy") and k not in _HEADLINE_METRICS)
            lines += [f"{k.removesuffix('.test_accuracy')} test accuracy: {metrics[k]:.4f}" for k in per_backend]
    if registered := tracking.registration_line(run.data.tags):
        lines.append(registered)
    # A comparison's verdict and a search's best trial head their run's description, not its metrics.
    if run.data.tags.get("cnn_train.role") in _VERDICT_ROLES and (note := run.data.tags.get("mlflow.note.content")):
        lines.append(note.splitlines()[0].replace("**", "").replace("`", ""))
        from cnn_train.flows.signatures import TRAIN_AGAIN

        lines += [line.replace("`", "").replace(TRAIN_AGAIN, TRAIN_AGAIN.lower()) for line in note.splitlines() if line.startswith(TRAIN_AGAIN)]
    return lines


@dataclass(frozen=True)
class _RunAddress:
    uri: str
    experiment_id: str
    run_id: str
