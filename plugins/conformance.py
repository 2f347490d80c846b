"""The conformance kit: named checks that any backend must pass, shipped for plugin authors.

Run it from the command line with ``cnn-train check-backend NAME``, or from pytest with one
test function in your own test file::

    from cnn_train.plugins.conformance import parametrize_with_checks

    @parametrize_with_checks("my-backend")
    def test_conformance(check):
        check()

Test ids are the check names, so ``pytest -k save_load_round_trip`` runs one check. Checks use
small synthetic data and one or two epochs, so the whole kit takes seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from cnn_train.plugins import registry
from cnn_train.plugins.config import ModelConfig, TrainConfig
from cnn_train.plugins.contract import Backend, EpochMetrics, TrainData

BackendRef = str | type
CheckFunction = Callable[["Subject"], None]

#: Parameter counts every backend must reproduce for the lesson's reference configs.
REFERENCE_PARAMETERS: Mapping[str, int] = {"cnn": 421_642, "dense": 101_770}

_SMOKE = TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3, seed=7)


@dataclass(frozen=True)
class Subject:
    """The backend under test: its class and, when it came from the registry, its name."""

    cls: type
    name: str | None

    def new(self) -> Backend:
        return self.cls()

    @property
    def label(self) -> str:
        return self.name or f"{self.cls.__module__}.{self.cls.__qualname__}"

    def reference_config(self) -> ModelConfig:
        """The smallest-to-build reference config this backend supports (the CNN when it can)."""
        architecture = "cnn" if "cnn" in self.cls.architectures else self.cls.architectures[0]
        return ModelConfig(architecture=architecture)


def _data(n: int = 64, *, seed: int = 0, shape: tuple[int, int, int] = (28, 28, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images: each class lights a different horizontal band."""
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.int64) % 10
    x = rng.uniform(0.0, 0.3, size=(n, *shape)).astype(np.float32)
    band = shape[0] // 10
    for i, label in enumerate(y):
        x[i, label * band : (label + 1) * band] += 0.7
    return x, y


def _train_data(n: int = 64) -> TrainData:
    x, y = _data(n, seed=1)
    xv, yv = _data(32, seed=2)
    return TrainData(x, y, xv, yv)


def _built(subject: Subject, config: ModelConfig | None = None, *, seed: int = 7) -> Backend:
    backend = subject.new()
    backend.build(config or subject.reference_config(), device="cpu", seed=seed)
    return backend


def _trained(subject: Subject, *, seed: int = 7) -> tuple[Backend, list[EpochMetrics]]:
    backend = _built(subject, seed=seed)
    seen: list[EpochMetrics] = []
    backend.train(_train_data(), _SMOKE.model_copy(update={"seed": seed}), on_epoch=seen.append)
    return backend, seen


def check_contract_members(subject: Subject) -> None:
    """Every contract member exists with compatible parameters."""
    registry.validate_backend_class(subject.cls, name=subject.label)


def check_entry_point_load(subject: Subject) -> None:
    """The backend is registered under ``cnn_train.backends`` and the entry point loads this class."""
    if subject.name is None:
        matches = [
            name
            for name, infos in registry.discover().items()
            if infos[0].target == f"{subject.cls.__module__}:{subject.cls.__qualname__}"
        ]
        assert matches, (
            f"{subject.label} is not registered under the entry-point group {registry.GROUP!r}; "
            "add it to [project.entry-points.\"cnn_train.backends\"] in your pyproject.toml"
        )
        return
    loaded = registry.load_backend_class(subject.name)
    assert loaded is subject.cls, f"entry point {subject.name!r} loads {loaded}, not {subject.cls}"


def check_parameter_counts(subject: Subject) -> None:
    """The lesson's reference configs have exactly the reference parameter counts."""
    for architecture in subject.cls.architectures:
        if architecture not in REFERENCE_PARAMETERS:
            continue
        backend = _built(subject, ModelConfig(architecture=architecture))
        got = backend.parameter_count()
        want = REFERENCE_PARAMETERS[architecture]
        assert got == want, f"architecture {architecture!r} has {got:,} parameters, expected {want:,}"


