"""Which device each task runs on, decided in one place.

Each task makes a request: ``cpu``, ``gpu-preferred`` (fall back to the CPU with a warning),
``gpu-required`` (wait for a GPU up to a timeout, then fail) or an explicit ``cuda:N``.
:func:`place_task` turns a request into a :class:`Placement` and, for a GPU, leases the card
for as long as the task runs, so that concurrent tasks and concurrent flow runs on one machine
get different GPUs.

A lease is an OS file lock (``flock``) on ``<state dir>/gpu-leases/cuda-N.lock``. The kernel
drops it when its holder closes it, raises or dies, even by SIGKILL, so a crashed holder never
blocks the others. A sidecar ``cuda-N.holder`` names the holder for error messages only; the lock
is the truth. Leases key on the CUDA index, so processes sharing a lease directory must see the
same ``CUDA_VISIBLE_DEVICES``. Inside a scheduler that already assigned GPUs (Ray restricts
``CUDA_VISIBLE_DEVICES`` per task), pass ``assigned_by_scheduler=True`` or set
``CNN_TRAIN_SCHEDULER_ASSIGNED=1``: the task then uses ``cuda:0`` of what it sees, without a lease.

The GPU inventory is injectable, so all of this is testable without a GPU; :func:`cuda_inventory`
is the only CUDA-specific code.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cnn_train.flows.errors import ExpectedFailure
from cnn_train.flows import interrupts, leases
from cnn_train.flows.leases import Lease
from cnn_train.flows.settings import state_dir

if TYPE_CHECKING:
    from cnn_train.plugins.config import TrainConfig

__all__ = [
    "DEFAULT_REQUESTS",
    "POLICIES",
    "SCHEDULER_ASSIGNED_ENV",
    "TASKS",
    "DeviceRequest",
    "GpuInfo",
    "Placement",
    "PlacementError",
    "check_satisfiable",
    "cuda_inventory",
    "parse_request",
    "place_task",
    "ray_resources",
    "resolve_requests",
]

_log = logging.getLogger(__name__)
_NO_GPU = "no GPU visible"

TASKS: tuple[str, ...] = ("prep", "train", "evaluate", "report")
DEFAULT_REQUESTS: dict[str, str] = {
    "prep": "cpu",
    "train": "gpu-preferred",
    "evaluate": "gpu-preferred",
    "report": "cpu",
}

Policy = Literal["cpu", "gpu-preferred", "gpu-required", "explicit"]
POLICIES: tuple[str, ...] = ("cpu", "gpu-preferred", "gpu-required", "explicit")

#: Set to ``1`` inside a task whose GPUs a scheduler (Ray) already assigned.
SCHEDULER_ASSIGNED_ENV = "CNN_TRAIN_SCHEDULER_ASSIGNED"

_ALLOWED_FORMS = "'cpu', 'gpu-preferred', 'gpu-required' or 'cuda:N' (N a GPU index, e.g. 'cuda:0')"
EXPLICIT_PATTERN = r"cuda:(0|[1-9][0-9]*)"  # the deployment schema's too; ``\d`` took 'cuda:01' and full-width digits
_MIB = 1024 * 1024

Logger = logging.Logger | logging.LoggerAdapter


class PlacementError(ExpectedFailure, ValueError):
    """A device request that is invalid or cannot be met; the message says why and what to do."""


@dataclass(frozen=True)
class DeviceRequest:
    """What a task asks for. ``index`` is set exactly when ``policy == 'explicit'``."""

    policy: Policy
    index: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise PlacementError(f"unknown device policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if self.policy == "explicit" and (self.index is None or self.index < 0):
            raise PlacementError(f"an explicit device request needs a GPU index >= 0, got {self.index!r}")
        if self.policy != "explicit" and self.index is not None:
            raise PlacementError(f"policy {self.policy!r} takes no GPU index, got {self.index!r}")

    @property
    def wants_gpu(self) -> bool:
        return self.policy != "cpu"

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.policy == "explicit" else self.policy


def parse_request(value: str | DeviceRequest) -> DeviceRequest:
    """``'cpu'``, ``'gpu-preferred'``, ``'gpu-required'`` or ``'cuda:N'`` as a :class:`DeviceRequest`."""
    if isinstance(value, DeviceRequest):
        return value
    # Exactly as written, no case folding or trimming: the deployment's schema (the Prefect form's
    # dropdown) takes only these spellings, and the CLI must not accept what a deployment run refuses.
    text = value if isinstance(value, str) else None
    if text in ("cpu", "gpu-preferred", "gpu-required"):
        return DeviceRequest(text)
    if text is not None and (match := re.fullmatch(EXPLICIT_PATTERN, text)):
        return DeviceRequest("explicit", int(match.group(1)))
    raise PlacementError(f"invalid device request {value!r}; expected {_ALLOWED_FORMS}")


def resolve_requests(overrides: Mapping[str, str | DeviceRequest | None] | None = None) -> dict[str, DeviceRequest]:
    """Each task's request: :data:`DEFAULT_REQUESTS`, overridden per task (``None`` keeps the default)."""
    overrides = dict(overrides or {})
    if unknown := sorted(set(overrides) - set(TASKS)):
        raise PlacementError(f"device requests for unknown tasks {unknown}; the tasks are {', '.join(TASKS)}")
    requests = {}
    for task in TASKS:
        value = overrides.get(task)
        try:
            requests[task] = parse_request(DEFAULT_REQUESTS[task] if value is None else value)
        except PlacementError as error:
            raise PlacementError(f"device request for {task}: {error}") from None
    return requests


