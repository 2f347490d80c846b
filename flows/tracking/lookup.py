"""Finding a model to predict with: one named by an MLflow URI, or the experiment's best registered
champion, or its latest finished training run's model; and, when a name matches nothing, what exists.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.tracking.registry import (
    ACCURACY_TAG,
    CHAMPION,
    all_registered_models,
    surest_accuracy,
    test_images_of,
    unknown_name,
    version_by_alias,
)
from cnn_train.flows.tracking.uri import client

#: Tags that mark a run other than a plain training run (compare or sweep parents, dense baselines,
#: trials) or a run inside another.
_NOT_A_DEFAULT_RUN = ("cnn_train.role", "mlflow.parentRunId")
_RECENT_RUNS = 5
#: Registered models a miss lists by name before saying how many more there are.
_LISTED_MODELS = 10
#: Runs read per search page, and pages read at most (10,000 runs) looking for ones with a model.
_SEARCH_PAGE, _SEARCH_PAGES = 200, 50
#: MLflow error codes that mean "nothing by that name" (a store or server that fails otherwise still raises).
MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
#: The file that makes a folder an MLflow model.
MLMODEL = "MLmodel"
_URI_FORMS = "runs:/<run id>/model, models:/<name>/<version>, models:/<name>/latest, models:/<name>@<alias> or a logged model id m-..."


class ModelNotFoundError(ExpectedFailure, LookupError):
    """No model answers to the name given (or none exists to default to); the message lists what exists."""


@dataclass(frozen=True)
class ModelChoice:
    """The model to load, and how it was chosen, in words for the person who asked."""

    model_uri: str
    described: str
    run_id: str | None = None
    registered: str | None = None

    def tags(self) -> dict[str, str]:
        """How a run that used this model records it."""
        values = {
            "cnn_train.model_uri": self.model_uri,
            "cnn_train.model_choice": self.described,
            "cnn_train.model_run_id": self.run_id,
            "cnn_train.registered_model": self.registered,
        }
        return {key: value for key, value in values.items() if value}


def as_model_uri(spec: str) -> str:
    """A logged model id (``m-...``) as its ``models:/`` URI; anything else as given."""
    return f"models:/{spec}" if re.fullmatch(r"m-[0-9a-f]+", spec) else spec


def locate(spec: str, *, experiment: str, uri: str | None = None) -> ModelChoice:
    """The model ``spec`` names (``runs:/<id>/<path>``, ``models:/<name>/<version>``,
    ``models:/<name>@<alias>``, ``models:/<model id>`` or ``m-...``), checked to exist in store ``uri``;
    an alias is resolved to the version it names now. Other URIs (local folders...) are passed
    through for MLflow to load. A miss lists the registered models and ``experiment``'s recent runs."""
    mlflow_client = client(uri)
    model_uri = as_model_uri(spec)
    try:
        found = _find(mlflow_client, model_uri)
    except MlflowException as error:
        if error.error_code not in MISSING_CODES:
            raise
        found = f"no model at {model_uri}"
    if isinstance(found, str):
        models = all_registered_models(mlflow_client)
        names = [model.name for model in models]
        if (typed := _typed_name(model_uri)) and typed not in names:
            found += f"; {unknown_name(typed, names)}"
        raise ModelNotFoundError(f"{found}; {what_exists(mlflow_client, experiment, models)}")
    return found


def _typed_name(model_uri: str) -> str | None:
    """The registered model's name in ``models:/<name>@<alias>``, ``/<version>``, ``/latest``, or a bare name."""
    if match := re.fullmatch(r"models:/([^/@]+)(?:@.+|/\d+|/latest)?", model_uri):
        return None if re.fullmatch(r"m-[0-9a-f]+", match.group(1)) else match.group(1)
    return model_uri if re.fullmatch(r"[\w.-]+", model_uri) and not model_uri.startswith("m-") else None


