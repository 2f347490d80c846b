"""Servers as the tests start them: a free port for any test that runs a server, and the local stack
as a user starts it: `cnn-train up` / `down` in a private project root and `prefect deployment run`
as a user types it. Shared so that the deployment and worker tests drive the stack the same way."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        down = subprocess.run([BIN / "cnn-train", "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr


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
