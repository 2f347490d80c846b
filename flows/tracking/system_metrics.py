"""CPU, memory, disk and network (and GPU utilisation and memory, where one is used) over time for
every run, with MLflow's own system-metrics monitor: the MLflow UI shows them on the run's
"System metrics" tab as ``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``...

MLflow's monitor stops for good at the first sample it cannot deliver; the heartbeat, which notices
the server coming back, calls :meth:`SystemMetrics.resume` to go on from the next step.
"""

from __future__ import annotations

import logging
import threading

from cnn_train.flows.settings import env_number

_log = logging.getLogger(__name__)

#: Seconds between samples (MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL still wins when set).
SAMPLING_SECONDS = env_number("CNN_TRAIN_SYSTEM_METRICS_SECONDS", 5.0, minimum=0.1)


class SystemMetrics:
    """MLflow's system-metrics monitor for one run, by id (no fluent run is started)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self._monitor = None

    def start(self, *, resume: bool = False) -> None:
        try:
            # Needs psutil (a dependency); GPU metrics also need nvidia-ml-py, and are skipped without a GPU.
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=SAMPLING_SECONDS, resume_logging=resume, tracking_uri=self.uri
            )
            self._monitor.start()
        except Exception:  # noqa: BLE001 - missing system metrics must never stop a run
            _log.warning("system metrics for run %s are not recorded", self.run_id, exc_info=True)
            self._monitor = None

    def resume(self) -> None:
        """Start again after an outage, continuing the step count."""
        self.stop()
        self.start(resume=True)

    def stop(self, *, timeout: float = 5.0) -> None:
        """Stop sampling; waits at most ``timeout`` seconds (the monitor may be stuck retrying a dead server)."""
        if self._monitor is not None:
            stopping = threading.Thread(target=self._monitor.finish, name="system-metrics-stop", daemon=True)
            stopping.start()
            stopping.join(timeout)
            self._monitor = None
