"""The model registry's aliases and the default model, against a real SQLite store: a version becomes
champion by beating the champion on the same test set, or across test sets with the surer score; `cnn-train models` lists them; a
prediction defaults to the best champion, else the latest finished training run; a name that matches
nothing lists what exists."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np
import pytest
from typer.testing import CliRunner

from cnn_train.flows import tracking
from cnn_train.flows.tracking import CHALLENGER, CHAMPION, ModelRecord, RunTracker, VersionFacts
from cnn_train.flows.tracking.registry import decide_alias
from tests.stores import new_store, uniform_model

if TYPE_CHECKING:  # what pytest.param returns; pytest does not export its class
    from _pytest.mark import ParameterSet


def _facts(accuracy: float, test_set: str = "testset-a", run_id: str = "r", images: int | None = None) -> VersionFacts:
    return VersionFacts(
        test_accuracy=accuracy, backend="torch", architecture="cnn", dataset_digest="split-1",
        test_set_digest=test_set, mlflow_run_id=run_id, test_images=images,
    )


def _champion(accuracy: str | None, test_set: str | None, version: str = "4", images: str | None = None) -> SimpleNamespace:
    tags = {"test_accuracy": accuracy, "test_set_digest": test_set, "test_images": images}
    return SimpleNamespace(version=version, tags={key: value for key, value in tags.items() if value})


def _does_not_beat(accuracy: float, shown: str, *, case_id: str) -> ParameterSet:
    """The case of a version whose ``accuracy`` (``shown`` as the reason prints it) does not beat
    champion version 4's 90% on the same test set: it becomes challenger, the champion stays."""
    return pytest.param(
        _champion("0.9", "testset-a"), _facts(accuracy), CHALLENGER,
        f"its test accuracy {shown} does not beat champion version 4's 90.00% on the same test set; "
        "champion version 4 stays champion", id=case_id,
    )


def _not_comparable(their_images: str | None, my_images: int | None, *, case_id: str) -> ParameterSet:
    """The case of a version scored at 99% on another test set than champion version 4's 70%, one of the two
    scores without its count of test images: it becomes challenger, the champion stays."""
    return pytest.param(
        _champion("0.7", "testset-b", images=their_images), _facts(0.99, images=my_images), CHALLENGER,
        "champion version 4 was tested on another test set (digest testset-b, this one testset-a) and one of the two "
        "scores does not say on how many images (tag test_images), so the accuracies are not comparable; "
        "champion version 4 stays champion; move the alias by hand with MlflowClient.set_registered_model_alias "
        "if this one is better", id=case_id,
    )


def _across_test_sets(mine: tuple[float, int, str], theirs: tuple[str, str, str], alias: str, *, case_id: str) -> ParameterSet:
    """The case of a version scored ``mine`` (accuracy, images, the lower end of its 95% interval) on another
    test set than champion version 4's ``theirs`` (its tags, and that lower end): the surer score, the
    higher lower end, takes or keeps the alias."""
    verdict = "its score is the surer" if alias == CHAMPION else "its score is not the surer"
    stays = "" if alias == CHAMPION else "; champion version 4 stays champion"
    scores = (
        f"{mine[0] * 100:.2f}% on {mine[1]:,} test images, 95% interval from {mine[2]}, against champion version 4's "
        f"{float(theirs[0]) * 100:.2f}% on {int(theirs[1]):,}, from {theirs[2]}"
    )
    return pytest.param(
        _champion(theirs[0], "testset-b", images=theirs[1]), _facts(mine[0], images=mine[1]), alias,
        f"on another test set than champion version 4's, {verdict}: {scores}{stays}", id=case_id,
    )


