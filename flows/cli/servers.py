"""``cnn-train up``, ``down`` and ``doctor``: the local servers and their health (``status`` is in state.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cnn_train.flows.cli.app import app
from cnn_train.flows.params import RunParameters
from cnn_train.flows.ops.services import BindHost


@app.command()
def up(
    watch_timeout: Annotated[int, typer.Option(min=1, help="Seconds to wait for the flow run.")] = 7200,
    trigger: Annotated[bool, typer.Option(help="Trigger cnn-train/default once the servers are up.")] = True,
    host: Annotated[
        BindHost,
        typer.Option(
            help="Address the servers listen on: 127.0.0.1, this machine only; 0.0.0.0, every interface, which "
            "requires credentials (see README)."
        ),
    ] = "127.0.0.1",
    worker: Annotated[
        bool,
        typer.Option(
            "--worker",
            help="Run the deployments from the work pool through this machine's Prefect worker (one flow run "
            "per GPU at most) instead of the serve process.",
        ),
    ] = False,
) -> None:
    """Start the Prefect server, the MLflow server and the deployment's serve process, or with --worker
    the work pool and this machine's worker (each only if not running), then run cnn-train/default and
    wait for it."""
    import os

    from cnn_train.flows.ops import auth, launcher, services

    if auth.require_for_host(host) is not None:
        for path in auth.keep_project_data_private():
            typer.echo(f"{path}: now readable by this user only, as the servers' credentials ask")
    os.environ[services.BIND_HOST_ENV] = host

    code = launcher.up(trigger=trigger, watch_timeout=watch_timeout, echo=typer.echo, worker=worker)
    raise typer.Exit(code)


@app.command()
def down() -> None:
    """Stop the worker or serve process, the MLflow server and the Prefect server started by `cnn-train up`."""
    from cnn_train.flows.ops import launcher, services

    # Read first: a server up started on another port (CNN_TRAIN_PREFECT_PORT) is found by its recorded
    # port, which stopping it removes; the profile still pointing there then made every later run fail.
    api_url = services.prefect_api_url()
    for service in reversed(services.SERVICES):
        stopped = service.stop()
        typer.echo(f"{service.name}: {'stopped' if stopped else 'not running'}")
    launcher.forget_server_in_prefect_cli(typer.echo, api_url)


@app.command()
def doctor(
    fix: Annotated[bool, typer.Option(help="Deliver records waiting in a spool, mark orphaned flow runs Crashed and abandoned RUNNING MLflow runs FAILED.")] = False,
    data_dir: Annotated[Optional[str], typer.Option(help=RunParameters.model_fields["data_dir"].description)] = None,  # noqa: UP045
) -> None:
    """Check the Prefect server, what runs the deployment (the serve process or a work pool's workers),
    MLflow, the dataset and stale runs."""
    from pathlib import Path

    from prefect.settings import get_current_settings

    from cnn_train.flows.ops import doctor as checks
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
