"""Worker mode: cnn-train's deployments on a Prefect process work pool, run by a worker on each machine.

``cnn-train up --worker`` creates the pool, deploys ``prefect.yaml`` to it and starts this machine's
worker instead of the serve process, so ``prefect deployment run cnn-train/default`` works the same
either way. Other machines join with ``prefect worker start --pool cnn-train`` against the same
Prefect server. A worker on a machine with GPUs takes at most one flow run per GPU; inside each run
the placement module still chooses the card.

``prefect.yaml`` is generated from :data:`cnn_train.flows.ops.serve.DEPLOYMENTS`, so serving and the pool
offer the same deployments; ``python -m cnn_train.flows.ops.worker prefect-yaml`` rewrites it.
Entrypoints are module paths: a worker imports the installed package, wherever its checkout is.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any
from pathlib import Path

import yaml

from cnn_train.flows.placement import GpuInfo, cuda_inventory
from cnn_train.flows.settings import SettingError, project_root, state_dir

#: The pool ``prefect.yaml`` puts every deployment on; ``CNN_TRAIN_WORK_POOL`` names another at deploy time.
WORK_POOL = "cnn-train"
POOL_ENV = "CNN_TRAIN_WORK_POOL"
#: What Prefect's schema refuses in a work pool's name (WorkPoolCreate: ``^[^/%&><]+$``).
_NOT_IN_POOL_NAMES = ("/", "%", "&", ">", "<")
_HEADER = (
    "# cnn-train's deployments on a Prefect process work pool (`cnn-train up --worker` deploys them).\n"
    "# Generated from flows/ops/serve.py's DEPLOYMENTS: python -m cnn_train.flows.ops.worker prefect-yaml\n"
)

Echo = Callable[[str], None]


def pool_name() -> str:
    """``CNN_TRAIN_WORK_POOL`` (blank: :data:`WORK_POOL`), refused in one line unless Prefect takes it as a pool's name."""
    name = os.environ.get(POOL_ENV, "").strip() or WORK_POOL
    if any(character in name for character in _NOT_IN_POOL_NAMES):
        raise SettingError(
            f"{POOL_ENV}={name!r} is no work pool name: Prefect's take any characters but "
            f"{' '.join(_NOT_IN_POOL_NAMES)}; unset it for {WORK_POOL!r}"
        )
    return name


#: The checkout's ``prefect.yaml``, beside ``pyproject.toml``.
CHECKOUT_PREFECT_YAML = Path(__file__).resolve().parents[2] / "prefect.yaml"


def prefect_yaml_path(pool: str = WORK_POOL) -> Path:
    """What ``deploy`` deploys: the checkout's file, or a copy generated into the state directory for
    another pool (`prefect deploy --all` ignores `--pool`) or a package installed without its checkout."""
    if pool == WORK_POOL and CHECKOUT_PREFECT_YAML.is_file():
        return CHECKOUT_PREFECT_YAML
    generated = state_dir() / "prefect.yaml"
    generated.write_text(prefect_yaml(pool), encoding="utf-8")
    return generated


def prefect_yaml(pool: str = WORK_POOL) -> str:
    """``prefect.yaml`` for :data:`~cnn_train.flows.ops.serve.DEPLOYMENTS`: each on the process pool ``pool``,
    no pull steps (the flow is imported from the installed package)."""
    from cnn_train.flows.ops.serve import DEPLOYMENTS, TAGS

    document = {
        "name": "cnn-train",
        "pull": [],
        "deployments": [
            {
                "name": deployment.name,
                "entrypoint": deployment.flow_path,
                "description": deployment.description,
                "parameters": deployment.parameters,
                "tags": list(TAGS),
                "work_pool": {"name": pool},
            }
            for deployment in DEPLOYMENTS
        ],
    }
    return _HEADER + yaml.safe_dump(document, sort_keys=False, width=120)


def concurrency_limit(inventory: Callable[[], list[GpuInfo]] = cuda_inventory) -> int | None:
    """Flow runs this machine's worker takes at once: one per GPU, or no limit without GPUs."""
    return len(inventory()) or None


def worker_name() -> str:
    return f"cnn-train-{socket.gethostname()}"


def worker_command(limit: int | None) -> list[str]:
    """`prefect worker start` for this machine. Started in the background it would ignore SIGTERM
    (PLATFORM-NOTES), so it runs with INT restored to its default, which Prefect stops on."""
    command = ["env", "--default-signal=INT", _prefect(), "worker", "start", "--pool", pool_name(),
               "--type", "process", "--name", worker_name()]
    return command + (["--limit", str(limit)] if limit else [])


def deploy(env: dict[str, str], echo: Echo) -> None:
    """Create (or refresh) the process pool and deploy ``prefect.yaml`` to it."""
    pool = pool_name()
    _run_prefect(["work-pool", "create", pool, "--type", "process", "--overwrite"], env)
    echo(f"work pool: {pool} (process)")
    source = prefect_yaml_path(pool)
    _run_prefect(["--no-prompt", "deploy", "--all", "--prefect-file", str(source)], env)
    echo(f"deployments: {source} deployed to {pool}")


def online_workers(pool: str, api_url: str | None = None) -> list[str]:
    """Names of the workers polling ``pool`` now; ``[]`` when the pool does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(settings), get_client(sync_client=True) as client:
        try:
            workers = client.read_workers_for_work_pool(pool)
        except ObjectNotFound:
            return []
    return [worker.name for worker in workers if str(getattr(worker.status, "value", worker.status)) == "ONLINE"]


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def _run_prefect(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(  # noqa: S603 - our own command
        [_prefect(), *args], env=env, cwd=project_root(), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"`prefect {' '.join(args)}` failed:\n{tail}")


def flow_run_of(process: Any) -> str | None:
    """The id of the flow run a psutil ``process`` runs (Prefect's runners and workers give each flow-run
    process ``PREFECT__FLOW_RUN_ID``), or None; psutil's errors are the caller's."""
    return process.environ().get("PREFECT__FLOW_RUN_ID") or None


def interrupt_flow_runs(worker_pid: int, *, timeout: float = 60.0) -> None:
    """Ctrl-C to each flow-run process the worker (or serve process) ``worker_pid`` started, then wait for them:
    each ends its runs as an interrupted command does (flow run Crashed, MLflow runs KILLED). A stopped worker
    sends its flow-run processes, each in a session of its own, a SIGTERM that kills them on the spot: their
    runs stayed Running and RUNNING until a heartbeat ran out."""
    import signal

    import psutil

    try:
        children = psutil.Process(worker_pid).children(recursive=True)
    except psutil.Error:
        return
    running = []
    for child in children:
        try:
            if flow_run_of(child):
                child.send_signal(signal.SIGINT)
                running.append(child)
        except psutil.Error:
            continue  # gone meanwhile
    psutil.wait_procs(running, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    """``prefect-yaml``: rewrite ``prefect.yaml`` from the deployments list."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["prefect-yaml"]:
        print("usage: python -m cnn_train.flows.ops.worker prefect-yaml", file=sys.stderr)
        return 2
    CHECKOUT_PREFECT_YAML.write_text(prefect_yaml(), encoding="utf-8")
    print(f"wrote {CHECKOUT_PREFECT_YAML}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
