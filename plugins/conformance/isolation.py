"""What a backend must leave alone: it never talks to MLflow (the flow logs what the backend returns), and
it trains, evaluates and predicts without seeding or drawing from the process-wide random generators (a
sweep trains trials in threads of one process)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pickle
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np

from cnn_train.plugins.conformance.data import SMOKE, images, train_data
from cnn_train.plugins.conformance.subject import Subject


@functools.cache
def _empty_store() -> Path:
    """An empty SQLite store, made once per process: a copy of it is a new store at once, where a new
    file would make MLflow run all its schema migrations again (seconds each time)."""
    from mlflow import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="cnn-train-kit-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    database = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{database}").search_experiments()
    return database


@contextlib.contextmanager
def fresh_tracking_store(directory: Path) -> Iterator[str]:
    """Point MLflow (tracking and registry, variables and process-wide setting) at a new SQLite store
    in ``directory``, then back."""
    shutil.copyfile(_empty_store(), directory / "mlflow.db")
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    with _tracking_at(uri):
        yield uri


@contextlib.contextmanager
def throwaway_tracking() -> Iterator[None]:
    """Whatever a check's backend sends to MLflow goes to a store of its own, removed after (made only if
    used), and a run it leaves active is ended: a backend that logs by itself, the mistake
    :func:`check_does_not_log_to_mlflow` names, must not leave runs in the user's store."""
    mlflow = sys.modules.get("mlflow")
    active_before = mlflow.active_run() if mlflow else None
    with tempfile.TemporaryDirectory(prefix="cnn-train-kit-") as tmp, _tracking_at(f"sqlite:///{Path(tmp) / 'mlflow.db'}"):
        try:
            yield
        finally:
            if (mlflow := sys.modules.get("mlflow")) is not None:
                while (left := mlflow.active_run()) is not None and left is not active_before:
                    mlflow.end_run()


@contextlib.contextmanager
def _tracking_at(uri: str) -> Iterator[None]:
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}):
        # A URI set in-process outranks the variables; only then is it replaced here, and put back after.
        # Not imported yet: nothing has set one (and a check that never uses MLflow does not import it).
        mlflow = sys.modules.get("mlflow")
        pinned_tracking = mlflow.get_tracking_uri() if mlflow and mlflow.get_tracking_uri() != uri else None
        pinned_registry = mlflow.get_registry_uri() if mlflow and mlflow.get_registry_uri() != uri else None
        if pinned_tracking is not None:
            mlflow.set_tracking_uri(uri)
        if pinned_registry is not None:
            mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            if pinned_tracking is not None:
                mlflow.set_tracking_uri(pinned_tracking)
            if pinned_registry is not None:
                mlflow.set_registry_uri(pinned_registry)


def _written_to(uri: str) -> list[str]:
    """What the store at ``uri`` holds beyond the default experiment."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    ids = [experiment.experiment_id for experiment in experiments]
    written = [f"experiment {e.name!r}" for e in experiments if e.name != "Default"]
    written += [f"run {run.info.run_id}" for run in client.search_runs(ids, run_view_type=ViewType.ALL)]
    written += [f"logged model {model.name!r}" for model in client.search_logged_models(experiment_ids=ids)]
    written += [f"registered model {model.name!r}" for model in client.search_registered_models()]
    return written


def check_does_not_log_to_mlflow(subject: Subject) -> None:
    """Training, predicting and exporting never start an MLflow run or log anything by themselves."""
    import mlflow

    active_before = mlflow.active_run()
    with tempfile.TemporaryDirectory() as tmp, fresh_tracking_store(Path(tmp)) as uri:
        try:
            backend, _ = subject.trained()
            backend.predict_proba(images(4)[0])
            backend.loggable_model()
        finally:
            left_active = mlflow.active_run()
            if left_active is not None and left_active is not active_before:
                mlflow.end_run()
        written = _written_to(uri)
    assert not written, f"the backend wrote to MLflow itself ({', '.join(written)}); return data and let the flow log it"
    assert left_active is active_before, "the backend left an MLflow run active"


def _advance_generators() -> None:
    """One draw from each process-wide generator, so that a backend reseeding them to the state an
    earlier training left is seen to have moved them."""
    random.random()
    np.random.random()
    if (torch := sys.modules.get("torch")) is not None:
        torch.rand(1)


def _generator_states() -> dict[str, bytes]:
    """The state of each process-wide random generator loaded: Python's, NumPy's, and torch's CPU one."""
    states = {"Python's random": pickle.dumps(random.getstate()), "NumPy's np.random": pickle.dumps(np.random.get_state())}
    if (torch := sys.modules.get("torch")) is not None:  # never imported here for a backend without torch
        states["torch's default"] = bytes(torch.random.get_rng_state().numpy())
    return states


def check_leaves_process_wide_generators_alone(subject: Subject) -> None:
    """Training, evaluating and predicting neither seed nor draw from the process-wide random generators
    (Python's, NumPy's, torch's): a sweep trains trials in threads of one process, where one trial
    reseeding them changes another's draws, and a user's own draws should not depend on a prediction."""
    backend = subject.built(seed=7)
    x, y = images(40, seed=3)
    steps = (
        ("training", lambda: backend.train(train_data(), SMOKE)),
        ("evaluating", lambda: backend.evaluate(x, y)),
        ("predicting", lambda: backend.predict_proba(x)),
    )
    for step, call in steps:
        _advance_generators()
        before = _generator_states()
        call()
        moved = [name for name, state in _generator_states().items() if name in before and before[name] != state]
        assert not moved, (
            f"{step} seeded or drew from {' and '.join(moved)} generator; draw from generators of the run's seed "
            "(np.random.default_rng(seed), torch.Generator().manual_seed(seed)), since a sweep trains trials in threads"
        )
