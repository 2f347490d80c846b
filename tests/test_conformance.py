"""The conformance kit: the project's own backends pass it, broken ones fail the named check once,
checks that do not apply are skipped with the reason, and a real out-of-tree plugin package is
discovered and passes it too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from cnn_train.backends.torch_backend import TorchBackend
from cnn_train.plugins import registry
from cnn_train.plugins.config import ModelConfig, TrainConfig
from cnn_train.plugins.conformance import (
    CHECK_NAMES,
    CHECKS,
    CheckResult,
    CheckStatus,
    parametrize_with_checks,
    run_checks,
)
from cnn_train.plugins.contract import PLAIN_TRAINING, BackendInputError, TrainData
from tests.plugin_fixtures import (
    FakeDistribution,
    GoodBackend,
    MissingTrain,
    only_distributions,
    pip_install,
    write_dist_info,
)
from tests.plugin_fixtures_numpy import LeavesARunActive, LogsARun

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ROOT / "plugins" / "examples" / "sklearn_mlp"
#: Checks that need a convolution, which the dense-only example plugin does not build.
CONVOLUTION_CHECKS = ("custom_config_parameter_count", "feature_maps_shapes", "first_conv_kernels_shape")
GATES = ("entry_point_load", "contract_members")


@parametrize_with_checks("torch")
def test_torch_backend_conforms(check):
    check()


@parametrize_with_checks("keras")
def test_keras_backend_conforms(check):
    check()


@pytest.fixture
def installed(monkeypatch):
    """Make the distributions a test lists the only installed ones; the registry forgets them afterwards."""
    yield lambda *distributions: only_distributions(monkeypatch, *distributions)
    registry.refresh()


def _params(mark: pytest.MarkDecorator) -> dict[str, object]:
    """The bound checks of a parametrize_with_checks mark, by test id."""
    return {param.id: param.values[0] for param in mark.args[1]}


def test_check_ids_are_check_names():
    assert list(_params(parametrize_with_checks("torch"))) == list(CHECK_NAMES)


def test_unknown_expected_failure_is_refused():
    with pytest.raises(ValueError, match=r"unknown check\(s\) \['no_such_check'\]; available: entry_point_load, contract_members"):
        parametrize_with_checks("torch", expected_failures={"no_such_check": "why"})


def test_run_checks_rejects_unknown_check_name():
    with pytest.raises(ValueError, match=r"unknown check\(s\) \['bogus'\]; available: "):
        run_checks("torch", only=("bogus",))


@pytest.mark.parametrize("check", CHECKS, ids=CHECK_NAMES)
def test_each_check_comes_after_what_it_requires(check):
    earlier = CHECK_NAMES[: CHECK_NAMES.index(check.name)]
    assert set(check.requires) <= set(earlier)
    for required in check.requires:
        transitive = next(c for c in CHECKS if c.name == required).requires
        assert set(transitive) <= set(check.requires), f"{check.name} must also require {transitive}"


@pytest.fixture(scope="module")
def shape_only_results() -> dict[str, CheckResult]:
    """The kit against a class that keeps the contract's shape but does nothing (cheap: nothing trains)."""
    return {result.name: result for result in run_checks(GoodBackend)}


@pytest.mark.parametrize(
    ("name", "status", "reason"),
    [
        pytest.param("entry_point_load", CheckStatus.SKIPPED, "is checked as a class and is not registered", id="entry_point_load"),
        pytest.param("contract_members", CheckStatus.PASSED, "", id="contract_members"),
        pytest.param("parameter_counts", CheckStatus.FAILED, "architecture 'dense' has 0 parameters, expected 101,770", id="parameter_counts"),
        pytest.param("custom_config_parameter_count", CheckStatus.SKIPPED, "does not build the 'cnn' architecture", id="custom_config_parameter_count"),
        pytest.param("feature_maps_shapes", CheckStatus.SKIPPED, "builds only dense, which has no convolution layers", id="feature_maps_shapes"),
        pytest.param("first_conv_kernels_shape", CheckStatus.SKIPPED, "builds only dense, which has no convolution layers", id="first_conv_kernels_shape"),
        pytest.param("smoke_train", CheckStatus.FAILED, "on_epoch saw epochs [], expected [1]", id="smoke_train"),
        pytest.param("rejects_empty_data", CheckStatus.FAILED, "train on zero images: accepted without error", id="rejects_empty_data"),
        pytest.param("uses_given_device", CheckStatus.NOT_RUN, "smoke_train failed", id="uses_given_device"),
    ],
)
def test_shape_only_backend(shape_only_results, name, status, reason):
    result = shape_only_results[name]
    assert result.status is status
    assert reason in result.reason
    assert result.passed is (status is CheckStatus.PASSED)


