"""The opt-in improved recipe ('cnn-improved'): its config rules, the torch network it builds, and
training that stays deterministic and resumable with a one-cycle schedule, augmentation and dropout.

The lesson's networks and training defaults must not change, so a few tests pin those too. Data is
the same kind of small synthetic stripes as ``test_backends.py``; nothing here trains for long.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from cnn_train.backends.torch_backend import Network, TorchBackend, _shift_and_flip
from cnn_train.flows.params import ParameterError, RunParameters, validate_parameters
from cnn_train.plugins.config import (
    IMPROVED_ARCHITECTURE,
    ConvBlock,
    ModelConfig,
    TrainConfig,
    format_validation_error,
    recipe_training_defaults,
)
from cnn_train.plugins.contract import EpochMetrics, TrainData
from tests.generators import another_thread_drawing
from tests.test_backends import measured, synthetic_data

RECIPE = ModelConfig.preset(IMPROVED_ARCHITECTURE)
#: Every recipe knob on, at a size that trains in a blink.
TRAIN = TrainConfig(
    epochs=2,
    batch_size=32,
    learning_rate=3e-3,
    seed=5,
    lr_schedule="onecycle",
    augment=True,
    label_smoothing=0.1,
    precision="bfloat16",
)
#: Batch norm on a custom stack: even 'same' kernel, overlapping pool, strided 'valid' conv, no pool.
CUSTOM_BN = ModelConfig(
    architecture=IMPROVED_ARCHITECTURE,
    conv_blocks=(
        ConvBlock(filters=8, kernel_size=4, padding="same", pool_size=3, pool_stride=2),
        ConvBlock(filters=16, kernel_size=5, padding="valid", stride=2, pool_size=0),
    ),
    dense_units=24,
    batch_norm=True,
    dropout=0.5,
)


README = Path(__file__).resolve().parents[1] / "README.md"


def built(config: ModelConfig = RECIPE, seed: int = 0) -> TorchBackend:
    backend = TorchBackend()
    backend.build(config, device="cpu", seed=seed)
    return backend


@pytest.fixture(scope="module")
def data() -> TrainData:
    return synthetic_data()


def test_the_torch_backend_refuses_an_unresolved_auto_precision(data: TrainData) -> None:
    with pytest.raises(ValueError, match="TorchBackend got precision='auto', which the flow resolves for the training device"):
        built().train(data, TrainConfig(epochs=1, precision="auto"))


@pytest.fixture(scope="module")
def trained(data: TrainData) -> tuple[TorchBackend, list[EpochMetrics]]:
    backend = built(seed=1)
    seen: list[EpochMetrics] = []
    backend.train(data, TRAIN, on_epoch=seen.append)
    return backend, seen


# --- config --------------------------------------------------------------------------------------


def test_the_lessons_defaults_are_unchanged() -> None:
    assert ModelConfig.preset("cnn") == ModelConfig() and ModelConfig().parameter_count() == 421_642
    assert ModelConfig.preset("dense").parameter_count() == 101_770
    lesson = TrainConfig()
    assert (lesson.lr_schedule, lesson.augment, lesson.label_smoothing) == ("constant", False, 0.0)
    assert recipe_training_defaults("cnn") == recipe_training_defaults("dense") == {}
    assert RunParameters().training() == TrainConfig(seed=42)


def test_the_recipe_preset() -> None:
    assert RECIPE.architecture == IMPROVED_ARCHITECTURE and RECIPE.batch_norm and RECIPE.dropout == 0.3
    assert [name for name, _ in RECIPE.feature_map_shapes()] == ["conv1", "conv2", "pool2", "conv3", "conv4", "pool4"]
    assert RECIPE.parameter_count() == 468_010


def test_the_readme_states_the_recipe_the_improved_architecture_trains() -> None:
    recipe = recipe_training_defaults(IMPROVED_ARCHITECTURE)
    assert TrainConfig(**recipe).lr_schedule == "onecycle"
    readme = " ".join(README.read_text(encoding="utf-8").split())
    for stated in (
        f"{recipe['epochs']} epochs at batch {recipe['batch_size']}",
        f"one-cycle learning rate peaking at {recipe['learning_rate']:g}",
        f"label smoothing {recipe['label_smoothing']:g}",
        f"precision `{recipe['precision']}`",
    ):
        assert stated in readme


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param(
            {"batch_norm": True},
            "batch_norm needs architecture='cnn-improved'; 'cnn' is the lesson's plain network",
            id="batch-norm-on-cnn",
        ),
        pytest.param(
            {"architecture": "dense", "batch_norm": True, "dropout": 0.2},
            "batch_norm and dropout need architecture='cnn-improved'; 'dense' is the lesson's plain network",
            id="recipe-layers-on-dense",
        ),
        pytest.param(
            {"architecture": "cnn-improved", "dropout": 1.0},
            "dropout: dropout must be a share in [0, 1), got 1.0 (got 1.0)",
            id="dropout-one",
        ),
        pytest.param(
            {"architecture": "cnn-improved", "dropout": -0.1},
            "dropout: dropout must be a share in [0, 1), got -0.1",
            id="dropout-negative",
        ),
        pytest.param(
            {"architecture": "resnet"},
            "architecture: Input should be 'cnn', 'dense' or 'cnn-improved' (got 'resnet')",
            id="unknown-architecture",
        ),
    ],
)
def test_model_config_refuses_with_a_clear_message(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ModelConfig(**values)
    assert message in format_validation_error(caught.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param({"lr_schedule": "cosine"}, "lr_schedule: Input should be 'constant' or 'onecycle'", id="schedule"),
        pytest.param(
            {"label_smoothing": 1.0},
            "label_smoothing: label_smoothing must be a share in [0, 1), got 1.0",
            id="smoothing",
        ),
        pytest.param({"augment": "sometimes"}, "augment: Input should be a valid boolean", id="augment"),
        pytest.param({"precision": "float16"}, "precision: Input should be 'float32', 'bfloat16' or 'auto'", id="precision"),
    ],
)
def test_train_config_refuses_with_a_clear_message(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TrainConfig(**values)
    assert message in format_validation_error(caught.value)


@pytest.mark.parametrize("total_steps", [1, 2, 10, 37, 1270])
def test_onecycle_is_pytorchs_one_cycle(total_steps: int) -> None:
    config = TrainConfig(lr_schedule="onecycle", learning_rate=3e-3)
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([parameter], lr=config.learning_rate)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=total_steps, cycle_momentum=False
    )
    for step in range(total_steps):
        expected = optimizer.param_groups[0]["lr"]
        assert config.learning_rate_at(step, total_steps) == pytest.approx(expected, rel=1e-9), step
        optimizer.step()
        reference.step()
    assert TrainConfig().learning_rate_at(5, 10) == 1e-3


# --- flow parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [{}, {"epochs": None, "batch_size": None, "learning_rate": None}],
    ids=["left-out", "none-as-flows-pass-it"],
)
def test_unchosen_training_values_are_the_recipes(given: dict[str, object]) -> None:
    params = validate_parameters(architecture=IMPROVED_ARCHITECTURE, **given)
    assert params.model() == RECIPE
    assert params.training() == TrainConfig(**recipe_training_defaults(IMPROVED_ARCHITECTURE), seed=42)
    assert (params.epochs, params.batch_size, params.learning_rate) == (7, 128, 3e-3), "logged as it trains"


def test_the_lessons_values_can_be_asked_of_the_recipe() -> None:
    params = validate_parameters(architecture=IMPROVED_ARCHITECTURE, epochs=10, batch_size=32, learning_rate=1e-3)
    training = params.training()
    assert (training.epochs, training.batch_size, training.learning_rate) == (10, 32, 1e-3)
    assert (training.lr_schedule, training.precision) == ("onecycle", "auto")


@pytest.mark.parametrize("architecture", ["cnn", "dense"])
def test_unchosen_training_values_are_the_lessons(architecture: str) -> None:
    params = validate_parameters(architecture=architecture, epochs=None, batch_size=None, learning_rate=None)
    assert params.training() == TrainConfig()


def test_a_recipe_batch_larger_than_a_small_sample_says_what_to_do() -> None:
    with pytest.raises(ParameterError, match=r"batch_size: 128 is larger than the training set \(90 images\)"):
        validate_parameters(architecture=IMPROVED_ARCHITECTURE, sample_limit=100)
    assert validate_parameters(architecture=IMPROVED_ARCHITECTURE, sample_limit=100, batch_size=16).batch_size == 16


def test_chosen_training_values_win_over_the_recipe() -> None:
    params = validate_parameters(architecture=IMPROVED_ARCHITECTURE, batch_size=48, learning_rate=5e-4, epochs=3)
    training = params.training()
    assert (training.batch_size, training.learning_rate, training.epochs) == (48, 5e-4, 3)
    assert (training.lr_schedule, training.precision) == ("onecycle", "auto")
    with pytest.raises(ParameterError, match="batch_size: must be a whole number"):
        validate_parameters(architecture=IMPROVED_ARCHITECTURE, batch_size=32.5)
    assert validate_parameters(architecture=IMPROVED_ARCHITECTURE, batch_size=32.0).batch_size == 32  # JSON's 32.0


def test_keras_refuses_the_recipe() -> None:
    with pytest.raises(
        ParameterError, match="architecture: backend 'keras' cannot build 'cnn-improved'; it supports: cnn, dense"
    ):
        validate_parameters(backend="keras", architecture=IMPROVED_ARCHITECTURE)


# --- the network ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [RECIPE, CUSTOM_BN], ids=["preset", "custom"])
def test_parameter_count_matches_the_config(config: ModelConfig) -> None:
    assert built(config).parameter_count() == config.parameter_count()


def test_batch_norm_replaces_each_convolution_bias_by_a_scale_and_a_shift() -> None:
    plain = CUSTOM_BN.model_copy(update={"batch_norm": False})
    assert plain.parameter_count() == 13_226, "test_backends.CUSTOM"
    assert CUSTOM_BN.parameter_count() == 13_226 - (8 + 16) + 2 * (8 + 16)


def test_the_lessons_network_keeps_its_layers() -> None:
    """Checkpoints of the lesson's model stay loadable: no new weights, buffers or modules."""
    names = list(Network(ModelConfig()).state_dict())
    assert names == [
        "features.conv1.conv.weight", "features.conv1.conv.bias", "features.conv2.conv.weight",
        "features.conv2.conv.bias", "hidden.weight", "hidden.bias", "logits.weight", "logits.bias",
    ]  # fmt: skip


