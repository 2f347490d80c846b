"""A new Prefect database starts as a copy of one Prefect migrated before, not from nothing.

A Prefect server's first start on a new SQLite file runs every one of Prefect's schema migrations
(116 in Prefect 3.9) and registers its block types: a temporary server in a new home answered after
10.2-10.6 s, against 3.0-3.1 s from a copy (this project's 2-vCPU EPYC). Each new Prefect home pays
it: a checkout's first command and its first `cnn-train up`, every fresh state folder, every test
that starts a server. The first database migrated here is kept as a template, one file per Prefect
version; a new database is a copy of it, and Prefect's own migration at start-up then finds nothing
left to do.

Only SQLite databases are seeded; anything else, or anything that goes wrong here, leaves the new
database to Prefect, which migrates it as it always does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from importlib.metadata import version
from pathlib import Path

from cnn_train.flows.settings import state_dir

#: Where templates are kept when not under the state folder (one folder for many checkouts or test sessions).
SCHEMA_DIR_VARIABLE = "CNN_TRAIN_PREFECT_SCHEMA_DIR"


def template_path() -> Path:
    """The migrated database of the installed Prefect version: its schema and block types, no runs."""
    folder = os.environ.get(SCHEMA_DIR_VARIABLE) or state_dir() / "prefect-schema"
    return Path(folder) / f"prefect-{version('prefect')}.db"


def sqlite_file(connection_url: str) -> Path | None:
    """The file of a SQLite connection URL (``sqlite+aiosqlite:///...``); None for any other database."""
    scheme, separator, rest = connection_url.partition(":///")
    database = rest.partition("?")[0]
    if not separator or scheme.split("+")[0] != "sqlite" or database in ("", ":memory:"):
        return None
    return Path(database)


def seed(database: Path) -> bool:
    """Make ``database`` a copy of the template when it does not exist yet and a template does; whether it did.
    Never overwrites: a database another process created meanwhile is kept. A template that cannot be
    read or copied leaves ``database`` to Prefect, as if there were none."""
    template = template_path()
    if database.exists():
        return False
    _wait_while_created(template)
    if not template.is_file():
        return False
    database.parent.mkdir(parents=True, exist_ok=True)
    partial = database.with_name(f".{database.name}.{os.getpid()}.partial")
    try:
        _copy(template, partial)
        os.link(partial, database)  # fails if the file appeared meanwhile: a rename would overwrite it
    except (OSError, sqlite3.Error):  # FileExistsError among them: another process made it first
        return False
    finally:
        partial.unlink(missing_ok=True)
    return True


def migrated_template() -> Path:
    """The template, migrated now by Prefect when there is none (one process at a time; the others wait
    for it). Imports Prefect's server package: call it where the server runs."""
    template = template_path()
    if template.is_file():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_file(template), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not template.is_file():
            migrated, copy = (template.with_name(f"{template.name}.{os.getpid()}.{part}") for part in ("new", "copy"))
            try:
                _migrate(migrated)
                _copy(migrated, copy)
                os.replace(copy, template)  # whole or not at all, for readers that do not lock
            finally:
                for leftover in (copy, migrated, *migrated.parent.glob(f"{migrated.name}-*")):  # with -wal, -shm
                    leftover.unlink(missing_ok=True)
    return template


def _lock_file(template: Path) -> Path:
    return template.with_name(f"{template.name}.lock")


def _wait_while_created(template: Path) -> None:
    """Return once no process is migrating ``template`` (at once when none is)."""
    with contextlib.suppress(FileNotFoundError), open(_lock_file(template)) as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)


def prepare_server_database() -> None:
    """Before this process's Prefect server starts: its SQLite database, when new, becomes a copy of the
    template (migrated first when there is none). Whatever fails leaves the database to Prefect."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    database = sqlite_file(url.get_secret_value() if url is not None else "")
    if database is None or database.exists():
        return
    try:
        migrated_template()
        seed(database)
    except Exception:  # noqa: BLE001 - only a shortcut: Prefect then migrates the new database, as without one
        return


def _migrate(path: Path) -> None:
    """Prefect's own migrations, then its registration of block types, run on the SQLite file ``path`` as
    a server's first start runs them; the process's database settings are left as they were. With the
    block types in the template, servers starting at once on one new database (concurrent commands in a
    new checkout) find them there instead of inserting the same rows together (UNIQUE constraint failed)."""
    import asyncio

    import prefect.plugins
    from prefect.server.database import provide_database_interface
    from prefect.server.database.dependencies import temporary_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    async def create() -> None:
        database = provide_database_interface()
        try:
            await database.create_db()
            prefect.plugins.load_prefect_collections()  # as the server does first: collections' blocks too
            async with await database.session() as session:
                await run_block_auto_registration(session=session)
        finally:
            await (await database.engine()).dispose()  # closes the file before it is copied

    with temporary_settings({PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{path}"}):
        with temporary_database_interface():
            asyncio.run(create())


def _copy(source: Path, target: Path) -> None:
    """A consistent single-file copy of a SQLite database (SQLite's backup: whatever its journal holds too)."""
    target.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