@pytest.mark.parametrize(
    ("champion", "facts", "alias", "reason"),
    [
        pytest.param(None, _facts(0.5), CHAMPION, "there was no champion yet", id="first-version"),
        pytest.param(
            _champion("0.9", "testset-a"), _facts(0.91), CHAMPION,
            "its test accuracy 91.00% beats champion version 4's 90.00% on the same test set", id="better",
        ),
        _does_not_beat(0.89, "89.00%", case_id="worse"),
        _does_not_beat(0.9, "90.00%", case_id="equal"),
        _not_comparable(None, None, case_id="other-test-set-no-counts"),
        _not_comparable("10000", None, case_id="no-count-of-mine"),
        _not_comparable("by hand", 500, case_id="a-count-set-by-hand"),
        _across_test_sets((0.9167, 10_000, "91.11%"), ("0.58", "100", "48.21%"), CHAMPION, case_id="a-full-run-over-a-smoke-run"),
        _across_test_sets((0.679, 1_000, "64.94%"), ("0.79", "200", "72.84%"), CHALLENGER, case_id="more-images-but-surely-worse"),
        _across_test_sets((0.95, 2_000, "93.96%"), ("0.9", "10000", "89.40%"), CHAMPION, case_id="fewer-images-but-surely-better"),
        _across_test_sets((0.91, 10_000, "90.42%"), ("0.9", "10000", "89.40%"), CHAMPION, case_id="as-many-images"),
        pytest.param(
            _champion(None, None), _facts(0.99), CHALLENGER,
            "champion version 4 has no test_set_digest/test_accuracy tags (registered without them), so the two "
            "cannot be compared; champion version 4 stays champion; move the alias by hand with "
            "MlflowClient.set_registered_model_alias if this one is better", id="untagged-champion",
        ),
    ],
)
def test_the_alias_and_why(champion, facts, alias, reason):
    assert decide_alias(facts, champion) == (alias, reason)


# --- against a store ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return new_store(tmp_path_factory.mktemp("registry") / "mlflow.db")


def _trained_run(store: str, experiment: str, *, accuracy: float, tags: dict[str, str] | None = None) -> tuple[RunTracker, str]:
    """A finished run in ``experiment`` with a logged model and a test accuracy, as a training run leaves it."""
    tracker = RunTracker.start(experiment, uri=store, run_name=f"run-{accuracy}", tags=tags)
    model_uri = tracker.log_model(
        uniform_model(), ModelRecord((28, 28, 1), 10, input_example=np.zeros((2, 28, 28, 1), dtype=np.float32))
    )
    tracker.log_metrics({"test_accuracy": accuracy})
    tracker.finish()
    return tracker, model_uri


@pytest.fixture(scope="module")
def two_runs(store) -> list[tuple[RunTracker, str]]:
    """A better (0.88) and a worse (0.84) training run of experiment `ranked`."""
    return [_trained_run(store, "ranked", accuracy=accuracy) for accuracy in (0.88, 0.84)]


def _register(store: str, name: str, run: tuple[RunTracker, str], accuracy: float, test_set: str = "testset-a",
              images: int | None = 10_000):
    tracker, model_uri = run
    facts = _facts(accuracy, test_set, tracker.run_id, images)
    return tracking.register_version(name, model_uri, facts=facts, description="test", uri=store)


@pytest.fixture(scope="module")
def better_then_worse(store, two_runs) -> list[tracking.Registration]:
    """The better run's model registered as `better-then-worse`, then the worse one's."""
    return [_register(store, "better-then-worse", run, accuracy) for run, accuracy in zip(two_runs, (0.88, 0.84))]


def _aliases(store: str, name: str) -> dict[str, str]:
    # The SQLite store gives versions as numbers here, a server as strings.
    return {alias: str(version) for alias, version in tracking.client(store).get_registered_model(name).aliases.items()}


