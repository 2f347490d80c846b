"""Tuning: the search space and its one-line errors, the study's plan, Optuna's figures, a study that
prunes a hopeless trial, and a study killed mid-way that continues where it stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from cnn_train.flows.cli import app
from cnn_train.flows.params import ParameterError
from cnn_train.flows.tuning import (
    FORMS,
    RUN_ATTR,
    STATE_TAG,
    Dimension,
    SpaceError,
    load_space_file,
    open_study,
    parse_assignments,
    parse_space,
    requeue_interrupted,
    validate_tune,
)
from cnn_train.flows.tuning.figures import inked_share, write_study_figures

SMALL = {"epochs": 2, "sample_limit": 400, "test_limit": 200, "seed": 4}


# --- the space ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "spec", "expected"),
    [
        pytest.param("learning_rate", "log:1e-4:1e-2", Dimension("learning_rate", "log", 1e-4, 1e-2), id="log"),
        pytest.param("batch_size", "int:32:256", Dimension("batch_size", "int", 32, 256), id="int"),
        pytest.param("batch_size", "log:16:256", Dimension("batch_size", "log", 16, 256), id="whole-numbers-on-a-log-scale"),
        pytest.param("learning_rate", "float:0.001:0.01", Dimension("learning_rate", "float", 0.001, 0.01), id="float"),
        pytest.param("architecture", "cnn,dense", Dimension("architecture", "choice", choices=("cnn", "dense")), id="words"),
        pytest.param("batch_size", "32, 64,128", Dimension("batch_size", "choice", choices=(32, 64, 128)), id="numbers"),
        pytest.param("epochs", [2, 4], Dimension("epochs", "choice", choices=(2, 4)), id="yaml-list"),
    ],
)
def test_specs_parse(field, spec, expected):
    assert parse_space({field: spec}).dimensions == (expected,)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        pytest.param({"learning_rate": "log:1e-2"}, "learning_rate='log:1e-2' is not a range", id="one-bound"),
        pytest.param({"learning_rate": "log:0:1"}, "learning_rate='log:0:1' needs LOW > 0", id="log-of-zero"),
        pytest.param({"learning_rate": "float:a:1"}, "learning_rate='float:a:1' has LOW 'a', not a number", id="not-a-number"),
        pytest.param({"batch_size": "int:64:32"}, "batch_size='int:64:32' needs LOW < HIGH", id="reversed"),
        pytest.param({"batch_size": "int:32:64.5"}, "batch_size='int:32:64.5' needs whole numbers", id="int-fraction"),
        pytest.param({"seed": "log:1:9.5"}, "seed='log:1:9.5' needs whole numbers for log:LOW:HIGH (seed is a whole number)",
                     id="log-fraction-of-a-count"),
        pytest.param({"learning_rate": "exp:1:2"}, "learning_rate='exp:1:2' has an unknown range kind 'exp'", id="unknown-kind"),
        pytest.param({"architecture": "cnn"}, "architecture='cnn' lists fewer than two values", id="one-choice"),
        pytest.param({"architecture": "cnn,cnn"}, "architecture='cnn,cnn' lists 'cnn' more than once", id="twice"),
        pytest.param({"epochs": 3}, "epochs=3 is not a search range", id="bare-number"),
    ],
)
def test_a_malformed_spec_names_the_field_and_the_forms(space, message):
    with pytest.raises(SpaceError) as raised:
        parse_space(space)
    assert message in str(raised.value)
    assert str(raised.value).endswith(f"use {FORMS}")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param({"space": {"dense_units": "int:64:256"}}, "cannot vary 'dense_units'; tunable fields: backend", id="not-tunable"),
        pytest.param(
            {"space": {"lr": "log:1e-4:1e-2"}}, "cannot vary 'lr' (did you mean learning_rate?); tunable fields: backend",
            id="tunable-field-by-its-initials",
        ),
        pytest.param({"space": {}}, "give at least one field to vary", id="empty"),
        pytest.param(
            {"space": {"learning_rate": "log:1e-4:1e-2"}, "sampler": "grid"},
            "sampler grid needs choices (A,B,C) for every field; learning_rate is a range", id="grid-of-a-range",
        ),
        pytest.param(
            {"space": {"batch_size": "32,100000"}},
            "batch_size=100000 is not a valid run: batch_size: 100000 is larger than the training set", id="corner",
        ),
    ],
)
def test_a_space_that_cannot_run_is_refused_before_the_study(values, message):
    with pytest.raises(SpaceError, match=re.escape(message)):
        validate_tune(SMALL | values)


@pytest.mark.parametrize(("trials", "note"), [
    (5, "the space holds 4 combination(s) of choices: the study ends at 4 trials, not 5"), (4, None),
], ids=["more-trials-than-combinations", "as-many"])
def test_a_space_of_choices_caps_the_study_and_says_so(trials, note):
    """`--sampler grid --space batch_size=16,32 --trials 5` ran 2 trials without a word on why."""
    plan = validate_tune(SMALL | {"space": {"batch_size": "16,32", "architecture": "cnn,dense"}, "sampler": "grid", "trials": trials})
    assert (plan.target_trials, plan.cap_note()) == (min(trials, 4), note)


def test_a_field_set_on_its_own_leaves_the_default_space():
    plan = validate_tune(SMALL | {"learning_rate": 2e-3})
    assert plan.space.names == ("batch_size",) and plan.base.learning_rate == 2e-3


def test_a_field_set_and_in_the_given_space_is_refused_rather_than_ignored():
    with pytest.raises(ParameterError) as raised:
        validate_tune(SMALL | {"batch_size": 64, "space": {"batch_size": "32,64"}})
    assert str(raised.value) == (
        "space: batch_size is set to 64 and also varied by the space ('32,64'); give it in one place: "
        "leave batch_size unset or take it out of the space"
    )


def test_command_line_items_and_files_give_the_same_space(tmp_path):
    yaml_file, json_file = tmp_path / "space.yaml", tmp_path / "space.json"
    yaml_file.write_text("learning_rate: log:1e-4:1e-2\narchitecture: [cnn, dense]\n")
    json_file.write_text('{"learning_rate": "log:1e-4:1e-2", "architecture": "cnn,dense"}')
    from_items = parse_space(parse_assignments(["learning_rate=log:1e-4:1e-2", "architecture=cnn,dense"]))
    assert parse_space(load_space_file(yaml_file)) == from_items == parse_space(load_space_file(json_file))
    (tmp_path / "list.yaml").write_text("- learning_rate\n")
    with pytest.raises(SpaceError, match="needs a mapping of FIELD to SPEC"):
        load_space_file(tmp_path / "list.yaml")


@pytest.mark.parametrize(
    ("space", "line"),
    [
        pytest.param({"epochs": "1,1.0"}, "epochs='1,1.0' lists 1 more than once", id="a-whole-number-and-its-float"),
        pytest.param({"seed": "1,2,1.0,2.0"}, "seed='1,2,1.0,2.0' lists 1, 2 more than once", id="two-values-each-twice"),
        pytest.param({"batch_size": [32, 32.0]}, "batch_size=[32, 32.0] lists 32 more than once", id="file-list"),
    ],
)
def test_a_value_listed_twice_is_refused_by_value(space, line):
    # Compared by their repr before, 1 and 1.0 were two choices: two trials of the same run.
    with pytest.raises(SpaceError) as raised:
        parse_space(space)
    assert str(raised.value) == f"space: {line}; use {FORMS}"


@pytest.mark.parametrize(
    ("text", "values"),
    [
        pytest.param("learning_rate: [1e-3, 1e-2]\n", [0.001, 0.01], id="exponent-without-a-dot"),
        pytest.param("learning_rate: [1E5, -2e-4, +3e-4]\n", [1e5, -2e-4, 3e-4], id="capital-e-and-signs"),
        pytest.param("learning_rate: [.5, 1., 2e-3]\n", [0.5, 1.0, 0.002], id="dot-forms-beside-an-exponent"),
        pytest.param('{"learning_rate": [1e-3, 1E-2]}', [0.001, 0.01], id="json-exponents"),
    ],
)
def test_a_space_file_reads_numbers_as_numbers(tmp_path, text, values):
    # PyYAML reads YAML 1.1, where 1e-3 (no dot) is the string '1e-3': the study searched strings.
    path = tmp_path / "space.yaml"
    path.write_text(text)
    loaded = load_space_file(path)["learning_rate"]
    assert (loaded, [type(value) for value in loaded]) == (values, [float] * len(values))


def test_a_space_file_searches_what_the_same_items_search(tmp_path):
    (tmp_path / "space.yaml").write_text("learning_rate: [1e-3, 1e-2]\n")
    from_items = parse_space(parse_assignments(["learning_rate=1e-3,1e-2"]))
    assert parse_space(load_space_file(tmp_path / "space.yaml")) == from_items


def test_a_space_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes("# réglages\nlearning_rate: log:1e-4:1e-2\n".encode("latin-1"))  # a traceback before
    with pytest.raises(SpaceError) as raised:
        load_space_file(path)
    assert str(raised.value) == f"space file {path}: not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param('learning_rate: ["1e-3", 1e-2]\n', f"space: learning_rate=['1e-3', 0.01] lists '1e-3', not a number; use {FORMS}",
                     id="a-quoted-number"),
        pytest.param("learning_rate: log:1e-4:1e-2\narchitecture: [cnn, dense]\nlearning_rate: 1e-3,1e-2\n",
                     f"space file PATH: gives learning_rate twice (lines 1 and 3); give it one SPEC ({FORMS})", id="a-field-twice"),
        pytest.param('{"seed": "1,2", "seed": "3,4"}', f"space file PATH: gives seed twice (line 1); give it one SPEC ({FORMS})",
                     id="a-field-twice-in-json"),
    ],
)
def test_a_space_file_that_quotes_a_number_or_gives_a_field_twice_is_refused(tmp_path, text, line):
    # A YAML mapping keeps the last of two equal keys without a word; two --space items are refused.
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as raised:
        parse_space(load_space_file(path))
    assert str(raised.value) == line.replace("PATH", str(path))


def test_a_float_range_for_a_whole_number_field_is_refused():
    # Before, every trial it drew failed once the study ran: "epochs: must be a whole number (got 2.37)".
    with pytest.raises(SpaceError) as raised:
        parse_space({"epochs": "float:1:10"})
    assert str(raised.value) == (
        "space: epochs='float:1:10' draws floats, and epochs takes whole numbers; "
        "use int:LOW:HIGH, log:LOW:HIGH (whole numbers on a log scale) or A,B,C"
    )


def test_optuna_suggests_within_the_space():
    space = parse_space(
        {"learning_rate": "log:1e-4:1e-2", "batch_size": "int:32:64", "seed": "log:1:1000", "architecture": "cnn,dense"}
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = space.suggest(study.ask())
        assert 1e-4 <= values["learning_rate"] <= 1e-2
        assert isinstance(values["batch_size"], int) and 32 <= values["batch_size"] <= 64
        assert isinstance(values["seed"], int) and 1 <= values["seed"] <= 1000
        assert values["architecture"] in ("cnn", "dense")


# --- the plan and the study -----------------------------------------------------------------------


def test_the_same_command_names_the_same_study_and_another_space_another(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path))
    first = validate_tune(SMALL | {"space": {"learning_rate": "log:1e-4:1e-2"}})
    assert validate_tune(SMALL | {"space": {"learning_rate": "log:1e-4:1e-2"}, "trials": 3}).study_name == first.study_name
    assert validate_tune(SMALL | {"space": {"learning_rate": "log:1e-5:1e-2"}}).study_name != first.study_name
    assert first.storage_url == f"sqlite:///{tmp_path / 'optuna.db'}"


@pytest.mark.parametrize(
    ("then", "difference"),
    [
        pytest.param(
            {"space": {"learning_rate": "log:1e-5:1e-2"}},
            "the study: space learning_rate=log:0.0001:0.01; this command: space learning_rate=log:1e-05:0.01",
            id="another-range",
        ),
        pytest.param(
            {"space": {"batch_size": "16,32"}, "learning_rate": 0.01},
            "the study: space learning_rate=log:0.0001:0.01, fixed batch_size=32; "
            "this command: space batch_size=16,32, fixed learning_rate=0.01",
            id="another-field",
        ),
        pytest.param(
            {"space": {"learning_rate": "log:1e-4:1e-2"}, "objective": "best_val_accuracy"},
            "the study: objective val_accuracy; this command: objective best_val_accuracy",
            id="another-objective",
        ),
    ],
)
def test_continuing_a_study_with_another_search_is_refused_saying_what_differs(tmp_path, then, difference):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    named = SMALL | {"study_name": "s", "storage": storage}
    open_study(validate_tune(named | {"space": {"learning_rate": "log:1e-4:1e-2"}}), on_abandoned=print)
    with pytest.raises(SpaceError) as caught:
        open_study(validate_tune(named | then), on_abandoned=print)
    assert str(caught.value) == (
        f"study 's' was made for another search ({difference}); give a new --study-name to start another study"
    )


def test_the_command_refuses_another_search_under_a_stored_name_before_its_flow_run(tmp_path):
    """It was refused as the flow run opened the study: one line too, but after a Failed flow run."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    open_study(validate_tune(SMALL | {"study_name": "s", "storage": storage, "space": {"learning_rate": "log:1e-4:1e-2"}}), on_abandoned=print)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CNN_TRAIN_STATE_DIR": str(tmp_path / "state")}
    given = ["--epochs", "2", "--sample-limit", "400", "--test-limit", "200", "--seed", "4", "--study-name", "s", "--storage", storage]
    result = CliRunner().invoke(app, ["tune", *given, "--space", "learning_rate=log:1e-5:1e-2"], env=env)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "cnn-train: study 's' was made for another search (the study: space learning_rate=log:0.0001:0.01; this command: "
        "space learning_rate=log:1e-05:0.01); give a new --study-name to start another study"
    ]
    assert not (tmp_path / "mlflow.db").exists()


