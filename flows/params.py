"""The one declaration of every run parameter: its name, type, default, allowed values and description.

The flows' signatures (and so their Prefect forms), the CLI's options, validation, the parameters
logged to MLflow, the benchmarks' options and the README's parameter table are all derived from the
models below. Fields the run shares with the backend's :class:`TrainConfig`/:class:`ModelConfig`
take their declaration from there.
"""

from __future__ import annotations

import numbers
import re
import warnings
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError, WithJsonSchema, WrapValidator, model_validator
from pydantic.fields import FieldInfo

from cnn_train.flows import placement
from cnn_train.flows.errors import ExpectedFailure
from cnn_train.plugins import registry
from cnn_train.plugins.config import (
    IMPROVED_ARCHITECTURE, Architecture, ModelConfig, TrainConfig, format_validation_error, recipe_training_defaults,
)

#: Images in Fashion-MNIST's files; the limits cannot exceed them.
TRAIN_IMAGES = 60_000
TEST_IMAGES = 10_000

#: Training values a run may leave empty: they then take the architecture's own (the lesson's or the recipe's).
TRAINING_VALUES = ("epochs", "batch_size", "learning_rate")
LESSON_TRAINING: dict[str, Any] = {name: TrainConfig.model_fields[name].default for name in TRAINING_VALUES}
#: Run values that are counts: a float is refused unless it is a whole number (JSON's 2.0).
WHOLE_NUMBERS = ("epochs", "batch_size", "seed", "sample_limit", "test_limit")

# A device request is a policy, or one card by index. The policies are a closed list (a dropdown in
# the Prefect form); an explicit card stays possible from the CLI and `-p train_device=cuda:1`.
DevicePolicy = Literal["cpu", "gpu-preferred", "gpu-required"]
ExplicitDevice = Annotated[str, StringConstraints(pattern=f"^{placement.EXPLICIT_PATTERN}$")]
# Titles name the two branches in the Prefect form's type switch ("str | str" otherwise).
_FORM_DEVICE = Annotated[DevicePolicy, Field(title="policy")] | Annotated[ExplicitDevice, Field(title="one card (cuda:N)")]


def _one_device_message(value: Any, handler: Any) -> str:
    # The placement module's one line ("expected 'cpu', ... or 'cuda:N'") instead of an error per union member.
    try:
        return str(placement.parse_request(value))
    except placement.PlacementError as error:
        raise ValueError(str(error)) from None


DeviceRequest = Annotated[_FORM_DEVICE, WrapValidator(_one_device_message)]


# MLflow refuses '/' and ':'; '@' and spaces would break the models:/NAME@ALIAS URIs users type.
_REGISTERED_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_REGISTERED_NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit"


def _registered_name(value: str) -> str:
    if not re.fullmatch(_REGISTERED_NAME, value):
        raise ValueError(f"a registered model name takes {_REGISTERED_NAME_RULE}")
    return value


# The schema says it too (blank is a field not given), so the Prefect server refuses a bad name before the run exists.
_NAME_SCHEMA = {"type": "string", "pattern": rf"^\s*$|{_REGISTERED_NAME}", "title": "name", "description": _REGISTERED_NAME_RULE}
RegisteredName = Annotated[str, AfterValidator(_registered_name), WithJsonSchema(_NAME_SCHEMA)]


def _blank_is_none(value: Any) -> Any:
    # A field cleared in the Prefect form, or given as '' on the command line, is a field not given.
    return None if isinstance(value, str) and not value.strip() else value


#: Optional text whose description says what leaving it empty means; blank is empty.
OptionalText = Annotated[str | None, BeforeValidator(_blank_is_none)]
OptionalName = Annotated[RegisteredName | None, BeforeValidator(_blank_is_none)]


class ParameterError(ExpectedFailure, ValueError):
    """Run parameters that cannot run; the message lists each bad field and what is allowed."""


def training_defaults(architecture: str) -> dict[str, Any]:
    """Epochs, batch size and learning rate a run of ``architecture`` uses unless told otherwise."""
    recipe = recipe_training_defaults(architecture)
    return {name: recipe.get(name, LESSON_TRAINING[name]) for name in TRAINING_VALUES}


def _left_to_architecture(name: str) -> Any:
    """TrainConfig's declaration of ``name``, empty by default: the architecture then decides."""
    declared = TrainConfig.model_fields[name]
    recipe = training_defaults(IMPROVED_ARCHITECTURE)[name]
    return FieldInfo.merge_field_infos(
        declared,
        default=None,
        description=f"{declared.description} Empty: the architecture's own ({declared.default:g}; "
        f"{recipe:g} for {IMPROVED_ARCHITECTURE}).",
    )


