"""The ``cnn-train`` command line. Heavy imports (Prefect, MLflow, frameworks) happen inside the
commands that need them, so ``cnn-train backends`` and ``--help`` stay fast."""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(
    name="cnn-train",
    help="Train, evaluate and report the Fashion-MNIST CNN with pluggable backends, Prefect and MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"cnn-train: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def backends() -> None:
    """List installed backends with their distribution, version and whether they load."""
    import warnings

    from cnn_train.plugins import registry

    with warnings.catch_warnings():
        # Each broken plugin is shown on its own line below; the library's warning would repeat it.
        warnings.simplefilter("ignore", RuntimeWarning)
        statuses = registry.backend_statuses()
    if not statuses:
        _fail(f"no backends installed (entry-point group {registry.GROUP!r}); reinstall cnn-train")
    width = max(len(s.info.name) for s in statuses)
    for status in statuses:
        state = "loads" if status.loads else f"BROKEN: {status.problem}"
        typer.echo(
            f"{status.info.name:<{width}}  {status.info.distribution} {status.info.version}  "
            f"{status.info.target}  {state}"
        )


@app.command("check-backend")
def check_backend(
    name: Annotated[str, typer.Argument(help="Registered backend name, e.g. torch.")],
    only: Annotated[Optional[list[str]], typer.Option("--check", help="Run only this check (repeatable).")] = None,
) -> None:
    """Run the conformance kit against a backend: exit 0 when every check passes."""
    from cnn_train.plugins import conformance, registry

    try:
        registry.backend_info(name)
        results = conformance.run_checks(name, only=tuple(only) if only else None)
    except (registry.BackendError, ValueError) as error:
        _fail(str(error))
    failed = [r for r in results if not r.passed]
    for result in results:
        if result.passed:
            typer.echo(f"PASS {result.name}")
    for result in failed:
        typer.echo(f"FAIL {result.name}: {result.reason}")
    typer.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


@app.command()
def run(
    backend: Annotated[str, typer.Option(help="Installed backend (see `cnn-train backends`).")] = "torch",
    architecture: Annotated[str, typer.Option(help="'cnn' (the lesson's model) or 'dense'.")] = "cnn",
    epochs: Annotated[int, typer.Option(help="Passes over the training set.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per optimizer step.")] = 32,
    learning_rate: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for weights, shuffling and the split.")] = 42,
    validation_fraction: Annotated[float, typer.Option(help="Share of training images held out.")] = 0.1,
    sample_limit: Annotated[Optional[int], typer.Option(help="Train on this many images only.")] = None,
    test_limit: Annotated[Optional[int], typer.Option(help="Evaluate on this many test images only.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "cnn-train",
    data_dir: Annotated[Optional[str], typer.Option(help="Folder with the four Fashion-MNIST .gz files.")] = None,
    compare_dense: Annotated[bool, typer.Option(help="Also train the dense network and compare.")] = False,
    prep_device: Annotated[str, typer.Option(help="Device request for data prep.")] = "cpu",
    train_device: Annotated[str, typer.Option(help="cpu, gpu-preferred, gpu-required or cuda:N.")] = "gpu-preferred",
    evaluate_device: Annotated[str, typer.Option(help="cpu, gpu-preferred, gpu-required or cuda:N.")] = "gpu-preferred",
    report_device: Annotated[str, typer.Option(help="Device request for the report.")] = "cpu",
) -> None:
    """Run the cnn-train flow directly in this process (no servers needed)."""
    parameters = dict(locals())
    from cnn_train.flows.params import ParameterError, validate_parameters

    from cnn_train.flows.placement import PlacementError, check_satisfiable

    try:
        check_satisfiable(validate_parameters(**parameters).device_requests())
    except (ParameterError, PlacementError) as error:
        _fail(str(error))
    _require_reachable_servers()
    from cnn_train.flows.train_flow import cnn_train

    state = cnn_train(**parameters, return_state=True)
    if not state.is_completed():
        _fail(f"flow run ended {state.name}: {state.message}", 1)
    result = state.result()
    _print_summary(result)


@app.command()
def compare(
    backend: Annotated[list[str], typer.Option(help="A backend to compare (repeat; at least two).")] = ["keras", "torch"],  # noqa: B006
    architecture: Annotated[str, typer.Option(help="'cnn' or 'dense'.")] = "cnn",
    epochs: Annotated[int, typer.Option(help="Passes over the training set.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per optimizer step.")] = 32,
    learning_rate: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed shared by every backend.")] = 42,
    validation_fraction: Annotated[float, typer.Option(help="Share of training images held out.")] = 0.1,
    sample_limit: Annotated[Optional[int], typer.Option(help="Train on this many images only.")] = None,
    test_limit: Annotated[Optional[int], typer.Option(help="Evaluate on this many test images only.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "cnn-train",
    data_dir: Annotated[Optional[str], typer.Option(help="Folder with the Fashion-MNIST .gz files.")] = None,
    train_device: Annotated[str, typer.Option(help="cpu, gpu-preferred, gpu-required or cuda:N.")] = "gpu-preferred",
    evaluate_device: Annotated[str, typer.Option(help="cpu, gpu-preferred, gpu-required or cuda:N.")] = "gpu-preferred",
    tolerance_points: Annotated[float, typer.Option(help="Accuracy gap (points) still called parity.")] = 1.0,
) -> None:
    """Train one config on several backends (same seed and split) and print them side by side."""
    parameters = dict(locals())
    parameters["backends"] = parameters.pop("backend")
    from cnn_train.flows.params import ParameterError

    _require_reachable_servers()
    from cnn_train.flows.compare_flow import cnn_train_compare, validate_backends

    try:
        values = {k: v for k, v in parameters.items() if k not in ("backends", "tolerance_points")}
        validate_backends(parameters["backends"], values)
    except ParameterError as error:
        _fail(str(error))
    state = cnn_train_compare(**parameters, return_state=True)
    if not state.is_completed():
        _fail(f"flow run ended {state.name}: {state.message}", 1)
    result = state.result()
    typer.echo(result["report"])
    typer.echo(f"MLflow parent run: {result['mlflow_run_url']}")


def _require_reachable_servers() -> None:
    """A configured but dead Prefect API or MLflow server would fail the run late; say so at once."""
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import get_current_settings

    from cnn_train.flows import tracking
    from cnn_train.flows.services import http_ok

    try:
        tracking.check_reachable(tracking.tracking_uri())
    except tracking.TrackingUnavailableError as error:
        _fail(str(error))
    api_url = get_current_settings().api.url
    if api_url and not http_ok(f"{api_url.rstrip('/')}/health", timeout=3.0):
        _fail(
            f"the Prefect API at {api_url} does not answer; start it with `cnn-train up --no-trigger`, "
            "or `prefect config unset PREFECT_API_URL` to run on a temporary server"
        )


def _print_summary(result: dict[str, Any]) -> None:
    typer.echo(f"MLflow run: {result['mlflow_run_url']}")
    typer.echo(f"test accuracy: {result['test_accuracy']:.4f}")
    if result.get("dense_test_accuracy") is not None:
        typer.echo(f"dense network test accuracy: {result['dense_test_accuracy']:.4f}")


@app.command()
def up(
    watch_timeout: Annotated[int, typer.Option(help="Seconds to wait for the flow run.")] = 7200,
    trigger: Annotated[bool, typer.Option(help="Trigger cnn-train/default once the servers are up.")] = True,
) -> None:
    """Start the Prefect server, the MLflow server and the deployment's serve process (each only if
    not running), then run cnn-train/default and wait for it."""
    from cnn_train.flows import launcher

    code = launcher.up(trigger=trigger, watch_timeout=watch_timeout, echo=typer.echo)
    raise typer.Exit(code)


@app.command()
def down() -> None:
    """Stop the serve process, the MLflow server and the Prefect server started by `cnn-train up`."""
    from cnn_train.flows import services

    from cnn_train.flows import launcher

    for service in reversed(services.SERVICES):
        stopped = service.stop()
        typer.echo(f"{service.name}: {'stopped' if stopped else 'not running'}")
    launcher.forget_server_in_prefect_cli(typer.echo)


@app.command()
def status() -> None:
    """Show the servers started by `cnn-train up`."""
    from cnn_train.flows import services

    typer.echo(services.status_json())


@app.command()
def doctor(
    fix: Annotated[bool, typer.Option(help="Mark abandoned RUNNING MLflow runs FAILED.")] = False,
    data_dir: Annotated[Optional[str], typer.Option(help="Folder with the Fashion-MNIST .gz files.")] = None,
) -> None:
    """Check the Prefect server, the deployment's serve process, MLflow, the dataset and stale runs."""
    from pathlib import Path

    from prefect.settings import get_current_settings

    from cnn_train.flows import doctor as checks
    from cnn_train.flows import tracking

    findings = checks.diagnose(
        api_url=get_current_settings().api.url,
        tracking_uri=tracking.tracking_uri(),
        data_dir=Path(data_dir) if data_dir else None,
        fix=fix,
    )
    for finding in findings:
        typer.echo(finding.line())
    if not all(finding.ok for finding in findings):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
