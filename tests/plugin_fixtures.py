"""Backends that obey or break the contract, and in-memory distributions registering them, for
registry and conformance tests."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from cnn_train.plugins import registry

if TYPE_CHECKING:  # flow subprocesses import this module through entry points; they need no pytest
    import pytest


def _metadata(name: str, version: str, requires: Iterable[str] = ()) -> str:
    """A distribution's METADATA file: its name, version and requirements (all the registry reads)."""
    requirements = "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{requirements}"


def _entry_points(groups: Mapping[str, Mapping[str, str]]) -> str:
    """A distribution's entry_points.txt: for each group, ``name = module:attribute`` lines."""
    return "".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items())
        for group, entries in groups.items()
    )


def write_dist_info(
    site: Path, name: str, version: str, entry_points: Mapping[str, Mapping[str, str]], requires: Iterable[str] = ()
) -> Path:
    """A real ``NAME-VERSION.dist-info`` folder in ``site``, as pip writes it: with ``site`` on
    PYTHONPATH, a subprocess finds the distribution and its entry points. Its files are the ones a
    FakeDistribution holds in memory, so both kinds look alike to the registry."""
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(_metadata(name, version, requires))
    (dist_info / "entry_points.txt").write_text(_entry_points(entry_points))
    return dist_info


def backend_plugin_site(site: Path, name: str, target: str) -> Path:
    """``site`` holding one distribution that registers backend ``target`` under ``name``, as a plugin's
    pip install would: put it on a subprocess's PYTHONPATH and the registry finds the backend."""
    write_dist_info(site, name, "0.1", {registry.GROUP: {name: target}})
    return site


class FakeDistribution(importlib.metadata.Distribution):
    """An installed distribution that exists only in memory: its metadata (with the requirements it
    declares) and its backend entry points."""

    def __init__(
        self, name: str, backends: Mapping[str, str], *, version: str = "1.0", requires: tuple[str, ...] = ()
    ) -> None:
        self._files = {
            "METADATA": _metadata(name, version, requires),
            "entry_points.txt": _entry_points({registry.GROUP: backends}),
        }

    def read_text(self, filename: str) -> str | None:
        return self._files.get(filename)

    def locate_file(self, path: str | PurePath) -> PurePath:
        raise FileNotFoundError(f"{path}: an in-memory distribution has no files")


def install_without_pip(project: Path, site: Path) -> Path:
    """Lay a plugin project out in ``site`` as pip installs it (its packages, and a dist-info with the
    name, version, requirements and entry points of its pyproject.toml): with ``site`` on PYTHONPATH,
    a subprocess finds the plugin through its entry point, with no build and no pip run."""
    import shutil
    import tomllib

    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    meta = pyproject["project"]
    for package in pyproject["tool"]["setuptools"]["packages"]:
        folder = package.replace(".", "/")
        shutil.copytree(project / folder, site / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_dist_info(site, meta["name"], meta["version"], meta.get("entry-points", {}), meta.get("dependencies", ()))
    return site


def pip_install(project: Path, site: Path) -> Path:
    """``pip install`` the plugin project into the private folder ``site`` (to put on PYTHONPATH), with
    no dependencies and no build isolation: the real installation, for the tests that need pip's."""
    import shutil
    import subprocess
    import sys
    import tempfile

    # Built from a copy: setuptools writes build/ and *.egg-info into the folder it builds.
    with tempfile.TemporaryDirectory(prefix="plugin-source-") as source:
        shutil.copytree(project, source, dirs_exist_ok=True, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "--target", str(site), source],
            check=True,
        )
    return site


def only_distributions(monkeypatch: pytest.MonkeyPatch, *distributions: FakeDistribution) -> list[dict[str, str]]:
    """Make ``distributions`` the only installed ones, as pluggy's tests do; returns each entry-point read's query."""
    reads: list[dict[str, str]] = []

    def entry_points(**query: str) -> importlib.metadata.EntryPoints:
        reads.append(query)
        found = importlib.metadata.EntryPoints(entry for dist in distributions for entry in dist.entry_points)
        return found.select(**query)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    registry.refresh()
    return reads


