"""The benchmark at a tiny size, so it cannot rot: every variant runs for real and the table prints.

No timing is asserted: CI machines are too noisy for that. The full run is in BENCHMARKS.md.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ROWS = (
    "bare PyTorch loop", "bare Keras fit", "cnn-train torch", "cnn-train keras",
    "cnn-train torch, deployment defaults (dense compared)", "cnn-train torch, cnn-improved, seed 0",
)
VARIANT_KEYS = (
    "bare-torch", "bare-keras", "cnn-train-torch", "cnn-train-keras", "cnn-train-torch-deployment",
    "cnn-train-torch-recipe-seed0",
)


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks/bench.py`` imported as a module, as its script directory would import it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("bench")


def test_reference_model_costs_8_48_mflop_forward(bench: ModuleType) -> None:
    from cnn_train.plugins.config import ModelConfig

    assert bench.flops.forward_flops(ModelConfig()) == 8_482_304
    assert bench.flops.training_flops(ModelConfig()) == 3 * 8_482_304
    assert bench.flops.forward_flops(ModelConfig(architecture="dense")) == 2 * (784 * 128 + 128 * 10)


REFERENCE_TRAINING_FLOPS = 25_446_912


def _variant(
    bench: ModuleType, name: str, *, run_wall: float, train: float, rate: float, backend: str | None = None,
    accuracy: float = 0.92, fp32: bool = True,
) -> object:
    return bench.Variant(
        name, run_wall + 5, run_wall, train, train, int(rate * train), accuracy,
        backend=backend, fp32_reference=fp32,
    )


def test_targets_compare_the_right_numbers(bench: ModuleType) -> None:
    measurements = bench.Measurements(
        peak=bench.flops.Peak(gflops=200.0, size=4096, threads=2, seconds=(0.7,)),
        train_flops_per_image=REFERENCE_TRAINING_FLOPS,
        variants={
            "bare-torch": _variant(bench, "bare PyTorch loop", run_wall=110, train=100, rate=1000),
            "bare-keras": _variant(bench, "bare Keras fit", run_wall=110, train=100, rate=500),
            "cnn-train-torch": _variant(bench, "cnn-train torch", run_wall=102, train=100, rate=980, backend="torch"),
            "cnn-train-keras": _variant(bench, "cnn-train keras", run_wall=105, train=100, rate=700, backend="keras"),
            "cnn-train-torch-deployment": _variant(
                bench, "cnn-train torch, deployment defaults (dense compared)", run_wall=118, train=114, rate=980,
                backend="torch",
            ),
            "cnn-train-torch-recipe-seed0": _variant(
                bench, "cnn-train torch, cnn-improved, seed 0", run_wall=99, train=90, rate=2000, backend="torch",
                accuracy=0.9375, fp32=False,
            ),
            "cnn-train-torch-recipe-seed1": _variant(
                bench, "cnn-train torch, cnn-improved, seed 1", run_wall=105, train=96, rate=2000, backend="torch",
                accuracy=0.9445, fp32=False,
            ),
        },
        prep_cold=[1.5, 2.5, 1.9],
        prep_cached=[0.2],
        trigger_to_first_step={"torch": [8.0], "keras": []},
        stack={},
    )
    verdicts = {t.what: (t.measured, t.met) for t in bench.targets(measurements)}
    assert verdicts["orchestration overhead, torch"] == ("2.0%", True)
    assert verdicts["orchestration overhead, keras"] == ("5.0%", False)
    assert verdicts["orchestration overhead, torch, deployment defaults (dense epochs counted as training)"] == (
        "3.5%", False
    )
    assert verdicts["torch backend img/s / bare PyTorch loop"] == ("0.980", True)
    assert verdicts["keras backend img/s / torch backend"] == ("0.714", False)
    assert verdicts["data prep, cold"] == ("1.90", True)
    assert verdicts["trigger to first training step, torch"] == ("8.0", True)
    assert verdicts["trigger to first training step, keras"] == ("not measured", None)
    # The recipe's accuracy is judged by its mean over seeds, its time by the mean of its runs: 102 / 102.
    assert verdicts["improved recipe, mean test accuracy over seeds 0, 1"] == ("94.10% (93.75% to 94.45%)", True)
    assert verdicts["improved recipe, mean flow run wall / default torch run's"] == ("1.000", True)
    rows = {row[0]: row for row in bench.table_rows(measurements)}
    # 980 img/s x 25.4 MFLOP = 24.9 GFLOP/s of a 200 GFLOP/s peak.
    assert rows["cnn-train torch"][-1] == "12.5%"
    assert rows["bare PyTorch loop"][6] == "—"
    # The recipe is not the lesson's network and is triggered by nobody: no fp32 share, no trigger time.
    recipe_row = rows["cnn-train torch, cnn-improved, seed 0"]
    assert recipe_row[-1] == recipe_row[8] == "—"
    assert rows["cnn-train torch"][8] == "8.0"
    markdown = bench.render_markdown(bench.COLUMNS, bench.table_rows(measurements))
    assert markdown.splitlines()[0] == "| " + " | ".join(bench.COLUMNS) + " |"
    assert len(markdown.splitlines()) == 2 + len(measurements.variants)


@pytest.mark.parametrize(
    ("precision", "bf16_gflops", "expected"),
    [
        pytest.param(
            ("bfloat16", "this CPU computes bfloat16 natively (avx512_bf16)"), 400.0,
            "bf16 peak: 400 GFLOP/s, 2.0x fp32; the recipe's precision 'auto' trains in bfloat16 here: "
            "this CPU computes bfloat16 natively (avx512_bf16)",
            id="native",
        ),
        pytest.param(
            ("float32", "this CPU has neither AMX nor AVX-512 BF16"), None,
            "bf16 peak: not measured (not native here); the recipe's precision 'auto' trains in float32 here: "
            "this CPU has neither AMX nor AVX-512 BF16",
            id="emulated",
        ),
    ],
)
def test_the_header_names_the_bf16_peak_and_the_recipes_precision(
    bench: ModuleType, precision: tuple[str, str], bf16_gflops: float | None, expected: str
) -> None:
    peak = bench.flops.Peak(gflops=200.0, size=4096, threads=2, seconds=(0.7,))
    bf16_peak = None if bf16_gflops is None else bench.flops.Peak(bf16_gflops, 4096, 2, (0.35,), "bfloat16")
    measurements = bench.Measurements(
        peak=peak, train_flops_per_image=REFERENCE_TRAINING_FLOPS, variants={}, prep_cold=[], prep_cached=[],
        trigger_to_first_step={}, stack={}, precision=precision, bf16_peak=bf16_peak,
    )
    assert bench._precision_line(measurements) == expected


@pytest.mark.slow
def test_benchmark_runs_every_variant_at_tiny_size(tmp_path: Path, real_fashion_mnist_dir: Path, prefect_api_url: str) -> None:
    out = tmp_path / "bench.json"
    # The flows record on the session's Prefect server: three temporary servers less to start on CI's two cores.
    command = [
        sys.executable, str(BENCHMARKS / "bench.py"),
        "--epochs", "1", "--sample-limit", "400", "--test-limit", "200", "--repeats", "1",
        "--skip-servers", "--peak-size", "1024", "--recipe-epochs", "1", "--recipe-seeds", "0", "--data-dir", str(real_fashion_mnist_dir), "--json", str(out),
        "--prefect-api-url", prefect_api_url,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    lines = run.stdout.splitlines()
    header = next(line for line in lines if line.startswith("variant"))
    for column in ("process wall s", "run wall s", "train s", "train img/s", "overhead", "prep cold s",
                   "prep cached s", "trigger→1st step s", "test acc", "fp32 peak"):
        assert column in header
    for row in ROWS:
        assert any(line.startswith(row) for line in lines), f"no row {row!r} in:\n{run.stdout}"
    assert "configuration: 1 epoch(s)" in run.stdout
    assert "bf16 peak: " in run.stdout and "the recipe's precision 'auto' trains in " in run.stdout
    assert "trigger to first training step, torch" in run.stdout

    raw = json.loads(out.read_text())
    native = raw["recipe_precision"]["precision"] == "bfloat16"
    assert (raw["bf16_peak"] is not None) == native, raw["recipe_precision"]
    assert native == any(flag in raw["machine"]["cpu_flags"] for flag in ("avx512_bf16", "amx_bf16"))
    assert set(raw["variants"]) == set(VARIANT_KEYS)
    for key in VARIANT_KEYS:
        variant = raw["variants"][key]
        assert variant["images_trained"] == 360  # 400 images, 10% held out, one epoch
        assert 0.0 <= variant["test_accuracy"] <= 1.0
    assert set(raw["variants"]["cnn-train-torch"]["details"]["task_seconds"]) == {"prep", "train", "evaluate", "report"}
    # The deployment's defaults add the dense network's run: its epoch counts as training time too.
    deployment = raw["variants"]["cnn-train-torch-deployment"]
    (dense_epoch,) = deployment["details"]["dense_epoch_seconds"]
    assert deployment["train_seconds"] == pytest.approx(sum(deployment["details"]["epoch_seconds"]) + dense_epoch)
    assert "orchestration overhead, torch, deployment defaults (dense epochs counted as training)" in run.stdout
    assert len(raw["prep_cold_seconds"]) == len(raw["prep_cached_seconds"]) == 1
    assert raw["trigger_to_first_step_seconds"] == {"torch": [], "keras": []}
    (command_run,) = raw["command"]  # the small `cnn-train run`, once per repeat
    assert set(command_run) == {"before_flow_seconds", "flow_seconds", "after_flow_seconds"}
    assert all(seconds > 0 for seconds in command_run.values())
    assert "`cnn-train run --epochs 1 --sample-limit 2000` outside its flow run, median" in run.stdout
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the flow runs are on the server the benchmark was given
        for key in (key for key in VARIANT_KEYS if key.startswith("cnn-train")):
            flow_run = client.read_flow_run(raw["variants"][key]["details"]["flow_run_id"])
            assert flow_run.state.is_completed(), (key, flow_run.state)


@pytest.mark.parametrize(
    ("script", "arguments", "says"),
    [
        pytest.param("bench.py", ["--json", "/nonexistent/x.json"], "argument --json: /nonexistent is not a folder this user can write",
                     id="json-in-a-missing-folder"),  # found after the whole run, in a traceback
        pytest.param("bench.py", ["--data-dir", "/nonexistent"], "data_dir: /nonexistent does not exist", id="missing-data"),
        pytest.param("bench.py", ["--sample-limit", "-5"], "argument --sample-limit: -5: Input should be greater than or equal to 20",
                     id="sample-limit-the-flow-refuses"),
        pytest.param("bench.py", ["--recipe-seeds", "0,-1"], "argument --recipe-seeds: -1: Input should be greater than or equal to 0",
                     id="negative-seed"),
        pytest.param("bench.py", ["--peak-size", "256"], "--peak-size must be at least 512", id="peak-matmul-too-small"),
        pytest.param("bench_recipe.py", ["--epochs", "0"], "argument --epochs: 0: Input should be greater than or equal to 1",
                     id="recipe-no-epochs"),  # it trained nothing and printed nan
        pytest.param("bench_recipe.py", ["--json", "/nonexistent/x.json"], "is not a folder this user can write", id="recipe-json"),
        pytest.param("seeds.py", ["--json", "/nonexistent/x.json"], "is not a folder this user can write", id="seeds-json"),
        pytest.param("bench_tune.py", ["--json", "/nonexistent/x.json"], "is not a folder this user can write", id="tune-json"),
        pytest.param("bench_data.py", ["--repeats", "0"], "--repeats must be at least 1", id="data-no-repeats"),
    ],
)
def test_a_benchmark_mistake_is_refused_before_anything_runs(script: str, arguments: list[str], says: str) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and says in result.stderr.splitlines()[-1], result.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_stops_the_running_probe_and_removes_the_temporary_folder(tmp_path: Path, real_fashion_mnist_dir: Path) -> None:
    """`kill`, `timeout` or a cancelled CI job: the probe it was running went on alone, and its folder stayed."""
    import os
    import signal
    import time

    import psutil

    env = os.environ | {"TMPDIR": str(tmp_path)}
    bench = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / "bench.py"), "--epochs", "1", "--sample-limit", "400", "--test-limit", "200",
         "--repeats", "1", "--skip-servers", "--peak-size", "512", "--recipe-epochs", "0", "--data-dir", str(real_fashion_mnist_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not (children := psutil.Process(bench.pid).children()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert children, "no probe started"
    bench.send_signal(signal.SIGTERM)
    _, stderr = bench.communicate(timeout=60)
    assert bench.returncode == 130 and stderr.splitlines()[-1] == (
        "bench.py: interrupted; what it ran was stopped and its temporary files removed"
    )
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive and not list(tmp_path.glob("cnn-train-bench-*"))
