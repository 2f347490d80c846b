"""Trials in threads stop with the flow that runs them (the real commands: tests/test_reliability.py)."""

from __future__ import annotations

import threading
import time

import pytest

from cnn_train.flows.interrupts import (
    deferred,
    interrupt_trials,
    interruptible,
    trials_stop_with_the_flow,
)


def _trial(seen: list[str], started: threading.Event) -> None:
    try:
        with interruptible():
            started.set()
            while True:  # a training that would go on for hours
                time.sleep(0.01)
    except KeyboardInterrupt:
        seen.append("interrupted")


def test_an_interrupted_trial_loop_interrupts_its_trials_and_waits_for_them():
    seen: list[str] = []
    started = [threading.Event() for _ in range(2)]
    trials = [threading.Thread(target=_trial, args=(seen, event), daemon=True) for event in started]
    for trial in trials:
        trial.start()
    assert all(event.wait(10) for event in started)
    with pytest.raises(KeyboardInterrupt), trials_stop_with_the_flow():
        raise KeyboardInterrupt  # the terminal's Ctrl-C, in the flow's main thread
    # Both trials have left their training by the time the interruption goes on.
    assert seen == ["interrupted", "interrupted"]
    for trial in trials:
        trial.join(5)
        assert not trial.is_alive()


def test_a_trial_that_ended_is_not_interrupted_later():
    left, done, seen = threading.Event(), threading.Event(), []

    def finished_trial() -> None:
        with interruptible():
            pass
        left.set()
        try:
            done.wait(5)  # after its training: an interruption now would land in the task's own bookkeeping
        except KeyboardInterrupt:
            seen.append("interrupted")

    trial = threading.Thread(target=finished_trial)
    trial.start()
    assert left.wait(10)
    with pytest.raises(KeyboardInterrupt), trials_stop_with_the_flow():
        raise KeyboardInterrupt
    done.set()
    trial.join(5)
    assert not trial.is_alive() and seen == []


def test_a_failure_is_not_an_interruption():
    seen: list[str] = []
    started = threading.Event()
    trial = threading.Thread(target=_trial, args=(seen, started), daemon=True)
    trial.start()
    assert started.wait(10)
    with pytest.raises(ValueError), trials_stop_with_the_flow():
        raise ValueError("a trial failed")
    time.sleep(0.2)
    assert seen == [] and trial.is_alive()
    assert interrupt_trials(None) == 1  # what an interruption would do to it
    trial.join(5)
    assert seen == ["interrupted"]


def test_an_interruption_waits_for_a_deferred_block_to_end():
    seen: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def trial() -> None:
        try:
            with interruptible():
                with deferred():  # an epoch's records being written
                    inside.set()
                    release.wait(10)
                    seen.append("records written")
                seen.append("after the records")
        except KeyboardInterrupt:
            seen.append("interrupted")

    thread = threading.Thread(target=trial, daemon=True)
    thread.start()
    assert inside.wait(10)
    waiter = threading.Thread(target=interrupt_trials, args=(None,), daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert seen == []  # asked, not yet raised
    release.set()
    waiter.join(10)
    assert seen == ["records written", "interrupted"]
