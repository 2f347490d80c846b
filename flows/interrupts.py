"""Trials training in this process's threads stop with the flow run that started them.

A Ctrl-C, a SIGTERM or a cancellation from the Prefect UI reaches a process's main thread only.
Prefect's thread-pool task runner then cancels the trials that have not started, and waits for the
ones already training (``ThreadPoolTaskRunner.cancel_all`` shuts its executor down, waiting): a
sweep's or study's trials in threads went on to their last epoch, minutes or hours, and the command
with them. So the flow's trial loop interrupts them: each trial's training and evaluation runs inside
:func:`interruptible`, and :func:`trials_stop_with_the_flow` raises ``KeyboardInterrupt`` in those
threads (``PyThreadState_SetAsyncExc``, CPython's public C API for this, which Prefect itself uses
for its timeouts in threads). The exception lands at the trial's next Python line, so within one
training step whatever the backend, except inside a :func:`deferred` block (an epoch's records and
checkpoint being written), where it waits for the block's end; it ends the trial's MLflow run KILLED
as a Ctrl-C does a single run.
Trials on Ray run in Ray's worker processes, which Ray stops with the driver.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

#: How long an interrupted flow waits for its trials to end their MLflow runs before it goes on ending.
WAIT_SECONDS = 30.0


@dataclass
class _Trial:
    flow_run_id: str | None
    ended: threading.Event = field(default_factory=threading.Event)
    #: Depth of :func:`deferred` blocks the thread is in; an interruption then waits for their end.
    deferring: int = 0
    asked: bool = False
    sent: bool = False


_trials: dict[int, _Trial] = {}
_lock = threading.Lock()
_local = threading.local()


def _current_flow_run_id() -> str | None:
    from prefect.context import FlowRunContext, TaskRunContext

    task_context = TaskRunContext.get()
    if task_context is not None and task_context.task_run.flow_run_id is not None:
        return str(task_context.task_run.flow_run_id)
    flow_context = FlowRunContext.get()
    return str(flow_context.flow_run.id) if flow_context is not None and flow_context.flow_run else None


def _raise_in(ident: int | None) -> None:
    """Raise KeyboardInterrupt in thread ``ident`` at its next Python line; None clears one not yet raised
    in this thread."""
    target = threading.get_ident() if ident is None else ident
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None if ident is None else ctypes.py_object(KeyboardInterrupt))


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """The block (a trial's training and evaluation) ends with ``KeyboardInterrupt`` when its flow run
    is interrupted. In the main thread it already does, and nothing is registered."""
    if threading.current_thread() is threading.main_thread():
        yield
        return
    ident, trial = threading.get_ident(), _Trial(_current_flow_run_id())
    with _lock:
        _trials[ident] = trial
    _local.trial = trial
    try:
        yield
    finally:
        try:
            with _lock:
                _trials.pop(ident, None)
                if trial.sent:  # not to land after the block when it ended just as it was sent
                    _raise_in(None)
        finally:
            _local.trial = None
            trial.ended.set()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside :func:`interruptible`, a block an interruption does not land in (records and checkpoints
    being written): it is raised as the block ends instead. Elsewhere, a plain block."""
    trial: _Trial | None = getattr(_local, "trial", None)
    if trial is None:
        yield
        return
    with _lock:
        on_its_way = trial.sent
        trial.deferring += not on_its_way
    if on_its_way:  # sent before this block began: take it here rather than somewhere inside
        _raise_in(None)
        raise KeyboardInterrupt
    try:
        yield
    finally:
        with _lock:
            trial.deferring -= 1
            due = not trial.deferring and trial.asked and not trial.sent
            trial.sent |= due
        if due:
            raise KeyboardInterrupt


def interrupt_trials(flow_run_id: str | None, *, wait_seconds: float = WAIT_SECONDS) -> int:
    """Raise ``KeyboardInterrupt`` in every thread of this process inside :func:`interruptible` for
    ``flow_run_id`` (at once, or as its :func:`deferred` block ends), and wait up to ``wait_seconds`` for
    them to leave it; returns how many there were."""
    with _lock:
        targets = {ident: trial for ident, trial in _trials.items() if trial.flow_run_id == flow_run_id and not trial.asked}
        for ident, trial in targets.items():
            trial.asked = True
            if not trial.deferring:
                trial.sent = True
                _raise_in(ident)
    deadline = time.monotonic() + wait_seconds
    for trial in targets.values():
        trial.ended.wait(max(0.0, deadline - time.monotonic()))
    return len(targets)


@contextlib.contextmanager
def trials_stop_with_the_flow() -> Iterator[None]:
    """Around a flow's trial loop: when the flow run is interrupted in it (``KeyboardInterrupt``, Prefect's
    ``TerminationSignal`` for SIGTERM and cancellations), its trials in this process's threads are
    interrupted too, and have ended their runs, before the interruption goes on."""
    try:
        yield
    except BaseException as error:
        if not isinstance(error, Exception):
            interrupt_trials(_current_flow_run_id())
        raise
