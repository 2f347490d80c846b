"""Deliberately broken backends: the kit fails exactly the check guarding the promise each one breaks,
by name, and passes the rest. (A missing method, one failure and the rest not run, is in test_conformance.)"""

from __future__ import annotations

import pytest

from cnn_train.plugins.conformance import run_checks
from tests.plugin_fixtures import make_channels_first_maps_backend
from tests.plugin_fixtures_numpy import (
    AcceptsAnyDevice,
    ForgetsOptimizerState,
    IgnoresStopRequest,
    NoRealResume,
    PredictsWithTheGlobalGenerator,
    ReadsVisibleDevices,
    RunsNvidiaSmi,
    ShufflesWithTheGlobalGenerator,
    UnknownFlavor,
)

#: The checks that log to or watch MLflow: only the flavor variant is about them, and they cost most.
_MLFLOW_CHECKS = ("does_not_log_to_mlflow", "model_logging")


def _failures(backend: type, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    from cnn_train.plugins.conformance import CHECK_NAMES

    results = run_checks(backend, only=[name for name in CHECK_NAMES if name not in skip])
    return {result.name: result.reason for result in results if result.failed}


@pytest.mark.parametrize(
    ("backend", "check", "reason"),
    [
        pytest.param(UnknownFlavor, "model_logging", "UnloggableModelError: unknown MLflow flavor 'no_such_flavor'", id="unknown-flavor"),
        pytest.param(NoRealResume, "resume", "on_epoch saw epochs [1, 2], expected [2]", id="no-real-resume"),
        pytest.param(ForgetsOptimizerState, "resume", "must keep the optimizer state", id="forgets-optimizer-state"),
        pytest.param(IgnoresStopRequest, "stops_when_asked", "but training went on (on_epoch saw epochs [1, 2, 3])", id="ignores-stop-request"),
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
    failures = _failures(backend, skip=() if check == "model_logging" else _MLFLOW_CHECKS)
    assert list(failures) == [check], failures
    assert reason in failures[check]


def test_wrong_feature_map_shape_fails_feature_maps_shapes():
    results = run_checks(make_channels_first_maps_backend(), only=["feature_maps_shapes", "first_conv_kernels_shape"])
    assert [(result.name, result.status) for result in results] == [
        ("feature_maps_shapes", "failed"), ("first_conv_kernels_shape", "passed")
    ]
    assert "architecture 'cnn': feature map 'conv1' has shape (3, 32, 28, 28), expected (3, 28, 28, 32)" in results[0].reason
