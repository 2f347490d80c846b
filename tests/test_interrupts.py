"""Trials in threads stop with the flow that runs them (the real commands: tests/test_reliability.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from cnn_train.flows.interrupts import deferred, interrupt_trials, interruptible, trial, trials_stop_with_the_flow


def _in_thread(body: Callable[[list[str], threading.Event], None]) -> tuple[threading.Thread, list[str], threading.Event]:
    """``body(seen, ready)`` in a trial thread; what it saw, appended to ``seen``, "interrupted" last if it was."""
    seen: list[str] = []
    ready = threading.Event()

    def run() -> None:
        try:
            with trial():
                body(seen, ready)
        except KeyboardInterrupt:
            seen.append("interrupted")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    return thread, seen, ready


def _training(seen: list[str], ready: threading.Event) -> None:
    with interruptible():  # a backend's training loop, for hours
        ready.set()
        while True:
            time.sleep(0.01)


def test_an_interrupted_trial_loop_stops_its_training_trials_and_waits_for_them():
    trials = [_in_thread(_training) for _ in range(2)]
    with pytest.raises(KeyboardInterrupt), trials_stop_with_the_flow():
        raise KeyboardInterrupt  # the terminal's Ctrl-C, in the flow's main thread
    # Both have stopped by the time the interruption goes on.
    assert [seen for _, seen, _ in trials] == [["interrupted"], ["interrupted"]]


def test_a_trial_asked_outside_its_training_stops_where_the_next_training_begins():
    go_on = threading.Event()

    def logging_a_model(seen: list[str], ready: threading.Event) -> None:
        ready.set()
        go_on.wait(10)  # not interruptible: a model being logged, a line being logged
        seen.append("model logged")
        with interruptible():
            seen.append("evaluated")

    thread, seen, _ = _in_thread(logging_a_model)
    waiter = threading.Thread(target=interrupt_trials, args=(None,), daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert seen == []
    go_on.set()
    waiter.join(10)
    assert seen == ["model logged", "interrupted"]


def test_an_interruption_waits_for_a_deferred_part_to_end():
    release = threading.Event()

    def epoch_end(seen: list[str], ready: threading.Event) -> None:
        with interruptible():
            with deferred():  # an epoch's checkpoint and records being written
                ready.set()
                release.wait(10)
                seen.append("records written")
            seen.append("next epoch")

    thread, seen, _ = _in_thread(epoch_end)
    waiter = threading.Thread(target=interrupt_trials, args=(None,), daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert seen == []  # asked, not yet raised
    release.set()
    waiter.join(10)
    assert seen == ["records written", "interrupted"]


def test_a_trial_that_ended_is_not_interrupted_later():
    done = threading.Event()
    seen_after: list[str] = []

    def finished(seen: list[str], ready: threading.Event) -> None:
        with interruptible():
            pass
        ready.set()

    thread, seen, _ = _in_thread(finished)
    thread.join(5)

    def after() -> None:
        try:
            done.wait(5)  # the task's own bookkeeping, after the trial
        except KeyboardInterrupt:
            seen_after.append("interrupted")

    bookkeeping = threading.Thread(target=after)
    bookkeeping.start()
    assert interrupt_trials(None) == 0
    done.set()
    bookkeeping.join(5)
    assert seen == [] and seen_after == []


def test_a_failure_is_not_an_interruption():
    thread, seen, _ = _in_thread(_training)
    with pytest.raises(ValueError), trials_stop_with_the_flow():
        raise ValueError("a trial failed")
    time.sleep(0.2)
    assert seen == [] and thread.is_alive()
    assert interrupt_trials(None) == 1  # what an interruption would do to it
    thread.join(5)
    assert seen == ["interrupted"]
