"""The ``cnn-train-tune`` flow: an Optuna study over some run fields, its trials run as Prefect tasks
(threads, or Ray like the sweep's), hopeless ones pruned after an epoch, all recorded in MLflow.

Optuna decides (ask: which values next; tell: how a trial ended; its pruner: stop now?), Prefect
runs: data prep once, then up to ``max_concurrent`` trial tasks in flight. Each trial reports every
epoch's validation accuracy to its Optuna trial as the epoch ends and asks the backend to stop when
the pruner says so. The study lives in an RDB storage, so running the same command again continues it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed, State

from cnn_train.flows import interrupts, reporting, steps, tracking
from cnn_train.flows.data import PreparedData
from cnn_train.flows.params import TUNE_EXCLUDES, RunnerOptions, RunParameters, TuneOptions
from cnn_train.flows.ray_cluster import _on_ray, _ray_request, mark_crashed, trials_on, worker_died
from cnn_train.flows.runs import cnn_train_flow, ended, flow_run_tags, flow_run_tracker, trial_runner_params
from cnn_train.flows.tasks import IN_MEMORY, placed_trial, prep_task, progress_line
from cnn_train.flows.tracking import RunTracker
from cnn_train.flows.tuning import (
    ERROR_ATTR,
    EXPERIMENT_ATTR,
    MODEL_URI_ATTR,
    PARENT_ATTR,
    RUN_ATTR,
    STATE_TAG,
    TEST_ACCURACY_ATTR,
    TrialHeartbeat,
    TunePlan,
    ask,
    claim,
    counted_trials,
    ended_trials,
    open_study,
    pruned_label,
    recover_abandoned,
    redacted_url,
    requeue_interrupted,
    tell,
    validate_tune,
    waiting_trials,
)
from cnn_train.flows.tuning.record import record_study
from cnn_train.flows.tuning.study import check_continuation
from cnn_train.plugins.contract import EpochMetrics, TrainHistory

#: MLflow tags linking a trial's run to its study.
STUDY_TAG = "cnn_train.study"
TRIAL_TAG = "cnn_train.trial_number"


@dataclass(frozen=True)
class TrialOutcome:
    """How one trial's training ended, as Optuna and the ranking need it."""

    state: Literal["complete", "pruned"]
    value: float | None
    epochs: int
    test_accuracy: float | None
    model_uri: str | None


def objective_value(history: TrainHistory, objective: str) -> float:
    """The number the study maximises: the last epoch's validation accuracy, or the best epoch's."""
    if objective == "best_val_accuracy":
        return max(epoch.val_accuracy for epoch in history.epochs)
    return history.final.val_accuracy


@task(name="tune-trial", task_run_name="trial-{number}", **IN_MEMORY)
def tune_trial_task(
    number: int,
    trial: optuna.Trial,
    params: RunParameters,
    data: PreparedData,
    child: RunTracker,
    objective: str,
    scheduler_assigned: bool,
) -> TrialOutcome | State[TrialOutcome]:
    """Train trial ``number`` in its own child run of the study's run, reporting each epoch to Optuna
    and stopping when it prunes; evaluate it on the test set when it trained to the end. A pruned
    trial's task run ends in a Completed state named Pruned, saying when and why, as its run does."""
    logger = get_run_logger()
    label = f"trial {trial.number}"
    pruned_at: list[EpochMetrics] = []

    def finished_epoch(metrics: EpochMetrics) -> bool:
        logger.info(progress_line(metrics, params.epochs, label))
        if pruned_at or steps.diverged(metrics):  # a diverged epoch is no score to report: the trial fails
            return True
        trial.report(metrics.val_accuracy, metrics.epoch)
        # Pruning after the last epoch would save nothing: such a trial completes.
        if metrics.epoch < params.epochs and trial.should_prune():
            pruned_at.append(metrics)
            logger.info("%s pruned after epoch %d (val_accuracy %.4f)", label, metrics.epoch, metrics.val_accuracy)
        return bool(pruned_at)

    with ended(child):
        try:
            steps.log_run_params(child, params)
            steps.log_datasets(child, data)
            with placed_trial(params, child, scheduler_assigned=scheduler_assigned, logger=logger) as placement:
                trained = steps.train(params, data, child, device=placement.device, on_epoch=finished_epoch)
                evaluated = None if pruned_at else steps.evaluate(params, trained, data, device=placement.device)
        except BaseException:
            child.set_tags({STATE_TAG: "failed"})
            raise
        if evaluated is None:
            stopped = pruned_at[0]
            why = (f"pruned after epoch {stopped.epoch} of {params.epochs}, at val_accuracy "
                   f"{reporting.format_percent(stopped.val_accuracy)}: the pruner judged it unlikely to beat the other trials")
            child.set_tags({STATE_TAG: pruned_label(stopped.epoch)})
            child.describe(f"**Pruned** {why.removeprefix('pruned ')}. Not evaluated on the test set.")
            return Completed(data=TrialOutcome("pruned", None, stopped.epoch, None, None), name="Pruned", message=why)
        epochs = len(trained.history.epochs)
        value = objective_value(trained.history, objective)
        steps.log_test_metrics(
            child, steps.test_metrics(evaluated, data) | {"objective": value}, step=epochs, model_uri=trained.model_uri, data=data
        )
        child.set_tags({STATE_TAG: "complete"})
        return TrialOutcome("complete", value, epochs, evaluated.evaluation.accuracy, trained.model_uri)


