"""The ``cnn-train-sweep`` flow: a grid of configurations, data prepared once, one child MLflow run
per trial under a parent run that ranks them, optionally on Ray.

Trials run on the flow's task runner: threads locally, or Ray through prefect-ray's
``RayTaskRunner`` (:mod:`cnn_train.flows.ray_cluster`), where each trial asks Ray for the GPU its
device request implies and, inside the Ray task, uses the GPU Ray assigned instead of leasing one
itself. A retried trial, by Prefect or after its Ray worker died, reopens its child run and resumes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed

from cnn_train.flows import interrupts, reporting, steps
from cnn_train.flows.data import PreparedData
from cnn_train.flows.errors import did_you_mean
from cnn_train.flows.params import (
    SWEEP_EXCLUDES,
    ParameterError,
    RunnerOptions,
    RunParameters,
    SweepOptions,
    validate_parameters,
)
from cnn_train.flows.signatures import SEARCHABLE, TRAIN_AGAIN, assignments, split_values, train_again, without_fixed_fields
from cnn_train.flows.ray_cluster import _on_ray, _ray_request, mark_crashed, trials_on, trials_on_ray, worker_died
from cnn_train.flows.ray_join import check_runner
from cnn_train.flows.ray_cluster import ray_task_runner  # noqa: F401 - Python callers take this flow's runner from here
from cnn_train.flows.registering import register_task, registered_summary
from cnn_train.flows.runs import cnn_train_flow, flow_run_tags, flow_run_tracker, run_links, trial_runner_params
from cnn_train.flows.tasks import ChildRun, child_run, placed_trial, prep_task, retry_unless_deterministic
from cnn_train.flows.tracking import RunTracker
from cnn_train.plugins.contract import Evaluation

#: Times a trial is submitted when its Ray worker dies under it; each attempt resumes the last one's epochs.
TRIAL_ATTEMPTS = 3


@dataclass(frozen=True)
class TrialResult:
    """One trial's outcome, as the ranking needs it; its test probabilities stay in its MLflow run."""

    values: dict[str, Any]
    run_id: str
    trained: steps.TrainOutcome
    test: Evaluation

    @classmethod
    def of(cls, values: dict[str, Any], child: ChildRun) -> TrialResult:
        return cls(values, child.run_id, child.trained, child.evaluated.evaluation)


@dataclass(frozen=True)
class DivergedTrial:
    """A trial whose training loss stopped being a number: ranked below every finished trial."""

    values: dict[str, Any]
    run_id: str
    epoch: int


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a stable order."""
    if not grid:
        raise ParameterError(f"grid: give at least one field to vary; sweepable fields: {', '.join(SEARCHABLE)}")
    unknown = sorted(set(grid) - set(SEARCHABLE))
    if unknown:
        named = ", ".join(f"{name!r}{did_you_mean(name, SEARCHABLE)}" for name in unknown)
        raise ParameterError(f"grid: cannot vary {named}; sweepable fields: {', '.join(SEARCHABLE)}")
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ParameterError(f"grid: {key} needs a non-empty list of values, got {values!r}")
        if repeated := sorted({repr(v) for v in values if values.count(v) > 1}):
            # Two trials of the same values would train the same model twice and rank it twice.
            raise ParameterError(f"grid: {key} lists {', '.join(repeated)} more than once; give each value once")
    keys = sorted(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def validate_sweep(
    values: Mapping[str, Any],
) -> tuple[list[tuple[dict[str, Any], RunParameters]], SweepOptions, RunnerOptions]:
    """Every trial's varied values and validated parameters, the sweep's options and where its trials
    run; any invalid combination fails the sweep before it starts."""
    values, runner = split_values(values, RunnerOptions)
    check_runner(runner)
    base, options = split_values(values, SweepOptions)
    options = options.model_copy(update={"grid": without_fixed_fields(base, options.grid, SweepOptions, "grid")})
    trials, trial_on = [], "ray" if trials_on_ray(runner) else "threads"
    for combo in expand_grid(options.grid):
        try:
            trials.append((combo, validate_parameters(trial_on=trial_on, **(base | combo))))
        except ParameterError as error:
            raise ParameterError(f"trial {combo}: {error}") from None
    return trials, options, runner


def data_parameters(first: RunParameters, values: Mapping[str, Any]) -> RunParameters:
    """What the sweep's one data prep runs with: the trials' shared data fields and the sweep's own seed,
    the one its parent run logs. A grid over seed varies each trial's weights and shuffles, not the
    split, as in a study (``cnn-train tune``); the first trial's seed would make the split depend on the
    order of the grid's values."""
    return first.model_copy(update={"seed": values.get("seed", RunParameters.model_fields["seed"].default)})


