"""The cnn-train flow end to end on a small real subset, on the session's temporary Prefect server, with a
temporary MLflow store: what lands in MLflow and in Prefect is asserted, not eyeballed."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cnn_train.flows.placement import training_precision
from PIL import Image

pytestmark = pytest.mark.slow

SMALL = {"epochs": 2, "sample_limit": 600, "test_limit": 300, "batch_size": 32, "seed": 3}


@pytest.fixture(scope="module")
def store(mlflow_store) -> str:
    return mlflow_store


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


def test_the_result_gives_the_runs_address_or_none_and_how_to_open_it(finished, store):
    """A script opens ``mlflow_run_url`` as it is: a sentence there ("cnn-train up, then open ...") broke it."""
    _, _, result, run, _ = finished
    assert result["mlflow_run_url"] is None, "a SQLite store has no page of its own"
    assert result["mlflow_open"].startswith(f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri {store}")
    assert result["mlflow_open"].endswith(f"/runs/{run.info.run_id}?workflowType=machine_learning")


def test_a_metric_at_every_epoch_step(finished):
    _, _, _, run, client = finished
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds", "images_per_second"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    assert run.data.metrics["test_accuracy"] > 0.5  # 540 images, 2 epochs: far above chance (0.1)
    assert "test_f1.ankle_boot" in run.data.metrics


def test_the_logged_model_carries_its_test_scores_and_what_made_it(finished):
    """MLflow 3's model page and the experiment's Models list show a logged model's own metrics and params."""
    _, _, _, run, client = finished
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    scores = {metric.key: metric for metric in model.metrics}
    assert scores["test_accuracy"].value == run.data.metrics["test_accuracy"]
    assert "test_f1.ankle_boot" in scores
    (test_set,) = [entry.dataset for entry in run.inputs.dataset_inputs if entry.dataset.name == "fashion-mnist-test"]
    assert (scores["test_accuracy"].dataset_name, scores["test_accuracy"].dataset_digest) == (test_set.name, test_set.digest)
    made_of = {key: run.data.params[key] for key in ("backend", "architecture", "epochs", "batch_size", "learning_rate", "seed")}
    assert {key: model.params[key] for key in made_of} == made_of
    # Named as the run names them: the Models tab and the runs table line up column for column.
    shared = set(model.params) & set(run.data.params)
    assert {"train.precision", "train.lr_schedule", "model.parameters", "sample_limit"} <= shared
    assert {key: model.params[key] for key in shared} == {key: run.data.params[key] for key in shared}
    # Scores on test sets of different sizes do not compare: the model says how many images it was scored on.
    assert model.params["test_limit"] == run.data.params["test_limit"] == str(SMALL["test_limit"])


def test_the_run_is_named_after_what_ran_and_its_flow_run(finished):
    """Every training run was named torch-cnn: a table of them could not be told apart."""
    from prefect.client.orchestration import get_client

    backend, state, _, run, _ = finished
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.info.run_name == f"{backend}-cnn-{flow_run.name}"


def test_the_run_names_the_commit_of_the_code_that_made_it(finished):
    """MLflow had no record of which code trained a model; the Prefect deployment's version had it."""
    _, _, _, run, _ = finished
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()


def test_values_left_out_are_no_params(finished):
    """data_dir, register and the limits left empty were logged as the text 'None'."""
    _, _, _, run, client = finished
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert "None" not in run.data.params.values() and "None" not in model.params.values()
    assert "register" not in run.data.params and "data_dir" not in run.data.params


def test_the_runs_description_heads_its_mlflow_page(finished):
    backend, _, result, run, _ = finished
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith(f"**Test accuracy {result['test_accuracy'] * 100:.2f}%**: Fashion-MNIST CNN, {backend} backend")
    # A run on a sample said nothing of it, beside runs on every image.
    assert "2 epochs at batch 32 on 540 training images, tested on 300." in description
    assert ("for the dense network" in description) == (backend == "torch")  # only torch's run trained it


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
    train, test = inputs["fashion-mnist-train"], inputs["fashion-mnist-test"]
    assert train.dataset.digest and "fashion-mnist" in train.dataset.source
    # The test set's own digest: the one a registered version's test_set_digest names. Both had the split's.
    assert test.dataset.digest not in ("", train.dataset.digest)
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "train"