def _end_abandoned_runs(uri: str) -> Any:
    """What to do when a trial is found abandoned: end its MLflow runs FAILED, saying why."""
    logger = get_run_logger()

    def end(trial: FrozenTrial) -> None:
        logger.warning("trial %d was left running by a process that died: marked failed and queued again once", trial.number)
        run_id, experiment_id = trial.user_attrs.get(RUN_ATTR), str(trial.user_attrs.get(EXPERIMENT_ATTR, ""))
        if run_id:
            RunTracker(uri, run_id, experiment_id).set_tags(
                {STATE_TAG: "failed", "cnn_train.trial_note": "its process died while it trained; the trial was queued again"}
            )
            tracking.mark_unfinished(run_id, "FAILED", uri=uri, reason="its process died while it trained; the trial was queued again")
        if parent_id := trial.user_attrs.get(PARENT_ATTR):
            tracking.mark_unfinished(parent_id, "FAILED", uri=uri, reason="its process died while a trial trained")

    return end


@dataclass
class _Running:
    """A trial in flight: its Optuna trial and its Prefect future."""

    trial: optuna.Trial
    future: PrefectFuture[TrialOutcome]


def _start_trial(
    study: optuna.Study, heartbeat: TrialHeartbeat, plan: TunePlan, data: PreparedData, parent: RunTracker, on_ray: bool
) -> _Running:
    """Ask Optuna for the next trial, claim it, open its child run, and submit it to the task runner."""
    trial = ask(study)
    # Claimed at once: a trial this process dies holding is then recognisably abandoned.
    claim(trial)
    heartbeat.add(trial.number)
    try:
        values = plan.space.suggest(trial)
        params = plan.params_for(values)
        child = RunTracker.start(
            params.experiment,
            run_name=f"trial-{trial.number}",
            tags=flow_run_tags() | {"cnn_train.role": "tune-trial", STUDY_TAG: plan.study_name, TRIAL_TAG: str(trial.number)},
            parent_run_id=parent.run_id,
            uri=parent.uri,
        )
        for key, value in {RUN_ATTR: child.run_id, PARENT_ATTR: parent.run_id, EXPERIMENT_ATTR: child.experiment_id}.items():
            trial.set_user_attr(key, value)
        get_run_logger().info("trial %d: %s", trial.number, values)
        with _ray_request(params.train_device, on_ray):
            future = tune_trial_task.submit(trial.number, trial, params, data, child, plan.options.objective, on_ray)
    except BaseException as error:
        heartbeat.remove(trial.number)
        if interrupts.is_interruption(error):  # as it started: queued again, as the trials in flight are
            _hand_back(study, [trial])
        else:
            tell(study, trial, state=TrialState.FAIL)
        raise
    return _Running(trial, future)


def _finish_trial(study: optuna.Study, storage: RDBStorage, running: _Running, on_ray: bool) -> str:
    """Tell Optuna how the trial ended (a trial that raised is FAIL); returns how, in words. A trial
    whose Ray worker died is handled like one whose process died: failed, and queued again once."""
    trial = running.trial
    try:
        outcome = running.future.result()
    except Exception as error:  # noqa: BLE001 - one failed trial does not end the study
        get_run_logger().warning("trial %d failed: %s", trial.number, error)
        trial.set_user_attr(ERROR_ATTR, str(error)[:500])
        tell(study, trial, state=TrialState.FAIL)
        if on_ray and worker_died(error):
            mark_crashed(running.future.task_run_id, f"the Ray worker running trial {trial.number} died")
            requeue = storage.get_heartbeat_stale_trial_callback()
            if requeue is not None:
                requeue(study, study.get_trials(deepcopy=False)[trial.number])
        return "failed"
    trial.set_user_attr(TEST_ACCURACY_ATTR, outcome.test_accuracy)
    trial.set_user_attr(MODEL_URI_ATTR, outcome.model_uri)
    if outcome.state == "pruned":
        tell(study, trial, state=TrialState.PRUNED)
        return pruned_label(outcome.epochs)
    tell(study, trial, state=TrialState.COMPLETE, value=outcome.value)
    return "complete"


def _wants_more(study: optuna.Study, plan: TunePlan, deadline: float | None) -> bool:
    if deadline is not None and time.monotonic() >= deadline:
        return False
    return waiting_trials(study) > 0 or counted_trials(study) < plan.target_trials


