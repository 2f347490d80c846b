"""The backend uses the device it is given and never looks for one, whatever its framework.

Looking for a device leaves traces that do not depend on the framework, which the check watches while
the backend builds, trains and predicts on the CPU: reading a variable that says which accelerators
are visible, opening a driver's device files, running a device-listing tool or loading its library
(all seen through Python's audit hooks and ``os.environ``), and calling the device probes of a
framework that is already imported (the kit never imports one), also under the names the backend's
own modules bound them to (``from jax import devices``), unless the call asks only about the
platform of the device given (JAX's ``jax.devices("cpu")`` turns ``"cpu"`` into JAX's device). It
also offers an impossible device, which the backend must refuse with a message naming it rather than
fall back quietly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import PurePath
from typing import Any
from unittest import mock

from cnn_train.plugins.conformance.data import images
from cnn_train.plugins.conformance.subject import Subject

#: Environment variables that say which accelerators a process may use.
DEVICE_VARIABLES = frozenset({
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ZE_AFFINITY_MASK", "ONEAPI_DEVICE_SELECTOR",
    "TPU_VISIBLE_CHIPS", "JAX_PLATFORMS", "JAX_PLATFORM_NAME",
})
#: Where drivers expose devices: opening or listing these is looking for one.
DEVICE_PATHS = ("/dev/nvidia", "/dev/dri", "/dev/kfd", "/dev/accel", "/proc/driver/nvidia", "/sys/class/drm")
#: Programs that list devices.
DEVICE_TOOLS = frozenset({"nvidia-smi", "rocm-smi", "amd-smi", "xpu-smi", "tpu-info", "lspci", "clinfo"})
#: Libraries (loaded with ctypes) and Python modules that enumerate devices.
DEVICE_LIBRARIES = ("libcuda.", "libnvidia-ml", "libamdhip", "librocm_smi", "libamd_smi", "libze_loader")
DEVICE_MODULES = frozenset({"pynvml", "GPUtil", "nvidia_smi", "py3nvml", "amdsmi", "pyrsmi"})
#: Device probes of frameworks, by module: watched only when that module is already imported.
FRAMEWORK_PROBES: dict[str, tuple[str, ...]] = {
    "torch": ("cuda.is_available", "cuda.device_count", "cuda.current_device", "backends.mps.is_available"),
    "jax": ("devices", "local_devices", "device_count", "local_device_count"),
    "tensorflow": ("config.list_physical_devices", "config.list_logical_devices", "config.get_visible_devices"),
    "keras": ("distribution.list_devices",),
}
#: Probes that, called for one platform, turn the device a backend was given into the framework's own
#: object (``jax.devices("cpu")[0]``, ``jax.devices("gpu")[N]`` for ``cuda:N``) rather than look for one:
#: the platform argument's position (None: keyword only) and keyword. The kit trains on the CPU.
PLATFORM_ARGUMENTS: dict[str, tuple[int | None, str]] = {
    "jax.devices": (0, "backend"),
    "jax.local_devices": (None, "backend"),
    "jax.device_count": (0, "backend"),
    "jax.local_device_count": (0, "backend"),
}
GIVEN_PLATFORM = "cpu"
#: A device no machine has: a backend that honours the device it is given cannot use it.
IMPOSSIBLE_DEVICE = "cuda:99"

# Audit hooks cannot be removed, so one hook is installed for the process, the first time a check
# watches; it records only while a watch is open.
_watches: list[list[str]] = []


def _describe_event(event: str, args: tuple[Any, ...]) -> str | None:
    """What an audit event says about looking for a device, or None when it says nothing."""
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, PurePath)):
        path = os.fsdecode(args[0])
        if path.rstrip("/") == "/dev" or path.startswith(DEVICE_PATHS):
            return f"{'opened' if event == 'open' else 'listed'} {path}"
    elif event in ("subprocess.Popen", "os.posix_spawn", "os.exec") and args:
        program = os.path.basename(os.fsdecode(args[0]))
        if program in DEVICE_TOOLS:
            return f"ran {program}"
    elif event == "os.system" and args:
        words = os.fsdecode(args[0]).split()
        if words and os.path.basename(words[0]) in DEVICE_TOOLS:
            return f"ran {words[0]}"
    elif event == "ctypes.dlopen" and args and args[0]:
        library = os.path.basename(str(args[0]))
        if library.startswith(DEVICE_LIBRARIES):
            return f"loaded {library}"
    elif event == "import" and args and str(args[0]).split(".")[0] in DEVICE_MODULES:
        return f"imported {args[0]}"
    return None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _watches:
        return
    try:
        found = _describe_event(event, args)
    except Exception:  # an audit hook that raises would break the audited operation itself
        return
    if found is not None:
        for seen in _watches:
            seen.append(found)


@functools.cache
def _install_audit_hook() -> None:
    sys.addaudithook(_audit)


def _names_the_given_platform(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call of the probe ``name`` asks only about the platform of the device the kit gave."""
    if name not in PLATFORM_ARGUMENTS:
        return False
    position, keyword = PLATFORM_ARGUMENTS[name]
    platform = kwargs.get(keyword, args[position] if position is not None and len(args) > position else None)
    return isinstance(platform, str) and platform.lower() == GIVEN_PLATFORM


