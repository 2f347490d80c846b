"""Disk space: a run refused up front when a disk it writes to is nearly full, and a full disk met during
a run recognised through the wrappers MLflow, SQLAlchemy and Prefect put around it, told in one line and
not retried. The end-to-end case (a run whose checkpoint meets a full disk) is in test_reliability."""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from cnn_train.flows.diskspace import DiskFullError, check_free_space, disk_full, disk_full_line, run_folders


def _raised_from(outer: Exception, inner: Exception) -> Exception:
    """``outer`` raised ``from inner``, as a wrapper raises it."""
    try:
        try:
            raise inner
        except Exception as error:
            raise outer from error
    except Exception as error:
        return error


def _mlflow_wrapped_sqlite_full() -> Exception:
    from mlflow.exceptions import MlflowException

    return _raised_from(MlflowException("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT ...]"),
                        sqlite3.OperationalError("database or disk is full"))


@pytest.mark.parametrize(
    ("make", "full"),
    [
        pytest.param(lambda: OSError(errno.ENOSPC, "No space left on device", "/x/weights"), True, id="enospc"),
        pytest.param(lambda: OSError(errno.EDQUOT, "Disk quota exceeded"), True, id="quota"),
        pytest.param(_mlflow_wrapped_sqlite_full, True, id="sqlite-full-inside-mlflow"),
        pytest.param(lambda: _raised_from(RuntimeError("checkpoint failed"), OSError(errno.ENOSPC, "No space left on device")),
                     True, id="enospc-as-the-cause"),
        pytest.param(lambda: DiskFullError("only 3 MB free"), True, id="refused-up-front"),
        pytest.param(lambda: OSError(errno.EACCES, "Permission denied", "/x"), False, id="permission"),
        pytest.param(lambda: RuntimeError("loss is nan"), False, id="unrelated"),
        pytest.param(lambda: None, False, id="no-error"),
    ],
)
def test_a_full_disk_is_recognised_through_its_wrappers(make, full):
    assert disk_full(make()) is full


def _torch_save_on_a_full_disk() -> Exception:
    """What torch.save raised as a tmpfs filled: its stream's error, then its writer's, naming no errno."""
    return _raised_from(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
                        RuntimeError("basic_ios::clear: iostream error"))


@pytest.mark.parametrize(("free", "full"), [(3 * 2**20, True), (10 * 2**30, False)], ids=["state-disk-full", "state-disk-roomy"])
def test_torchs_failed_write_is_a_full_disk_when_the_state_folders_disk_is(tmp_path, monkeypatch, free, full):
    """A checkpoint write on a disk that filled mid-run was retried, then ended in 3,409 lines: torch says only
    that its stream failed. A failed write while the state folder's disk has no room is the full disk."""
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=free))
    assert disk_full(_torch_save_on_a_full_disk()) is full
    if full:
        assert disk_full_line(_torch_save_on_a_full_disk()).startswith(
            f"a disk this run writes to is full (writing a checkpoint in {tmp_path}/state/checkpoints): "
        )


def test_a_full_disk_is_not_retried():
    from cnn_train.flows.tasks import retry_unless_deterministic

    state = SimpleNamespace(data=_raised_from(RuntimeError("save failed"), OSError(errno.ENOSPC, "No space left on device")))
    assert retry_unless_deterministic(None, None, state) is False
    assert retry_unless_deterministic(None, None, SimpleNamespace(data=ConnectionError("reset"))) is True


@pytest.mark.parametrize(
    ("error", "place"),
    [
        pytest.param(OSError(errno.ENOSPC, "No space left on device", "/s/checkpoints/r/weights"), "writing /s/checkpoints/r/weights", id="a-file"),
        pytest.param(OSError(errno.ENOSPC, "No space left on device", "/tmp/model.pt2", None, "/a/mlartifacts/model.pt2"),
                     "writing /a/mlartifacts/model.pt2", id="a-copy-names-where-it-went"),
        pytest.param(sqlite3.OperationalError("database or disk is full"), "writing to the store sqlite:////data/mlflow.db",
                     id="the-store"),
        pytest.param(OSError(errno.EDQUOT, "Disk quota exceeded"), "writing its records", id="no-file-named"),
    ],
)
def test_the_line_names_what_was_being_written(error, place, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////data/mlflow.db")
    assert disk_full_line(error) == (
        f"a disk this run writes to is full ({place}): free some space, then run again; `cnn-train doctor --fix` "
        "ends what the run could not record as ended"
    )


@pytest.mark.parametrize("cached", [0, 5 * 2**20], ids=["no-data-cache", "a-data-cache-to-delete"])
def test_a_disk_with_too_little_room_is_refused_naming_it_and_what_may_go(tmp_path, monkeypatch, cached):
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    if cached:
        (tmp_path / "state" / "cache" / "fashion-mnist").mkdir(parents=True)
        (tmp_path / "state" / "cache" / "fashion-mnist" / "split.npz").write_bytes(b"0" * cached)
    usage = shutil.disk_usage

    def nearly_full(path):
        found = usage(path)
        return found._replace(free=3 * 2**20) if Path(path) in (tmp_path, tmp_path / "state") else found

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(DiskFullError) as caught:
        check_free_space([tmp_path / "state", tmp_path / "not-made-yet" / "store"])
    cache = f", and the data cache {tmp_path}/state/cache (5 MB) may be deleted: runs rebuild it" if cached else ""
    assert str(caught.value) == (
        f"only 3 MB free on the disk holding {tmp_path}/state; a run writes up to about 64 MB there: free some space, "
        f"then run again; `cnn-train gc` prunes old checkpoints and logs{cache}"
    )
    check_free_space([tmp_path], needed=2 * 2**20)  # enough for what is asked


def test_each_disk_is_asked_once(tmp_path, monkeypatch):
    asked: list[str] = []
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: asked.append(str(path)) or usage(path))
    check_free_space([tmp_path, tmp_path / "a", tmp_path / "b"], needed=1)
    assert asked == [str(tmp_path)]


@pytest.mark.parametrize(
    ("uri", "beside_state"),
    [
        pytest.param("sqlite:///{tmp}/store/mlflow.db", ["{tmp}/store"], id="sqlite-store-and-its-artifacts"),
        pytest.param("file://{tmp}/mlruns", ["{tmp}/mlruns"], id="file-store"),
        pytest.param("http://127.0.0.1:5000", ["{root}/mlartifacts"], id="the-projects-server"),
        pytest.param("https://mlflow.example.com", [], id="a-remote-server-keeps-its-own"),
    ],
)
def test_the_folders_a_run_writes_to(tmp_path, monkeypatch, uri, beside_state):
    monkeypatch.setenv("CNN_TRAIN_ROOT", str(tmp_path))
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    expected = [tmp_path / "state", *(Path(folder.format(tmp=tmp_path, root=tmp_path)) for folder in beside_state)]
    assert run_folders(uri.format(tmp=tmp_path)) == expected


def test_after_a_failure_that_names_no_disk_the_full_one_is_named(tmp_path, monkeypatch):
    """Prefect's 500s, as its database's disk filled, said nothing of disks: the command ends naming the disk."""
    from cnn_train.flows.diskspace import full_disk_line

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=0 if str(path).startswith(str(tmp_path)) else 2**30))
    assert full_disk_line([Path("/"), tmp_path / "state"]) == (
        f"the disk holding {tmp_path}/state is full (0 KB free): free some space, then run again; `cnn-train gc` prunes "
        "old checkpoints and logs"
    )
    monkeypatch.setattr(shutil, "disk_usage", usage)
    assert full_disk_line([tmp_path / "state"]) is None
