"""The conformance kit: the project's own backends pass it, broken ones fail with named checks,
and a real out-of-tree plugin package is discovered and passes it too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnn_train.backends.torch_backend import TorchBackend
from cnn_train.plugins import conformance, registry
from cnn_train.plugins.config import ModelConfig, TrainConfig
from cnn_train.plugins.contract import PLAIN_TRAINING, BackendInputError, TrainData
from cnn_train.plugins.conformance import CHECK_NAMES, parametrize_with_checks, run_checks
from tests.plugin_fixtures import GoodBackend

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ROOT / "plugins" / "examples" / "sklearn_mlp"


@parametrize_with_checks("torch")
def test_torch_backend_conforms(check):
    check()


@parametrize_with_checks("keras")
def test_keras_backend_conforms(check):
    check()


def test_check_ids_are_check_names():
    mark = parametrize_with_checks("torch")
    ids = [param.id for param in mark.args[1]]
    assert ids == list(CHECK_NAMES)


def test_unknown_expected_failure_is_refused():
    with pytest.raises(ValueError, match="unknown check.*'no_such_check'.*available: contract_members"):
        parametrize_with_checks("torch", expected_failures={"no_such_check": "why"})


def test_shape_only_backend_fails_named_checks():
    results = {r.name: r for r in run_checks(GoodBackend)}
    assert results["contract_members"].passed
    assert not results["entry_point_load"].passed
    assert "not registered under the entry-point group" in results["entry_point_load"].reason
    assert not results["smoke_train"].passed
    assert not results["parameter_counts"].passed
    assert "has 0 parameters, expected 101,770" in results["parameter_counts"].reason


@pytest.fixture(scope="module")
def installed_example_plugin(tmp_path_factory) -> Path:
    """The example plugin really installed (into a private folder), not patched in."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(EXAMPLE_PLUGIN)],
        check=True,
    )
    return target


def _with_plugin(site: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("cnn-train")
    return subprocess.run([str(cli), *args], capture_output=True, text=True, env=env, timeout=600)


def test_example_plugin_is_discovered(installed_example_plugin):
    result = _cli("backends", env=_with_plugin(installed_example_plugin))
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("sklearn-mlp"))
    assert "cnn-train-sklearn-mlp 0.1.0" in line and "loads" in line


def test_example_plugin_passes_the_kit_from_its_own_test_file(installed_example_plugin):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE_PLUGIN / "tests")],
        capture_output=True, text=True, env=_with_plugin(installed_example_plugin), cwd=EXAMPLE_PLUGIN, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(CHECK_NAMES)} passed" in result.stdout


@pytest.mark.parametrize("name", ["keras", "torch"])
def test_check_backend_command_passes(name):
    result = _cli("check-backend", name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(CHECK_NAMES)} passed, 0 failed" in result.stdout


def test_check_backend_command_names_failing_checks(tmp_path):
    # A real distribution whose backend keeps the contract's shape but does nothing right.
    dist_info = tmp_path / "broken_backend-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-backend\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[cnn_train.backends]\nbroken = tests.plugin_fixtures:GoodBackend\n")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = _cli("check-backend", "broken", env=env)
    assert result.returncode == 1
    failed = {line.split(":")[0].removeprefix("FAIL ") for line in result.stdout.splitlines() if line.startswith("FAIL")}
    assert {"parameter_counts", "smoke_train", "save_load_round_trip"} <= failed
    assert "PASS contract_members" in result.stdout


def test_check_backend_unknown_name():
    result = _cli("check-backend", "nope")
    assert result.returncode == 2
    assert "unknown backend 'nope'; installed backends:" in result.stderr


def test_run_checks_rejects_unknown_check_name():
    with pytest.raises(ValueError, match="unknown check"):
        conformance.run_checks("torch", only=("bogus",))


class _IgnoresTrainingOptions(TorchBackend):
    """Trains every config the lesson's plain way: the kit must catch options silently dropped."""

    def train(self, data, config, **kwargs):
        plain = {name: getattr(TrainConfig(), name) for name in PLAIN_TRAINING}
        return super().train(data, config.model_copy(update=plain), **kwargs)


def test_silently_ignored_training_options_fail_the_kit():
    [result] = run_checks(_IgnoresTrainingOptions, only=["training_options"])
    assert not result.passed
    assert "lr_schedule='onecycle' trained exactly as the lesson's plain training does" in result.reason


def test_refusing_training_options_says_which_and_what_is_allowed():
    backend = registry.load_backend_class("keras")()
    backend.build(ModelConfig(), device="cpu", seed=0)
    x = np.zeros((4, 28, 28, 1), dtype=np.float32)
    y = np.arange(4, dtype=np.int64)
    with pytest.raises(BackendInputError, match=r"the keras backend trains only as the lesson does \(lr_schedule="
                       r"'constant', augment=False, label_smoothing=0.0, precision='float32'\); got precision='bfloat16'"):
        backend.train(TrainData(x, y, x, y), TrainConfig(epochs=1, precision="bfloat16"))
