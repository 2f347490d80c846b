"""The one declaration of run parameters, and everything derived from it: Prefect forms, CLI options,
validation messages, benchmark options and the README's table."""

from __future__ import annotations

import argparse
import ast
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cnn_train.flows.cli import app
from cnn_train.flows.compare_flow import cnn_train_compare
from cnn_train.flows.params import (
    COMPARE_EXCLUDES,
    SWEEP_EXCLUDES,
    TUNE_EXCLUDES,
    CompareOptions,
    ParameterError,
    RunnerOptions,
    RunParameters,
    SweepOptions,
    TuneOptions,
    validate_parameters,
)
from cnn_train.flows.runs import cnn_train_flow
from cnn_train.flows.signatures import add_arguments, declared_fields, form_description, parameter_table
from cnn_train.flows.sweep_flow import cnn_train_sweep
from cnn_train.flows.train_flow import cnn_train
from cnn_train.flows.tune_flow import cnn_train_tune

README = Path(__file__).resolve().parents[1] / "README.md"

FLOWS = {
    "cnn-train": (cnn_train, [RunParameters], ()),
    "compare": (cnn_train_compare, [CompareOptions, RunParameters], COMPARE_EXCLUDES),
    "sweep": (cnn_train_sweep, [SweepOptions, RunParameters, RunnerOptions], SWEEP_EXCLUDES),
    "tune": (cnn_train_tune, [TuneOptions, RunParameters, RunnerOptions], TUNE_EXCLUDES),
}
#: CLI flags that are not the field's name with dashes.
FLAGS = {"backends": "--backend", "ray_resources": "--ray-resource"}
DEVICE_FIELDS = ("prep_device", "train_device", "evaluate_device", "report_device")


@pytest.mark.parametrize("name", FLOWS)
def test_flow_form_is_the_declaration(name):
    flow_obj, models, exclude = FLOWS[name]
    properties = flow_obj.parameters.model_dump()["properties"]
    declared = declared_fields(models, exclude)
    assert list(properties) == list(declared)
    for field, (_, info) in declared.items():
        assert properties[field]["description"] == form_description(info), field
        assert properties[field]["description"].startswith(info.description), field
        assert properties[field].get("default") == info.default, field


#: How a form field's description ends, one field per kind of bound (a whole number below 2**32 is at most 2**32 - 1).
BOUNDS_SAID = {
    "epochs": "Allowed: from 1 to 1,000.",
    "learning_rate": "Allowed: more than 0.",
    "seed": "Allowed: from 0 to 4,294,967,295.",
    "validation_fraction": "Allowed: more than 0 and less than 1.",
    "sample_limit": "Allowed: from 20 to 60,000.",
    "experiment": "MLflow experiment.",  # no bounds, nothing added
}


@pytest.mark.parametrize("field", BOUNDS_SAID)
@pytest.mark.parametrize("name", FLOWS)
def test_the_form_says_the_bounds_its_own_error_leaves_out(name, field):
    """The Prefect form refused epochs=0 with "0 is not valid under any of the given schemas", and no
    description said what was allowed."""
    properties = FLOWS[name][0].parameters.model_dump()["properties"]
    assert properties[field]["description"].endswith(BOUNDS_SAID[field])


@pytest.mark.parametrize(
    ("field", "bad", "refusal", "good"),
    [
        pytest.param("epochs", 0, "0 is less than the minimum of 1", 1, id="epochs"),
        pytest.param("learning_rate", 0, "0 is less than or equal to the minimum of 0", 1e-4, id="learning-rate"),
        pytest.param("validation_fraction", 1, "1 is greater than or equal to the maximum of 1", 0.5, id="validation-fraction"),
        pytest.param("sample_limit", 70_000, "70000 is greater than the maximum of 60000", 60_000, id="sample-limit"),
        pytest.param("experiment", "", "'' should be non-empty", "x", id="experiment"),
        pytest.param("experiment", "   ", "'   ' does not match", "my experiment", id="experiment-blank"),
        pytest.param("seed", 2**32, "4294967296 is greater than or equal to the maximum of 4294967296", 2**32 - 1, id="seed"),
    ],
)
@pytest.mark.parametrize("name", FLOWS)
def test_every_form_carries_the_declared_bounds(name, field, bad, refusal, good):
    """The check the Prefect server (and the UI's form) makes on a deployment run's parameters."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    schema = FLOWS[name][0].parameters.model_dump()
    with pytest.raises(ValidationError, match=re.escape(refusal)):
        validate({field: bad}, schema, raise_on_error=True)
    validate({field: good}, schema, raise_on_error=True)


@pytest.mark.parametrize(
    ("field", "blank"),
    [pytest.param("experiment", " ", id="experiment-space"), pytest.param("experiment", "", id="experiment-empty"),
     pytest.param("backend", "", id="backend-empty")],
)
def test_a_blank_text_with_no_empty_meaning_is_refused_in_words_that_fit(field, blank):
    """pydantic's "String should have at least 1 character" was shown for a value of one space."""
    with pytest.raises(ParameterError) as refused:
        validate_parameters(**{field: blank})
    assert str(refused.value) == f"invalid run parameters: {field}: must hold a character other than spaces (got {blank!r})"