@pytest.mark.parametrize("config", [RECIPE, CUSTOM_BN], ids=["preset", "custom"])
def test_feature_maps_and_kernels(config: ModelConfig, data: TrainData) -> None:
    backend = built(config)
    backend.train(data, TRAIN.model_copy(update={"epochs": 1}))
    shapes = dict(config.feature_map_shapes())
    maps = backend.feature_maps(data.x_val[:3], list(shapes))
    assert {layer: array.shape for layer, array in maps.items()} == {
        layer: (3, *shape) for layer, shape in shapes.items()
    }
    assert (maps["conv1"] >= 0).all(), "conv1 is taken after batch norm and ReLU"
    block = config.conv_blocks[0]
    assert backend.first_conv_kernels().shape == (block.kernel_size, block.kernel_size, 1, block.filters)


def test_shift_and_flip_moves_and_mirrors_each_image() -> None:
    images = torch.arange(1.0, 2 * 4 * 5 + 1).reshape(2, 4, 5, 1)
    out = _shift_and_flip(images, torch.tensor([[1, 0], [0, -2]]), torch.tensor([False, True]))[..., 0]
    assert out[0].tolist() == [[0.0] * 5, *images[0, :3, :, 0].tolist()], "down one row, zero filled"
    assert out[1].tolist() == [[0.0, 0.0, *row[::-1]] for row in images[1, :, 2:, 0].tolist()], "left 2, mirrored"