def test_a_better_then_a_worse_model_leaves_champion_on_the_better(store, two_runs, better_then_worse):
    better, worse = better_then_worse
    assert (better.alias, worse.alias) == (CHAMPION, CHALLENGER)
    assert worse.line() == (
        "registered better-then-worse version 2 as challenger: its test accuracy 84.00% does not beat champion "
        "version 1's 88.00% on the same test set; champion version 1 stays champion"
    )
    client = tracking.client(store)
    assert _aliases(store, "better-then-worse") == {CHAMPION: "1", CHALLENGER: "2"}
    assert client.get_model_version_by_alias("better-then-worse", CHAMPION).run_id == two_runs[0][0].run_id
    # The logged model lists its versions, so its page in the MLflow UI links to the registry.
    better_model = client.get_logged_model(two_runs[0][1].removeprefix("models:/"))
    assert {"name": "better-then-worse", "version": "1"} in json.loads(better_model.tags["mlflow.modelVersions"])


def test_a_new_registered_model_says_how_to_load_it_and_a_users_own_description_stays(store, two_runs, better_then_worse):
    """The registry page of a model cnn-train created tells a reader the aliases' rule and how to call a version."""
    client = tracking.client(store)
    description = client.get_registered_model("better-then-worse").description
    assert description.startswith("Fashion-MNIST classifiers registered by cnn-train. `@champion` is the version")
    assert 'mlflow.pyfunc.load_model("models:/better-then-worse@champion")' in description
    assert "T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot" in description
    client.create_registered_model("teams-own", description="Ours: the shop's classifier.")
    _register(store, "teams-own", two_runs[0], 0.88)
    assert client.get_registered_model("teams-own").description == "Ours: the shop's classifier."


def test_a_worse_then_a_better_model_moves_champion_to_the_better(store, two_runs):
    worse = _register(store, "worse-then-better", two_runs[1], 0.84)
    better = _register(store, "worse-then-better", two_runs[0], 0.88)
    assert (worse.alias, better.alias) == (CHAMPION, CHAMPION)
    assert better.reason == "its test accuracy 88.00% beats champion version 1's 84.00% on the same test set"
    assert _aliases(store, "worse-then-better") == {CHAMPION: "2"}


def test_a_model_registered_again_is_no_new_version(store, two_runs):
    """A finished study run again with --register-best registered its best model a second time, as a
    challenger to itself (and a registration a spool delivered twice would have done the same)."""
    first = _register(store, "registered-twice", two_runs[0], 0.88)
    again = _register(store, "registered-twice", two_runs[0], 0.88)
    assert (again.version, again.alias, again.new) == (first.version, CHAMPION, False)
    assert again.line() == "registered-twice version 1 holds this model already (champion now); no new version registered"
    assert [int(v.version) for v in tracking.client(store).search_model_versions("name = 'registered-twice'")] == [1]
    other = _register(store, "registered-twice", two_runs[1], 0.84)  # another model still gets its version
    assert (other.version, other.alias, other.new) == (2, CHALLENGER, True)


def test_cnn_train_models_lists_versions_aliases_and_accuracies(store, better_then_worse):
    from cnn_train.flows.cli import app

    result = CliRunner().invoke(app, ["models"], env={"MLFLOW_TRACKING_URI": store})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("| better-then-worse |")]
    assert [row.split(" | ")[1:5] for row in rows] == [["2", "challenger", "84.00%", "10,000"], ["1", "champion", "88.00%", "10,000"]]
    assert all("| torch | cnn |" in row for row in rows)


def test_a_version_registered_before_the_count_tag_is_counted_from_its_run(store):
    """After an upgrade every new version became challenger: the old champion had no test_images tag, and
    its test set (an older split) matched no new one. Its run's data.test says how many images it had."""
    from cnn_train.flows.cli import app

    old_run = _trained_run(store, "upgraded", accuracy=0.78)
    old_run[0].log_params({"data.test": 1000, "test_limit": 1000})
    old_run[0].finish()
    _register(store, "upgraded-line", old_run, 0.78, test_set="older-split", images=None)
    new = _register(store, "upgraded-line", _trained_run(store, "upgraded", accuracy=0.8175), 0.8175, test_set="newer-split", images=2000)
    assert (new.version, new.alias) == (2, CHAMPION)
    assert new.reason == (
        "on another test set than champion version 1's, its score is the surer: 81.75% on 2,000 test images, 95% "
        "interval from 80.00%, against champion version 1's 78.00% on 1,000, from 75.33%"
    )
    listed = CliRunner().invoke(app, ["models", "upgraded-line"], env={"MLFLOW_TRACKING_URI": store})
    assert [line.split(" | ")[1:5] for line in listed.stdout.splitlines()[2:]] == [
        ["2", "champion", "81.75%", "2,000"], ["1", "", "78.00%", "1,000"]
    ]


