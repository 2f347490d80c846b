"""Logging a backend's model into a run, and the model registry.

Models go in through ``mlflow.models.Model.log``, the public call every ``mlflow.<flavor>.log_model``
makes: unlike some of those (pyfunc's, keras's) it takes the run to log into by id (``run_id=``), so
no fluent run is started in the thread, nor ended.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cnn_train.flows.tracking.uri import client
from cnn_train.plugins.contract import LoggableModel

if TYPE_CHECKING:
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import PyFuncModel

#: The flavor for frameworks MLflow has no flavor module for: ``model`` is an ``mlflow.pyfunc.PythonModel``.
PYFUNC = "pyfunc"
#: The name of a logged model's output in its signature.
OUTPUT_NAME = "probabilities"

# PyTorch's exporter (MLflow's default pt2 format) keeps its tracing mode in process-global state,
# and Model.log and the registry read the process-wide tracking URI: two threads logging or
# registering models at once (sweep trials) would break each other.
_PROCESS_STATE_LOCK = threading.Lock()


class UnloggableModelError(ValueError):
    """A LoggableModel that the tracking code cannot log (unknown flavor, wrong model type...)."""


@dataclass(frozen=True, eq=False)
class ModelRecord:
    """What a logged model records beside its files: its signature's shapes (float32 images
    ``(-1, *input_shape)`` in, ``(-1, num_classes)`` probabilities out), an input example for the MLflow
    UI and for serving, the values that made it (the logged model's own params) and its name in the run."""

    input_shape: tuple[int, ...]
    num_classes: int
    input_example: np.ndarray | None = None
    params: Mapping[str, object] | None = None
    name: str = "model"

    def signature(self) -> ModelSignature:
        return model_signature(self.input_shape, self.num_classes)

    def param_strings(self) -> dict[str, str] | None:
        """The params as MLflow stores them: text, less the values left out (None)."""
        return {key: param_text(value) for key, value in self.params.items() if value is not None} if self.params else None

    def example_for(self, loggable: LoggableModel) -> np.ndarray | None:
        return self.input_example if loggable.accepts_input_example else None


def param_text(value: object) -> str:
    """A param's or tag's value as MLflow stores it: text; lists and mappings as JSON, not Python's repr."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return repr(value) if isinstance(value, float) else str(value)


def logged_model_id(model_uri: str | None) -> str | None:
    """The logged model's id in a ``models:/m-...`` URI; None for other URIs (a registered version's...)."""
    return model_uri.removeprefix("models:/") if model_uri and model_uri.startswith("models:/m-") else None


def log_model(uri: str, experiment_id: str, run_id: str, loggable: LoggableModel, record: ModelRecord) -> str:
    """Log ``loggable`` into run ``run_id`` as ``record`` describes it; returns its ``models:/<model id>`` URI.

    A native flavor's model goes in as that flavor's model argument, a pyfunc's as ``python_model``
    with its ``artifacts``; see :class:`~cnn_train.plugins.contract.LoggableModel`.
    """
    from mlflow.models import Model

    flavor, model_arguments = _flavor_and_model(loggable)
    with _PROCESS_STATE_LOCK, _process_tracking_uri(uri):
        # Without a model id, Model.log files the model under the thread's active experiment (often
        # the default one), where `runs:/<run id>/model` cannot find it; create it in the run's.
        logged = MlflowClient(tracking_uri=uri).create_logged_model(
            experiment_id, name=record.name, source_run_id=run_id, tags={"flavor": loggable.flavor},
            params=record.param_strings(),
        )
        info = Model.log(
            artifact_path=None,
            name=record.name,
            model_id=logged.model_id,
            flavor=flavor,
            run_id=run_id,
            signature=record.signature(),
            pip_requirements=list(loggable.pip_requirements) or None,
            input_example=record.example_for(loggable),
            **model_arguments,
            **loggable.extra,
        )
    return info.model_uri


def save_model(path: Path, loggable: LoggableModel, record: ModelRecord) -> None:
    """Save ``loggable`` as :func:`log_model` would log it, into a local folder (the spool keeps it
    while the tracking server is away, then uploads it as a logged model)."""
    flavor, model_arguments = _flavor_and_model(loggable)
    with _PROCESS_STATE_LOCK:
        flavor.save_model(
            path=str(path),
            signature=record.signature(),
            pip_requirements=list(loggable.pip_requirements) or None,
            input_example=record.example_for(loggable),
            **model_arguments,
            **loggable.extra,
        )


def model_signature(input_shape: tuple[int, ...], num_classes: int) -> ModelSignature:
    """Float32 images ``(-1, *input_shape)`` in, ``probabilities`` ``(-1, num_classes)`` out.

    The input stays unnamed: with a named input MLflow hands the flavor a dict, which the pytorch
    flavor refuses ("does not support List or Dict input types"), so no pytorch model could predict.
    The input example (logged beside it) shows callers the shape: ``{"inputs": [...]}``.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), name=OUTPUT_NAME)]),
    )


