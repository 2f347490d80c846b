"""``cnn-train doctor``: what is missing for a run to work, found before a run trips over it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cnn_train.flows import crashes, tracking
from cnn_train.flows.ops import services
from cnn_train.flows.data import DatasetError, locate_fashion_mnist, verify_dataset


@dataclass(frozen=True)
class Finding:
    """One check: what was looked at, whether it is fine, and what to do when it is not."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"{mark} {self.name}: {self.detail}" + (f" -> {self.fix}" if self.fix else "")


def check_prefect_server(api_url: str | None) -> Finding:
    if not api_url:
        return Finding(
            "prefect server",
            False,
            "no PREFECT_API_URL: flows run on temporary servers and deployments cannot be served",
            "run `cnn-train up` (or `cnn-train run` for a one-off run without servers)",
        )
    if services.prefect_api_answers(api_url):
        if refusal := services.prefect_api_refusal(api_url):
            return Finding("prefect server", False, refusal)
        return Finding("prefect server", True, f"{api_url} answers")
    if mistake := services.prefect_api_mistake(api_url):
        return Finding("prefect server", False, mistake)
    return Finding("prefect server", False, f"{api_url} does not answer", "run `cnn-train up`")


def _not_usable(api_url: str | None) -> tuple[str, ...] | None:
    """None when the Prefect API answers and takes this client's credentials; else the fix to suggest:
    `cnn-train up` where nothing answers, none for a refusal (check_prefect_server's line gives its fix)."""
    if not api_url or not services.prefect_api_answers(api_url):
        return ("run `cnn-train up`",)
    return () if services.prefect_api_refusal(api_url) else None


def check_deployment(api_url: str | None, name: str = services.DEPLOYMENT) -> Finding:
    """The deployment exists and something polls for its runs (a serve process or worker)."""
    if (hint := _not_usable(api_url)) is not None:
        return Finding("deployment", False, f"cannot look up {name} without a Prefect server this client can use", *hint)
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return Finding("deployment", False, f"{name} is not deployed", "run `cnn-train up`")
    if deployment.work_pool_name:
        return _check_pool(name, deployment.work_pool_name, api_url)
    status = getattr(deployment.status, "value", deployment.status)
    # Prefect notices a dead serve process (or worker) only after ~60 s without polls; its pid says so at once.
    for runner in crashes.runners():
        if runner.pid_file.exists() and runner.pid() is None:
            label = "serve process" if runner is services.serve_process else runner.name
            return Finding(
                "deployment",
                False,
                f"the {label} of {name} (pid {runner.pid_file.read_text().strip()}) is gone (Prefect still says {status})",
                "run `cnn-train up` to start it again",
            )
    if status == "READY":
        if changed := services.serve_process.code_changed():
            return Finding("deployment", False, f"{name} is served (status READY), but by old code: {changed}")
        return Finding("deployment", True, f"{name} is served (status READY)")
    return Finding(
        "deployment",
        False,
        f"{name} exists but nothing serves it (status {status}); triggered runs would wait in Scheduled",
        "run `cnn-train up` to start the serve process",
    )


def _check_pool(name: str, pool: str, api_url: str) -> Finding:
    """Worker mode (`cnn-train up --worker`): the deployment is on a work pool, and some worker, on this
    machine or another, polls it."""
    from cnn_train.flows.ops import worker

    online = worker.online_workers(pool, api_url)
    if services.worker_process.pid_file.exists() and services.worker_process.pid() is None:
        # Prefect still lists a killed worker online until its heartbeats are missed; its pid says so at once.
        online = [name for name in online if name != worker.worker_name()]
    if online:
        workers = f"{len(online)} worker(s) online: {', '.join(online)}"
        return Finding("deployment", True, f"{name} runs on work pool {pool!r} ({workers})")
    return Finding(
        "deployment",
        False,
        f"{name} is on work pool {pool!r} but no worker polls it; triggered runs would wait in Scheduled",
        f"run `cnn-train up --worker`, or `prefect worker start --pool {pool}` on a machine with cnn-train",
    )


