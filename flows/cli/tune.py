"""``cnn-train tune``: an Optuna study over run fields, pruning hopeless trials, resumable, locally or on Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import BaseModel, Field

from cnn_train.flows.cli.app import app, cli_options, declared_default, fail
from cnn_train.flows.cli.training import checked_run, fix_given_fields, take_ray_resources
from cnn_train.flows.params import TUNE_EXCLUDES, RunnerOptions, RunParameters, TuneOptions


class TuneCommandOptions(BaseModel):
    """What only the command line adds: a space from a file, and the short way to turn pruning off."""

    space_file: Optional[Path] = Field(  # noqa: UP045 - typer reads it
        default=None, description="YAML or JSON file mapping FIELD to SPEC; --space items override its fields."
    )
    no_prune: bool = Field(default=False, description="Train every trial to the end (same as --pruner none).")


def _space(values: dict[str, Any], space_file: Path | None) -> dict[str, Any]:
    """The space from the file (if any) and the ``--space FIELD=SPEC`` items, or the declared default."""
    from cnn_train.flows.tuning import load_space_file, parse_assignments

    given = values["space"]
    items = parse_assignments(given) if given is not None else None
    if space_file is None:
        return items if items is not None else declared_default(TuneOptions, "space")
    return load_space_file(space_file) | (items or {})


@app.command()
@cli_options(TuneOptions, RunParameters, RunnerOptions, TuneCommandOptions, exclude=TUNE_EXCLUDES)
def tune(ctx: typer.Context, **values: Any) -> None:
    """Search hyperparameters with Optuna (TPE, pruning hopeless trials after an epoch); running the same
    command again continues the study."""
    from cnn_train.flows.params import ParameterError

    take_ray_resources(values)
    space_file, no_prune = values.pop("space_file"), values.pop("no_prune")
    if no_prune:
        if values["pruner"] != "none" and ctx.get_parameter_source("pruner").name != "DEFAULT":
            fail(f"--no-prune and --pruner {values['pruner']} contradict each other; give one")
        values["pruner"] = "none"
    try:
        values["space"] = _space(values, space_file)
    except ParameterError as error:
        fail(str(error))
    fix_given_fields(ctx, values, "space", TuneOptions)
    plan, result = checked_run("cnn_train.flows.tune_flow.cnn_train_tune", "check_tune", values)
    _print_result(result, plan.study_name, plan.options.objective)


def _print_result(result: dict[str, Any], study_name: str, objective: str) -> None:
    import pandas as pd

    from cnn_train.flows import reporting

    counts = result["counts"]
    typer.echo(reporting.markdown_table(pd.DataFrame(result["ranking"])))
    typer.echo(
        f"study {study_name}: {counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed "
        f"(this run: {'trials ' + ', '.join(map(str, result['trials_run'])) if result['trials_run'] else 'no trial'}); "
        f"storage {result['storage']}"
    )
    from cnn_train.flows.signatures import assignments

    value = reporting.format_percent(result["best_value"])  # as the ranking shows it
    typer.echo(f"best trial: {result['best_trial']}, {objective} {value}, {assignments(result['best_params'])}")
    typer.echo(f"train it again: {result['train_again']}")
    typer.echo(f"MLflow study run: {result['mlflow_open']}")
    if "registration" in result:
        typer.echo(result["registration"])
