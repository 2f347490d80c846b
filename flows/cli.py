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


# Training values left out take the architecture's own: the lesson's for cnn and dense, the recipe's for cnn-improved.
ARCHITECTURE_HELP = "'cnn' (the lesson's model), 'dense' (the previous lesson's) or 'cnn-improved' (the opt-in recipe)."
EPOCHS_HELP = "Passes over the training set (default 10; 7 for cnn-improved, its recipe's)."
BATCH_HELP = "Images per optimizer step (default 32; 128 for cnn-improved)."
LR_HELP = "Adam learning rate (default 0.001; for cnn-improved 0.003, the peak of its one-cycle schedule)."

# Options the run, compare and sweep commands share, declared once.
Architecture = Annotated[str, typer.Option(help=ARCHITECTURE_HELP)]
Epochs = Annotated[Optional[int], typer.Option(help=EPOCHS_HELP)]
BatchSize = Annotated[Optional[int], typer.Option(help=BATCH_HELP)]
LearningRate = Annotated[Optional[float], typer.Option(help=LR_HELP)]
ValidationFraction = Annotated[float, typer.Option(help="Share of training images held out.")]
SampleLimit = Annotated[Optional[int], typer.Option(help="Train on this many images only.")]
TestLimit = Annotated[Optional[int], typer.Option(help="Evaluate on this many test images only.")]
Experiment = Annotated[str, typer.Option(help="MLflow experiment.")]
DataDir = Annotated[Optional[str], typer.Option(help="Folder with the four Fashion-MNIST .gz files.")]
DeviceRequest = Annotated[str, typer.Option(help="cpu, gpu-preferred, gpu-required or cuda:N.")]

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
    architecture: Architecture = "cnn",
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    learning_rate: LearningRate = None,
    seed: Annotated[int, typer.Option(help="Seed for weights, shuffling and the split.")] = 42,
    validation_fraction: ValidationFraction = 0.1,
    sample_limit: SampleLimit = None,
    test_limit: TestLimit = None,
    experiment: Experiment = "cnn-train",
    data_dir: DataDir = None,
    compare_dense: Annotated[bool, typer.Option(help="Also train the dense network and compare.")] = False,
    prep_device: Annotated[str, typer.Option(help="Device request for data prep.")] = "cpu",
    train_device: DeviceRequest = "gpu-preferred",
    evaluate_device: DeviceRequest = "gpu-preferred",
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
    architecture: Architecture = "cnn",
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    learning_rate: LearningRate = None,
    seed: Annotated[int, typer.Option(help="Seed shared by every backend.")] = 42,
    validation_fraction: ValidationFraction = 0.1,
    sample_limit: SampleLimit = None,
    test_limit: TestLimit = None,
    experiment: Experiment = "cnn-train",
    data_dir: DataDir = None,
    train_device: DeviceRequest = "gpu-preferred",
    evaluate_device: DeviceRequest = "gpu-preferred",
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


def _parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["learning_rate=0.001,0.0003", "architecture=cnn,dense"]`` as a grid; values parse as JSON
    when they can (numbers), else stay strings."""
    import json

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            _fail(f"--grid takes FIELD=VALUE,VALUE...; got {item!r}")
        parsed = []
        for value in values.split(","):
            try:
                parsed.append(json.loads(value))
            except ValueError:
                parsed.append(value)
        grid[key.strip()] = parsed
    return grid


@app.command()
def sweep(
    grid: Annotated[list[str], typer.Option(help="FIELD=V1,V2 (repeat per field), e.g. learning_rate=0.001,0.0003.")],
    backend: Annotated[str, typer.Option(help="Backend for fields the grid does not vary.")] = "torch",
    architecture: Architecture = "cnn",
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    learning_rate: LearningRate = None,
    seed: Annotated[int, typer.Option(help="Seed of the shared split and of each trial.")] = 42,
    validation_fraction: ValidationFraction = 0.1,
    sample_limit: SampleLimit = None,
    test_limit: TestLimit = None,
    experiment: Experiment = "cnn-train",
    data_dir: DataDir = None,
    train_device: DeviceRequest = "gpu-preferred",
    max_concurrent: Annotated[int, typer.Option(help="Trials running at once.")] = 2,
    register_best: Annotated[Optional[str], typer.Option(help="Register the best model under this name.")] = None,
    task_runner: Annotated[str, typer.Option(help="'local' (threads) or 'ray'.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Existing Ray cluster (default: start a local Ray).")] = None,
) -> None:
    """Run a grid of configurations (data prepared once), ranked in a parent MLflow run."""
    parameters = dict(locals())
    runner_name = parameters.pop("task_runner")
    address = parameters.pop("ray_address")
    parameters["grid"] = _parse_grid(grid)
    if runner_name not in ("local", "ray"):
        _fail(f"--task-runner must be 'local' or 'ray', got {runner_name!r}")
    if address and runner_name != "ray":
        _fail("--ray-address needs --task-runner ray")
    _require_reachable_servers()
    from cnn_train.flows.params import ParameterError
    from cnn_train.flows.sweep_flow import cnn_train_sweep, trial_parameters

    try:
        base = {k: v for k, v in parameters.items() if k not in ("grid", "max_concurrent", "register_best")}
        trial_parameters(base, parameters["grid"])
    except ParameterError as error:
        _fail(str(error))
    flow_fn = cnn_train_sweep
    if runner_name == "ray":
        from cnn_train.flows.sweep_flow import ray_task_runner

        flow_fn = cnn_train_sweep.with_options(task_runner=ray_task_runner(address))
    state = flow_fn(**parameters, return_state=True)
    if not state.is_completed():
        _fail(f"flow run ended {state.name}: {state.message}", 1)
    result = state.result()
    import pandas as pd

    typer.echo(pd.DataFrame(result["ranking"]).to_string(index=False))
    typer.echo(f"best trial: {result['best_run_id']} test accuracy {result['best_test_accuracy']:.4f}")
    typer.echo(f"MLflow sweep run: {result['mlflow_run_url']}")
    if "registered_version" in result:
        typer.echo(f"registered model: {register_best} version {result['registered_version']}")


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
    data_dir: DataDir = None,
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