def check_custom_config_parameter_count(subject: Subject) -> None:
    """A non-default config has the parameter count the config itself computes."""
    if "cnn" not in subject.cls.architectures:
        return
    config = ModelConfig.model_validate(
        {
            "conv_blocks": [
                {"filters": 8, "kernel_size": 5, "padding": "valid", "pool_size": 0},
                {"filters": 12, "kernel_size": 3, "pool_size": 3},
            ],
            "dense_units": 20,
        }
    )
    got = _built(subject, config).parameter_count()
    assert got == config.parameter_count(), f"custom config has {got:,} parameters, expected {config.parameter_count():,}"


def check_smoke_train(subject: Subject) -> None:
    """One epoch trains with a finite loss and reports it through ``on_epoch`` as epoch 1."""
    backend, seen = _trained(subject)
    assert [m.epoch for m in seen] == [1], f"on_epoch saw epochs {[m.epoch for m in seen]}, expected [1]"
    metrics = seen[0]
    for field in ("loss", "val_loss", "seconds", "images_per_second"):
        value = getattr(metrics, field)
        assert math.isfinite(value) and value >= 0, f"epoch metric {field} = {value}, expected finite >= 0"
    for field in ("accuracy", "val_accuracy"):
        value = getattr(metrics, field)
        assert 0.0 <= value <= 1.0, f"epoch metric {field} = {value}, expected within [0, 1]"


def check_evaluate(subject: Subject) -> None:
    """``evaluate`` returns a finite non-negative loss and an accuracy within [0, 1]."""
    backend, _ = _trained(subject)
    x, y = _data(40, seed=3)
    result = backend.evaluate(x, y)
    assert math.isfinite(result.loss) and result.loss >= 0, f"loss = {result.loss}, expected finite >= 0"
    assert 0.0 <= result.accuracy <= 1.0, f"accuracy = {result.accuracy}, expected within [0, 1]"


def check_predict_proba(subject: Subject) -> None:
    """Probabilities have shape (n, num_classes), are non-negative and each row sums to 1."""
    backend, _ = _trained(subject)
    x, _ = _data(23, seed=4)
    proba = np.asarray(backend.predict_proba(x))
    assert proba.shape == (23, 10), f"predict_proba shape {proba.shape}, expected (23, 10)"
    assert (proba >= 0).all(), "predict_proba returned negative values"
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-4), "predict_proba rows do not sum to 1"


def check_save_load_round_trip(subject: Subject) -> None:
    """A saved and reloaded model predicts exactly what the original did."""
    backend, _ = _trained(subject)
    x, _ = _data(16, seed=5)
    before = np.asarray(backend.predict_proba(x))
    with tempfile.TemporaryDirectory() as tmp:
        backend.save(Path(tmp) / "model")
        restored = subject.new()
        restored.load(Path(tmp) / "model", subject.reference_config(), device="cpu")
        after = np.asarray(restored.predict_proba(x))
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6, err_msg="predictions changed after save/load")


def check_cpu_determinism(subject: Subject) -> None:
    """Same seed on the CPU gives identical epoch metrics and predictions."""
    first, seen_first = _trained(subject, seed=11)
    second, seen_second = _trained(subject, seed=11)
    for a, b in zip(seen_first, seen_second, strict=True):
        assert (a.loss, a.accuracy, a.val_loss, a.val_accuracy) == (b.loss, b.accuracy, b.val_loss, b.val_accuracy), (
            f"same seed, different metrics: {a} vs {b}"
        )
    x, _ = _data(8, seed=6)
    np.testing.assert_array_equal(first.predict_proba(x), second.predict_proba(x), err_msg="same seed, different predictions")


#: One non-lesson value per TrainConfig option, each of which changes the first epoch's loss when honoured.
_TRAINING_OPTIONS: dict[str, object] = {
    "lr_schedule": "onecycle",
    "augment": True,
    "label_smoothing": 0.1,
    "precision": "bfloat16",
}


