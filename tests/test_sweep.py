"""Sweeps: the grid, the ranking, local and Ray runs with MLflow parent/child runs, the registry,
and device requests turned into Ray resource requests."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pandas as pd
import pytest

from cnn_train.flows.params import ParameterError
from cnn_train.flows.steps import TrainOutcome
from cnn_train.flows.sweep_flow import DivergedTrial, TrialResult, data_parameters, expand_grid, ranking_table, validate_sweep
from cnn_train.plugins.config import TrainConfig
from cnn_train.plugins.contract import EpochMetrics, Evaluation, TrainHistory

GRID = {"learning_rate": [1e-3, 3e-4], "architecture": ["cnn", "dense"]}
SMALL = {"epochs": 1, "sample_limit": 400, "test_limit": 200, "seed": 4}


def test_grid_expands_to_every_combination():
    assert expand_grid(GRID) == [
        {"architecture": "cnn", "learning_rate": 1e-3},
        {"architecture": "cnn", "learning_rate": 3e-4},
        {"architecture": "dense", "learning_rate": 1e-3},
        {"architecture": "dense", "learning_rate": 3e-4},
    ]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        pytest.param({}, "give at least one field to vary", id="empty"),
        pytest.param({"sample_limit": [100, 200]}, "cannot vary 'sample_limit'; sweepable fields: backend", id="data-field"),
        pytest.param(
            {"lr": [0.1], "epoks": [1]}, "cannot vary 'epoks' (did you mean epochs?), 'lr' (did you mean learning_rate?); "
            "sweepable fields: backend", id="mistyped-fields",
        ),
        pytest.param({"learning_rate": []}, "learning_rate needs a non-empty list", id="no-values"),
        pytest.param({"architecture": "cnn"}, "architecture needs a non-empty list", id="string-not-list"),
        pytest.param({"seed": [1, 2, 1]}, "seed lists 1 more than once; give each value once", id="repeated-value"),
    ],
)
def test_bad_grids_are_refused(grid, message):
    with pytest.raises(ParameterError, match=re.escape(message)):
        expand_grid(grid)


def test_an_invalid_combination_fails_the_sweep_before_it_starts():
    with pytest.raises(ParameterError, match=r"(?s)trial \{'learning_rate': -1\}: .*learning_rate: Input should be greater than 0"):
        validate_sweep({"backend": "torch", "grid": {"learning_rate": [1e-3, -1]}})


@pytest.mark.parametrize(
    ("runner", "problem"),
    [
        pytest.param({"ray_address": "auto"}, "ray_address needs task_runner 'ray' (got 'local')", id="address-in-threads"),
        pytest.param({"ray_address": "auto", "ray_resources": {"a100": 1}},
                     "ray_address and ray_resources need task_runner 'ray' (got 'local')", id="both-in-threads"),
        pytest.param({"task_runner": "ray", "ray_resources": {"a100": 0}},
                     "ray_resources: each resource is a name a node advertises with `ray start --resources` and a "
                     "positive amount, e.g. {\"a100\": 1}, not 'a100': 0 (got {'a100': 0})", id="a-resource-of-nothing"),
        pytest.param({"task_runner": "dask"}, "task_runner: Input should be 'local' or 'ray' (got 'dask')", id="unknown-runner"),
    ],
)
def test_where_a_search_runs_its_trials_is_checked_before_it_starts(runner, problem):
    from cnn_train.flows.tuning import validate_tune

    for validate in (validate_sweep, validate_tune):
        with pytest.raises(ParameterError) as raised:
            validate({"epochs": 1} | runner)
        assert str(raised.value) == f"invalid parameters: {problem}", validate.__name__


@pytest.mark.parametrize("task_runner", ["local", "ray"], ids=["threads-need-the-gpu-here", "ray-places-the-trial"])
def test_a_trial_evaluates_on_its_training_device_and_only_threads_need_the_gpu_on_this_machine(monkeypatch, task_runner):
    """A trial trains and evaluates in one task (its logged evaluate_device says so); on Ray, Ray places
    that task on a node with a GPU, so a driver without one may ask for gpu-required."""
    import torch

    from cnn_train.flows.tuning import validate_tune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    values = {"epochs": 1, "train_device": "gpu-required", "task_runner": task_runner}
    if task_runner == "local":
        for validate in (validate_sweep, validate_tune):
            with pytest.raises(ParameterError, match="train requires a GPU"):
                validate(values)
        return
    trials, _, _ = validate_sweep(values)
    plan = validate_tune(values)
    for params in (*(params for _, params in trials), plan.params_for({"learning_rate": 1e-3, "batch_size": 32})):
        assert (params.train_device, params.evaluate_device) == ("gpu-required", "gpu-required")


def test_a_field_set_on_its_own_is_every_trials_value_and_the_default_grid_gives_way():
    trials, options, _ = validate_sweep({"learning_rate": 2e-3})
    assert [combo for combo, _ in trials] == [{"architecture": "cnn"}, {"architecture": "dense"}]
    assert {params.learning_rate for _, params in trials} == {2e-3}
    assert options.grid == {"architecture": ["cnn", "dense"]}  # what the parent run logs as its grid


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param(
            {"learning_rate": 2e-3, "grid": {"learning_rate": [1e-3, 3e-4]}},
            "grid: learning_rate is set to 0.002 and also varied by the grid ([0.001, 0.0003]); give it in one "
            "place: leave learning_rate unset or take it out of the grid",
            id="set-and-in-the-given-grid",
        ),
        pytest.param(
            {"learning_rate": 2e-3, "architecture": "dense"},
            "grid: the run sets every field the default grid varies (architecture, learning_rate); give a grid "
            "of fields to vary",
            id="default-grid-left-empty",
        ),
        pytest.param(  # not "leave sample_limit unset", after which it was refused for what it is
            {"sample_limit": 400, "grid": {"sample_limit": [400, 500]}},
            "grid: cannot vary 'sample_limit'; sweepable fields: backend, architecture, epochs, batch_size, learning_rate, seed",
            id="set-and-not-sweepable",
        ),
    ],
)
def test_a_field_set_and_varied_is_refused_rather_than_ignored(values, message):
    with pytest.raises(ParameterError) as raised:
        validate_sweep(values)
    assert str(raised.value) == message


def test_the_command_refuses_a_set_and_varied_field_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CNN_TRAIN_STATE_DIR": str(tmp_path / "state")}
    result = CliRunner().invoke(
        app, ["sweep", "--learning-rate", "0.002", "--grid", "learning_rate=0.001,0.0003", "--sample-limit", "400"], env=env
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "cnn-train: grid: learning_rate is set to 0.002 and also varied by the grid ([0.001, 0.0003]); give it in "
        "one place: leave learning_rate unset or take it out of the grid"
    ]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("args", "outcome"),
    [
        pytest.param(["sweep", "--architecture", "cnn", "--grid", "architecture=cnn,dense"],
                     "cnn-train: grid: architecture is set to 'cnn' and also varied by the grid (['cnn', 'dense']); give it "
                     "in one place: leave architecture unset or take it out of the grid", id="sweep-refuses"),
        pytest.param(["sweep", "--architecture", "cnn"], {"learning_rate": [0.001, 0.0003]}, id="sweep-default-grid-gives-way"),
        pytest.param(["tune", "--seed", "42", "--space", "seed=1,2"],
                     "cnn-train: space: seed is set to 42 and also varied by the space ('1,2'); give it in one place: "
                     "leave seed unset or take it out of the space",
                     id="tune-refuses"),
    ],
)
def test_a_field_given_at_its_default_value_counts_as_given(monkeypatch, args, outcome):
    """`--architecture cnn --grid architecture=cnn,dense` ran both architectures: the flow cannot tell
    a default given from one left, so the command line decides."""
    import typer
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app, training, tune

    reached = {}

    def stop_before_the_flow(flow_path, check, values):
        reached.update(values)
        raise typer.Exit(0)

    monkeypatch.setattr(training, "checked_run", stop_before_the_flow)
    monkeypatch.setattr(tune, "checked_run", stop_before_the_flow)
    result = CliRunner().invoke(app, args)
    if isinstance(outcome, dict):
        assert (result.exit_code, reached["grid"]) == (0, outcome), result.output
    else:
        assert (result.exit_code, result.output.strip().splitlines(), reached) == (2, [outcome], {})


@pytest.mark.parametrize(
    ("items", "line"),
    [
        pytest.param(["learning_rate=0.001", "learning_rate=0.002"],
                     "cnn-train: --grid gives learning_rate twice; list its values in one item: learning_rate=A,B,...",
                     id="a-field-twice"),
        pytest.param(["learning_rate"], "cnn-train: --grid takes FIELD=VALUE,VALUE...; got 'learning_rate'", id="no-values"),
    ],
)
def test_a_grid_the_command_cannot_take_is_one_line(tmp_path, items, line):
    from typer.testing import CliRunner

    from cnn_train.flows.cli import app

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CNN_TRAIN_STATE_DIR": str(tmp_path / "state")}
    arguments = [part for item in items for part in ("--grid", item)]
    result = CliRunner().invoke(app, ["sweep", *arguments, "--sample-limit", "400"], env=env)
    assert (result.exit_code, result.output.strip().splitlines()) == (2, [line])
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("values", "split_seed"),
    [
        pytest.param({"grid": {"seed": [1, 2]}}, 42, id="grid-over-seed-keeps-the-sweeps-split"),
        pytest.param({"seed": 7, "grid": {"learning_rate": [1e-3, 3e-4]}}, 7, id="the-sweeps-seed"),
    ],
)
def test_the_one_data_prep_splits_with_the_sweeps_own_seed(values, split_seed):
    trials, _, _ = validate_sweep(values)
    shared = data_parameters(trials[0][1], values)  # the flow's values; an unset seed is the declared 42
    assert shared.seed == split_seed
    assert shared.model_dump(exclude={"seed"}) == trials[0][1].model_dump(exclude={"seed"})


def _trial(run_id: str, learning_rate: float, accuracy: float, loss: float, epoch_seconds: tuple[float, ...]) -> TrialResult:
    history = TrainHistory(tuple(EpochMetrics(k, 0.5, 0.8, 0.5, 0.8, t, 60_000 / t) for k, t in enumerate(epoch_seconds, 1)))
    trained = TrainOutcome("cnn", "cpu", TrainConfig(), Path("unused"), history, 421_642, f"models:/m-{run_id}", 0)
    return TrialResult({"learning_rate": learning_rate}, run_id, trained, Evaluation(loss=loss, accuracy=accuracy))


def test_ranking_is_best_first_with_each_trial_s_median_epoch():
    results = [
        _trial("a", 0.1, accuracy=0.7, loss=0.9, epoch_seconds=(9.0, 2.0, 3.0)),
        _trial("b", 0.01, accuracy=0.9, loss=0.3, epoch_seconds=(4.0,)),
        _trial("c", 0.001, accuracy=0.8, loss=0.5, epoch_seconds=(5.0, 1.0)),
    ]
    ranking = ranking_table(results)
    assert list(ranking["run_id"]) == ["b", "c", "a"]
    assert list(ranking["rank"]) == [1, 2, 3]
    assert list(ranking["learning_rate"]) == [0.01, 0.001, 0.1]
    assert list(ranking["test_loss"]) == [0.3, 0.5, 0.9]
    assert list(ranking["seconds_per_epoch"]) == [4.0, 3.0, 3.0]


@pytest.mark.parametrize(
    "losses",
    [pytest.param((0.78, 0.76), id="lower-loss-second"), pytest.param((0.76, 0.78), id="lower-loss-first")],
)
def test_a_tie_in_accuracy_ranks_the_lower_test_loss_first(losses):
    results = [_trial(name, 1e-3, accuracy=0.7, loss=loss, epoch_seconds=(3.0,)) for name, loss in zip("ab", losses)]
    ranking = ranking_table(results)
    assert ranking["test_loss"].tolist() == sorted(losses)


def test_a_diverged_trial_is_listed_last_unranked_with_a_note():
    results = [_trial("a", 0.01, accuracy=0.7, loss=0.9, epoch_seconds=(3.0,)), _trial("b", 0.001, 0.9, 0.3, (4.0,))]
    ranking = ranking_table(results, [DivergedTrial({"learning_rate": 10.0}, "c", epoch=2)])
    assert ranking["run_id"].tolist() == ["b", "a", "c"]
    assert ranking["rank"].tolist() == [1, 2, pd.NA]
    assert ranking["learning_rate"].tolist() == [0.001, 0.01, 10.0]
    assert ranking["note"].tolist() == ["", "", "training diverged in epoch 2"]
    assert ranking.loc[2, ["test_accuracy", "test_loss", "seconds_per_epoch", "device"]].isna().all()
    assert "note" not in ranking_table(results).columns


@pytest.mark.slow
def test_a_sweep_ranks_what_finished_when_a_trial_diverges(mlflow_store):
    from mlflow import MlflowClient

    from cnn_train.flows.sweep_flow import cnn_train_sweep

    result = cnn_train_sweep(grid={"learning_rate": [1e9, 1e-3]}, **SMALL)
    client = MlflowClient(mlflow_store)
    assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
    statuses = {c.data.params["learning_rate"]: c.info.status for c in _children(client, result["mlflow_run_id"])}
    assert statuses == {"1000000000.0": "FAILED", "0.001": "FINISHED"}
    assert result["best_values"] == {"learning_rate": 1e-3}
    assert [(r["rank"], r["note"]) for r in result["ranking"]] == [(1, ""), (None, "training diverged in epoch 1")]


@pytest.mark.slow
def test_a_sweep_whose_every_trial_diverged_fails_in_one_line(mlflow_store):
    from cnn_train.flows.sweep_flow import cnn_train_sweep

    state = cnn_train_sweep(grid={"learning_rate": [1e9, 1e8]}, **SMALL, return_state=True)
    assert state.is_failed()
    assert state.message == (
        "every trial's training diverged ({'learning_rate': 1000000000.0}, {'learning_rate': 100000000.0}); "
        "lower the learning rates in the grid"
    )


def _children(client, parent_id):
    run = client.get_run(parent_id)
    return client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.slow
def test_local_sweep_ranks_four_children_and_registers_the_best(mlflow_store):
    from mlflow import MlflowClient

    from cnn_train.flows.sweep_flow import cnn_train_sweep

    result = cnn_train_sweep(grid=GRID, register_best="fashion-cnn-best", **SMALL)
    client = MlflowClient(mlflow_store)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert "None" not in parent.data.params.values(), parent.data.params  # values left out are no params
    # architecture=cnn was logged as if every trial's, half of them dense; the seed is the split's.
    assert not set(GRID) - {"seed"} & set(parent.data.params) and parent.data.params["seed"] == str(SMALL["seed"]), parent.data.params
    children = _children(client, parent.info.run_id)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert {"sweep/ranking.csv", "sweep/ranking.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    best = max(children, key=lambda c: c.data.metrics["test_accuracy"])
    assert parent.data.tags["cnn_train.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(best.data.metrics["test_accuracy"])
    varied = ", ".join(f"{name}={value}" for name, value in result["best_values"].items())  # was a Python dict
    assert parent.data.tags["mlflow.note.content"].startswith(f"Best trial: {varied}, test accuracy ")
    assert f"Train it again: `{result['train_again']}`" in parent.data.tags["mlflow.note.content"]
    assert result["train_again"].startswith("cnn-train run ")
    assert f"(MLflow run `{best.info.run_id}`)." in parent.data.tags["mlflow.note.content"]
    version = client.get_model_version("fashion-cnn-best", str(result["registered_version"]))
    assert version.run_id == best.info.run_id
    varied = ", ".join(f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}" for name, value in result["best_values"].items())
    # As a run's registration reads (it printed a Python dict, and neither said how many test images).
    assert version.description == (
        f"torch {best.data.params['architecture']}, test_accuracy={best.data.metrics['test_accuracy']:.4f} on 200 test images. "
        f"Best trial of sweep {parent.info.run_id}: {varied}"
    )
    # In the flow run's graph the trials read "trial-9ea", "trial-788"...: now as their child runs do.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert sorted(run.name for run in task_runs if run.name.startswith("trial")) == sorted(c.info.run_name for c in children)
    assert {"prep", "register"} <= {run.name for run in task_runs}
    # The markdown ranking was keyed "sweep-best"; neither artifact said its verdict.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    described = {a.key: a.description for a in artifacts if a.key in ("sweep-ranking", "sweep-report")}
    assert described == dict.fromkeys(("sweep-ranking", "sweep-report"), parent.data.tags["mlflow.note.content"].splitlines()[0])


@pytest.fixture
def recorded_ray_options(monkeypatch):
    """What prefect-ray passes to ``ray.remote`` for each submitted task."""
    import prefect_ray.task_runners as runners

    recorded: list[dict] = []
    original = runners.ray.remote

    def remote(*args, **kwargs):
        if "num_gpus" in kwargs:  # Ray's own helpers call ray.remote too (num_cpus=0)
            recorded.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(runners.ray, "remote", remote)
    return recorded


@pytest.mark.slow
def test_ray_sweep_on_cpu(mlflow_store, recorded_ray_options):
    """Trials on a local Ray from the flow's own parameter, as a deployment run (or the command) gives it."""
    from mlflow import MlflowClient

    from cnn_train.flows.sweep_flow import cnn_train_sweep

    result = cnn_train_sweep(grid=GRID, task_runner="ray", **SMALL)
    client = MlflowClient(mlflow_store)
    children = _children(client, result["mlflow_run_id"])
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    params = client.get_run(result["mlflow_run_id"]).data.params
    assert (params["task_runner"], params["ray_address"], params["ray_resources"]) == ("RayClusterTaskRunner", "local", "{}")
    assert [r["rank"] for r in result["ranking"]] == [1, 2, 3, 4]
    # gpu-preferred on a cluster without GPUs asks Ray for none, so the trials can run at all; Ray never
    # retries a trial itself (the flow resubmits it, resuming its child run).
    assert recorded_ray_options == [{"num_gpus": 0, "max_retries": 0}] * 4


