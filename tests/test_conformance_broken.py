"""Deliberately broken backends: the kit fails exactly the check guarding the promise each one breaks,
by name, and passes the rest. (A missing method, one failure and the rest not run, is in test_conformance.)"""

from __future__ import annotations

import sys

import pytest

from cnn_train.plugins.conformance import CHECKS, CheckStatus, run_checks
from tests.plugin_fixtures import make_channels_first_maps_backend
from tests.plugin_fixtures_numpy import (
    AcceptsAnyDevice,
    AsksJaxForDevices,
    CountsAsText,
    EvaluatesToATuple,
    FixedInitialWeights,
    FlavorMismatch,
    ForgetsOptimizerState,
    HalvedProbabilities,
    IgnoresStopRequest,
    IgnoresTheSeed,
    LogsADict,
    NoRealResume,
    NumpyMLPBackend,
    PredictsWithTheGlobalGenerator,
    ReadsVisibleDevices,
    RunsNvidiaSmi,
    ShufflesWithTheGlobalGenerator,
    TrainReturnsNothing,
    TransposedProbabilities,
    UnknownFlavor,
)

#: The checks that log to or watch MLflow: none of the variants is about them, and they cost most.
_MLFLOW_CHECKS = ("does_not_log_to_mlflow", "model_logging")


def _failures(backend: type, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    from cnn_train.plugins.conformance import CHECK_NAMES

    results = run_checks(backend, only=[name for name in CHECK_NAMES if name not in skip])
    return {result.name: result.reason for result in results if result.failed}


@pytest.mark.parametrize(
    ("backend", "check", "reason"),
    [
        pytest.param(UnknownFlavor, "contract_members", "mlflow_flavor 'no_such_flavor' is no MLflow flavor (there is no mlflow.no_such_flavor)", id="unknown-flavor"),
        pytest.param(NoRealResume, "resume", "on_epoch saw epochs [1, 2], expected [2]", id="no-real-resume"),
        pytest.param(ForgetsOptimizerState, "resume", "must keep the optimizer state", id="forgets-optimizer-state"),
        pytest.param(IgnoresStopRequest, "stops_when_asked", "but training went on (on_epoch saw epochs [1, 2, 3])", id="ignores-stop-request"),
        pytest.param(FixedInitialWeights, "seed_changes_training", "trained alike, gave identical models", id="fixed-initial-weights"),
        pytest.param(IgnoresTheSeed, "seed_changes_training", "trained alike, gave identical models", id="ignores-the-seed"),
        pytest.param(ReadsVisibleDevices, "uses_given_device", "looked for devices itself (read $CUDA_VISIBLE_DEVICES)", id="reads-visible-devices"),
        pytest.param(RunsNvidiaSmi, "uses_given_device", "looked for devices itself (ran nvidia-smi)", id="runs-nvidia-smi"),
        pytest.param(AcceptsAnyDevice, "uses_given_device", "build(device='cuda:99') ran anyway", id="accepts-any-device"),
        pytest.param(
            ShufflesWithTheGlobalGenerator, "leaves_process_wide_generators_alone",
            "training seeded or drew from NumPy's np.random generator", id="shuffles-with-the-global-generator",
        ),
        pytest.param(
            PredictsWithTheGlobalGenerator, "leaves_process_wide_generators_alone",
            "predicting seeded or drew from NumPy's np.random generator", id="predicts-with-the-global-generator",
        ),
    ],
)
def test_the_kit_names_the_broken_promise(backend, check, reason):
    failures = _failures(backend, skip=_MLFLOW_CHECKS)
    assert list(failures) == [check], failures
    assert reason in failures[check]


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        pytest.param(CountsAsText, {"parameter_counts": "parameter_count() returned str '101770', expected int"},
                     id="count-as-text"),
        pytest.param(TrainReturnsNothing, {"smoke_train": "train() returned NoneType None, expected TrainHistory"},
                     id="train-returns-none"),
        pytest.param(LogsADict, {"model_logging": "loggable_model() returned dict {'flavor': 'pyfunc', "},
                     id="loggable-model-as-dict"),
    ],
)
def test_a_result_of_the_wrong_type_is_named_by_the_check_that_gets_it(backend, expected):
    """Each failed on what the result lacked (``'dict' object has no attribute 'flavor'``), or passed."""
    only = [*expected, "does_not_log_to_mlflow"] if "model_logging" in expected else None
    failures = _failures(backend, skip=() if only else _MLFLOW_CHECKS) if only is None else {
        result.name: result.reason for result in run_checks(backend, only=only) if result.failed
    }
    assert sorted(failures) == sorted(expected), failures
    for check, reason in expected.items():
        assert failures[check].startswith(reason), failures[check]