def check_training_options(subject: Subject) -> None:
    """Each training option beyond the lesson's is honoured (the loss changes) or refused with a ValueError."""
    _, plain = _trained(subject)
    for name, value in _TRAINING_OPTIONS.items():
        backend = _built(subject)
        seen: list[EpochMetrics] = []
        try:
            backend.train(_train_data(), _SMOKE.model_copy(update={name: value}), on_epoch=seen.append)
        except ValueError as error:
            assert name in str(error), f"{name}={value!r} refused, but the message does not name it: {error}"
            continue
        assert seen and seen[0].loss != plain[0].loss, (
            f"{name}={value!r} trained exactly as the lesson's plain training does: the option was ignored; "
            "implement it or refuse it (cnn_train.plugins.contract.check_plain_training)"
        )


def _expect_input_error(action: Callable[[], Any], what: str, words: tuple[str, ...]) -> None:
    try:
        action()
    except ValueError as error:
        message = str(error).lower()
        assert any(word in message for word in words), (
            f"{what}: raised {type(error).__name__}({error!s}) but the message mentions none of {words}"
        )
        return
    raise AssertionError(f"{what}: accepted without error; expected a ValueError saying what is wrong")


def check_rejects_wrong_image_shape(subject: Subject) -> None:
    """Images of the wrong shape are refused with a ValueError that mentions the shape."""
    backend = _built(subject)
    x = np.zeros((4, 32, 32, 3), dtype=np.float32)
    _expect_input_error(lambda: backend.predict_proba(x), "predict_proba on 32x32x3 images", ("shape",))
    y = np.zeros(4, dtype=np.int64)
    _expect_input_error(lambda: backend.evaluate(x, y), "evaluate on 32x32x3 images", ("shape",))


def check_rejects_empty_data(subject: Subject) -> None:
    """Empty training data is refused with a ValueError that says it is empty."""
    backend = _built(subject)
    empty = np.zeros((0, 28, 28, 1), dtype=np.float32)
    labels = np.zeros(0, dtype=np.int64)
    xv, yv = _data(8)
    _expect_input_error(
        lambda: backend.train(TrainData(empty, labels, xv, yv), _SMOKE), "train on zero images", ("empty", "no ", "zero")
    )


def check_rejects_labels_out_of_range(subject: Subject) -> None:
    """Labels outside [0, num_classes) are refused with a ValueError naming the range."""
    backend = _built(subject)
    x, y = _data(32)
    y = y.copy()
    y[0] = 10
    xv, yv = _data(8)
    _expect_input_error(
        lambda: backend.train(TrainData(x, y, xv, yv), _SMOKE), "train with label 10", ("label", "range", "[0")
    )


def check_uses_given_device(subject: Subject) -> None:
    """The backend never probes for devices and does not silently ignore the device it is given."""
    probes: list[str] = []
    with _watch_device_probes(probes):
        backend, _ = _trained(subject)
        backend.predict_proba(_data(4)[0])
    assert not probes, f"the backend probed for devices itself ({', '.join(sorted(set(probes)))}); use the device passed in"
    # No machine has 99 GPUs: a backend that honours the device must fail rather than fall back quietly.
    try:
        bogus = subject.new()
        bogus.build(subject.reference_config(), device="cuda:99", seed=0)
        bogus.predict_proba(_data(2)[0])
    except Exception:
        return
    raise AssertionError("build(device='cuda:99') ran anyway; the backend must use (or refuse) the device it is given")


@contextlib.contextmanager
def _watch_device_probes(probes: list[str]) -> Iterator[None]:
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return

    def recorder(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def probe(*args: Any, **kwargs: Any) -> Any:
            probes.append(name)
            return original(*args, **kwargs)

        return probe

    names = ("is_available", "device_count", "current_device")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(torch.cuda, name, recorder(f"torch.cuda.{name}", getattr(torch.cuda, name))))
        yield


