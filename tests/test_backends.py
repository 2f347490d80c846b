"""The built-in keras and torch backends: same network, same contract, deterministic, resumable.

Every test runs against both backends, loaded through their entry points as any plugin is. The
data is 256 small synthetic images (a class-dependent stripe under noise) so a few steps of
training mean something and the whole file stays fast on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import pickle
import subprocess
import sys
import types
from dataclasses import asdict
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

from cnn_train.plugins.config import ConvBlock, ModelConfig, TrainConfig
from cnn_train.plugins.contract import (
    CONTRACT_METHODS,
    Backend,
    BackendInputError,
    EpochMetrics,
    TrainData,
)
from tests.generators import another_thread_drawing

BACKENDS = ("keras", "torch")
TRAIN = TrainConfig(epochs=2, batch_size=32, learning_rate=1e-3, seed=7)
#: Every knob off its default: even 'same' kernel, overlapping pool, strided 'valid' conv, no pool.
CUSTOM = ModelConfig(
    conv_blocks=(
        ConvBlock(filters=8, kernel_size=4, padding="same", pool_size=3, pool_stride=2),
        ConvBlock(filters=16, kernel_size=5, padding="valid", stride=2, pool_size=0),
    ),
    dense_units=24,
)


def load_backend_class(name: str) -> type:
    (entry_point,) = entry_points(group="cnn_train.backends", name=name)
    return entry_point.load()


def built(name: str, config: ModelConfig | None = None, seed: int = 0) -> Backend:
    backend = load_backend_class(name)()
    backend.build(config or ModelConfig(), device="cpu", seed=seed)
    return backend


def synthetic_data(n: int = 256, seed: int = 0) -> TrainData:
    """Images whose label sets the row of a bright stripe, 3/4 for training and 1/4 for validation."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.random((n, 28, 28, 1), dtype=np.float32) * 0.3
    for image, label in zip(images, labels):
        image[2 + 2 * label : 4 + 2 * label, 4:24, 0] = 1.0
    split = n * 3 // 4
    return TrainData(images[:split], labels[:split], images[split:], labels[split:])


def measured(metrics: EpochMetrics) -> dict[str, float]:
    """Everything an epoch reports except its timings, which vary run to run."""
    values = asdict(metrics)
    del values["seconds"], values["images_per_second"]
    return values


@pytest.fixture(scope="module")
def data() -> TrainData:
    return synthetic_data()


@pytest.fixture(scope="module", params=BACKENDS)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def trained(name: str, data: TrainData) -> tuple[Backend, list[EpochMetrics], object]:
    """A default-config backend trained for two epochs, the metrics its callback saw, and its history."""
    backend = built(name, seed=1)
    seen: list[EpochMetrics] = []
    history = backend.train(data, TRAIN, on_epoch=seen.append)
    return backend, seen, history


# --- contract shape ------------------------------------------------------------------------------


def test_signatures_match_the_protocol(name: str) -> None:
    cls = load_backend_class(name)
    for method in CONTRACT_METHODS:
        expected = inspect.signature(getattr(Backend, method)).parameters.values()
        actual = inspect.signature(getattr(cls, method)).parameters.values()
        assert [(p.name, p.kind, p.default) for p in actual] == [(p.name, p.kind, p.default) for p in expected], method
    assert cls.mlflow_flavor == {"keras": "keras", "torch": "pytorch"}[name]
    assert isinstance(cls(), Backend)


@pytest.mark.parametrize("call", ["parameter_count", "train", "evaluate", "predict_proba", "feature_maps",
                                  "first_conv_kernels", "save", "loggable_model"])
def test_using_an_unbuilt_backend_says_to_build(name: str, call: str, data: TrainData, tmp_path: Path) -> None:
    backend = load_backend_class(name)()
    arguments = {
        "train": (data, TRAIN),
        "evaluate": (data.x_val, data.y_val),
        "predict_proba": (data.x_val,),
        "feature_maps": (data.x_val, ["conv1"]),
        "save": (tmp_path,),
    }.get(call, ())
    with pytest.raises(RuntimeError, match=r"call build\(\) \(or load\(\)\) first"):
        getattr(backend, call)(*arguments)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("banana", "device must be 'cpu' or 'cuda:N' \\(e.g. 'cuda:0'\\), got 'banana'"),
        ("cuda:99", "cannot use device 'cuda:99'"),
    ],
)
def test_unusable_device_is_refused_at_build(name: str, device: str, message: str) -> None:
    backend = load_backend_class(name)()
    with pytest.raises(ValueError, match=message):
        backend.build(ModelConfig(), device=device, seed=0)
    with pytest.raises(RuntimeError, match="call build"):
        backend.parameter_count()