@pytest.fixture(scope="module")
def quoted_model(store, tmp_path_factory) -> None:
    """A model registered by hand under a name with a quote, which MLflow's filters cannot hold (cnn-train's
    --register takes none)."""
    from mlflow import MlflowClient

    MlflowClient(store).create_registered_model("it's a model")
    MlflowClient(store).create_model_version("it's a model", str(tmp_path_factory.mktemp("by-hand")))


@pytest.mark.parametrize(
    ("names", "listed"),
    [
        pytest.param(["better-then-worse"], {"better-then-worse"}, id="one-model"),
        pytest.param(["it's a model", "better-then-worse"], {"it's a model", "better-then-worse"}, id="a-name-with-a-quote"),
    ],
)
def test_cnn_train_models_lists_only_the_models_named(store, better_then_worse, quoted_model, names, listed):
    from cnn_train.flows.cli import app

    result = CliRunner().invoke(app, ["models", *names], env={"MLFLOW_TRACKING_URI": store})
    assert result.exit_code == 0, result.output
    rows = [line.split(" | ") for line in result.stdout.splitlines()[2:]]
    assert {row[0].removeprefix("| ") for row in rows} == listed
    assert len(rows) == 2 + ("it's a model" in listed), "every version of each model named, no other"
    assert ("| it's a model | 1 |" in result.stdout) == ("it's a model" in listed)


def test_cnn_train_models_refuses_a_name_no_model_has(store, better_then_worse):
    from cnn_train.flows.cli import app

    result = CliRunner().invoke(app, ["models", "better-then-wors", "nothing-like-it"], env={"MLFLOW_TRACKING_URI": store})
    assert result.exit_code == 2 and result.stdout == ""
    line = result.stderr.strip()
    assert line.startswith(
        "cnn-train: no registered model is named 'better-then-wors' (did you mean better-then-worse?); "
        "no registered model is named 'nothing-like-it'; registered: "
    ), line
    assert "\n" not in line and "better-then-worse" in line.rpartition("registered: ")[2]