def test_the_dense_baseline_registers_nothing_and_compares_with_nothing():
    """Its child run showed the CNN's `register=NAME` as its own, though nothing registered it."""
    from cnn_train.flows.train_flow import dense_baseline_params

    params = validate_parameters(register="fmnist-cnn", compare_dense=True, epochs=3)
    dense = dense_baseline_params(params)
    assert (dense.architecture, dense.compare_dense, dense.register, dense.epochs) == ("dense", False, None, 3)


@pytest.mark.parametrize(
    "value", ["gpu-preferred", "cuda:1", "cuda:10", "GPU-preferred", " cpu", "CUDA:0", "cuda:", "gpu", "cuda:01", "cuda:\uff11"]
)
def test_the_cli_takes_a_device_exactly_when_the_deployment_does(value):
    """`cnn-train run --train-device X` and `trigger -p train_device=X` agree on every X."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    schema = cnn_train.parameters.model_dump()
    try:
        validate({"train_device": value}, schema, raise_on_error=True)
        deployment_takes = True
    except ValidationError:
        deployment_takes = False
    from pydantic import ValidationError as DeclarationRefused

    try:
        RunParameters(train_device=value)  # what the CLI's options are parsed into (the machine's GPUs aside)
        cli_takes = True
    except DeclarationRefused:
        cli_takes = False
    assert cli_takes == deployment_takes


def test_a_deployment_run_out_of_bounds_or_with_an_unknown_name_is_refused_before_it_exists(prefect_api_url):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from cnn_train.flows.flow_runs import RunRefusedError, start_deployment_run

    deployment_id = cnn_train.to_deployment(name="refusals").apply()
    with pytest.raises(RunRefusedError, match=r"^cnn-train/refusals refused the parameters \{'epochs': 0\}: "
                       r"Validation failed for field 'epochs'. Failure reason: 0 is less than the minimum of 1; "
                       r"epochs takes a whole number from 1 to 1000, or null$"):
        start_deployment_run("cnn-train/refusals", {"epochs": 0})
    # Prefect's own reason for a choice of types names none of them: the line says what the field takes.
    with pytest.raises(RunRefusedError, match=r"'tpu' is not valid under any of the given schemas; train_device takes "
                       r"one of 'cpu', 'gpu-preferred', 'gpu-required', or one card \(cuda:N\)$"):
        start_deployment_run("cnn-train/refusals", {"train_device": "tpu"})
    # A blank experiment made an MLflow experiment named '   '; the command's own check strips and refuses it too.
    with pytest.raises(RunRefusedError, match=r"experiment takes text with a character other than spaces$"):
        start_deployment_run("cnn-train/refusals", {"experiment": "   "})
    with pytest.raises(ParameterError, match=r"^invalid run parameters: experiment: must hold a character other than spaces \(got '   '\)$"):
        validate_parameters(experiment="   ")
    # A name the registry cannot take failed the flow run at its end; blank stays "not given".
    with pytest.raises(RunRefusedError, match=r"register takes a name of letters, digits, '.', '_' and '-', starting with a letter or digit, or null$"):
        start_deployment_run("cnn-train/refusals", {"register": "bad name"})
    with pytest.raises(RunRefusedError, match=r"^cnn-train/refusals has no parameter epoch \(did you mean epochs\?\); "
                       r"its parameters: backend, "):
        start_deployment_run("cnn-train/refusals", {"epoch": 3})
    with get_client(sync_client=True) as client:
        assert client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))) == []


def test_trigger_refuses_a_parameter_the_deployment_refuses_as_a_bad_value(prefect_api_url):
    """Exit 2, as the same mistake in `cnn-train run --epochs 0` (it exited 1, as a run that failed)."""
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app

    cnn_train.to_deployment(name="refusals").apply()
    result = CliRunner().invoke(app, ["trigger", "cnn-train/refusals", "-p", "epochs=0"], env={"PREFECT_API_URL": prefect_api_url})
    assert result.exit_code == 2, result.output
    (line,) = result.output.splitlines()
    assert line.startswith("cnn-train: cnn-train/refusals refused the parameters {'epochs': 0}: "), line


@pytest.mark.parametrize(
    ("deployment", "line"),
    [
        pytest.param("cnn-train/refusal", "cnn-train: no deployment cnn-train/refusal on {api} (did you mean "
                     "cnn-train/refusals?); deployments there: {served}", id="misspelt"),
        pytest.param("default", "cnn-train: 'default' is not a deployment name; give FLOW/DEPLOYMENT, e.g. "
                     "cnn-train/default", id="no-flow-name"),
    ],
)
def test_trigger_names_the_deployments_there_are(prefect_api_url, deployment, line):
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app
    from cnn_train.flows.flow_runs import deployment_names

    cnn_train.to_deployment(name="refusals").apply()
    served = deployment_names()
    assert "cnn-train/refusals" in served
    result = CliRunner().invoke(app, ["trigger", deployment], env={"PREFECT_API_URL": prefect_api_url})
    assert result.exit_code == 2
    assert result.output.strip() == line.format(api=prefect_api_url, served=", ".join(served))


@pytest.mark.parametrize(
    ("flow_name", "field", "words"),
    [
        pytest.param("cnn-train", "epochs", "a whole number from 1 to 1000, or null", id="bounded-or-null"),
        pytest.param("cnn-train", "sample_limit", "a whole number from 20 to 60000, or null", id="range"),
        pytest.param("cnn-train", "validation_fraction", "a number above 0 and below 1", id="open-interval"),
        pytest.param("cnn-train", "architecture", "one of 'cnn', 'dense', 'cnn-improved'", id="closed-choice"),
        pytest.param("cnn-train", "evaluate_device", "one of 'cpu', 'gpu-preferred', 'gpu-required', or one card (cuda:N)",
                     id="choice-or-pattern"),
        pytest.param("cnn-train", "backend", "non-empty text", id="non-empty"),
        pytest.param("cnn-train", "experiment", "text with a character other than spaces", id="not-blank"),
        pytest.param("cnn-train", "compare_dense", "true or false", id="flag"),
        pytest.param("compare", "backends", "a list (at least 2 items, each once) of text", id="list"),
    ],
)
def test_a_refused_parameter_is_told_what_it_takes(flow_name, field, words):
    from cnn_train.flows.flow_runs import what_schema_takes

    schema = FLOWS[flow_name][0].parameters.model_dump()
    assert what_schema_takes(schema["properties"][field], schema.get("definitions", {})) == words


@pytest.mark.parametrize("name", FLOWS)
def test_every_parameter_of_every_form_can_be_told_in_words(name):
    from cnn_train.flows.flow_runs import what_schema_takes

    schema = FLOWS[name][0].parameters.model_dump()
    told = {field: what_schema_takes(prop, schema.get("definitions", {})) for field, prop in schema["properties"].items()}
    assert not [field for field, words in told.items() if "a value" in words], told


@pytest.mark.parametrize("name", FLOWS)
def test_the_flow_docstring_is_its_description_in_the_prefect_ui(name):
    flow_obj = FLOWS[name][0]
    assert flow_obj.description == inspect.getdoc(flow_obj.fn) and len(flow_obj.description) > 40


def test_a_flow_without_a_docstring_is_refused_where_it_is_declared():
    def undocumented(**values):
        return values

    with pytest.raises(TypeError, match=r"^flow 'cnn-train' needs a docstring: it is the flow's description in the Prefect UI$"):
        cnn_train_flow("cnn-train", RunParameters)(undocumented)


def test_a_flow_that_cnn_train_runs_would_not_list_is_refused_where_it_is_declared():
    with pytest.raises(TypeError, match=r"^flow name 'cnn-train-new' is not in cnn_train.flows.flow_runs.FLOW_NAMES, which `cnn-train runs` lists$"):
        cnn_train_flow("cnn-train-new", RunParameters)


@pytest.mark.parametrize("name", FLOWS)
def test_closed_choices_are_dropdowns_in_every_form(name):
    properties = FLOWS[name][0].parameters.model_dump()["properties"]
    assert properties["architecture"]["enum"] == ["cnn", "dense", "cnn-improved"]
    for field in (f for f in DEVICE_FIELDS if f in properties):
        choices = [option["enum"] for option in properties[field]["anyOf"] if "enum" in option]
        assert choices == [["cpu", "gpu-preferred", "gpu-required"]], field
    if "task_runner" in properties:  # a search's trials: in threads or on Ray, from the form too
        assert properties["task_runner"]["enum"] == ["local", "ray"]


@pytest.mark.parametrize(
    "command, models, exclude",
    [
        pytest.param("run", [RunParameters], (), id="run"),
        pytest.param("compare", [CompareOptions, RunParameters], COMPARE_EXCLUDES, id="compare"),
        pytest.param("sweep", [SweepOptions, RunParameters, RunnerOptions], SWEEP_EXCLUDES, id="sweep"),
        pytest.param("tune", [TuneOptions, RunParameters, RunnerOptions], TUNE_EXCLUDES, id="tune"),
    ],
)
def test_cli_options_are_the_declaration(command, models, exclude):
    # An 80-column terminal: every option's name whole (rich's help table cut "--validation-fra…").
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    help_text = " ".join(result.output.split())
    for field in declared_fields(models, exclude):
        flag = FLAGS.get(field, "--" + field.replace("_", "-"))
        assert flag in help_text, field


#: What --help shows for each command's repeatable options: the option and one item.
REPEATABLE_OPTIONS = {
    "compare": ["--backend NAME"],
    "sweep": ["--grid FIELD=V1,V2", "--ray-resource NAME=AMOUNT"],
    "tune": ["--space FIELD=SPEC", "--ray-resource NAME=AMOUNT"],
    "trigger": ["--param NAME=VALUE"],
    "check-backend": ["--check CHECK"],
}


@pytest.mark.parametrize(("command", "shown"), REPEATABLE_OPTIONS.items(), ids=list(REPEATABLE_OPTIONS))
def test_a_repeatable_option_shows_what_one_item_looks_like(command, shown):
    """Not typer's "<list[str]>": the item a user types, once per repetition."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    options = result.output.split("Options:")[1]
    flat = " ".join(options.split())
    assert [item for item in shown if item not in flat] == []
    assert "list[" not in options