#: A storage URL and the start of its one line. All but the last are refused as the study is validated,
#: before its flow run: they were SQLAlchemy's words ('unable to open database file'), from a failed run.
STORAGE_REFUSALS = {
    "not-a-url": ("nonsense", "storage: 'nonsense' is not a database URL; use e.g. sqlite:"),
    "no-folder": ("sqlite:////nonexistent/dir/optuna.db", "storage: the folder /nonexistent/dir of /nonexistent/dir/optuna.db does not exist"),
    "a-folder": ("sqlite:///{tmp}", "storage: {tmp} is a folder; name the SQLite file in it"),
    "postgres": ("postgres://db.example/optuna", "storage: SQLAlchemy knows no database kind 'postgres'; use postgresql://"),
    "no-driver": ("postgresql+psycopg2://db.example/optuna", "storage: postgresql+psycopg2 needs the Python driver 'psycopg2', "
                  "which is not installed: pip install psycopg2-binary"),
    "not-a-database": ("sqlite:///{tmp}/not-a-database", "storage sqlite:///{tmp}/not-a-database: cannot open it"),
}


@pytest.mark.parametrize(("storage", "message"), list(STORAGE_REFUSALS.values()), ids=list(STORAGE_REFUSALS))
def test_a_storage_that_cannot_hold_the_study_is_one_line(tmp_path, storage, message):
    from cnn_train.flows.errors import ExpectedFailure

    (tmp_path / "not-a-database").write_text("these are not the pages of an SQLite file " * 100)
    with pytest.raises(ExpectedFailure) as raised:
        open_study(validate_tune(SMALL | {"storage": storage.format(tmp=tmp_path)}), on_abandoned=print)
    assert str(raised.value).startswith(message.format(tmp=tmp_path)) and "\n" not in str(raised.value)


