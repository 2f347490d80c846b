"""The Optuna study behind a tune flow run: its storage, sampler and pruner, continuing it, and
recovering trials whose process died.

The flow drives Optuna with ask and tell, so Prefect keeps running the trials. A trial's driver
records a heartbeat in the storage while the trial runs; a RUNNING trial whose heartbeat stopped
(its process died, here or on another machine sharing the storage), or whose owner process on this
machine is gone, is marked FAIL and queued again once with the same parameters.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.tracking import HEARTBEAT_SECONDS
from cnn_train.flows.tuning.plan import TunePlan
from cnn_train.flows.tuning.space import SpaceError

#: Study attribute holding what the study searches, checked when a later invocation continues it.
DEFINITION_ATTR = "cnn_train.definition"
#: Trial attributes: who drives the trial (host:pid), and its MLflow runs.
OWNER_ATTR = "cnn_train.owner"
RUN_ATTR = "cnn_train.mlflow_run_id"
PARENT_ATTR = "cnn_train.mlflow_parent_run_id"
EXPERIMENT_ATTR = "cnn_train.mlflow_experiment_id"
#: Why a trial failed, in a line.
ERROR_ATTR = "cnn_train.error"
#: Heartbeats as often as the MLflow runs' own; a trial silent for three beats was abandoned.
HEARTBEAT_INTERVAL = max(1, round(HEARTBEAT_SECONDS))
GRACE_PERIOD = 3 * HEARTBEAT_INTERVAL

AbandonedHandler = Callable[[FrozenTrial], None]
#: States of a trial that has ended.
ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_is_gone(trial: FrozenTrial) -> bool:
    """True when the trial's driver ran on this machine and that process no longer exists, or when the
    trial never got an owner (its driver died between asking for it and claiming it) long ago."""
    if OWNER_ATTR not in trial.user_attrs:
        started = trial.datetime_start
        return started is not None and (datetime.now() - started).total_seconds() > GRACE_PERIOD
    host, _, pid = str(trial.user_attrs[OWNER_ATTR]).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, but someone else's
        return False
    return False


def make_sampler(plan: TunePlan, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = plan.base.seed + seed_offset
    if plan.options.sampler == "grid":
        return optuna.samplers.GridSampler(plan.space.grid() or {}, seed=seed)
    if plan.options.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials still running count as mediocre, so K concurrent trials spread out.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.options.startup_trials, constant_liar=True)


def make_pruner(plan: TunePlan) -> optuna.pruners.BasePruner:
    name = plan.options.pruner
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=plan.options.startup_trials)
    if name == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=plan.max_epochs)
    return optuna.pruners.NopPruner()


def _storage(url: str, on_abandoned: Callable[[optuna.Study, FrozenTrial], None]) -> RDBStorage:
    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Trials on several threads (or Ray workers) report into one file: wait for the lock, do not fail.
        engine = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats are Optuna's documented recovery
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=HEARTBEAT_INTERVAL,
                grace_period=GRACE_PERIOD,
                heartbeat_stale_trial_callback=on_abandoned,
            )
        except (ImportError, SQLAlchemyError) as error:  # a missing driver, a database that does not answer
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise StorageError(f"storage {redacted_url(url)}: cannot open it ({first_line})") from None


class StorageError(ExpectedFailure, RuntimeError):
    """The Optuna storage cannot be opened; the message says which and why."""


def open_study(plan: TunePlan, on_abandoned: AbandonedHandler) -> tuple[optuna.Study, RDBStorage]:
    """The plan's study (and its storage), created or continued; a continued study must search the
    same space.

    ``on_abandoned`` is told about each trial found abandoned (after it was marked FAIL and, unless it
    already was a retry, queued again)."""

    def abandoned(study: optuna.Study, trial: FrozenTrial) -> None:
        _queue_again_once(study, trial)
        on_abandoned(trial)

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the flow logs each trial itself
    storage = _storage(plan.storage_url, abandoned)
    created = optuna.create_study(storage=storage, study_name=plan.study_name, load_if_exists=True, direction="maximize")
    # A seeded sampler replays its draws from the start: offset the seed by the trials the study
    # already holds, or a continued study would re-run its first trials' values.
    study = optuna.load_study(
        study_name=plan.study_name,
        storage=storage,
        sampler=make_sampler(plan, seed_offset=len(created.get_trials(deepcopy=False))),
        pruner=make_pruner(plan),
    )
    stored = study.user_attrs.get(DEFINITION_ATTR)
    if stored is None:
        study.set_user_attr(DEFINITION_ATTR, _wanted(plan))
    _refuse_another_search(plan, stored)
    return study, storage


def check_continuation(plan: TunePlan) -> None:
    """Refuse, before the study's flow run, a stored study of the plan's name that another search made
    (the flow run checks again as it opens the study: a deployment's run has no step before it)."""
    storage = _storage(plan.storage_url, lambda study, trial: None)
    try:
        study_id = storage.get_study_id_from_name(plan.study_name)
        stored = storage.get_study_user_attrs(study_id).get(DEFINITION_ATTR)
    except KeyError:  # a new study
        return
    finally:
        storage.engine.dispose()
    _refuse_another_search(plan, stored)


def _wanted(plan: TunePlan) -> dict[str, Any]:
    """The plan's definition as the study stores it (JSON)."""
    return json.loads(json.dumps(plan.definition(), default=str))


def _refuse_another_search(plan: TunePlan, stored: dict[str, Any] | None) -> None:
    if stored is not None and stored != (wanted := _wanted(plan)):
        raise SpaceError(
            f"study {plan.study_name!r} was made for another search ({_difference(stored, wanted)}); "
            "give a new --study-name to start another study"
        )


#: The parts of a study's definition, as a difference names them.
_PARTS = {"space": "space", "objective": "objective", "fixed": "fixed"}


def _difference(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    """What differs, side by side: ``the study: space learning_rate=log:1e-4:1e-2; this command: space
    learning_rate=log:1e-5:1e-2, fixed epochs=3``."""
    sides: tuple[list[str], list[str]] = ([], [])
    for key, label in _PARTS.items():
        old, new = stored.get(key), wanted.get(key)
        if not (isinstance(old, dict) and isinstance(new, dict)):
            old, new = {"": old}, {"": new}
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                for side, values in zip(sides, (old, new), strict=True):
                    if values.get(name) is not None:
                        side.append(f"{label} {name}={values[name]}" if name else f"{label} {values[name]}")
    return f"the study: {', '.join(sides[0]) or 'nothing else'}; this command: {', '.join(sides[1]) or 'nothing else'}"


def _queue_again_once(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a failed trial again with the same parameters, unless it already was a retry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


def requeue_interrupted(study: optuna.Study, trials: Iterable[optuna.Trial]) -> None:
    """Trials this process stopped because its flow run was interrupted: FAIL, and queued again once,
    as a dead process's trials are, so that continuing the study runs them again. Told at once, they
    do not show RUNNING in the storage until the next invocation finds them."""
    # No error attribute says why: Optuna's retry copies the failed trial's user attributes to the new one.
    running = {trial.number for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for trial in trials:
        if trial.number in running:  # else another process failed it as abandoned, and queued it
            _queue_again_once(study, study.tell(trial, state=TrialState.FAIL))


def recover_abandoned(study: optuna.Study, storage: RDBStorage) -> None:
    """Fail and re-queue RUNNING trials whose driver is gone: at once when it ran on this machine, after
    the heartbeat's grace period otherwise (Optuna's stale-trial check, which calls the same handler)."""
    abandoned = storage.get_heartbeat_stale_trial_callback()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _owner_is_gone(trial):
            frozen = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            if abandoned is not None:
                abandoned(study, frozen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def claim(trial: optuna.Trial) -> None:
    """Mark ``trial`` as driven by this process. A retry's copy drops the error of the attempt it
    retries (Optuna copies the failed trial's user attributes), which would otherwise stay on it even
    once it completes."""
    trial.set_user_attr(OWNER_ATTR, owner())
    if trial.user_attrs.get(ERROR_ATTR) is not None:
        trial.set_user_attr(ERROR_ATTR, None)


def ask(study: optuna.Study) -> optuna.Trial:
    """The next trial: a queued one (a retry) first, else one the sampler draws."""
    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for Study.optimize; here TrialHeartbeat records them.
        warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
        return study.ask()


def tell(study: optuna.Study, trial: optuna.Trial, *, state: TrialState, value: float | None = None) -> None:
    """Tell Optuna how ``trial`` ended (unless another process already failed it as abandoned)."""
    try:
        study.tell(trial, value, state=state, skip_if_finished=True)
    except RuntimeError:
        # Optuna documents that GridSampler, after the last grid point, calls Study.stop(), which raises
        # under ask-and-tell; the trial's state is stored before that.
        if not isinstance(study.sampler, optuna.samplers.GridSampler):
            raise


def redacted_url(url: str) -> str:
    """A storage URL fit for logs and MLflow params: any password hidden."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were queued again (their retry takes their place)."""
    return {number for trial in trials for number in RetryHeartbeatStaleTrialCallback.retry_history(trial)}


def run_again_as(trials: list[FrozenTrial]) -> dict[int, int]:
    """Failed trial number -> the number of the trial queued to run it again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        histories = {trial.number: RetryHeartbeatStaleTrialCallback.retry_history(trial) for trial in trials}
    return {history[-1]: number for number, history in histories.items() if history}


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards the study's target: all but failed ones that were queued again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        trials = study.get_trials(deepcopy=False)
        return len(trials) - len(retried_numbers(trials))


def ended_trials(study: optuna.Study) -> int:
    """Trials that ended and count towards the target (complete, pruned, failed and not queued again)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        trials = study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
    return sum(1 for t in trials if t.state in ENDED and t.number not in retried)


def waiting_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


class TrialHeartbeat:
    """Records a heartbeat for every trial this process drives, so another invocation can tell a live
    trial from an abandoned one."""

    def __init__(self, study: optuna.Study, storage: RDBStorage) -> None:
        self._study_id = storage.get_study_id_from_name(study.study_name)
        self.storage = storage
        self._trial_ids: set[int] = set()
        self._lock = threading.Lock()

    def add(self, number: int) -> None:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self._study_id, number)
        self.storage.record_heartbeat(trial_id)  # at once: a trial with no heartbeat never looks stale
        with self._lock:
            self._trial_ids.add(trial_id)

    def remove(self, number: int) -> None:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self._study_id, number)
        with self._lock:
            self._trial_ids.discard(trial_id)

    @contextlib.contextmanager
    def running(self) -> Iterator[TrialHeartbeat]:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_INTERVAL):
                with self._lock:
                    ids = list(self._trial_ids)
                for trial_id in ids:
                    with contextlib.suppress(Exception):  # a missed beat must not stop the study
                        self.storage.record_heartbeat(trial_id)

        thread = threading.Thread(target=beat, name="optuna-trial-heartbeat", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5)
