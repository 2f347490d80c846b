"""Servers as the tests start them: a free port for any test that runs a server, and the local stack
as a user starts it: `cnn-train up` / `down` in a private project root and `prefect deployment run`
as a user types it. Shared so that the deployment and worker tests drive the stack the same way."""

from __future__ import annotations

import itertools
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


#: Ports the tests give servers: below Linux's ephemeral range (32768-60999 by default), where the OS
#: picks the local port of every outgoing connection and of bind(0), and above Ray's worker ports
#: (10002-19999). A port the OS had picked could be taken by some connection between the choice and
#: the server's bind, or while a test keeps its server down through an outage; these are never
#: picked by the OS. Each xdist worker draws from a block of its own.
TEST_PORTS = range(20000, 32768)
_BLOCKS = 16
_next_ports: Iterator[int] | None = None


def _worker_ports() -> Iterator[int]:
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = len(TEST_PORTS) // _BLOCKS
    block = TEST_PORTS[worker % _BLOCKS * size:][:size]
    start = random.randrange(size)  # two sessions at once rarely start on the same port
    return itertools.cycle([*block[start:], *block[:start]])


def bare_env(tmp_path: Path) -> dict[str, str]:
    """This environment without Prefect's, MLflow's and cnn-train's variables, its project, state and home in
    ``tmp_path`` (`up` points the user's Prefect profile at its server: it stays in the test's home)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CNN_TRAIN_"))}
    return env | {"HOME": str(tmp_path), "CNN_TRAIN_ROOT": str(tmp_path), "CNN_TRAIN_STATE_DIR": str(tmp_path / "state")}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to now and that the OS never hands out (TEST_PORTS)."""
    global _next_ports
    _next_ports = _next_ports or _worker_ports()
    for _ in range(len(TEST_PORTS) // _BLOCKS):
        port = next(_next_ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"every test port of this worker's block of {TEST_PORTS} is in use")


def flow_run_states(home: Path, flow_name: str) -> list[str]:
    """The state of each run of ``flow_name`` in the database of the temporary Prefect server under ``home``."""
    with sqlite3.connect(home / "prefect.db") as db:
        rows = db.execute("SELECT flow_run.state_type FROM flow_run JOIN flow ON flow.id = flow_run.flow_id "
                          "WHERE flow.name = ?", (flow_name,)).fetchall()
    return [state for (state,) in rows]


def prefect_api(env: dict[str, str]) -> str:
    """The API URL of the Prefect server that `cnn-train up` started with ``env``."""
    return f"http://127.0.0.1:{env['CNN_TRAIN_PREFECT_PORT']}/api"


@contextmanager
def cnn_train_up(root: Path, data_dir: Path, *flags: str, timeout: float) -> Iterator[tuple[dict[str, str], str]]:
    """`cnn-train up --no-trigger FLAGS` in the private project root ``root``, with a home and pair of
    ports of its own; yields its environment and what `up` printed, and runs `down` after."""
    env = os.environ | {
        "CNN_TRAIN_ROOT": str(root),
        "HOME": str(root / "home"),  # the Prefect profile `up` writes stays in here
        "CNN_TRAIN_PREFECT_PORT": str(free_port()),
        "CNN_TRAIN_MLFLOW_PORT": str(free_port()),
        "CNN_TRAIN_DATA_DIR": str(data_dir),
    }
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "CNN_TRAIN_STATE_DIR"):
        env.pop(key, None)
    up = subprocess.run(
        [BIN / "cnn-train", "up", "--no-trigger", *flags], env=env, capture_output=True, text=True, timeout=timeout
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env, up.stdout
    finally:
        # From a shell without the port variables, as the README allows: it finds the servers by their
        # recorded ports, and must still take its server out of the Prefect profile (later runs failed).
        shell = {k: v for k, v in env.items() if k not in ("CNN_TRAIN_PREFECT_PORT", "CNN_TRAIN_MLFLOW_PORT")}
        down = subprocess.run([BIN / "cnn-train", "down"], env=shell, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        profiles = root / "home" / ".prefect" / "profiles.toml"
        assert not profiles.is_file() or prefect_api(env) not in profiles.read_text(), down.stdout
        left = list((root / ".state" / "serve-tmp").glob("*"))
        assert left == [], f"the serve process left its temporary files: {left}"


def run_deployment(env: dict[str, str], name: str, *parameters: str, watch_timeout: int = 400) -> str:
    """``prefect deployment run NAME -p ... --watch`` exactly as a user types it, through the Prefect
    profile that `up` configured; the flow run's id once it completed."""
    run = subprocess.run(
        [BIN / "prefect", "deployment", "run", name, *(arg for p in parameters for arg in ("-p", p)),
         "--watch", "--watch-timeout", str(watch_timeout)],
        env={k: v for k, v in env.items() if k != "PREFECT_API_URL"}, capture_output=True, text=True,
        timeout=watch_timeout + 100,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout
    return re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)


def training_run(env: dict[str, str], *trigger: str) -> tuple[str, str]:
    """A long run triggered through the stack (``trigger``: `cnn-train trigger`'s arguments; by default the
    default deployment's), once it trains: its flow run's id, and the id of the MLflow run that trains."""
    from mlflow import MlflowClient

    trigger = trigger or ("-p", "compare_dense=false")
    trigger = subprocess.run(
        [BIN / "cnn-train", "trigger", *trigger, "-p", "epochs=50", "-p", "sample_limit=2000"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert trigger.returncode == 0, trigger.stdout + trigger.stderr
    flow_run_id = trigger.stdout.split("/runs/flow-run/")[1].split()[0]
    client = MlflowClient(f"http://127.0.0.1:{env['CNN_TRAIN_MLFLOW_PORT']}")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        runs = client.search_runs(
            [client.get_experiment_by_name("cnn-train").experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
        ) if client.get_experiment_by_name("cnn-train") else []
        if training := [run for run in runs if client.get_metric_history(run.info.run_id, "val_accuracy")]:
            return flow_run_id, training[0].info.run_id
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} did not train within 180 s")
