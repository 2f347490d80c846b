"""What a backend must do: be found, keep the contract, build the reference networks, train, predict,
save and refuse bad input. Each check raises AssertionError saying what is wrong, or NotApplicable."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cnn_train.plugins import registry
from cnn_train.plugins.config import ModelConfig
from cnn_train.plugins.contract import (
    EpochMetrics,
    Evaluation,
    TrainData,
    TrainHistory,
    probabilities_problem,
    returned_problem,
)
from cnn_train.plugins.conformance.data import SMOKE, images, train_data
from cnn_train.plugins.conformance.subject import NotApplicable, Subject

#: Parameter counts every backend must reproduce for the lesson's reference configs.
REFERENCE_PARAMETERS: Mapping[str, int] = {"cnn": 421_642, "dense": 101_770}

#: One non-lesson value per TrainConfig option, each of which changes the first epoch's loss when honoured.
TRAINING_OPTIONS: Mapping[str, object] = {
    "lr_schedule": "onecycle",
    "augment": True,
    "label_smoothing": 0.1,
    "precision": "bfloat16",
}


def check_entry_point_load(subject: Subject) -> None:
    """The backend is registered under ``cnn_train.backends`` and its entry point loads the backend's class."""
    if subject.name is not None:
        name = subject.name
    else:
        target = f"{subject.ref.__module__}:{subject.ref.__qualname__}"
        names = [info.name for info in registry.installed_backends() if info.target == target]
        if not names:
            raise NotApplicable(
                f"{subject.label} is checked as a class and is not registered under the entry-point group "
                f"{registry.GROUP!r}; register it in your pyproject.toml and check it by name"
            )
        name = names[0]
    try:
        loaded = registry.load_backend_class(name)
    except registry.BackendContractError:
        return  # it imported, and was refused: what the class lacks is contract_members' finding
    assert subject.name is not None or loaded is subject.ref, f"entry point {name!r} loads {loaded}, not {subject.ref}"


def check_contract_members(subject: Subject) -> None:
    """Every contract member exists with compatible parameters, ``mlflow_flavor`` names a flavor, and the class
    constructs with no arguments: what the registry refuses a backend for when it loads it."""
    registry.validate_backend_class(subject.cls, name=subject.label)


def check_parameter_counts(subject: Subject) -> None:
    """The lesson's reference configs have exactly the reference parameter counts."""
    architectures = [a for a in subject.cls.architectures if a in REFERENCE_PARAMETERS]
    if not architectures:
        raise NotApplicable(
            f"{subject.label} builds none of the reference architectures ({', '.join(REFERENCE_PARAMETERS)})"
        )
    for architecture in architectures:
        got = subject.built(ModelConfig.preset(architecture)).parameter_count()
        assert (problem := returned_problem("parameter_count", got, int)) is None, problem
        want = REFERENCE_PARAMETERS[architecture]
        assert got == want, f"architecture {architecture!r} has {got:,} parameters, expected {want:,}"


def check_custom_config_parameter_count(subject: Subject) -> None:
    """A non-default CNN config has the parameter count the config itself computes."""
    if "cnn" not in subject.cls.architectures:
        raise NotApplicable(f"{subject.label} does not build the 'cnn' architecture")
    config = ModelConfig.model_validate(
        {
            "conv_blocks": [
                {"filters": 8, "kernel_size": 5, "padding": "valid", "pool_size": 0},
                {"filters": 12, "kernel_size": 3, "pool_size": 3},
            ],
            "dense_units": 20,
        }
    )
    got = subject.built(config).parameter_count()
    want = config.parameter_count()
    assert got == want, f"custom config has {got:,} parameters, expected {want:,}"


def check_feature_maps_shapes(subject: Subject) -> None:
    """For each reference config with convolutions, every conv and pool layer's feature maps have the
    config's (height, width, channels), channels last."""
    for config in subject.convolution_configs():
        shapes = dict(config.feature_map_shapes())
        maps = subject.built(config).feature_maps(images(3)[0], list(shapes))
        where = f"architecture {config.architecture!r}"
        assert set(maps) == set(shapes), f"{where}: feature_maps returned layers {sorted(maps)}, expected {sorted(shapes)}"
        for name, shape in shapes.items():
            got = tuple(np.shape(maps[name]))
            assert got == (3, *shape), f"{where}: feature map {name!r} has shape {got}, expected {(3, *shape)}"


def check_first_conv_kernels_shape(subject: Subject) -> None:
    """For each reference config with convolutions, the first convolution's weights come as
    (kernel_h, kernel_w, in_channels, filters)."""
    for config in subject.convolution_configs():
        first = config.conv_layers[0]
        want = (first.kernel_size, first.kernel_size, config.input_shape[2], first.filters)
        got = tuple(np.shape(subject.built(config).first_conv_kernels()))
        assert got == want, f"architecture {config.architecture!r}: first_conv_kernels() has shape {got}, expected {want}"


def check_smoke_train(subject: Subject) -> None:
    """One epoch trains with a finite loss, reports it through ``on_epoch`` as epoch 1, and returns a TrainHistory."""
    _, seen, returned = subject.trained_returning()
    assert [m.epoch for m in seen] == [1], f"on_epoch saw epochs {[m.epoch for m in seen]}, expected [1]"
    assert (problem := returned_problem("train", returned, TrainHistory)) is None, problem
    metrics = seen[0]
    for field in ("loss", "val_loss", "seconds", "images_per_second"):
        value = getattr(metrics, field)
        assert math.isfinite(value) and value >= 0, f"epoch metric {field} = {value}, expected finite >= 0"
    for field in ("accuracy", "val_accuracy"):
        value = getattr(metrics, field)
        assert 0.0 <= value <= 1.0, f"epoch metric {field} = {value}, expected within [0, 1]"