def test_model_reloads_through_pyfunc(finished, tmp_path):
    import mlflow.pyfunc

    backend, _, _, run, _ = finished
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path))
    flavors = model.metadata.flavors
    assert {"torch": "pytorch", "keras": "keras"}[backend] in flavors
    assert model.metadata.signature is not None
    images = np.random.default_rng(0).uniform(size=(7, 28, 28, 1)).astype(np.float32)
    proba = np.asarray(model.predict(images))
    assert proba.shape == (7, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)


def test_report_artifacts_are_real_pictures(finished, tmp_path):
    _, _, _, run, client = finished
    names = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    for figure in ("learning_curves", "confusion_matrix", "predictions", "confident_mistakes", "kernels", "feature_maps"):
        assert f"report/{figure}.png" in names, figure
    local = Path(client.download_artifacts(run.info.run_id, "report", str(tmp_path)))
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


def test_dense_baseline_sits_beside_the_cnn(finished, tmp_path):
    backend, _, _, run, client = finished
    if backend != "torch":
        pytest.skip("the dense comparison runs with the torch backend in this module")
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(children) == 1
    child = children[0]
    assert child.info.status == "FINISHED"
    assert child.data.params["architecture"] == "dense"
    assert run.data.params["dense.model.parameters"] == "101770" and "dense.parameters" not in run.data.metrics
    report = Path(client.download_artifacts(run.info.run_id, "report/report.md", str(tmp_path))).read_text()
    assert "dense network" in report and f"{run.data.metrics['dense.test_accuracy'] * 100:.2f}%" in report


def test_the_tasks_are_named_after_what_they_train(finished):
    """The CNN's and the dense network's tasks read "train-34b" and "train-ac1" in the flow run's graph."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    backend, state, _, _, _ = finished
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    dense = ["evaluate-torch-dense-baseline", "train-torch-dense-baseline"] if backend == "torch" else []
    # prep and report read "prep-7f6" and "report-583": no task run carries Prefect's random suffix.
    assert sorted(run.name for run in runs) == sorted(["prep", "evaluate-cnn", "train-cnn", "report", *dense])


def _prefect_artifacts(state):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            )

    return asyncio.run(read())


def test_report_and_prefect_table_give_the_same_speed(finished, tmp_path):
    """One statistic per figure: report.md and the Prefect cnn-against-dense table print the same
    seconds per epoch and images per second for the CNN, and they are the epochs' medians."""
    backend, state, _, run, client = finished
    if backend != "torch":
        pytest.skip("the dense comparison runs with the torch backend in this module")
    import json

    table = next(a for a in _prefect_artifacts(state) if a.key == "cnn-against-dense")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    cnn = next(row for row in rows if row["name"] == "CNN")
    report = Path(client.download_artifacts(run.info.run_id, "report/report.md", str(tmp_path))).read_text()
    seconds = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")]
    assert cnn["seconds_per_epoch"] == f"{np.median(seconds):.1f}"
    # MLflow has them too (its runs table showed the last epoch's as the run's speed).
    assert run.data.metrics["median_epoch_seconds"] == pytest.approx(np.median(seconds))
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "images_per_second")]
    assert f"{run.data.metrics['median_images_per_second']:,.0f}" == f"{np.median(rates):,.0f}" == cnn["images_per_second"]
    for figure in ("seconds_per_epoch", "images_per_second"):
        assert f"| {cnn[figure]} |" in report, (figure, cnn[figure])
    # The table's description in the Prefect UI is report.md's sentence: the CNN's gain, not bare numbers.
    assert table.description.startswith("The CNN reaches ") and table.description in report


