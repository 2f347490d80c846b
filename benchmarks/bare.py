"""The lesson's CNN trained bare, as a user writes it after the lesson: no Prefect, no MLflow.

    .venv/bin/python benchmarks/bare.py torch --epochs 10 --out torch.json
    .venv/bin/python benchmarks/bare.py keras --epochs 10 --out keras.json

Both train on the same prepared split as the flow (``prepare_data``, same seed and validation
share: images already x / 255) with Adam 1e-3, batch 32, shuffled each epoch, then evaluate on
the test set. Neither validates during training (the lesson's ``fit`` does not), so an epoch's
time is training only. Writes the timings and the test accuracy as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cnn_train.flows.data import PreparedData, prepare_data
from cnn_train.flows.params import LESSON_TRAINING
from cnn_train.flows.signatures import add_arguments

LEARNING_RATE = 1e-3
BATCH_SIZE = 32


@dataclass(frozen=True)
class BareResult:
    """What one bare training measured."""

    framework: str
    train_images: int
    epochs: int
    epoch_seconds: tuple[float, ...]
    test_accuracy: float
    run_wall_seconds: float = 0.0


def train_torch(data: PreparedData, *, epochs: int, seed: int) -> BareResult:
    """A plain PyTorch loop: NCHW tensors made once, a shuffled index per epoch, slices of it."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()

    x_train = torch.from_numpy(data.x_train).permute(0, 3, 1, 2).contiguous()
    y_train = torch.from_numpy(data.y_train)
    epoch_seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train))
        for start in range(0, len(x_train), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - started)

    x_test = torch.from_numpy(data.x_test).permute(0, 3, 1, 2).contiguous()
    y_test = torch.from_numpy(data.y_test)
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x_test[start : start + 256]).argmax(dim=1) == y_test[start : start + 256]).sum())
            for start in range(0, len(x_test), 256)
        )
    return BareResult("torch", len(x_train), epochs, tuple(epoch_seconds), correct / len(x_test))


def train_keras(data: PreparedData, *, epochs: int, seed: int) -> BareResult:
    """A plain ``keras.Sequential`` (channels last, as in the lesson) and ``model.fit``."""
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        keras.layers.Conv2D(32, (3, 3), padding="same", activation="relu"),
        keras.layers.MaxPooling2D((2, 2), strides=2),
        keras.layers.Conv2D(64, (3, 3), padding="same", activation="relu"),
        keras.layers.MaxPooling2D((2, 2), strides=2),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    started: list[float] = []
    epoch_seconds: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: started.append(time.perf_counter()),
        on_epoch_end=lambda epoch, logs: epoch_seconds.append(time.perf_counter() - started[-1]),
    )
    model.fit(
        data.x_train, data.y_train, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True, verbose=0, callbacks=[timer]
    )
    _, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
    return BareResult("keras", len(data.x_train), epochs, tuple(epoch_seconds), float(accuracy))


TRAINERS = {"torch": train_torch, "keras": train_keras}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("framework", choices=sorted(TRAINERS))
    add_arguments(parser, ("epochs", "seed", "validation_fraction", "sample_limit", "test_limit", "data_dir"))
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = parser.parse_args()

    started = time.perf_counter()
    data = prepare_data(
        args.data_dir,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        sample_limit=args.sample_limit,
        test_limit=args.test_limit,
    )
    epochs = args.epochs or LESSON_TRAINING["epochs"]
    result = TRAINERS[args.framework](data, epochs=epochs, seed=args.seed)
    run_wall = time.perf_counter() - started
    args.out.write_text(json.dumps(asdict(result) | {"run_wall_seconds": run_wall}))


if __name__ == "__main__":
    main()