def test_the_command_list_gives_each_summary_whole_in_80_columns():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    # Click wraps after hyphens too ("cnn-" at a line's end, "train/default" on the next).
    listing = " ".join(result.output.split("Commands:")[1].split()).replace("- ", "-")
    for command in app.registered_commands:
        summary = " ".join(inspect.getdoc(command.callback).split("\n\n")[0].split()).split(". ")[0]
        assert summary in listing, command.callback.__name__


@pytest.mark.parametrize(
    ("command", "option", "items"),
    [
        pytest.param("sweep", "--grid", "learning_rate=0.001,0.0003 architecture=cnn,dense", id="sweep-grid"),
        pytest.param("tune", "--space", "learning_rate=log:1e-4:1e-2 batch_size=32,64,128", id="tune-space"),
    ],
)
def test_a_mapping_left_out_takes_its_declared_default(command, option, items):
    """Not given, --grid and --space are the declaration's default (typer alone passed str(dict) as one
    item, which the command refused); --help shows it as the items one would type."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # A configured API (never reached): no temporary server starts; the checks end the command first.
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        result = CliRunner().invoke(app, [command, "--max-concurrent", "0"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "cnn-train: invalid parameters: max_concurrent: Input should be greater than or equal to 1 (got 0)"
    ]
    help_text = " ".join(CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"}).output.split())
    assert f"[default: ({items})]" in help_text, option


def test_readme_parameter_table_is_rendered_from_the_declaration():
    text = README.read_text(encoding="utf-8")
    rendered = re.search(r"<!-- parameters:[^\n]*-->\n(.*?)\n<!-- /parameters -->", text, re.S)
    assert rendered, "README lost its parameter-table markers"
    assert rendered.group(1) == parameter_table()


def test_benchmark_options_take_the_declared_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser, ("validation_fraction", "sample_limit", "seed", "compare_dense"))
    args = parser.parse_args([])
    assert (args.validation_fraction, args.sample_limit, args.seed, args.compare_dense) == (0.1, None, 42, False)
    assert parser.parse_args(["--sample-limit", "300"]).sample_limit == 300


@pytest.mark.parametrize(
    "value",
    [np.int64(3), np.int32(3), np.uint16(3), np.float64(3.0), np.float32(3.0), 3.0, 3],
    ids=lambda value: f"{type(value).__name__}",
)
def test_a_whole_number_of_any_numeric_type_is_taken_as_an_int(value):
    """A notebook's loop over np.arange gave 'epochs: must be a whole number (got np.int64(1))'."""
    params = validate_parameters(epochs=value, seed=value, sample_limit=value * 100)
    assert (params.epochs, params.seed, params.sample_limit) == (3, 3, 300)
    assert all(type(v) is int for v in (params.epochs, params.seed, params.sample_limit))


