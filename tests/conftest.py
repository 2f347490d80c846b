"""Shared pytest fixtures.

Data fixtures come first and stand alone: tiny but valid Fashion-MNIST IDX files, the real files
when Debian's package is installed, and a guard that keeps every test off the network.
"""

from __future__ import annotations

import atexit
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.stores import new_store

# What the suite makes in the temp folder outside pytest's tmp_path (each process's Prefect home, store
# templates, the temporary files of the code under test) goes in one folder that the main process
# removes as it exits. Workers must not be trusted to clean up: xdist kills a worker that takes more
# than 10 s to exit (Prefect drains its event and log workers then), and a killed worker runs no atexit
# handler; each session left 3 to 5 folders in /tmp that way (1-9 MB each).
SUITE_TMP_VARIABLE = "CNN_TRAIN_TESTS_TMP"
if SUITE_TMP_VARIABLE not in os.environ:  # the main process; workers and the processes tests start inherit it
    os.environ[SUITE_TMP_VARIABLE] = tempfile.mkdtemp(prefix="cnn-train-tests-")
    atexit.register(shutil.rmtree, os.environ[SUITE_TMP_VARIABLE], ignore_errors=True)
    # Nor does the suite write the project's own .state (the developer's spools, caches, leases): one state
    # folder for the session, shared by the workers as the project's is. Tests about the project's state
    # give a project root of their own (CNN_TRAIN_ROOT) and drop this variable.
    os.environ["CNN_TRAIN_STATE_DIR"] = os.path.join(os.environ[SUITE_TMP_VARIABLE], "state")
    # Local Ray clusters (`ray.init()` in a worker, a sweep's own) keep their sessions in <this>/ray, not in
    # /tmp/ray, where three were left per session. Short on purpose: Ray's socket paths stay under 107 bytes.
    os.environ.setdefault("RAY_TMPDIR", os.environ[SUITE_TMP_VARIABLE])
    # The processes tests start (here with -n 0) too: a model loaded by plain MLflow left its download in
    # /tmp (a serve process keeps Prefect's runner folder in its state dir, cnn_train.flows.ops.serve). This process's own
    # temporary folder stays the system's, where pytest keeps the last runs' tmp_path folders.
    tempfile.tempdir = tempfile.gettempdir()
    os.environ["TMPDIR"] = os.environ[SUITE_TMP_VARIABLE]
else:  # a worker: its temporary files go in the suite's folder too (pytest's tmp_path is set apart by xdist)
    tempfile.tempdir = tempfile.mkdtemp(prefix="worker-", dir=os.environ[SUITE_TMP_VARIABLE])
    os.environ["TMPDIR"] = tempfile.tempdir  # and those of the processes its tests start

# Tests never see the developer's Prefect profile (`cnn-train up` points it at a local server that
# may be down) nor a PREFECT_API_URL from the shell: each process gets a Prefect home of its own.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-", dir=os.environ[SUITE_TMP_VARIABLE])
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
# One OpenMP thread per process (this one and every process a test starts), unless the developer set it:
# scripts/test.sh runs several workers on few cores, and torch's second thread spins waiting for a core
# another process holds. Measured on 2 cores, 3 workers: 2 min 10 s less CPU, the suite 9m42s -> 8m35s.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Prefect sets up logging on its first import, closing every handler made before; absl's (Keras brings it)
# then closes its stream unless that is the current sys.stderr. Imported first inside a test (CliRunner's
# stderr) after a Keras test, it closed that earlier test's pytest capture ("lost sys.stderr"). Importing
# it here, as collecting the whole suite does, keeps a run of a few modules in any order the same.
import prefect.main  # noqa: E402,F401

# --- running on several workers (scripts/test.sh: pytest-xdist, --dist loadfile) -----------------

#: Modules that mostly wait (a 3-minute tracking outage, Prefect's zombie detection, servers coming
#: up): handed out first so the waits overlap the rest of the suite instead of ending it.
WAITING_MODULES = ("test_spool", "test_team_servers", "test_ray", "test_reliability", "test_worker",
                   "test_deployment", "test_newcomer", "test_plugin_runs", "test_benchmark_smoke")


def pytest_configure(config: pytest.Config) -> None:
    """In the main process, before any worker starts: one Prefect schema for the session. Every Prefect
    server a test starts (temporary ones, `cnn-train up`'s, the session's) begins with a copy of it
    instead of migrating a new database: 4.5 s of CPU each (cnn_train.flows.ops.prefect_database). Migrated
    in the background; a server that starts meanwhile waits for it."""
    from cnn_train.flows.ops.prefect_database import SCHEMA_DIR_VARIABLE

    if hasattr(config, "workerinput") or os.environ.get(SCHEMA_DIR_VARIABLE):
        return  # a worker (it inherits the main process's folder), or the developer's own folder
    os.environ[SCHEMA_DIR_VARIABLE] = tempfile.mkdtemp(prefix="prefect-schema-", dir=os.environ[SUITE_TMP_VARIABLE])
    migration = subprocess.Popen(  # noqa: S603 - this project's own module
        [sys.executable, "-c", "from cnn_train.flows.ops import prefect_database; prefect_database.migrated_template()"],
        stdin=subprocess.DEVNULL,
    )
    atexit.register(migration.wait)  # before the folder goes (atexit runs last-registered first)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The waiting modules first; xdist hands out whole modules in this order (--no-loadscope-reorder)."""
    def rank(item: pytest.Item) -> int:
        name = item.path.stem
        return WAITING_MODULES.index(name) if name in WAITING_MODULES else len(WAITING_MODULES)

    items.sort(key=rank)  # stable: within a module, and among the rest, collection order holds