def _recorder(seen: list[str], name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def recorded(*args: Any, **kwargs: Any) -> Any:
        if not _names_the_given_platform(name, args, kwargs):
            arguments = [*map(repr, args), *(f"{key}={value!r}" for key, value in kwargs.items())]
            seen.append(f"called {name}({', '.join(arguments)})")
        return original(*args, **kwargs)

    return recorded


def _framework_probes() -> Iterator[tuple[Any, str, str]]:
    """(owner object, attribute, dotted name) of each probe of the frameworks already imported."""
    for module_name, probes in FRAMEWORK_PROBES.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for probe in probes:
            *path, attribute = probe.split(".")
            owner: Any = module
            for part in path:
                owner = getattr(owner, part, None)
            if owner is not None and callable(getattr(owner, attribute, None)):
                yield owner, attribute, f"{module_name}.{probe}"


def _imported_probes(packages: tuple[str, ...], originals: dict[int, str]) -> Iterator[tuple[Any, str, str]]:
    """(module, name, dotted probe name) of each probe a module of ``packages`` bound under a name of its
    own (``from jax import devices``), which patching the framework's attribute does not reach."""
    for module_name, module in list(sys.modules.items()):
        if module is not None and module_name.split(".")[0] in packages:
            for attribute, value in list(vars(module).items()):
                if id(value) in originals:
                    yield module, attribute, originals[id(value)]


@contextlib.contextmanager
def watching_device_lookups(packages: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Collect, while the block runs, every way of looking for a device seen (see the module docstring),
    including the probes the modules of ``packages`` (the backend's) imported by name."""
    _install_audit_hook()
    seen: list[str] = []
    environ_type = type(os.environ)
    read = environ_type.__getitem__

    def reading(environ: Any, key: Any) -> Any:
        if key in DEVICE_VARIABLES:
            seen.append(f"read ${key}")
        return read(environ, key)

    with contextlib.ExitStack() as stack:
        # os.getenv, os.environ.get, `in` and [] all read through the mapping's __getitem__.
        stack.enter_context(mock.patch.object(environ_type, "__getitem__", reading))
        probes = list(_framework_probes())
        originals = {id(getattr(owner, attribute)): name for owner, attribute, name in probes}
        for owner, attribute, name in [*_imported_probes(packages, originals), *probes]:
            stack.enter_context(mock.patch.object(owner, attribute, _recorder(seen, name, getattr(owner, attribute))))
        _watches.append(seen)
        stack.callback(_watches.remove, seen)
        yield seen


def check_uses_given_device(subject: Subject) -> None:
    """The backend never looks for devices (framework probes, device variables, driver files, device
    tools or libraries) while it builds, trains and predicts on the CPU, and refuses an impossible
    device with a message naming it."""
    with watching_device_lookups((subject.cls.__module__.split(".")[0],)) as seen:
        backend, _ = subject.trained()
        backend.predict_proba(images(4)[0])
    assert not seen, (
        f"the backend looked for devices itself ({', '.join(dict.fromkeys(seen))}); use the device passed in"
        + (
            f" (a framework's device list may be read for the platform it names: {GIVEN_PLATFORM!r} here, "
            f"e.g. jax.devices({GIVEN_PLATFORM!r})[0]; 'gpu' for cuda:N)"
            if any(found.startswith("called ") for found in seen)
            else ""
        )
    )
    try:
        bogus = subject.new()
        bogus.build(subject.reference_config(), device=IMPOSSIBLE_DEVICE, seed=0)
        bogus.predict_proba(images(2)[0])
    except Exception as error:
        assert IMPOSSIBLE_DEVICE in str(error), (
            f"build(device={IMPOSSIBLE_DEVICE!r}) was refused, but the message does not name the device: "
            f"{type(error).__name__}: {error}"
        )
        return
    raise AssertionError(
        f"build(device={IMPOSSIBLE_DEVICE!r}) ran anyway; the backend must use (or refuse) the device it is given"
    )
