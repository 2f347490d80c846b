"""Measurements that need a fresh process of their own; ``bench.py`` runs each as a subprocess.

    probes.py prep    --out F [split options] [--cache-dir D]   time one prepare_data call
    probes.py init    --out F                                   create the MLflow store and the Prefect database
    probes.py flow    --out F --backend B [--architecture A] [--compare-dense] [split options]
                                                              run the cnn-train flow, read back its timings
    probes.py trigger --out F --backend B --mlflow-url U        trigger cnn-train/default on a running stack

Each writes one JSON object to ``--out``. Wall-clock instants are ``time.time()`` seconds, so
they compare across processes (and with Prefect's and MLflow's timestamps) on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from cnn_train.flows.data import prepare_data
from cnn_train.flows.signatures import add_arguments

TRIGGER_SAMPLE_LIMIT = 2000
TRIGGER_TEST_LIMIT = 500
TRIGGER_TIMEOUT_SECONDS = 900.0
EXPERIMENT = "cnn-train"


def _split_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seed": args.seed,
        "validation_fraction": args.validation_fraction,
        "sample_limit": args.sample_limit,
        "test_limit": args.test_limit,
    }


def prep(args: argparse.Namespace) -> dict[str, Any]:
    """One ``prepare_data`` call in a process that has imported nothing else yet."""
    started = time.perf_counter()
    data = prepare_data(args.data_dir, cache_dir=args.cache_dir, **_split_options(args))
    return {"seconds": time.perf_counter() - started, "images": data.summary()}


def init(args: argparse.Namespace) -> dict[str, Any]:
    """Create the MLflow store and the Prefect database up front, so no measured run pays for it
    (no database when the flows record on a running server: PREFECT_API_URL)."""
    upgrade = None
    if not os.environ.get("PREFECT_API_URL"):
        prefect = str(Path(sys.executable).with_name("prefect"))
        upgrade = subprocess.Popen(  # noqa: S603 - Prefect's own CLI; runs while MLflow creates its schema
            [prefect, "server", "database", "upgrade", "-y"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    from cnn_train.flows import tracking

    tracking.ensure_experiment(tracking.client(), EXPERIMENT)
    if upgrade is not None:
        output, _ = upgrade.communicate()
        if upgrade.returncode != 0:
            raise RuntimeError(f"prefect server database upgrade failed:\n{output.decode(errors='replace')[-2000:]}")
    return {"mlflow": tracking.tracking_uri(), "prefect_home": os.environ.get("PREFECT_HOME")}


def _timestamp(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _task_seconds(client: Any, flow_run_id: Any) -> dict[str, float]:
    """Wall seconds of the flow run's task runs, summed by task name (with the dense comparison, the
    flow runs ``train`` and ``evaluate`` twice)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    seconds: dict[str, float] = {}
    for run in task_runs:
        if run.start_time and run.end_time:
            name = run.name.split("-", 1)[0]  # "train-cnn", "evaluate-torch-dense-baseline", "prep-3fa"
            seconds[name] = seconds.get(name, 0.0) + (run.end_time - run.start_time).total_seconds()
    return seconds


def _dense_history(mlflow_uri: str, parent_run_id: str) -> dict[str, Any] | None:
    """The epoch history of the dense comparison's child run under ``parent_run_id``, if it has one."""
    from cnn_train.flows import tracking

    client = tracking.client(mlflow_uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`cnn_train.role` = 'dense-baseline'",
    )
    return _epoch_history(mlflow_uri, children[0].info.run_id) if children else None


def _epoch_history(mlflow_uri: str, run_id: str) -> dict[str, Any]:
    """Per-epoch seconds (training and validation), images/s (training only), and test accuracy."""
    from cnn_train.flows import tracking

    client = tracking.client(mlflow_uri)
    run = client.get_run(run_id)

    def history(key: str) -> list[Any]:
        return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)

    return {
        "mlflow_run_id": run_id,
        "mlflow_start": run.info.start_time / 1000,
        "mlflow_end": run.info.end_time / 1000 if run.info.end_time else None,
        "train_images": int(run.data.params["data.train"]),
        "epoch_seconds": [m.value for m in history("epoch_seconds")],
        "epoch_logged_at": [m.timestamp / 1000 for m in history("epoch_seconds")],
        "images_per_second": [m.value for m in history("images_per_second")],
        "test_accuracy": run.data.metrics.get("test_accuracy"),
        "precision": run.data.params.get("train.precision"),
        "precision_reason": run.data.params.get("train.precision_reason"),
    }


