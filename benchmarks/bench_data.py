"""How long prepare_data takes on the real Fashion-MNIST: cold (cache cleared) versus cached.

    .venv/bin/python benchmarks/bench_data.py [--data-dir DIR] [--repeats 5]

Targets: cold load + prep of all 70,000 images <= 2 s, cached <= 0.3 s. The first cold call in a
process also pays for importing scikit-learn (about 1 s here), so it is reported on its own.
The cache lives in a temporary folder, so the project's own cache is left alone.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import data_problem
from cnn_train.flows.data import prepare_data
from cnn_train.flows.params import DEFAULT_SPLIT


def timed_prepare(data_dir: Path | None, cache_dir: Path) -> float:
    start = time.perf_counter()
    prepare_data(data_dir, cache_dir=cache_dir, allow_download=False, **DEFAULT_SPLIT)
    return time.perf_counter() - start


def describe(times: list[float]) -> str:
    return f"median {statistics.median(times):.3f} s, min {min(times):.3f} s, max {max(times):.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with the four .gz files")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if problem := data_problem(args.data_dir):
        parser.error(problem)

    cache_dir = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        first_cold = timed_prepare(args.data_dir, cache_dir)
        cold = []
        for _ in range(args.repeats):
            shutil.rmtree(cache_dir)
            cold.append(timed_prepare(args.data_dir, cache_dir))
        cached = [timed_prepare(args.data_dir, cache_dir) for _ in range(args.repeats)]
        summary = prepare_data(args.data_dir, cache_dir=cache_dir, allow_download=False, **DEFAULT_SPLIT)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    print(f"data: {summary.summary()} from {summary.source}, digest {summary.digest}")
    print(f"cold, first call in the process (includes importing scikit-learn): {first_cold:.3f} s")
    print(f"cold, cache cleared: {describe(cold)}")
    print(f"cached:              {describe(cached)}")


if __name__ == "__main__":
    main()
