"""The courier: a daemon thread per run that delivers its spool (``spool.py``) while the run goes on."""

from __future__ import annotations

import logging
import threading
import time

from cnn_train.flows.tracking.spool import Spool

_log = logging.getLogger(__name__)

#: Longest pause between delivery attempts while the server does not answer.
MAX_BACKOFF_SECONDS = 10.0


class Courier:
    """A daemon thread delivering one spool while its run goes on; training only appends. It ends once its
    spool is gone (delivered and removed at the run's end, or by `cnn-train sync`), so a process that runs
    many runs (a sweep's trials, a study, a Ray worker) keeps no thread per finished run."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mlflow-spool-{spool.run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def nudge(self) -> None:
        self._idle.clear()
        self._wake.set()

    def _run(self) -> None:
        backoff = 0.5
        while True:
            self._wake.wait(timeout=backoff)
            self._wake.clear()
            if not self.spool.path.exists():  # delivered and removed (the run's end, `cnn-train sync`), or deleted
                if self._retire():
                    return
                continue
            try:
                result = self.spool.deliver()
            except Exception:  # noqa: BLE001 - e.g. the spool removed under it; the next pass looks again
                _log.debug("spool of run %s: delivery pass failed", self.spool.run_id, exc_info=True)
                continue
            if result.remaining == 0:
                self._idle.set()
                backoff = 0.5
            else:
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _retire(self) -> bool:
        """Leave this process's couriers, unless an append brought the spool back meanwhile (checked under
        the lock :func:`courier_for` takes, so the next append there gets a courier that runs)."""
        with _COURIERS_LOCK:
            if self.spool.path.exists():
                return False
            if _COURIERS.get(self.spool.run_id) is self:
                del _COURIERS[self.spool.run_id]
            self._idle.set()
            return True

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for everything appended so far to be delivered; returns what is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:  # retired: its spool was gone; nothing here delivers any more
                return self.spool.count()
            self.nudge()
            if self._idle.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic()))) and self.spool.count() == 0:
                return 0
        return self.spool.count()


_COURIERS: dict[str, Courier] = {}
_COURIERS_LOCK = threading.Lock()


def courier_for(uri: str, run_id: str) -> Courier:
    """This process's courier for a run (started on first use; a Ray worker gets its own)."""
    with _COURIERS_LOCK:
        courier = _COURIERS.get(run_id)
        if courier is None or not courier.alive or not courier.spool.path.exists():
            courier = _COURIERS[run_id] = Courier(Spool(run_id, uri=uri))
        return courier


def flush_this_process(timeout: float = 5.0) -> None:
    """Deliver what this process logged (waiting briefly), so a reader here sees its own writes."""
    with _COURIERS_LOCK:
        couriers = list(_COURIERS.values())
    for courier in couriers:
        if courier.spool.count():
            courier.flush(timeout)