def check_evaluate(subject: Subject) -> None:
    """``evaluate`` returns a finite non-negative loss and an accuracy within [0, 1]."""
    backend, _ = subject.trained()
    result = backend.evaluate(*images(40, seed=3))
    assert (problem := returned_problem("evaluate", result, Evaluation)) is None, problem
    assert math.isfinite(result.loss) and result.loss >= 0, f"loss = {result.loss}, expected finite >= 0"
    assert 0.0 <= result.accuracy <= 1.0, f"accuracy = {result.accuracy}, expected within [0, 1]"


def check_predict_proba(subject: Subject) -> None:
    """Probabilities have shape (n, num_classes), are non-negative and each row sums to 1."""
    backend, _ = subject.trained()
    problem = probabilities_problem(np.asarray(backend.predict_proba(images(23, seed=4)[0])), 23, 10)
    assert problem is None, problem


def check_save_load_round_trip(subject: Subject) -> None:
    """A saved and reloaded model predicts exactly what the original did."""
    backend, _ = subject.trained()
    x, _ = images(16, seed=5)
    before = np.asarray(backend.predict_proba(x))
    with tempfile.TemporaryDirectory() as tmp:
        backend.save(Path(tmp) / "model")
        restored = subject.new()
        restored.load(Path(tmp) / "model", subject.reference_config(), device="cpu")
        after = np.asarray(restored.predict_proba(x))
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6, err_msg="predictions changed after save/load")


def _same_metrics(a: EpochMetrics, b: EpochMetrics) -> bool:
    return (a.loss, a.accuracy, a.val_loss, a.val_accuracy) == (b.loss, b.accuracy, b.val_loss, b.val_accuracy)


def check_cpu_determinism(subject: Subject) -> None:
    """Same seed on the CPU gives identical epoch metrics and predictions."""
    first, seen_first = subject.trained(seed=11)
    second, seen_second = subject.trained(seed=11)
    for a, b in zip(seen_first, seen_second, strict=True):
        assert _same_metrics(a, b), f"same seed, different metrics: {a} vs {b}"
    x, _ = images(8, seed=6)
    np.testing.assert_array_equal(first.predict_proba(x), second.predict_proba(x), err_msg="same seed, different predictions")


def check_seed_changes_training(subject: Subject) -> None:
    """Another seed, another model: build's seed sets the initial weights, so a sweep or study over
    ``seed`` trains different models, not one model again. (Trained before predicting: a backend need
    not predict before it is trained.)"""
    x, _ = images(8, seed=6)
    trained = []
    for seed in (11, 12):
        backend, seen = subject.built(seed=seed), []
        backend.train(train_data(), SMOKE.model_copy(update={"seed": 5}), on_epoch=seen.append)
        trained.append((seen, backend.predict_proba(x)))
    (seen_first, first), (seen_second, second) = trained
    same_metrics = all(_same_metrics(a, b) for a, b in zip(seen_first, seen_second, strict=True))
    assert not (same_metrics and np.array_equal(first, second)), (
        "build(seed=11) and build(seed=12), trained alike, gave identical models: the seed must set the initial "
        "weights, or a sweep over seed trains one model again and again"
    )


def check_training_options(subject: Subject) -> None:
    """Each training option beyond the lesson's is honoured (the loss changes) or refused with a ValueError."""
    _, plain = subject.trained()
    for name, value in TRAINING_OPTIONS.items():
        seen: list[EpochMetrics] = []
        try:
            subject.built().train(train_data(), SMOKE.model_copy(update={name: value}), on_epoch=seen.append)
        except ValueError as error:
            assert name in str(error), f"{name}={value!r} refused, but the message does not name it: {error}"
            continue
        assert seen and seen[0].loss != plain[0].loss, (
            f"{name}={value!r} trained exactly as the lesson's plain training does: the option was ignored; "
            "implement it or refuse it (contract.BackendBase.training_options, or check_plain_training)"
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
    backend = subject.built()
    x = np.zeros((4, 32, 32, 3), dtype=np.float32)
    _expect_input_error(lambda: backend.predict_proba(x), "predict_proba on 32x32x3 images", ("shape",))
    y = np.zeros(4, dtype=np.int64)
    _expect_input_error(lambda: backend.evaluate(x, y), "evaluate on 32x32x3 images", ("shape",))


def check_rejects_empty_data(subject: Subject) -> None:
    """Empty training data is refused with a ValueError that says it is empty."""
    backend = subject.built()
    empty = TrainData(np.zeros((0, 28, 28, 1), dtype=np.float32), np.zeros(0, dtype=np.int64), *images(8))
    _expect_input_error(lambda: backend.train(empty, SMOKE), "train on zero images", ("empty", "no ", "zero"))


def check_rejects_labels_out_of_range(subject: Subject) -> None:
    """Labels outside [0, num_classes) are refused with a ValueError naming the range."""
    backend = subject.built()
    x, y = images(32)
    y = y.copy()
    y[0] = 10
    data = TrainData(x, y, *images(8))
    _expect_input_error(lambda: backend.train(data, SMOKE), "train with label 10", ("label", "range", "[0"))
