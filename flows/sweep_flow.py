"""The ``cnn-train-sweep`` flow: a grid of configurations, data prepared once, one child MLflow run
per trial under a parent run that ranks them, optionally on Ray.

Trials run on the flow's task runner: threads locally, or Ray through prefect-ray's
``RayTaskRunner``, where each trial asks Ray for the GPU its device request implies and, inside
the Ray task, uses the GPU Ray assigned instead of leasing one itself.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from cnn_train.flows import reports, steps, tracking
from cnn_train.flows.data import PreparedData
from cnn_train.flows.params import ParameterError, RunParameters, validate_parameters
from cnn_train.flows.placement import check_satisfiable, place_task, ray_resources
from cnn_train.flows.settings import state_dir
from cnn_train.flows.tracking import RunTracker
from cnn_train.flows.train_flow import ended, flow_run_tags, prep_task, recorded_flow

#: Fields a grid may vary. Data-shaping fields are fixed per sweep, since data prep runs once.
SWEEPABLE = ("backend", "architecture", "epochs", "batch_size", "learning_rate", "seed")


@dataclass(frozen=True)
class TrialResult:
    """One trial's outcome, as the ranking needs it."""

    run_id: str
    values: dict[str, Any]
    test_accuracy: float
    test_loss: float
    seconds_per_epoch: float
    model_uri: str
    device: str


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a stable order."""
    if not grid:
        raise ParameterError(f"grid: give at least one field to vary; sweepable fields: {', '.join(SWEEPABLE)}")
    unknown = sorted(set(grid) - set(SWEEPABLE))
    if unknown:
        raise ParameterError(f"grid: cannot vary {unknown}; sweepable fields: {', '.join(SWEEPABLE)}")
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ParameterError(f"grid: {key} needs a non-empty list of values, got {values!r}")
    keys = sorted(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def trial_parameters(base: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]) -> list[RunParameters]:
    """Validated parameters for every trial; any invalid combination fails the sweep before it starts."""
    trials = []
    for combo in expand_grid(grid):
        try:
            trials.append(validate_parameters(**(dict(base) | combo)))
        except ParameterError as error:
            raise ParameterError(f"trial {combo}: {error}") from None
    return trials


@task(name="trial", cache_policy=NO_CACHE, persist_result=False)
def trial_task(
    params: RunParameters,
    values: dict[str, Any],
    data: PreparedData,
    parent: RunTracker,
    flow_tags: dict[str, str],
    scheduler_assigned: bool,
) -> TrialResult:
    """Train and evaluate one configuration in its own child run of the sweep."""
    logger = get_run_logger()
    child = RunTracker.start(
        params.experiment,
        run_name="trial-" + "-".join(f"{k}={v}" for k, v in values.items()),
        tags=flow_tags | {"cnn_train.role": "sweep-trial"},
        parent_run_id=parent.run_id,
        uri=parent.uri,
    )
    with ended(child):
        steps.log_run_params(child, params)
        steps.log_datasets(child, data)
        with place_task("train", params.train_device, logger=logger, assigned_by_scheduler=scheduler_assigned) as placement:
            child.set_tags(placement.as_tags())
            trained = steps.train(
                params, data, child, device=placement.device,
                checkpoint=state_dir() / "checkpoints" / child.run_id,
            )
            evaluated = steps.evaluate(params, trained, data, device=placement.device)
        child.log_metrics(steps.test_metrics(evaluated, data), step=params.epochs)
    logger.info("trial %s: test accuracy %.4f", values, evaluated.evaluation.accuracy)
    return TrialResult(
        run_id=child.run_id,
        values=values,
        test_accuracy=evaluated.evaluation.accuracy,
        test_loss=evaluated.evaluation.loss,
        seconds_per_epoch=trained.seconds_per_epoch,
        model_uri=trained.model_uri,
        device=placement.device,
    )


def ranking_table(results: Sequence[TrialResult], metric: str = "test_accuracy") -> pd.DataFrame:
    """Trials best first, with their varied values, metrics and run ids."""
    frame = pd.DataFrame(
        [
            {**result.values, "test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
             "seconds_per_epoch": result.seconds_per_epoch, "device": result.device, "run_id": result.run_id}
            for result in results
        ]
    )
    frame = frame.sort_values(metric, ascending=False, kind="stable").reset_index(drop=True)
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame


def _ray_cluster_gpus() -> float | None:
    """GPUs Ray reports for the cluster, when this flow runs on Ray."""
    try:
        import ray
    except ImportError:
        return None
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else None


def _ray_request(device_request: str) -> contextlib.AbstractContextManager[Any]:
    """The trial's GPU need as Ray resource options on the task submitted inside this block."""
    from prefect_ray.context import remote_options

    return remote_options(**ray_resources(device_request, cluster_gpus=_ray_cluster_gpus()))


def _submit_trials(
    trials: list[RunParameters], combos: list[dict[str, Any]], data: PreparedData, parent: RunTracker,
    *, max_concurrent: int, on_ray: bool,
) -> list[TrialResult]:
    """Submit trials, at most ``max_concurrent`` in flight, each with its Ray resource request."""
    flow_tags = flow_run_tags()
    results: list[TrialResult] = []
    for start in range(0, len(trials), max_concurrent):
        futures = []
        for params, values in zip(trials[start : start + max_concurrent], combos[start : start + max_concurrent], strict=True):
            with _ray_request(params.train_device) if on_ray else contextlib.nullcontext():
                futures.append(trial_task.submit(params, values, data, parent, flow_tags, on_ray))
        wait(futures)
        results += [future.result() for future in futures]
    return results