def ray_resources(
    request: str | DeviceRequest, *, cluster_gpus: float | None = None, custom: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Ray task options for ``request``: one GPU for a GPU request, none for ``cpu``.

    With ``cluster_gpus`` known, ``gpu-preferred`` asks for no GPU on a cluster that has none, so
    CPU-only clusters run it instead of queueing it forever; strict requests still ask for one and
    wait for Ray to find it, as they would locally. ``custom`` resources (what a node advertises with
    ``ray start --resources``, e.g. a machine type) are asked for as they are, so the task runs only
    on nodes that have them.
    """
    parsed = parse_request(request)
    options: dict[str, Any] = {"num_gpus": 1 if parsed.wants_gpu else 0}
    if parsed.policy == "gpu-preferred" and cluster_gpus is not None and cluster_gpus < 1:
        options["num_gpus"] = 0
    if custom:
        options["resources"] = dict(custom)
    return options


@dataclass(frozen=True)
class GpuInfo:
    """One visible CUDA device; memory in MiB."""

    index: int
    name: str
    total_memory_mb: int
    free_memory_mb: int


def cuda_inventory() -> list[GpuInfo]:
    """The CUDA devices this process sees (after ``CUDA_VISIBLE_DEVICES``); ``[]`` without CUDA."""
    import torch  # lazily: listing tasks or placing them on the CPU must not pay for torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(GpuInfo(index, torch.cuda.get_device_properties(index).name, total // _MIB, free // _MIB))
    return gpus


_NATIVE_BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags of instructions computing bfloat16


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them; empty elsewhere (then no native bfloat16 is assumed)."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    return frozenset(next((line for line in lines if line.startswith("flags")), "").partition(":")[2].split())


def training_precision(requested: str, device: str, *, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """The precision to train in on ``device``, and why: ``auto`` is bfloat16 only where it is native (emulated, it is slower)."""
    if requested != "auto":  # the lesson's float32, or a TrainConfig's own choice ("asked for" read as the user's)
        return requested, "set by the training, not chosen for this machine"
    if device.startswith("cuda"):
        import torch  # lazily, as in cuda_inventory
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"{device} computes bfloat16 natively"
        return "float32", f"{device} has no native bfloat16"
    native = sorted((cpu_flags() if flags is None else flags).intersection(_NATIVE_BFLOAT16_FLAGS))
    if native:
        return "bfloat16", f"this CPU computes bfloat16 natively ({', '.join(native)})"
    return "float32", "this CPU has neither AMX nor AVX-512 BF16, so bfloat16 would be emulated and slower"


def resolve_precision(training: TrainConfig, device: str) -> tuple[TrainConfig, str]:
    """``training`` with its precision resolved for ``device`` (see training_precision), and why."""
    precision, why = training_precision(training.precision, device)
    return training.model_copy(update={"precision": precision}), why


def check_satisfiable(
    requests: Mapping[str, str | DeviceRequest],
    *,
    inventory: Callable[[], list[GpuInfo]] = cuda_inventory,
    assigned_by_scheduler: bool | None = None,
) -> None:
    """Refuse, before a run starts, requests that no wait could meet on this machine: a required GPU
    when none is visible, or a ``cuda:N`` that does not exist. Busy GPUs are not an error here."""
    parsed = {task: parse_request(request) for task, request in requests.items()}
    strict = {task: r for task, r in parsed.items() if r.policy in ("gpu-required", "explicit")}
    if not strict or _scheduler_assigned(assigned_by_scheduler):
        return
    gpus = inventory()
    for task, request in strict.items():
        if not gpus:
            _without_gpu(task, request)
        if request.policy == "explicit" and request.index not in {gpu.index for gpu in gpus}:
            raise PlacementError(
                f"{task} requested {request}, but the visible GPUs are {_describe(gpus)}; "
                f"pick one of those, or 'gpu-preferred' / 'gpu-required' to let placement choose"
            )


@dataclass(frozen=True)
class Placement:
    """Where a task runs: ``device`` is ``'cpu'`` or ``'cuda:N'``; ``gpu`` describes the card, if any;
    ``fallback`` is a GPU wanted and the CPU given (``gpu-preferred``), which is logged as a warning."""

    task: str
    device: str
    gpu: GpuInfo | None
    reason: str
    fallback: bool = False

    def as_tags(self) -> dict[str, str]:
        """Run tags recording the device, e.g. ``{'device.train': 'cuda:0', 'device.train.name': ...}``."""
        tags = {f"device.{self.task}": self.device}
        if self.gpu is not None:
            tags[f"device.{self.task}.name"] = self.gpu.name
            tags[f"device.{self.task}.memory_mb"] = str(self.gpu.total_memory_mb)
        return tags


@contextmanager
def place_task(
    task: str,
    request: str | DeviceRequest,
    *,
    inventory: Callable[[], list[GpuInfo]] = cuda_inventory,
    lease_dir: Path | None = None,
    wait_timeout: float = 600.0,
    poll_interval: float = 0.5,
    logger: Logger | None = None,
    assigned_by_scheduler: bool | None = None,
) -> Iterator[Placement]:
    """Pick a device for ``task`` and hold its GPU lease, if any, until the block exits.

    Among the GPUs nobody leases, the one with the most free memory wins. ``gpu-preferred`` never
    waits: with every GPU leased it runs on the CPU, because a slower task now beats an idle one
    queued behind a long training run. ``gpu-required`` and ``cuda:N`` wait up to ``wait_timeout``
    seconds, then raise :class:`PlacementError` naming the holders. Without any visible GPU they
    fail at once. ``assigned_by_scheduler`` (default: ``$CNN_TRAIN_SCHEDULER_ASSIGNED == '1'``)
    trusts the scheduler's assignment and leases nothing.
    """
    log = logger or _log
    request = parse_request(request)
    lease: Lease | None = None
    if not request.wants_gpu:
        placement = Placement(task, "cpu", None, "cpu requested")
    elif _scheduler_assigned(assigned_by_scheduler):
        placement = _scheduler_placement(task, request, inventory(), log)
    else:
        placement, lease = _leased_placement(
            task, request, inventory(), lease_dir, wait_timeout=wait_timeout, poll_interval=poll_interval, log=log
        )
    _log_placement(log, placement)
    try:
        yield placement
    finally:
        if lease is not None:
            lease.release()


def _leased_placement(
    task: str, request: DeviceRequest, gpus: list[GpuInfo], lease_dir: Path | None, *,
    wait_timeout: float, poll_interval: float, log: Logger,
) -> tuple[Placement, Lease | None]:
    if not gpus:
        return _without_gpu(task, request), None
    if request.policy == "explicit":
        candidates = [gpu for gpu in gpus if gpu.index == request.index]
        if not candidates:
            raise PlacementError(
                f"{task} requested {request}, but the visible GPUs are {_describe(gpus)}; "
                f"pick one of those, or 'gpu-preferred' / 'gpu-required' to let placement choose"
            )
    else:
        candidates = sorted(gpus, key=lambda gpu: gpu.free_memory_mb, reverse=True)
    if lease_dir is None:
        lease_dir = state_dir() / "gpu-leases"
    lease_dir.mkdir(parents=True, exist_ok=True)

    indexes = [gpu.index for gpu in candidates]
    if (lease := leases.try_lease(indexes, lease_dir, task)) is None:
        wanted = str(request) if request.policy == "explicit" else f"any of {len(candidates)} GPUs"
        holders = leases.holders(indexes, lease_dir)
        if request.policy == "gpu-preferred":
            return Placement(task, "cpu", None, f"gpu-preferred, all GPUs leased ({holders})", fallback=True), None
        log.info("%s waits up to %g s for %s, leased by %s", task, wait_timeout, wanted, holders)
        started = time.monotonic()
        deadline = started + wait_timeout
        while (lease := leases.try_lease(indexes, lease_dir, task)) is None:
            if (remaining := deadline - time.monotonic()) <= 0:
                raise PlacementError(
                    f"{task} requires {wanted} ({request}), but none became free within {wait_timeout:g} s; "
                    f"leased by {leases.holders(indexes, lease_dir)}. Wait longer (wait timeout), free a GPU, "
                    f"or request 'gpu-preferred' to fall back to CPU"
                )
            with interrupts.interruptible():  # a sweep's trial waiting here stops with its flow run
                time.sleep(min(poll_interval, remaining))
        reason = f"{request}, leased after waiting {time.monotonic() - started:.1f} s"
    elif request.policy == "explicit":
        reason = f"{request}, leased"
    else:
        reason = f"{request}, leased the free GPU with the most free memory"
    gpu = next(gpu for gpu in candidates if gpu.index == lease.index)
    return Placement(task, f"cuda:{gpu.index}", gpu, reason), lease


def _without_gpu(task: str, request: DeviceRequest) -> Placement:
    """The CPU for ``gpu-preferred``; for anything stricter, an immediate error saying how to run on CPU."""
    if request.policy == "gpu-preferred":
        return Placement(task, "cpu", None, f"gpu-preferred, {_NO_GPU}", fallback=True)
    raise PlacementError(
        f"{task} requires a GPU ({request}), but no GPU is visible to this process "
        f"(check the NVIDIA driver, a CUDA build of torch and CUDA_VISIBLE_DEVICES). "
        f"To run {task} on CPU, pass the device policy 'cpu' for it (--{task}-device cpu, -p {task}_device=cpu), "
        f"or 'gpu-preferred' to use a GPU only when there is one"
    )


def _scheduler_assigned(flag: bool | None) -> bool:
    return os.environ.get(SCHEDULER_ASSIGNED_ENV, "").strip() == "1" if flag is None else flag


def _scheduler_placement(task: str, request: DeviceRequest, gpus: list[GpuInfo], log: Logger) -> Placement:
    """Use what the scheduler made visible: ``cuda:0`` of the visible devices, no lease."""
    ray_gpu_ids = _ray_gpu_ids()
    if ray_gpu_ids == []:  # Ray gave this task no GPU, whatever else the process can see
        gpus = []
    if not gpus:
        return _without_gpu(task, request)
    if request.policy == "explicit" and request.index != 0:
        log.info("%s asked for %s; the scheduler's assignment takes precedence", task, request)
    assigned = "assigned by the scheduler" + (f" (Ray GPU ids {ray_gpu_ids})" if ray_gpu_ids else "")
    return Placement(task, "cuda:0", gpus[0], f"{request}, {assigned}")


def _ray_gpu_ids() -> list[int | str] | None:
    """Ray's GPU ids for this task when this process runs Ray, else ``None``."""
    ray = sys.modules.get("ray")  # only a process that already imported Ray can be inside a Ray task
    # Not connected means not inside a Ray task; asking anyway would start a local Ray instance.
    if ray is None or not ray.is_initialized():
        return None
    try:
        return list(ray.get_gpu_ids())
    except Exception:  # Ray raises outside a worker; then it assigned nothing we must respect
        return None


def _describe(gpus: Sequence[GpuInfo]) -> str:
    return ", ".join(f"cuda:{gpu.index} ({gpu.name})" for gpu in gpus)


#: Fallbacks this process has warned of once: a machine without any GPU warned of it for every task of every trial.
_WARNED: set[str] = set()


def _log_placement(log: Logger, placement: Placement) -> None:
    if placement.gpu is None:
        # One line either way: a fallback was a warning and then the same news again as information.
        first = placement.fallback and placement.reason not in _WARNED
        if first and placement.reason.endswith(_NO_GPU):  # GPUs all leased stays a warning each time: it passes
            _WARNED.add(placement.reason)
        log.log(logging.WARNING if first else logging.INFO, "%s runs on %s (%s)", placement.task, placement.device, placement.reason)
    else:
        gpu = placement.gpu
        log.info("%s runs on %s: %s, %d MB total, %d MB free (%s)", placement.task, placement.device, gpu.name,
                 gpu.total_memory_mb, gpu.free_memory_mb, placement.reason)
