"""The product as users meet it: real local Prefect and MLflow servers, the serve process, and
`prefect deployment run cnn-train/default` triggering a flow run that lands in MLflow; then
`cnn-train-predict/default` classifying a folder of images with the model it trained."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.local_stack import BIN, cnn_train_up, prefect_api, run_deployment, training_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, real_fashion_mnist_dir):
    """`cnn-train up --no-trigger` in a private project root, home and pair of ports; `down` after."""
    with cnn_train_up(tmp_path_factory.mktemp("project"), real_fashion_mnist_dir, timeout=400) as started:
        yield started


def test_up_is_idempotent(stack):
    env, first = stack
    assert "prefect-server: starting" in first
    # The serve process's runner folder is in the project's state, not in /tmp (local_stack checks it goes).
    # `up` returns once cnn-train/default is registered; the runner makes its folder after the other four.
    runner_storage = Path(env["CNN_TRAIN_ROOT"]) / ".state" / "serve-tmp" / "runner_storage"
    deadline = time.monotonic() + 120
    while not runner_storage.is_dir() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(list(runner_storage.iterdir())) == 1
    again = subprocess.run([BIN / "cnn-train", "up", "--no-trigger"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    for service in ("prefect-server", "mlflow-server", "deployment-server"):
        assert f"{service}: already running" in again.stdout


def test_up_links_the_default_experiments_runs_in_the_model_training_view(stack):
    """`up` printed the MLflow server's address, whose home page opens the experiment in the GenAI view."""
    from mlflow import MlflowClient

    env, printed = stack
    mlflow_url = f"http://127.0.0.1:{env['CNN_TRAIN_MLFLOW_PORT']}"
    experiment = MlflowClient(mlflow_url).get_experiment_by_name("cnn-train")
    expected = f"MLflow UI:  {mlflow_url}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert expected in printed.splitlines(), printed


def test_up_leaves_the_zombie_automation_on_its_own_server(stack):
    """On the server `up` started, not on a temporary one: `up` talks to Prefect only once its process
    points at that server, and a Prefect import before then would freeze settings without it (as one did)."""
    from prefect.automations import Automation
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cnn_train.flows import crashes

    env, _ = stack
    with temporary_settings({PREFECT_API_URL: prefect_api(env)}):
        automation = Automation.read(name=crashes.AUTOMATION_NAME)
    assert automation.enabled and automation.trigger == crashes.zombie_trigger()


def test_the_clean_up_reaches_the_servers_even_after_prefect_read_other_settings(stack):
    """A process that imported Prefect while PREFECT_API_URL pointed elsewhere (here at a closed port):
    `up`'s clean-up still talks to the server `up` started."""
    env, _ = stack
    code = (
        "from prefect.settings import get_current_settings\n"
        "assert get_current_settings().api.url == 'http://127.0.0.1:9/api'\n"
        "from cnn_train.flows.ops import launcher\n"
        "launcher.clean_up_after_crashes(print)\n"
        "print('clean-up done')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env | {"PREFECT_API_URL": "http://127.0.0.1:9/api"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "clean-up done" in result.stdout, result.stderr[-3000:]


def test_a_shell_without_the_port_variables_finds_the_servers_up_started(stack):
    """`CNN_TRAIN_MLFLOW_PORT=... cnn-train up`, then commands in another shell: they record to that
    server, not silently to mlflow.db; and the terminal shows the command's own link to the run, not
    MLflow's "View run ... at:" and "View experiment at:" lines as each run on the server ends."""
    env, _ = stack
    shell = {k: v for k, v in env.items() if k not in ("CNN_TRAIN_PREFECT_PORT", "CNN_TRAIN_MLFLOW_PORT")}
    found = subprocess.run(
        [sys.executable, "-c", "from cnn_train.flows import tracking; from cnn_train.flows.ops import services; print(tracking.tracking_uri(), services.prefect_api_url())"],
        env=shell, capture_output=True, text=True, timeout=120,
    )
    mlflow = f"http://127.0.0.1:{env['CNN_TRAIN_MLFLOW_PORT']}"
    assert found.stdout.split() == [mlflow, prefect_api(env)], found.stderr
    ran = subprocess.run(
        [BIN / "cnn-train", "run", "--epochs", "1", "--sample-limit", "400", "--test-limit", "200", "--compare-dense"],
        env=shell, capture_output=True, text=True, timeout=600,
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert f"MLflow run: {mlflow}/#/experiments/" in ran.stdout
    assert "dense network test accuracy: " in ran.stdout  # a second MLflow run ended on the server
    assert "View run" not in ran.stdout and "View experiment" not in ran.stdout, ran.stdout


@pytest.fixture(scope="module")
def trained(stack) -> str:
    """One small `cnn-train/default` flow run through the served deployment; its flow run id."""
    env, _ = stack
    return run_deployment(
        env, "cnn-train/default", "epochs=1", "sample_limit=400", "test_limit=200", "compare_dense=false"
    )


def test_prefect_deployment_run_lands_in_mlflow(stack, trained):
    env, _ = stack
    flow_run_id = trained

    from mlflow import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{env['CNN_TRAIN_MLFLOW_PORT']}")
    experiment = client.get_experiment_by_name("cnn-train")
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1
    mlflow_run = runs[0]
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["prefect.deployment"] == "default"
    assert mlflow_run.data.tags["device.train"] == "cpu"
    assert mlflow_run.data.params["epochs"] == "1"
    assert 0.1 < mlflow_run.data.metrics["test_accuracy"] <= 1.0
    # MLflow's preview of report.md draws images at absolute addresses only: its figures showed as link text.
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        report = Path(client.download_artifacts(mlflow_run.info.run_id, "report/report.md", folder)).read_text()
    served = f"(http://127.0.0.1:{env['CNN_TRAIN_MLFLOW_PORT']}/get-artifact?path=report/confusion_matrix.png&run_uuid="
    assert served in report, report[:2000]
    # Through the MLflow server, the Prefect report shows its figures: image artifacts point at them.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api(env)}), get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert {"markdown", "table", "progress", "image"} <= {a.type for a in artifacts}
    assert any(a.key == "mlflow-run" for a in artifacts)
    image = next(a for a in artifacts if a.type == "image")
    assert image.data.startswith(f"http://127.0.0.1:{env['CNN_TRAIN_MLFLOW_PORT']}/get-artifact?path=report/")
    # The project's store is the SQLite file at the (temporary) project root.
    assert (Path(env["CNN_TRAIN_ROOT"]) / "mlflow.db").is_file()


def test_the_predict_deployment_leaves_predictions_and_a_summary_in_mlflow(stack, trained, real_fashion_mnist_dir, tmp_path):
    from mlflow import MlflowClient
    from PIL import Image

    from cnn_train.flows.data import TEST_IMAGES
    from cnn_train.flows.data.idx import read_idx

    env, _ = stack
    images = read_idx(real_fashion_mnist_dir / TEST_IMAGES.name, TEST_IMAGES, verify_checksum=False).array
    for index in range(3):
        Image.fromarray(images[index]).resize((56, 56)).save(tmp_path / f"item-{index}.png")
    # No model given: the flow takes the latest finished cnn-train run's (nothing is registered here).
    flow_run_id = run_deployment(env, "cnn-train-predict/default", f"images={tmp_path}")

    client = MlflowClient(f"http://127.0.0.1:{env['CNN_TRAIN_MLFLOW_PORT']}")
    trained_run = client.search_runs(
        [client.get_experiment_by_name("cnn-train").experiment_id], f"tags.`prefect.flow_run_id` = '{trained}'"
    )[0]
    experiment = client.get_experiment_by_name("cnn-train-predict")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["cnn_train.model_run_id"] == trained_run.info.run_id
    assert run.data.metrics["images_classified"] == 3
    local = Path(client.download_artifacts(run.info.run_id, "predictions", str(tmp_path / "downloaded")))
    assert {"predictions.csv", "summary.json", "summary.md", "examples.png"} <= {path.name for path in local.iterdir()}
    assert len((local / "predictions.csv").read_text().splitlines()) == 4

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api(env)}), get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert {(a.key, a.type) for a in artifacts} >= {
        ("predictions", "table"), ("prediction-summary", "markdown"), ("predicted-examples", "image")
    }