def load_pyfunc(model_uri: str, uri: str, *, experiment: str | None = None) -> PyFuncModel:
    """``mlflow.pyfunc.load_model`` with ``runs:/`` and ``models:/`` URIs resolved in store ``uri``. Nothing
    loadable there (a wrong artifact path, a folder without an MLmodel file) is a ModelNotFoundError, whose
    line lists what ``experiment`` has when it is given."""
    import mlflow.pyfunc

    # A model MLflow has to download (a server's proxied artifacts) goes into a new temporary folder
    # that MLflow never removes: each `cnn-train predict` and predict flow run left a copy of its model
    # in /tmp. This one goes with the loaded model, or as the process exits.
    from cnn_train.flows.tracking.lookup import local_folder  # lookup imports this module

    # A model folder on this machine loads where it is: given a destination, MLflow copies it there first.
    folder = local_folder(model_uri)
    download = None if folder else tempfile.mkdtemp(prefix="cnn-train-model-")
    try:
        with _PROCESS_STATE_LOCK, _process_tracking_uri(uri):
            _keras_backend_of(str(folder) if folder else model_uri)
            model = mlflow.pyfunc.load_model(str(folder) if folder else model_uri, dst_path=download)
    except MlflowException as error:
        _remove(download)
        from cnn_train.flows.tracking.lookup import MISSING_CODES, ModelNotFoundError, what_exists

        if error.error_code not in MISSING_CODES:
            _refuse_elsewhere(model_uri, folder, error)
            raise
        found = f"no model MLflow can load at {model_uri} ({str(error).splitlines()[0]})"
        raise ModelNotFoundError(f"{found}; {what_exists(client(uri), experiment)}" if experiment else found) from None
    except Exception as error:
        _remove(download)
        _refuse_elsewhere(model_uri, folder, error)
        raise
    except BaseException:
        _remove(download)
        raise
    if download:
        weakref.finalize(model, shutil.rmtree, download, ignore_errors=True)
    return model


def _refuse_elsewhere(model_uri: str, folder: Path | None, error: Exception) -> None:
    """A model at another scheme's address (s3:, http:, dbfs:...) that MLflow's loaders failed on, each
    in its own way (a missing boto3, an unpacking error), as one line; other failures are left to raise."""
    from cnn_train.flows.tracking.lookup import ModelNotFoundError, elsewhere

    if folder is not None or not elsewhere(model_uri):
        return
    if isinstance(error, ModuleNotFoundError):
        why = f"loading from there needs the module {error.name!r}, which is not installed"
    else:
        why = f"{type(error).__name__}: {(str(error).splitlines() or ['no reason given'])[0]}"
    raise ModelNotFoundError(f"MLflow cannot load a model from {model_uri} ({why}); copy it here or give a runs:/ or models:/ URI") from None


