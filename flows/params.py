"""The flow's parameters as one validated object, checked before anything is recorded or trained."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cnn_train.flows import placement
from cnn_train.plugins import registry
from cnn_train.plugins.config import (
    ARCHITECTURES,
    ModelConfig,
    TrainConfig,
    format_validation_error,
    recipe_training_defaults,
)

#: Images in Fashion-MNIST's training file; the sample limit cannot exceed it.
TRAIN_IMAGES = 60_000
TEST_IMAGES = 10_000

#: Training values a run may leave to its architecture (None in the flows' and the CLI's signatures).
TRAINING_VALUES = ("epochs", "batch_size", "learning_rate")
LESSON_TRAINING: dict[str, Any] = {name: TrainConfig.model_fields[name].default for name in TRAINING_VALUES}


def training_defaults(architecture: str) -> dict[str, Any]:
    """Epochs, batch size and learning rate a run of ``architecture`` uses unless told otherwise."""
    recipe = recipe_training_defaults(architecture)
    return {name: recipe.get(name, LESSON_TRAINING[name]) for name in TRAINING_VALUES}


class ParameterError(ValueError):
    """Flow parameters that cannot run; the message lists each bad field and what is allowed."""


class RunParameters(BaseModel):
    """Everything one ``cnn-train`` flow run needs to know."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str = Field(default="torch", description="Installed backend name (see `cnn-train backends`).")
    architecture: str = Field(
        default="cnn", description="'cnn' (the lesson's model), 'dense' or 'cnn-improved' (the improved recipe)."
    )
    # None (or left out) means the architecture's own value: the lesson's 10 / 32 / 1e-3, or the recipe's.
    epochs: int = Field(default=LESSON_TRAINING["epochs"], ge=1, description="Passes over the training set.")
    batch_size: int = Field(default=LESSON_TRAINING["batch_size"], ge=1, description="Images per optimizer step.")
    learning_rate: float = Field(
        default=LESSON_TRAINING["learning_rate"], gt=0, allow_inf_nan=False, description="Adam learning rate."
    )
    seed: int = Field(default=42, ge=0, description="Seed for weights, shuffling and the split.")
    validation_fraction: float = Field(default=0.1, gt=0, lt=1, description="Share of training images held out.")
    sample_limit: int | None = Field(
        default=None, ge=20, le=TRAIN_IMAGES, description="Use only this many training images (quick runs)."
    )
    test_limit: int | None = Field(
        default=None, ge=10, le=TEST_IMAGES, description="Evaluate on this many test images (quick runs)."
    )
    experiment: str = Field(default="cnn-train", min_length=1, description="MLflow experiment name.")
    data_dir: str | None = Field(default=None, description="Folder with the four Fashion-MNIST .gz files.")
    compare_dense: bool = Field(default=False, description="Also train the dense network and compare.")
    prep_device: str = Field(default=placement.DEFAULT_REQUESTS["prep"], description="Device request for data prep.")
    train_device: str = Field(default=placement.DEFAULT_REQUESTS["train"], description="Device request for training.")
    evaluate_device: str = Field(
        default=placement.DEFAULT_REQUESTS["evaluate"], description="Device request for evaluation."
    )
    report_device: str = Field(default=placement.DEFAULT_REQUESTS["report"], description="Device request for the report.")

    @model_validator(mode="before")
    @classmethod
    def _architecture_defaults(cls, values: Any) -> Any:
        # Flows and the CLI pass None for a training value the user did not choose; it becomes the
        # architecture's default here, before validation, so the run is checked and logged as it trains.
        if not isinstance(values, dict):
            return values
        defaults = training_defaults(values.get("architecture", "cnn"))
        return values | {name: defaults[name] for name in TRAINING_VALUES if values.get(name) is None}

    @field_validator("epochs", "batch_size", "seed", "sample_limit", "test_limit", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any) -> Any:
        # pydantic would accept 2.0 as 2 and "3" as 3; an epoch count of 2.5 is a mistake worth naming.
        if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
            raise ValueError("must be a whole number")
        return value

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r}; allowed: {', '.join(ARCHITECTURES)}")
        return value

    @field_validator("prep_device", "train_device", "evaluate_device", "report_device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        placement.parse_request(value)
        return value

    def model(self) -> ModelConfig:
        return ModelConfig.preset(self.architecture)

    def training(self) -> TrainConfig:
        """The run's training; an architecture with a recipe also gets the recipe's schedule and augmentation."""
        chosen = {"epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.learning_rate}
        return TrainConfig(**recipe_training_defaults(self.architecture) | chosen | {"seed": self.seed})

    def device_requests(self) -> dict[str, str]:
        return {
            "prep": self.prep_device,
            "train": self.train_device,
            "evaluate": self.evaluate_device,
            "report": self.report_device,
        }

    def expected_train_images(self) -> int:
        """Images the training split will hold, so batch size can be checked before loading data."""
        from cnn_train.flows.data import split_sizes

        return split_sizes(self.sample_limit or TRAIN_IMAGES, self.validation_fraction)[0]


def validate_parameters(**values: Any) -> RunParameters:
    """Build RunParameters and check what needs the registry: every problem becomes one ParameterError."""
    try:
        params = RunParameters(**values)
    except ValidationError as error:
        raise ParameterError("invalid flow parameters:\n" + format_validation_error(error)) from None
    try:
        backend_class = registry.load_backend_class(params.backend)
    except registry.BackendError as error:
        raise ParameterError(f"backend: {error}") from None
    if params.architecture not in backend_class.architectures:
        raise ParameterError(
            f"architecture: backend {params.backend!r} cannot build {params.architecture!r}; "
            f"it supports: {', '.join(backend_class.architectures)}"
        )
    if params.batch_size > params.expected_train_images():
        raise ParameterError(
            f"batch_size: {params.batch_size} is larger than the training set "
            f"({params.expected_train_images()} images); use at most that many"
        )
    return params
