"""What the flow relies on across epochs: a retried training resumes where it stopped, and a training
stops after the epoch whose callback asked it to (a pruned trial)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from cnn_train.plugins.contract import EpochMetrics
from cnn_train.plugins.conformance.data import SMOKE, train_data
from cnn_train.plugins.conformance.subject import Subject

#: A resumed training's per-epoch losses must match an unbroken one's within this relative tolerance
#: (and 1e-6 absolute): on the CPU with a fixed seed the same arithmetic runs, so only float32 rounding
#: of a differently ordered reduction may differ.
RESUME_RELATIVE_TOLERANCE = 1e-5
#: Epochs trained in one go, and the epoch after which the interrupted training saves and stops.
RESUME_EPOCHS, RESUME_AFTER = 2, 1


class _Interrupted(Exception):
    """Raised from ``on_epoch`` to end a training the way a crashed attempt ends."""


def _losses(epochs: list[EpochMetrics]) -> list[tuple[int, float, float]]:
    return [(m.epoch, m.loss, m.val_loss) for m in epochs]


def check_resume(subject: Subject) -> None:
    """Training N epochs in one go, and training that is interrupted after epoch k (saved as the flow saves,
    from ``on_epoch``), loaded into a fresh instance and resumed with ``initial_epoch=k``, give the same
    per-epoch losses: a retried training really resumes (weights, optimizer state, shuffles)."""
    config = SMOKE.model_copy(update={"epochs": RESUME_EPOCHS})
    data = train_data()
    unbroken: list[EpochMetrics] = []
    subject.built().train(data, config, on_epoch=unbroken.append)

    interrupted = subject.built()
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "checkpoint"

        def save_then_crash(metrics: EpochMetrics) -> None:
            interrupted.save(saved)
            if metrics.epoch == RESUME_AFTER:
                raise _Interrupted

        try:
            interrupted.train(data, config, on_epoch=save_then_crash)
        except _Interrupted:
            pass
        resumed_backend = subject.new()
        resumed_backend.load(saved, subject.reference_config(), device="cpu")
        resumed: list[EpochMetrics] = []
        resumed_backend.train(data, config, on_epoch=resumed.append, initial_epoch=RESUME_AFTER)

    want = _losses(unbroken)[RESUME_AFTER:]
    got = _losses(resumed)
    assert [epoch for epoch, *_ in got] == [epoch for epoch, *_ in want], (
        f"resumed with initial_epoch={RESUME_AFTER}, on_epoch saw epochs {[e for e, *_ in got]}, expected "
        f"{[e for e, *_ in want]}: train must start after initial_epoch"
    )
    for (epoch, *resumed_losses), (_, *unbroken_losses) in zip(got, want, strict=True):
        for name, a, b in zip(("loss", "val_loss"), resumed_losses, unbroken_losses, strict=True):
            assert math.isclose(a, b, rel_tol=RESUME_RELATIVE_TOLERANCE, abs_tol=1e-6), (
                f"epoch {epoch} {name} is {a:.6g} after resuming but {b:.6g} in an unbroken training "
                f"(tolerance {RESUME_RELATIVE_TOLERANCE:g} relative): save and load must keep the optimizer "
                "state, and each epoch's shuffle must depend on the seed and the epoch only"
            )


#: Epochs the stop check asks for, and the epoch after which its callback asks to stop.
STOP_EPOCHS, STOP_AFTER = 3, 2


def check_stops_when_asked(subject: Subject) -> None:
    """A falsy ``on_epoch`` return lets training go on; a truthy one ends it after that epoch, with no
    later epoch trained or reported and the returned history ending there."""
    seen: list[int] = []

    def stop_after_second(metrics: EpochMetrics) -> bool:
        seen.append(metrics.epoch)
        return metrics.epoch >= STOP_AFTER

    history = subject.built().train(
        train_data(), SMOKE.model_copy(update={"epochs": STOP_EPOCHS}), on_epoch=stop_after_second
    )
    want = list(range(1, STOP_AFTER + 1))
    assert seen[:STOP_AFTER] == want, (
        f"on_epoch saw epochs {seen}, expected {want}: returning False after epoch 1 must let training go on"
    )
    assert seen == want, (
        f"on_epoch asked to stop after epoch {STOP_AFTER} of {STOP_EPOCHS}, but training went on "
        f"(on_epoch saw epochs {seen}); return from train after the epoch whose on_epoch returned True"
    )
    reported = [m.epoch for m in history.epochs] if history is not None else None
    assert reported == want, f"train returned a history of epochs {reported} after stopping, expected {want}"