@pytest.mark.parametrize("value", [np.float32(2.5), np.float64("nan"), "3", np.bool_(True), True], ids=repr)
def test_a_number_that_is_not_whole_is_refused_whatever_its_type(value):
    with pytest.raises(ParameterError, match=r"^invalid run parameters: epochs: must be a whole number \(got "):
        validate_parameters(epochs=value)


@pytest.mark.parametrize(
    "values, expected",
    [
        pytest.param({"architecture": "resnet"}, r"architecture: .*'cnn', 'dense' or 'cnn-improved'", id="architecture"),
        # A check of the whole model: its own message, not the model's name and every value it was given.
        pytest.param({"epochs": 2.5}, r"^invalid run parameters: epochs: must be a whole number \(got 2.5\)$",
                     id="fractional-epochs"),
        pytest.param({"epochs": 0}, r"epochs: .*greater than or equal to 1", id="zero-epochs"),
        pytest.param({"train_device": "tpu"}, r"train_device: .*cuda:", id="device"),
        pytest.param({"backend": "nope"}, r"backend: .*nope.*installed", id="unknown-backend"),
        pytest.param(
            {"validation_fraction": 0.999, "sample_limit": 200},
            r"validation_fraction=0.999 leaves too few training images.*use validation_fraction between",
            id="validation-fraction-names-the-real-cause",
        ),
        pytest.param(
            {"batch_size": 500, "sample_limit": 200}, r"batch_size: 500 is larger than the training set", id="batch"
        ),
    ],
)
def test_bad_values_are_one_line_naming_the_field(values, expected):
    with pytest.raises(ParameterError) as error:
        validate_parameters(**values)
    message = str(error.value)
    assert "\n" not in message
    assert re.search(expected, message), message


