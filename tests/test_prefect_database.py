"""A new Prefect database starts as a copy of the migrated template (cnn_train.flows.ops.prefect_database)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import urllib.request
from pathlib import Path

import pytest

from cnn_train.flows.ops import prefect_database, services
from cnn_train.flows.ops.prefect_database import SCHEMA_DIR_VARIABLE

#: A value Prefect never writes (SQLite's user_version header field): a database carrying it is a copy of
#: a template marked with it.
MARK = 4242


def user_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


@pytest.fixture
def marked_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A template folder of this test's own holding the session's migrated schema, marked."""
    session_template = prefect_database.migrated_template()  # the session's, made at its start (conftest)
    monkeypatch.setenv(SCHEMA_DIR_VARIABLE, str(tmp_path / "schema"))
    template = prefect_database.template_path()
    template.parent.mkdir()
    shutil.copyfile(session_template, template)
    with contextlib.closing(sqlite3.connect(template)) as db:
        db.execute(f"PRAGMA user_version = {MARK}")
    return template


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite+aiosqlite:////srv/prefect/prefect.db", Path("/srv/prefect/prefect.db")),
        ("sqlite:///relative/prefect.db", Path("relative/prefect.db")),
        ("sqlite+aiosqlite:////srv/prefect.db?timeout=30", Path("/srv/prefect.db")),
        ("sqlite+aiosqlite:///:memory:", None),
        ("postgresql+asyncpg://prefect:secret@db:5432/prefect", None),
        ("", None),
    ],
    ids=["absolute", "relative", "with-query", "in-memory", "postgres", "unset"],
)
def test_only_a_sqlite_file_is_seeded(url: str, expected: Path | None) -> None:
    assert prefect_database.sqlite_file(url) == expected


@pytest.mark.parametrize("case", ["new-database", "database-exists", "no-template", "template-not-a-database"])
def test_a_new_database_becomes_a_copy_and_nothing_else_is_touched(case: str, tmp_path: Path, marked_template: Path) -> None:
    database = tmp_path / "home" / "prefect.db"
    if case == "database-exists":
        database.parent.mkdir()
        with contextlib.closing(sqlite3.connect(database)) as db:
            db.execute("CREATE TABLE mine (x)")
    if case == "no-template":
        marked_template.unlink()
    if case == "template-not-a-database":
        marked_template.write_text("half a file")

    seeded = prefect_database.seed(database)

    assert seeded == (case == "new-database")
    if case == "new-database":
        assert user_version(database) == MARK
    elif case == "database-exists":
        with contextlib.closing(sqlite3.connect(database)) as db:
            assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("mine",)]
    else:
        assert not database.exists()
    assert sorted(path.name for path in database.parent.glob("*")) == (["prefect.db"] if database.exists() else [])


def test_the_template_is_prefects_schema_at_its_newest_revision() -> None:
    from alembic.script import ScriptDirectory
    from prefect.server.database.alembic_commands import alembic_config
    from prefect.server.database.orm_models import AioSqliteORMConfiguration

    template = prefect_database.migrated_template()
    written = template.stat().st_mtime_ns

    with contextlib.closing(sqlite3.connect(template)) as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        runs = db.execute("SELECT count(*) FROM flow_run").fetchone()[0]
    # Prefect's env.py picks the dialect's folder of revisions as it migrates; so does this check.
    scripts = ScriptDirectory(ScriptDirectory.from_config(alembic_config()).dir,
                              version_locations=[str(AioSqliteORMConfiguration().versions_dir)])
    assert revision == scripts.get_current_head()
    assert {"flow", "flow_run", "task_run", "deployment", "work_pool"} <= tables
    assert runs == 0
    assert prefect_database.migrated_template() == template and template.stat().st_mtime_ns == written  # made once
    assert sorted(path.name for path in template.parent.iterdir()) == [template.name, f"{template.name}.lock"]


@pytest.mark.parametrize("templates", ["usable", "folder-is-a-file"])
def test_a_temporary_server_in_a_new_home_starts_from_the_template(templates, tmp_path: Path, marked_template: Path,
                                                                    monkeypatch) -> None:
    """From the template when there is one; when none can be made, from Prefect's own migration as before."""
    from cnn_train.flows.ops.temporary_server import TemporaryServer

    if templates == "folder-is-a-file":
        (tmp_path / "not-a-folder").write_text("")
        monkeypatch.setenv(SCHEMA_DIR_VARIABLE, str(tmp_path / "not-a-folder"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    server = TemporaryServer()
    try:
        url = server.ready(timeout=120)
        request = urllib.request.Request(f"{url}/flows/filter", data=b"{}", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - the test's own server
            assert json.load(response) == []  # it reads its database
    finally:
        server.stop()
    assert user_version(tmp_path / "home" / "prefect.db") == (MARK if templates == "usable" else 0)


@pytest.mark.parametrize("own_database", [None, "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"],
                         ids=["default", "server-url-given", "api-url-given"])
def test_up_seeds_its_servers_database_unless_the_user_chose_one(own_database, tmp_path, marked_template, monkeypatch) -> None:
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    for name in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(name, raising=False)
    if own_database:
        monkeypatch.setenv(own_database, f"sqlite+aiosqlite:///{tmp_path / 'theirs.db'}")

    services.prefect_server.before_start()

    database = tmp_path / "state" / "prefect" / "prefect.db"
    assert database.exists() == (own_database is None)
    if own_database is None:
        assert user_version(database) == MARK
    assert not (tmp_path / "theirs.db").exists()
    assert os.environ.get(SCHEMA_DIR_VARIABLE) == str(tmp_path / "schema")


def test_servers_starting_together_on_one_new_home_all_answer_and_log_no_error(tmp_path: Path, monkeypatch, capfd) -> None:
    """Concurrent commands in a new checkout: one server makes the template while the others wait, then
    none of them races the others to insert Prefect's block types (before: two of three servers exited
    while migrating the same new file; with a template of the schema alone, UNIQUE constraint errors)."""
    from cnn_train.flows.ops.temporary_server import TemporaryServer

    from cnn_train.flows.settings import keep_libraries_offline

    monkeypatch.setenv(SCHEMA_DIR_VARIABLE, str(tmp_path / "schema"))  # no template yet
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    keep_libraries_offline()  # as every command does (telemetry that cannot leave this machine logs errors)
    servers = [TemporaryServer() for _ in range(3)]
    try:
        for server in servers:
            server.ready(timeout=180)
    finally:
        for server in servers:
            server.stop()
    out, err = capfd.readouterr()
    assert "ERROR" not in out + err and "Traceback" not in out + err, (out + err)[-3000:]
