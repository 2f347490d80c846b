"""What a tune flow run leaves behind: in its parent MLflow run the ranking (CSV and markdown), Optuna's
figures and the best trial; in Prefect the ranking as a table artifact; optionally the best model
registered."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cnn_train.flows import reporting, tracking
from cnn_train.flows.runs import run_links
from cnn_train.flows.data import PreparedData
from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.registering import register_task, registered_summary
from cnn_train.flows.signatures import TRAIN_AGAIN, assignments, train_again
from cnn_train.flows.tracking import RunTracker
from cnn_train.flows.tuning.figures import FIGURES, StudyFigures, write_study_figures
from cnn_train.flows.tuning.plan import TunePlan
from cnn_train.flows.tuning.ranking import MODEL_URI_ATTR, TEST_ACCURACY_ATTR, ranking_table, state_counts
from cnn_train.flows.tuning.study import EXPERIMENT_ATTR, RUN_ATTR, redacted_url


class NoCompletedTrialError(ExpectedFailure, RuntimeError):
    """The study has no trial that trained to the end, so it has no best trial."""


def _summary(plan: TunePlan, counts: dict[str, int], best: FrozenTrial | None, ran: list[int], again: str | None) -> list[str]:
    """The best trial first (a watched trigger prints the first line), then how the trials ended and the
    search: ranking.md's opening, and the parent run's description."""
    lines = []
    if best is not None:
        lines += [
            f"**Best trial: {best.number}, {plan.options.objective} {reporting.format_percent(best.value or 0.0)}, "
            f"{assignments(best.params)}** (MLflow run `{best.user_attrs.get(RUN_ATTR)}`).",
            "",
            f"{TRAIN_AGAIN}{again}",
            "",
        ]
    this_run = f"this run ran trials {', '.join(map(str, ran))}" if ran else "this run ran no trial"
    return lines + [
        f"{sum(counts.values())} trials ended: {counts['complete']} complete, {counts['pruned']} pruned, "
        f"{counts['failed']} failed; {this_run}.",
        "",
        f"Storage `{redacted_url(plan.storage_url)}`; space {', '.join(f'`{k}={v}`' for k, v in plan.space.specs().items())}; "
        f"sampler {plan.options.sampler}, pruner {plan.options.pruner}, objective {plan.options.objective} (maximised).",
        "",
    ]


def _markdown(
    plan: TunePlan, ranking_md: str, counts: dict[str, int], best: FrozenTrial | None, figures: StudyFigures, ran: list[int],
    figure_url: Callable[[str], str], again: str | None,
) -> str:
    """ranking.md, its figures shown from ``figure_url(file name)``."""
    lines = [f"# Study `{plan.study_name}`", "", *_summary(plan, counts, best, ran, again)]
    lines += [
        "## Ranking",
        "",
        f"A pruned trial's {plan.options.objective} is its validation accuracy at the epoch it was stopped.",
        "",
        ranking_md,
        "",
        "## Figures",
        "",
    ]
    for path in figures.files:
        lines += [f"`figures/{path.name}`: {FIGURES[path.name]}.", "", f"![{FIGURES[path.name]}]({figure_url(path.name)})", ""]
    lines += [f"- `figures/{name}` not drawn: {why}" for name, why in figures.skipped.items()]
    return "\n".join(lines) + "\n"


def _register(parent: RunTracker, plan: TunePlan, best: FrozenTrial, name: str, data: PreparedData) -> dict[str, Any]:
    """The best trial's model as a new version of ``name``, champion or challenger by the registry's rule
    (the best trial may come from an earlier invocation: the study's data split is the same)."""
    model_uri, run_id = best.user_attrs.get(MODEL_URI_ATTR), best.user_attrs.get(RUN_ATTR)
    if not model_uri or not run_id:
        raise NoCompletedTrialError(f"best trial {best.number} has no logged model to register as {name!r}")
    registration = register_task(
        name,
        params=plan.params_for(best.params),
        data=data,
        model_uri=model_uri,
        run=RunTracker(parent.uri, run_id, str(best.user_attrs.get(EXPERIMENT_ATTR, parent.experiment_id))),
        test_accuracy=float(best.user_attrs[TEST_ACCURACY_ATTR]),
        source=f"Best trial of study {plan.study_name}: {best.number}, {plan.options.objective}={best.value:.4f}, "
        f"{assignments(best.params)}",
        record_on=parent,
    )
    return registered_summary(name, registration)


def record_study(parent: RunTracker, study: optuna.Study, plan: TunePlan, ran: list[int], data: PreparedData) -> dict[str, Any]:
    """Rank the whole study (every invocation's trials), log it with Optuna's figures to the parent
    run and Prefect, register the best model if asked; returns the flow's summary."""
    trials = study.get_trials(deepcopy=False)
    ranking = ranking_table(trials, plan.options.objective)
    counts = state_counts(trials)
    best = study.best_trial if counts["complete"] else None
    # Validated once (params_for checks the run's values): the markdown, the description and the summary give it.
    again = train_again(plan.params_for(best.params), plan.base.seed) if best else None
    with tempfile.TemporaryDirectory(prefix="cnn-train-tune-") as folder:
        out = Path(folder)
        figures = write_study_figures(study, out / "figures")
        # Linked to the MLflow server's copies where there is one: MLflow's preview and the Prefect UI have
        # no files beside the document (see runs.figures_from_mlflow).
        def figure_url(name: str) -> str:
            return tracking.artifact_url(parent.uri, parent.run_id, f"tune/figures/{name}") or f"figures/{name}"

        markdown = _markdown(plan, reporting.markdown_table(ranking), counts, best, figures, ran, figure_url, again)
        ranking.to_csv(out / "ranking.csv", index=False)
        (out / "ranking.md").write_text(markdown, encoding="utf-8")
        parent.log_artifacts(out, "tune")
    parent.describe("\n".join([*_summary(plan, counts, best, ran, again), "The ranking and figures: `tune/ranking.md` in Artifacts."]))
    for name, why in figures.skipped.items():
        get_run_logger().info("figure %s not drawn: %s", name, why)
    parent.log_metrics({f"trials_{state}": count for state, count in counts.items()})
    create_table_artifact(reporting.table_records(ranking), key="tune-ranking", description=f"Study {plan.study_name}, best first")
    create_markdown_artifact(markdown, key="tune-study")
    summary: dict[str, Any] = {
        "mlflow_run_id": parent.run_id,
        **run_links(parent),
        "study_name": plan.study_name,
        "storage": redacted_url(plan.storage_url),
        "trials_run": ran,
        "counts": counts,
        "ranking": ranking.to_dict(orient="records"),
    }
    if best is None:
        raise NoCompletedTrialError(
            f"no trial of study {plan.study_name!r} trained to the end ({counts['pruned']} pruned, "
            f"{counts['failed']} failed); see the trials' MLflow runs under {parent.run_id}"
        )
    parent.log_metrics({"best_value": best.value or 0.0})
    parent.log_params({f"best.{name}": value for name, value in best.params.items()})
    parent.set_tags({"cnn_train.best_trial": best.number, "cnn_train.best_run_id": best.user_attrs.get(RUN_ATTR)})
    summary |= {
        "best_trial": best.number, "best_value": best.value, "best_params": best.params,
        "best_run_id": best.user_attrs.get(RUN_ATTR),
        "train_again": (again or "").replace("`", ""),
    }
    if plan.options.register_best:
        summary |= _register(parent, plan, best, plan.options.register_best, data)
    return summary

