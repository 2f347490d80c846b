"""The backend under test, how checks make instances of it, and how a check says it does not apply."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cnn_train.plugins import registry
from cnn_train.plugins.config import ModelConfig
from cnn_train.plugins.contract import Backend, EpochMetrics
from cnn_train.plugins.conformance.data import SMOKE, train_data

#: A registered backend name, or a backend class checked as it is (before it is registered, say).
BackendRef = str | type


class NotApplicable(Exception):
    """Raised by a check that does not apply to the backend under test; the message says why."""


@dataclass(frozen=True)
class Subject:
    """The backend under test. Nothing is imported until a check asks for the class."""

    ref: BackendRef

    @property
    def name(self) -> str | None:
        """The registered name, when the backend was given by name."""
        return self.ref if isinstance(self.ref, str) else None

    @property
    def label(self) -> str:
        if isinstance(self.ref, str):
            return self.ref
        return f"{self.ref.__module__}.{self.ref.__qualname__}"

    @functools.cached_property
    def cls(self) -> type[Backend]:
        """The backend class; by name it comes from the registry, which refuses a class that breaks the contract."""
        if isinstance(self.ref, str):
            return registry.load_backend_class(self.ref)
        return self.ref

    def new(self) -> Backend:
        return self.cls()

    def reference_config(self) -> ModelConfig:
        """The lesson's CNN when the backend builds it, else its first architecture's preset."""
        architectures = self.cls.architectures
        return ModelConfig.preset("cnn" if "cnn" in architectures else architectures[0])

    def convolution_configs(self) -> list[ModelConfig]:
        """The reference configs (architecture presets) with convolution layers that this backend builds;
        NotApplicable when it builds none."""
        architectures = self.cls.architectures
        configs = [ModelConfig.preset(a) for a in architectures if ModelConfig.preset(a).conv_layers]
        if not configs:
            raise NotApplicable(
                f"{self.label} builds only {', '.join(architectures)}, which has no convolution layers"
            )
        return configs

    def built(self, config: ModelConfig | None = None, *, seed: int = 7) -> Backend:
        backend = self.new()
        backend.build(config or self.reference_config(), device="cpu", seed=seed)
        return backend

    def trained(self, *, seed: int = 7) -> tuple[Backend, list[EpochMetrics]]:
        """The reference config trained for one epoch on the CPU, with the metrics ``on_epoch`` saw."""
        backend, seen, _ = self.trained_returning(seed=seed)
        return backend, seen

    def trained_returning(self, *, seed: int = 7) -> tuple[Backend, list[EpochMetrics], object]:
        """:meth:`trained`, and what ``train`` returned (a TrainHistory, if the backend keeps the contract)."""
        backend = self.built(seed=seed)
        seen: list[EpochMetrics] = []
        returned = backend.train(train_data(), SMOKE.model_copy(update={"seed": seed}), on_epoch=seen.append)
        return backend, seen, returned