def test_a_flow_run_run_again_links_its_attempts_mlflow_runs(stack, trained):
    """Retry in the Prefect UI (a finished flow run set AwaitingRetry) made a second MLflow run of the same
    flow run, and nothing said which attempt each was. Last in the module: it adds a run to `trained`."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import AwaitingRetry

    env, _ = stack
    with temporary_settings({PREFECT_API_URL: prefect_api(env)}), get_client(sync_client=True) as prefect:
        prefect.set_flow_run_state(trained, AwaitingRetry(), force=True)
        deadline = time.monotonic() + 300
        while True:
            flow_run = prefect.read_flow_run(trained)
            if (flow_run.run_count > 1 and flow_run.state.is_final()) or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert flow_run.state.is_completed(), flow_run.state
    client = MlflowClient(f"http://127.0.0.1:{env['CNN_TRAIN_MLFLOW_PORT']}")
    runs = client.search_runs([client.get_experiment_by_name("cnn-train").experiment_id],
                              f"tags.`prefect.flow_run_id` = '{trained}'", order_by=["attributes.start_time ASC"])
    first, again = runs
    assert first.data.tags["cnn_train.superseded_by"] == again.info.run_id
    assert again.data.tags["cnn_train.earlier_attempts"] == first.info.run_id
    assert again.info.status == "FINISHED"


@pytest.mark.parametrize(
    "trigger",
    [
        pytest.param((), id="run"),
        # Its flow-run process died with the serve process: the sweep's runs stayed RUNNING, its flow run Running.
        pytest.param(("cnn-train-sweep/default", "-p", "task_runner=ray", "-p", 'grid={"learning_rate": [0.001]}'), id="sweep-on-ray"),
    ],
)
def test_down_ends_a_served_run_in_flight_as_an_interrupted_run(stack, trigger):
    """`down` ends what the serve process runs as an interrupted command ends: flow run Crashed, MLflow runs KILLED."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env, _ = stack
    flow_run_id, mlflow_run_id = training_run(env, *trigger)
    down = subprocess.run([BIN / "cnn-train", "down"], env=env, capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    root = Path(env["CNN_TRAIN_ROOT"])
    store = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = store.search_runs([store.get_experiment_by_name("cnn-train").experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert mlflow_run_id in {run.info.run_id for run in runs}
    assert {run.info.status for run in runs} == {"KILLED"}, [(run.info.run_name, run.info.status) for run in runs]
    up = subprocess.run([BIN / "cnn-train", "up", "--no-trigger"], env=env, capture_output=True, text=True, timeout=400)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "marked Crashed" not in up.stdout  # nothing left for up to clean
    with temporary_settings({PREFECT_API_URL: prefect_api(env)}), get_client(sync_client=True) as client:
        stopped = client.read_flow_run(flow_run_id).state
    assert (stopped.name, stopped.message) == ("Crashed", "Execution was aborted by an interrupt signal.")