# --- data fixtures -------------------------------------------------------------------------------

REAL_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_bytes(array: np.ndarray, *, magic: int | None = None, count: int | None = None) -> bytes:
    """``array`` as an uncompressed IDX file of unsigned bytes.

    ``magic`` and ``count`` override the header (default: 2049 for 1-D labels, 2051 for 3-D images,
    and the real length) so tests can build broken files.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    dims = [array.shape[0] if count is None else count, *array.shape[1:]]
    return np.array([magic, *dims], dtype=">u4").tobytes() + array.tobytes()


def _write_idx_gz(
    path: Path, array: np.ndarray, *, magic: int | None = None, count: int | None = None
) -> Path:
    """Write ``array`` as a gzipped IDX file at ``path`` (see :func:`_idx_bytes` for the overrides)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(_idx_bytes(array, magic=magic, count=count), mtime=0))
    return path


@dataclass(frozen=True, eq=False)
class FakeFashionMNIST:
    """A folder with the four files, and the arrays written into them."""

    folder: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


MakeFashionMNIST = Callable[..., FakeFashionMNIST]


@pytest.fixture
def write_idx_gz() -> Callable[..., Path]:
    """``write(path, array, *, magic=None, count=None)``: a gzipped IDX file, its header may lie."""
    return _write_idx_gz


@pytest.fixture
def make_fashion_mnist(tmp_path: Path) -> MakeFashionMNIST:
    """Factory writing small, valid Fashion-MNIST files: random 28x28 images, every class equally often."""

    def make(
        folder: Path | None = None, *, n_train: int = 200, n_test: int = 50, seed: int = 0
    ) -> FakeFashionMNIST:
        folder = folder or tmp_path / "fashion-mnist"
        rng = np.random.default_rng(seed)
        x_train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
        x_test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
        y_train = rng.permutation(np.arange(n_train) % 10).astype(np.uint8)
        y_test = rng.permutation(np.arange(n_test) % 10).astype(np.uint8)
        for name, array in zip(FASHION_MNIST_FILES, (x_train, y_train, x_test, y_test)):
            _write_idx_gz(folder / name, array)
        return FakeFashionMNIST(folder, x_train, y_train, x_test, y_test)

    return make


@pytest.fixture
def fake_fashion_mnist(make_fashion_mnist: MakeFashionMNIST) -> FakeFashionMNIST:
    """200 training and 50 test images, 20 and 5 per class."""
    return make_fashion_mnist()


@pytest.fixture(scope="session")
def real_fashion_mnist_dir() -> Path:
    """Debian's copy of the official files; the test is skipped when they are not installed."""
    missing = [name for name in FASHION_MNIST_FILES if not (REAL_FASHION_MNIST_DIR / name).is_file()]
    if missing:
        pytest.skip(
            f"real Fashion-MNIST not installed ({REAL_FASHION_MNIST_DIR} lacks {', '.join(missing)}); "
            "apt-get install dataset-fashion-mnist to run this test"
        )
    return REAL_FASHION_MNIST_DIR


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each test leaves os.environ as it found it. The CLI's in-process callbacks set variables for the
    process they expect to end with the command; in this long-lived one they would reach every later
    subprocess (a later `cnn-train run` then printed more than its one line of error)."""
    before = dict(os.environ)
    yield
    changed = sorted(k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k) and k != "PYTEST_CURRENT_TEST")
    if not changed:
        return
    if leaks := os.environ.get("CNN_TRAIN_TEST_ENV_LEAKS"):  # a developer's aid: which test leaked what
        with open(leaks, "a") as out:
            out.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}: {changed}\n")
    for name in changed:
        if name in before:
            os.environ[name] = before[name]
        else:
            del os.environ[name]


@pytest.fixture(autouse=True)
def _no_dataset_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to download Fashion-MNIST fails the test loudly instead of using the network."""
    from cnn_train.flows.data import locate

    def refuse(url: str, timeout: float) -> bytes:
        raise AssertionError(f"a test tried to download {url}; tests must not use the network")

    monkeypatch.setattr(locate, "_fetch", refuse)


# --- orchestration fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """One temporary Prefect server for this worker's session, the one a command without servers starts
    (its database under this session's PREFECT_HOME, begun from the session's schema); its API URL is
    also what subprocesses get as PREFECT_API_URL so their flow runs are recorded there."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cnn_train.flows.ops.temporary_server import TemporaryServer

    server = TemporaryServer()
    # Stopped as the process exits, after Prefect's event and log workers have drained (they drain at
    # thread shutdown, before atexit), as a command's temporary server is. Stopped at session teardown, it
    # left them sending to a server that was gone: the worker hung at exit until xdist killed it 10 s later.
    atexit.register(server.stop)
    with temporary_settings({PREFECT_API_URL: server.ready(timeout=120)}) as settings:
        yield settings.api.url


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str, real_fashion_mnist_dir: Path) -> Iterator[str]:
    """A private SQLite MLflow store and state dir for one test module, with the real data."""
    root = tmp_path_factory.mktemp("store")
    uri = new_store(root / "mlflow.db")
    patcher = pytest.MonkeyPatch()
    patcher.setenv("MLFLOW_TRACKING_URI", uri)
    patcher.setenv("CNN_TRAIN_STATE_DIR", str(root / "state"))
    patcher.setenv("CNN_TRAIN_DATA_DIR", str(real_fashion_mnist_dir))
    yield uri
    patcher.undo()
