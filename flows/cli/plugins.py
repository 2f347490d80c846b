"""``cnn-train backends`` and ``check-backend``: what is installed, and whether it keeps the contract."""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from typing import Annotated, Optional

import typer

from cnn_train.flows.cli.app import app, fail
from cnn_train.flows.errors import debugging


@app.command()
def backends(
    check: Annotated[bool, typer.Option("--check", help="Also load each backend and say whether it loads.")] = False,
) -> None:
    """List installed backends from package metadata (no framework is imported); --check loads each."""
    from cnn_train.plugins import registry

    if check:
        with warnings.catch_warnings():
            # Each broken plugin is shown on its own line below; the library's warning would repeat it.
            warnings.simplefilter("ignore", RuntimeWarning)
            statuses = registry.backend_statuses()
        rows = [(s.info, "loads" if s.loads else f"BROKEN: {s.problem}") for s in statuses]
    else:
        rows = [(info, "") for info in registry.installed_backends()]
    if not rows:
        fail(f"no backends installed (entry-point group {registry.GROUP!r}); reinstall cnn-train")
    width = max(len(info.name) for info, _ in rows)
    for info, state in rows:
        typer.echo(f"{info.name:<{width}}  {info.distribution} {info.version}  {info.target}  {state}".rstrip())
    if check and debugging():  # the plugin's own traceback, under its one line
        for status in (s for s in statuses if s.error is not None):
            typer.echo("".join(traceback.format_exception(status.error)).rstrip(), err=True)
    broken = [info.name for info, state in rows if state.startswith("BROKEN")]
    if broken:  # a check that found something wrong says so on stderr and in its exit code, as doctor does
        fail(f"{len(broken)} backend(s) do not load: {', '.join(broken)} (why: above); the others are usable", code=1)


@app.command("check-backend")
def check_backend(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registered backend name, e.g. torch.")],
    only: Annotated[Optional[list[str]], typer.Option("--check", metavar="CHECK", help="Run only this check (repeatable).")] = None,  # noqa: UP045
) -> None:
    """Run the conformance kit against a backend: exit 0 when no check fails."""
    from cnn_train.plugins import conformance, registry

    try:
        registry.backend_info(name)
        results = conformance.run_checks(name, only=tuple(only) if only else None)
    except (registry.BackendError, ValueError) as error:
        fail(str(error))
    for result in results:
        typer.echo(result.line())
        if result.failed and debugging():
            typer.echo(result.details.rstrip())
    counts = Counter(result.status for result in results)
    shown = ("passed", "failed", "skipped", *(("not run",) if counts["not run"] else ()))
    typer.echo(", ".join(f"{counts[status]} {status}" for status in shown))
    if counts["failed"]:
        raise typer.Exit(1)
