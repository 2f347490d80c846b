"""Flow runs whose process died without reporting (SIGKILL, an OOM kill, a lost machine): never left
Running, or Pending (their runner died, or could not report, between claiming them and starting them).

Two ways, both measured on Prefect 3.9 (README, "When things go wrong"):

- Prefect's own: every process running cnn-train flows (the serve process, a worker's flow-run
  processes, every cnn-train command) sends a heartbeat event every ``HEARTBEAT_SECONDS``
  (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``), and ``cnn-train up`` creates the "detect zombie flows"
  automation of Prefect's docs for cnn-train's flows: a Running flow run with no heartbeat for
  ``ZOMBIE_AFTER_SECONDS`` is set Crashed by the Prefect server itself, with nothing of cnn-train running.
- cnn-train's: a Running or Pending flow run is orphaned when the process serving it is gone, or its
  MLflow heartbeat stopped (Prefect's automation never sees a Pending one: no heartbeat yet);
  ``cnn-train doctor`` reports it at once, and ``doctor --fix``, ``cnn-train up`` and every flow's
  start set it Crashed and its MLflow runs FAILED.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from cnn_train.flows import tracking
from cnn_train.flows.ops import services
from cnn_train.flows.ops.worker import flow_run_of
from cnn_train.flows.settings import FLOW_HEARTBEAT_SECONDS as HEARTBEAT_SECONDS

if TYPE_CHECKING:
    from prefect.events.schemas.automations import EventTrigger

#: A Running flow run silent this long is set Crashed by the automation (three missed beats).
ZOMBIE_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS
AUTOMATION_NAME = "cnn-train: crash flow runs whose heartbeat stopped"
CRASH_MESSAGE = "its process died without reporting (no heartbeat)"
#: The flows the automation watches: cnn-train's own (``cnn-train``, ``cnn-train-sweep``...), whose
#: processes beat every HEARTBEAT_SECONDS. Other flows on a shared server beat at whatever their
#: processes were given (Prefect's default is 180 s) and are left alone.
WATCHED_FLOWS = ("cnn-train", "cnn-train-*")


def runners() -> tuple[services.Service, ...]:
    """What `cnn-train up` may have started to run flow runs: the serve process, or a worker."""
    return (services.serve_process, services.worker_process)


def zombie_trigger(within_seconds: float = ZOMBIE_AFTER_SECONDS) -> EventTrigger:
    """Prefect docs' "Detect zombie flows" trigger, for the runs of :data:`WATCHED_FLOWS`: after a
    heartbeat, another one or a final state is expected within ``within_seconds``."""
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={
            "prefect.flow-run.heartbeat",
            "prefect.flow-run.Completed",
            "prefect.flow-run.Failed",
            "prefect.flow-run.Cancelled",
            "prefect.flow-run.Crashed",
        },
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        match_related=ResourceSpecification(
            {"prefect.resource.role": "flow", "prefect.resource.name": list(WATCHED_FLOWS)}
        ),
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=within_seconds),
    )


def ensure_zombie_automation(*, within_seconds: float = ZOMBIE_AFTER_SECONDS) -> str | None:
    """Create the automation, or bring one an earlier version created up to date (it watched every
    flow on the server); returns "created", "updated", or None when it was already as it should be."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState

    trigger = zombie_trigger(within_seconds)
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:
        existing = None
    if existing is not None:
        if existing.trigger == trigger:
            return None
        existing.trigger = trigger
        existing.update()
        return "updated"
    Automation(
        name=AUTOMATION_NAME,
        description="A Running cnn-train flow run whose process stopped sending heartbeats is marked Crashed.",
        trigger=trigger,
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"Marked Crashed by cnn-train: {CRASH_MESSAGE}")],
    ).create()
    return "created"


@dataclass(frozen=True)
class Orphan:
    """A Running or Pending flow run nothing is running any more, and how that is known."""

    flow_run_id: str
    state: str  # Running or Pending
    name: str
    reason: str

    @property
    def marked(self) -> str:
        """The line that says it was marked (`doctor --fix`, `up`, `runs`)."""
        return f"flow run {self.name} marked Crashed, its MLflow runs FAILED: {self.reason}"


