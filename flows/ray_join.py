"""Joining a Ray cluster: the addresses and tokens a driver takes, checked before a run starts, and one
line for each way joining fails.

Joining follows Ray's own rules, with three differences that make failures say why:
- ``HOST:PORT``, ``ray://HOST:PORT`` and the cluster ``auto`` finds are checked to answer while the run
  is validated (Ray itself waits minutes on an address where nothing listens).
- Ray 2.60 clusters use token authentication by default, and Ray sends a token to an explicit address
  only with ``RAY_AUTH_MODE=token``; when a token is provided the way Ray documents it
  (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is
  unset, the driver turns token mode on. A cluster without authentication still accepts such a driver.
- A refused or missing token, an ``auto`` that finds no cluster, and a Ray Client that does not
  answer each become one line saying what to do (:class:`RayClusterError`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path

from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.params import ParameterError, RunnerOptions

__all__ = [
    "check_answers", "check_runner", "join_failure", "RayClusterError", "RayOptionError", "send_token_when_provided",
    "token_source",
]

# Ray's documented token settings (https://docs.ray.io/en/latest/ray-security/token-auth.html).
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

_ADDRESS_FORMS = (
    "HOST:PORT (the head's port, from a node of the cluster), ray://HOST:PORT (Ray Client, from anywhere) or auto"
)
_HOST_PORT = re.compile(r"(?P<host>\[[0-9a-fA-F:]+\]|[^:/\s]+):(?P<port>\d{1,5})")
_REACH_TIMEOUT = 5.0
_HOW_TO_GIVE_A_TOKEN = (
    f"run `ray get-auth-token` on the cluster's head node and give its output to this machine as {TOKEN_ENV} "
    "(or save it as ~/.ray/auth_token)"
)


class RayClusterError(ExpectedFailure, ValueError):
    """A Ray address that cannot be joined; the message says why and what to do."""


class RayOptionError(RayClusterError, ParameterError):
    """A Ray address or resource of no form Ray takes: a bad value, refused as one (the command's exit 2)."""


def token_source() -> str | None:
    """Where Ray would read this driver's token from, in Ray's order, or None without one."""
    if os.environ.get(TOKEN_ENV):
        return TOKEN_ENV
    if path := os.environ.get(TOKEN_PATH_ENV):
        return path if Path(path).is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def keep_token_private() -> None:
    """Keep this user's Ray token to this user: the local Ray writes ``~/.ray/auth_token`` readable by every
    account (0644), while its GCS listens on every interface and the token is what guards it. Called before
    Ray starts (``~/.ray`` made 0700, so the file is never readable meanwhile) and after (the file 0600)."""
    from cnn_train.flows.ops.auth import restrict

    if chosen := os.environ.get(TOKEN_PATH_ENV):  # a folder the user chose for the token is theirs to set
        restrict(Path(chosen), 0o600)
        return
    folder = Path.home() / ".ray"
    with contextlib.suppress(OSError):
        folder.mkdir(mode=0o700, exist_ok=True)
    restrict(folder, 0o700)
    restrict(folder / "auth_token", 0o600)


def local_start_failure(error: PermissionError) -> RayClusterError:
    """A new local Ray that could not write its session folder (another account's, under /tmp/ray), in one line."""
    return RayClusterError(
        f"Ray could not start on this machine: this user cannot write {error.filename or 'its session folder'} "
        "(permission denied; another account's Ray keeps its sessions there): set RAY_TMPDIR to a folder of yours"
    )


def _endpoint(address: str) -> tuple[str, int]:
    """Host and port of ``HOST:PORT`` or ``ray://HOST:PORT``; anything else is refused in one line."""
    match = _HOST_PORT.fullmatch(address.removeprefix("ray://"))
    if match is None or not 0 < int(match["port"]) < 65536:
        raise RayOptionError(f"--ray-address takes {_ADDRESS_FORMS}; got {address!r}")
    return match["host"].strip("[]"), int(match["port"])


def check_runner(runner: RunnerOptions) -> None:
    """Refuse a Ray address that is malformed, an ``auto`` that finds no cluster, or a cluster where
    nothing listens, while the run is validated: before any MLflow run or data prep."""
    if runner.task_runner != "ray" or not runner.ray_address:
        return
    if runner.ray_address != "auto":
        check_answers(runner.ray_address)
    elif (found := _found_by_auto()) is not None:
        check_answers(found, found_by_auto=True)


_NO_CLUSTER_FOR_AUTO = (
    "--ray-address auto found no Ray cluster on this machine (none started with `ray start --head` "
    "here, and no RAY_ADDRESS): start one, or give HOST:PORT or ray://HOST:PORT"
)


def _found_by_auto() -> str | None:
    """The address ``ray.init(address="auto")`` would join (RAY_ADDRESS, the address the last `ray start`
    here recorded, or a running Ray on this machine); None when Ray is not installed, which the runner
    says as the trials start."""
    try:
        import ray  # noqa: F401 (the package first: its private modules lean on what its __init__ loads)
        # Private: Ray has no public way to ask where "auto" leads without joining it.
        from ray._private.services import get_ray_address_from_environment
    except ImportError:
        return None
    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:  # Ray's "Could not find any running Ray instance"
        raise RayClusterError(_NO_CLUSTER_FOR_AUTO) from None
    return None if found in (None, "auto", "local") else found


def check_answers(address: str, *, found_by_auto: bool = False) -> None:
    """Refuse at once an address where nothing listens (Ray would retry for minutes)."""
    host, port = _endpoint(address)
    try:
        with socket.create_connection((host, port), timeout=_REACH_TIMEOUT):
            return
    except OSError as error:
        reason = error.strerror or type(error).__name__
    if found_by_auto:
        raise RayClusterError(
            f"--ray-address auto found the Ray cluster at {address} (RAY_ADDRESS, or the last `ray start` on "
            f"this machine), but nothing answers there ({reason}): start it again, or give HOST:PORT or ray://HOST:PORT"
        )
    client = address.startswith("ray://")
    what = "the Ray Client server (`ray start --head` opens it on port 10001)" if client else "a Ray head (`ray start --head --port PORT`)"
    raise RayClusterError(
        f"nothing answers at {host}:{port} ({reason}): check the address and that {what} runs there "
        "and can be reached from this machine"
    )


def send_token_when_provided() -> None:
    """Turn on Ray's token mode when a token is provided and the mode is not chosen (Ray sends no
    token to an explicit address otherwise). An explicit ``RAY_AUTH_MODE`` is left alone."""
    if not os.environ.get(AUTH_MODE_ENV) and token_source() is not None:
        os.environ[AUTH_MODE_ENV] = "token"


def join_failure(address: str, error: BaseException) -> RayClusterError:
    """One line for why joining ``address`` failed, from Ray's exception and its cause."""
    text = f"{error} {error.__cause__ or ''}"
    where = "the Ray cluster found by auto" if address == "auto" else f"the Ray cluster at {address}"
    source = token_source() if os.environ.get(AUTH_MODE_ENV, "").lower() == "token" else None
    if "InvalidAuthToken" in text or "Unauthenticated" in text or "no authentication token was found" in text:
        if source is None:
            return RayClusterError(f"{where} requires an authentication token and none was given: {_HOW_TO_GIVE_A_TOKEN}")
        return RayClusterError(f"{where} refused the token from {source}: give this cluster's token; {_HOW_TO_GIVE_A_TOKEN}")
    if "Could not find any running Ray instance" in text:
        return RayClusterError(_NO_CLUSTER_FOR_AUTO)
    if "ray client connection timeout" in text:
        hint = f"it refused the token from {source}: compare it with `ray get-auth-token` on the head node" if source else (
            f"it requires a token, none was given: {_HOW_TO_GIVE_A_TOKEN}"
        )
        return RayClusterError(
            f"{where} did not let this Ray Client in within 30 s; if the cluster uses token authentication "
            f"(a head started with a token, or with RAY_AUTH_MODE=token), {hint}"
        )
    explicit = address != "auto" and not address.startswith("ray://")
    hint = "; HOST:PORT joins from a node of the cluster, from elsewhere use ray://HOST:10001" if explicit else ""
    return RayClusterError(f"could not join {where}: {_reason(error)}{hint}")


def _reason(error: BaseException) -> str:
    """One line of ``error``: its first, and when that only announces what follows (a Ray Client's
    "Initialization failure from server:" over the server's traceback), the last line too, which names
    the server's own error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[-1]}"
    return lines[0]