@pytest.mark.parametrize("by", ["name", "class"])
def test_missing_method_fails_one_check_and_the_rest_are_not_run(installed, by):
    installed(FakeDistribution("bad-plugin", {"bad": "tests.plugin_fixtures:MissingTrain"}))
    results = {result.name: result for result in run_checks("bad" if by == "name" else MissingTrain)}
    assert results["contract_members"].failed
    assert "method train() is missing" in results["contract_members"].reason
    assert results["entry_point_load"].passed
    not_run = {name: result.reason for name, result in results.items() if name not in GATES}
    assert not_run == dict.fromkeys(CHECK_NAMES[len(GATES):], "contract_members failed")
    assert all(results[name].status is CheckStatus.NOT_RUN for name in not_run)


def test_backend_that_does_not_load_fails_one_check(installed):
    installed(FakeDistribution("jax-plugin", {"needs-jax": "tests.plugin_fixtures_needs_jax:Backend"}))
    [load, *rest] = run_checks("needs-jax")
    assert load.failed and "install the distribution that provides module 'jax_not_installed_here'" in load.reason
    assert {(result.status, result.reason) for result in rest} == {(CheckStatus.NOT_RUN, "entry_point_load failed")}


def test_only_runs_what_the_named_checks_require_without_reporting_it():
    assert run_checks(MissingTrain, only=["smoke_train"]) == [
        CheckResult("smoke_train", CheckStatus.NOT_RUN, "contract_members failed")
    ]


@pytest.mark.parametrize(
    ("backend", "check", "reason"),
    [
        pytest.param(MissingTrain, "smoke_train", "contract_members failed", id="requirement-failed"),
        pytest.param(GoodBackend, "evaluate", "smoke_train failed", id="smoke-training-failed"),
        pytest.param(GoodBackend, "feature_maps_shapes", "which has no convolution layers", id="not-applicable"),
    ],
)
def test_pytest_skips_with_the_reason(backend, check, reason):
    bound = _params(parametrize_with_checks(backend))[check]
    with pytest.raises(pytest.skip.Exception, match=reason):
        bound()


class TrainingFails(GoodBackend):
    """Counts its trainings, each of which fails."""

    trainings = 0

    def train(self, data, config, *, on_epoch=None, initial_epoch=0):
        type(self).trainings += 1
        raise RuntimeError("the training broke")


def test_pytest_skips_every_check_that_trains_after_one_failed_smoke_training():
    bound = _params(parametrize_with_checks(TrainingFails))
    trains = [check.name for check in CHECKS if "smoke_train" in check.requires]
    assert len(trains) >= 10
    for name in trains:
        with pytest.raises(pytest.skip.Exception, match="smoke_train failed"):
            bound[name]()
    assert TrainingFails.trainings == 1
    with pytest.raises(RuntimeError, match="the training broke"):
        bound["smoke_train"]()


@pytest.mark.parametrize("backend", [LogsARun, LeavesARunActive], ids=["logs-a-run", "leaves-a-run-active"])
def test_logging_to_mlflow_fails_the_kit_and_leaves_mlflow_as_it_was(backend):
    uri_before, env_before = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    [result] = run_checks(backend, only=["does_not_log_to_mlflow"])
    assert result.failed
    assert result.reason.startswith("the backend wrote to MLflow itself (run ")
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == (uri_before, env_before)
    assert mlflow.active_run() is None


@pytest.mark.parametrize("backend", [LogsARun, LeavesARunActive], ids=["logs-a-run", "leaves-a-run-active"])
def test_no_check_lets_a_backend_that_logs_write_into_the_users_store(backend, tmp_path, monkeypatch):
    """Every check trains; a backend logging by itself left a run in ./mlflow.db for each (and the check
    guarding it failed on an MLflow error about a run another check had left active)."""
    from cnn_train.plugins.conformance import CHECK_NAMES

    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default store: ./mlflow.db
    mlflow.set_tracking_uri(None)
    results = {result.name: result for result in run_checks(backend, only=list(CHECK_NAMES))}
    assert results["does_not_log_to_mlflow"].reason.startswith("the backend wrote to MLflow itself (run ")
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    assert mlflow.active_run() is None


class _IgnoresTrainingOptions(TorchBackend):
    """Trains every config the lesson's plain way: the kit must catch options silently dropped."""

    def train(self, data, config, **kwargs):
        plain = {name: getattr(TrainConfig(), name) for name in PLAIN_TRAINING}
        return super().train(data, config.model_copy(update=plain), **kwargs)


def test_silently_ignored_training_options_fail_the_kit():
    [result] = run_checks(_IgnoresTrainingOptions, only=["training_options"])
    assert result.failed
    assert "lr_schedule='onecycle' trained exactly as the lesson's plain training does" in result.reason


def test_refusing_training_options_says_which_and_what_is_allowed():
    backend = registry.load_backend("keras")
    backend.build(ModelConfig(), device="cpu", seed=0)
    x = np.zeros((4, 28, 28, 1), dtype=np.float32)
    y = np.arange(4, dtype=np.int64)
    with pytest.raises(BackendInputError, match=r"KerasBackend trains only as the lesson does \(lr_schedule="
                       r"'constant', augment=False, label_smoothing=0.0, precision='float32'\); got precision='bfloat16'"):
        backend.train(TrainData(x, y, x, y), TrainConfig(epochs=1, precision="bfloat16"))