def flow(args: argparse.Namespace) -> dict[str, Any]:
    """The cnn-train flow called as ``cnn-train run`` calls it: in this process, on a temporary
    Prefect server started first thing (or the one PREFECT_API_URL names). Afterwards the flow run's
    and task runs' times are read back from that server; ``returned_at`` and ``measured_at`` bound
    that read-back, which is the benchmark's own work, not the command's."""
    from cnn_train.flows import collector
    from cnn_train.flows.ops.temporary_server import prefect_api

    with collector.paused():  # as the command imports
        api = prefect_api()
        from prefect.client.orchestration import get_client

        from cnn_train.flows import tracking
        from cnn_train.flows.train_flow import cnn_train

    imported_at = time.time()
    with api():
        state = cnn_train(
            backend=args.backend,
            architecture=args.architecture,
            epochs=args.epochs,
            data_dir=args.data_dir,
            train_device="cpu",
            evaluate_device="cpu",
            compare_dense=args.compare_dense,
            return_state=True,
            **_split_options(args),
        )
        returned_at = time.time()
        if not state.is_completed():
            raise RuntimeError(f"the flow run ended {state.name}: {state.message}")
        flow_run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run_id)
            tasks = _task_seconds(client, flow_run_id)
    run_id = state.result()["mlflow_run_id"]
    uri = tracking.tracking_uri()
    history = _epoch_history(uri, run_id)
    return {
        "dense": _dense_history(uri, run_id) if args.compare_dense else None,
        "imported_at": imported_at,
        "returned_at": returned_at,
        "measured_at": time.time(),
        "flow_run_id": str(flow_run_id),
        "flow_start": _timestamp(flow_run.start_time),
        "flow_end": _timestamp(flow_run.end_time),
        "task_seconds": tasks,
        **history,
    }


def _wait_for_final_state(flow_run_id: Any, timeout: float) -> Any:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {flow_run.state_name} after {timeout:.0f} s")
            time.sleep(1.0)


def trigger(args: argparse.Namespace) -> dict[str, Any]:
    """Trigger ``cnn-train/default`` on the running stack and find when its first training step ran.

    Epochs are logged as they end, so the first epoch began at (the moment its metrics were
    logged) minus (its epoch_seconds); the difference to the trigger is trigger to first step."""
    from prefect.deployments import run_deployment

    from cnn_train.flows import tracking
    from cnn_train.flows.ops import services

    parameters = {
        "backend": args.backend,
        "epochs": 1,
        "sample_limit": TRIGGER_SAMPLE_LIMIT,
        "test_limit": TRIGGER_TEST_LIMIT,
        "compare_dense": False,
        "train_device": "cpu",
        "evaluate_device": "cpu",
    }
    triggered_at = time.time()
    flow_run = run_deployment(services.DEPLOYMENT, parameters=parameters, timeout=0)
    finished = _wait_for_final_state(flow_run.id, TRIGGER_TIMEOUT_SECONDS)
    if not finished.state.is_completed():
        raise RuntimeError(f"the triggered flow run ended {finished.state_name}")
    runs = [
        run for run in tracking.find_runs_for_flow_run(str(flow_run.id), uri=args.mlflow_url)
        if "mlflow.parentRunId" not in run.data.tags
    ]
    if not runs:
        raise RuntimeError(f"flow run {flow_run.id} completed but left no MLflow run at {args.mlflow_url}")
    history = _epoch_history(args.mlflow_url, runs[0].info.run_id)
    first_step_at = history["epoch_logged_at"][0] - history["epoch_seconds"][0]
    return {
        "triggered_at": triggered_at,
        "flow_start": _timestamp(finished.start_time),
        "first_step_at": first_step_at,
        "trigger_to_flow_start": _timestamp(finished.start_time) - triggered_at,
        "trigger_to_first_step": first_step_at - triggered_at,
        "parameters": parameters,
    }


PROBES = {"prep": prep, "init": init, "flow": flow, "trigger": trigger}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=sorted(PROBES))
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    add_arguments(
        parser,
        (
            "backend", "architecture", "epochs", "compare_dense", "seed", "validation_fraction", "sample_limit",
            "test_limit", "data_dir",
        ),
    )
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--mlflow-url", default=None)
    return parser


def main() -> None:
    args = _parser().parse_args()
    args.out.write_text(json.dumps(PROBES[args.probe](args)))


if __name__ == "__main__":
    main()
