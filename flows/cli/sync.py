"""``cnn-train sync``: deliver tracking records that waited on this machine while MLflow was away."""

from __future__ import annotations

import typer

from cnn_train.flows.cli.app import app


@app.command()
def sync() -> None:
    """Deliver the runs' records (metrics, artifacts, models, final status) kept while MLflow did not answer."""
    from cnn_train.flows import tracking

    results = tracking.sync_spools()
    if not results:
        running = len(tracking.waiting_spools())  # what is left waits for a run that is still going
        typer.echo("nothing left waiting: every ended run's records are in MLflow" + (
            f" ({running} running run(s) are delivering theirs)" if running else ""
        ))
        return
    for spool, delivery in results:
        typer.echo(
            f"run {spool.run_id}: delivered {delivery.delivered} record(s)"
            + (f", {delivery.refused} refused by MLflow (see the log)" if delivery.refused else "")
            + (f", {delivery.remaining} still waiting in {spool.folder} for {tracking.waiting_on(spool.uri)}" if delivery.remaining else "")
        )
    if any(delivery.remaining for _, delivery in results):
        typer.echo("cnn-train: MLflow did not take every record; run `cnn-train sync` again once it answers", err=True)
        raise typer.Exit(1)