def _find(mlflow_client: MlflowClient, model_uri: str) -> ModelChoice | str:
    """What ``model_uri`` names in the store, or why it names nothing."""
    as_given = f"{model_uri} (as given)"
    if match := re.fullmatch(r"runs:/([^/]+)/(.+)", model_uri):
        run = mlflow_client.get_run(match.group(1))
        if run.info.status != "FINISHED" and not run.outputs.model_outputs:
            # A training logs its model at its end: a failed, killed or running one has none to load.
            ended = "is still running" if run.info.status == "RUNNING" else f"ended {run.info.status}"
            return f"run {run.info.run_id} ({run.info.run_name}) {ended} and has logged no model"
        return ModelChoice(model_uri, as_given, run_id=run.info.run_id)
    if match := re.fullmatch(r"models:/(m-[0-9a-f]+)", model_uri):
        return ModelChoice(model_uri, as_given, run_id=mlflow_client.get_logged_model(match.group(1)).source_run_id)
    if match := re.fullmatch(r"models:/([^/@]+)@(.+)", model_uri):
        version = version_by_alias(mlflow_client, *match.groups())
        if version is None:
            return f"no model version answers to {model_uri}"
    elif match := re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri):
        version = mlflow_client.get_model_version(*match.groups())
    elif match := re.fullmatch(r"models:/([^/@]+)/latest", model_uri):  # as MLflow reads it: the newest version
        versions = mlflow_client.search_model_versions(f"name = '{match.group(1)}'") if "'" not in match.group(1) else []
        if not versions:
            return f"no version of a registered model {match.group(1)!r} to be the latest"
        version = max(versions, key=lambda v: int(v.version))
    elif (match := re.fullmatch(r"models:/([^/@]+)", model_uri)) and _registered(mlflow_client, match.group(1)):
        return _whole_registered_model(match.group(1))
    elif model_uri.startswith(("runs:", "models:")):
        return f"{model_uri} is not a model URI cnn-train understands: use {_URI_FORMS}"
    elif (folder := local_folder(model_uri)) is None and ":" not in model_uri:
        # No scheme and no folder: most likely a registered model's name, typed as `cnn-train models` shows it.
        if _registered(mlflow_client, model_uri):
            return _whole_registered_model(model_uri)
        if model_uri.startswith("m-"):
            return f"no logged model has the id {model_uri} (an id is m- and 32 hex digits), and no such folder"
        return f"no model at {model_uri}: no such folder, and not a model URI ({_URI_FORMS})"
    elif folder is not None and not (folder / MLMODEL).is_file():
        return _not_a_model_folder(model_uri, folder)
    else:
        return ModelChoice(model_uri, as_given)
    return ModelChoice(
        model_uri, f"{model_uri} (version {version.version}, as given)", run_id=version.run_id,
        registered=f"{version.name}/{version.version}",
    )