@pytest.mark.slow
def test_gpu_request_becomes_a_ray_gpu_resource(mlflow_store, recorded_ray_options):
    from mlflow import MlflowClient

    from cnn_train.flows.sweep_flow import cnn_train_sweep, ray_task_runner

    # Ray lets a node declare GPUs it lacks: Ray schedules on them, torch still sees no CUDA.
    runner = ray_task_runner(init_kwargs={"num_cpus": 2, "num_gpus": 2})
    result = cnn_train_sweep.with_options(task_runner=runner)(
        grid={"learning_rate": [1e-3, 3e-4]}, architecture="dense", **SMALL
    )
    assert recorded_ray_options == [{"num_gpus": 1, "max_retries": 0}] * 2
    children = _children(MlflowClient(mlflow_store), result["mlflow_run_id"])
    # Inside the Ray task placement trusts Ray's assignment; with no real CUDA it falls back to CPU.
    assert {(c.data.tags["device.train"], c.data.tags["device.evaluate"]) for c in children} == {("cpu", "cpu")}
    assert {c.data.params["evaluate_device"] for c in children} == {"gpu-preferred"}  # the train device's request


@pytest.mark.slow
def test_a_resource_no_node_offers_fails_the_sweep_in_one_line(mlflow_store, monkeypatch):
    """Ray queued such a trial for good, printing only its autoscaler's 'No available node types' lines."""
    from mlflow import MlflowClient

    from prefect.exceptions import FailedRun

    from cnn_train.flows import ray_cluster
    from cnn_train.flows.sweep_flow import cnn_train_sweep

    monkeypatch.setattr(ray_cluster, "RESOURCE_WAIT_SECONDS", 0.0)
    started_ms = int(time.time() * 1000)
    with pytest.raises(FailedRun) as raised:  # the flow's one line, as Prefect raises a failed flow run's to Python
        cnn_train_sweep(grid={"learning_rate": [1e-3]}, task_runner="ray", ray_resources={"a100": 1}, **SMALL)
    line = str(raised.value)
    assert "\n" not in line and line.startswith("no node of the Ray cluster offers a100=1, which each trial asks for (its nodes offer CPU=")
    client = MlflowClient(mlflow_store)
    [parent] = client.search_runs(  # the module's store holds its other tests' sweeps too
        [client.get_experiment_by_name("cnn-train").experiment_id], f"tags.`cnn_train.role` = 'sweep' and attributes.start_time >= {started_ms}"
    )
    assert parent.info.status == "FAILED" and line in parent.data.tags["mlflow.note.content"]


@pytest.mark.parametrize(
    ("offers", "wanted", "waits"),
    [
        pytest.param([{"CPU": 2.0}, {"CPU": 2.0, "a100": 1.0}], {"num_gpus": 0, "resources": {"a100": 1}}, 1, id="a-node-joins"),
        pytest.param([{"CPU": 2.0, "GPU": 1.0}], {"num_gpus": 1}, 0, id="offered-at-once"),
        pytest.param([{"CPU": 2.0}], {"num_gpus": 0}, 0, id="nothing-asked"),
    ],
)
def test_trials_wait_for_a_node_offering_what_they_ask_for(monkeypatch, offers, wanted, waits):
    import ray

    from cnn_train.flows import ray_cluster

    answers = iter(offers)
    seen = []
    monkeypatch.setattr(ray, "cluster_resources", lambda: seen.append(1) or next(answers))
    ray_cluster.wait_for_a_node_offering(wanted, timeout=60, poll=0.01)
    assert len(seen) == waits + 1
