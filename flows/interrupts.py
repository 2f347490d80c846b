"""Trials training in this process's threads stop with the flow run that started them.

A Ctrl-C, a SIGTERM or a cancellation from the Prefect UI reaches a process's main thread only.
Prefect's thread-pool task runner then cancels the trials that have not started, and waits for the
ones already training (``ThreadPoolTaskRunner.cancel_all`` shuts its executor down, waiting): a
sweep's or study's trials in threads went on to their last epoch, minutes or hours, and the command
with them. So the flow's trial loop interrupts them (:func:`trials_stop_with_the_flow`): a trial's
body runs inside :func:`trial`, and ``KeyboardInterrupt`` is raised in its thread
(``PyThreadState_SetAsyncExc``, CPython's public C API for this, which Prefect itself uses for its
timeouts in threads). It ends the trial's MLflow run KILLED, as a Ctrl-C does a single run.

Such an exception lands at the thread's next Python line, whatever that line does: inside a logging
handler or a lock it would leave the lock held. So it is raised at once only inside
:func:`interruptible` blocks, a backend training or predicting (where a trial spends its time), and
not inside their :func:`deferred` parts (an epoch's checkpoint and records being written), where it
waits for the part's end; a trial asked to stop anywhere else stops as it enters its next
interruptible block. Trials on Ray are cancelled (``ray.cancel`` raises ``KeyboardInterrupt`` in the
trial's worker) and waited for the same way (:func:`cnn_train.flows.ray_cluster.stop_trials_on_ray`).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

#: How long an interrupted flow waits for its trials to end their MLflow runs before it goes on ending.
WAIT_SECONDS = 30.0


@dataclass
class _Trial:
    flow_run_id: str | None
    ended: threading.Event = field(default_factory=threading.Event)
    #: Depths of the :func:`interruptible` and :func:`deferred` blocks the thread is in.
    interruptible: int = 0
    deferring: int = 0
    #: Asked to stop; and whether the exception was sent to the thread.
    asked: bool = False
    sent: bool = False

    def may_raise_now(self) -> bool:
        return self.asked and not self.sent and self.interruptible > 0 and self.deferring == 0


_trials: dict[int, _Trial] = {}
#: Flow runs whose trials were stopped: a trial of theirs that begins late is asked to stop from the start.
_stopped: set[str] = set()
_lock = threading.Lock()
_local = threading.local()


def _current_flow_run_id() -> str | None:
    from prefect.context import FlowRunContext, TaskRunContext

    task_context = TaskRunContext.get()
    if task_context is not None and task_context.task_run.flow_run_id is not None:
        return str(task_context.task_run.flow_run_id)
    flow_context = FlowRunContext.get()
    return str(flow_context.flow_run.id) if flow_context is not None and flow_context.flow_run else None


def _send(ident: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))


def _withdraw() -> None:
    """Drop an exception sent to this thread and not raised yet (it is raised here instead, or not at all)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)


def _this_trial() -> _Trial | None:
    return getattr(_local, "trial", None)


@contextlib.contextmanager
def trial() -> Iterator[None]:
    """A trial's body in this thread: it stops (``KeyboardInterrupt``) when its flow run is interrupted.
    In the main thread the interruption reaches it anyway, and nothing is registered."""
    if threading.current_thread() is threading.main_thread():
        yield
        return
    ident, this = threading.get_ident(), _Trial(_current_flow_run_id())
    with _lock:
        this.asked = this.flow_run_id in _stopped
        _trials[ident] = this
    _local.trial = this
    try:
        yield
    finally:
        try:
            with _lock:
                _trials.pop(ident, None)
                if this.sent:
                    _withdraw()
        finally:
            _local.trial = None
            this.ended.set()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Inside :func:`trial`: a block an interruption may land in at once (a backend training or predicting)."""
    this = _this_trial()
    if this is None:
        yield
        return
    with _lock:
        asked = this.asked
        if asked:
            this.sent = True
        else:
            this.interruptible += 1
    if asked:  # asked while the trial did something else: it stops here
        raise KeyboardInterrupt
    try:
        yield
    finally:
        with _lock:
            this.interruptible -= 1
            if this.sent and not this.interruptible:
                _withdraw()  # sent as the block ended: not to land outside it


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside :func:`interruptible`: a part an interruption does not land in (an epoch's checkpoint and
    records being written); it is raised as the part ends instead. Elsewhere, a plain block."""
    this = _this_trial()
    if this is None:
        yield
        return
    with _lock:
        on_its_way = this.sent
        this.deferring += not on_its_way
    if on_its_way:  # sent just before this part began: raised here rather than somewhere inside
        _withdraw()
        raise KeyboardInterrupt
    try:
        yield
    finally:
        with _lock:
            this.deferring -= 1
            due = this.may_raise_now()
            this.sent |= due
        if due:
            raise KeyboardInterrupt


def interrupt_trials(flow_run_id: str | None, *, wait_seconds: float = WAIT_SECONDS) -> int:
    """Stop every trial of ``flow_run_id`` in this process's threads (``KeyboardInterrupt`` at once inside
    an interruptible block, else where the next one begins) and wait up to ``wait_seconds`` for them to
    end; returns how many there were."""
    with _lock:
        if flow_run_id is not None:  # outside a flow run there is no "late" to guard against
            _stopped.add(flow_run_id)
        targets = {ident: this for ident, this in _trials.items() if this.flow_run_id == flow_run_id and not this.asked}
        for ident, this in targets.items():
            this.asked = True
            if this.may_raise_now():
                this.sent = True
                _send(ident)
    deadline = time.monotonic() + wait_seconds
    for this in targets.values():
        this.ended.wait(max(0.0, deadline - time.monotonic()))
    return len(targets)


def is_interruption(error: BaseException) -> bool:
    """A Ctrl-C (``KeyboardInterrupt``), or Prefect's ``TerminationSignal`` for SIGTERM and cancellations:
    not an ``Exception``, unlike a failure."""
    return not isinstance(error, Exception)


@contextlib.contextmanager
def trials_stop_with_the_flow(then: Callable[[], None] | None = None) -> Iterator[None]:
    """Around a flow's trial loop: when the flow run is interrupted in it, its trials in this process's
    threads or on Ray are stopped too, and have ended their runs, before ``then`` runs and the interruption goes on."""
    try:
        yield
    except BaseException as error:
        if is_interruption(error):
            interrupt_trials(_current_flow_run_id())
            from cnn_train.flows.ray_cluster import stop_trials_on_ray

            stop_trials_on_ray(WAIT_SECONDS)
            if then is not None:
                then()
        raise
