"""Pruning against no pruning: the same Optuna study run with ``cnn-train tune`` once per pruner
asked for (the median pruner by default) and once with ``--no-prune``, same space, same TPE seed,
same data.

    .venv/bin/python benchmarks/bench_tune.py [--trials 16] [--sample-limit 6000] [--epochs 8]
        [--pruners median,successive-halving,hyperband] [--max-concurrent 1] [--test-limit N]
        [--startup-trials 4] [--space FIELD=SPEC ...] [--markdown] [--json out.json]

Each arm is one ``cnn-train tune`` process with its own MLflow store, state folder and Optuna
storage, on a temporary Prefect server, as a user without servers runs it; the project's own stores
are never touched. Prints, per arm, the share of trials pruned, the wall time of the command and of
its trials (first trial start to last trial end, from Optuna's timestamps), and the best validation
accuracy; then, per pruner, the two targets: pruning saves at least 40% of the wall time, and its best
trial is within 0.5 points of the unpruned best. The arms run on the CPU, one after the other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from bench import (
    OtherWork, _cpu_model, json_output, private_environment, render_markdown, render_text, stopped_as_by_ctrl_c,
)

BIN = Path(sys.executable).parent
#: A space with hopeless corners (Adam at 0.1 diverges, 1e-5 barely moves in 8 epochs), as real searches have.
SPACE = ("learning_rate=log:1e-5:1e-1", "batch_size=32,64,128")
SAVING_TARGET = 0.40
BEST_GAP_POINTS = 0.5
PRUNERS = ("median", "successive-halving", "hyperband")
UNPRUNED = "unpruned"


@dataclass(frozen=True)
class Arm:
    name: str
    trials: int
    pruned: int
    failed: int
    command_seconds: float
    trial_seconds: float
    best_val_accuracy: float
    best_params: dict[str, Any]
    other_cpu_share: float

    @property
    def pruned_share(self) -> float:
        return self.pruned / self.trials if self.trials else 0.0


def _environment(work: Path, data_dir: str | None) -> dict[str, str]:
    """A private MLflow store and state folder (the Optuna storage lives there); a temporary Prefect server."""
    return private_environment(work, data_dir or None, startup_timeout=180)


def run_arm(name: str, args: argparse.Namespace, work: Path) -> Arm:
    """One ``cnn-train tune`` command; its study read back from its Optuna storage."""
    folder = work / name
    storage = f"sqlite:///{folder / 'optuna.db'}"
    command = [
        str(BIN / "cnn-train"), "tune", *(a for item in args.space for a in ("--space", item)),
        "--trials", str(args.trials), "--max-concurrent", str(args.max_concurrent),
        "--startup-trials", str(args.startup_trials), "--sampler", "tpe", "--seed", str(args.seed),
        "--epochs", str(args.epochs), "--sample-limit", str(args.sample_limit),
        "--study-name", f"bench-{name}", "--storage", storage, "--train-device", "cpu",
        *(("--no-prune",) if name == UNPRUNED else ("--pruner", name)),
    ]
    if args.test_limit:
        command += ["--test-limit", str(args.test_limit)]
    print(f"[{name}] {' '.join(command[1:])}", file=sys.stderr, flush=True)
    other = OtherWork.start()
    started = time.perf_counter()
    done = subprocess.run(command, env=_environment(folder, args.data_dir), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    (folder / "output.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"[{name}] cnn-train tune failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    study = optuna.load_study(study_name=f"bench-{name}", storage=storage)
    trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return Arm(
        name=name,
        trials=len(trials),
        pruned=sum(t.state == TrialState.PRUNED for t in trials),
        failed=sum(t.state == TrialState.FAIL for t in trials),
        command_seconds=seconds,
        trial_seconds=(max(ends) - min(starts)).total_seconds(),
        best_val_accuracy=study.best_value,
        best_params=study.best_params,
        other_cpu_share=other.share(),
    )


def verdicts(pruned: Arm, unpruned: Arm) -> list[list[str]]:
    """The targets for one pruner's arm against the unpruned one (one decimal: 39.8% is not 40%)."""
    saving = 1 - pruned.trial_seconds / unpruned.trial_seconds
    command_saving = 1 - pruned.command_seconds / unpruned.command_seconds
    # Rounded: accuracies are k/n, so a gap of exactly 0.5 points must not fail on float noise (0.5000000000000001).
    gap = round(100 * (unpruned.best_val_accuracy - pruned.best_val_accuracy), 9)
    return [
        [f"{pruned.name}: wall time saved (trials)", f"{saving:.1%}", f">= {SAVING_TARGET:.0%}", "met" if saving >= SAVING_TARGET else "missed"],
        [f"{pruned.name}: wall time saved (whole command)", f"{command_saving:.1%}", "(reported)", ""],
        [f"{pruned.name}: best val accuracy, unpruned - pruned", f"{gap:+.2f} points", f"<= {BEST_GAP_POINTS} points", "met" if gap <= BEST_GAP_POINTS else "missed"],
    ]