# --- the network ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("architecture", "expected"), [("cnn", 421_642), ("dense", 101_770)])
def test_reference_parameter_counts(name: str, architecture: str, expected: int) -> None:
    assert built(name, ModelConfig.preset(architecture)).parameter_count() == expected


def test_custom_config_parameter_count_matches_the_config(name: str) -> None:
    assert built(name, CUSTOM).parameter_count() == CUSTOM.parameter_count() == 13_226


@pytest.mark.parametrize("config", [ModelConfig(), CUSTOM], ids=["default", "custom"])
def test_feature_maps_have_the_config_shapes(name: str, config: ModelConfig, data: TrainData) -> None:
    shapes = dict(config.feature_map_shapes())
    maps = built(name, config).feature_maps(data.x_val[:3], list(shapes))
    assert {layer: array.shape for layer, array in maps.items()} == {
        layer: (3, *shape) for layer, shape in shapes.items()
    }
    assert all(array.dtype == np.float32 for array in maps.values())
    assert (maps["conv1"] >= 0).all(), "conv1 is taken after its ReLU"


def test_unknown_feature_map_lists_the_valid_names(name: str, data: TrainData) -> None:
    with pytest.raises(ValueError, match=r"unknown layer\(s\) 'conv9'; valid names: conv1, pool1, conv2, pool2"):
        built(name).feature_maps(data.x_val[:2], ["conv1", "conv9"])


def test_dense_architecture_has_no_feature_maps_or_kernels(name: str, data: TrainData) -> None:
    backend = built(name, ModelConfig.preset("dense"))
    with pytest.raises(ValueError, match="'dense' architecture has no convolution or pooling layers"):
        backend.feature_maps(data.x_val[:2], ["conv1"])
    with pytest.raises(ValueError, match="'dense' architecture has no convolution"):
        backend.first_conv_kernels()


def test_first_conv_kernels_are_height_width_in_filters(name: str) -> None:
    assert built(name).first_conv_kernels().shape == (3, 3, 1, 32)
    assert built(name, CUSTOM).first_conv_kernels().shape == (4, 4, 1, 8)


def test_same_seed_same_initial_weights(name: str) -> None:
    np.testing.assert_array_equal(built(name, seed=3).first_conv_kernels(), built(name, seed=3).first_conv_kernels())
    assert not np.array_equal(built(name, seed=3).first_conv_kernels(), built(name, seed=4).first_conv_kernels())


def test_builds_in_threads_at_once_get_the_weights_of_their_seed(name: str, data: TrainData) -> None:
    """A sweep's trials build in threads: neither another build nor a thread drawing from torch's and
    NumPy's process-wide generators may change what a seed gives (it did: fork_rng, set_random_seed)."""
    import threading

    expected = built(name, seed=3).predict_proba(data.x_val)  # a function of every weight
    with another_thread_drawing():
        for _ in range(3):
            backends = [load_backend_class(name)() for _ in range(4)]
            builds = [
                threading.Thread(target=b.build, args=(ModelConfig(),), kwargs={"device": "cpu", "seed": 3})
                for b in backends
            ]
            for thread in builds:
                thread.start()
            for thread in builds:
                thread.join()
            for backend in backends:
                np.testing.assert_array_equal(backend.predict_proba(data.x_val), expected)


def test_both_backends_compute_the_same_function(data: TrainData) -> None:
    """Keras weights copied into the torch network give the same probabilities: padding, pooling,
    strides and flatten order agree, not just the parameter counts."""
    keras_backend, torch_backend = built("keras", CUSTOM, seed=5), built("torch", CUSTOM)
    import torch

    keras_layers = {layer.name: layer for layer in keras_backend._model.layers}
    network = torch_backend._network
    torch_layers = {
        "conv1": network.features.conv1.conv,
        "conv2": network.features.conv2.conv,
        "hidden": network.hidden,
        "logits": network.logits,
    }
    with torch.no_grad():
        for layer_name, module in torch_layers.items():
            kernel, bias = (np.asarray(w) for w in keras_layers[layer_name].get_weights())
            # Keras kernels are (kh, kw, in, out) and (in, out); torch wants (out, in, kh, kw) and (out, in).
            kernel = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
            module.bias.copy_(torch.from_numpy(bias))
    np.testing.assert_allclose(
        torch_backend.predict_proba(data.x_val), keras_backend.predict_proba(data.x_val), atol=2e-6
    )


