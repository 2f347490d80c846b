"""Benchmark cnn-train against the lesson's CNN trained bare, on the same data, seed and epochs.

    .venv/bin/python benchmarks/bench.py [--epochs 10] [--sample-limit N] [--test-limit N]
        [--repeats R] [--skip-servers] [--recipe-epochs N] [--markdown] [--json out.json]

Runs, each in a fresh process: a plain PyTorch loop and a plain Keras ``fit`` (``bare.py``); the
real ``cnn-train`` flow for the torch and keras backends, with MLflow logging (a temporary SQLite
store) and reports; the same flow with the opt-in improved recipe (``architecture=cnn-improved``,
its own epochs) against the default run's wall time; ``prepare_data`` with its cache emptied and then filled; and, unless
``--skip-servers``, ``cnn-train up`` in a temporary root, with ``cnn-train/default`` triggered to
time trigger -> first training step; a small ``cnn-train run`` (COMMAND), timed before and after its
flow run. An fp32 matmul measures the machine's peak in the same run, and a bf16 one where the CPU
computes bfloat16 natively (where the recipe's ``auto`` precision picks it).
Prints one table and whether each target is met. Defaults (10 epochs, all 70,000 images) take
about 30 minutes on 2 cores. Nothing touches the project's own MLflow store, cache or servers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from cnn_train.flows.placement import cpu_flags, training_precision
from cnn_train.flows.signatures import add_arguments, declared_type

import flops
from cnn_train.plugins.config import IMPROVED_ARCHITECTURE, IMPROVED_TRAINING, ModelConfig
from probes import TRIGGER_SAMPLE_LIMIT, TRIGGER_TEST_LIMIT

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
BACKENDS = ("torch", "keras")
RECIPE_KEY = "cnn-train-torch-recipe"
#: The default deployment's run: the torch backend with the dense comparison that `cnn-train up` serves it with.
DEPLOYMENT_KEY = "cnn-train-torch-deployment"


def recipe_key(seed: int) -> str:
    """The variant key of the recipe's run with ``seed``."""
    return f"{RECIPE_KEY}-seed{seed}"
SUBPROCESS_TIMEOUT = 1800.0
#: The smallest matmul side --peak-size takes: at 256 three repeats gave 0.8-2 GFLOP/s fp32 here.
MIN_PEAK_SIZE = 512
EPOCH_TIMEOUT = 300.0
#: More CPU than this taken by other processes makes the timings unrepresentative.
BUSY_SHARE = 0.05


