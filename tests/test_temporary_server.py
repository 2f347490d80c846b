"""The temporary Prefect server a command starts when no Prefect API is configured: it records the
flow run, and it never outlives the command, however the command ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from cnn_train.flows.ops import temporary_server
from cnn_train.flows.ops.services import http_ok
from cnn_train.flows.settings import heartbeat_often_enough, keep_library_state_in_project
from tests.local_stack import flow_run_states
from tests.processes import signal_masks

# A command's first lines: the server starts, the command waits for it, says where it is, then runs a
# flow or blocks.
_COMMAND = textwrap.dedent("""
    import sys, time
    from cnn_train.flows.ops import temporary_server
    use = temporary_server.prefect_api()
    with use():
        from prefect.settings import get_current_settings
        print(get_current_settings().api.url, flush=True)
        if sys.argv[1] == "flow":
            from prefect import flow
            flow(name="on-the-temporary-server")(lambda: 42)()
            print("flow done; heartbeats every", get_current_settings().flows.heartbeat_frequency, flush=True)
        elif sys.argv[1] == "long-flow":
            from prefect import flow
            flow(name="interrupted")(lambda: print("in the flow", flush=True) or time.sleep(600))()
        else:
            time.sleep(600)
""")


def _without_prefect_api(home: Path) -> dict[str, str]:
    """A command's environment: no Prefect API, a Prefect home of its own, and the settings every
    `cnn-train` command gives itself first thing (among them the temporary server's start-up timeout,
    which a fresh database's migrations can outlast at Prefect's 20 s on a loaded CI box, and the
    heartbeat frequency the servers' zombie automation expects)."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
    keep_library_state_in_project(env)
    heartbeat_often_enough(env)
    return env


def test_a_configured_api_starts_no_server(monkeypatch):
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    monkeypatch.setattr(temporary_server, "TemporaryServer", lambda: pytest.fail("a server was started"))
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}), temporary_server.prefect_api()():
        assert get_current_settings().api.url == "http://127.0.0.1:4200/api"


@pytest.mark.parametrize(("child", "timeout", "says"), [
    ("import sys; sys.exit(1)", 30.0, "exited with status 1 before it answered"),
    ("import time; time.sleep(30)", 1.0, "did not answer within 1 s; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"),
], ids=["exits", "never-answers"])
def test_a_server_that_does_not_come_up_is_one_line(monkeypatch, child, timeout, says):
    monkeypatch.setattr(temporary_server.TemporaryServer, "_spawn",
                        lambda self: setattr(self, "port", 9) or subprocess.Popen([sys.executable, "-c", child]))
    server = temporary_server.TemporaryServer()
    try:
        with pytest.raises(temporary_server.TemporaryServerError, match=says):
            server.ready(timeout)
    finally:
        server.stop()


def test_its_port_is_its_own_from_the_start(monkeypatch, tmp_path):
    """Many servers start at once on a busy machine: one starting while ours boots must not be able to
    take our port and answer our health checks for it (seen once in a CI run, before the port was held)."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    server = temporary_server.TemporaryServer()
    try:
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            with pytest.raises(OSError, match="Address already in use"):
                other.bind(("127.0.0.1", server.port))
        # That it then serves on that port, the next test shows with a flow run recorded on it.
    finally:
        server.stop()


def test_the_flow_run_is_recorded_on_it_and_it_stops_with_the_command(tmp_path):
    done = subprocess.run([sys.executable, "-c", _COMMAND, "flow"], env=_without_prefect_api(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    api_url = done.stdout.split()[0]
    assert api_url.startswith("http://127.0.0.1:") and "flow done" in done.stdout
    # Nothing watches heartbeats on a server that stops with the command.
    assert "heartbeats every None" in done.stdout
    assert "View at" not in done.stdout + done.stderr  # no UI: no link to a page that would be gone
    assert not http_ok(f"{api_url}/health", timeout=1.0)  # stopped with the command
    assert flow_run_states(tmp_path, "on-the-temporary-server") == ["COMPLETED"]


def test_a_killed_command_takes_its_server_with_it(tmp_path):
    """SIGKILL: no exit handler runs. (SIGTERM, unhandled, ends a Python process the same way.)"""
    command = subprocess.Popen([sys.executable, "-c", _COMMAND, "wait"], env=_without_prefect_api(tmp_path),
                               stdout=subprocess.PIPE, text=True)
    try:
        command.stdout.readline()  # the server answers
        (server,) = psutil.Process(command.pid).children()
        command.send_signal(signal.SIGKILL)
        command.wait(timeout=30)
        gone, alive = psutil.wait_procs([server], timeout=30)
        assert not alive, f"the temporary server {server.pid} outlived its command"
    finally:
        command.kill()
        command.wait()


def test_ctrl_c_in_the_terminal_leaves_the_server_up_to_record_the_crash(tmp_path):
    """A terminal's Ctrl-C signals its whole foreground process group. Had the server got it too, the
    command would retry the gone server for over a minute and leave the flow run Running."""
    # A terminal's foreground job takes SIGINT at its default; a test worker started in the background
    # (CI's shell, nohup ... &) ignores it, and a child would inherit that and sleep through the signal.
    command = subprocess.Popen([sys.executable, "-c", _COMMAND, "long-flow"], env=_without_prefect_api(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        command.stdout.readline()  # the server answers
        # Prefect's own "Beginning flow run" line may come first (on stdout when a stream setting says so).
        lines = (line.strip() for line in command.stdout)
        assert "in the flow" in lines, "the command ended before its flow began"
        signals = {name: f"{mask:#x}" for name, mask in signal_masks(command.pid).items()}
        os.killpg(command.pid, signal.SIGINT)
        try:
            _, stderr = command.communicate(timeout=45)
        except subprocess.TimeoutExpired as error:
            pytest.fail(f"the command outlived its SIGINT by 45 s; its signals then: {signals}; stderr: {error.stderr!r}")
    finally:
        command.kill()
        command.wait()
    assert command.returncode != 0
    assert "Error logging to API" not in stderr and "Connection refused" not in stderr, stderr[-2000:]
    assert flow_run_states(tmp_path, "interrupted") == ["CRASHED"]
