"""Test accuracy of the torch backend and of the bare PyTorch loop over several seeds.

    .venv/bin/python benchmarks/seeds.py --seeds 1,2,3 [--epochs 10] [--json seeds.json]

One seed is one sample of a training run's test accuracy; this shows the spread, so a single
run's distance from a target can be read against it. Each seed sets the split, the initial weights
and the shuffles; both trainers see the same split. About 2 minutes per seed and trainer on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import bare
from bench import data_problem, json_output, seed_list
from cnn_train.backends.torch_backend import TorchBackend
from cnn_train.flows.data import PreparedData, prepare_data
from cnn_train.plugins.config import ModelConfig, TrainConfig
from cnn_train.flows.signatures import add_arguments, declared_type
from cnn_train.plugins.contract import TrainData


def backend_accuracy(data: PreparedData, *, epochs: int, seed: int) -> float:
    """The torch backend as the flow drives it: build, train (validating each epoch), evaluate."""
    backend = TorchBackend()
    backend.build(ModelConfig(), device="cpu", seed=seed)
    backend.train(TrainData(data.x_train, data.y_train, data.x_val, data.y_val), TrainConfig(epochs=epochs, seed=seed))
    return backend.evaluate(data.x_test, data.y_test).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seed_list, default=(1, 2, 3), help="comma-separated seeds (default 1,2,3)")
    parser.add_argument("--epochs", type=declared_type("epochs"), default=10, help="epochs of each training (default 10)")
    add_arguments(parser, ("sample_limit", "test_limit", "data_dir"))
    parser.add_argument("--json", type=json_output, default=None, help="also write every result here")
    args = parser.parse_args()
    if problem := data_problem(args.data_dir):
        parser.error(problem)
    seeds = list(args.seeds)

    results: dict[str, list[float]] = {"torch backend": [], "bare PyTorch loop": []}
    for seed in seeds:
        data = prepare_data(
            args.data_dir, validation_fraction=0.1, seed=seed, sample_limit=args.sample_limit, test_limit=args.test_limit
        )
        for name, accuracy in (
            ("torch backend", lambda: backend_accuracy(data, epochs=args.epochs, seed=seed)),
            ("bare PyTorch loop", lambda: bare.train_torch(data, epochs=args.epochs, seed=seed).test_accuracy),
        ):
            started = time.perf_counter()
            results[name].append(accuracy())
            print(f"seed {seed}  {name:<18} {results[name][-1]:.2%}  ({time.perf_counter() - started:.0f} s)", flush=True)
    for name, values in results.items():
        spread = f" ± {statistics.stdev(values):.2%}" if len(values) > 1 else ""
        print(f"{name:<18} mean {statistics.mean(values):.2%}{spread} over seeds {','.join(map(str, seeds))}")
    if args.json is not None:
        args.json.write_text(json.dumps({"seeds": seeds, "epochs": args.epochs, "test_accuracy": results}, indent=2))


if __name__ == "__main__":
    main()