def test_prefect_artifacts(finished):
    _, state, _, _, _ = finished
    artifacts = _prefect_artifacts(state)
    types = {a.type for a in artifacts}
    assert {"markdown", "table", "progress"} <= types
    progress = [a for a in artifacts if a.type == "progress"]
    assert any(float(a.data) == 100.0 for a in progress)
    # It had no description: which model, over how many images.
    (per_class,) = [a for a in artifacts if a.key == "per-class-metrics"]
    backend = finished[0]
    assert per_class.description == f"Precision, recall and F1 per class of the CNN ({backend} backend), over 300 test images."


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        pytest.param({"train_device": "gpu-required"}, "no GPU is visible", id="gpu-required-without-gpu"),
        pytest.param({"evaluate_device": "gpu:0"}, "invalid device request 'gpu:0'; expected 'cpu', 'gpu-preferred'", id="bad-device-string"),
        pytest.param({"epochs": 0}, "epochs: Input should be greater than or equal to 1", id="zero-epochs"),
        pytest.param({"epochs": -3}, "epochs: Input should be greater than or equal to 1", id="negative-epochs"),
        pytest.param({"epochs": 2.5}, "epochs", id="fractional-epochs"),
        pytest.param({"epochs": 10**23}, "epochs: Input should be less than or equal to 1000", id="endless-epochs"),
        pytest.param({"experiment": "x" * 501}, "experiment: String should have at most 500 characters", id="experiment-name-mlflow-refuses"),
        pytest.param({"backend": "tensorflow"}, "unknown backend 'tensorflow'; installed backends:", id="unknown-backend"),
        pytest.param({"architecture": "resnet"}, "architecture: Input should be 'cnn', 'dense' or 'cnn-improved'", id="unknown-architecture"),
        pytest.param({"batch_size": 0}, "batch_size: Input should be greater than or equal to 1", id="zero-batch"),
        pytest.param({"batch_size": 1000, "sample_limit": 600}, "batch_size: 1000 is larger than the training set (540 images)", id="batch-larger-than-data"),
        pytest.param({"learning_rate": 0.0}, "learning_rate: Input should be greater than 0", id="zero-learning-rate"),
        pytest.param({"learning_rate": -0.1}, "learning_rate: Input should be greater than 0", id="negative-learning-rate"),
        pytest.param({"learning_rate": float("nan")}, "learning_rate: Input should be a finite number", id="nan-learning-rate"),
        pytest.param({"learning_rate": float("inf")}, "learning_rate: Input should be a finite number", id="infinite-learning-rate"),
        pytest.param({"validation_fraction": 0.0}, "validation_fraction: Input should be greater than 0", id="zero-validation"),
        pytest.param({"validation_fraction": 1.5}, "validation_fraction: Input should be less than 1", id="validation-above-one"),
        pytest.param({"validation_fraction": float("nan")}, "validation_fraction: Input should be a finite number", id="nan-validation"),
        pytest.param({"sample_limit": 0}, "sample_limit: Input should be greater than or equal to 20", id="zero-sample-limit"),
        pytest.param({"sample_limit": 70_000}, "sample_limit: Input should be less than or equal to 60000", id="sample-limit-above-data"),
    ],
)
def test_bad_input_fails_before_any_mlflow_run(store, parameters, message):
    from mlflow import MlflowClient

    client = MlflowClient(store)

    def run_count() -> int:
        experiment = client.get_experiment_by_name("cnn-train")
        return len(client.search_runs([experiment.experiment_id])) if experiment else 0

    before = run_count()
    state = _run_flow(**(SMALL | parameters))
    assert state.is_failed()
    with pytest.raises(Exception) as caught:
        state.result()
    assert message in str(caught.value)
    assert run_count() == before