def test_a_version_the_server_already_listed_on_its_logged_model_is_not_listed_twice(store):
    """An MLflow server lists a new version on its logged model itself (version as a number); the entry
    cnn-train adds for a SQLite store made the model page show each version twice."""
    from mlflow import MlflowClient

    run = _trained_run(store, "listed", accuracy=0.7)
    model_id = run[1].removeprefix("models:/")
    MlflowClient(store).set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps([{"name": "listed-line", "version": 1}])})
    _register(store, "listed-line", run, 0.7)
    listed = json.loads(MlflowClient(store).get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert listed == [{"name": "listed-line", "version": 1}]


# --- the model a prediction uses ----------------------------------------------------------------------


def test_without_a_champion_the_default_is_the_latest_finished_training_run(store):
    _trained_run(store, "runs-only", accuracy=0.80)
    latest, model_uri = _trained_run(store, "runs-only", accuracy=0.70)
    _trained_run(store, "runs-only", accuracy=0.99, tags={"cnn_train.role": "sweep-trial"})
    choice = tracking.default_model(uri=store, experiment="runs-only")
    assert choice.model_uri == model_uri and choice.run_id == latest.run_id
    assert choice.described == (
        "the latest finished run of experiment 'runs-only' (run-0.7, test accuracy 70.00%), "
        "since no registered model of it holds the alias champion"
    )


def _finished_runs(store: str, experiment: str, count: int, tags: dict[str, str] | None = None) -> None:
    """``count`` finished runs without a model, newer than any before (start times one millisecond apart)."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    start = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0].info.start_time
    for offset in range(1, count + 1):
        run = client.create_run(experiment_id, start_time=start + offset, tags=tags or {})
        client.set_terminated(run.info.run_id, end_time=start + offset)


def test_the_latest_training_run_is_found_under_a_study_of_more_than_200_trials(store):
    """Filtered after one search page of 200, a 210-trial sweep hid the plain run older than it."""
    latest, model_uri = _trained_run(store, "buried", accuracy=0.54)
    _finished_runs(store, "buried", 201, tags={"cnn_train.role": "sweep-trial"})
    choice = tracking.default_model(uri=store, experiment="buried")
    assert (choice.model_uri, choice.run_id) == (model_uri, latest.run_id)


def test_the_search_for_a_run_with_a_model_reads_on_past_a_page(store, monkeypatch):
    """Plain runs without a model (stopped before it was logged) fill the first pages."""
    from cnn_train.flows.tracking import lookup

    monkeypatch.setattr(lookup, "_SEARCH_PAGE", 4)
    latest, model_uri = _trained_run(store, "paged", accuracy=0.61)
    _finished_runs(store, "paged", 9)
    assert tracking.default_model(uri=store, experiment="paged").run_id == latest.run_id
    monkeypatch.setattr(lookup, "_SEARCH_PAGES", 2)  # 8 runs read at most: the search stops there
    with pytest.raises(tracking.ModelNotFoundError):
        tracking.default_model(uri=store, experiment="paged")


def test_every_registered_model_is_read_past_the_searchs_first_page(tmp_path, monkeypatch):
    """MLflow's search gives 100 registered models a page: `cnn-train models` and the default champion
    stopped there."""
    from cnn_train.flows.tracking import registry

    store = new_store(tmp_path / "mlflow.db")
    monkeypatch.setattr(registry, "_MODELS_PAGE", 2)
    runs = [_trained_run(store, "paged-models", accuracy=accuracy) for accuracy in (0.5, 0.6, 0.9)]
    for name, run, accuracy in zip(("a-line", "b-line", "c-line"), runs, (0.5, 0.6, 0.9)):
        _register(store, name, run, accuracy)
    assert list(tracking.registered_versions(store)["model"]) == ["a-line", "b-line", "c-line"]
    assert tracking.default_model(uri=store, experiment="paged-models").model_uri == "models:/c-line@champion"


def test_the_default_is_the_best_champion_of_the_experiment(store):
    weak = _trained_run(store, "champions", accuracy=0.6)
    strong = _trained_run(store, "champions", accuracy=0.9)
    elsewhere = _trained_run(store, "other-experiment", accuracy=0.99)
    _register(store, "weak-line", weak, 0.6)
    _register(store, "strong-line", strong, 0.9)
    _register(store, "elsewhere-line", elsewhere, 0.99)
    choice = tracking.default_model(uri=store, experiment="champions")
    assert (choice.model_uri, choice.registered, choice.run_id) == (
        "models:/strong-line@champion", "strong-line/1", strong[0].run_id
    )
    assert choice.described == (
        "models:/strong-line@champion (version 1, test accuracy 90.00% on 10,000 test images), the surest of the "
        "experiment's 2 registered champions (the highest lower end of a 95% interval around each test accuracy; "
        "next: models:/weak-line@champion, version 1, test accuracy 60.00% on 10,000 test images; --model picks another)"
    )


def test_the_default_champion_is_scored_and_the_surest(store):
    """A champion registered by hand without a test accuracy (NaN) was never beaten once it came first; 80% on
    10 test images (its run's test_limit, no tag) is less sure than 72% on 10,000, and 79% on 200 surer."""
    from mlflow import MlflowClient

    unscored, on_ten, on_all, on_two_hundred = (
        _trained_run(store, "ranked-champions", accuracy=a) for a in (0.5, 0.8, 0.72, 0.79)
    )
    on_ten[0].log_params({"test_limit": 10})
    on_ten[0].finish()
    _register(store, "a-by-hand", unscored, 0.5)  # first by name, as search_registered_models lists them
    MlflowClient(store).delete_model_version_tag("a-by-hand", "1", "test_accuracy")  # as `mlflow.register_model` leaves it
    _register(store, "b-on-ten", on_ten, 0.8, test_set="ten-images", images=None)
    _register(store, "c-on-all", on_all, 0.72, test_set="all-images")
    choice = tracking.default_model(uri=store, experiment="ranked-champions")
    assert choice.described == (
        "models:/c-on-all@champion (version 1, test accuracy 72.00% on 10,000 test images), the surest of the "
        "experiment's 3 registered champions (the highest lower end of a 95% interval around each test accuracy; "
        "next: models:/b-on-ten@champion, version 1, test accuracy 80.00% on 10 test images; --model picks another)"
    )
    _register(store, "d-on-two-hundred", on_two_hundred, 0.79, test_set="two-hundred-images", images=200)
    assert tracking.default_model(uri=store, experiment="ranked-champions").model_uri == "models:/d-on-two-hundred@champion"


def test_no_default_model_names_the_latest_one_trained_in_another_experiment(tmp_path):
    """A user who trained with --experiment, then ran predict without --model, is shown that model."""
    elsewhere = new_store(tmp_path / "mlflow.db")
    with pytest.raises(tracking.ModelNotFoundError) as caught:
        tracking.default_model(uri=elsewhere, experiment="cnn-train")
    assert str(caught.value).endswith("or pass --model"), "nothing trained anywhere: nothing more to say"
    _trained_run(elsewhere, "mine", accuracy=0.5)
    newer, _ = _trained_run(elsewhere, "mine", accuracy=0.6)
    for missing in ("cnn-train", "mine-too"):  # no such experiment; then one with no model
        if missing == "mine-too":
            tracking.client(elsewhere).create_experiment("mine-too")
        with pytest.raises(tracking.ModelNotFoundError) as caught:
            tracking.default_model(uri=elsewhere, experiment=missing)
        assert str(caught.value).endswith(
            f"or pass --model; the latest model trained in another experiment is runs:/{newer.run_id}/model "
            "(experiment 'mine', run-0.6, test accuracy 60.00%)"
        )


def test_an_experiment_with_nothing_to_predict_with_says_what_to_do(store):
    with pytest.raises(tracking.ModelNotFoundError, match=r"^no experiment 'never-made' in sqlite:///.*mlflow.db, so no model"):
        tracking.default_model(uri=store, experiment="never-made")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        pytest.param("runs:/0123456789abcdef0123456789abcdef/model", "no model at runs:/0123456789abcdef0123456789abcdef/model", id="unknown-run"),
        pytest.param("models:/better-then-worse/99", "no model at models:/better-then-worse/99", id="unknown-version"),
        pytest.param("models:/better-then-worse@production", "no model version answers to models:/better-then-worse@production", id="unknown-alias"),
        pytest.param("m-0123456789abcdef0123456789abcdef", "no model at models:/m-0123456789abcdef0123456789abcdef", id="unknown-model-id"),
        pytest.param("m-doesnotexist", "no logged model has the id m-doesnotexist (an id is m- and 32 hex digits)", id="not-a-model-id"),
        pytest.param("models:/", "models:/ is not a model URI cnn-train understands: use runs:/<run id>/model", id="malformed"),
        pytest.param(
            "better-then-worse", "better-then-worse is a registered model, not one version of it: give "
            "models:/better-then-worse@<alias>, models:/better-then-worse/<version> or models:/better-then-worse/latest",
            id="a-registered-name",
        ),
        pytest.param(
            "models:/never-registered/latest", "no version of a registered model 'never-registered' to be the latest",
            id="latest-of-nothing",
        ),
        pytest.param(
            "models:/better-then-worse", "better-then-worse is a registered model, not one version of it", id="a-registered-name-as-uri",
        ),
        pytest.param(
            "no-such-model", "no model at no-such-model: no such folder, and not a model URI (runs:/<run id>/model", id="a-word",
        ),
        pytest.param(
            "models:/beter-then-worse@champion", "no model version answers to models:/beter-then-worse@champion; no "
            "registered model is named 'beter-then-worse' (did you mean better-then-worse?)", id="a-misspelt-name",
        ),
    ],
)
def test_a_model_that_does_not_exist_lists_what_does(store, two_runs, better_then_worse, spec, problem):
    with pytest.raises(tracking.ModelNotFoundError) as caught:
        tracking.locate(spec, uri=store, experiment="ranked")
    message = str(caught.value)
    assert message.startswith(problem) and "\n" not in message
    assert "better-then-worse (@challenger=v2, @champion=v1)" in message
    assert f"recent finished runs with a model in 'ranked': runs:/{two_runs[1][0].run_id}/model (run-0.84, test accuracy 84.00%)" in message