# --- training ------------------------------------------------------------------------------------


def test_training_reports_each_epoch_in_order(trained) -> None:
    _, seen, history = trained
    assert [m.epoch for m in seen] == [1, 2]
    assert tuple(seen) == history.epochs
    for metrics in seen:
        assert all(math.isfinite(value) for value in asdict(metrics).values())
        assert 0 <= metrics.accuracy <= 1 and 0 <= metrics.val_accuracy <= 1
        assert metrics.seconds > 0 and metrics.images_per_second > 0


def test_on_epoch_is_called_as_each_epoch_ends(name: str, data: TrainData) -> None:
    backend = built(name)
    kernels_seen = []
    backend.train(data, TRAIN, on_epoch=lambda metrics: kernels_seen.append(backend.first_conv_kernels()))
    assert len(kernels_seen) == 2
    assert not np.array_equal(kernels_seen[0], kernels_seen[1]), "epoch 1 was reported only after epoch 2 ran"


@pytest.mark.parametrize("answers", [(False, True), (None, 1)], ids=["bool", "truthy"])
def test_training_stops_after_the_epoch_whose_callback_asks(name: str, data: TrainData, answers: tuple) -> None:
    seen: list[int] = []

    def on_epoch(metrics: EpochMetrics) -> object:
        seen.append(metrics.epoch)
        return answers[metrics.epoch - 1]

    history = built(name).train(data, TRAIN.model_copy(update={"epochs": 4}), on_epoch=on_epoch)
    assert seen == [m.epoch for m in history.epochs] == [1, 2]


def test_training_learns_the_stripes(trained, data: TrainData) -> None:
    backend, seen, _ = trained
    assert seen[1].loss < seen[0].loss
    assert backend.evaluate(data.x_val, data.y_val).loss == pytest.approx(seen[1].val_loss, rel=1e-4)


def test_same_seed_same_metrics(name: str, trained, data: TrainData) -> None:
    _, seen, _ = trained
    again = built(name, seed=1).train(data, TRAIN)
    assert [measured(m) for m in again.epochs] == [measured(m) for m in seen]


def test_training_beside_another_thread_drawing_is_unchanged(name: str, trained, data: TrainData) -> None:
    """A sweep's trials train in threads: one that reseeds and draws from torch's and NumPy's
    process-wide generators changes none of this run's shuffles, and training moves neither."""
    import torch

    _, seen, _ = trained
    backend = built(name, seed=1)
    with another_thread_drawing():
        beside = backend.train(data, TRAIN)
    assert [measured(m) for m in beside.epochs] == [measured(m) for m in seen]
    backend = built(name, seed=1)
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    backend.train(data, TRAIN)
    assert torch.equal(torch.random.get_rng_state(), torch_state), "training moved torch's global generator"
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_state, "training moved NumPy's global generator")


def test_resume_continues_exactly_where_it_stopped(name: str, trained, data: TrainData, tmp_path: Path) -> None:
    _, uninterrupted, _ = trained
    first = built(name, seed=1)
    first.train(data, TrainConfig(**{**TRAIN.model_dump(), "epochs": 1}))
    first.save(tmp_path / "checkpoint")

    resumed = load_backend_class(name)()
    resumed.load(tmp_path / "checkpoint", ModelConfig(), device="cpu")
    seen: list[EpochMetrics] = []
    history = resumed.train(data, TRAIN, on_epoch=seen.append, initial_epoch=1)
    assert [m.epoch for m in history.epochs] == [m.epoch for m in seen] == [2]
    assert measured(history.final) == measured(uninterrupted[1])


def test_save_and_load_round_trip(name: str, trained, data: TrainData, tmp_path: Path) -> None:
    backend, _, _ = trained
    backend.save(tmp_path / "saved")
    loaded = load_backend_class(name)()
    loaded.load(tmp_path / "saved", ModelConfig(), device="cpu")
    np.testing.assert_array_equal(loaded.predict_proba(data.x_val), backend.predict_proba(data.x_val))


