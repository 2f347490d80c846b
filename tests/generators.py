"""Another trial's code, as a sweep runs trials in threads: a thread that keeps reseeding and drawing
from the process-wide generators (torch's and NumPy's) while the code under test runs."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def another_thread_drawing() -> Iterator[None]:
    import torch

    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.manual_seed(0)
            torch.rand(256)
            np.random.seed(0)
            np.random.rand(256)

    drawer = threading.Thread(target=draw)
    drawer.start()
    try:
        yield
    finally:
        stop.set()
        drawer.join()