def check_does_not_log_to_mlflow(subject: Subject) -> None:
    """Training, predicting and exporting never start an MLflow run or log anything by themselves."""
    import mlflow
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    calls: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise RuntimeError(f"backend called MLflow ({name})")

        return record

    with contextlib.ExitStack() as stack:
        for name in ("create_run", "log_batch", "log_metric", "log_param", "set_tag", "log_artifact", "log_artifacts"):
            stack.enter_context(mock.patch.object(TrackingServiceClient, name, refuse(name)))
        stack.enter_context(mock.patch.object(mlflow, "start_run", refuse("start_run")))
        try:
            backend, _ = _trained(subject)
            backend.predict_proba(_data(4)[0])
            loggable = backend.loggable_model()
        except RuntimeError:
            if not calls:
                raise
    assert not calls, f"the backend called MLflow itself ({', '.join(calls)}); return data and let the flow log it"
    assert mlflow.active_run() is None, "the backend left an MLflow run active"
    assert loggable.flavor == subject.cls.mlflow_flavor, (
        f"loggable_model().flavor is {loggable.flavor!r} but mlflow_flavor is {subject.cls.mlflow_flavor!r}"
    )


@dataclass(frozen=True)
class Check:
    """A named contract check."""

    name: str
    function: CheckFunction

    @property
    def description(self) -> str:
        return (self.function.__doc__ or "").strip().splitlines()[0]


CHECKS: tuple[Check, ...] = tuple(
    Check(fn.__name__.removeprefix("check_"), fn)
    for fn in (
        check_contract_members,
        check_entry_point_load,
        check_parameter_counts,
        check_custom_config_parameter_count,
        check_smoke_train,
        check_evaluate,
        check_predict_proba,
        check_save_load_round_trip,
        check_cpu_determinism,
        check_training_options,
        check_rejects_wrong_image_shape,
        check_rejects_empty_data,
        check_rejects_labels_out_of_range,
        check_uses_given_device,
        check_does_not_log_to_mlflow,
    )
)
CHECK_NAMES: tuple[str, ...] = tuple(check.name for check in CHECKS)


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    reason: str = ""


def resolve(backend: BackendRef) -> Subject:
    """A registered name is loaded through the registry; a class is checked as it is."""
    if isinstance(backend, str):
        return Subject(registry.load_backend_class(backend), backend)
    return Subject(backend, None)


@dataclass(frozen=True)
class BoundCheck:
    """One check bound to one backend; calling it runs the check (and raises on failure)."""

    check: Check
    backend: BackendRef

    def __call__(self) -> None:
        if self.check.name == "contract_members" and not isinstance(self.backend, str):
            self.check.function(Subject(self.backend, None))
            return
        subject = resolve(self.backend)
        if self.check.name != "contract_members":
            registry.validate_backend_class(subject.cls, name=subject.label)
        self.check.function(subject)

    def __repr__(self) -> str:
        return self.check.name


def run_checks(backend: BackendRef, *, only: tuple[str, ...] | None = None) -> list[CheckResult]:
    """Run every check (or those named in ``only``) and collect pass/fail with the reason."""
    unknown = set(only or ()) - set(CHECK_NAMES)
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)}; available: {', '.join(CHECK_NAMES)}")
    results = []
    for check in CHECKS:
        if only and check.name not in only:
            continue
        try:
            BoundCheck(check, backend)()
        except Exception as error:  # a check's failure is data here, not a crash
            reason = str(error) if isinstance(error, AssertionError) else f"{type(error).__name__}: {error}"
            results.append(CheckResult(check.name, False, reason.replace("\n", " ")))
        else:
            results.append(CheckResult(check.name, True))
    return results


def parametrize_with_checks(backend: BackendRef, *, expected_failures: Mapping[str, str] | None = None) -> Any:
    """A ``pytest.mark.parametrize`` over every check for ``backend``, ids being the check names.

    ``expected_failures`` maps a check name to the reason it is known to fail; those become xfail.
    """
    import pytest

    expected = dict(expected_failures or {})
    unknown = set(expected) - set(CHECK_NAMES)
    if unknown:
        raise ValueError(f"unknown check(s) in expected_failures: {sorted(unknown)}; available: {', '.join(CHECK_NAMES)}")
    params = [
        pytest.param(
            BoundCheck(check, backend),
            id=check.name,
            marks=[pytest.mark.xfail(reason=expected[check.name], strict=True)] if check.name in expected else [],
        )
        for check in CHECKS
    ]
    return pytest.mark.parametrize("check", params)