@pytest.mark.parametrize(
    ("module", "name", "arguments", "keywords", "message"),
    [
        pytest.param("train_flow", "cnn_train", (), {"epoch": 1}, "cnn_train() got an unexpected keyword argument 'epoch' (did you mean epochs?); its parameters: backend, architecture, epochs,", id="train-misspelt"),
        pytest.param("train_flow", "cnn_train", (3,), {}, "cnn_train() takes its parameters as keywords (backend, architecture,", id="train-positional"),
        pytest.param("compare_flow", "cnn_train_compare", (), {"backend": "torch"}, "(did you mean backends?)", id="compare-singular"),
        pytest.param("sweep_flow", "cnn_train_sweep", (), {"grids": "lr=0.1"}, "(did you mean grid?)", id="sweep-plural"),
        pytest.param("tune_flow", "cnn_train_tune", (), {"trial": 3}, "(did you mean trials?)", id="tune-misspelt"),
        pytest.param("predict_flow", "cnn_train_predict", (), {"image": "x.png"}, "its parameters: model, images", id="predict-singular"),
    ],
)
def test_a_wrong_argument_from_python_gets_one_line_and_no_run(store, module, name, arguments, keywords, message):
    """Prefect's ParameterBindError quoted the whole signature: ~3,000 characters of field declarations."""
    import importlib

    from mlflow import MlflowClient

    flow = getattr(importlib.import_module(f"cnn_train.flows.{module}"), name)
    client = MlflowClient(store)

    def run_ids() -> set[str]:
        return {run.info.run_id for run in client.search_runs([e.experiment_id for e in client.search_experiments()])}

    before = run_ids()
    with pytest.raises(TypeError) as caught:
        flow(*arguments, **keywords)
    assert message in str(caught.value) and "\n" not in str(caught.value) and len(str(caught.value)) < 600
    assert run_ids() == before