def elsewhere(model_uri: str) -> bool:
    """A URI of another scheme than a folder's, the store's or a file's (s3:, http:, dbfs:, mlflow-artifacts:...)."""
    return bool(re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", model_uri)) and not model_uri.startswith(("runs:", "models:", "file:"))


def local_folder(model_uri: str) -> Path | None:
    """The folder on this machine ``model_uri`` names (a path, or a ``file:`` URI), else None."""
    if model_uri.startswith("file:"):
        path = Path(urlparse(model_uri).path)
    elif elsewhere(model_uri):
        return None
    else:
        path = Path(model_uri).expanduser()
    return path if path.exists() else None


def _not_a_model_folder(model_uri: str, path: Path) -> str:
    # Said before MLflow is asked: it copies the whole folder first, only then looks for MLmodel.
    if path.name == MLMODEL:
        return f"{model_uri} is a model's {MLMODEL} file: give its folder, {path.parent}"
    if not path.is_dir():
        return f"{model_uri} is a file, not a model folder (a folder with an {MLMODEL} file)"
    inside = sorted(f"{model_uri.rstrip('/')}/{child.name}" for child in _subfolders(path) if (child / MLMODEL).is_file())
    if inside:
        return f"{model_uri} is not a model folder itself (no {MLMODEL} file); the one(s) inside: {', '.join(inside)}"
    return f"{model_uri} is not a model folder: it has no {MLMODEL} file"


def _subfolders(path: Path) -> list[Path]:
    try:
        return [child for child in path.iterdir() if child.is_dir()]
    except OSError:  # unreadable: say only that it is no model
        return []


def _whole_registered_model(name: str) -> str:
    return f"{name} is a registered model, not one version of it: give models:/{name}@<alias>, models:/{name}/<version> or models:/{name}/latest"


def _registered(mlflow_client: MlflowClient, name: str) -> bool:
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code not in MISSING_CODES:
            raise
        return False
    return True


def default_model(*, experiment: str, uri: str | None = None) -> ModelChoice:
    """The experiment's registered ``champion`` with the best test accuracy when there is one, else
    its latest finished training run's model."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        raise ModelNotFoundError(
            f"no experiment {experiment!r} in {mlflow_client.tracking_uri}, so no model to default to; "
            f"train one with `cnn-train run --register NAME`, or pass --model{_trained_elsewhere(mlflow_client, experiment)}"
        )
    champion = _best_champion(mlflow_client, found.experiment_id)
    if champion is not None:
        return champion
    run = _latest_training_run(mlflow_client, found.experiment_id)
    if run is None:
        # A search's or comparison's models are there, but none is the default: name the newest.
        inner = _finished_training_runs(mlflow_client, [found.experiment_id], 1, plain=False)
        newest = f"; the newest model of its searches and comparisons is {_described(inner[0])}" if inner else ""
        raise ModelNotFoundError(
            f"experiment {experiment!r} has no registered champion and no finished training run of its own with a "
            f"model; train one with `cnn-train run`, or pass --model{newest or _trained_elsewhere(mlflow_client, experiment)}"
        )
    return ModelChoice(
        _run_model_uri(mlflow_client, run),
        f"the latest finished run of experiment {experiment!r} ({run.info.run_name}, {_accuracy(run)}), "
        "since no registered model of it holds the alias champion",
        run_id=run.info.run_id,
    )


def _trained_elsewhere(mlflow_client: MlflowClient, experiment: str) -> str:
    """``"; the latest model trained in another experiment: runs:/..."`` when one exists (a user who trained
    with --experiment), else nothing."""
    others = {e.experiment_id: e.name for e in mlflow_client.search_experiments() if e.name != experiment}
    runs = _finished_training_runs(mlflow_client, list(others), 1) if others else []
    if not runs:
        return ""
    latest = runs[0]
    return (
        f"; the latest model trained in another experiment is runs:/{latest.info.run_id}/model (experiment "
        f"{others[latest.info.experiment_id]!r}, {latest.info.run_name}, {_accuracy(latest)})"
    )


def _described(run: Run, parent: str | None = None) -> str:
    """A run's model as a line names it: its URI, the run's name (in its ``parent`` run) and test accuracy."""
    name = run.info.run_name if parent is None else f"{run.info.run_name} of {parent}"
    return f"runs:/{run.info.run_id}/model ({name}, {_accuracy(run)})"


def _accuracy(run: Run) -> str:
    value = run.data.metrics.get("test_accuracy")
    return "test accuracy n/a" if value is None else f"test accuracy {value * 100:.2f}%"


def _best_champion(mlflow_client: MlflowClient, experiment_id: str) -> ModelChoice | None:
    """The best champion among registered models trained in the experiment: one with a test accuracy
    before one without, then the surest score, as the registry ranks versions across test sets (the
    lower end of the accuracy's 95% interval on its count of test images)."""
    ranked: list[tuple[tuple[bool, float], str, ModelVersion, str]] = []
    for registered in all_registered_models(mlflow_client):
        version = registered.aliases.get(CHAMPION) and version_by_alias(mlflow_client, registered.name, CHAMPION)
        run = version and version.run_id and _run_in_experiment(mlflow_client, version.run_id, experiment_id)
        if not run:
            continue
        accuracy, images = float(version.tags.get(ACCURACY_TAG, "nan")), test_images_of(version, run)
        scored = "test accuracy n/a" if math.isnan(accuracy) else f"test accuracy {accuracy * 100:.2f}%" + (
            "" if math.isinf(images) else f" on {images:,.0f} test images"
        )
        surest = -math.inf if math.isnan(accuracy) else surest_accuracy(accuracy, images)
        ranked.append(((not math.isnan(accuracy), surest), registered.name, version, scored))
    if not ranked:
        return None
    ranked.sort(key=lambda candidate: candidate[0], reverse=True)  # stable: the first listed wins a tie
    _, name, version, scored = ranked[0]
    why = "the experiment's registered champion" if len(ranked) == 1 else (
        f"the surest of the experiment's {len(ranked)} registered champions (the highest lower end of a 95% interval "
        f"around each test accuracy; next: models:/{ranked[1][1]}@{CHAMPION}, version {ranked[1][2].version}, "
        f"{ranked[1][3]}; --model picks another)"
    )
    return ModelChoice(
        f"models:/{name}@{CHAMPION}",
        f"models:/{name}@{CHAMPION} (version {version.version}, {scored}), {why}",
        run_id=version.run_id,
        registered=f"{name}/{version.version}",
    )


def _run_in_experiment(mlflow_client: MlflowClient, run_id: str, experiment_id: str) -> Run | None:
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        return None  # the run was deleted; its registered version has no experiment to belong to
    return run if run.info.experiment_id == experiment_id else None


def _finished_training_runs(mlflow_client: MlflowClient, experiment_ids: list[str], limit: int, *, plain: bool = True) -> list[Run]:
    """The newest finished plain training runs with a model, across ``experiment_ids``; with ``plain=False``,
    any run with a model (a trial's, a compared backend's). Plain runs are told apart in the search itself
    and its pages are read on until ``limit`` are found: filtered afterwards in one page of 200, a study of
    200 trials hid every plain run older than it."""
    where = "attributes.status = 'FINISHED'" + "".join(
        f" and tags.`{tag}` IS NULL" for tag in (_NOT_A_DEFAULT_RUN if plain else ())
    )
    found: list[Run] = []
    page_token = None
    for _ in range(_SEARCH_PAGES):
        page = mlflow_client.search_runs(
            experiment_ids, where, order_by=["attributes.start_time DESC"], max_results=_SEARCH_PAGE, page_token=page_token
        )
        found += [run for run in page if run.outputs and run.outputs.model_outputs]
        page_token = page.token
        if len(found) >= limit or not page_token:
            break
    return found[:limit]


def _latest_training_run(mlflow_client: MlflowClient, experiment_id: str) -> Run | None:
    runs = _finished_training_runs(mlflow_client, [experiment_id], 1)
    return runs[0] if runs else None


def _run_model_uri(mlflow_client: MlflowClient, run: Run) -> str:
    """``models:/<id>`` of the run's logged model named ``model`` (its only one, for a training run)."""
    ids = [output.model_id for output in run.outputs.model_outputs]
    for model_id in ids:
        if mlflow_client.get_logged_model(model_id).name == "model":
            return f"models:/{model_id}"
    return f"models:/{ids[0]}"


def what_exists(mlflow_client: MlflowClient, experiment: str, models: list[RegisteredModel] | None = None) -> str:
    """One line: the registered models (``models``, else all) with their aliases, the first
    :data:`_LISTED_MODELS` of them by name, and the experiment's recent training runs."""
    models = all_registered_models(mlflow_client) if models is None else models
    registered = [
        f"{model.name} ({', '.join(f'@{alias}=v{version}' for alias, version in sorted(model.aliases.items())) or 'no aliases'})"
        for model in models[:_LISTED_MODELS]
    ]
    if len(models) > _LISTED_MODELS:
        registered.append(f"and {len(models) - _LISTED_MODELS} more (`cnn-train models` lists them all)")
    found = mlflow_client.get_experiment_by_name(experiment)
    runs = _finished_training_runs(mlflow_client, [found.experiment_id], _RECENT_RUNS, plain=False) if found else []
    parents: dict[str, str] = {}
    recent = [_described(run, _parent_name(mlflow_client, run, parents)) for run in runs]
    return (
        f"registered models: {'; '.join(registered) or 'none'}; "
        f"recent finished runs with a model in {experiment!r}: {'; '.join(recent) or 'none'}"
    )


def _parent_name(mlflow_client: MlflowClient, run: Run, known: dict[str, str]) -> str | None:
    """The name of the search or comparison a trial's or compared backend's run belongs to (looked up once)."""
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if parent_id and parent_id not in known:
        try:
            known[parent_id] = mlflow_client.get_run(parent_id).info.run_name
        except MlflowException:
            known[parent_id] = parent_id
    return known.get(parent_id) if parent_id else None