def _device(task: str, what: str) -> Any:
    description = f"Device for {what}: cpu, gpu-preferred (CPU fallback), gpu-required, or cuda:N for one card."
    return Field(default=placement.DEFAULT_REQUESTS[task], description=description)


# Every pydantic model class has ABCMeta's `register`; the `register` field hides it on instances only, where
# nothing calls it: pydantic's warning (RunParameters; Prefect's model of a flow's signature) is no user's to act on.
warnings.filterwarnings("ignore", message=r'Field name "register" in "\w+" shadows', category=UserWarning)


class RunParameters(BaseModel):
    """Everything one ``cnn-train`` run needs to know; validated once, before anything is recorded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str = Field(default="torch", min_length=1, description="Installed backend (see `cnn-train backends`).")
    architecture: Architecture = ModelConfig.model_fields["architecture"]
    epochs: int | None = _left_to_architecture("epochs")
    batch_size: int | None = _left_to_architecture("batch_size")
    learning_rate: float | None = _left_to_architecture("learning_rate")
    seed: int = TrainConfig.model_fields["seed"]
    validation_fraction: float = Field(
        default=0.1, gt=0, lt=1, allow_inf_nan=False, description="Share of the training images held out for validation (stratified)."
    )
    sample_limit: int | None = Field(
        default=None, ge=20, le=TRAIN_IMAGES, description="Use this many training images only (stratified; the validation share is held out of them); empty: all."
    )
    test_limit: int | None = Field(
        default=None, ge=10, le=TEST_IMAGES, description="Evaluate on this many test images only (stratified, the same for every seed); empty: all."
    )
    experiment: Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"\S")] = Field(default="cnn-train", min_length=1, max_length=500, description="MLflow experiment.")
    data_dir: OptionalText = Field(
        default=None, description="Folder with the four Fashion-MNIST IDX files (.gz or unpacked); empty: searched for."
    )
    compare_dense: bool = Field(
        default=False, description="Also train the previous lesson's dense network on the same split, and compare."
    )
    register: OptionalName = Field(
        default=None,
        description="Register the model under this name (champion/challenger aliases); letters, digits, '.', '_', '-'.",
    )
    prep_device: DeviceRequest = _device("prep", "data prep")
    train_device: DeviceRequest = _device("train", "training")
    evaluate_device: DeviceRequest = _device("evaluate", "evaluation")
    report_device: DeviceRequest = _device("report", "the report")

    @model_validator(mode="before")
    @classmethod
    def _architecture_defaults(cls, values: Any) -> Any:
        # An empty training value becomes the architecture's before validation: checked and logged as it trains.
        if not isinstance(values, dict):
            return values
        defaults = training_defaults(values.get("architecture") or "cnn")
        return values | {name: defaults[name] for name in TRAINING_VALUES if values.get(name) is None}

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, values: Any) -> Any:
        # pydantic would take "3" as 3 and truncate nothing; an epoch count of 2.5 is a mistake worth naming.
        # JSON's 2.0 is a whole number: Prefect's server accepts it as an integer (`-p epochs=2.0`); so is a notebook's np.int64.
        for name in WHOLE_NUMBERS:
            value = values.get(name) if isinstance(values, dict) else None
            whole = isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and float(value).is_integer())
            if isinstance(value, bool) or (value is not None and not whole):
                raise ValueError(f"{name}: must be a whole number (got {value!r})")
            if value is not None:
                values = values | {name: int(value)}
        return values

    def model(self) -> ModelConfig:
        return ModelConfig.preset(self.architecture)

    def training(self) -> TrainConfig:
        """The run's training; an architecture with a recipe also gets the recipe's schedule and options."""
        chosen = {name: getattr(self, name) for name in (*TRAINING_VALUES, "seed")}
        return TrainConfig(**recipe_training_defaults(self.architecture) | chosen)

    def device_requests(self) -> dict[str, str]:
        return {task: getattr(self, f"{task}_device") for task in placement.TASKS}

    @property
    def trains_dense_baseline(self) -> bool:
        """``compare_dense`` asked for, and the run's own network is not the dense one already."""
        return self.compare_dense and self.architecture != "dense"

    def expected_train_images(self) -> int:
        """Images the training split will hold, so batch size can be checked before loading data."""
        from cnn_train.flows.data import split_sizes

        return split_sizes(self.sample_limit or TRAIN_IMAGES, self.validation_fraction)[0]


#: The split a run uses unless told otherwise, for code that prepares data outside a run (tests, benchmarks).
DEFAULT_SPLIT: dict[str, Any] = {name: RunParameters.model_fields[name].default for name in ("validation_fraction", "seed")}