def test_a_port_variable_that_holds_no_port_fails_before_any_mlflow_run(store, monkeypatch):
    """It failed as the run's link was logged, after the run had started: RUNNING for good, no heartbeat to reap it by."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    monkeypatch.setenv("CNN_TRAIN_MLFLOW_PORT", "abc")
    def run_ids() -> set[str]:
        return {run.info.run_id for run in client.search_runs([e.experiment_id for e in client.search_experiments()])}

    before = run_ids()
    state = _run_flow(**SMALL)
    assert state.is_failed() and state.message.startswith("CNN_TRAIN_MLFLOW_PORT='abc' is not a port"), state.message
    assert run_ids() == before


def test_a_diverged_training_fails_the_run_once_in_one_line(store):
    """Not retried (a retry resumes from the last good checkpoint and diverges again), and not blamed on
    the backend: before, the NaN weights reached the evaluate step, which said the backend broke the contract."""
    from mlflow import MlflowClient

    state = _run_flow(**(SMALL | {"learning_rate": 1e9}))
    assert state.is_failed()
    assert state.message == (
        "training diverged: the training loss was nan in epoch 1 of 2, so the model is not logged; "
        "lower the learning rate (learning_rate 1e+09, batch_size 32)"
    )
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("cnn-train")
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    assert run.info.status == "FAILED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 1  # one attempt, one epoch


def test_compare_command_side_by_side(store, tmp_path, prefect_api_url):
    import os
    import subprocess
    import sys

    cli = Path(sys.executable).with_name("cnn-train")
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CNN_TRAIN_STATE_DIR": str(tmp_path / "state"),
                        "PREFECT_API_URL": prefect_api_url}  # the session's server keeps the flow run's artifacts to read
    result = subprocess.run(
        [cli, "compare", "--backend", "keras", "--backend", "torch", "--epochs", "1",
         "--sample-limit", "400", "--test-limit", "200", "--seed", "5"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert any("keras" in line for line in table) and any("torch" in line for line in table)
    assert "verdict: " in result.stdout and "parity" in result.stdout
    assert "![" not in result.stdout  # a terminal shows no pictures: they are in MLflow
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("cnn-train").experiment_id])
    parents = [r for r in runs if r.data.tags.get("cnn_train.role") == "compare"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.params["backend"] for r in children) == ["keras", "torch"]
    assert all(r.info.status == "FINISHED" for r in children)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "compare")}
    assert {"compare/compare.md", "compare/confusion_matrix_keras.png", "compare/confusion_matrix_torch.png"} <= artifacts
    verdict = next(line for line in result.stdout.splitlines() if line.startswith("verdict: ")).removeprefix("verdict: ")
    assert parents[0].data.tags["mlflow.note.content"] == (
        f"cnn on keras against torch: {verdict}.\n\nThe whole comparison: `compare/compare.md` in Artifacts."
    )
    # The Prefect table says the verdict too, as its description in the UI.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        flow_run = ArtifactFilterFlowRunId(any_=[parents[0].data.tags["prefect.flow_run_id"]])
        key = ArtifactFilterKey(any_=["backend-comparison"])
        (table,) = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=key, flow_run_id=flow_run))
    assert table.description == f"cnn on keras against torch: {verdict}"


def test_the_improved_recipe_runs_and_records_how_it_trained(store, tmp_path):
    """Left-out training values become the recipe's, and MLflow says so, down to the schedule."""
    state = _run_flow(architecture="cnn-improved", epochs=1, sample_limit=600, test_limit=300, seed=3)
    assert state.is_completed(), state.message
    from mlflow import MlflowClient

    run = MlflowClient(store).get_run(state.result()["mlflow_run_id"])
    params = run.data.params
    expected = {"architecture": "cnn-improved", "epochs": "1", "batch_size": "128", "learning_rate": "0.003",
                "train.lr_schedule": "onecycle", "train.label_smoothing": "0.1",
                # The recipe asks for "auto": what this CPU computes natively, recorded with the reason.
                "train.precision": training_precision("auto", "cpu")[0],
                "train.precision_reason": training_precision("auto", "cpu")[1],
                "train.augment": "False", "model.batch_norm": "True", "model.dropout": "0.3",
                "model.conv_filters": "32,32,64,64", "model.parameters": "468010"}
    assert {k: params[k] for k in expected} == expected
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path))
    images = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model.predict(images)).sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("backends", "line", "compared"),
    [
        pytest.param(
            ["numpy-mlp-fails", "numpy-mlp"],
            "backend numpy-mlp-fails failed: RuntimeError: the framework ran out of memory; numpy-mlp trained "
            "(its child run), but a comparison needs two backends",
            False, id="one-of-two",
        ),
        pytest.param(
            ["numpy-mlp", "numpy-mlp-fails", "numpy-mlp-too"],
            "backend numpy-mlp-fails failed: RuntimeError: the framework ran out of memory; the comparison of "
            "numpy-mlp, numpy-mlp-too is recorded without it",
            True, id="one-of-three",
        ),
    ],
)
def test_a_failing_backend_is_named_and_the_others_still_train(store, monkeypatch, backends, line, compared):
    """The first backend's failure ended the comparison: the later ones never trained, and the line said not which failed."""
    from mlflow import MlflowClient
    from prefect.exceptions import FailedRun

    from cnn_train.flows.compare_flow import cnn_train_compare
    from cnn_train.plugins import registry
    from tests.plugin_fixtures import FakeDistribution, only_distributions
    from tests.plugin_fixtures_numpy import PLUGIN_SOURCE  # noqa: F401  (imports the plugin from its source folder)

    only_distributions(monkeypatch, FakeDistribution("cnn-train-numpy-mlp", {
        "numpy-mlp": "cnn_train_numpy_mlp.backend:NumpyMLPBackend",
        "numpy-mlp-too": "cnn_train_numpy_mlp.backend:NumpyMLPBackend",
        "numpy-mlp-fails": "tests.plugin_fixtures_numpy:FailsToTrain",
    }, version="0.1.0", requires=("cnn-train", "numpy>=1.26", "mlflow>=3.1")))
    registry.refresh()
    try:
        with pytest.raises(FailedRun) as raised:
            cnn_train_compare(backends=backends, architecture="dense", **SMALL)
    finally:
        monkeypatch.undo()
        registry.refresh()
    assert str(raised.value) == line
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("cnn-train").experiment_id], "tags.`cnn_train.role` = 'compare'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    parent = runs[0]
    assert parent.info.status == "FAILED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.info.run_name.split("-dense")[0]: c.info.status for c in children} == {
        name: "FAILED" if name.endswith("fails") else "FINISHED" for name in backends
    }
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert ("compare/compare.md" in artifacts) is compared
