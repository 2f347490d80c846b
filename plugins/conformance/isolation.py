"""What a backend must leave alone: it uses the device it is given and never looks for one, and it
never talks to MLflow (the flow logs what the backend returns)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from cnn_train.plugins.conformance.data import images
from cnn_train.plugins.conformance.subject import Subject

#: torch.cuda functions a backend would call to find a device on its own.
_DEVICE_PROBES = ("is_available", "device_count", "current_device")


@contextlib.contextmanager
def _watch_device_probes(probes: list[str]) -> Iterator[None]:
    """Record calls of torch's device probes, when torch is loaded (no other framework has been seen probing)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return

    def recorder(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def probe(*args: Any, **kwargs: Any) -> Any:
            probes.append(name)
            return original(*args, **kwargs)

        return probe

    with contextlib.ExitStack() as stack:
        for name in _DEVICE_PROBES:
            original = getattr(torch.cuda, name)
            stack.enter_context(mock.patch.object(torch.cuda, name, recorder(f"torch.cuda.{name}", original)))
        yield


def check_uses_given_device(subject: Subject) -> None:
    """The backend never probes for devices and does not silently ignore the device it is given."""
    probes: list[str] = []
    with _watch_device_probes(probes):
        backend, _ = subject.trained()
        backend.predict_proba(images(4)[0])
    assert not probes, f"the backend probed for devices itself ({', '.join(sorted(set(probes)))}); use the device passed in"
    # No machine has 99 GPUs: a backend that honours the device must fail rather than fall back quietly.
    try:
        bogus = subject.new()
        bogus.build(subject.reference_config(), device="cuda:99", seed=0)
        bogus.predict_proba(images(2)[0])
    except Exception:
        return
    raise AssertionError("build(device='cuda:99') ran anyway; the backend must use (or refuse) the device it is given")


@contextlib.contextmanager
def _fresh_tracking_store(directory: Path) -> Iterator[str]:
    """Point MLflow (tracking and registry, variables and process-wide setting) at a new SQLite store, then back."""
    import mlflow

    uri = f"sqlite:///{directory / 'mlflow.db'}"
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}):
        # A URI set in-process outranks the variables; only then is it replaced here, and put back after.
        pinned_tracking = mlflow.get_tracking_uri() if mlflow.get_tracking_uri() != uri else None
        pinned_registry = mlflow.get_registry_uri() if mlflow.get_registry_uri() != uri else None
        if pinned_tracking is not None:
            mlflow.set_tracking_uri(uri)
        if pinned_registry is not None:
            mlflow.set_registry_uri(uri)
        try:
            yield uri
        finally:
            if pinned_tracking is not None:
                mlflow.set_tracking_uri(pinned_tracking)
            if pinned_registry is not None:
                mlflow.set_registry_uri(pinned_registry)


def _written_to(directory: Path, uri: str) -> list[str]:
    """What the store at ``uri`` holds beyond the default experiment; nothing when it was never created."""
    if not (directory / "mlflow.db").exists():
        return []
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
    with tempfile.TemporaryDirectory() as tmp, _fresh_tracking_store(Path(tmp)) as uri:
        try:
            backend, _ = subject.trained()
            backend.predict_proba(images(4)[0])
            loggable = backend.loggable_model()
        finally:
            left_active = mlflow.active_run()
            if left_active is not None and left_active is not active_before:
                mlflow.end_run()
        written = _written_to(Path(tmp), uri)
    assert not written, f"the backend wrote to MLflow itself ({', '.join(written)}); return data and let the flow log it"
    assert left_active is active_before, "the backend left an MLflow run active"
    assert loggable.flavor == subject.cls.mlflow_flavor, (
        f"loggable_model().flavor is {loggable.flavor!r} but mlflow_flavor is {subject.cls.mlflow_flavor!r}"
    )