def validate_parameters(*, trial_on: Literal["threads", "ray"] | None = None, **values: Any) -> RunParameters:
    """RunParameters, checked against the installed backends, the split and the devices: every
    problem becomes one ParameterError naming the field and what is allowed. A sweep's or study's trial
    (``trial_on``) evaluates in its training task, on its device; on Ray, Ray places that task, so this
    machine need not have the GPU it asks for."""
    try:
        params = RunParameters(**values)
    except ValidationError as error:
        raise ParameterError("invalid run parameters: " + format_validation_error(error)) from None
    if trial_on is not None:
        params = params.model_copy(update={"evaluate_device": params.train_device})
    try:
        backend_class = registry.load_backend_class(params.backend)
    except registry.BackendError as error:  # chained: `cnn-train --debug` shows where the plugin failed
        raise ParameterError(f"backend: {error}") from error
    if params.architecture not in backend_class.architectures:
        raise ParameterError(
            f"architecture: backend {params.backend!r} cannot build {params.architecture!r}; "
            f"it supports: {', '.join(backend_class.architectures)}"
        )
    if params.trains_dense_baseline and "dense" not in backend_class.architectures:  # else it fails after training
        raise ParameterError(
            f"compare_dense: backend {params.backend!r} cannot build the dense network to compare with (it supports: "
            f"{', '.join(backend_class.architectures)}); set compare_dense to false (--no-compare-dense)"
        )
    _check_split(params)
    _check_data_dir(params)
    if params.batch_size > params.expected_train_images():
        raise ParameterError(
            f"batch_size: {params.batch_size} is larger than the training set "
            f"({params.expected_train_images()} images); use at most that many"
        )
    try:
        placement.check_satisfiable({task: request for task, request in params.device_requests().items()
                                     if trial_on != "ray" or task not in ("train", "evaluate")})
    except placement.PlacementError as error:
        raise ParameterError(str(error)) from None
    return params


def _check_data_dir(params: RunParameters) -> None:
    """A folder the user named (``data_dir`` or the environment) exists and holds the four files, so
    a wrong path fails before any MLflow run is created; the files' content is checked as they are read."""
    from cnn_train.flows.data import DatasetError, locate_fashion_mnist
    from cnn_train.flows.data.locate import explicit_dir

    if explicit_dir(params.data_dir) is None:
        return
    try:
        locate_fashion_mnist(params.data_dir, allow_download=False)
    except DatasetError as error:
        raise ParameterError(str(error)) from None


def _check_split(params: RunParameters) -> None:
    from cnn_train.flows.data import SplitError, check_split

    try:
        check_split(
            validation_fraction=params.validation_fraction,
            sample_limit=params.sample_limit,
            test_limit=params.test_limit,
            seed=params.seed,
        )
    except SplitError as error:
        raise ParameterError(str(error)) from None


# --- other flows' own options, each declared once --------------------------------------------------


def _two_different_backends(value: Any) -> Any:
    # Before pydantic's min_length, which stays for the form's schema; 'keras,torch' is two, as in a grid.
    if isinstance(value, (list, tuple)):
        value = [part.strip() for name in value for part in str(name).split(",") if part.strip()]
        twice = ", ".join(sorted({name for name in value if value.count(name) > 1}))
        if twice or len(value) < 2:
            raise ValueError(f"{twice + ' given twice; ' if twice else ''}give at least two backend names, each once (e.g. keras and torch)")
    return value


class CompareOptions(BaseModel):
    """What the compare flow adds to a run's parameters."""

    backends: Annotated[list[str], BeforeValidator(_two_different_backends)] = Field(
        default=["keras", "torch"], min_length=2, json_schema_extra={"uniqueItems": True},
        description="Backends to compare: at least two different names (CLI: repeat --backend, or keras,torch).",
    )
    tolerance_points: float = Field(default=1.0, ge=0, allow_inf_nan=False, description="Largest test-accuracy gap, in points, still called parity.")


class SweepOptions(BaseModel):
    """What the sweep flow adds to a run's parameters."""

    grid: dict[str, list[Any]] = Field(
        default={"learning_rate": [1e-3, 3e-4], "architecture": ["cnn", "dense"]},
        description='Values to try per field, e.g. {"learning_rate": [0.001, 0.0003]} (CLI: --grid FIELD=V1,V2, '
        "repeatable); every combination is a trial.",
    )
    max_concurrent: int = Field(default=2, ge=1, description="Trials running at once.")
    register_best: OptionalName = Field(
        default=None,
        description="Register the best trial's model under this name (champion/challenger aliases, as `register`).",
    )


