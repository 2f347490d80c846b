"""The model registry with aliases: a registered version carries what it was trained and tested on,
and the alias ``champion`` stays on the version with the best test accuracy.

A new version becomes ``champion`` when its test accuracy beats the current champion's on the same
test set (the same test-set digest). Across test sets the two scores are samples of different sizes,
so the surer score wins: the one whose 95% confidence interval starts higher (:func:`surest_accuracy`).
Otherwise the version becomes ``challenger``, and the :class:`Registration` says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run, RunTag
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from cnn_train.flows.errors import did_you_mean
from cnn_train.flows.tracking import models
from cnn_train.flows.tracking.models import OUTPUT_NAME
from cnn_train.flows.tracking.uri import client
from cnn_train.plugins.config import FASHION_MNIST_CLASSES

CHAMPION = "champion"
CHALLENGER = "challenger"
#: Version tags the alias decision reads.
ACCURACY_TAG = "test_accuracy"
TEST_SET_TAG = "test_set_digest"
#: How many test images the version was scored on (versions registered before it have none).
TEST_IMAGES_TAG = "test_images"


@dataclass(frozen=True)
class VersionFacts:
    """What a registered version was trained and tested on, and where its runs are; kept as version tags."""

    test_accuracy: float
    backend: str
    architecture: str
    dataset_digest: str
    test_set_digest: str
    mlflow_run_id: str
    test_images: int | None = None
    mlflow_run_url: str | None = None
    prefect_flow_run_id: str | None = None
    prefect_flow_run_url: str | None = None

    def tags(self) -> dict[str, str]:
        values = {
            ACCURACY_TAG: repr(float(self.test_accuracy)),
            "backend": self.backend,
            "architecture": self.architecture,
            "dataset_digest": self.dataset_digest,
            TEST_SET_TAG: self.test_set_digest,
            TEST_IMAGES_TAG: str(self.test_images) if self.test_images else None,
            "mlflow_run_id": self.mlflow_run_id,
            "mlflow_run_url": self.mlflow_run_url,
            "prefect_flow_run_id": self.prefect_flow_run_id,
            "prefect_flow_run_url": self.prefect_flow_run_url,
        }
        return {key: value for key, value in values.items() if value}


@dataclass(frozen=True)
class Registration:
    """A new version of ``name``, the alias it got, and why."""

    name: str
    version: int
    alias: str
    reason: str
    #: False when the model was registered already (a search run again, a registration delivered twice).
    new: bool = True

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"

    def line(self) -> str:
        """``registered fashion-cnn version 3 as champion: its test accuracy ... beats ...``."""
        if not self.new:
            return f"{self.name} version {self.version} holds this model already ({self.reason}); no new version registered"
        return f"registered {self.name} version {self.version} as {self.alias}: {self.reason}"


def _percent(value: float) -> str:
    return f"{value * 100:.2f}%"


def decide_alias(facts: VersionFacts, champion: ModelVersion | None, their_images: int | None = None) -> tuple[str, str]:
    """``champion`` or ``challenger`` for a new version with ``facts``, against the current champion (scored
    on ``their_images``, by default its tag's count: :func:`test_images_of` finds it for older versions), and why."""
    if champion is None:
        return CHAMPION, "there was no champion yet"
    held = f"champion version {champion.version}"
    stays = f"; {held} stays champion"
    their_test_set = champion.tags.get(TEST_SET_TAG)
    their_accuracy = champion.tags.get(ACCURACY_TAG)
    if their_test_set is None or their_accuracy is None:
        return CHALLENGER, (
            f"{held} has no {TEST_SET_TAG}/{ACCURACY_TAG} tags (registered without them), so the two cannot be "
            f"compared{stays}; move the alias by hand with MlflowClient.set_registered_model_alias if this one is better"
        )
    mine, theirs = _percent(facts.test_accuracy), _percent(float(their_accuracy))
    if their_test_set != facts.test_set_digest:
        if their_images is None:
            their_images = _count(champion.tags.get(TEST_IMAGES_TAG))
        if not (facts.test_images and their_images):
            return CHALLENGER, (
                f"{held} was tested on another test set (digest {their_test_set}, this one {facts.test_set_digest}) "
                f"and one of the two scores does not say on how many images (tag {TEST_IMAGES_TAG}), so the "
                f"accuracies are not comparable{stays}; move the alias by hand with "
                "MlflowClient.set_registered_model_alias if this one is better"
            )
        # A smoke run's 58% on 100 images must not hold the alias against 91% on 10,000, nor a full run's
        # 68% take it from 79% on 200: the lower ends of the two 95% intervals rank both ways right.
        my_floor = surest_accuracy(facts.test_accuracy, facts.test_images)
        their_floor = surest_accuracy(float(their_accuracy), their_images)
        scores = (
            f"{mine} on {facts.test_images:,} test images, 95% interval from {_percent(my_floor)}, against {held}'s "
            f"{theirs} on {their_images:,}, from {_percent(their_floor)}"
        )
        if my_floor > their_floor:
            return CHAMPION, f"on another test set than {held}'s, its score is the surer: {scores}"
        return CHALLENGER, f"on another test set than {held}'s, its score is not the surer: {scores}{stays}"
    if facts.test_accuracy > float(their_accuracy):
        return CHAMPION, f"its test accuracy {mine} beats {held}'s {theirs} on the same test set"
    return CHALLENGER, f"its test accuracy {mine} does not beat {held}'s {theirs} on the same test set{stays}"


#: Registered models read per search page (MLflow's default page; it gives no more than 1,000).
_MODELS_PAGE = 100


def all_registered_models(mlflow_client: MlflowClient) -> list[RegisteredModel]:
    """Every registered model, by name, through all of the search's pages (one page stopped at 100)."""
    found: list[RegisteredModel] = []
    page_token = None
    while True:
        page = mlflow_client.search_registered_models(max_results=_MODELS_PAGE, order_by=["name ASC"], page_token=page_token)
        found += page
        page_token = page.token
        if not page_token:
            return found


def surest_accuracy(accuracy: float, images: float) -> float:
    """The accuracy a model surely has, from ``accuracy`` on ``images`` test images: the lower end of its
    95% Wilson interval (``accuracy`` itself when the count is unknown: ``images`` infinite or not positive)."""
    if not math.isfinite(images) or images < 1:
        return accuracy
    from scipy.stats import binomtest  # ~0.8 s of imports, paid only when a registration or choice needs it

    trials = int(images)
    right = min(trials, max(0, round(accuracy * trials)))
    return float(binomtest(right, trials).proportion_ci(confidence_level=0.95, method="wilson").low)


def test_images_of(version: ModelVersion, run: Run | None) -> float:
    """How many test images ``version`` was scored on: its ``test_images`` tag, else its training run's
    ``data.test`` (every cnn-train training run logs its split's sizes; versions registered before the tag
    have only that), else the run's ``test_limit``; infinity when none says (all of an unknown test set)."""
    params = run.data.params if run is not None else {}
    for value in (version.tags.get(TEST_IMAGES_TAG), params.get("data.test"), params.get("test_limit")):
        if (count := _count(value)) > 0:
            return float(count)
    return math.inf


def version_test_images(mlflow_client: MlflowClient, version: ModelVersion) -> int:
    """How many test images ``version`` was scored on: its tag, else (registered before it) what its run
    logged (:func:`test_images_of`), the run read only then; 0 when nobody says."""
    if count := _count(version.tags.get(TEST_IMAGES_TAG)):
        return count
    found = test_images_of(version, _run_of(mlflow_client, version))
    return int(found) if math.isfinite(found) else 0


def _run_of(mlflow_client: MlflowClient, version: ModelVersion) -> Run | None:
    """The run ``version`` was registered from, or None (none recorded, or the run was deleted)."""
    try:
        return mlflow_client.get_run(version.run_id) if version.run_id else None
    except MlflowException:
        return None


def _count(tag: str | None) -> int:
    """A count tag's value; 0 when absent or not a whole number (set by hand)."""
    try:
        return int(tag or 0)
    except ValueError:
        return 0


def version_by_alias(mlflow_client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version of ``name`` holding ``alias``, or None when no version does (or no such model)."""
    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def model_description(name: str) -> str:
    """What a registered model's page says about it: its aliases' rule, and how to load and call a version."""
    return (
        f"Fashion-MNIST classifiers registered by cnn-train. `@{CHAMPION}` is the version with the best test accuracy "
        f"on the same test set (tag `{TEST_SET_TAG}`), or, across test sets, the surer score: the one whose 95% "
        f"interval, from its accuracy on its count of test images (tag `{TEST_IMAGES_TAG}`), starts higher; "
        f"`@{CHALLENGER}` is the newest version that did not take its place.\n\n"
        f"Load one with `mlflow.pyfunc.load_model(\"models:/{name}@{CHAMPION}\")`. It takes float32 images "
        f"`(n, 28, 28, 1)` in [0, 1] (a light garment on black, as Fashion-MNIST's) and gives ten probabilities per image "
        f"(`{OUTPUT_NAME}`), in the order {', '.join(FASHION_MNIST_CLASSES)}; `cnn-train predict` brings any picture to that input."
    )


def register_version(
    name: str, model_uri: str, *, facts: VersionFacts, description: str, uri: str | None = None
) -> Registration:
    """Register ``model_uri`` as a new version of ``name`` with ``facts`` as tags, and give it
    ``champion`` when it beats the current champion on the same test set, else ``challenger``. A model
    that ``name`` holds already is not registered again: its version is returned, ``new`` False."""
    mlflow_client = client(uri)
    if (held := _version_holding(mlflow_client, name, model_uri)) is not None:
        return held
    version = models.register_model(
        name, model_uri, run_id=facts.mlflow_run_id, description=description, uri=mlflow_client.tracking_uri,
        tags=facts.tags(), model_description=model_description(name),
    )
    champion = version_by_alias(mlflow_client, name, CHAMPION)
    alias, reason = decide_alias(facts, champion, version_test_images(mlflow_client, champion) if champion is not None else None)
    mlflow_client.set_registered_model_alias(name, alias, str(version))
    return Registration(name, version, alias, reason)


def _version_holding(mlflow_client: MlflowClient, name: str, model_uri: str) -> Registration | None:
    """The version of ``name`` registered from ``model_uri`` already, if any, with the alias it holds now."""
    try:
        held = [v for v in mlflow_client.search_model_versions(f"name = '{name}'") if v.source == model_uri]
        aliases = mlflow_client.get_registered_model(name).aliases if held else {}
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if not held:
        return None
    number = min(int(v.version) for v in held)
    alias = next((alias for alias, version in sorted(aliases.items()) if int(version) == number), "")
    return Registration(name, number, alias, f"{alias} now" if alias else "no alias now", new=False)


_MODEL_TAG, _ALIAS_TAG, _REASON_TAG = "cnn_train.registered_model", "cnn_train.registered_alias", "cnn_train.registered_reason"


def registration_tags(registration: Registration) -> dict[str, str]:
    """How the run a version came from (or the search that chose it) records its registration."""
    return {
        _MODEL_TAG: f"{registration.name}/{registration.version}",
        _ALIAS_TAG: registration.alias,
        _REASON_TAG: registration.reason,
    }


def registration_line(tags: Mapping[str, str]) -> str | None:
    """What :func:`registration_tags` recorded on a run, as one line; None for a run that registered nothing."""
    if not (registered := tags.get(_MODEL_TAG)):
        return None
    name, _, version = registered.rpartition("/")
    alias = f" ({tags[_ALIAS_TAG]})" if tags.get(_ALIAS_TAG) else ""
    return f"model registry: {name} version {version}{alias}: {tags.get(_REASON_TAG, '')}".rstrip(": ")


def register_delivered(request: dict[str, Any], model_uri: str, uri: str) -> Registration:
    """A registration a run's spool kept while MLflow did not answer (:meth:`RunTracker.register_later`),
    made as the spool delivers it, after the model: the same rule, the same tags on ``record_on``."""
    facts = VersionFacts(**request["facts"])
    registration = register_version(request["name"], model_uri, facts=facts, description=request["description"], uri=uri)
    tags = [RunTag(key, value) for key, value in registration_tags(registration).items()]
    client(uri).log_batch(request["record_on"], tags=tags)
    return registration


def _all_model_versions(mlflow_client: MlflowClient) -> list[ModelVersion]:
    """Every version of every registered model, through all of the search's pages. One search, not one per
    model: a filter on a name holding a quote (``it's``) is refused, and MLflow's filters take no escape."""
    found: list[ModelVersion] = []
    page_token = None
    while True:
        page = mlflow_client.search_model_versions(page_token=page_token)
        found += page
        page_token = page.token
        if not page_token:
            return found


def unknown_name(typed: str, known: Sequence[str]) -> str:
    """``no registered model is named 'fashion-cn' (did you mean fashion-cnn?)``."""
    return f"no registered model is named {typed!r}{did_you_mean(typed, known)}"


#: Registered models a miss names, at most.
_LISTED_NAMES = 10
#: Columns of :func:`registered_versions`, in order.
VERSION_COLUMNS = ("model", "version", "aliases", "test_accuracy", "test_images", "backend", "architecture", "run_id", "created")


class UnknownModelNameError(LookupError):
    """Names asked for that no registered model has; the message lists the close ones and what exists."""


def registered_versions(uri: str | None = None, names: Sequence[str] = ()) -> pd.DataFrame:
    """Every version of every registered model (only those of ``names`` when given), newest first per
    model, with aliases and accuracy. A name no model has raises :class:`UnknownModelNameError`."""
    mlflow_client = client(uri)
    registered_models = all_registered_models(mlflow_client)
    known = [registered.name for registered in registered_models]
    if missing := [name for name in dict.fromkeys(names) if name not in known]:
        listed = ", ".join(known[:_LISTED_NAMES]) + (f" and {len(known) - _LISTED_NAMES} more" if len(known) > _LISTED_NAMES else "")
        raise UnknownModelNameError(
            "; ".join(unknown_name(name, known) for name in missing)
            + (f"; registered: {listed}" if known else "; none is registered yet")
        )
    by_name: dict[str, list[ModelVersion]] = {}
    for version in _all_model_versions(mlflow_client):
        by_name.setdefault(version.name, []).append(version)
    rows = []
    for registered in registered_models:
        if names and registered.name not in names:
            continue
        # The registered model knows its aliases; versions from a search come without them (SQLite store).
        aliases: dict[int, list[str]] = {}
        for alias, number in sorted(registered.aliases.items()):
            aliases.setdefault(int(number), []).append(alias)
        for version in sorted(by_name.get(registered.name, []), key=lambda v: int(v.version), reverse=True):
            accuracy = version.tags.get(ACCURACY_TAG)
            rows.append({
                "model": registered.name,
                "version": int(version.version),
                "aliases": ", ".join(aliases.get(int(version.version), [])),
                "test_accuracy": float(accuracy) if accuracy is not None else None,
                "test_images": version_test_images(mlflow_client, version) or None,
                "backend": version.tags.get("backend", ""),
                "architecture": version.tags.get("architecture", ""),
                "run_id": version.run_id or "",
                "created": pd.Timestamp(version.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M"),
            })
    return pd.DataFrame(rows, columns=list(VERSION_COLUMNS))