def _keras_backend_of(source: str) -> None:
    """A Keras model loads with the backend Keras picks as it is imported: KERAS_BACKEND, else
    ~/.keras/keras.json, which Keras writes with TensorFlow, whether installed or not. Unless the user
    chose one, the model's own (its MLmodel's ``keras_backend``) is set first (MLflow's loader does not)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model
    from mlflow.utils.uri import append_to_uri_path

    if "KERAS_BACKEND" in os.environ or "keras" in sys.modules:
        return
    # Model.load of a URI downloads the MLmodel file into a temporary folder it never removes: one per predict.
    with tempfile.TemporaryDirectory(prefix="cnn-train-mlmodel-") as where:
        try:
            local = source if Path(source).is_dir() else download_artifacts(append_to_uri_path(source, "MLmodel"), dst_path=where)
            backend = Model.load(local).flavors.get("keras", {}).get("keras_backend")
        except (MlflowException, OSError):  # nothing loadable there: the load says so
            return
    if backend:
        os.environ["KERAS_BACKEND"] = backend


def _remove(folder: str | None) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def link_model_input(uri: str, run_id: str, model_id: str) -> None:
    """Record logged model ``model_id`` as an input of run ``run_id`` (the MLflow UI links the two)."""
    from mlflow.entities import LoggedModelInput

    MlflowClient(tracking_uri=uri).log_inputs(run_id, models=[LoggedModelInput(model_id)])


def check_loggable(loggable: LoggableModel) -> None:
    """Refuse, with what to do instead, a LoggableModel that :func:`log_model` cannot log."""
    _flavor_and_model(loggable)


def _flavor_and_model(loggable: LoggableModel) -> tuple[ModuleType, dict[str, object]]:
    """The flavor module and the keyword arguments that hand it the model."""
    if loggable.flavor == PYFUNC:
        import mlflow.pyfunc

        if not isinstance(loggable.model, mlflow.pyfunc.PythonModel):
            raise UnloggableModelError(
                f"flavor 'pyfunc' needs model to be an mlflow.pyfunc.PythonModel instance, "
                f"got {type(loggable.model).__module__}.{type(loggable.model).__qualname__}"
            )
        return mlflow.pyfunc, {"python_model": loggable.model, "artifacts": dict(loggable.artifacts) or None}
    flavor = _native_flavor(loggable.flavor)
    if loggable.artifacts:
        raise UnloggableModelError(
            f"artifacts are for flavor 'pyfunc' only; flavor {loggable.flavor!r} saves its model itself "
            f"(got artifacts {sorted(loggable.artifacts)})"
        )
    # Each flavor names its model argument differently (pytorch_model, model, sk_model...).
    model_argument = next(iter(inspect.signature(flavor.save_model).parameters))
    return flavor, {model_argument: loggable.model}


def _native_flavor(name: str) -> ModuleType:
    routes = (
        "LoggableModel.flavor must name an MLflow flavor module (e.g. 'pytorch', 'keras', 'sklearn'), "
        "or be 'pyfunc' with model an mlflow.pyfunc.PythonModel instance, plus artifacts (files it "
        "needs) and pip_requirements, for a framework MLflow has no flavor for"
    )
    if not name.isidentifier() or importlib.util.find_spec(f"mlflow.{name}") is None:
        raise UnloggableModelError(f"unknown MLflow flavor {name!r}: {routes}")
    try:
        flavor = importlib.import_module(f"mlflow.{name}")
    except ImportError as error:
        raise UnloggableModelError(f"MLflow flavor {name!r} cannot be imported ({error}); install what it names") from error
    if not callable(getattr(flavor, "save_model", None)):
        raise UnloggableModelError(f"mlflow.{name} is not a model flavor (it has no save_model): {routes}")
    return flavor


@contextlib.contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for a block (Model.log reads only that),
    then leave it exactly as it was.

    Usually nothing has pinned it and it follows MLFLOW_TRACKING_URI, so only the variable is set and
    put back. If something pinned it with ``mlflow.set_tracking_uri`` (which outranks the variable),
    it is re-pinned to ``uri`` and then back to its old value.
    """
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    pinned_before = None
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        if mlflow.get_tracking_uri() != uri:
            pinned_before = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(uri)
        yield
    finally:
        if pinned_before is not None:
            mlflow.set_tracking_uri(pinned_before)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def register_model(
    name: str,
    model_uri: str,
    *,
    run_id: str,
    description: str,
    model_description: str,
    uri: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> int:
    """A new version of registered model ``name`` from a logged model, with ``description`` and ``tags``;
    returns the version number. A model registered for the first time gets ``model_description``."""
    mlflow_client = client(uri)
    try:
        mlflow_client.create_registered_model(name, description=model_description)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = logged_model_id(model_uri)
    # A SQLite registry looks a models:/ source up through the process-wide tracking URI.
    with _PROCESS_STATE_LOCK, _process_tracking_uri(mlflow_client.tracking_uri):
        version = mlflow_client.create_model_version(
            name, source=model_uri, run_id=run_id, description=description, model_id=model_id, tags=dict(tags or {})
        )
    if model_id:
        _link_version_to_logged_model(mlflow_client, model_id, name, version.version)
    return int(version.version)


#: The logged model's tag listing its registered versions; the MLflow UI's model page reads it
#: ("Model versions"). ``mlflow.register_model`` sets it; ``MlflowClient.create_model_version`` does on
#: an MLflow server (as a number), not on a SQLite store.
MODEL_VERSIONS_TAG = "mlflow.modelVersions"


def _link_version_to_logged_model(mlflow_client: MlflowClient, model_id: str, name: str, version: str) -> None:
    listed = json.loads(mlflow_client.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG, "[]"))
    if any(entry.get("name") == name and str(entry.get("version")) == str(version) for entry in listed):
        return  # the server listed it: a second entry showed the version twice
    listed.append({"name": name, "version": str(version)})
    mlflow_client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(listed)})