#: A Ray custom resource's name, as `ray start --resources` takes it.
RAY_RESOURCE_NAME = r"[A-Za-z_][A-Za-z0-9_.-]*"


def _ray_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if not re.fullmatch(RAY_RESOURCE_NAME, name) or not amount > 0:
            raise ValueError(
                "each resource is a name a node advertises with `ray start --resources` and a positive amount, "
                f'e.g. {{"a100": 1}}, not {name!r}: {amount:g}'
            )
    return value


class RunnerOptions(BaseModel):
    """Where a sweep's or a study's trials run: threads in the flow run's process, or Ray."""

    task_runner: Literal["local", "ray"] = Field(
        default="local", description="'local' (threads in the flow run's process) or 'ray'."
    )
    ray_address: str | None = Field(
        default=None,
        description="An existing Ray cluster (HOST:PORT, auto or ray://HOST:PORT); empty: start a local Ray.",
    )
    ray_resources: Annotated[dict[str, float], AfterValidator(_ray_resources)] = Field(
        default={},
        description='Ray custom resources each trial needs, e.g. {"a100": 1} (CLI: --ray-resource NAME=AMOUNT, '
        "repeatable): trials run only on nodes started with `ray start --resources '{\"a100\": 1}'`.",
    )

    @model_validator(mode="after")
    def _ray_options_need_ray(self) -> RunnerOptions:
        if given := [name for name in ("ray_address", "ray_resources") if getattr(self, name)]:
            if self.task_runner != "ray":
                verb = "needs" if len(given) == 1 else "need"
                raise ValueError(f"{' and '.join(given)} {verb} task_runner 'ray' (got {self.task_runner!r})")
        return self


class TuneOptions(BaseModel):
    """What the tune flow adds to a run's parameters: an Optuna study over some of them."""

    space: dict[str, Any] = Field(
        default={"learning_rate": "log:1e-4:1e-2", "batch_size": "32,64,128"},
        description="Field -> range or choices: log:LOW:HIGH, int:LOW:HIGH, float:LOW:HIGH or A,B,C "
        "(CLI: --space FIELD=SPEC, repeatable).",
    )
    trials: int = Field(
        default=16, ge=1,
        description="Trials the study holds when done (complete, pruned or failed; one queued again counts once); a rerun runs only the missing ones.",
    )
    max_concurrent: int = Field(default=2, ge=1, description="Trials running at once.")
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds after which no new trial starts (running ones finish); empty: no limit."
    )
    sampler: Literal["tpe", "random", "grid"] = Field(
        default="tpe", description="Optuna sampler: tpe (learns where to look), random, or grid (choices only)."
    )
    pruner: Literal["median", "successive-halving", "hyperband", "none"] = Field(
        default="median", description="Optuna pruner stopping hopeless trials after an epoch; none trains every trial to the end."
    )
    startup_trials: int = Field(
        default=4, ge=0,
        description="Trials sampled at random and never pruned before the sampler and median pruner learn from them.",
    )
    objective: Literal["val_accuracy", "best_val_accuracy"] = Field(
        default="val_accuracy", description="What the study maximises: the last epoch's validation accuracy, or the best epoch's."
    )
    study_name: OptionalText = Field(
        default=None,
        description="Optuna study to create or continue; empty: named after the space and fixed run values.",
    )
    storage: OptionalText = Field(
        default=None,
        description="Optuna RDB storage URL (e.g. postgresql://... shared by machines); empty: SQLite in the state dir.",
    )
    register_best: OptionalName = Field(default=None, description="Register the best trial's model in the MLflow registry under this name.")


#: Run parameters a flow does not take: the compare flow varies the backend; only `cnn-train` runs the
#: dense comparison and registers its model under `register` (sweep and tune have `register_best`);
#: data prep and the report run once per flow on the CPU in compare, sweep and tune.
COMPARE_EXCLUDES = ("backend", "compare_dense", "register")
SWEEP_EXCLUDES = ("compare_dense", "evaluate_device", "report_device", "register")
TUNE_EXCLUDES = SWEEP_EXCLUDES


class PredictOptions(BaseModel):
    """The batch-prediction flow's parameters."""

    model: OptionalText = Field(
        default=None,
        description="runs:/RUN_ID/model, models:/NAME/VERSION (or /latest), models:/NAME@ALIAS, a logged model id m-... or a model folder; "
        "empty: the cnn-train experiment's best registered champion, else its latest finished run.",
    )
    images: str = Field(min_length=1, description="Folder of image files (PNG, JPEG, ...) to classify, searched recursively, or one image file.")