def run_study(study: optuna.Study, heartbeat: TrialHeartbeat, plan: TunePlan, data: PreparedData, parent: RunTracker) -> list[int]:
    """Keep ``max_concurrent`` trials in flight until the study holds its trials (or time is up);
    returns the numbers of the trials this invocation ran. Interrupted, it stops the trials in flight
    and hands them back to the study, failed and queued again."""
    in_flight: list[_Running] = []

    def hand_back_in_flight() -> None:
        for running in in_flight:
            heartbeat.remove(running.trial.number)
        _hand_back(study, [running.trial for running in in_flight])

    with interrupts.trials_stop_with_the_flow(then=hand_back_in_flight):
        return _keep_trials_in_flight(study, heartbeat, plan, data, parent, in_flight)


def _hand_back(study: optuna.Study, trials: list[optuna.Trial]) -> None:
    """Interrupted trials back to the study, failed and queued again; a storage that fails now too leaves
    them RUNNING for the next invocation to find, and the interruption goes on."""
    try:
        requeue_interrupted(study, trials)
    except Exception as error:  # noqa: BLE001 - not in place of the interruption
        get_run_logger().warning("the stopped trials stay RUNNING in the study until its next invocation finds them: %s", error)
        return
    if trials:  # the command ends on the signal, with no line of its own: say how to go on
        get_run_logger().warning(
            "study %s stopped: trial(s) %s queued again; run the same command (or flow run parameters) to continue it",
            study.study_name, ", ".join(str(trial.number) for trial in trials),
        )


def _keep_trials_in_flight(
    study: optuna.Study, heartbeat: TrialHeartbeat, plan: TunePlan, data: PreparedData, parent: RunTracker,
    in_flight: list[_Running],
) -> list[int]:
    logger = get_run_logger()
    on_ray = _on_ray()
    deadline = time.monotonic() + plan.options.timeout if plan.options.timeout else None
    target = plan.target_trials
    if note := plan.cap_note():
        logger.info(note)
    done = min(ended_trials(study), target)
    progress = create_progress_artifact(
        100.0 * done / target, key="tune-progress", description=f"{plan.study_name}: {done} of {target} trials done"
    )
    ran: list[int] = []
    while True:
        while len(in_flight) < plan.options.max_concurrent and _wants_more(study, plan, deadline):
            running = _start_trial(study, heartbeat, plan, data, parent, on_ray)
            in_flight.append(running)
            ran.append(running.trial.number)
        if not in_flight:
            break
        first = next(as_completed([r.future for r in in_flight]))
        finished = next(r for r in in_flight if r.future is first)
        in_flight.remove(finished)
        how = _finish_trial(study, heartbeat.storage, finished, on_ray)
        heartbeat.remove(finished.trial.number)
        done = min(ended_trials(study), target)
        update_progress_artifact(progress, 100.0 * done / target, description=f"{plan.study_name}: {done} of {target} trials done")
        logger.info("trial %d %s (%d of %d trials done)", finished.trial.number, how, done, target)
        recover_abandoned(study, heartbeat.storage)
    return ran


def check_tune(values: dict[str, Any]) -> TunePlan:
    """The command's check before its flow run: the plan, and a study of its name in the storage made
    for the same search (the flow run refuses another one too, but only once it is recorded)."""
    plan = validate_tune(values)
    check_continuation(plan)
    return plan


@cnn_train_flow("cnn-train-tune", TuneOptions, RunParameters, RunnerOptions, exclude=TUNE_EXCLUDES)
def cnn_train_tune(**values: Any) -> dict[str, Any]:
    """An Optuna study over cnn-train run fields, created or continued: its missing trials run as
    tasks on shared data (in threads or on Ray), hopeless ones are pruned, and all are ranked and recorded."""
    plan = validate_tune(values)
    study, storage = open_study(plan, on_abandoned=_end_abandoned_runs(tracking.tracking_uri()))
    with flow_run_tracker(plan.base.experiment, run_name=plan.study_name, role="tune") as parent:
        parent.set_tags({STUDY_TAG: plan.study_name, "cnn_train.study_storage": redacted_url(plan.storage_url)})
        parent.log_params(
            {k: v for k, v in values.items() if k not in ("space", "storage", *RunnerOptions.model_fields)
             and (k == "seed" or k not in plan.space.names)}  # as a sweep's parent: no searched field's default
            | {
                "space": json.dumps(plan.space.specs()),
                "storage": redacted_url(plan.storage_url),
                "study_name": plan.study_name,
                "trials_before": ended_trials(study),
            }
        )
        recover_abandoned(study, storage)
        data = prep_task(plan.base, parent)
        with (
            trials_on(plan.runner),
            TrialHeartbeat(study, storage).running() as heartbeat,
        ):
            parent.log_params(trial_runner_params(plan.runner))
            ran = run_study(study, heartbeat, plan, data, parent)
        summary = record_study(parent, study, plan, ran, data)
    return summary