def test_an_evaluate_that_returns_a_tuple_fails_one_check_and_the_checks_that_train_are_not_run():
    """It failed 13 checks with ``AttributeError: 'tuple' object has no attribute 'loss'``, blamed on fit."""
    results = {result.name: result for result in run_checks(EvaluatesToATuple)}
    assert [name for name, result in results.items() if result.failed] == ["smoke_train"]
    assert results["smoke_train"].reason.startswith("TypeError: run_epochs' validate() returned tuple (")
    assert "expected Evaluation" in results["smoke_train"].reason
    trains = [check.name for check in CHECKS if "smoke_train" in check.requires]
    assert {name: (results[name].status, results[name].reason) for name in trains} == dict.fromkeys(
        trains, (CheckStatus.NOT_RUN, "smoke_train failed")
    )
    assert results["rejects_labels_out_of_range"].passed  # what does not train still runs


def test_a_flavor_other_than_the_logged_models_fails_model_logging():
    """It failed does_not_log_to_mlflow, which is about something else."""
    results = {result.name: result for result in run_checks(FlavorMismatch, only=list(_MLFLOW_CHECKS))}
    assert not results["does_not_log_to_mlflow"].failed
    assert results["model_logging"].reason.startswith(
        "loggable_model().flavor is 'pyfunc' but the class's mlflow_flavor is 'sklearn'"
    )


def test_wrong_feature_map_shape_fails_feature_maps_shapes():
    results = run_checks(make_channels_first_maps_backend(), only=["feature_maps_shapes", "first_conv_kernels_shape"])
    assert [(result.name, result.status) for result in results] == [
        ("feature_maps_shapes", "failed"), ("first_conv_kernels_shape", "passed")
    ]
    assert "architecture 'cnn': feature map 'conv1' has shape (3, 32, 28, 28), expected (3, 28, 28, 32)" in results[0].reason


@pytest.mark.parametrize(
    ("backend", "reason"),
    [
        pytest.param(
            TransposedProbabilities, "predict_proba returned shape (10, 8) for 8 images, expected (8, 10)", id="transposed"
        ),
        pytest.param(
            HalvedProbabilities,
            "the rows predict_proba returned sum to 0.5..0.5, expected 1 (within 0.001): end the network with a softmax",
            id="rows-summing-to-a-half",
        ),
    ],
)
def test_probabilities_that_are_not_are_named_with_what_was_seen(backend, reason):
    """By predict_proba's own check, and by model_logging before it compares with the logged model (it
    used to end on NumPy's broadcasting error)."""
    results = {r.name: r for r in run_checks(backend, only=["predict_proba", "model_logging"])}
    assert results["predict_proba"].failed and results["model_logging"].failed
    assert reason.replace("8", "23") in results["predict_proba"].reason
    assert results["model_logging"].reason == reason


@pytest.mark.parametrize(
    ("args", "kwargs", "looked"),
    [
        pytest.param(("cpu",), {}, None, id="the-given-platform"),
        pytest.param((), {"backend": "cpu"}, None, id="the-given-platform-by-keyword"),
        pytest.param((), {}, "called jax.devices()", id="every-device"),
        pytest.param(("gpu",), {}, "called jax.devices('gpu')", id="another-platform"),
    ],
)
def test_asking_jax_for_the_given_platforms_device_is_not_looking_for_one(monkeypatch, args, kwargs, looked):
    """JAX turns a device string into its device object through jax.devices(platform): a JAX backend must be
    able to, and still must not list every device or another platform's."""
    import types

    fake_jax = types.ModuleType("jax")
    fake_jax.devices = lambda backend=None: ["a device"]
    monkeypatch.setitem(sys.modules, "jax", fake_jax)
    monkeypatch.setattr(AsksJaxForDevices, "JAX_CALL", (args, kwargs))
    (result,) = run_checks(AsksJaxForDevices, only=["uses_given_device"])
    if looked is None:
        assert result.passed, result.reason
    else:
        assert result.failed and f"looked for devices itself ({looked})" in result.reason, result.reason
        assert "e.g. jax.devices('cpu')[0]" in result.reason


def test_a_probe_the_backend_imported_by_name_is_watched_too(monkeypatch):
    """``from jax import devices`` in the backend's module binds the function before the kit patches
    ``jax.devices``: such a call escaped the watch."""
    import types

    fake_jax = types.ModuleType("jax")
    fake_jax.devices = lambda backend=None: ["a device"]
    monkeypatch.setitem(sys.modules, "jax", fake_jax)
    plugin = types.ModuleType("probe_by_name_plugin")
    plugin.devices = fake_jax.devices  # what `from jax import devices` leaves in the plugin's module
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)

    class AsksByName(NumpyMLPBackend):
        def build(self, config, *, device, seed):
            sys.modules["probe_by_name_plugin"].devices()
            super().build(config, device=device, seed=seed)

    AsksByName.__module__ = plugin.__name__
    (result,) = run_checks(AsksByName, only=["uses_given_device"])
    assert result.failed and "looked for devices itself (called jax.devices())" in result.reason, result.reason