def test_a_continued_study_does_not_replay_its_first_values(tmp_path):
    values = SMALL | {"space": {"learning_rate": "log:1e-4:1e-2"}, "sampler": "random", "storage": f"sqlite:///{tmp_path / 'o.db'}"}
    plan = validate_tune(values)
    first, _ = open_study(plan, on_abandoned=print)
    trial = first.ask()
    first.tell(trial, plan.space.suggest(trial)["learning_rate"])
    continued, _ = open_study(plan, on_abandoned=print)
    assert plan.space.suggest(continued.ask()) != first.trials[0].params


def test_the_command_adds_its_own_options_to_the_declaration():
    """The form and the options from the declaration: test_params (its "tune" cases); these only the command has."""
    result = CliRunner().invoke(app, ["tune", "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    help_text = " ".join(result.output.split())
    assert "--space-file" in help_text and "--no-prune" in help_text


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_no_prune_beside_a_pruner_given_is_refused(pruner):
    """--pruner median is also the default: given with --no-prune it was silently dropped."""
    result = CliRunner().invoke(app, ["tune", "--pruner", pruner, "--no-prune", "--epochs", "1"])
    assert result.exit_code == 2
    assert result.output == f"cnn-train: --no-prune and --pruner {pruner} contradict each other; give one\n"


@pytest.mark.parametrize(
    ("items", "line"),
    [
        pytest.param(["learning_rate=log:1e-2"],
                     f"cnn-train: space: learning_rate='log:1e-2' is not a range (log: needs exactly LOW:HIGH); use {FORMS}",
                     id="malformed-spec"),
        pytest.param(["batch_size=16,32", "batch_size=64"], f"cnn-train: --space gives batch_size twice; give it one SPEC ({FORMS})",
                     id="a-field-twice"),
    ],
)
def test_a_malformed_space_fails_before_any_run_exists(tmp_path, items, line):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CNN_TRAIN_STATE_DIR": str(tmp_path / "state")}
    arguments = [part for item in items for part in ("--space", item)]
    result = CliRunner().invoke(app, ["tune", *arguments, "--sample-limit", "400"], env=env)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [line]
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "state" / "optuna.db").exists()


# --- Optuna's figures -----------------------------------------------------------------------------


def _synthetic_study(complete: int) -> optuna.Study:
    """A study whose trials report three epochs each; the last ones are pruned after one epoch."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for number in range(complete + 2):
        trial = study.ask()
        rate = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
        batch = trial.suggest_categorical("batch_size", [32, 64])
        score = 0.9 - abs(rate - 3e-3) * 10 - batch / 1e4
        for epoch in (1, 2, 3):
            trial.report(score * epoch / 3, epoch)
            if number >= complete and epoch == 1:
                break
        study.tell(trial, state=TrialState.PRUNED) if number >= complete else study.tell(trial, score)
    return study


def test_optuna_figures_are_drawn_and_not_blank(tmp_path):
    figures = write_study_figures(_synthetic_study(complete=4), tmp_path)
    assert [path.name for path in figures.files] == [
        "optimization_history.png", "intermediate_values.png", "param_importances.png"
    ]
    assert all(inked_share(path) > 0.02 for path in figures.files)
    assert figures.skipped == {}


def test_a_figure_the_study_cannot_have_yet_is_skipped_with_the_reason(tmp_path):
    figures = write_study_figures(_synthetic_study(complete=1), tmp_path)
    assert figures.skipped == {
        "param_importances.png": "parameter importance needs at least 2 completed trials (1 so far)"
    }


def test_importance_is_skipped_when_every_trial_scored_the_same(tmp_path):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(3):  # a tiny sweep on tiny data: every trial reaches the same accuracy
        trial = study.ask()
        trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
        study.tell(trial, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's "Parameter importances will be equal" would fail here
        figures = write_study_figures(study, tmp_path)
    assert figures.skipped["param_importances.png"] == (
        "all 3 completed trials scored the same, so no field explains the objective"
    )
    assert [path.name for path in figures.files] == ["optimization_history.png"]


def test_a_blank_picture_counts_as_blank(tmp_path):
    from matplotlib.figure import Figure

    blank = Figure(figsize=(2, 2))
    blank.savefig(tmp_path / "blank.png", facecolor="white")
    assert inked_share(tmp_path / "blank.png") == 0.0


# --- real studies (tiny real data, torch backend) ----------------------------------------------


def _child_runs(client, study_name):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`cnn_train.study` = '{study_name}' and tags.`cnn_train.role` = 'tune-trial'")


def _artifact_names(client, run_id, path):
    return {Path(a.path).name for a in client.list_artifacts(run_id, path)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task_runner", "runner_class"),
    [pytest.param("local", "ThreadPoolTaskRunner", id="in-threads"), pytest.param("ray", "RayClusterTaskRunner", id="on-ray")],
)
def test_a_hopeless_trial_is_pruned_and_its_run_says_so(mlflow_store, tmp_path, task_runner, runner_class):
    """On Ray too, from the flow's own parameter (as a deployment run gives it): trials on Ray workers
    report their epochs to the study, which prunes them there."""
    from mlflow import MlflowClient

    from cnn_train.flows.tune_flow import cnn_train_tune

    values = SMALL | {
        "space": {"learning_rate": "0.003,1e-7"}, "trials": 2, "max_concurrent": 1, "startup_trials": 1,
        "sampler": "random", "study_name": f"prune-hopeless-{task_runner}", "task_runner": task_runner,
    }
    # Queue the two trials in this order, so the hopeless one runs second and meets a finished trial.
    study, _ = open_study(validate_tune(values), on_abandoned=print)
    study.enqueue_trial({"learning_rate": 0.003})
    study.enqueue_trial({"learning_rate": 1e-7})

    result = cnn_train_tune(**values)

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[1].last_step == 1
    client = MlflowClient(mlflow_store)
    runs = {int(r.data.tags["cnn_train.trial_number"]): r for r in _child_runs(client, values["study_name"])}
    assert all(("ray.node_id" in r.data.tags) == (task_runner == "ray") for r in runs.values())
    pruned, complete = runs[1], runs[0]
    assert pruned.info.status == "FINISHED"
    assert pruned.data.tags[STATE_TAG] == "pruned at epoch 1"
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "val_accuracy")] == [1]
    assert "test_accuracy" not in pruned.data.metrics
    # Only a tag said so: the run read FINISHED, no description, and its Prefect task run plain Completed.
    assert re.match(r"\*\*Pruned\*\* after epoch 1 of 2, at val_accuracy \d+\.\d\d%: ", pruned.data.tags["mlflow.note.content"])
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = client.get_run(result["mlflow_run_id"]).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states = {run.name: run.state for run in task_runs if run.name.startswith("trial")}
    assert (states["trial-1"].type.value, states["trial-1"].name) == ("COMPLETED", "Pruned")
    assert states["trial-1"].message.startswith("pruned after epoch 1 of 2, at val_accuracy ")
    assert (states["trial-0"].name, states["trial-0"].message) == ("Completed", "")
    assert complete.info.status == "FINISHED" and complete.data.tags[STATE_TAG] == "complete"
    assert [m.step for m in client.get_metric_history(complete.info.run_id, "val_accuracy")] == [1, 2]
    assert complete.data.metrics["objective"] == pytest.approx(trials[0].value)
    assert {pruned.data.tags["mlflow.parentRunId"], complete.data.tags["mlflow.parentRunId"]} == {result["mlflow_run_id"]}

    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["task_runner"] == runner_class
    assert "None" not in parent.data.params.values(), parent.data.params  # values left out are no params
    assert parent.data.tags["cnn_train.best_trial"] == "0"
    description = parent.data.tags["mlflow.note.content"]
    assert "2 trials ended: 1 complete, 1 pruned, 0 failed" in description
    # The best trial heads it (a watched trigger prints that line), then the command that trains it again.
    assert description.startswith("**Best trial: 0, val_accuracy "), description
    assert re.search(r"\n\nTrain it again: `cnn-train run [^`]*--learning-rate 0\.003[ `]", description), description
    assert description.endswith("The ranking and figures: `tune/ranking.md` in Artifacts.")
    assert parent.data.params["best.learning_rate"] == "0.003"
    assert {"ranking.csv", "ranking.md"} <= _artifact_names(client, parent.info.run_id, "tune")
    assert _artifact_names(client, parent.info.run_id, "tune/figures") == {"optimization_history.png", "intermediate_values.png"}
    for name in ("optimization_history.png", "intermediate_values.png"):
        assert inked_share(Path(client.download_artifacts(parent.info.run_id, f"tune/figures/{name}", str(tmp_path)))) > 0.02
    # The study's markdown shows its figures (it named their files); with no MLflow server, beside it.
    folder = Path(client.download_artifacts(parent.info.run_id, "tune", str(tmp_path / "whole")))
    shown = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", (folder / "ranking.md").read_text())
    assert shown == ["figures/optimization_history.png", "figures/intermediate_values.png"], shown
    assert all((folder / link).is_file() for link in shown)
    ranking_md = Path(client.download_artifacts(parent.info.run_id, "tune/ranking.md", str(tmp_path))).read_text()
    assert "param_importances.png` not drawn: parameter importance needs at least 2 completed trials (1 so far)" in ranking_md
    assert [row["state"] for row in result["ranking"]] == ["complete", "pruned at epoch 1"]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


@pytest.mark.slow
def test_a_killed_study_continues_its_numbering_without_duplicate_runs(mlflow_store, prefect_api_url, tmp_path):
    from mlflow import MlflowClient

    from cnn_train.flows.tuning import default_storage_url

    args = [
        "tune", "--space", "learning_rate=log:1e-4:1e-2", "--trials", "2", "--max-concurrent", "1",
        "--pruner", "none", "--sampler", "random", "--study-name", "killed", "--epochs", "2",
        "--sample-limit", "400", "--test-limit", "200", "--seed", "4",
    ]
    cli = Path(sys.executable).with_name("cnn-train")
    with (tmp_path / "first.log").open("w") as log:
        process = subprocess.Popen(
            [str(cli), *args], env=os.environ | {"PREFECT_API_URL": prefect_api_url},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def trials() -> list[optuna.trial.FrozenTrial]:
        try:
            return optuna.load_study(study_name="killed", storage=default_storage_url()).get_trials()
        except KeyError:  # the study does not exist yet
            return []

    def states() -> list[TrialState]:
        return [t.state for t in trials()]

    def one_done_one_training() -> bool:
        now = trials()
        return any(t.state == TrialState.COMPLETE for t in now) and any(
            t.state == TrialState.RUNNING and RUN_ATTR in t.user_attrs for t in now
        )

    try:
        _wait_for(lambda: one_done_one_training() or process.poll() is not None, timeout=300, what="a finished trial and a training one")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = states()
    assert before == [TrialState.COMPLETE, TrialState.RUNNING], (tmp_path / "first.log").read_text()[-3000:]

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    after = trials()
    # Trial 0 is not run again; trial 1 died with the process, and trial 2 is trial 1 queued again.
    assert [t.number for t in after] == [0, 1, 2]
    assert [t.state for t in after] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert after[2].system_attrs["failed_trial"] == 1 and after[2].params == after[1].params
    assert "this run: trials 2)" in result.output
    # The ranking links the failed trial to its retry (it only said "failed").
    assert re.search(r"^\| \d \| 1 \| failed, run again as trial 2 \|", result.output, re.M), result.output
    # The objective by name and as the ranking shows it (a percentage), not "value 0.6400".
    assert re.search(r"^best trial: [02], val_accuracy \d+\.\d\d%, learning_rate=\d", result.output, re.M), result.output
    assert re.search(r"^train it again: cnn-train run .*--learning-rate \d", result.output, re.M), result.output

    client = MlflowClient(mlflow_store)
    runs = _child_runs(client, "killed")
    assert Counter(int(r.data.tags["cnn_train.trial_number"]) for r in runs) == Counter([0, 1, 2])
    by_number = {int(r.data.tags["cnn_train.trial_number"]): r for r in runs}
    assert by_number[1].info.status == "FAILED" and by_number[1].data.tags[STATE_TAG] == "failed"
    assert all(by_number[n].info.status == "FINISHED" and by_number[n].data.tags[STATE_TAG] == "complete" for n in (0, 2))
    first_parent, second_parent = (by_number[n].data.tags["mlflow.parentRunId"] for n in (0, 2))
    assert first_parent != second_parent
    assert client.get_run(first_parent).info.status == "FAILED"  # its process was killed
    # Two completed trials with different learning rates: now the parameter importance can be drawn.
    assert "param_importances.png" in _artifact_names(client, second_parent, "tune/figures")


def test_interrupted_trials_are_failed_and_queued_again_once():
    """What a Ctrl-C leaves in the study: the stopped trials FAIL with a WAITING copy each (the next
    invocation runs them), a trial another process already failed is left to it, and a copy that is
    itself stopped is not queued a third time."""
    study = optuna.create_study(storage="sqlite:///:memory:", direction="maximize")
    stopped, abandoned = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2)}), study.ask()
    study.tell(abandoned, state=TrialState.FAIL)  # failed meanwhile as abandoned by another process
    requeue_interrupted(study, [stopped, abandoned])
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]
    assert study.trials[2].params == stopped.params and study.trials[2].system_attrs["failed_trial"] == 0

    retry = study.ask()
    assert retry.number == 2
    requeue_interrupted(study, [retry])
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3


def test_a_retried_trial_claimed_again_drops_the_error_of_the_attempt_it_retries():
    from cnn_train.flows.tuning import ERROR_ATTR, OWNER_ATTR, ask, claim

    study = optuna.create_study(storage="sqlite:///:memory:", direction="maximize")
    # The WAITING copy Optuna's retry makes of a failed trial carries its user attributes.
    study.enqueue_trial({"learning_rate": 1e-3}, user_attrs={ERROR_ATTR: "the Ray worker died", "kept": 1})
    retry = ask(study)
    claim(retry)
    attrs = study.trials[retry.number].user_attrs
    assert attrs[ERROR_ATTR] is None and attrs["kept"] == 1 and attrs[OWNER_ATTR].endswith(f":{os.getpid()}")


def test_a_storage_that_fails_as_trials_are_handed_back_does_not_replace_the_interruption(monkeypatch):
    from prefect.logging import disable_run_logger
    from sqlalchemy.exc import OperationalError

    from cnn_train.flows import tune_flow

    def storage_gone(study, trials):
        raise OperationalError("UPDATE trials", {}, Exception("server closed the connection"))

    monkeypatch.setattr(tune_flow, "requeue_interrupted", storage_gone)
    study = optuna.create_study(storage="sqlite:///:memory:", direction="maximize")
    with disable_run_logger(), pytest.raises(KeyboardInterrupt):
        try:
            raise KeyboardInterrupt
        finally:
            tune_flow._hand_back(study, [study.ask()])  # what the trial loop does on its way out
