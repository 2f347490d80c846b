"""``cnn-train run``, ``compare`` and ``sweep``: the flows called in this process, their options
derived from the one declaration of run parameters."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import typer
from pydantic import BaseModel

from cnn_train.flows import collector
from cnn_train.flows.cli.app import app, cli_options, declared_default, fail
from cnn_train.flows.params import COMPARE_EXCLUDES, SWEEP_EXCLUDES, CompareOptions, RunnerOptions, RunParameters, SweepOptions
from cnn_train.flows.ops.temporary_server import prefect_api


def take_ray_resources(values: dict[str, Any]) -> None:
    """The repeated ``--ray-resource NAME=AMOUNT`` items as the mapping the flows take."""
    from cnn_train.flows.ray_cluster import parse_resources
    from cnn_train.flows.ray_join import RayClusterError

    try:
        values["ray_resources"] = parse_resources(values["ray_resources"])
    except RayClusterError as error:
        fail(str(error))


def _validated(check: Callable[[dict[str, Any]], Any], values: dict[str, Any]) -> Any:
    """The flow's own validation, run here first so a bad value is one line before any flow run or MLflow
    run exists (a temporary server already booting for the flow is stopped unused as the command exits)."""
    from cnn_train.flows.params import ParameterError

    try:
        return check(values)
    except ParameterError as error:
        fail(str(error))


def fix_given_fields(context: typer.Context, values: dict[str, Any], option: str, options: type[BaseModel]) -> None:
    """Take out of the grid or space (``option``) the fields given on the command line, or refuse a grid
    or space the user gave that varies one of them. Given at its default value (``--architecture cnn``),
    a field is invisible to the flow, which then varied it anyway."""
    from cnn_train.flows.params import ParameterError
    from cnn_train.flows.signatures import without_fixed_fields

    sources = {name: context.get_parameter_source(name) for name in values}
    given = {name for name, source in sources.items() if source is not None and source.name == "COMMANDLINE"}
    try:
        values[option] = without_fixed_fields(values, values[option], options, option, given=given)
    except ParameterError as error:
        fail(str(error))


def checked_run(flow_path: str, check: str, values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """What ``check`` (a function of the flow's module) made of ``values``, and what the flow at
    ``flow_path`` (``cnn_train.flows.<module>.<flow>``) returned for them. The module is imported and
    the values checked while a temporary server, if one is needed, boots."""
    with collector.paused():
        api = prefect_api()
        module_name, _, flow_name = flow_path.rpartition(".")
        module = importlib.import_module(module_name)
        checked = _validated(getattr(module, check), values)
        require_reachable_servers()
    return checked, _run_flow(getattr(module, flow_name), values, api)


def _run_flow(
    flow_fn: Any, values: dict[str, Any], api: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
) -> dict[str, Any]:
    """The flow's result, called on the Prefect API ``api`` gives (temporary_server.prefect_api)."""
    from cnn_train.flows import diskspace, tracking

    try:
        with api():
            state = flow_fn(**values, return_state=True)
    except Exception as error:
        # A full disk under the temporary server's database fails Prefect's own calls, in 500s that never
        # say why; the flow run logged the disk's one line before that, and it is the one to end with.
        if diskspace.disk_full(error):
            fail(diskspace.disk_full_line(error), 1)
        if full := diskspace.full_disk_line(diskspace.run_folders(tracking.tracking_uri())):
            fail(full, 1)
        raise
    if not state.is_completed():
        # An expected failure's state message is already its one line (see runs.fails_in_one_line).
        fail(state.message or f"flow run ended {state.name}", 1)
    result = state.result()
    _say_what_waits()
    return result


def _say_what_waits() -> None:
    """One line on stderr per run whose records wait on this machine because MLflow did not answer."""
    from cnn_train.flows import tracking

    for spool in (spool for spool in tracking.waiting_spools() if spool.holds_end()):
        typer.echo(
            f"cnn-train: {tracking.waiting_on(spool.uri)} did not answer: {spool.count()} record(s) of run "
            f"{spool.run_id} (its final status among them) wait in {spool.folder}; run `cnn-train sync` once it answers",
            err=True,
        )


def require_reachable_servers() -> None:
    """A configured but dead Prefect API or MLflow server would fail the run late; say so at once."""
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import get_current_settings

    from cnn_train.flows import tracking
    from cnn_train.flows.ops.addresses import start_hint
    from cnn_train.flows.ops.services import prefect_api_answers, prefect_api_mistake, prefect_api_refusal

    from cnn_train.flows import diskspace

    try:
        tracking.check_reachable(tracking.tracking_uri())
        # Before a temporary Prefect server starts: on a full disk its own database failed first, in 500s.
        diskspace.check_free_space(diskspace.run_folders(tracking.tracking_uri()))
    except (tracking.TrackingUnavailableError, diskspace.DiskFullError) as error:
        fail(str(error))
    api_url = get_current_settings().api.url
    if api_url and not prefect_api_answers(api_url):
        fail(
            prefect_api_mistake(api_url)
            or f"the Prefect API at {api_url} does not answer; {start_hint(api_url, 'start it with `cnn-train up --no-trigger`')}, "
            "or `prefect config unset PREFECT_API_URL` to run on a temporary server"
        )
    if api_url and (refusal := prefect_api_refusal(api_url)):
        fail(refusal)


@app.command()
@cli_options(RunParameters)
def run(**values: Any) -> None:
    """Run the cnn-train flow directly in this process (no servers needed)."""
    from cnn_train.flows.params import validate_parameters

    with collector.paused():
        api = prefect_api()  # a temporary server, if one is needed, boots while the checks and imports run
        _validated(lambda v: validate_parameters(**v), values)
        require_reachable_servers()
        from cnn_train.flows.train_flow import cnn_train

    result = _run_flow(cnn_train, values, api)
    typer.echo(f"MLflow run: {result['mlflow_open']}")
    typer.echo(f"test accuracy: {result['test_accuracy']:.4f}")
    if result.get("dense_test_accuracy") is not None:
        typer.echo(f"dense network test accuracy: {result['dense_test_accuracy']:.4f}")
    if result.get("registration"):
        typer.echo(result["registration"])


@app.command()
@cli_options(CompareOptions, RunParameters, exclude=COMPARE_EXCLUDES)
def compare(**values: Any) -> None:
    """Train one config on several backends (same seed and split) and print them side by side."""
    _, result = checked_run("cnn_train.flows.compare_flow.cnn_train_compare", "validate_compare", values)
    import pandas as pd

    from cnn_train.flows import reporting

    # The table and the verdict; compare.md's confusion matrices are pictures, in MLflow and the Prefect UI.
    typer.echo(reporting.markdown_table(pd.DataFrame(result["table"])))
    typer.echo(f"verdict: {result['verdict']}")
    typer.echo(f"MLflow parent run (compare.md, a confusion matrix per backend): {result['mlflow_open']}")


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["learning_rate=0.001,0.0003", "architecture=cnn,dense"]`` as a grid; values parse as JSON
    when they can (numbers), else stay strings."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            fail(f"--grid takes FIELD=VALUE,VALUE...; got {item!r}")
        parsed = []
        for value in values.split(","):
            try:
                parsed.append(json.loads(value))
            except ValueError:
                parsed.append(value)
        field = key.strip()
        if field in grid:  # the first would be dropped without a word
            fail(f"--grid gives {field} twice; list its values in one item: {field}=A,B,...")
        grid[field] = parsed
    return grid


@app.command()
@cli_options(SweepOptions, RunParameters, RunnerOptions, exclude=SWEEP_EXCLUDES)
def sweep(ctx: typer.Context, **values: Any) -> None:
    """Run a grid of configurations (data prepared once), ranked in a parent MLflow run."""
    take_ray_resources(values)
    grid = values["grid"]
    values["grid"] = parse_grid(grid) if grid is not None else declared_default(SweepOptions, "grid")
    fix_given_fields(ctx, values, "grid", SweepOptions)
    _, result = checked_run("cnn_train.flows.sweep_flow.cnn_train_sweep", "validate_sweep", values)
    import pandas as pd

    from cnn_train.flows import reporting

    typer.echo(reporting.markdown_table(pd.DataFrame(result["ranking"])))
    from cnn_train.flows.signatures import assignments

    best = assignments(result["best_values"])
    typer.echo(f"best trial: {best}, test accuracy {result['best_test_accuracy']:.2%}, run {result['best_run_id']}")
    typer.echo(f"train it again: {result['train_again']}")
    typer.echo(f"MLflow sweep run: {result['mlflow_open']}")
    if "registration" in result:
        typer.echo(result["registration"])
