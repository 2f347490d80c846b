"""Credentials for servers shared with a team: one user name and password for both servers, from
the environment or from a file only its owner can read.

- MLflow runs its basic-auth app (``mlflow server --app-name basic-auth``); the credentials are its
  admin user's, and clients send them as ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``.
- Prefect's server checks ``PREFECT_SERVER_API_AUTH_STRING`` (``user:password``); clients send
  ``PREFECT_API_AUTH_STRING``.

By default both servers listen on 127.0.0.1 only and need none of this; ``cnn-train up --host
0.0.0.0`` refuses to start without it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows.settings import default_artifact_root, default_database, default_tracking_uri, state_dir

USERNAME_ENV = "CNN_TRAIN_AUTH_USERNAME"
PASSWORD_ENV = "CNN_TRAIN_AUTH_PASSWORD"
FILE_ENV = "CNN_TRAIN_AUTH_FILE"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class AuthError(ExpectedFailure):
    """Credentials missing, malformed, or in a file others can read."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = ""

    def __repr__(self) -> str:  # never print the password
        return f"Credentials(username={self.username!r}, password='***')"

    def basic_header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def client_environment(self) -> dict[str, str]:
        """What every client cnn-train starts needs to reach both servers."""
        return {
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
            "PREFECT_API_AUTH_STRING": f"{self.username}:{self.password}",
        }

    def server_environment(self) -> dict[str, str]:
        """What the servers need to demand them."""
        return {
            "MLFLOW_AUTH_ADMIN_USERNAME": self.username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.password,
            "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_config()),
            # The auth app's CSRF protection signs with it; kept so a restart keeps sessions valid.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": _flask_secret_key(),
            "PREFECT_SERVER_API_AUTH_STRING": f"{self.username}:{self.password}",
        }


def default_file() -> Path:
    return state_dir() / "auth"


def credentials_file() -> Path:
    return Path(os.environ.get(FILE_ENV) or default_file()).expanduser()


def load_credentials() -> Credentials | None:
    """The configured credentials: the environment first, then the file; None when neither has any."""
    username, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    if username or password:
        if not (username and password):
            raise AuthError(f"set both {USERNAME_ENV} and {PASSWORD_ENV}, or neither")
        return _checked(Credentials(username, password))
    path = credentials_file()
    if not path.is_file():
        if os.environ.get(FILE_ENV):  # named on purpose: running without credentials would be a silent surprise
            raise AuthError(f"{FILE_ENV}={os.environ[FILE_ENV]} is no file: create it (mode 0600, username=... and "
                            f"password=... lines) or unset {FILE_ENV}")
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise AuthError(f"{path} is readable by others (mode {mode:04o}); run `chmod 600 {path}`")
    values = dict(
        line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.lstrip().startswith("#")
    )
    username, password = values.get("username", "").strip(), values.get("password", "").strip()
    if not (username and password):
        raise AuthError(f"{path} must hold two lines, username=NAME and password=SECRET")
    return _checked(Credentials(username, password))


def _checked(credentials: Credentials) -> Credentials:
    if not credentials.username.strip():
        raise AuthError(f"the user name must hold a character other than spaces ({USERNAME_ENV})")
    # Prefect splits its auth string at the first colon.
    if ":" in credentials.username:
        raise AuthError("the user name may not contain ':'")
    if len(credentials.password) < 12:
        raise AuthError("the password must have at least 12 characters")
    return credentials


def require_for_host(host: str) -> Credentials | None:
    """Credentials when ``host`` is reachable from other machines (refused without them); None on loopback."""
    credentials = load_credentials()
    if host in LOOPBACK:
        return credentials
    if credentials is None:
        raise AuthError(
            f"--host {host} would let other machines reach both servers, so authentication is required: "
            f"set {USERNAME_ENV} and {PASSWORD_ENV}, or write username=... and password=... to "
            f"{credentials_file()} (chmod 600)"
        )
    return credentials


def _flask_secret_key() -> str:
    path = state_dir() / "mlflow-secret-key"
    if not path.is_file():
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def _mlflow_auth_db() -> Path:
    return state_dir() / "mlflow-auth.db"


def _owner_only(path: Path) -> Path:
    """``path`` made (empty, when missing: SQLite takes an empty file as an empty database) readable by its owner only."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    return path


def keep_project_data_private() -> list[Path]:
    """With credentials the servers refuse other accounts, and so must the files behind them: the project's
    ``mlflow.db`` (0600), ``mlartifacts/`` and the state folder (0700), made so when they are more open, and
    made so by this user when missing (the servers would make them as the umask says); returns those changed.
    A store elsewhere (MLFLOW_TRACKING_URI) is its owner's to guard."""
    places = [(state_dir(), 0o700)]
    if os.environ.get("MLFLOW_TRACKING_URI", default_tracking_uri()) == default_tracking_uri():
        database = default_database()
        with contextlib.suppress(OSError):
            database.touch(mode=0o600)  # SQLite takes an empty file as an empty database
            default_artifact_root().mkdir(mode=0o700, exist_ok=True)
        places += [(database, 0o600), (default_artifact_root(), 0o700)]
    return [path for path, mode in places if restrict(path, mode)]


def restrict(path: Path, mode: int) -> bool:
    """Give ``path`` ``mode`` (owner only) when it is this user's and others may read it; whether it changed.
    A missing path, or one not this user's to change, is left as it is."""
    try:
        found = path.stat()
        if found.st_uid != os.getuid() or not stat.S_IMODE(found.st_mode) & 0o077:
            return False
        path.chmod(mode)
    except OSError:
        return False
    return True


def sync_mlflow_admin(credentials: Credentials) -> None:
    """Make the team's credentials MLflow's admin before its server starts: MLflow creates the admin user
    only once, so a changed password was refused by MLflow (while Prefect took it) and a changed user name
    left the old one an admin. The previous user cnn-train made admin is removed; users added by hand stay.

    No public MLflow API sets a password without the old one: this uses the basic-auth app's own store."""
    import warnings

    database, record = _owner_only(_mlflow_auth_db()), state_dir() / "mlflow-auth.admin"
    # Its import warns about Starlette (MLflow's FastAPI app), its migrations about Alembic's config: MLflow's to change.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore()
        store.init_db(f"sqlite:///{database}")
    if not store.has_user(credentials.username):
        store.create_user(credentials.username, credentials.password, is_admin=True)
    elif not store.authenticate_user(credentials.username, credentials.password):
        store.update_user(credentials.username, password=credentials.password, is_admin=True)
    previous = record.read_text().strip() if record.is_file() else ""
    if previous and previous != credentials.username and store.has_user(previous):
        store.delete_user(previous)
    _owner_only(record).write_text(credentials.username)


def mlflow_auth_config() -> Path:
    """The basic-auth app's config, with its user database under the state dir (MLflow's default is relative)."""
    path = _owner_only(state_dir() / "mlflow-auth.ini")
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{_mlflow_auth_db()}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Checking a password costs a deliberately slow hash on every request; without this cache a
        # busy 2-core machine fell minutes behind (one worker, so no stale entries across workers).
        "auth_cache_ttl_seconds = 300\n"
    )
    return path