def _trial_work(scheduler_assigned: bool) -> Any:
    """A trial's training and evaluation as plain steps inside its one task, on its placed device."""

    def work(params: RunParameters, data: PreparedData, child: RunTracker, label: str) -> tuple[Any, Any]:
        logger = get_run_logger()
        with placed_trial(params, child, scheduler_assigned=scheduler_assigned, logger=logger) as placement:
            trained = steps.train(params, data, child, device=placement.device)
            evaluated = steps.evaluate(params, trained, data, device=placement.device)
        if trained.resumed_from_epoch:
            logger.warning("resumed after epoch %d of an earlier attempt", trained.resumed_from_epoch)
            child.set_tags({"cnn_train.resumed_from_epoch": trained.resumed_from_epoch})
        steps.log_test_metrics(child, steps.test_metrics(evaluated, data), step=params.epochs, model_uri=trained.model_uri, data=data)
        return trained, evaluated

    return work


def trial_key(values: Mapping[str, Any]) -> str:
    """The same digest for the same varied values: how a retried trial finds its child run again."""
    return hashlib.sha256(json.dumps(dict(values), sort_keys=True, default=str).encode()).hexdigest()[:16]


def trial_name(values: dict[str, Any]) -> str:
    """A trial's name, from the values it varies: its child run's in MLflow and its task run's in Prefect."""
    return "trial-" + "-".join(f"{k}={v}" for k, v in values.items())


def _trial_task_run_name() -> str:
    from prefect.runtime import task_run

    return trial_name(task_run.parameters["values"])


# A retry reopens the trial's child run (found by its key) and resumes from its checkpoint.
@task(
    name="trial", task_run_name=_trial_task_run_name, retries=1, retry_delay_seconds=2,
    retry_condition_fn=retry_unless_deterministic, cache_policy=NO_CACHE, persist_result=False,
)
def trial_task(
    params: RunParameters,
    values: dict[str, Any],
    data: PreparedData,
    parent: RunTracker,
    flow_tags: dict[str, str],
    scheduler_assigned: bool,
) -> TrialResult:
    """Train and evaluate one configuration in its own child run of the sweep."""
    child = child_run(
        params,
        data,
        parent,
        run_name=trial_name(values),
        role="sweep-trial",
        work=_trial_work(scheduler_assigned),
        tags=flow_tags,
        key=trial_key(values),
    )
    get_run_logger().info("trial %s: test accuracy %.4f", values, child.evaluated.evaluation.accuracy)
    return TrialResult.of(values, child)


def ranking_table(results: Sequence[TrialResult], diverged: Sequence[DivergedTrial] = ()) -> pd.DataFrame:
    """Trials best first (by test accuracy; on a tie, the lower test loss first), with their varied values,
    metrics and run ids; diverged trials last, unranked, with a note saying so."""
    frame = pd.DataFrame(
        [
            {
                **result.values,
                "test_accuracy": result.test.accuracy,
                "test_loss": result.test.loss,
                "seconds_per_epoch": result.trained.history.seconds_per_epoch,
                "device": result.trained.device,
                "run_id": result.run_id,
            }
            for result in results
        ]
    )
    frame = frame.sort_values(
        ["test_accuracy", "test_loss"], ascending=[False, True], kind="stable", na_position="last"
    ).reset_index(drop=True)
    frame.insert(0, "rank", pd.array(range(1, len(frame) + 1), dtype="Int64"))
    if diverged:
        failed = pd.DataFrame([{**trial.values, "run_id": trial.run_id} for trial in diverged])
        frame = pd.concat([frame, failed], ignore_index=True).reindex(columns=frame.columns)
        frame["note"] = [""] * len(results) + [f"training diverged in epoch {trial.epoch}" for trial in diverged]
    return frame


def _run_trials(
    trials: list[tuple[dict[str, Any], RunParameters]], data: PreparedData, parent: RunTracker, *, max_concurrent: int
) -> tuple[list[TrialResult], list[DivergedTrial]]:
    """Keep ``max_concurrent`` trials in flight on the flow's task runner: a new one starts as soon as
    any finishes, not when the slowest of a batch does. A trial whose Ray worker died is submitted
    again (Ray's own retries are off, so it never runs twice at once) and resumes its child run. A
    diverged trial is set apart; the sweep fails only when every trial diverged."""
    on_ray, flow_tags = _on_ray(), flow_run_tags()
    pending = [(values, params, 1) for values, params in trials]
    in_flight: list[tuple[PrefectFuture[TrialResult], tuple[dict[str, Any], RunParameters, int]]] = []
    results: list[TrialResult] = []
    diverged: list[DivergedTrial] = []
    while pending or in_flight:
        while pending and len(in_flight) < max_concurrent:
            values, params, attempt = trial = pending.pop(0)
            with _ray_request(params.train_device, on_ray):
                in_flight.append((trial_task.submit(params, values, data, parent, flow_tags, on_ray), trial))
        finished = next(as_completed([future for future, _ in in_flight]))
        values, params, attempt = next(trial for future, trial in in_flight if future is finished)
        in_flight = [entry for entry in in_flight if entry[0] is not finished]
        try:
            results.append(finished.result())
        except steps.TrainingDiverged as error:
            # One learning rate too high says something about the grid; the other trials still count.
            get_run_logger().warning("trial %s: %s", values, error)
            diverged.append(DivergedTrial(values, error.run_id, error.epoch))
        except Exception as error:
            if not (on_ray and worker_died(error)) or attempt >= TRIAL_ATTEMPTS:
                raise
            message = (
                f"the Ray worker running trial {values} died ({type(error).__name__}); "
                f"attempt {attempt + 1} of {TRIAL_ATTEMPTS} resumes it"
            )
            get_run_logger().warning(message)
            mark_crashed(finished.task_run_id, message)
            pending.insert(0, (values, params, attempt + 1))
    order = [values for values, _ in trials]
    diverged.sort(key=lambda trial: order.index(trial.values))  # the grid's order, not the finishing one
    if not results:
        raise steps.TrainingDiverged(
            f"every trial's training diverged ({', '.join(str(t.values) for t in diverged)}); "
            "lower the learning rates in the grid"
        )
    return results, diverged