@pytest.mark.parametrize("blank", ["", "  "], ids=["empty", "spaces"])
def test_blank_text_is_a_field_not_given(blank):
    """What a cleared field of the Prefect form or `--data-dir ''` sends: what the description says empty means."""
    from cnn_train.flows.params import PredictOptions

    params = validate_parameters(data_dir=blank, register=blank)
    assert (params.data_dir, params.register) == (None, None)
    checked_by_prefect = cnn_train.validate_parameters({"data_dir": blank, "register": blank})  # a deployment run's check
    assert (checked_by_prefect["data_dir"], checked_by_prefect["register"]) == (None, None)
    tune = TuneOptions(study_name=blank, storage=blank, register_best=blank)
    assert (tune.study_name, tune.storage, tune.register_best) == (None, None, None)
    assert SweepOptions(register_best=blank).register_best is None
    assert PredictOptions(images="photos", model=blank).model is None


def test_a_whole_number_written_as_a_float_is_that_number():
    """`prefect deployment run cnn-train/default -p epochs=2.0`: Prefect's server takes JSON's 2.0 as an integer."""
    params = validate_parameters(epochs=2.0, sample_limit=1e3, seed=7.0)
    assert (params.epochs, params.sample_limit, params.seed) == (2, 1000, 7)
    assert all(type(value) is int for value in (params.epochs, params.sample_limit, params.seed))
    from prefect.utilities.schema_tools.validation import validate

    validate({"epochs": 2.0}, cnn_train.parameters.model_dump(), raise_on_error=True)  # the server's own check


