"""Serve the ``cnn-train/default`` deployment from this process until interrupted.

Started in the background by ``cnn-train up``; flow runs execute in subprocesses that inherit this
process's environment (MLflow tracking URI, Prefect API URL).
"""

from __future__ import annotations

from cnn_train.flows.train_flow import cnn_train

#: What `prefect deployment run cnn-train/default` trains unless told otherwise.
DEFAULT_DEPLOYMENT_PARAMETERS = {"compare_dense": True}


def main() -> None:
    cnn_train.serve(
        name="default",
        parameters=DEFAULT_DEPLOYMENT_PARAMETERS,
        description="The lesson's Fashion-MNIST CNN, trained, evaluated and reported, with the dense network beside it.",
        tags=["cnn-train"],
        print_starting_message=True,
    )


if __name__ == "__main__":
    main()
