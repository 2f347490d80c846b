"""Third-party backends through the real flow: the example plugin's README step 4 and a plugin for a
framework MLflow has no flavor for (tests/pyfunc_plugin, NumPy, logged through pyfunc) each complete
``cnn-train run`` with a FINISHED run and a model that loads; everything lands under the project's
state and artifact folders, never in the directory the command was started from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from tests.plugin_fixtures import install_without_pip, pip_install
from tests.processes import stop_group

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ROOT / "plugins" / "examples" / "sklearn_mlp"
PYFUNC_PLUGIN = ROOT / "tests" / "pyfunc_plugin"
BIN = Path(sys.executable).parent
#: README step 4, with a small test set so the evaluation and report stay quick.
README_STEP_4 = ["run", "--backend", "sklearn-mlp", "--architecture", "dense", "--epochs", "2", "--sample-limit", "2000"]
SMALL_TEST_SET = ["--test-limit", "300"]


def _finished_run(store: Path):
    """The one run in the store's cnn-train experiment and its logged model."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("cnn-train")
    [run] = client.search_runs([experiment.experiment_id])
    [model] = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    return run, model


def _local_path(uri: str) -> Path:
    """The folder a ``file://`` artifact URI names."""
    parsed = urlparse(uri)
    assert parsed.scheme == "file", f"artifacts are not in a local folder: {uri}"
    return Path(unquote(parsed.path))


def _plugin_env(site: Path, store: Path, state: Path, prefect_api_url: str, data_dir: Path) -> dict[str, str]:
    """The environment of a run with the plugin installed in ``site`` (on PYTHONPATH): the session's
    Prefect server, and the test's own SQLite store (``store/mlflow.db``) and state folder."""
    return os.environ | {
        "PYTHONPATH": str(site),
        "PREFECT_API_URL": prefect_api_url,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
        "CNN_TRAIN_STATE_DIR": str(state),
        "CNN_TRAIN_DATA_DIR": str(data_dir),
    }


def test_example_plugin_readme_step_4_from_another_directory(tmp_path, prefect_api_url, real_fashion_mnist_dir):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    site = install_without_pip(EXAMPLE_PLUGIN, tmp_path / "site")
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "CNN_TRAIN_STATE_DIR")}
    env |= {
        "PYTHONPATH": str(site),
        "CNN_TRAIN_ROOT": str(project),  # the project's default store, artifacts and state live here
        "CNN_TRAIN_DATA_DIR": str(real_fashion_mnist_dir),
        "PREFECT_API_URL": prefect_api_url,
    }
    result = subprocess.run(
        [BIN / "cnn-train", *README_STEP_4, *SMALL_TEST_SET], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test accuracy:" in result.stdout

    assert os.listdir(elsewhere) == [], "the run wrote into the directory it was started from"
    run, model = _finished_run(project / "mlflow.db")
    assert run.info.status == "FINISHED"
    assert _local_path(run.info.artifact_uri).is_relative_to(project / "mlartifacts")
    assert _local_path(model.artifact_location).is_relative_to(project / "mlartifacts")
    assert (project / ".state" / "cache").is_dir()  # the prepared split: state goes under the project
    assert not any((project / ".state" / "checkpoints").iterdir())  # a finished run's checkpoint is dropped
    params = run.data.params
    assert params["backend.distribution"] == "cnn-train-sklearn-mlp"
    assert {"version.scikit-learn", "version.joblib"} <= set(params) and "version.torch" not in params

    import mlflow.pyfunc

    # Saved with skops, trusting exactly the two types the plugin names (no blanket trust).
    saved = str(_local_path(model.artifact_location))
    flavor = mlflow.models.Model.load(saved).flavors["sklearn"]
    assert flavor["serialization_format"] == "skops"
    assert sorted(flavor["skops_trusted_types"]) == ["numpy.reshape", "sklearn.neural_network._stochastic_optimizers.AdamOptimizer"]
    x = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)
    probabilities = np.asarray(mlflow.pyfunc.load_model(saved).predict(x))
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


# --- a plugin really installed (pip), its model loaded where cnn-train is not imported -------------


@pytest.fixture(scope="module")
def installed_pyfunc_plugin(tmp_path_factory) -> Path:
    """The NumPy plugin pip-installed into a private folder (put on PYTHONPATH), found through its entry point."""
    return pip_install(PYFUNC_PLUGIN, tmp_path_factory.mktemp("site"))


