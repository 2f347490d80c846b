"""The temporary Prefect server of a command run without one (no `cnn-train up`, no PREFECT_API_URL).

Prefect starts such a server itself, but only once the flow is called: it first imports its whole
server package into the calling process (2.7 s of CPU on this project's 2-core machine) and then
waits about 4 s for the server to answer, all after the command has imported the flow. Started here
as the command starts, the same server (Prefect's own app, database and settings) boots on
another core while the command imports the flow and its libraries.

As Prefect's, the server is this process's alone: its database is under ``PREFECT_HOME``, it has no UI
(so no run links to a page that will be gone), and it stops as the process exits, also when the
process is killed (Linux: the parent-death signal). A Ctrl-C in the command's terminal does not reach it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from cnn_train.flows.errors import ExpectedFailure

#: uvicorn serving Prefect's server app (what prefect.server.api.server.SubprocessASGIServer runs) on
#: the listening socket this process hands it as file descriptor argv[1]. The app is imported first,
#: the collector paused, as commands import (cnn_train.flows.collector): the server answers about 1 s
#: sooner (3.0 s against 4.0 s, median of four each, on a 2-vCPU EPYC), and it is the last thing a
#: command waits for. A new database starts as a copy of a migrated one (cnn_train.flows.ops.prefect_database).
_SERVE = """
import socket, sys
from cnn_train.flows import collector
from cnn_train.flows.ops import prefect_database
with collector.paused():
    import prefect.server.api.server
    prefect_database.prepare_server_database()
import uvicorn
config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, log_level="error", lifespan="on")
uvicorn.Server(config).run(sockets=[socket.socket(fileno=int(sys.argv[1]))])
"""
#: Linux prctl option: the signal a process gets when the one that started it exits.
_PR_SET_PDEATHSIG = 1


class TemporaryServerError(ExpectedFailure, RuntimeError):
    """The temporary Prefect server exited or did not answer in time."""


class TemporaryServer:
    """A Prefect API server process on a free 127.0.0.1 port, started at once, waited for on :meth:`ready`."""

    def __init__(self) -> None:
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # The port is bound here and stays bound: choosing a free port and letting the server bind it
        # later left a window in which another process could take it and answer our health checks.
        # No SO_REUSEADDR, so no other socket can bind it either; uvicorn listens once the app is up.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            # A process group of its own: a terminal's Ctrl-C goes to the whole foreground group, and the
            # server must outlast it while the command tells it the flow run crashed (Prefect retries a
            # gone server for minutes). It still stops with the command: atexit, or the parent-death signal.
            return subprocess.Popen(  # noqa: S603 - Prefect's own server
                [sys.executable, "-c", _SERVE, str(sock.fileno())], env=os.environ | server_env,
                stdin=subprocess.DEVNULL, pass_fds=(sock.fileno(),), preexec_fn=_die_with_parent, process_group=0,
            )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def ready(self, timeout: float) -> str:
        """Wait until the server answers; its API URL. Raises TemporaryServerError when it exits or times out."""
        from cnn_train.flows.ops.services import http_ok

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                from cnn_train.flows import diskspace
                from cnn_train.flows.settings import state_dir

                # Its database is in the state folder: a disk that filled since the command's check kills it first.
                if full := diskspace.full_disk_line([state_dir()]):
                    raise diskspace.DiskFullError(full)
                raise TemporaryServerError(
                    f"the temporary Prefect server exited with status {self.process.returncode} before it answered "
                    "(its own lines, if any, are above); `cnn-train up` starts a lasting server instead"
                )
            elif http_ok(f"{self.api_url}/health", timeout=1.0):
                return self.api_url
            time.sleep(0.05)
        raise TemporaryServerError(
            f"the temporary Prefect server did not answer within {timeout:.0f} s; raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a busy machine, or `cnn-train up` a lasting server"
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when this command exits, however it exits (Linux only).
    Linux sends it when the *thread* that started the child ends: commands start it on their main thread."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def configured_api_url() -> str | None:
    """The Prefect API this process is configured to use (environment, profile, prefect.toml), if any."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


#: This process's temporary server: one per process, as Prefect's own, stopped as the process exits.
_server: TemporaryServer | None = None


def prefect_api() -> Callable[[], AbstractContextManager[None]]:
    """What to enter around this command's flow call so that Prefect records it: nothing when an API is
    configured, else the context of a temporary server started now (entering it waits until it answers;
    enter it after the imports its start-up overlaps)."""
    global _server
    if configured_api_url():
        return contextlib.nullcontext
    if _server is None or _server.process.poll() is not None:
        _server = TemporaryServer()
        # Stopped after Prefect's log and event workers have drained (they drain at thread shutdown,
        # before any atexit handler runs), so no record of the run is sent to a server that is gone.
        atexit.register(_server.stop)
    return functools.partial(_using, _server)


def serves(api_url: str | None) -> bool:
    """Whether ``api_url`` is this process's temporary server, which only this machine can reach."""
    return _server is not None and api_url == _server.api_url


@contextlib.contextmanager
def _using(server: TemporaryServer) -> Iterator[None]:
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        PREFECT_UI_URL,
        temporary_settings,
    )

    timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    settings = {
        PREFECT_API_URL: server.ready(timeout),
        # An empty UI URL: Prefect prints no "View at" link, and runs.prefect_flow_run_url records none.
        PREFECT_UI_URL: "",
        # No heartbeats: no automation watches a server that stops with the command.
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
    }
    with temporary_settings(settings):
        yield