@flow(
    name="cnn-train-sweep",
    description="A grid of cnn-train configurations sharing one data prep, ranked in a parent MLflow run.",
    **recorded_flow(),
)
def cnn_train_sweep(
    grid: dict[str, list[Any]] = {"learning_rate": [1e-3, 3e-4], "architecture": ["cnn", "dense"]},  # noqa: B006
    backend: str = "torch",
    architecture: str = "cnn",
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    seed: int = 42,
    validation_fraction: float = 0.1,
    sample_limit: int | None = None,
    test_limit: int | None = None,
    experiment: str = "cnn-train",
    data_dir: str | None = None,
    train_device: str = "gpu-preferred",
    max_concurrent: int = 2,
    register_best: str | None = None,
) -> dict[str, Any]:
    """Run every grid combination as a trial; rank them; optionally register the best model.

    Args:
        epochs: Passes over the training set; empty for the architecture's default (10, or the
            recipe's 7 for cnn-improved).
        batch_size: Images per optimizer step; empty for the architecture's default (32, or 128).
        learning_rate: Adam learning rate (the peak of cnn-improved's one-cycle schedule); empty for
            the architecture's default (0.001, or 0.003).
    """
    base = {k: v for k, v in locals().items() if k not in ("grid", "max_concurrent", "register_best")}
    if max_concurrent < 1:
        raise ParameterError(f"max_concurrent: must be at least 1, got {max_concurrent}")
    trials = trial_parameters(base, grid)
    combos = expand_grid(grid)
    check_satisfiable({"train": train_device})
    logger = get_run_logger()
    from prefect.context import FlowRunContext

    runner = FlowRunContext.get().task_runner
    on_ray = type(runner).__name__ == "RayTaskRunner"
    parent = RunTracker.start(experiment, run_name=f"sweep-{len(trials)}-trials", tags=flow_run_tags() | {"cnn_train.role": "sweep"})
    logger.info("MLflow sweep run %s: %s (%d trials, %s)", parent.run_id, parent.url, len(trials), type(runner).__name__)
    with ended(parent):
        parent.log_params(base | {"grid": grid, "trials": len(trials), "task_runner": type(runner).__name__})
        data = prep_task(trials[0], parent)
        results = _submit_trials(trials, combos, data, parent, max_concurrent=max_concurrent, on_ray=on_ray)
        summary = _rank_and_record(parent, results, register_best)
    return summary


def _rank_and_record(parent: RunTracker, results: list[TrialResult], register_best: str | None) -> dict[str, Any]:
    ranking = ranking_table(results)
    best = next(r for r in results if r.run_id == ranking.loc[0, "run_id"])
    out_dir = Path(tempfile.mkdtemp(prefix="cnn-train-sweep-"))
    ranking.to_csv(out_dir / "ranking.csv", index=False)
    markdown = f"# Sweep ranking\n\n{reports.markdown_table(ranking)}\n\nBest trial: `{best.run_id}` {best.values}, test accuracy {reports.format_percent(best.test_accuracy)}.\n"
    (out_dir / "ranking.md").write_text(markdown, encoding="utf-8")
    parent.log_artifacts(out_dir, "sweep")
    parent.log_metrics({"best_test_accuracy": best.test_accuracy})
    parent.set_tags({"cnn_train.best_run_id": best.run_id})
    create_table_artifact(ranking.round(4).to_dict(orient="records"), key="sweep-ranking")
    create_markdown_artifact(markdown, key="sweep-best")
    summary: dict[str, Any] = {
        "mlflow_run_id": parent.run_id,
        "mlflow_run_url": parent.url,
        "best_run_id": best.run_id,
        "best_test_accuracy": best.test_accuracy,
        "ranking": ranking.to_dict(orient="records"),
    }
    if register_best:
        version = tracking.register_model(
            register_best, best.model_uri, run_id=best.run_id, uri=parent.uri,
            description=f"Best of sweep {parent.run_id}: test_accuracy={best.test_accuracy:.4f} with {best.values}",
        )
        parent.set_tags({"cnn_train.registered_model": f"{register_best}/{version}"})
        summary["registered_version"] = version
    return summary


#: Environment that trials on Ray need from the driver: where to report and where to keep state.
_FORWARDED_ENV = (
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",
    "CNN_TRAIN_ROOT",
    "CNN_TRAIN_STATE_DIR",
    "DO_NOT_TRACK",
    "MLFLOW_DISABLE_TELEMETRY",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
)


def ray_task_runner(address: str | None = None, *, init_kwargs: Mapping[str, Any] | None = None) -> Any:
    """prefect-ray's runner: a new local Ray, or the cluster at ``address``.

    Trials pick their device inside Ray (``assigned_by_scheduler``), so Ray's GPU assignment, not a
    local lease, decides which card a trial gets. The driver's Prefect API URL is forwarded so task
    runs on Ray workers report to the same server as the flow run.
    """
    import os

    from prefect.settings import get_current_settings

    try:
        from prefect_ray import RayTaskRunner
    except ImportError as error:
        raise ParameterError(
            f"task runner 'ray' needs prefect-ray and ray ({error}); install them with: pip install 'cnn-train[ray]'"
        ) from None

    env = {name: os.environ[name] for name in _FORWARDED_ENV if os.environ.get(name)}
    if api_url := get_current_settings().api.url:
        env["PREFECT_API_URL"] = api_url
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}}
    if not address:
        # No dashboard (its extra dependencies are not installed) and a modest object store: the
        # arrays of one prepared dataset are what trials share.
        kwargs |= {"include_dashboard": False, "object_store_memory": 1_000_000_000}
    return RayTaskRunner(address=address, init_kwargs=kwargs | dict(init_kwargs or {}))
