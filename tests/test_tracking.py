"""The tracking package against a real SQLite store: models of any framework log into a run and load
without cnn_train, links are real or absent, dataset logging is quiet, and runs carry what the
MLflow UI needs."""

from __future__ import annotations

import getpass
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import types
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest

from cnn_train.flows import tracking
from cnn_train.flows.settings import default_tracking_uri
from cnn_train.flows.tracking import RunTracker
from cnn_train.plugins.contract import LoggableModel
from tests.local_stack import free_port
from tests.stores import new_store

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
IMAGES = np.random.default_rng(0).uniform(size=(5, *INPUT_SHAPE)).astype(np.float32)

# A framework MLflow has no flavor for: a softmax regression in NumPy, its weights in an artifact.
# It lives in a file of its own so the logged model can ship it (code_paths) and load anywhere.
SOFTMAX_MODULE = '''
import numpy as np
import mlflow.pyfunc


class SoftmaxRegression(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        weights = np.load(context.artifacts["weights"])
        self.w, self.b = weights["w"], weights["b"]

    def predict(self, context, model_input, params=None):
        x = np.asarray(model_input, dtype=np.float32).reshape(len(model_input), -1)
        logits = x @ self.w + self.b
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)
'''


@dataclass(frozen=True)
class Address:
    uri: str
    experiment_id: str = "7"
    run_id: str = "abc123"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return new_store(tmp_path_factory.mktemp("store") / "mlflow.db")


@pytest.fixture
def tracker(store: str) -> RunTracker:
    return RunTracker.start("tracking", uri=store, run_name="test")