def test_a_miss_lists_ten_registered_models_and_names_a_trials_search(tmp_path):
    """With many registered models the line ran to 700 characters, and a trial's run read `trial-3` without
    its study."""
    from mlflow import MlflowClient

    store = new_store(tmp_path / "mlflow.db")
    for index in range(12):
        MlflowClient(store).create_registered_model(f"line-{index:02d}")
    parent = RunTracker.start("searched", uri=store, run_name="sweep-lr")
    trial, _ = _trained_run(store, "searched", accuracy=0.7, tags={"mlflow.parentRunId": parent.run_id, "cnn_train.role": "sweep-trial"})
    with pytest.raises(tracking.ModelNotFoundError) as caught:
        tracking.locate("models:/line-99@champion", uri=store, experiment="searched")
    message = str(caught.value)
    assert "line-09 (no aliases); and 2 more (`cnn-train models` lists them all); recent" in message and "line-10" not in message
    assert message.endswith(f"runs:/{trial.run_id}/model (run-0.7 of sweep-lr, test accuracy 70.00%)"), message


def _model_folder(store: str, model_uri: str) -> Path:
    """Where a logged model's files are on this machine (the store keeps its artifacts locally)."""
    location = tracking.client(store).get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    return Path(urlparse(location).path)


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        pytest.param("{tmp}/odd", "{tmp}/odd is not a model folder: it has no MLmodel file", id="folder-without-mlmodel"),
        pytest.param("{model}/MLmodel", "{model}/MLmodel is a model's MLmodel file: give its folder, {model}", id="the-mlmodel-file"),
        pytest.param("{tmp}/odd/notes.txt", "{tmp}/odd/notes.txt is a file, not a model folder", id="a-file"),
        pytest.param(
            "{tmp}", "{tmp} is not a model folder itself (no MLmodel file); the one(s) inside: {tmp}/model", id="a-folder-of-models",
        ),
        pytest.param("file://{tmp}/odd", "file://{tmp}/odd is not a model folder", id="file-uri"),
    ],
)
def test_a_local_path_that_is_no_model_folder_says_what_it_is(store, two_runs, tmp_path, given, problem):
    """Said before MLflow is asked: MLflow copies a whole folder before it looks for MLmodel, and a
    socket or pipe in it (as in /tmp) ended the copy with '[Errno 6] No such device or address'."""
    shutil.copytree(_model_folder(store, two_runs[0][1]), tmp_path / "model")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("not a model")
    os.mkfifo(tmp_path / "odd" / "a-pipe")
    values = {"tmp": tmp_path, "model": tmp_path / "model"}
    with pytest.raises(tracking.ModelNotFoundError) as caught:
        tracking.locate(given.format(**values), uri=store, experiment="ranked")
    message = str(caught.value)
    assert message.startswith(problem.format(**values)) and "\n" not in message, message
    assert "recent finished runs with a model in 'ranked'" in message


