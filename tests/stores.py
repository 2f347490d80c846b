"""Empty MLflow SQLite stores for tests, in milliseconds.

Creating a store runs MLflow's schema migrations: 2-4 s in this process, ~8 s through `mlflow db
upgrade`, paid again by every test and subprocess that opens a new file. The schema is built once
per test session and each store starts as a copy of it; MLflow opens a copy as it would the original.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np

from cnn_train.plugins.contract import LoggableModel


@functools.cache
def _template() -> Path:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="cnn-train-tests-mlflow-schema-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "mlartifacts"))
    return folder / "mlflow.db"


def new_store(path: Path) -> str:
    """The URI of a new, empty, fully migrated SQLite store at ``path`` (a ``.db`` file to create)."""
    if path.exists():
        raise FileExistsError(f"{path} exists; a new store needs a path of its own")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template(), path)
    return f"sqlite:///{path}"


def uniform_model() -> LoggableModel:
    """A pyfunc model with no opinion, 10% for each class, to log into a store (its class is importable from
    here, so the model loads in the tests)."""
    return LoggableModel(flavor="pyfunc", model=Uniform(), pip_requirements=("mlflow",))


class Uniform(mlflow.pyfunc.PythonModel):
    def predict(self, context: object, model_input: np.ndarray, params: object = None) -> np.ndarray:
        return np.full((len(model_input), 10), 0.1, dtype=np.float32)