def check_flow_runs(api_url: str | None, tracking_uri: str, *, fix: bool) -> Finding:
    """Prefect flow runs still Running or Pending though their process died: reported, and set Crashed
    (their MLflow runs FAILED) with ``fix``."""
    if (hint := _not_usable(api_url)) is not None:
        return Finding("flow runs", False, "cannot look for orphaned flow runs without a Prefect server this client can use", *hint)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        orphans = crashes.orphaned_flow_runs(tracking_uri=tracking_uri)
        if not orphans:
            return Finding("flow runs", True, "no Running or Pending flow run without a process")
        listed = "; ".join(f"{o.name} ({o.flow_run_id}, {o.state}): {o.reason}" for o in orphans)
        if fix:
            for orphan in orphans:
                crashes.crash(orphan, tracking_uri=tracking_uri)
            return Finding("flow runs", True, f"marked {len(orphans)} orphaned flow run(s) Crashed, their MLflow runs FAILED: {listed}")
    states = " or ".join(sorted({o.state for o in orphans}, reverse=True))  # Running before Pending
    return Finding("flow runs", False, f"{len(orphans)} flow run(s) {states} without a process: {listed}", "run `cnn-train doctor --fix`")


def check_tracking(uri: str) -> Finding:
    server = services.mlflow_server
    if not os.environ.get("MLFLOW_TRACKING_URI") and server.pid_file.exists() and server.pid() is None:
        # Else the check fell back to mlflow.db and said ok, while every served run failed on the missing server.
        return Finding(
            "mlflow", False, f"the MLflow server `cnn-train up` started is not running (its log: {server.log_file}); "
            "the served deployments' runs fail until it is back", "run `cnn-train up --no-trigger`",
        )
    try:
        tracking.check_reachable(uri, timeout=3.0)
    except tracking.TrackingUnavailableError as error:
        return Finding("mlflow", False, str(error))
    return Finding("mlflow", True, f"tracking store {uri}")


def check_dataset(data_dir: Path | None = None) -> Finding:
    """The dataset checked as a run would read it: files present, gzip intact, IDX headers, counts, checksums."""
    try:
        folder = locate_fashion_mnist(data_dir, allow_download=False)
    except DatasetError as error:
        return Finding("dataset", False, str(error))
    problems = verify_dataset(folder)
    if problems:
        return Finding("dataset", False, "; ".join(problems))
    return Finding("dataset", True, f"Fashion-MNIST in {folder} (verified)")


def check_spools(*, fix: bool) -> Finding:
    """Tracking records kept on this machine while MLflow was away: reported, and delivered with ``fix``.
    Those of runs still going are on their way (each run's process delivers its own), not a fault."""
    holding = tracking.waiting_spools()
    waiting = [spool for spool in holding if not spool.owner_alive()]
    if not waiting:
        running = len(holding)
        return Finding("tracking spool", True, "no records left waiting for MLflow" + (
            f" ({running} running run(s) are delivering theirs)" if running else ""
        ))
    if fix:
        left = [(spool, delivery) for spool, delivery in tracking.sync_spools() if delivery.remaining]
        if not left:
            return Finding("tracking spool", True, f"delivered the waiting records of {len(waiting)} run(s)")
        waiting = [spool for spool, _ in left]
    runs = ", ".join(f"{spool.run_id} ({spool.count()} record(s) for {tracking.waiting_on(spool.uri)})" for spool in waiting)
    return Finding(
        "tracking spool",
        False,
        f"records waiting for MLflow: {runs}",
        "run `cnn-train doctor --fix` or `cnn-train sync` once MLflow answers",
    )


def check_stale_runs(uri: str, *, fix: bool, stale_after: float = tracking.STALE_AFTER_SECONDS) -> Finding:
    """RUNNING runs whose process died: reported, and marked FAILED with ``fix``."""
    try:
        stale = tracking.stale_runs(uri=uri, stale_after=stale_after)
    except Exception as error:  # noqa: BLE001 - an unreachable store is reported by check_tracking
        return Finding("stale runs", False, f"could not search {uri}: {error}")
    if not stale:
        return Finding("stale runs", True, "no abandoned RUNNING runs")
    ids = ", ".join(run.info.run_id for run in stale)
    if fix:
        reaped = tracking.reap_stale_runs(uri=uri, stale_after=stale_after)
        return Finding("stale runs", True, f"marked {len(reaped)} abandoned run(s) FAILED: {', '.join(reaped)}")
    return Finding(
        "stale runs", False, f"{len(stale)} run(s) RUNNING without a heartbeat: {ids}", "run `cnn-train doctor --fix`"
    )


def diagnose(*, api_url: str | None, tracking_uri: str, data_dir: Path | None = None, fix: bool = False) -> list[Finding]:
    findings = [
        check_prefect_server(api_url),
        check_deployment(api_url),
        check_tracking(tracking_uri),
        check_dataset(data_dir),
    ]
    # Waiting records go before the reapers: a run whose end is among them is not abandoned.
    findings.append(check_spools(fix=fix))
    if findings[0].ok:
        findings.append(check_flow_runs(api_url, tracking_uri, fix=fix))
    if findings[2].ok:
        findings.append(check_stale_runs(tracking_uri, fix=fix))
    return findings