@cnn_train_flow("cnn-train-sweep", SweepOptions, RunParameters, RunnerOptions, exclude=SWEEP_EXCLUDES)
def cnn_train_sweep(**values: Any) -> dict[str, Any]:
    """A grid of cnn-train configurations sharing one data prep, each a trial (in threads or on Ray),
    ranked in a parent MLflow run; optionally the best model is registered."""
    trials, options, runner = validate_sweep(values)
    first = trials[0][1]
    with flow_run_tracker(first.experiment, run_name=f"sweep-{len(trials)}-trials", role="sweep") as parent:
        parent.log_params(
            # A varied field's default would read as every trial's (architecture=cnn, half of them dense); the
            # seed stays: the split's, data prep's, whatever seeds the trials' weights.
            {k: v for k, v in values.items() if k not in ("grid", *RunnerOptions.model_fields) and (k == "seed" or k not in options.grid)}
            | {"grid": options.grid, "trials": len(trials)}
        )
        data = prep_task(data_parameters(first, values), parent)
        with trials_on(runner), interrupts.trials_stop_with_the_flow():
            parent.log_params(trial_runner_params(runner))
            results, diverged = _run_trials(trials, data, parent, max_concurrent=options.max_concurrent)
        summary = _rank_and_record(parent, results, diverged, trials, data_parameters(first, values).seed)
        if options.register_best:
            summary |= _register_best(options.register_best, summary["best_run_id"], results, trials, data, parent)
    return summary


def _rank_and_record(
    parent: RunTracker, results: list[TrialResult], diverged: list[DivergedTrial],
    trials: list[tuple[dict[str, Any], RunParameters]], split_seed: int,
) -> dict[str, Any]:
    ranking = ranking_table(results, diverged)
    best = next(r for r in results if r.run_id == ranking.loc[0, "run_id"])
    best_line = (
        f"Best trial: {assignments(best.values)}, test accuracy {reporting.format_percent(best.test.accuracy)} "
        f"(MLflow run `{best.run_id}`)."
    )
    how = train_again(next(p for values, p in trials if values == best.values), split_seed)
    again = f"{TRAIN_AGAIN}{how}"
    markdown = f"# Sweep ranking\n\n{reporting.markdown_table(ranking)}\n\n{best_line}\n\n{again}\n"
    with tempfile.TemporaryDirectory(prefix="cnn-train-sweep-") as out:
        ranking.to_csv(Path(out) / "ranking.csv", index=False)
        (Path(out) / "ranking.md").write_text(markdown, encoding="utf-8")
        parent.log_artifacts(Path(out), "sweep")
    parent.describe(f"{best_line}\n\n{again}\n\nThe ranking: `sweep/ranking.md` in Artifacts.")
    parent.log_metrics({"best_test_accuracy": best.test.accuracy})
    parent.set_tags({"cnn_train.best_run_id": best.run_id})
    create_table_artifact(reporting.table_records(ranking), key="sweep-ranking", description=best_line)
    create_markdown_artifact(markdown, key="sweep-report", description=best_line)
    summary: dict[str, Any] = {
        "mlflow_run_id": parent.run_id,
        **run_links(parent),
        "best_run_id": best.run_id,
        "best_values": best.values,
        "train_again": how.replace("`", ""),
        "best_test_accuracy": best.test.accuracy,
        "ranking": ranking.to_dict(orient="records"),
    }
    return summary


def _register_best(
    name: str,
    best_run_id: str,
    results: list[TrialResult],
    trials: list[tuple[dict[str, Any], RunParameters]],
    data: PreparedData,
    parent: RunTracker,
) -> dict[str, Any]:
    """The best trial's model as a new version of ``name``, champion or challenger by the registry's rule."""
    best = next(r for r in results if r.run_id == best_run_id)
    registration = register_task(
        name,
        params=next(params for values, params in trials if values == best.values),
        data=data,
        model_uri=best.trained.model_uri,
        run=RunTracker(parent.uri, best.run_id, parent.experiment_id),
        test_accuracy=best.test.accuracy,
        source=f"Best trial of sweep {parent.run_id}: {assignments(best.values)}",
        record_on=parent,
    )
    return registered_summary(name, registration)