class GoodBackend:
    """Satisfies the contract's shape and does nothing."""

    mlflow_flavor = "pyfunc"
    architectures = ("dense",)

    def build(self, config, *, device, seed): ...
    def parameter_count(self): return 0
    def train(self, data, config, *, on_epoch=None, initial_epoch=0): ...
    def evaluate(self, x, y, *, batch_size=256): ...
    def predict_proba(self, x, *, batch_size=256): ...
    def feature_maps(self, x, layers): ...
    def first_conv_kernels(self): ...
    def save(self, path): ...
    def load(self, path, config, *, device): ...
    def loggable_model(self): ...


class Other(GoodBackend):
    pass


class CnnOnly(GoodBackend):
    """A backend that builds the lesson's CNN and not the dense network."""

    architectures = ("cnn",)


class MissingTrain(GoodBackend):
    train = None


class WrongBuildSignature(GoodBackend):
    def build(self, config, seed):  # no device: it would have to find one itself
        ...


class NoFlavor(GoodBackend):
    mlflow_flavor = ""


class NotAFlavor(GoodBackend):
    """Names a module MLflow does not have: a run trained in full, then failed to log the model."""

    mlflow_flavor = "numpy"


class NeedsAnArgument(GoodBackend):
    """The registry makes a backend with ``cls()``: every run and check failed on the missing argument."""

    def __init__(self, scale):
        self.scale = scale


class UnknownArchitecture(GoodBackend):
    """Lists an architecture ModelConfig cannot describe: it loaded, and failed only once one was built."""

    architectures = ("dense", "linear")


class ExtraRequired(GoodBackend):
    def evaluate(self, x, y, scale, *, batch_size=256): ...


class RaisesInConstructor(GoodBackend):
    def __init__(self):
        raise ConnectionError("cannot reach the licence server")


NOT_A_CLASS = object()


def _torch_backend():
    from cnn_train.backends.torch_backend import TorchBackend

    return TorchBackend


def make_wrong_shape_backend():
    base = _torch_backend()

    class WrongShapeBackend(base):
        def predict_proba(self, x, *, batch_size=256):
            return super().predict_proba(x, batch_size=batch_size)[:, :9]

    return WrongShapeBackend


def make_channels_first_maps_backend():
    """The torch backend handing out feature maps channels first, (n, channels, height, width)."""
    import numpy as np

    base = _torch_backend()

    class ChannelsFirstMapsBackend(base):
        def feature_maps(self, x, layers):
            return {name: np.moveaxis(maps, -1, 1) for name, maps in super().feature_maps(x, layers).items()}

    return ChannelsFirstMapsBackend


def make_flaky_backend():
    """The torch backend, failing once right after epoch 1 ends (a transient fault), remembered in
    the file named by $FLAKY_MARKER so that the retry succeeds."""
    import os
    from pathlib import Path

    base = _torch_backend()

    class FlakyBackend(base):
        def train(self, data, config, *, on_epoch=None, initial_epoch=0):
            marker = Path(os.environ["FLAKY_MARKER"])

            def fail_once(metrics):
                if on_epoch is not None:
                    on_epoch(metrics)
                if metrics.epoch == 1 and not marker.exists():
                    marker.write_text("failed once")
                    raise ConnectionError("injected transient fault after epoch 1")

            return super().train(data, config, on_epoch=fail_once, initial_epoch=initial_epoch)

    return FlakyBackend


def make_paced_backend():
    """The torch backend resting a second after each epoch: a run that stays in flight while a test
    waits for it, using a small share of a core, where many short epochs kept one busy."""
    import time

    base = _torch_backend()

    class PacedBackend(base):
        def train(self, data, config, *, on_epoch=None, initial_epoch=0):
            def rest_after(metrics):
                if on_epoch is not None:
                    on_epoch(metrics)
                time.sleep(1.0)

            return super().train(data, config, on_epoch=rest_after, initial_epoch=initial_epoch)

    return PacedBackend


def make_disk_full_backend():
    """The torch backend whose checkpoint write after epoch 1 meets a full disk, as torch.save's does."""
    import errno
    import os

    base = _torch_backend()

    class DiskFullBackend(base):
        def save(self, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return DiskFullBackend


def __getattr__(name: str):
    if name == "RaisesOnImport":
        raise RuntimeError("plugin is broken at import time")
    if name == "WrongShapeBackend":
        return make_wrong_shape_backend()
    if name == "FlakyBackend":
        return make_flaky_backend()
    if name == "ChannelsFirstMapsBackend":
        return make_channels_first_maps_backend()
    if name == "PacedBackend":
        return make_paced_backend()
    if name == "DiskFullBackend":
        return make_disk_full_backend()
    raise AttributeError(name)