def test_a_data_dir_that_is_one_of_the_files_names_its_folder(tmp_path):
    (file := tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(ParameterError) as refused:
        validate_parameters(data_dir=str(file))
    assert str(refused.value) == (
        f"data_dir: {file} is a file; name the folder holding it ({tmp_path}), or leave it empty to search the usual places"
    )


@pytest.mark.parametrize(
    ("values", "refused"),
    [
        pytest.param({"compare_dense": True}, True, id="compared"),
        pytest.param({"compare_dense": False}, False, id="not-compared"),
    ],
)
def test_a_backend_without_the_dense_network_is_refused_a_comparison_before_training(values, refused, monkeypatch):
    """Not after the run's own training, where building the baseline failed the whole run."""
    from cnn_train.plugins import registry
    from tests.plugin_fixtures import FakeDistribution, only_distributions

    only_distributions(monkeypatch, FakeDistribution("cnn-only", {"cnn-only": "tests.plugin_fixtures:CnnOnly"}))
    try:
        if not refused:
            assert validate_parameters(backend="cnn-only", **values).trains_dense_baseline is False
            return
        with pytest.raises(ParameterError) as error:
            validate_parameters(backend="cnn-only", **values)
        assert str(error.value) == (
            "compare_dense: backend 'cnn-only' cannot build the dense network to compare with (it supports: cnn); "
            "set compare_dense to false (--no-compare-dense)"
        )
    finally:
        monkeypatch.undo()
        registry.refresh()


@pytest.mark.parametrize(
    ("architecture", "baseline"), [("cnn", True), ("cnn-improved", True), ("dense", False)]
)
def test_every_cnn_is_compared_with_the_dense_network(architecture, baseline):
    assert validate_parameters(architecture=architecture, compare_dense=True).trains_dense_baseline is baseline


@pytest.mark.parametrize(
    ("backends", "twice"),
    [(["torch"], ""), (["torch", "torch"], "torch"), (["keras", "torch", "torch"], "torch"), ([], ""), (["torch,"], ""),
     (["torch,torch"], "torch")],
    ids=["one", "the-same-twice", "one-repeated", "none", "one-with-a-comma", "the-same-twice-in-one"],
)
def test_a_comparison_needs_two_or_more_backends_each_once(backends, twice):
    from cnn_train.flows.compare_flow import validate_compare

    with pytest.raises(ParameterError) as refused:
        validate_compare({"backends": backends})
    assert str(refused.value) == (  # the name given twice is named: 'torch,torch' read as one name
        f"invalid parameters: backends: {twice + ' given twice; ' if twice else ''}give at least two backend names, "
        f"each once (e.g. keras and torch) (got {backends!r})"
    )


def test_a_comparison_refuses_an_infinite_tolerance():
    """inf was taken from the CLI ("parity: max gap 1.80 points <= inf") and refused by the deployment."""
    from cnn_train.flows.compare_flow import validate_compare

    with pytest.raises(ParameterError, match=r"tolerance_points: Input should be a finite number \(got inf\)$"):
        validate_compare({"tolerance_points": float("inf")})


def test_the_compare_deployment_refuses_the_same_backend_twice_before_its_run_exists():
    """The schema took ["torch", "torch"], and the flow run it created failed."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from cnn_train.flows.compare_flow import cnn_train_compare

    schema = cnn_train_compare.parameters.model_dump()
    with pytest.raises(ValidationError, match="non-unique"):
        validate({"backends": ["torch", "torch"]}, schema, raise_on_error=True)
    validate({"backends": ["torch", "keras"]}, schema, raise_on_error=True)


@pytest.mark.parametrize(
    ("given", "backends"),
    [
        pytest.param(["keras,torch"], ["keras", "torch"], id="comma-separated"),
        pytest.param(["keras, torch", "numpy"], ["keras", "torch", "numpy"], id="mixed"),
    ],
)
def test_backend_names_may_be_given_comma_separated_as_a_grid_s_values(given, backends):
    from cnn_train.flows.params import CompareOptions

    assert CompareOptions(backends=given).backends == backends


@pytest.mark.parametrize("options", [TuneOptions, SweepOptions], ids=["tune", "sweep"])
def test_register_best_takes_what_a_registered_name_takes(options):
    with pytest.raises(ValueError, match="a registered model name takes letters, digits"):
        options(register_best="team/model")


@pytest.mark.parametrize(
    "architecture, expected",
    [
        pytest.param("cnn", (10, 32, 1e-3), id="lesson"),
        pytest.param("cnn-improved", (7, 128, 3e-3), id="recipe"),
    ],
)
def test_empty_training_values_take_the_architectures_own(architecture, expected):
    params = validate_parameters(architecture=architecture)
    assert (params.epochs, params.batch_size, params.learning_rate) == expected
    assert validate_parameters(architecture=architecture, epochs=3).epochs == 3


#: Run parameters whose names mean the same anywhere in the code (``seed`` or ``batch_size`` of a
#: backend's own evaluate() are other things).
_RUN_ONLY = ("backend", "architecture", "validation_fraction", "experiment", "compare_dense", *DEVICE_FIELDS)


def test_no_function_repeats_a_run_parameters_default():
    sources = Path(__file__).resolve().parents[1]
    repeated = []
    for folder in ("flows", "plugins", "backends"):
        for path in (sources / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    arguments = [*node.args.args, *node.args.kwonlyargs]
                    defaults = [*node.args.defaults, *node.args.kw_defaults]
                    named = dict(zip([a.arg for a in arguments][::-1], defaults[::-1], strict=False))
                    repeated += [
                        f"{path.relative_to(sources)}:{node.lineno} {node.name}({name}=...)"
                        for name, default in named.items()
                        if name in _RUN_ONLY and default is not None
                        and not (isinstance(default, ast.Constant) and default.value is None)
                    ]
    assert repeated == []


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({}, id="defaults"),
        pytest.param({"backend": "keras", "batch_size": 64, "learning_rate": 0.0029106359131330704, "epochs": 2,
                      "sample_limit": 800, "test_limit": 200}, id="a-trial-exactly"),
        pytest.param({"architecture": "cnn-improved", "epochs": 10}, id="recipe-with-more-epochs"),
        pytest.param({"data_dir": "/data/fashion mnist", "experiment": "my runs", "register": "fmnist"}, id="words-to-quote"),
        pytest.param({"compare_dense": True, "train_device": "cpu", "seed": 0}, id="flag-and-device"),
    ],
)
def test_run_command_trains_with_the_same_parameters(values: dict) -> None:
    import shlex

    import typer

    from cnn_train.flows.signatures import run_command

    params = RunParameters(**values)
    words = shlex.split(run_command(params))
    assert words[:2] == ["cnn-train", "run"]
    # The real `cnn-train run` parser reads the command back: the same parameters, nothing lost.
    context = typer.main.get_command(app).commands["run"].make_context("run", words[2:])
    parsed = {name: value for name, value in context.params.items() if name in RunParameters.model_fields}
    assert RunParameters(**parsed) == params
    assert run_command(RunParameters(architecture=params.architecture)).count("--") == (params.architecture != "cnn")


@pytest.mark.parametrize(("seed", "reproduces"), [(42, True), (2, False)], ids=["split-seed", "a-varied-seed"])
def test_train_again_gives_a_command_only_where_it_reproduces_the_trial(seed: int, reproduces: bool) -> None:
    """A sweep over seed printed `cnn-train run --seed 2`, which splits by seed 2: 74.80% where the trial had 78.20%."""
    from cnn_train.flows.signatures import run_command, train_again

    params = RunParameters(seed=seed, epochs=2)
    said = train_again(params, split_seed=42)
    if reproduces:
        assert said == f"`{run_command(params)}`"
    else:
        assert said == ("no `cnn-train run` does exactly: its seed 2 varied the weights and shuffles only, on the split of "
                        "seed 42, and `cnn-train run --seed` sets both")