def arm_rows(arms: list[Arm]) -> list[list[str]]:
    return [
        [
            arm.name, str(arm.trials), f"{arm.pruned} ({arm.pruned_share:.0%})", str(arm.failed),
            f"{arm.command_seconds:,.0f}", f"{arm.trial_seconds:,.0f}", f"{100 * arm.best_val_accuracy:.2f}%",
            json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in arm.best_params.items()}),
            f"{arm.other_cpu_share:.0%}",
        ]
        for arm in arms
    ]


def _pruners(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PRUNERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown pruner(s) {unknown or [text]}; choose from {', '.join(PRUNERS)}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="Trials per arm (default 16).")
    parser.add_argument("--sample-limit", type=int, default=6000, help="Training + validation images (10%% validation).")
    parser.add_argument("--epochs", type=int, default=8, help="Epochs of a trial that is not pruned.")
    parser.add_argument("--pruners", type=_pruners, default=("median",), help=f"Comma-separated, each one arm: {', '.join(PRUNERS)}.")
    parser.add_argument("--test-limit", type=int, default=None, help="Test images per evaluated trial; default all.")
    parser.add_argument("--max-concurrent", type=int, default=1, help="Trials at once (1: timings free of contention).")
    parser.add_argument("--startup-trials", type=int, default=4, help="Trials never pruned, sampled at random.")
    parser.add_argument("--seed", type=int, default=42, help="Split and TPE seed, the same for both arms.")
    parser.add_argument("--space", action="append", default=None, help=f"FIELD=SPEC (repeatable); default {' '.join(SPACE)}.")
    parser.add_argument("--data-dir", default=None, help="Folder with the Fashion-MNIST files; default: searched for.")
    parser.add_argument("--markdown", action="store_true", help="Print markdown tables.")
    parser.add_argument("--json", type=json_output, default=None, help="Also write the results here.")
    return parser


def main() -> None:
    args = _parser().parse_args()
    args.space = args.space or list(SPACE)
    with tempfile.TemporaryDirectory(prefix="cnn-train-bench-tune-") as folder, stopped_as_by_ctrl_c():
        arms = [run_arm(name, args, Path(folder)) for name in (*args.pruners, UNPRUNED)]
    render = render_markdown if args.markdown else render_text
    print(f"CPU: {_cpu_model()}; {args.trials} trials, {args.sample_limit:,} images, up to {args.epochs} epochs, "
          f"space {' '.join(args.space)}, TPE seed {args.seed}, {args.max_concurrent} at once")
    print(render(["arm", "trials", "pruned", "failed", "command s", "trials s", "best val acc", "best params", "other CPU"], arm_rows(arms)))
    print()
    defaults = _parser().parse_args([])
    if any(getattr(args, name) != getattr(defaults, name) for name in ("trials", "sample_limit", "epochs", "test_limit")):
        print(f"targets are stated for the default configuration ({defaults.trials} trials, {defaults.sample_limit:,} images, "
              f"{defaults.epochs} epochs, all test images); this run is not it, so the verdicts below only show the tool works")
    print(render(["target", "measured", "goal", "verdict"], [row for arm in arms[:-1] for row in verdicts(arm, arms[-1])]))
    if any(arm.other_cpu_share > 0.05 for arm in arms):
        print("warning: other processes took more than 5% of the CPU while an arm ran; the times are not representative")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "arms": [asdict(a) for a in arms]}, indent=2, default=str))


if __name__ == "__main__":
    main()