class BenchError(RuntimeError):
    """A measured process failed; the message carries the end of its output."""


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What every variant trains on: the same split, seed and number of epochs."""

    epochs: int = 10
    sample_limit: int | None = None
    test_limit: int | None = None
    repeats: int = 3
    skip_servers: bool = False
    seed: int = 42
    validation_fraction: float = 0.1
    data_dir: str | None = None
    peak_size: int = 4096
    #: Epochs of the opt-in improved recipe's run (its own default); 0 leaves the recipe out.
    recipe_epochs: int = IMPROVED_TRAINING["epochs"]
    #: The recipe runs once per seed: its accuracy target is a mean over seeds, not one draw.
    recipe_seeds: tuple[int, ...] = (0, 1, 2)
    #: A running Prefect server the flows record on; None: a temporary one per run, as `cnn-train run` starts.
    prefect_api_url: str | None = None

    def split_args(self, seed: int | None = None) -> list[str]:
        """The data and seed options every variant shares; ``seed`` replaces the benchmark's own."""
        args = ["--seed", str(self.seed if seed is None else seed), "--validation-fraction", str(self.validation_fraction)]
        if self.sample_limit is not None:
            args += ["--sample-limit", str(self.sample_limit)]
        if self.test_limit is not None:
            args += ["--test-limit", str(self.test_limit)]
        if self.data_dir is not None:
            args += ["--data-dir", self.data_dir]
        return args

    @property
    def is_target_configuration(self) -> bool:
        """The issue's targets are stated for 10 epochs on all the data (batch 32 is fixed)."""
        return self.epochs == 10 and self.sample_limit is None and self.test_limit is None

    def describe(self) -> str:
        images = "all 60,000 training images" if self.sample_limit is None else f"sample_limit={self.sample_limit}"
        test = "all 10,000 test images" if self.test_limit is None else f"test_limit={self.test_limit}"
        return (
            f"{self.epochs} epoch(s), batch 32, Adam 1e-3, seed {self.seed}, {images} "
            f"({self.validation_fraction:.0%} held out for validation), {test}, CPU"
            + (
                f"; the improved recipe: {self.recipe_epochs} epoch(s) of its own training, seeds "
                + ", ".join(map(str, self.recipe_seeds))
                if self.recipe_epochs
                else ""
            )
            + (f"; flows recorded on the running Prefect server {self.prefect_api_url}" if self.prefect_api_url else "")
        )


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of training the model, and what it measured.

    ``run_wall``: bare, the script's body (prepare data, build, train, test); cnn-train, the Prefect
    flow run from start to end. ``train_seconds``: the epochs as the trainer timed them (cnn-train's
    include the per-epoch validation pass that its ``fit`` does). ``train_only_seconds``: the
    training phase of those epochs alone, which images/s is computed from.
    """

    name: str
    process_wall: float
    run_wall: float
    train_seconds: float
    train_only_seconds: float
    images_trained: int
    test_accuracy: float
    details: dict[str, Any] = field(default_factory=dict)
    #: cnn-train's backend (None for the bare variants).
    backend: str | None = None
    #: Whether it trains the lesson's model in fp32, so that its share of the fp32 peak means something.
    fp32_reference: bool = True

    @property
    def images_per_second(self) -> float:
        return self.images_trained / self.train_only_seconds

    @property
    def overhead(self) -> float:
        """(run wall - training time) / training time."""
        return (self.run_wall - self.train_seconds) / self.train_seconds


@dataclass(frozen=True)
class Measurements:
    """Everything one benchmark run measured; timings in seconds."""

    peak: flops.Peak
    train_flops_per_image: int
    variants: dict[str, Variant]
    prep_cold: list[float]
    prep_cached: list[float]
    trigger_to_first_step: dict[str, list[float]]
    stack: dict[str, Any]
    #: Share of the machine's CPU time used by other work while the variants trained.
    foreign_cpu_share: float = 0.0
    #: Each small `cnn-train run` (COMMAND): seconds before its flow run began and after it ended.
    command: list[dict[str, float]] = field(default_factory=list)
    #: What the recipe's precision "auto" picks on this CPU, and why.
    precision: tuple[str, str] = ("float32", "")
    #: The best bfloat16 matmul rate; None where bfloat16 would be emulated (minutes per matmul, not measured).
    bf16_peak: flops.Peak | None = None


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# --- running measured processes ------------------------------------------------------------------


def private_environment(work: Path, data_dir: str | None, *, startup_timeout: int) -> dict[str, str]:
    """A private MLflow store, state folder and Prefect home under ``work``; no Prefect server
    configured, so the flow starts a temporary one (given ``startup_timeout`` seconds) as ``cnn-train
    run`` does; telemetry off. Shared by the benchmarks so each measures in the same isolation."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env |= {
        "CNN_TRAIN_STATE_DIR": str(work / "state"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(startup_timeout),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    if data_dir is not None:
        env["CNN_TRAIN_DATA_DIR"] = data_dir
    return env


def base_environment(work: Path, settings: Settings) -> dict[str, str]:
    """The private environment, with this folder on PYTHONPATH for the probe scripts."""
    env = private_environment(work, settings.data_dir, startup_timeout=120)
    if settings.prefect_api_url:
        env["PREFECT_API_URL"] = settings.prefect_api_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    return env


@dataclass(frozen=True)
class ProbeRun:
    result: dict[str, Any]
    launched_at: float
    process_wall: float


def run_script(
    script: str, args: Sequence[str], *, env: dict[str, str], out: Path, timeout: float = SUBPROCESS_TIMEOUT
) -> ProbeRun:
    """Run ``benchmarks/<script>`` in a fresh interpreter; it writes its JSON result to ``out``."""
    out.unlink(missing_ok=True)
    command = [sys.executable, str(HERE / script), *args, "--out", str(out)]
    launched_at = time.time()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    process_wall = time.time() - launched_at
    if completed.returncode != 0 or not out.is_file():
        output = (completed.stdout + completed.stderr)[-4000:]
        raise BenchError(f"{' '.join(command[1:])} failed (exit {completed.returncode}):\n{output}")
    return ProbeRun(json.loads(out.read_text()), launched_at, process_wall)


@dataclass(frozen=True)
class OtherWork:
    """How much CPU processes other than this benchmark and its children take: the machine's busy
    time (``/proc/stat``, including time the hypervisor stole) minus our own (``getrusage``)."""

    wall: float
    machine_busy: float
    ours: float

    @staticmethod
    def _machine_busy() -> float:
        user, nice, system, idle, iowait, irq, softirq, steal = map(
            int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        )
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        usages = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        return sum(usage.ru_utime + usage.ru_stime for usage in usages)

    @classmethod
    def start(cls) -> OtherWork:
        try:
            return cls(time.monotonic(), cls._machine_busy(), cls._ours())
        except (OSError, ValueError):
            return cls(time.monotonic(), math.nan, math.nan)

    def share(self) -> float:
        """Other processes' share of all CPU time since :meth:`start` (NaN where /proc is missing)."""
        try:
            busy = self._machine_busy() - self.machine_busy
        except (OSError, ValueError):
            return math.nan
        capacity = (time.monotonic() - self.wall) * (os.cpu_count() or 1)
        return max(0.0, busy - (self._ours() - self.ours)) / capacity


def _training_timeout(settings: Settings) -> float:
    return SUBPROCESS_TIMEOUT + settings.epochs * EPOCH_TIMEOUT


# --- the measurements ----------------------------------------------------------------------------


def measure_prep(settings: Settings, env: dict[str, str], work: Path) -> tuple[list[float], list[float]]:
    """``prepare_data`` in fresh processes: ``repeats`` times with its cache emptied, then cached."""
    cache = work / "prep-cache"
    args = ["prep", *settings.split_args(), "--cache-dir", str(cache)]
    cold = []
    for _ in range(settings.repeats):
        shutil.rmtree(cache, ignore_errors=True)
        cold.append(run_script("probes.py", args, env=env, out=work / "prep.json").result["seconds"])
    cached = [
        run_script("probes.py", args, env=env, out=work / "prep.json").result["seconds"]
        for _ in range(settings.repeats)
    ]
    return cold, cached


def run_bare(framework: str, settings: Settings, env: dict[str, str], work: Path) -> Variant:
    run = run_script(
        "bare.py",
        [framework, "--epochs", str(settings.epochs), *settings.split_args()],
        env=env,
        out=work / f"bare-{framework}.json",
        timeout=_training_timeout(settings),
    )
    result = run.result
    train_seconds = sum(result["epoch_seconds"])
    return Variant(
        name=f"bare {'PyTorch loop' if framework == 'torch' else 'Keras fit'}",
        process_wall=run.process_wall,
        run_wall=result["run_wall_seconds"],
        train_seconds=train_seconds,
        train_only_seconds=train_seconds,
        images_trained=result["train_images"] * result["epochs"],
        test_accuracy=result["test_accuracy"],
        details={"epoch_seconds": result["epoch_seconds"]},
    )


def run_flow(
    backend: str, settings: Settings, env: dict[str, str], work: Path, *, architecture: str = "cnn",
    seed: int | None = None, compare_dense: bool = False,
) -> Variant:
    """The cnn-train flow in a fresh process. With ``compare_dense`` (the default deployment's setting),
    the dense network's epochs count as training time too; images/s stays the CNN's own."""
    recipe = architecture == IMPROVED_ARCHITECTURE
    epochs = settings.recipe_epochs if recipe else settings.epochs
    run = run_script(
        "probes.py",
        [
            "flow", "--backend", backend, "--architecture", architecture, "--epochs", str(epochs),
            *(["--compare-dense"] if compare_dense else []), *settings.split_args(seed),
        ],
        env=env,
        out=work / f"flow-{backend}-{architecture}{'-dense' if compare_dense else ''}"
        f"{'' if seed is None else f'-seed{seed}'}.json",
        timeout=_training_timeout(settings) * (1.5 if compare_dense else 1),
    )
    result = run.result
    images = result["train_images"]
    train_only = sum(images / rate for rate in result["images_per_second"])
    dense_epochs = result["dense"]["epoch_seconds"] if result.get("dense") else []
    if recipe:
        name = f"cnn-train {backend}, {architecture}" + ("" if seed is None else f", seed {seed}")
    else:
        name = f"cnn-train {backend}" + (", deployment defaults (dense compared)" if compare_dense else "")
    return Variant(
        name=name,
        process_wall=run.process_wall,
        run_wall=result["flow_end"] - result["flow_start"],
        train_seconds=sum(result["epoch_seconds"]) + sum(dense_epochs),
        train_only_seconds=train_only,
        images_trained=images * len(result["images_per_second"]),
        test_accuracy=result["test_accuracy"],
        details={
            "epoch_seconds": result["epoch_seconds"],
            "dense_epoch_seconds": dense_epochs,
            "images_per_second": result["images_per_second"],
            "task_seconds": result["task_seconds"],
            "imports_seconds": result["imported_at"] - run.launched_at,
            "launch_to_flow_start_seconds": result["flow_start"] - run.launched_at,
            # The probe's read-back of the timings is the benchmark's work, not the command's.
            "after_flow_end_seconds": run.launched_at + run.process_wall - result["flow_end"]
            - (result["measured_at"] - result["returned_at"]),
            "mlflow_run_wall_seconds": (result["mlflow_end"] or result["flow_end"]) - result["mlflow_start"],
            "flow_run_id": result["flow_run_id"],
            "prefect_api_url": env.get("PREFECT_API_URL"),
            "mlflow_run_id": result["mlflow_run_id"],
            "precision": result["precision"],
            "precision_reason": result["precision_reason"],
        },
        backend=backend,
        fp32_reference=not recipe,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_stack(work: Path, env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """``cnn-train up --no-trigger`` in a temporary project root, home and pair of ports; ``down`` after."""
    root = work / "stack"
    root.mkdir(parents=True, exist_ok=True)  # a project root must exist
    stack_env = {k: v for k, v in env.items() if k not in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", "CNN_TRAIN_STATE_DIR")}
    stack_env |= {
        "CNN_TRAIN_ROOT": str(root),
        "HOME": str(root / "home"),  # the Prefect profile `up` writes stays in here
        "CNN_TRAIN_PREFECT_PORT": str(_free_port()),
        "CNN_TRAIN_MLFLOW_PORT": str(_free_port()),
    }
    started = time.time()
    up = subprocess.run(
        [str(BIN / "cnn-train"), "up", "--no-trigger"], env=stack_env, capture_output=True, text=True,
        timeout=600, check=False,
    )
    up_seconds = time.time() - started
    try:
        if up.returncode != 0:
            raise BenchError(f"cnn-train up failed (exit {up.returncode}):\n{(up.stdout + up.stderr)[-4000:]}")
        yield {"env": stack_env, "up_seconds": up_seconds}
    finally:
        subprocess.run(
            [str(BIN / "cnn-train"), "down"], env=stack_env, capture_output=True, text=True, timeout=300, check=False
        )


def measure_trigger(settings: Settings, env: dict[str, str], work: Path) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Trigger ``cnn-train/default`` ``repeats`` times per backend on a running stack, one run at a time."""
    with running_stack(work, env) as stack:
        stack_env = stack["env"]
        mlflow_url = f"http://127.0.0.1:{stack_env['CNN_TRAIN_MLFLOW_PORT']}"
        trigger_env = stack_env | {"PREFECT_API_URL": f"http://127.0.0.1:{stack_env['CNN_TRAIN_PREFECT_PORT']}/api"}
        split = ["--seed", str(settings.seed), "--validation-fraction", str(settings.validation_fraction)]
        # Warm the stack's data cache, as any earlier run would have: this times the trigger, not a parse.
        warm = ["prep", *split, "--sample-limit", str(TRIGGER_SAMPLE_LIMIT), "--test-limit", str(TRIGGER_TEST_LIMIT)]
        run_script("probes.py", warm, env=stack_env, out=work / "warm.json")
        timings: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
        runs = []
        for _ in range(settings.repeats):
            for backend in BACKENDS:
                log(f"trigger cnn-train/default with backend={backend}")
                result = run_script(
                    "probes.py",
                    ["trigger", "--backend", backend, "--mlflow-url", mlflow_url],
                    env=trigger_env,
                    out=work / "trigger.json",
                ).result
                timings[backend].append(result["trigger_to_first_step"])
                runs.append({"backend": backend, **result})
    return timings, {"up_seconds": stack["up_seconds"], "triggers": runs}


#: The issue's small run: about a second of training, so the time around the flow run shows.
COMMAND_SAMPLE_LIMIT = 2000
COMMAND = f"cnn-train run --epochs 1 --sample-limit {COMMAND_SAMPLE_LIMIT}"
_FLOW_BEGINS = re.compile(r"Flow run '[^']+' - Beginning flow run")
_FLOW_ENDS = re.compile(r"Flow run '[^']+' - Finished in state")


def time_command(args: Sequence[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cnn-train ARGS`` and time it from its output as it arrives (Prefect logs each line as it
    happens): launch to the flow run's first line, that to its last, and that to the process's exit."""
    launched = time.monotonic()
    marks: dict[str, float] = {}
    process = subprocess.Popen(
        [str(BIN / "cnn-train"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "begins" not in marks and _FLOW_BEGINS.search(line):
            marks["begins"] = time.monotonic()
        elif _FLOW_ENDS.search(line):
            marks["ends"] = time.monotonic()
    exited = time.monotonic()
    if process.wait() != 0 or len(marks) != 2:
        raise BenchError(f"cnn-train {' '.join(args)} failed (exit {process.returncode}):\n{''.join(lines)[-4000:]}")
    return {
        "before_flow_seconds": marks["begins"] - launched,
        "flow_seconds": marks["ends"] - marks["begins"],
        "after_flow_seconds": exited - marks["ends"],
    }


def measure_command(settings: Settings, env: dict[str, str]) -> list[dict[str, float]]:
    """The issue's small `cnn-train run`, ``repeats`` times: what the command spends outside its flow run
    (on fewer images when the benchmark's own sample limit is smaller)."""
    limit = min(settings.sample_limit or COMMAND_SAMPLE_LIMIT, COMMAND_SAMPLE_LIMIT)
    args = [
        "run", "--epochs", "1", "--sample-limit", str(limit),
        *(["--test-limit", str(settings.test_limit)] if settings.test_limit else []),
        *(["--data-dir", settings.data_dir] if settings.data_dir else []),
    ]
    return [time_command(args, env) for _ in range(settings.repeats)]


def measure(settings: Settings, work: Path) -> Measurements:
    env = base_environment(work, settings)
    others = OtherWork.start()
    flops.check_reference_model()
    train_flops = flops.training_flops(ModelConfig())

    log("creating the temporary MLflow store and Prefect database")
    run_script("probes.py", ["init"], env=env, out=work / "init.json")
    precision = training_precision("auto", "cpu")
    native_bf16 = precision[0] == "bfloat16"
    log(f"fp32{' and bf16' if native_bf16 else ''} peak: {settings.peak_size}x{settings.peak_size} matmul")
    peak_before = flops.matmul_peak(settings.peak_size)
    bf16_peaks = [flops.matmul_peak(settings.peak_size, dtype="bfloat16")] if native_bf16 else []
    log("data prep, cold and cached")
    prep_cold, prep_cached = measure_prep(settings, env, work)
    run_script("probes.py", ["prep", *settings.split_args()], env=env, out=work / "warm.json")

    variants = {}
    for framework in BACKENDS:
        log(f"bare {framework}")
        variants[f"bare-{framework}"] = run_bare(framework, settings, env, work)
    for backend in BACKENDS:
        log(f"cnn-train flow, backend {backend}")
        variants[f"cnn-train-{backend}"] = run_flow(backend, settings, env, work)
    log("cnn-train flow with the default deployment's parameters: backend torch, the dense comparison")
    variants[DEPLOYMENT_KEY] = run_flow("torch", settings, env, work, compare_dense=True)
    for seed in settings.recipe_seeds if settings.recipe_epochs else ():
        log(f"cnn-train flow, backend torch, the improved recipe ({settings.recipe_epochs} epochs, seed {seed})")
        variants[recipe_key(seed)] = run_flow("torch", settings, env, work, architecture=IMPROVED_ARCHITECTURE, seed=seed)

    log(f"{COMMAND}, {settings.repeats} times: the time around the flow run")
    command = measure_command(settings, env)
    foreign_cpu_share = others.share()

    triggers: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
    stack: dict[str, Any] = {}
    if not settings.skip_servers:
        log("cnn-train up, then trigger -> first training step")
        triggers, stack = measure_trigger(settings, env, work)

    log(f"fp32{' and bf16' if native_bf16 else ''} peak again")
    peak_after = flops.matmul_peak(settings.peak_size)
    peak = max(peak_before, peak_after, key=lambda p: p.gflops)
    if bf16_peaks:
        bf16_peaks.append(flops.matmul_peak(settings.peak_size, dtype="bfloat16"))
    bf16_peak = max(bf16_peaks, key=lambda p: p.gflops, default=None)
    return Measurements(
        peak, train_flops, variants, prep_cold, prep_cached, triggers, stack, foreign_cpu_share, command,
        precision, bf16_peak,
    )


# --- the table -----------------------------------------------------------------------------------

COLUMNS = (
    "variant",
    "process wall s",
    "run wall s",
    "train s",
    "train img/s",
    "overhead",
    "prep cold s",
    "prep cached s",
    "trigger→1st step s",
    "test acc",
    "fp32 peak",
)

LEGEND = (
    "process wall: launch to exit of a fresh process (imports; cnn-train also starts a temporary Prefect server)",
    "run wall: bare, the script body (prepare data, build, train, test); cnn-train, the Prefect flow run, start to end",
    "train: sum of the epochs as the trainer timed them (cnn-train's include its per-epoch validation pass; "
    "with the dense comparison, the dense network's epochs too)",
    "train img/s: training images x epochs / seconds of the training phase (validation excluded)",
    "overhead: (run wall - train) / train; for cnn-train this is the orchestration overhead",
    "prep: prepare_data in a fresh process, cache emptied (cold) and filled (cached); median of the repeats",
    "trigger→1st step: run_deployment(cnn-train/default) to the first epoch's start, servers up; median",
    "fp32 peak: train img/s x training FLOPs per image / the best fp32 matmul rate measured in this run "
    "(none for the recipe, whose network differs from the lesson's)",
)


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else format(value, pattern)


def table_rows(m: Measurements) -> list[list[str]]:
    peak_flops = m.peak.gflops * 1e9
    rows = []
    for key, variant in m.variants.items():
        is_flow = variant.backend is not None
        default_run = key in (f"cnn-train-{name}" for name in BACKENDS)
        rows.append([
            variant.name,
            _fmt(variant.process_wall, ".1f"),
            _fmt(variant.run_wall, ".1f"),
            _fmt(variant.train_seconds, ".1f"),
            _fmt(variant.images_per_second, ".0f"),
            _fmt(variant.overhead, ".1%"),
            _fmt(median(m.prep_cold) if is_flow else None, ".2f"),
            _fmt(median(m.prep_cached) if is_flow else None, ".2f"),
            _fmt(median(m.trigger_to_first_step[variant.backend]) if default_run else None, ".1f"),
            _fmt(variant.test_accuracy, ".2%"),
            _fmt(
                variant.images_per_second * m.train_flops_per_image / peak_flops if variant.fp32_reference else None,
                ".1%",
            ),
        ])
    return rows


def breakdown_lines(m: Measurements) -> list[str]:
    """Where each cnn-train run's time went outside the epochs: what the overhead is made of."""
    lines = []
    for key, variant in m.variants.items():
        details = variant.details
        if "task_seconds" not in details:
            continue
        tasks = details["task_seconds"]
        train_task_rest = tasks.get("train", 0.0) - variant.train_seconds
        other = variant.run_wall - variant.train_seconds - train_task_rest - sum(
            seconds for task, seconds in tasks.items() if task != "train"
        )
        dense = details.get("dense_epoch_seconds") or []
        epochs = f"epochs {variant.train_seconds:.1f}" + (f" (the dense network's {sum(dense):.1f})" if dense else "")
        lines.append(
            f"{variant.name}: flow run {variant.run_wall:.1f} s = {epochs}"
            f" + train task outside the epochs {train_task_rest:.1f} (build, checkpoints, model logging)"
            f" + prep {tasks.get('prep', 0.0):.1f} + evaluate {tasks.get('evaluate', 0.0):.1f}"
            f" + report {tasks.get('report', 0.0):.1f} + the rest {other:.1f} (flow start, parameter checks that"
            f" import the backend, MLflow run start, task scheduling); the process also spent {details['launch_to_flow_start_seconds']:.1f} s before the flow"
            f" run started (imports {details['imports_seconds']:.1f} s, "
            f"{'the running Prefect server' if details.get('prefect_api_url') else 'temporary Prefect server'}) and"
            f" {details['after_flow_end_seconds']:.1f} s after it ended; it trained in {details['precision']}"
            f" ({details['precision_reason']})"
        )
    if m.command:
        runs = "; ".join(
            f"{run['before_flow_seconds']:.1f} s before + {run['after_flow_seconds']:.1f} s after a {run['flow_seconds']:.1f} s flow run"
            for run in m.command
        )
        lines.append(f"`{COMMAND}`, outside its flow run: {runs}")
    return lines


@dataclass(frozen=True)
class Target:
    what: str
    goal: str
    measured: str
    met: bool | None


def _ratio_target(what: str, goal: str, value: float | None, limit: float, *, at_most: bool, pattern: str) -> Target:
    if value is None:
        return Target(what, goal, "not measured", None)
    met = value <= limit if at_most else value >= limit
    return Target(what, goal, format(value, pattern), met)


def targets(m: Measurements) -> list[Target]:
    v = m.variants
    torch_rate = v["cnn-train-torch"].images_per_second
    found = [
        _ratio_target(
            f"orchestration overhead, {backend}", "<= 3% of training", v[f"cnn-train-{backend}"].overhead, 0.03,
            at_most=True, pattern=".1%",
        )
        for backend in BACKENDS
    ]
    if DEPLOYMENT_KEY in v:
        found.append(
            _ratio_target(
                "orchestration overhead, torch, deployment defaults (dense epochs counted as training)",
                "<= 3% of training", v[DEPLOYMENT_KEY].overhead, 0.03, at_most=True, pattern=".1%",
            )
        )
    found += [
        _ratio_target(
            "torch backend img/s / bare PyTorch loop", ">= 0.97x", torch_rate / v["bare-torch"].images_per_second,
            0.97, at_most=False, pattern=".3f",
        ),
        _ratio_target(
            "keras backend img/s / torch backend", ">= 0.9x", v["cnn-train-keras"].images_per_second / torch_rate,
            0.9, at_most=False, pattern=".3f",
        ),
        _ratio_target(
            f"`{COMMAND}` outside its flow run, median", "<= 5 s",
            median([run["before_flow_seconds"] + run["after_flow_seconds"] for run in m.command]), 5.0,
            at_most=True, pattern=".1f",
        ),
        _ratio_target("data prep, cold", "<= 2 s", median(m.prep_cold), 2.0, at_most=True, pattern=".2f"),
        _ratio_target("data prep, cached", "<= 0.3 s", median(m.prep_cached), 0.3, at_most=True, pattern=".2f"),
    ]
    found += [
        _ratio_target(
            f"trigger to first training step, {backend}", "<= 10 s", median(m.trigger_to_first_step[backend]),
            10.0, at_most=True, pattern=".1f",
        )
        for backend in BACKENDS
    ]
    found += [
        _ratio_target(
            f"test accuracy, {backend}", ">= 91.5%", v[f"cnn-train-{backend}"].test_accuracy, 0.915,
            at_most=False, pattern=".2%",
        )
        for backend in BACKENDS
    ]
    recipes = [variant for key, variant in v.items() if key.startswith(RECIPE_KEY)]
    if recipes:
        accuracies = [recipe.test_accuracy for recipe in recipes]
        seeds = ", ".join(key.removeprefix(f"{RECIPE_KEY}-seed") for key in v if key.startswith(RECIPE_KEY))
        mean_accuracy = statistics.mean(accuracies)
        found += [
            Target(
                f"improved recipe, mean test accuracy over seeds {seeds}", ">= 94.0%",
                f"{mean_accuracy:.2%} ({min(accuracies):.2%} to {max(accuracies):.2%})", mean_accuracy >= 0.94,
            ),
            _ratio_target(
                "improved recipe, mean flow run wall / default torch run's", "<= 1.0x",
                statistics.mean(recipe.run_wall for recipe in recipes) / v["cnn-train-torch"].run_wall, 1.0,
                at_most=True, pattern=".3f",
            ),
        ]
    return found


def target_rows(found: list[Target]) -> list[list[str]]:
    verdict = {True: "met", False: "MISSED", None: "—"}
    return [[t.what, t.goal, t.measured, verdict[t.met]] for t in found]


def render_text(header: Sequence[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [list(header), *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(header: Sequence[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join("| " + " | ".join(line) + " |" for line in [list(header), align, *rows])


# --- the machine ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


#: The CPU flags that decide matmul speed in each precision (lscpu's spelling).
MATMUL_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"})


def _precision_line(m: Measurements) -> str:
    """The bf16 peak beside the fp32 one, and the precision the recipe picks here and why."""
    precision, why = m.precision
    if m.bf16_peak is None:
        measured = "not measured (not native here)"
    else:
        measured = f"{m.bf16_peak.gflops:.0f} GFLOP/s, {m.bf16_peak.gflops / m.peak.gflops:.1f}x fp32"
    return f"bf16 peak: {measured}; the recipe's precision 'auto' trains in {precision} here: {why}"


def machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cpu_flags": sorted(cpu_flags().intersection(MATMUL_FLAGS)),
        "cpus": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        **{name: _package_version(name) for name in ("torch", "keras", "prefect", "mlflow")},
    }


# --- output --------------------------------------------------------------------------------------


def report(settings: Settings, m: Measurements, command: str, *, markdown: bool) -> str:
    render: Callable[[Sequence[str], list[list[str]]], str] = render_markdown if markdown else render_text
    info = machine()
    ram = f"{info['ram_gib']:.0f} GiB RAM" if info["ram_gib"] else "RAM unknown"
    lines = [
        f"machine: {info['cpu']} (flags {' '.join(info['cpu_flags']) or 'none of ' + ' '.join(sorted(MATMUL_FLAGS))}), "
        f"{info['cpus']} CPUs, {ram}; Python {info['python']}, torch {info['torch']}, "
        f"keras {info['keras']}, prefect {info['prefect']}, mlflow {info['mlflow']}",
        f"command: {command}",
        f"configuration: {settings.describe()}",
        f"fp32 peak: {m.peak.gflops:.0f} GFLOP/s ({m.peak.size}x{m.peak.size} matmul, {m.peak.threads} threads); "
        f"training cost: {m.train_flops_per_image / 1e6:.2f} MFLOP per image "
        f"({flops.forward_flops(ModelConfig()) / 1e6:.2f} forward x {flops.TRAINING_STEP_FACTOR})",
        _precision_line(m),
        f"other work on this machine while the variants trained: {m.foreign_cpu_share:.0%} of its CPU time",
        "",
        render(COLUMNS, table_rows(m)),
        "",
        *(f"- {line}" if markdown else f"  {line}" for line in LEGEND),
        "",
        *(f"- {line}" if markdown else line for line in breakdown_lines(m)),
        "",
    ]
    if m.foreign_cpu_share > BUSY_SHARE:
        lines += [
            f"WARNING: other processes used {m.foreign_cpu_share:.0%} of the CPU while the variants trained; "
            "work on the same cores slows multi-threaded training many times over, so these timings are "
            "not representative: rerun on an idle machine",
            "",
        ]
    if not settings.is_target_configuration:
        lines += [
            "targets are stated for the default configuration (10 epochs, all the data); this run is not it, "
            "so the verdicts below only show the tool works",
            "",
        ]
    lines.append(render(("target", "goal", "measured", "verdict"), target_rows(targets(m))))
    if markdown:
        # Line breaks inside a paragraph collapse in markdown; keep the header lines apart.
        lines[:6] = [f"{line}  " for line in lines[:6]]
    return "\n".join(lines)


def raw_numbers(settings: Settings, m: Measurements) -> dict[str, Any]:
    return {
        "settings": asdict(settings),
        "machine": machine(),
        "peak": asdict(m.peak),
        "bf16_peak": None if m.bf16_peak is None else asdict(m.bf16_peak),
        "recipe_precision": {"precision": m.precision[0], "reason": m.precision[1]},
        "train_flops_per_image": m.train_flops_per_image,
        "variants": {
            key: asdict(v) | {"images_per_second": v.images_per_second, "overhead": v.overhead}
            for key, v in m.variants.items()
        },
        "prep_cold_seconds": m.prep_cold,
        "prep_cached_seconds": m.prep_cached,
        "trigger_to_first_step_seconds": m.trigger_to_first_step,
        "stack": m.stack,
        "foreign_cpu_share": m.foreign_cpu_share,
        "command": m.command,
        "targets": [asdict(t) for t in targets(m)],
    }


def seed_list(text: str) -> tuple[int, ...]:
    """An argparse ``type`` for comma-separated seeds, each once."""
    try:  # each as the declaration allows a seed ("-1: Input should be greater than or equal to 0")
        seeds = tuple(declared_type("seed")(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give whole numbers separated by commas, e.g. 0,1,2; got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"give each seed once, got {text!r}")
    return seeds


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=Settings.epochs, help=f"epochs for every variant (default {Settings.epochs})")
    add_arguments(parser, ("sample_limit", "test_limit", "data_dir"))
    parser.add_argument(
        "--repeats", type=int, default=Settings.repeats,
        help=f"repeats of data prep, of each trigger and of the small `cnn-train run` (default {Settings.repeats})",
    )
    parser.add_argument("--skip-servers", action="store_true", help="do not start the stack; no trigger timing")
    parser.add_argument(
        "--peak-size", type=int, default=Settings.peak_size,
        help=f"side of the matmul that measures the peak (at least {MIN_PEAK_SIZE}: a smaller one times noise)",
    )
    parser.add_argument(
        "--recipe-epochs", type=int, default=Settings.recipe_epochs,
        help=f"epochs of the improved recipe's run (default its own {IMPROVED_TRAINING['epochs']}; 0 leaves it out)",
    )
    parser.add_argument(
        "--recipe-seeds", type=seed_list, default=Settings.recipe_seeds,
        help="comma-separated seeds of the improved recipe's runs (default 0,1,2); its accuracy target is their mean",
    )
    parser.add_argument(
        "--prefect-api-url", default=None, metavar="URL",
        help="record the flows on this running Prefect server instead of a temporary server per run "
        "(process wall then leaves out the server's start)",
    )
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--json", type=json_output, default=None, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1:
        parser.error("--epochs and --repeats must be at least 1")
    if args.recipe_epochs < 0:
        parser.error("--recipe-epochs must be 0 (leave the recipe out) or more")
    if args.peak_size < MIN_PEAK_SIZE:
        parser.error(f"--peak-size must be at least {MIN_PEAK_SIZE}: a {args.peak_size}x{args.peak_size} matmul takes "
                     "microseconds, and the peak it gives made the fp32-peak shares exceed 100%")
    if problem := data_problem(args.data_dir):
        parser.error(problem)
    # Every setting the command line names, under the same name; the rest keep their defaults.
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)})
    return settings, args


def json_output(text: str) -> Path:
    """An argparse ``type`` for ``--json FILE``: refused at once when it cannot be written, not after the run."""
    path = Path(text).expanduser()
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file name in it")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{folder} is not a folder this user can write; give a file in one that is")
    return path


def data_problem(data_dir: str | None) -> str | None:
    """Why the dataset cannot be had, found before the run (it failed in the first probe, in a traceback)."""
    from cnn_train.flows.data import DatasetError
    from cnn_train.flows.data.locate import locate_fashion_mnist

    try:
        locate_fashion_mnist(data_dir, allow_download=False)
    except DatasetError as error:
        return str(error)
    return None


@contextmanager
def stopped_as_by_ctrl_c() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a cancelled CI job) ends the run as Ctrl-C does: the running probe is
    killed and the temporary folder removed (it left both), and either ends in one line, not a traceback."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted; what it ran was stopped and its temporary files removed", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> None:
    settings, args = parse_args(argv)
    command = " ".join([".venv/bin/python", "benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)])
    work = Path(tempfile.mkdtemp(prefix="cnn-train-bench-"))
    try:
        with stopped_as_by_ctrl_c():
            measurements = measure(settings, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(settings, measurements, command, markdown=args.markdown))
    if args.json is not None:
        args.json.write_text(json.dumps(raw_numbers(settings, measurements), indent=2))


if __name__ == "__main__":
    main()
