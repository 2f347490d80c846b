"""Serve ``cnn-train/default``, ``cnn-train-compare/default`` and ``cnn-train-sweep/default`` until interrupted.

Started in the background by ``cnn-train up``; flow runs execute in subprocesses that inherit this
process's environment (MLflow tracking URI, Prefect API URL).
"""

from __future__ import annotations

from prefect import serve

from cnn_train.flows.compare_flow import cnn_train_compare
from cnn_train.flows.sweep_flow import cnn_train_sweep
from cnn_train.flows.train_flow import cnn_train

#: What `prefect deployment run cnn-train/default` trains unless told otherwise.
DEFAULT_DEPLOYMENT_PARAMETERS = {"compare_dense": True}


def main() -> None:
    serve(
        cnn_train.to_deployment(
            name="default",
            parameters=DEFAULT_DEPLOYMENT_PARAMETERS,
            description="The lesson's Fashion-MNIST CNN, trained, evaluated and reported, with the dense network beside it.",
            tags=["cnn-train"],
        ),
        cnn_train_compare.to_deployment(
            name="default",
            description="The same config on the keras and torch backends, side by side with a parity verdict.",
            tags=["cnn-train"],
        ),
        cnn_train_sweep.to_deployment(
            name="default",
            description="A grid of configurations sharing one data prep, ranked in a parent MLflow run (local threads).",
            tags=["cnn-train"],
        ),
    )


if __name__ == "__main__":
    main()
