"""The ``cnn-train`` command line. Heavy imports (Prefect, MLflow, frameworks) happen inside the
commands that need them, so ``cnn-train backends`` and ``--help`` stay fast."""

from cnn_train.flows.cli import plugins, predict, servers, state, sync, training, tune
from cnn_train.flows.cli.app import app

__all__ = ["app", "plugins", "predict", "servers", "state", "sync", "training", "tune"]