# --- training ------------------------------------------------------------------------------------


def test_short_training_has_finite_metrics(trained) -> None:
    _, seen = trained
    assert [m.epoch for m in seen] == [1, 2]
    for metrics in seen:
        assert all(math.isfinite(value) for value in asdict(metrics).values())
        assert 0 <= metrics.accuracy <= 1 and 0 <= metrics.val_accuracy <= 1


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_norm_is_ready_for_evaluation_after_a_few_steps(seed: int) -> None:
    """Its running statistics began at mean 0 and variance 1 and moved a tenth of the way per step: a recipe
    trained one epoch on 2,000 Fashion-MNIST images (15 steps) scored chance, 10%. Here 8 steps: the
    validation score was 69% and 83% where the training had learnt the stripes."""
    backend = built(seed=seed)
    config = TrainConfig(epochs=1, batch_size=64, learning_rate=3e-3, lr_schedule="onecycle", seed=seed, precision="float32")
    (epoch,) = backend.train(synthetic_data(640), config).epochs
    assert epoch.val_accuracy >= 0.95, epoch


def test_same_seed_same_metrics_and_predictions(trained, data: TrainData) -> None:
    backend, seen = trained
    global_state = torch.random.get_rng_state()
    again = built(seed=1)
    history = again.train(data, TRAIN)
    assert torch.equal(torch.random.get_rng_state(), global_state), "training must not move the global generator"
    assert [measured(m) for m in history.epochs] == [measured(m) for m in seen]
    np.testing.assert_array_equal(again.predict_proba(data.x_val), backend.predict_proba(data.x_val))


