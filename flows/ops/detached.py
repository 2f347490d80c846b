"""A detached process: started once with its pid and log under the state directory, found again by a
readiness probe (so starting is idempotent), stopped by its process group. The servers of ``cnn-train
up`` are such processes (cnn_train.flows.ops.services)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

import cnn_train.backends
import cnn_train.flows
import cnn_train.plugins
from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.settings import project_root, state_dir


class PortInUseError(ExpectedFailure):
    """A server's port is held by some other program."""


@dataclass(frozen=True)
class Service:
    """A detached process with a pid file, a log file and a readiness probe."""

    name: str
    command: Callable[[], list[str]]
    ready: Callable[[], bool]
    extra_env: Callable[[], dict[str, str]] = dict
    #: The port a server listens on, recorded beside its pid while it runs, and the variable that sets it.
    port: Callable[[], int] | None = None
    port_variable: str = ""
    #: What to do just before the process starts (not when it already runs).
    before_start: Callable[[], object] = lambda: None
    #: What to do with the running process's pid just before it is stopped.
    before_stop: Callable[[int], object] = lambda pid: None
    #: The environment every service of one stack shares, under extra_env; the address its port is on.
    base_env: Callable[[], dict[str, str]] = dict
    host: Callable[[], str] = lambda: "127.0.0.1"
    #: Whether the process runs this package's code (the serve process, a worker), which it imported as it started.
    runs_code: bool = False

    @property
    def pid_file(self) -> Path:
        return state_dir() / "run" / f"{self.name}.pid"

    @property
    def port_file(self) -> Path:
        return state_dir() / "run" / f"{self.name}.port"

    @property
    def log_file(self) -> Path:
        return state_dir() / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        """The recorded pid when that process is still alive."""
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        # Killed but not yet reaped by the process that started it: gone all the same.
        return None if _is_zombie(pid) else pid

    def code_changed(self) -> str | None:
        """Why this running process of the package's code is older than the checkout's code (a source file
        changed after it started: a `git pull`, an edit), or None. Its deployments keep the parameters then."""
        pid = self.pid()
        if not self.runs_code or pid is None:
            return None
        try:
            started = psutil.Process(pid).create_time()
        except psutil.Error:
            return None
        changed = {path: modified for path, modified in _package_sources() if modified > started}
        if not changed:
            return None
        newest = max(changed, key=changed.__getitem__)
        return (
            f"{self.name} (pid {pid}) started before {_shown(newest)} changed ({len(changed)} source file(s) since), and "
            "serves the deployments as the code declared them then (parameters, forms): `cnn-train down`, then "
            "`cnn-train up`, to serve this checkout's code"
        )

    def running_port(self) -> int | None:
        """The port this project's process was started on, while it runs (None: not running, or no port)."""
        try:
            return int(self.port_file.read_text()) if self.port is not None and self.pid() is not None else None
        except (OSError, ValueError):
            return None

    def moved(self) -> str | None:
        """Why this shell's port variable names another server than this project's running one, or None. Its
        commands would reach that server (another account's, say): runs in its store, `up` waiting on it."""
        running = self.running_port()
        if running is None or running == self.port():  # type: ignore[misc]
            return None
        return (
            f"{self.name} of this project runs on port {running} (pid {self.pid()}), not on {self.port()} that "  # type: ignore[misc]
            f"{self.port_variable} asks for: unset it to use that server, or `cnn-train down` first to move it"
        )

    def start(self, *, timeout: float = 90.0) -> bool:
        """Start unless already ready; returns whether it had to start. Waits until ready."""
        if self.ready():
            if self.port is not None and self.pid() is not None and not self.port_file.exists():
                # Started by a cnn-train that recorded no port: it answers on this one, which a shell without
                # the port variable would otherwise never find (status called it "started, not answering").
                self.port_file.write_text(str(self.port()))
            return False
        if self.pid() is None:
            self.check_port_free()
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            env = os.environ | self.base_env() | self.extra_env()
            self.before_start()
            with self.log_file.open("ab") as log:
                process = subprocess.Popen(  # noqa: S603 - our own commands
                    self.command(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=project_root(),
                    start_new_session=True,  # survives this command; stopped by `cnn-train down`
                )
            self.pid_file.write_text(str(process.pid))
            if self.port is not None:
                self.port_file.write_text(str(self.port()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return True
            if self.pid() is None:
                self._forget()
                raise RuntimeError(f"{self.name} exited during start-up; see {self.log_file}:\n{_tail(self.log_file)}")
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} was not ready after {timeout:.0f} s; see {self.log_file}:\n{_tail(self.log_file)}")

    def check_port_free(self) -> None:
        """Refuse in one line a port another program holds: the server would exit at once, saying so
        only in its log."""
        if self.port is None:
            return
        port, host = self.port(), self.host()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no holder
            try:
                probe.bind((host, port))
            except OSError as error:
                raise PortInUseError(
                    f"{self.name} cannot listen on {host}:{port}: {error.strerror.lower()}, by a program that does "
                    f"not answer as {self.name}; stop it, or choose a free port with {self.port_variable}"
                ) from None

    def stop(self, *, timeout: float = 20.0) -> bool:
        """Stop the process group; returns whether anything was running."""
        pid = self.pid()
        if pid is None:
            self._forget()
            return False
        self.before_stop(pid)
        # INT first: a Prefect worker started in the background from a non-interactive shell ignores TERM
        # (Prefect maps TERM to INT, which such a shell set to ignore), measured with Prefect 3.9.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout / 3
            while time.monotonic() < deadline and self.pid() is not None and not _is_zombie(pid):
                time.sleep(0.2)
            if self.pid() is None or _is_zombie(pid):
                break
        self._forget()
        return True

    def _forget(self) -> None:
        """Drop the pid and port files of a process that is gone."""
        self.pid_file.unlink(missing_ok=True)
        self.port_file.unlink(missing_ok=True)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (OSError, IndexError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _package_sources() -> list[tuple[Path, float]]:
    """The package's Python files a served flow run imports (not the example plugins, a package of their own),
    each with when it last changed; one removed as it is read counts as changed now."""
    folders = [Path(folder) for package in (cnn_train.flows, cnn_train.plugins, cnn_train.backends) for folder in package.__path__]
    sources = [path for folder in folders for path in folder.rglob("*.py") if "examples" not in path.relative_to(folder).parts]
    return [(path, _modified(path)) for path in sources]


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(project_root()))
    except ValueError:
        return str(path)
