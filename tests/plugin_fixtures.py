"""Backends that obey or break the contract, for registry and conformance tests."""

from __future__ import annotations

from cnn_train.plugins.contract import Backend


class GoodBackend:
    """Satisfies the contract's shape (it is never trained)."""

    mlflow_flavor = "fake"
    architectures = ("dense",)

    def build(self, config, *, device, seed): ...
    def parameter_count(self): return 0
    def train(self, data, config, *, on_epoch=None, initial_epoch=0): ...
    def evaluate(self, x, y, *, batch_size=256): ...
    def predict_proba(self, x, *, batch_size=256): ...
    def feature_maps(self, x, layers): ...
    def first_conv_kernels(self): ...
    def save(self, path): ...
    def load(self, path, config, *, device): ...
    def loggable_model(self): ...


class Other(GoodBackend):
    pass


class MissingTrain(GoodBackend):
    train = None


class WrongBuildSignature(GoodBackend):
    def build(self, config, seed):  # no device: it would have to find one itself
        ...


class NoFlavor(GoodBackend):
    mlflow_flavor = ""


class ExtraRequired(GoodBackend):
    def evaluate(self, x, y, scale, *, batch_size=256): ...


class RaisesInConstructor(GoodBackend):
    def __init__(self):
        raise ConnectionError("cannot reach the licence server")


NOT_A_CLASS = object()

assert isinstance(GoodBackend(), Backend)




def _torch_backend():
    from cnn_train.backends.torch_backend import TorchBackend

    return TorchBackend


def make_wrong_shape_backend():
    base = _torch_backend()

    class WrongShapeBackend(base):
        def predict_proba(self, x, *, batch_size=256):
            return super().predict_proba(x, batch_size=batch_size)[:, :9]

    return WrongShapeBackend


def make_flaky_backend():
    """The torch backend, failing once right after epoch 1 ends (a transient fault), remembered in
    the file named by $FLAKY_MARKER so that the retry succeeds."""
    import os
    from pathlib import Path

    base = _torch_backend()

    class FlakyBackend(base):
        def train(self, data, config, *, on_epoch=None, initial_epoch=0):
            marker = Path(os.environ["FLAKY_MARKER"])

            def fail_once(metrics):
                if on_epoch is not None:
                    on_epoch(metrics)
                if metrics.epoch == 1 and not marker.exists():
                    marker.write_text("failed once")
                    raise ConnectionError("injected transient fault after epoch 1")

            return super().train(data, config, on_epoch=fail_once, initial_epoch=initial_epoch)

    return FlakyBackend


def __getattr__(name: str):
    if name == "RaisesOnImport":
        raise RuntimeError("plugin is broken at import time")
    if name == "WrongShapeBackend":
        return make_wrong_shape_backend()
    if name == "FlakyBackend":
        return make_flaky_backend()
    raise AttributeError(name)