def orphaned_flow_runs(*, tracking_uri: str | None = None) -> list[Orphan]:
    """Running or Pending flow runs whose process is gone: the serve process that ran them died, their
    process on this machine is gone, or their MLflow heartbeat stopped. A Pending one was claimed by a
    runner that died, or lost the server, before its process reported Running: it would wait forever."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    running = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))
    )
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(flow_run_filter=running, limit=200)
        polled = _polled_pools(client, {run.work_pool_name for run in flow_runs if run.work_pool_name})
    alive = {runner.name for runner in runners() if runner.pid() is not None}
    stale = {run.data.tags.get(tracking.FLOW_RUN_TAG) for run in _stale_mlflow_runs(tracking_uri)}
    running_here = flow_runs_with_a_process()
    orphans = []
    for flow_run in flow_runs:
        reason = _why_orphaned(
            flow_run, runners_alive=alive, polled_pools=polled, stale_flow_runs=stale, running_here=running_here
        )
        if reason:
            orphans.append(Orphan(str(flow_run.id), flow_run.state_type.value.title(), flow_run.name, reason))
    return orphans


def flow_runs_with_a_process() -> set[str]:
    """Ids of the flow runs some process on this machine is running."""
    import psutil

    ids = set()
    for process in psutil.process_iter():
        try:
            if flow_run_id := flow_run_of(process):
                ids.add(flow_run_id)
        except (psutil.Error, OSError):
            continue  # gone meanwhile, or another user's
    return ids


def _polled_pools(client: Any, pools: set[str]) -> set[str]:
    """Which of ``pools`` a worker polls, as Prefect last heard (any machine's worker)."""
    return {
        pool for pool in pools
        if any(worker.status.value == "ONLINE" for worker in client.read_workers_for_work_pool(pool))
    }


def _why_orphaned(
    flow_run: Any, *, runners_alive: set[str], polled_pools: set[str], stale_flow_runs: set[str | None], running_here: set[str]
) -> str | None:
    pool = getattr(flow_run, "work_pool_name", None)
    # A served run is this machine's serve process's. A pool's run is a worker's, on whichever machine polls
    # the pool: while one does, this machine cannot tell the run is gone (its heartbeat will say).
    if pool:
        runner_alive = services.worker_process.name in runners_alive or pool in polled_pools
    else:
        runner_alive = services.serve_process.name in runners_alive
    served_here = flow_run.deployment_id is not None and any(runner.pid_file.exists() for runner in runners())
    if served_here and not runner_alive and str(flow_run.id) not in running_here:
        return "the serve process (or worker) that ran it is gone, and no process here runs it"
    # The process first: a dead pid is the surer reason, and a heartbeat goes stale only a while later.
    if (pid := _process_here(flow_run.infrastructure_pid)) is not None and not _alive(pid):
        return f"its process {pid} is gone"
    if str(flow_run.id) in stale_flow_runs:
        return "its MLflow heartbeat stopped"
    return None


def _process_here(infrastructure_pid: str | None) -> int | None:
    """The pid a flow run's ``HOST:PID`` names, when HOST is this machine."""
    host, _, pid = (infrastructure_pid or "").rpartition(":")
    return int(pid) if pid.isdigit() and host == socket.gethostname() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_mlflow_runs(uri: str | None) -> list[Any]:
    try:
        return tracking.stale_runs(uri=uri)
    except Exception:  # noqa: BLE001 - an unreachable store is doctor's mlflow finding, not this one's
        return []


def crash(orphan: Orphan, *, tracking_uri: str | None = None) -> None:
    """Set the flow run Crashed (saying why) and its unfinished MLflow runs FAILED."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(orphan.flow_run_id, Crashed(message=f"Marked Crashed by cnn-train: {orphan.reason}"), force=True)
    for run in tracking.find_runs_for_flow_run(orphan.flow_run_id, uri=tracking_uri):
        if tracking.mark_unfinished(run.info.run_id, "FAILED", uri=tracking_uri, reason=f"its flow run was marked Crashed: {orphan.reason}"):
            tracking.client(tracking_uri).set_tag(run.info.run_id, tracking.REAPED_TAG, f"flow run {orphan.reason}")


def crash_orphans(*, tracking_uri: str | None = None) -> list[Orphan]:
    """Crash every orphaned flow run; returns them."""
    orphans = orphaned_flow_runs(tracking_uri=tracking_uri)
    for orphan in orphans:
        crash(orphan, tracking_uri=tracking_uri)
    return orphans


def record_this_process() -> None:
    """Name this process as the running flow run's, ``HOST:PID`` as Prefect's process worker does, unless a
    live process here is named: a flow run called in a `cnn-train run` had no process to check, so after a
    SIGKILL doctor said all was well until its MLflow heartbeat was stale (minutes), where a dead pid says so
    at once; and a flow run run again (Retry in the Prefect UI) kept its first attempt's, gone, so the new
    attempt's own start marked it Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    if (pid := _process_here(context.flow_run.infrastructure_pid)) is not None and _alive(pid):
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(context.flow_run.id, infrastructure_pid=f"{socket.gethostname()}:{os.getpid()}")
