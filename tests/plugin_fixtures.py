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


def __getattr__(name: str):
    if name == "RaisesOnImport":
        raise RuntimeError("plugin is broken at import time")
    raise AttributeError(name)