@pytest.mark.parametrize(("status", "says"), [("FAILED", "ended FAILED"), ("KILLED", "ended KILLED"), ("RUNNING", "is still running")])
def test_a_run_that_never_logged_its_model_says_how_it_ended(store, two_runs, status, says):
    """A training logs its model at its end; before, MLflow's 'Failed to download artifacts from path' was all a user got."""
    tracker = RunTracker.start("ranked", uri=store, run_name=f"a-{status.lower()}-training")
    if status != "RUNNING":
        tracker.finish(status)
    with pytest.raises(tracking.ModelNotFoundError) as caught:
        tracking.locate(f"runs:/{tracker.run_id}/model", uri=store, experiment="ranked")
    assert str(caught.value).startswith(
        f"run {tracker.run_id} (a-{status.lower()}-training) {says} and has logged no model; registered models: "
    )


def test_a_model_folder_on_this_machine_loads_where_it_is(store, two_runs, tmp_path, monkeypatch):
    """No copy in a temporary folder: given a destination, MLflow copies even a local folder there first."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    folder = _model_folder(store, two_runs[0][1])
    choice = tracking.locate(str(folder), uri=store, experiment="ranked")
    model = tracking.load_pyfunc(choice.model_uri, store)
    assert np.asarray(model.predict(np.zeros((3, 28, 28, 1), dtype=np.float32))).shape == (3, 10)
    assert list(system_tmp.iterdir()) == []
    from_the_store = tracking.load_pyfunc(two_runs[0][1], store)
    assert from_the_store.metadata.model_uuid
    assert [path.name[:16] for path in system_tmp.iterdir()] == ["cnn-train-model-"], "a store's model is still copied"


@pytest.mark.parametrize(
    ("spec", "version"),
    [
        pytest.param("models:/better-then-worse@challenger", "2", id="alias"),
        pytest.param("models:/better-then-worse/1", "1", id="version"),
        pytest.param("models:/better-then-worse/latest", "2", id="latest"),  # MLflow's form; it was refused
    ],
)
def test_a_registered_model_is_located_by_alias_or_version(store, two_runs, better_then_worse, spec, version):
    choice = tracking.locate(spec, uri=store, experiment="ranked")
    assert (choice.model_uri, choice.registered, choice.described) == (
        spec, f"better-then-worse/{version}", f"{spec} (version {version}, as given)"
    )
    assert choice.run_id == two_runs[int(version) - 1][0].run_id


@pytest.mark.parametrize("form", ["m-id", "models-uri", "run-uri"])
def test_a_logged_model_is_located_by_its_id_or_its_run(store, two_runs, form):
    tracker, model_uri = two_runs[0]
    spec = {"m-id": model_uri.removeprefix("models:/"), "models-uri": model_uri, "run-uri": f"runs:/{tracker.run_id}/model"}[form]
    choice = tracking.locate(spec, uri=store, experiment="ranked")
    assert (choice.model_uri, choice.run_id) == (spec if form == "run-uri" else model_uri, tracker.run_id)


def test_with_only_a_searchs_models_the_default_names_the_newest_of_them(store):
    """'no finished training run with a model' while the experiment held six trials' models."""
    tracker, _ = _trained_run(store, "searched-only", accuracy=0.81, tags={"cnn_train.role": "tune-trial"})
    with pytest.raises(tracking.ModelNotFoundError) as caught:
        tracking.default_model(experiment="searched-only", uri=store)
    assert str(caught.value).endswith(
        f"; the newest model of its searches and comparisons is runs:/{tracker.run_id}/model (run-0.81, test accuracy 81.00%)"
    ), caught.value