# --- the example plugin, really installed, and the `cnn-train check-backend` command --------------


@pytest.fixture(scope="module")
def installed_example_plugin(tmp_path_factory) -> Path:
    """The example plugin really installed (into a private folder), not patched in."""
    return pip_install(EXAMPLE_PLUGIN, tmp_path_factory.mktemp("site"))


def _with_plugin(site: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("cnn-train")
    return subprocess.run([str(cli), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # pip-installs the plugin
def test_example_plugin_is_discovered_and_loads(installed_example_plugin):
    result = _cli("backends", "--check", env=_with_plugin(installed_example_plugin))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("sklearn-mlp"))
    assert "cnn-train-sklearn-mlp 0.1.0" in line and line.endswith("loads")


@pytest.mark.slow  # pip-installs the plugin
def test_example_plugin_runs_the_kit_from_its_own_test_file(installed_example_plugin):
    # The whole kit runs in test_check_backend_command_passes_for_the_example_plugin; here, the plugin
    # author's one test function: check names as ids, a skip with its reason, the MLflow round trip.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(EXAMPLE_PLUGIN / "tests"),
         "-k", "entry_point_load or feature_maps_shapes or model_logging"],
        capture_output=True, text=True, env=_with_plugin(installed_example_plugin), cwd=EXAMPLE_PLUGIN, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith(f"2 passed, 1 skipped, {len(CHECK_NAMES) - 3} deselected in ")
    assert "sklearn-mlp builds only dense, which has no convolution layers" in result.stdout
    assert "warnings summary" not in result.stdout, "MLflow's SQLAlchemy deprecation reached the author's run"


@pytest.mark.parametrize("name", ["keras", "torch"])
def test_check_backend_command_passes(name):
    result = _cli("check-backend", name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(CHECK_NAMES)} passed, 0 failed" in result.stdout


@pytest.mark.slow  # pip-installs the plugin
def test_check_backend_command_passes_for_the_example_plugin(installed_example_plugin):
    result = _cli("check-backend", "sklearn-mlp", env=_with_plugin(installed_example_plugin))
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = len(CONVOLUTION_CHECKS)
    assert f"{len(CHECK_NAMES) - skipped} passed, 0 failed, {skipped} skipped" in result.stdout
    assert "PASS model_logging" in result.stdout and "PASS resume" in result.stdout


def test_numpy_pyfunc_plugin_passes_the_kit_by_name(installed):
    installed(FakeDistribution("cnn-train-numpy-mlp", {"numpy-mlp": "cnn_train_numpy_mlp.backend:NumpyMLPBackend"}))
    results = {result.name: result for result in run_checks("numpy-mlp")}
    assert [name for name, result in results.items() if not result.passed] == list(CONVOLUTION_CHECKS)
    assert all(results[name].skipped for name in CONVOLUTION_CHECKS)


def test_check_backend_command_names_failing_and_skipped_checks(tmp_path):
    # A real distribution whose backend keeps the contract's shape but does nothing right.
    write_dist_info(tmp_path, "broken-backend", "0.1", {registry.GROUP: {"broken": "tests.plugin_fixtures:GoodBackend"}})
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = _cli("check-backend", "broken", env=env)
    assert result.returncode == 1
    failed = {line.split(":")[0].removeprefix("FAIL ") for line in result.stdout.splitlines() if line.startswith("FAIL")}
    assert {"parameter_counts", "smoke_train", "rejects_empty_data"} <= failed
    assert "NOT RUN save_load_round_trip: smoke_train failed" in result.stdout  # what trains waits for smoke_train
    assert "PASS contract_members" in result.stdout
    assert "SKIP feature_maps_shapes: broken builds only dense, which has no convolution layers" in result.stdout


@pytest.mark.parametrize("debug", [pytest.param(False, id="one-line"), pytest.param(True, id="with-debug")])
def test_a_plugins_bug_is_placed_in_its_own_code_and_debug_shows_the_traceback(tmp_path, debug):
    write_dist_info(tmp_path, "typo-backend", "0.1", {registry.GROUP: {"typo": "tests.plugin_fixtures_numpy:MisspeltConfigField"}})
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = _cli(*(["--debug"] if debug else []), "check-backend", "typo", "--check", "smoke_train", env=env)
    assert result.returncode == 1, result.stderr
    (failure,) = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert re.fullmatch(
        r"FAIL smoke_train: AttributeError: 'TrainConfig' object has no attribute 'lr' "
        r"\(raised at tests/plugin_fixtures_numpy\.py:\d+ in fit\)",
        failure,
    ), failure
    assert ("Traceback (most recent call last)" in result.stdout) == debug, result.stdout
    if debug:
        assert "self.rate = training.config.lr" in result.stdout  # the offending line, as Python shows it


def test_check_backend_unknown_name():
    result = _cli("check-backend", "nope")
    assert result.returncode == 2
    assert "unknown backend 'nope'; installed backends:" in result.stderr