def test_load_from_an_empty_folder_says_what_is_missing(name: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"was it written by {load_backend_class(name).__name__}.save"):
        load_backend_class(name)().load(tmp_path, ModelConfig(), device="cpu")


# --- bad input -----------------------------------------------------------------------------------


def _with(data: TrainData, **changes: np.ndarray) -> TrainData:
    return TrainData(**{**data.__dict__, **changes})


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_channel_axis", r"training images must have shape \(n, 28, 28, 1\), got \(192, 28, 28\)"),
        ("three_channels", r"validation images must have shape \(n, 28, 28, 1\), got \(64, 28, 28, 3\)"),
        ("empty", "training images is empty: need at least one image"),
        ("label_too_big", r"training labels must lie in \[0, 9\], got values from 0 to 10"),
        ("negative_label", r"validation labels must lie in \[0, 9\], got values from -1 to \d"),
        ("short_labels", r"training labels must have shape \(192,\) to match the images, got \(191,\)"),
        ("raw_pixels", r"training images must be floats in \[0, 1\] \(pixels / 255\), got values from [\d.e-]+ to 255"),
        ("integer_pixels", r"validation images must be floats in \[0, 1\] \(pixels / 255\), got uint8 values"),
        ("not_a_number", r"training images must be floats in \[0, 1\] \(pixels / 255\), got 1 NaN value\(s\)"),
        ("fractional_labels", r"training labels must be whole class numbers \(int64\), got float64 values"),
    ],
)
def test_train_refuses_bad_data_with_a_clear_message(name: str, data: TrainData, case: str, message: str) -> None:
    y_too_big, y_negative = data.y_train.copy(), data.y_val.copy()
    y_too_big[0], y_negative[0] = 10, -1
    with_nan = data.x_train.copy()
    with_nan[0, 0, 0, 0] = np.nan
    bad = {
        "no_channel_axis": _with(data, x_train=data.x_train[..., 0]),
        "three_channels": _with(data, x_val=np.repeat(data.x_val, 3, axis=-1)),
        "empty": _with(data, x_train=data.x_train[:0], y_train=data.y_train[:0]),
        "label_too_big": _with(data, y_train=y_too_big),
        "negative_label": _with(data, y_val=y_negative),
        "short_labels": _with(data, y_train=data.y_train[1:]),
        "raw_pixels": _with(data, x_train=data.x_train * 255),
        "integer_pixels": _with(data, x_val=(data.x_val * 255).astype(np.uint8)),
        "not_a_number": _with(data, x_train=with_nan),
        "fractional_labels": _with(data, y_train=data.y_train + 0.5),
    }[case]
    with pytest.raises(BackendInputError, match=message):
        built(name).train(bad, TRAIN)


def test_inference_refuses_bad_images(name: str, data: TrainData) -> None:
    backend = built(name)
    with pytest.raises(BackendInputError, match=r"images must have shape \(n, 28, 28, 1\), got \(2, 28, 28\)"):
        backend.predict_proba(data.x_val[:2, ..., 0])
    with pytest.raises(BackendInputError, match="images is empty"):
        backend.feature_maps(data.x_val[:0], ["conv1"])
    with pytest.raises(BackendInputError, match=r"images must be floats in \[0, 1\] \(pixels / 255\), got values from [\d.e-]+ to 255"):
        backend.predict_proba(data.x_val[:2] * 255)
    with pytest.raises(BackendInputError, match=r"labels must lie in \[0, 9\], got values from 0 to 12"):
        backend.evaluate(data.x_val[:2], np.array([0, 12]))


def test_negative_initial_epoch_is_refused(name: str, data: TrainData) -> None:
    with pytest.raises(ValueError, match="initial_epoch must be >= 0, got -1"):
        built(name).train(data, TRAIN, initial_epoch=-1)


# --- outputs -------------------------------------------------------------------------------------


def test_probabilities_are_float32_rows_summing_to_one(trained, data: TrainData) -> None:
    backend, _, _ = trained
    probabilities = backend.predict_proba(data.x_val, batch_size=48)
    assert probabilities.dtype == np.float32 and probabilities.shape == (64, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities >= 0).all()


