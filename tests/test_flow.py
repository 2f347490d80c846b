"""The cnn-train flow end to end on a small real subset, under Prefect's test harness, with a
temporary MLflow store: what lands in MLflow and in Prefect is asserted, not eyeballed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

SMALL = {"epochs": 2, "sample_limit": 600, "test_limit": 300, "batch_size": 32, "seed": 3}


@pytest.fixture(scope="module")
def store(tmp_path_factory, real_fashion_mnist_dir_module) -> str:
    """A private MLflow store and state dir, and a Prefect test server, for this module."""
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("flow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    patcher = pytest.MonkeyPatch()
    patcher.setenv("MLFLOW_TRACKING_URI", uri)
    patcher.setenv("CNN_TRAIN_STATE_DIR", str(root / "state"))
    patcher.setenv("CNN_TRAIN_DATA_DIR", str(real_fashion_mnist_dir_module))
    with prefect_test_harness(server_startup_timeout=120):
        yield uri
    patcher.undo()


@pytest.fixture(scope="module")
def real_fashion_mnist_dir_module() -> Path:
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not (folder / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (scripts/bootstrap.sh installs it as root)")
    return folder


def _run_flow(**parameters):
    from cnn_train.flows.train_flow import cnn_train

    return cnn_train(**parameters, return_state=True)


@pytest.fixture(scope="module", params=["torch", "keras"])
def finished(request, store):
    """One small real run per backend (the torch one also trains the dense baseline)."""
    backend = request.param
    state = _run_flow(backend=backend, compare_dense=backend == "torch", **SMALL)
    assert state.is_completed(), state.message
    result = state.result()
    from mlflow import MlflowClient

    client = MlflowClient(store)
    run = client.get_run(result["mlflow_run_id"])
    return backend, state, result, run, client


def test_run_is_finished_with_every_flow_parameter(finished):
    backend, _, _, run, _ = finished
    assert run.info.status == "FINISHED"
    params = run.data.params
    expected = {"backend": backend, "architecture": "cnn", "epochs": "2", "batch_size": "32",
                "learning_rate": "0.001", "seed": "3", "validation_fraction": "0.1", "sample_limit": "600",
                "experiment": "cnn-train", "compare_dense": str(backend == "torch"), "train_device": "gpu-preferred"}
    assert {k: params[k] for k in expected} == expected
    assert params["backend.distribution"] == "cnn-train"
    assert params["version.torch"].startswith("2.")
    assert params["model.parameters"] == "421642"


def test_a_metric_at_every_epoch_step(finished):
    _, _, _, run, client = finished
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds", "images_per_second"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    assert run.data.metrics["test_accuracy"] > 0.5  # 540 images, 2 epochs: far above chance (0.1)
    assert "test_f1.ankle_boot" in run.data.metrics


def test_devices_are_recorded_per_task(finished):
    _, _, _, run, _ = finished
    assert {k: run.data.tags[f"device.{k}"] for k in ("prep", "train", "evaluate", "report")} == dict.fromkeys(
        ("prep", "train", "evaluate", "report"), "cpu"
    )


def test_flow_run_is_linked(finished):
    _, state, _, run, _ = finished
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)


def test_datasets_are_logged_with_digest_and_source(finished):
    _, _, _, run, _ = finished
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert {"fashion-mnist-train", "fashion-mnist-test"} <= set(inputs)
    train = inputs["fashion-mnist-train"]
    assert train.dataset.digest and "fashion-mnist" in train.dataset.source
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "train"


def test_model_reloads_through_pyfunc(finished):
    import mlflow.pyfunc

    backend, _, _, run, _ = finished
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    flavors = model.metadata.flavors
    assert {"torch": "pytorch", "keras": "keras"}[backend] in flavors
    assert model.metadata.signature is not None
    images = np.random.default_rng(0).uniform(size=(7, 28, 28, 1)).astype(np.float32)
    proba = np.asarray(model.predict(images))
    assert proba.shape == (7, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)


def test_report_artifacts_are_real_pictures(finished):
    _, _, _, run, client = finished
    names = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    for figure in ("learning_curves", "confusion_matrix", "predictions", "confident_mistakes", "kernels", "feature_maps"):
        assert f"report/{figure}.png" in names, figure
    local = Path(client.download_artifacts(run.info.run_id, "report"))
    for png in local.glob("*.png"):
        with Image.open(png) as image:
            assert image.width >= 300 and image.height >= 300, png.name
            assert np.asarray(image.convert("L")).std() > 5, f"{png.name} looks blank"
    report = (local / "report.md").read_text()
    accuracy = run.data.metrics["test_accuracy"]
    assert f"{accuracy * 100:.2f}%" in report
    assert "| Ankle boot |" in report or "Ankle boot" in report
    per_class = (local / "per_class.csv").read_text().splitlines()
    assert len(per_class) == 11


def test_dense_baseline_sits_beside_the_cnn(finished):
    backend, _, _, run, client = finished
    if backend != "torch":
        pytest.skip("the dense comparison runs with the torch backend in this module")
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(children) == 1
    child = children[0]
    assert child.info.status == "FINISHED"
    assert child.data.params["architecture"] == "dense"
    assert run.data.metrics["dense.parameters"] == 101_770
    report = Path(client.download_artifacts(run.info.run_id, "report/report.md")).read_text()
    assert "dense network" in report and f"{run.data.metrics['dense.test_accuracy'] * 100:.2f}%" in report


def test_prefect_artifacts(finished):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _, state, _, _, _ = finished

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            )

    artifacts = asyncio.run(read())
    types = {a.type for a in artifacts}
    assert {"markdown", "table", "progress"} <= types
    progress = [a for a in artifacts if a.type == "progress"]
    assert any(float(a.data) == 100.0 for a in progress)