def test_dropout_masks_do_not_come_from_the_process_wide_generator(data: TrainData) -> None:
    """Another trial's thread reseeding and drawing from torch's global generator while this one trains
    changes none of its dropout masks (they came from it, reseeded per epoch, before)."""
    with another_thread_drawing():
        history = built(seed=1).train(data, TRAIN.model_copy(update={"augment": False}))
    quiet = built(seed=1).train(data, TRAIN.model_copy(update={"augment": False}))
    assert [measured(m) for m in history.epochs] == [measured(m) for m in quiet.epochs]


def test_augmentation_and_dropout_change_training(trained, data: TrainData) -> None:
    _, seen = trained
    plain = built(seed=1).train(data, TRAIN.model_copy(update={"augment": False}))
    assert measured(plain.epochs[0]) != measured(seen[0])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_validation_runs_in_the_trainings_precision_and_the_test_pass_in_float32(
    data: TrainData, precision: str
) -> None:
    backend = built(seed=1)
    seen: dict[str, set[torch.dtype]] = {"validation": set(), "test": set()}
    phase = "validation"

    def record(module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        # Training steps run in train mode, the passes over held-out images in eval mode.
        if isinstance(module, torch.nn.Linear) and not module.training:
            seen[phase].add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)  # torch's public hook on every module
    try:
        backend.train(data, TRAIN.model_copy(update={"epochs": 1, "precision": precision}))
        phase = "test"
        backend.predict_proba(data.x_val[:8])
        backend.evaluate(data.x_val[:8], data.y_val[:8])
    finally:
        hook.remove()
    assert seen == {"validation": {getattr(torch, precision)}, "test": {torch.float32}}


def test_save_and_load_round_trip(trained, data: TrainData, tmp_path: Path) -> None:
    backend, _ = trained
    backend.save(tmp_path / "saved")
    loaded = TorchBackend()
    loaded.load(tmp_path / "saved", RECIPE, device="cpu")
    np.testing.assert_array_equal(loaded.predict_proba(data.x_val), backend.predict_proba(data.x_val))


class Interrupted(Exception):
    """Stands in for a crash after a checkpoint was written."""


def test_resume_continues_the_schedule_exactly(trained, data: TrainData, tmp_path: Path) -> None:
    """A run that dies after epoch 1 and resumes from its checkpoint replays epoch 2 of the unbroken run,
    which needs the one-cycle rate, Adam's state, batch norm statistics, augmentation and dropout to agree."""
    _, unbroken = trained
    first = built(seed=1)

    def checkpoint_then_crash(metrics: EpochMetrics) -> None:
        first.save(tmp_path / "checkpoint")
        raise Interrupted

    with pytest.raises(Interrupted):
        first.train(data, TRAIN, on_epoch=checkpoint_then_crash)

    resumed = TorchBackend()
    resumed.load(tmp_path / "checkpoint", RECIPE, device="cpu")
    history = resumed.train(data, TRAIN, initial_epoch=1)
    assert [m.epoch for m in history.epochs] == [2]
    assert measured(history.final) == measured(unbroken[1])
