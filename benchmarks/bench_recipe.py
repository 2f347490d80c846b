"""Measure the improved recipe against the lesson's CNN: seconds per epoch and test accuracy.

    .venv/bin/python benchmarks/bench_recipe.py [VARIANT ...] [--epochs N] [--sample-limit N]
        [--test-limit N] [--threads N] [--seeds 0,1,2] [--json out.json]

Each variant trains with the torch backend on the flow's split (``prepare_data``: full data,
validation share 0.1, seed 42 unless ``--seeds`` names others, each then its own split, weights and shuffles) and is then evaluated on the test set. Prints
every epoch's time and validation accuracy, then one line per variant: training seconds (what the
flow's training step spends, validation included), test accuracy and the time as a share of the
lesson's ``lesson`` run when it ran in the same call. With no VARIANT, runs ``lesson`` and
``recipe`` (the ``cnn-improved`` preset with its training defaults, as the flow runs it).

On a shared machine, two OpenMP threads fighting other processes for two cores can run ten times
slower than one thread; ``--threads 1`` gives stable (if not fastest) timings for screening.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench import data_problem, json_output, seed_list
from cnn_train.flows.data import prepare_data
from cnn_train.flows.placement import resolve_precision
from cnn_train.flows.signatures import add_arguments, declared_type
from cnn_train.plugins.config import (
    IMPROVED_ARCHITECTURE,
    ConvBlock,
    ModelConfig,
    TrainConfig,
    recipe_training_defaults,
)
from cnn_train.plugins.contract import EpochMetrics, Evaluation, TrainHistory


def _recipe() -> tuple[ModelConfig, TrainConfig]:
    """The cnn-improved preset with its training defaults, as the flow runs it."""
    training, _ = resolve_precision(TrainConfig(**recipe_training_defaults(IMPROVED_ARCHITECTURE)), "cpu")
    return ModelConfig.preset(IMPROVED_ARCHITECTURE), training


def _recipe_with(**changes: Any) -> Callable[[], tuple[ModelConfig, TrainConfig]]:
    """The recipe with some of its training values changed."""

    def variant() -> tuple[ModelConfig, TrainConfig]:
        model, training = _recipe()
        return model, training.model_copy(update=changes)

    return variant


def _improved(*filters: int, pools: tuple[int, ...] | None = None) -> ModelConfig:
    """A cnn-improved network with batch norm and dropout 0.3 on the given 3x3 convolutions."""
    pools = pools or (2,) * len(filters)
    blocks = tuple(ConvBlock(filters=f, pool_size=p) for f, p in zip(filters, pools, strict=True))
    return ModelConfig(architecture=IMPROVED_ARCHITECTURE, conv_blocks=blocks, batch_norm=True, dropout=0.3)


_ONECYCLE_B128: dict[str, Any] = {"epochs": 10, "batch_size": 128, "learning_rate": 3e-3, "lr_schedule": "onecycle"}

#: Name -> (network, training). ``lesson`` is the default run the recipe's time budget comes from; the
#: others are what was measured on the way to the recipe (results in plugins/config.py).
VARIANTS: dict[str, Callable[[], tuple[ModelConfig, TrainConfig]]] = {
    "lesson": lambda: (ModelConfig(), TrainConfig()),
    "recipe": _recipe,
    # Whether bfloat16 pays on this CPU, the question placement.training_precision's flag rule answers.
    "recipe-fp32": _recipe_with(precision="float32"),
    "recipe-b256": _recipe_with(batch_size=256, learning_rate=4e-3),
    "recipe-b512": _recipe_with(batch_size=512, learning_rate=6e-3),
    "recipe-b256-e8": _recipe_with(batch_size=256, learning_rate=4e-3, epochs=8),
    "bn-dropout-onecycle-b128": lambda: (_improved(32, 64), TrainConfig(**_ONECYCLE_B128)),
    "bn-dropout-onecycle-aug-b128": lambda: (_improved(32, 64), TrainConfig(**_ONECYCLE_B128, augment=True)),
    "conv3-bf16-smooth-b128": lambda: (
        _improved(32, 64, 128),
        TrainConfig(**_ONECYCLE_B128, label_smoothing=0.1, precision="bfloat16"),
    ),
}


@dataclass(frozen=True)
class VariantResult:
    name: str
    seed: int
    parameters: int
    history: TrainHistory
    test: Evaluation

    @property
    def train_seconds(self) -> float:
        return sum(epoch.seconds for epoch in self.history.epochs)


def run_variant(name: str, data: Any, *, epochs: int | None, threads: int | None, seed: int) -> VariantResult:
    import torch

    from cnn_train.backends.torch_backend import TorchBackend

    if threads is not None:
        torch.set_num_threads(threads)
    model, train = VARIANTS[name]()
    train = train.model_copy(update={"seed": seed} | ({} if epochs is None else {"epochs": epochs}))
    print(f"== {name}: {model.model_dump(exclude_defaults=True)} {train.model_dump(exclude_defaults=True)}", flush=True)
    backend = TorchBackend()
    backend.build(model, device="cpu", seed=train.seed)

    def report(metrics: EpochMetrics) -> None:
        print(
            f"   epoch {metrics.epoch:2d}: {metrics.seconds:6.1f} s  loss {metrics.loss:.4f}  "
            f"val_acc {metrics.val_accuracy:.4f}  {metrics.images_per_second:,.0f} img/s",
            flush=True,
        )

    history = backend.train(data.train_data(), train, on_epoch=report)
    test = backend.evaluate(data.x_test, data.y_test)
    return VariantResult(name, seed, backend.parameter_count(), history, test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help=f"Any of: {', '.join(VARIANTS)}.")
    parser.add_argument("--epochs", type=declared_type("epochs"), help="Override every variant's epochs (screening).")
    add_arguments(parser, ("sample_limit", "test_limit", "data_dir"))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before training.")
    parser.add_argument(
        "--seeds", type=seed_list, default=(42,),
        help="Comma-separated seeds, each its own split, initial weights and shuffles (default 42).",
    )
    parser.add_argument("--json", type=json_output, help="Also write the results here.")
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if problem := data_problem(args.data_dir):
        parser.error(problem)
    args.variants = args.variants or ["lesson", "recipe"]

    seeds = args.seeds
    results = []
    for seed in seeds:
        data = prepare_data(
            args.data_dir, validation_fraction=0.1, seed=seed, sample_limit=args.sample_limit, test_limit=args.test_limit
        )
        print(f"data (seed {seed}): {data.summary()}", flush=True)
        results += [run_variant(name, data, epochs=args.epochs, threads=args.threads, seed=seed) for name in args.variants]

    budget = statistics.mean([r.train_seconds for r in results if r.name == "lesson"] or [0.0]) or None
    print(f"\n{'variant':40s} {'seed':>5s} {'params':>8s} {'s/epoch':>8s} {'train s':>8s} {'test acc':>9s} {'time/lesson':>12s}")
    for result in results:
        share = f"{result.train_seconds / budget:12.2f}" if budget else f"{'-':>12s}"
        print(
            f"{result.name:40s} {result.seed:5d} {result.parameters:8,d} {result.history.seconds_per_epoch:8.1f} "
            f"{result.train_seconds:8.1f} {result.test.accuracy:9.4f} {share}"
        )
    for name in args.variants if len(seeds) > 1 else ():
        accuracies = [r.test.accuracy for r in results if r.name == name]
        print(f"{name:40s} mean test accuracy {statistics.mean(accuracies):.4f} ± {statistics.stdev(accuracies):.4f} "
              f"over seeds {','.join(map(str, seeds))}")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "train_seconds": r.train_seconds} for r in results], indent=1))


if __name__ == "__main__":
    main()