#: Loads the model and predicts, in a process that must not import cnn-train or find the plugin installed.
_LOAD_AND_PREDICT = textwrap.dedent("""
    import json, sys
    import mlflow.pyfunc
    import numpy as np

    model = mlflow.pyfunc.load_model(sys.argv[1])
    probabilities = np.asarray(model.predict(np.random.default_rng(0).random((7, 28, 28, 1), dtype=np.float32)))
    print(json.dumps({
        "shape": list(probabilities.shape),
        "row_sums": probabilities.sum(axis=1).tolist(),
        "cnn_train_imported": sorted(name for name in sys.modules if name.startswith("cnn_train.")),
        "plugin_from": sys.modules["cnn_train_numpy_mlp"].__file__,
    }))
""")


@pytest.mark.slow  # pip-installs the plugin and runs the flow in a subprocess
def test_pyfunc_plugin_run_and_its_model_loads_without_cnn_train(installed_pyfunc_plugin, tmp_path, prefect_api_url, real_fashion_mnist_dir):
    elsewhere, store = tmp_path / "elsewhere", tmp_path / "store"
    elsewhere.mkdir()
    env = _plugin_env(installed_pyfunc_plugin, store, tmp_path / "state", prefect_api_url, real_fashion_mnist_dir)
    run = subprocess.run(
        [BIN / "cnn-train", "run", "--backend", "numpy-mlp", "--architecture", "dense", "--epochs", "2",
         "--sample-limit", "600", *SMALL_TEST_SET],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "CloudPickle" not in run.stdout + run.stderr, "MLflow's advice a plugin cannot act on was shown"
    assert os.listdir(elsewhere) == [], "the run wrote into the directory it was started from"
    finished, model = _finished_run(store / "mlflow.db")
    assert finished.info.status == "FINISHED"
    assert finished.data.params["version.numpy"] == np.__version__
    assert _local_path(model.artifact_location).is_relative_to(store / "mlartifacts")

    # A clean environment: no PYTHONPATH to the plugin, started from the empty folder.
    clean = {key: value for key, value in env.items() if key != "PYTHONPATH"}
    loaded = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_PREDICT, f"models:/{model.model_id}"],
        cwd=elsewhere, env=clean, capture_output=True, text=True, timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr
    found = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert found["shape"] == [7, 10]
    assert np.allclose(found["row_sums"], 1.0, atol=1e-5)
    assert found["cnn_train_imported"] == []
    # The plugin's package came with the model (its code_paths folder), not from the installed plugin.
    plugin_from = Path(found["plugin_from"])
    assert "code" in plugin_from.parts and not plugin_from.is_relative_to(installed_pyfunc_plugin)


# --- the example plugin through its deployment, as README step 4's second command -----------------


@pytest.fixture(scope="module")
def installed_example_plugin(tmp_path_factory) -> Path:
    return install_without_pip(EXAMPLE_PLUGIN, tmp_path_factory.mktemp("example-site"))


def _serving(process: subprocess.Popen[str], *, timeout: float) -> None:
    """Wait for the serve process to say its deployments are served."""
    import selectors
    import time

    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline and process.poll() is None:
        if selector.select(timeout=1.0):
            line = process.stdout.readline()
            seen.append(line)
            if "being served" in line:
                return
    raise AssertionError("the serve process did not start serving:\n" + "".join(seen))


@pytest.mark.slow  # serves the deployments and triggers one
def test_example_plugin_deployment_trigger(installed_example_plugin, tmp_path, prefect_api_url, real_fashion_mnist_dir):
    elsewhere, store = tmp_path / "elsewhere", tmp_path / "store"
    elsewhere.mkdir()
    env = _plugin_env(installed_example_plugin, store, tmp_path / "state", prefect_api_url, real_fashion_mnist_dir)
    env["PYTHONUNBUFFERED"] = "1"
    serve = subprocess.Popen(
        [sys.executable, "-m", "cnn_train.flows.ops.serve"], cwd=elsewhere, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        _serving(serve, timeout=180)
        trigger = subprocess.run(
            [BIN / "prefect", "deployment", "run", "cnn-train/default", "-p", "backend=sklearn-mlp",
             "-p", "architecture=dense", "-p", "compare_dense=false", "-p", "epochs=2", "-p", "sample_limit=600",
             "-p", "test_limit=300", "--watch", "--watch-timeout", "400"],
            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=500,
        )
    finally:
        stop_group(serve, sig=signal.SIGTERM)
    assert trigger.returncode == 0, trigger.stdout + trigger.stderr + "\nserve printed:\n" + serve.stdout.read()[-3000:]
    assert os.listdir(elsewhere) == []
    run, model = _finished_run(store / "mlflow.db")
    assert run.info.status == "FINISHED" and run.data.params["backend"] == "sklearn-mlp"
    import mlflow.pyfunc

    saved = str(_local_path(model.artifact_location))
    probabilities = mlflow.pyfunc.load_model(saved).predict(np.zeros((3, 28, 28, 1), np.float32))
    assert np.asarray(probabilities).shape == (3, 10)