def test_loggable_model_outputs_the_probabilities(name: str, trained, data: TrainData) -> None:
    backend, _, _ = trained
    loggable = backend.loggable_model()
    assert loggable.flavor == backend.mlflow_flavor
    assert loggable.pip_requirements[0].startswith(f"{name}==")
    assert all("==" in requirement for requirement in loggable.pip_requirements)
    if name == "torch":
        import torch

        model = pickle.loads(pickle.dumps(loggable.model))
        assert not model.training
        assert all(p.device.type == "cpu" for p in model.parameters())
        with torch.no_grad():
            output = model(torch.from_numpy(data.x_val)).numpy()
    else:
        output = loggable.model.predict(data.x_val, verbose=0)
    np.testing.assert_allclose(output, backend.predict_proba(data.x_val), rtol=1e-5, atol=1e-6)


# --- keras specifics -----------------------------------------------------------------------------


def test_keras_runs_on_the_torch_backend() -> None:
    module = sys.modules[load_backend_class("keras").__module__]
    assert module.keras.backend.backend() == "torch"


def test_keras_imported_with_another_backend_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    other_keras = types.SimpleNamespace(backend=types.SimpleNamespace(backend=lambda: "jax"))
    monkeypatch.setitem(sys.modules, "keras", other_keras)
    load_backend_class("keras")
    # The module that imports Keras first is the one that picks (and checks) its backend.
    source = Path(sys.modules["cnn_train.backends.keras_direct"].__file__)
    spec = importlib.util.spec_from_file_location("fresh_keras_direct", source)
    with pytest.raises(RuntimeError, match="already imported with the 'jax' backend.*set KERAS_BACKEND=torch"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize("config", [ModelConfig(), CUSTOM, ModelConfig.preset("dense")], ids=["default", "custom", "dense"])
def test_keras_fast_forward_matches_the_layers_own_calls(config: ModelConfig) -> None:
    """The fused torch ops the Keras model trains with compute what its Keras layers compute, gradients too."""
    import torch

    model = built("keras", config, seed=2)._model
    weights = [variable.value for variable in model.trainable_weights]
    images = torch.rand(5, 28, 28, 1)
    fast = model.call(images)
    reference = images
    for layer in model.layers:
        reference = layer.call(reference)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(fast.sum(), weights), torch.autograd.grad(reference.sum(), weights)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_keras_loss_shortcut_matches_the_compiled_loss() -> None:
    import torch

    model = built("keras")._model
    keras = sys.modules[load_backend_class("keras").__module__].keras
    logits, labels = torch.randn(32, 10), torch.randint(0, 10, (32,))
    expected = keras.Sequential.compute_loss(model, y=labels, y_pred=logits)
    torch.testing.assert_close(model.compute_loss(y=labels, y_pred=logits), expected)
    weights = torch.rand(32)
    weighted = keras.Sequential.compute_loss(model, y=labels, y_pred=logits, sample_weight=weights)
    torch.testing.assert_close(model.compute_loss(y=labels, y_pred=logits, sample_weight=weights), weighted)


def test_keras_fit_still_drives_user_callbacks_and_compiled_metrics(data: TrainData) -> None:
    model = built("keras")._model
    keras = sys.modules[load_backend_class("keras").__module__].keras
    batches: list[dict] = []
    callback = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: batches.append(dict(logs)))
    history = model.fit(data.x_train, data.y_train, batch_size=32, epochs=1, callbacks=[callback], verbose=0)
    assert len(batches) == math.ceil(len(data.x_train) / 32)
    assert set(batches[-1]) >= {"loss", "accuracy"}
    assert history.history["accuracy"][0] == pytest.approx(batches[-1]["accuracy"])


# Freed memory stays in the process once a backend is built: a 20 MB buffer, freed, is still in malloc's
# free lists (glibc's mallinfo2), instead of going back to the OS as glibc's adaptive defaults do.
_FREED_MEMORY = """
import ctypes, sys
import numpy as np

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] != "defaults":
    from cnn_train.backends.torch_backend import TorchBackend
    from cnn_train.plugins.config import ModelConfig
    TorchBackend().build(ModelConfig(), device="cpu", seed=0)
buffer = np.ones(20 * 2**20, dtype=np.uint8)
del buffer
print(libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize(("setting", "kept"), [("defaults", False), ("built", True)])
def test_a_built_backend_keeps_freed_memory_in_the_process(setting: str, kept: bool) -> None:
    result = subprocess.run([sys.executable, "-c", _FREED_MEMORY, setting], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (int(result.stdout.split()[-1]) >= 20 * 2**20) == kept