@pytest.fixture(scope="module")
def softmax(tmp_path_factory: pytest.TempPathFactory) -> LoggableModel:
    folder = tmp_path_factory.mktemp("softmax")
    module = folder / "tiny_softmax_model.py"
    module.write_text(SOFTMAX_MODULE)
    rng = np.random.default_rng(1)
    weights = folder / "weights.npz"
    np.savez(weights, w=rng.normal(size=(int(np.prod(INPUT_SHAPE)), NUM_CLASSES)).astype(np.float32),
             b=np.zeros(NUM_CLASSES, dtype=np.float32))
    sys.path.insert(0, str(folder))
    try:
        model_class = importlib.import_module("tiny_softmax_model").SoftmaxRegression
    finally:
        sys.path.remove(str(folder))
    return LoggableModel(
        flavor="pyfunc",
        model=model_class(),
        artifacts={"weights": str(weights)},
        pip_requirements=(f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"),
        extra={"code_paths": [str(module)]},
    )


def _softmax_of(loggable: LoggableModel, images: np.ndarray) -> np.ndarray:
    weights = np.load(loggable.artifacts["weights"])
    logits = images.reshape(len(images), -1) @ weights["w"] + weights["b"]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _log(tracker: RunTracker, loggable: LoggableModel) -> str:
    return tracker.log_model(loggable, tracking.ModelRecord(INPUT_SHAPE, NUM_CLASSES, input_example=IMAGES[:2]))


# --- models --------------------------------------------------------------------------------------


def test_pyfunc_model_logs_into_the_run_and_loads_without_cnn_train(tracker, softmax, store, tmp_path):
    model_uri = _log(tracker, softmax)
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING"  # logging a model did not end the run
    assert model_uri == f"models:/{run.outputs.model_outputs[0].model_id}"
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import mlflow.pyfunc

        model = mlflow.pyfunc.load_model(sys.argv[1])
        images = np.random.default_rng(0).uniform(size=(5, 28, 28, 1)).astype(np.float32)
        proba = np.asarray(model.predict(images))
        leaked = sorted(name for name in sys.modules if name.split(".")[0] == "cnn_train")
        print(json.dumps({"proba": proba.tolist(), "leaked": leaked}))
        """
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_DISABLE_TELEMETRY": "true"}
    for uri in (model_uri, f"runs:/{tracker.run_id}/model"):
        done = subprocess.run([sys.executable, "-c", script, uri], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["leaked"] == []
        proba = np.array(result["proba"])
        assert proba.shape == (5, NUM_CLASSES)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(proba, _softmax_of(softmax, IMAGES), atol=1e-5)


def test_sklearn_pipeline_logs_with_its_trusted_types(tracker, monkeypatch, tmp_path):
    """What the sklearn example returns: skops (MLflow's safe default) with a short, explicit list of
    the types its pipeline needs, and predict_proba served through pyfunc."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    rng = np.random.default_rng(2)
    x, y = rng.uniform(size=(40, *INPUT_SHAPE)).astype(np.float32), np.arange(40) % NUM_CLASSES
    pipeline = make_pipeline(
        FunctionTransformer(np.reshape, kw_args={"shape": (-1, int(np.prod(INPUT_SHAPE)))}),
        MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipeline.fit(x, y)
    loggable = LoggableModel(
        flavor="sklearn",
        model=pipeline,
        pip_requirements=("scikit-learn", "numpy"),
        extra={
            "pyfunc_predict_fn": "predict_proba",
            "skops_trusted_types": ["numpy.reshape", "sklearn.neural_network._stochastic_optimizers.AdamOptimizer"],
        },
    )
    model_uri = _log(tracker, loggable)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    proba = np.asarray(mlflow.pyfunc.load_model(model_uri, dst_path=str(tmp_path)).predict(IMAGES))
    np.testing.assert_allclose(proba, pipeline.predict_proba(IMAGES), atol=1e-6)


def test_model_logging_leaves_the_process_tracking_uri_as_it_was(tracker, softmax, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    _log(tracker, softmax)
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////elsewhere/mlflow.db"
    assert mlflow.get_tracking_uri() == "sqlite:////elsewhere/mlflow.db"  # still follows the variable
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////moved/mlflow.db")
    assert mlflow.get_tracking_uri() == "sqlite:////moved/mlflow.db"


def test_a_pinned_process_tracking_uri_is_pinned_back():
    """In a child process, since a pinned URI (mlflow.set_tracking_uri) would outlive the test."""
    script = textwrap.dedent(
        """
        import os
        import mlflow
        from cnn_train.flows.tracking.models import _process_tracking_uri

        os.environ.pop("MLFLOW_TRACKING_URI", None)
        with _process_tracking_uri("sqlite:////store/a.db"):
            assert mlflow.get_tracking_uri() == "sqlite:////store/a.db"
        assert "MLFLOW_TRACKING_URI" not in os.environ
        mlflow.set_tracking_uri("sqlite:////pinned/b.db")
        with _process_tracking_uri("sqlite:////store/a.db"):
            assert mlflow.get_tracking_uri() == "sqlite:////store/a.db"
        assert mlflow.get_tracking_uri() == "sqlite:////pinned/b.db"
        assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////pinned/b.db"
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(
    ("loggable", "message"),
    [
        pytest.param(
            LoggableModel(flavor="jax", model=object()),
            r"unknown MLflow flavor 'jax': LoggableModel.flavor must name an MLflow flavor module "
            r"\(e.g. 'pytorch', 'keras', 'sklearn'\), or be 'pyfunc' with model an mlflow.pyfunc.PythonModel "
            r"instance, plus artifacts \(files it needs\) and pip_requirements, for a framework MLflow has no flavor for",
            id="unknown-flavor",
        ),
        pytest.param(
            LoggableModel(flavor="tracking", model=object()),
            r"mlflow.tracking is not a model flavor \(it has no save_model\): LoggableModel.flavor must name",
            id="not-a-flavor",
        ),
        pytest.param(
            LoggableModel(flavor="pyfunc", model=object()),
            r"flavor 'pyfunc' needs model to be an mlflow.pyfunc.PythonModel instance, got builtins.object",
            id="pyfunc-without-python-model",
        ),
        pytest.param(
            LoggableModel(flavor="sklearn", model=object(), artifacts={"weights": "/tmp/w.npz"}),
            r"artifacts are for flavor 'pyfunc' only; flavor 'sklearn' saves its model itself \(got artifacts \['weights'\]\)",
            id="artifacts-with-a-native-flavor",
        ),
    ],
)
def test_unloggable_models_are_refused_before_anything_is_logged(tracker, loggable, message):
    with pytest.raises(tracking.UnloggableModelError, match=message):
        _log(tracker, loggable)
    assert tracker.client.search_logged_models(experiment_ids=[tracker.experiment_id],
                                               filter_string=f"source_run_id = '{tracker.run_id}'") == []


def test_registering_a_logged_model_adds_versions_in_its_own_store(tracker, softmax, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where MLflow's default store would appear if anything fell back to it
    model_uri = _log(tracker, softmax)
    register = {"run_id": tracker.run_id, "description": "test", "model_description": "a test model", "uri": tracker.uri}
    assert tracking.register_model("softmax", model_uri, **register) == 1
    assert tracking.register_model("softmax", model_uri, **register) == 2
    assert list(tmp_path.iterdir()) == []


# --- datasets, tags, the MLflow UI ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "source_type"),
    [("/usr/share/datasets/fashion-mnist", "local"), ("https://example.org/fashion-mnist/", "http")],
    ids=["local-folder", "url"],
)
def test_logging_a_dataset_is_quiet_and_records_its_source(tracker, source, source_type):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # An experiment keeps one dataset per name and digest: a digest per case.
        tracker.log_dataset(IMAGES, np.arange(5), name="fashion-mnist-train", source=source, digest=source_type,
                            context="train")
    assert [str(w.message) for w in caught] == []
    (logged,) = tracker.client.get_run(tracker.run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest, logged.dataset.source_type) == ("fashion-mnist-train", source_type, source_type)
    assert source in logged.dataset.source
    assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": "train"}


def test_runs_carry_source_and_user_and_open_in_the_model_training_view(store):
    run = RunTracker.start("ui-fit", uri=store, tags={"prefect.deployment": None, "team": "vision"})
    client = run.client
    tags = client.get_run(run.run_id).data.tags
    assert {k: tags[k] for k in ("mlflow.source.name", "mlflow.source.type", "mlflow.user", "team")} == {
        "mlflow.source.name": "cnn-train",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": getpass.getuser(),
        "team": "vision",
    }
    assert "prefect.deployment" not in tags
    assert client.get_experiment(run.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_existing_experiments_get_a_kind_only_when_they_have_none(store):
    client = tracking.client(store)
    bare = client.create_experiment("made-elsewhere")
    chosen = client.create_experiment("genai-on-purpose", tags={"mlflow.experimentKind": "genai_development"})
    assert tracking.ensure_experiment(client, "made-elsewhere") == bare
    assert tracking.ensure_experiment(client, "genai-on-purpose") == chosen
    assert client.get_experiment(bare).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_a_deleted_experiment_is_named_with_how_to_restore_it_and_gets_no_run(store):
    """Deleted in the MLflow UI, an experiment keeps its name; MLflow then refused the run with 'The experiment
    N must be in the active state' from inside the flow run."""
    from mlflow.entities import ViewType

    client = tracking.client(store)
    gone = client.create_experiment("deleted-in-the-ui")
    client.delete_experiment(gone)
    with pytest.raises(tracking.DeletedExperimentError) as refused:
        RunTracker.start("deleted-in-the-ui", uri=store)
    assert str(refused.value) == (
        f"MLflow experiment 'deleted-in-the-ui' (id {gone}) is deleted; restore it with `MLFLOW_TRACKING_URI={store} "
        f"mlflow experiments restore --experiment-id {gone}`, or give the run another experiment name"
    )
    assert client.search_runs([gone], run_view_type=ViewType.ALL) == []
    client.restore_experiment(gone)  # as the line says: then the experiment takes runs again
    assert RunTracker.start("deleted-in-the-ui", uri=store).experiment_id == gone


def test_the_installed_mlflow_ui_still_reads_the_experiment_kind():
    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    ui = "".join(path.read_text(errors="replace") for path in bundle.glob("main.*.js"))
    if not ui:
        pytest.skip("this MLflow install has no UI bundle")
    assert f'"{tracking.EXPERIMENT_KIND_TAG}"' in ui
    assert f'"{tracking.MODEL_TRAINING_KIND}"' in ui
    # The view a link opens in: the URL parameter the UI reads before the browser's last choice.
    name, value = tracking.uri.MODEL_TRAINING_VIEW.split("=")
    assert f'get("{name}")' in ui and f'="{value}"' in ui


def test_a_none_tag_is_left_out(tracker):
    tracker.set_tags({"cnn_train.registered_model": None, "cnn_train.best_run_id": "r1"})
    tags = tracker.client.get_run(tracker.run_id).data.tags
    assert "cnn_train.registered_model" not in tags
    assert tags["cnn_train.best_run_id"] == "r1"


# --- links ---------------------------------------------------------------------------------------


@pytest.fixture
def default_port(monkeypatch):
    monkeypatch.delenv("CNN_TRAIN_MLFLOW_PORT", raising=False)


def test_a_store_without_a_server_has_no_url_but_a_command(tracker, default_port):
    assert tracker.url is None
    folder = tracker.uri.removeprefix("sqlite:///").removesuffix("/mlflow.db")
    assert tracking.open_hint(tracker) == (
        f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri {tracker.uri} "
        f"--artifacts-destination {folder}/mlartifacts --host 127.0.0.1 --port 5000 --workers 1, "
        f"then open http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
        "?workflowType=machine_learning"
    )


def test_a_store_without_a_server_is_served_on_a_free_port_when_the_projects_is_taken(tracker, monkeypatch):
    """The project's MLflow server up for its own store held the port the command gave for another store."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setenv("CNN_TRAIN_MLFLOW_PORT", str(port))
        hint = tracking.open_hint(tracker)
    given = int(re.search(r" --port (\d+) ", hint).group(1))
    assert given != port and f"then open http://127.0.0.1:{given}/#/experiments/{tracker.experiment_id}/" in hint


def test_a_relative_sqlite_store_is_named_by_its_absolute_path(tmp_path, monkeypatch, default_port):
    monkeypatch.chdir(tmp_path)
    hint = tracking.open_hint(Address("sqlite:///runs/mlflow.db"))
    assert f"--backend-store-uri sqlite:///{tmp_path}/runs/mlflow.db " in hint
    assert f"--artifacts-destination {tmp_path}/runs/mlartifacts " in hint


def test_the_project_store_is_browsed_with_cnn_train_up(default_port):
    assert tracking.open_hint(Address(default_tracking_uri())) == (
        "cnn-train up --no-trigger, then open http://127.0.0.1:5000/#/experiments/7/runs/abc123?workflowType=machine_learning"
    )


def test_a_server_store_links_to_the_run():
    run = Address("http://127.0.0.1:5123")
    page = "http://127.0.0.1:5123/#/experiments/7/runs/abc123?workflowType=machine_learning"
    assert tracking.run_url(run.uri, run.experiment_id, run.run_id) == page
    assert tracking.open_hint(run) == f"open {page}"
    assert tracking.artifact_url(run.uri, "abc123", "report/a b.png") == (
        "http://127.0.0.1:5123/get-artifact?path=report/a%20b.png&run_uuid=abc123"
    )


def test_a_file_store_is_served_with_the_setting_it_was_written_with(default_port):
    assert tracking.open_hint(Address("/srv/mlruns")).startswith(
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_ALLOW_FILE_STORE=true mlflow server --backend-store-uri /srv/mlruns "
    )


def test_a_database_password_is_not_printed():
    hint = tracking.open_hint(Address("postgresql://ml:s3cret@db.internal/mlflow"))
    assert "--backend-store-uri 'postgresql://ml:***@db.internal/mlflow' " in hint
    assert "s3cret" not in hint


def test_an_unreachable_server_in_a_run_up_serves_is_not_told_to_unset_what_up_set(monkeypatch):
    """A served flow run's failure said "or unset MLFLOW_TRACKING_URI", which its serve process had set."""
    from cnn_train.flows.ops import services
    from cnn_train.flows.settings import TRACKING_URI_BY_UP_ENV

    port = free_port()  # nothing listens there
    monkeypatch.setenv("CNN_TRAIN_MLFLOW_PORT", str(port))
    monkeypatch.setenv(TRACKING_URI_BY_UP_ENV, "1")
    with pytest.raises(tracking.TrackingUnavailableError) as caught:
        tracking.check_reachable(f"http://127.0.0.1:{port}", timeout=2)
    assert str(caught.value).endswith("; start it with `cnn-train up`: the flow runs `cnn-train up` serves log there")
    assert services.serve_process.extra_env()[TRACKING_URI_BY_UP_ENV] == "1"
    assert services.worker_process.extra_env()[TRACKING_URI_BY_UP_ENV] == "1"


@pytest.mark.parametrize("projects", [True, False], ids=["the-projects-port", "another-port"])
def test_an_unreachable_server_says_what_to_do(monkeypatch, projects):
    """At another port than the project's, "start it with `cnn-train up`" started (or kept) the project's server
    on its own port, and the address stayed silent."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    monkeypatch.setenv("CNN_TRAIN_MLFLOW_PORT", str(port if projects else port + 1))
    said = "start it with `cnn-train up`" if projects else (
        f"`cnn-train up` serves the project's MLflow at http://127.0.0.1:{port + 1}, not there (CNN_TRAIN_MLFLOW_PORT moves it)"
    )
    with pytest.raises(tracking.TrackingUnavailableError, match=rf"MLflow tracking server http://127.0.0.1:{port} "
                       rf"is not reachable \(.*\); {re.escape(said)}, or unset MLFLOW_TRACKING_URI"):
        tracking.check_reachable(f"http://127.0.0.1:{port}", timeout=2)


@pytest.mark.parametrize("uri", ["htp://127.0.0.1:5000", "mlflow.db://x"], ids=["typo-in-http", "path-as-scheme"])
def test_a_scheme_mlflow_has_no_store_for_says_which_it_has(uri):
    with pytest.raises(tracking.TrackingUnavailableError, match=rf"^MLFLOW_TRACKING_URI {re.escape(uri)} has a scheme "
                       r"MLflow has no tracking store for; .*\(file, .*sqlite.*\), or unset it"):
        tracking.check_reachable(uri)


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/nonexistent/dir/mlflow.db", "/nonexistent/mlruns", "file:///nonexistent/mlruns",
                                 "postgresql+psycopg2://user@127.0.0.1:9/db"],
                         ids=["sqlite", "path", "file", "postgresql-with-driver"])
def test_a_local_or_database_store_is_not_opened_to_check_it(uri, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    # The driver is stood in for (none is installed here): the check imports it and connects to nothing.
    monkeypatch.setitem(sys.modules, "psycopg2", types.ModuleType("psycopg2"))
    tracking.check_reachable(uri.format(tmp=tmp_path))  # nothing is created or connected to: the flow opens the store when it runs
    assert not Path("/nonexistent").exists() and not (tmp_path / "nonexistent").exists()


_PROJECT_FIX = (
    "set CNN_TRAIN_ROOT to a folder you can write (it holds mlflow.db, mlartifacts/ and .state/), or MLFLOW_TRACKING_URI "
    "to a store you can write"
)


@pytest.mark.parametrize(
    ("blocked", "says"),
    [
        pytest.param("folder", "{tmp}", id="a-folder-it-cannot-write"),
        pytest.param("file", "{tmp}/mlflow.db", id="a-database-it-cannot-write"),
    ],
)
@pytest.mark.parametrize(
    ("projects", "named", "fix"),
    [
        pytest.param(True, "the project's store", _PROJECT_FIX, id="the-projects-store"),
        # A store the user named has nothing to do with the project's folder: no CNN_TRAIN_ROOT advice.
        pytest.param(False, "MLFLOW_TRACKING_URI sqlite:///{tmp}/mlflow.db", "point it at a store you can write", id="a-named-store"),
    ],
)
def test_a_sqlite_store_this_user_cannot_write_is_refused_before_the_run(tmp_path, monkeypatch, blocked, says, projects, named, fix):
    """From a read-only checkout, a run retried MLflow's 'unable to open database file' for 3.5 minutes, then
    failed inside its flow run. The suite runs as root, which writes anything: access() plays the refusal."""
    (tmp_path / "mlflow.db").touch()
    monkeypatch.setenv("CNN_TRAIN_ROOT", str(tmp_path if projects else tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    refused = tmp_path if blocked == "folder" else tmp_path / "mlflow.db"
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != refused and access(path, mode))
    with pytest.raises(tracking.TrackingUnavailableError) as caught:
        tracking.check_reachable(f"sqlite:///{tmp_path}/mlflow.db")
    assert str(caught.value) == (
        f"{named.format(tmp=tmp_path)}: this user cannot write {says.format(tmp=tmp_path)} (permission denied); {fix}"
    )


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        pytest.param("./mlruns", "./mlruns names a folder of files (MLflow's file store), which MLflow 3 refuses unless "
                     "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///FILE.db or http://HOST:PORT, or unset it", id="folder"),
        pytest.param("file:///srv/mlruns", "file:///srv/mlruns names a folder of files", id="file-uri"),
        pytest.param("mlflow.db", "mlflow.db names a folder of files (MLflow's file store), which MLflow 3 refuses unless "
                     "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///mlflow.db or", id="database-file-without-sqlite"),
        pytest.param("postgresql://ml:s3cret@127.0.0.1:9/db", "postgresql://ml:***@127.0.0.1:9/db needs the database "
                     "driver 'psycopg', which is not installed here; install it", id="postgresql-without-driver"),
        pytest.param("127.0.0.1:5000", "127.0.0.1:5000 has no scheme; a server's address starts with it: http://127.0.0.1:5000",
                     id="host-and-port"),
        pytest.param("http://127.0.0.1:5000/#/experiments/1/runs/abc", "http://127.0.0.1:5000/#/experiments/1/runs/abc is a "
                     "page of the MLflow UI, not the server's address; set it to http://127.0.0.1:5000", id="ui-page"),
        pytest.param("mysql+nosuch://ml@127.0.0.1:9/db", "mysql+nosuch://ml@127.0.0.1:9/db is no database URI SQLAlchemy "
                     "can use (Can't load plugin: sqlalchemy.dialects:mysql.nosuch)", id="unknown-driver"),
    ],
)
def test_a_store_mlflow_would_refuse_in_the_run_is_refused_before_it(uri, says, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed, wherever the suite runs
    with pytest.raises(tracking.TrackingUnavailableError) as refused:
        tracking.check_reachable(uri)
    assert str(refused.value).startswith(f"MLFLOW_TRACKING_URI {says}") and "s3cret" not in str(refused.value)


# --- liveness ------------------------------------------------------------------------------------


def test_heartbeat_then_reaping_and_marking(store):
    alive, abandoned, ended = (RunTracker.start("liveness", uri=store, tags={tracking.FLOW_RUN_TAG: "flow-1"}) for _ in range(3))
    with alive.heartbeat(interval=60):
        pass
    assert abs(float(alive.client.get_run(alive.run_id).data.tags[tracking.HEARTBEAT_TAG]) - time.time()) < 60
    abandoned.set_tags({tracking.HEARTBEAT_TAG: f"{time.time() - 3600:.0f}"})
    ended.finish("FINISHED")
    assert tracking.reap_stale_runs(uri=store, stale_after=600) == [abandoned.run_id]
    assert abandoned.status() == "FAILED"
    assert "no heartbeat for 36" in abandoned.client.get_run(abandoned.run_id).data.tags[tracking.REAPED_TAG]
    assert abandoned.client.get_run(abandoned.run_id).data.tags["mlflow.note.content"].startswith("**Failed**: no heartbeat for 36")
    assert {r.info.run_id for r in tracking.find_runs_for_flow_run("flow-1", uri=store)} == {
        alive.run_id, abandoned.run_id, ended.run_id}
    assert tracking.mark_unfinished(ended.run_id, "KILLED", uri=store) is False
    assert tracking.mark_unfinished(alive.run_id, "KILLED", uri=store) is True
    assert alive.status() == "KILLED"


@pytest.mark.parametrize("by_name", [pytest.param(False, id="flow-engine"), pytest.param(True, id="runner-on-cancelling")])
def test_a_flow_runs_end_hooks_mark_its_mlflow_runs_however_prefect_calls_them(by_name, store, monkeypatch):
    # A served flow run cancelled from the UI: Prefect's runner calls the hooks with flow=, flow_run=, state=.
    from types import SimpleNamespace

    from cnn_train.flows.runs import recorded_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    hooks = recorded_flow()
    for name, status in (("on_cancellation", "KILLED"), ("on_crashed", "FAILED")):
        run = RunTracker.start("hooks", uri=store, tags={tracking.FLOW_RUN_TAG: f"flow-{name}"})
        (hook,) = hooks[name]
        assert hook.__name__ == f"end_unfinished_mlflow_runs_{status.lower()}"  # what Prefect's log names
        flow_run = SimpleNamespace(id=f"flow-{name}")
        state = SimpleNamespace(message="Process exited with status code: -9")
        if by_name:
            hook(flow=None, flow_run=flow_run, state=state)
        else:
            hook(None, flow_run, state)
        assert run.status() == status, name
        # A served run killed with SIGKILL ended FAILED with nothing on its page to say why.
        said = {"KILLED": "**Stopped before it finished**: its flow run was cancelled",
                "FAILED": "**Failed**: its flow run crashed"}[status]
        assert run.client.get_run(run.run_id).data.tags["mlflow.note.content"] == f"{said} (Process exited with status code: -9)"



@pytest.mark.parametrize(
    ("uri", "says"),
    [
        pytest.param("http://127.0.0.1:{port}", "MLflow at http://127.0.0.1:{port} (`cnn-train up` starts it)", id="the-projects-server"),
        pytest.param("http://localhost:{port}/", "MLflow at http://localhost:{port}/ (`cnn-train up` starts it)", id="the-same-by-another-name"),
        pytest.param("http://127.0.0.1:9", "MLflow at http://127.0.0.1:9 (start it)", id="another-server-here"),
        pytest.param("http://mlflow.team.example:5000", "MLflow at http://mlflow.team.example:5000 (check that it runs on "
                     "mlflow.team.example and that this machine reaches it)", id="a-server-elsewhere"),
        pytest.param("sqlite:///tmp/x.db", "the store sqlite:///tmp/x.db", id="a-local-store"),
    ],
)
def test_a_spool_says_which_store_its_records_wait_for(monkeypatch, uri, says):
    """After an upgrade a run without servers said "MLflow did not answer" of another run's spool, waiting for
    a server on a port nobody named; sync and doctor did not name it either."""
    monkeypatch.setenv("CNN_TRAIN_MLFLOW_PORT", "47311")
    assert tracking.waiting_on(uri.format(port=47311)) == says.format(port=47311)


def test_commands_opening_one_new_store_together_all_get_it_whole(tmp_path):
    """MLflow makes a new SQLite store by applying its migrations one by one; three processes doing it to one
    new file at once failed ('Online migration expected to match one row') and could leave it broken for good."""
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    script = "import sys; from cnn_train.flows import tracking; tracking.ready_store(sys.argv[1]); print('ready')"
    openers = [
        subprocess.Popen([sys.executable, "-c", script, uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(3)
    ]
    outputs = [opener.communicate(timeout=180)[0] for opener in openers]
    assert [output.strip().splitlines()[-1:] for output in outputs] == [["ready"]] * 3, outputs
    assert tracking.client(uri).search_experiments()  # the Default experiment, in a whole schema


def test_a_store_that_cannot_be_opened_is_one_line_naming_it(tmp_path):
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"not a database, but a file someone put here" * 100)
    with pytest.raises(tracking.TrackingUnavailableError) as raised:
        tracking.ready_store(f"sqlite:///{database}")
    line = str(raised.value)
    assert "\n" not in line and line.startswith(f"the MLflow store {database} cannot be opened (")
    assert "put back a copy that works, or move it away" in line
