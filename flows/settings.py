"""Where cnn-train keeps its state, in one place.

Everything lives under the project root by default so a checkout is self-contained:
``mlflow.db`` and ``mlartifacts/`` beside ``pyproject.toml``, everything else under ``.state/``.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """``CNN_TRAIN_ROOT`` when set, else the checkout this package was installed from, else the working directory."""
    if env := os.environ.get("CNN_TRAIN_ROOT"):
        return Path(env).resolve()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "flows").is_dir():
        return checkout
    return Path.cwd().resolve()


def state_dir() -> Path:
    """Runtime state (caches, leases, pid files, Prefect home): ``CNN_TRAIN_STATE_DIR`` or ``<root>/.state``."""
    path = Path(os.environ.get("CNN_TRAIN_STATE_DIR") or project_root() / ".state")
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_tracking_uri() -> str:
    """The project's SQLite store, as an absolute URI so the working directory does not matter."""
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    return project_root() / "mlartifacts"
