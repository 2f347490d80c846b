"""Device placement: requests, the policy matrix over 0, 1 and 2 fake GPUs, leases across threads
and processes (including a SIGKILLed holder), the scheduler hook, and the real CPU path."""

from __future__ import annotations

import functools
import logging
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cnn_train.flows import placement as placement_module
from cnn_train.flows.placement import (
    DEFAULT_REQUESTS,
    SCHEDULER_ASSIGNED_ENV,
    TASKS,
    DeviceRequest,
    GpuInfo,
    Placement,
    PlacementError,
    check_satisfiable,
    cuda_inventory,
    parse_request,
    place_task,
    ray_resources,
    resolve_requests,
    training_precision,
)

# cuda:1 has more free memory, so "the free GPU with the most free memory" is distinguishable from "the first one".
FAKE_GPUS = (
    GpuInfo(index=0, name="Fake T4", total_memory_mb=15360, free_memory_mb=9000),
    GpuInfo(index=1, name="Fake A100", total_memory_mb=40960, free_memory_mb=30000),
)
SHORT_TIMEOUT = 0.3
POLL = 0.02


def gpus(count: int):
    """A fake inventory with the first ``count`` fake GPUs."""
    return lambda: list(FAKE_GPUS[:count])


@pytest.fixture
def lease_dir(tmp_path: Path) -> Path:
    return tmp_path / "leases"


@pytest.fixture
def place(lease_dir: Path):
    """``place_task`` with a private lease directory and a short wait."""
    return functools.partial(place_task, lease_dir=lease_dir, wait_timeout=SHORT_TIMEOUT, poll_interval=POLL)


# --- requests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpu", DeviceRequest("cpu")),
        ("gpu-preferred", DeviceRequest("gpu-preferred")),
        ("gpu-required", DeviceRequest("gpu-required")),
        ("cuda:0", DeviceRequest("explicit", 0)),
        ("cuda:12", DeviceRequest("explicit", 12)),
    ],
    ids=["cpu", "gpu-preferred", "gpu-required", "cuda-0", "cuda-12"],
)
def test_parse_request(text: str, expected: DeviceRequest) -> None:
    assert parse_request(text) == expected


# Spelt otherwise than the deployment's schema takes them (a `trigger -p` would be refused), so refused here too.
@pytest.mark.parametrize(
    "text",
    ["gpu", "cuda", "cuda:", "cuda:-1", "cuda:x", "", "tpu", "cuda:0,1", "GPU-preferred", " cpu", "CUDA:0", "cuda:01", "cuda:\uff11"],
)
def test_invalid_request_names_the_value_and_the_allowed_forms(text: str) -> None:
    with pytest.raises(PlacementError) as error:
        parse_request(text)
    message = str(error.value)
    assert repr(text) in message
    for form in ("'cpu'", "'gpu-preferred'", "'gpu-required'", "'cuda:N'"):
        assert form in message
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize(
    ("policy", "index", "fragment"),
    [
        ("explicit", None, "needs a GPU index"),
        ("explicit", -1, "needs a GPU index"),
        ("cpu", 0, "takes no GPU index"),
        ("tpu", None, "unknown device policy"),
    ],
    ids=["explicit-without-index", "explicit-negative", "cpu-with-index", "unknown-policy"],
)
def test_device_request_refuses_inconsistent_fields(policy: str, index: int | None, fragment: str) -> None:
    with pytest.raises(PlacementError, match=fragment):
        DeviceRequest(policy, index)  # type: ignore[arg-type]


def test_request_str_round_trips() -> None:
    for text in ("cpu", "gpu-preferred", "gpu-required", "cuda:3"):
        assert str(parse_request(text)) == text
    assert parse_request(DeviceRequest("explicit", 1)) == DeviceRequest("explicit", 1)


def test_defaults_put_prep_and_report_on_cpu_and_prefer_a_gpu_for_train_and_evaluate() -> None:
    assert TASKS == ("prep", "train", "evaluate", "report")
    assert {task: str(request) for task, request in resolve_requests().items()} == DEFAULT_REQUESTS


def test_flow_parameters_override_defaults_per_task() -> None:
    requests = resolve_requests({"train": "cuda:1", "evaluate": None, "report": DeviceRequest("gpu-required")})
    assert requests == {
        "prep": DeviceRequest("cpu"),
        "train": DeviceRequest("explicit", 1),
        "evaluate": DeviceRequest("gpu-preferred"),
        "report": DeviceRequest("gpu-required"),
    }


def test_override_errors_name_the_task() -> None:
    with pytest.raises(PlacementError, match=r"unknown tasks \['tarin'\]; the tasks are prep, train, evaluate, report"):
        resolve_requests({"tarin": "cpu"})
    with pytest.raises(PlacementError, match=r"device request for train: invalid device request 'gpu'"):
        resolve_requests({"train": "gpu"})


@pytest.mark.parametrize(
    ("request_text", "resources"),
    [
        ("cpu", {"num_gpus": 0}),
        ("gpu-preferred", {"num_gpus": 1}),
        ("gpu-required", {"num_gpus": 1}),
        ("cuda:1", {"num_gpus": 1}),
    ],
    ids=["cpu", "gpu-preferred", "gpu-required", "explicit"],
)
def test_ray_resources(request_text: str, resources: dict[str, int]) -> None:
    assert ray_resources(request_text) == resources
    assert ray_resources(parse_request(request_text)) == resources


# --- the policy matrix over 0, 1 and 2 fake GPUs --------------------------------------------------

NO_GPU = "no GPU is visible"
MATRIX = [
    ("cpu", 0, "cpu"),
    ("cpu", 1, "cpu"),
    ("cpu", 2, "cpu"),
    ("gpu-preferred", 0, "cpu"),
    ("gpu-preferred", 1, "cuda:0"),
    ("gpu-preferred", 2, "cuda:1"),
    ("gpu-required", 0, PlacementError(NO_GPU)),
    ("gpu-required", 1, "cuda:0"),
    ("gpu-required", 2, "cuda:1"),
    ("cuda:0", 0, PlacementError(NO_GPU)),
    ("cuda:0", 1, "cuda:0"),
    ("cuda:0", 2, "cuda:0"),
    ("cuda:1", 0, PlacementError(NO_GPU)),
    ("cuda:1", 1, PlacementError(r"requested cuda:1, but the visible GPUs are cuda:0 \(Fake T4\)")),
    ("cuda:1", 2, "cuda:1"),
]


@pytest.mark.parametrize(
    ("request_text", "gpu_count", "expected"),
    MATRIX,
    ids=[f"{request}-{count}gpus" for request, count, _ in MATRIX],
)
def test_policy_matrix(place, request_text: str, gpu_count: int, expected: str | PlacementError) -> None:
    if isinstance(expected, PlacementError):
        with pytest.raises(PlacementError, match=str(expected)):
            with place("train", request_text, inventory=gpus(gpu_count)):
                pass
        return
    with place("train", request_text, inventory=gpus(gpu_count)) as placement:
        assert placement.device == expected
        if expected == "cpu":
            assert placement.gpu is None
        else:
            assert placement.gpu == FAKE_GPUS[int(expected.removeprefix("cuda:"))]


def test_cpu_never_reads_the_inventory_or_touches_leases(place, lease_dir: Path) -> None:
    def inventory() -> list[GpuInfo]:
        raise AssertionError("a cpu request must not read the GPU inventory")

    with place("prep", "cpu", inventory=inventory) as placement:
        assert placement == Placement("prep", "cpu", None, "cpu requested")
    assert not lease_dir.exists()


def test_required_gpu_without_any_says_how_to_run_on_cpu(place) -> None:
    with pytest.raises(PlacementError) as error:
        with place("evaluate", "gpu-required", inventory=gpus(0)):
            pass
    message = str(error.value)
    assert "evaluate requires a GPU (gpu-required), but no GPU is visible" in message
    assert "'cpu'" in message
    assert "--evaluate-device cpu" in message
    assert "-p evaluate_device=cpu" in message  # a deployment's run is told what its trigger takes


def test_preferred_without_gpu_warns_once_per_process(place, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(placement_module, "_WARNED", set())  # as in a process that has placed nothing yet
    with caplog.at_level(logging.INFO, logger="cnn_train.flows.placement"):
        for task in ("train", "evaluate"):
            with place(task, "gpu-preferred", inventory=gpus(0)) as placement:
                assert placement.device == "cpu"
    # One line a task, a warning the first time: a CPU-only machine warned of it for every task of every trial.
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "train runs on cpu (gpu-preferred, no GPU visible)"),
        (logging.INFO, "evaluate runs on cpu (gpu-preferred, no GPU visible)"),
    ]


def test_chosen_gpu_is_logged_with_name_and_memory_through_the_given_logger(place, caplog) -> None:
    run_logger = logging.LoggerAdapter(logging.getLogger("test.run"), {"flow_run": "x"})
    with caplog.at_level(logging.INFO, logger="test.run"):
        with place("train", "gpu-required", inventory=gpus(2), logger=run_logger):
            pass
    [record] = [record for record in caplog.records if record.name == "test.run"]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert message.startswith("train runs on cuda:1: Fake A100, 40960 MB total, 30000 MB free")


@pytest.mark.parametrize(
    ("placement", "tags"),
    [
        (Placement("report", "cpu", None, "cpu requested"), {"device.report": "cpu"}),
        (
            Placement("train", "cuda:1", FAKE_GPUS[1], "leased"),
            {"device.train": "cuda:1", "device.train.name": "Fake A100", "device.train.memory_mb": "40960"},
        ),
    ],
    ids=["cpu", "gpu"],
)
def test_as_tags(placement: Placement, tags: dict[str, str]) -> None:
    assert placement.as_tags() == tags


# --- leases within one process --------------------------------------------------------------------


def test_two_concurrent_tasks_get_distinct_gpus(place) -> None:
    with place("train", "gpu-required", inventory=gpus(2)) as first:
        with place("evaluate", "gpu-required", inventory=gpus(2)) as second:
            assert {first.device, second.device} == {"cuda:0", "cuda:1"}


def test_two_threads_get_distinct_gpus(place) -> None:
    both_leased = threading.Barrier(2, timeout=10)
    devices: list[str] = []

    def run(task: str) -> None:
        with place(task, "gpu-required", inventory=gpus(2)) as placement:
            devices.append(placement.device)
            both_leased.wait()

    threads = [threading.Thread(target=run, args=(task,)) for task in ("train", "evaluate")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(devices) == ["cuda:0", "cuda:1"]


def test_third_request_preferring_a_gpu_falls_back_to_cpu(place, caplog) -> None:
    with place("train", "gpu-required", inventory=gpus(2)), place("evaluate", "gpu-required", inventory=gpus(2)):
        with caplog.at_level(logging.WARNING, logger="cnn_train.flows.placement"):
            with place("train", "gpu-preferred", inventory=gpus(2)) as third:
                assert third.device == "cpu"
                assert third.reason.startswith("gpu-preferred, all GPUs leased")
    [warning] = caplog.records
    assert warning.getMessage().startswith("train runs on cpu (gpu-preferred, all GPUs leased (cuda:1 by pid=")


def test_third_request_requiring_a_gpu_fails_after_the_timeout_naming_holders(place) -> None:
    with place("train", "gpu-required", inventory=gpus(2)), place("evaluate", "gpu-required", inventory=gpus(2)):
        started = time.monotonic()
        with pytest.raises(PlacementError) as error:
            with place("report", "gpu-required", inventory=gpus(2)):
                pass
        assert time.monotonic() - started >= SHORT_TIMEOUT
    message = str(error.value)
    assert f"report requires any of 2 GPUs (gpu-required), but none became free within {SHORT_TIMEOUT:g} s" in message
    assert "cuda:1 by pid=" in message and "task=train" in message
    assert "cuda:0 by pid=" in message and "task=evaluate" in message
    assert "'gpu-preferred'" in message


@pytest.mark.parametrize("request_text", ["gpu-required", "cuda:0"])
def test_third_request_waits_and_gets_the_gpu_once_released(lease_dir: Path, request_text: str) -> None:
    holder_released = threading.Event()
    result: list[Placement] = []

    def wait_for_gpu() -> None:
        with place_task(
            "evaluate", request_text, inventory=gpus(1), lease_dir=lease_dir, wait_timeout=10, poll_interval=POLL
        ) as placement:
            assert holder_released.is_set()
            result.append(placement)

    with place_task("train", "gpu-required", inventory=gpus(1), lease_dir=lease_dir):
        waiter = threading.Thread(target=wait_for_gpu)
        waiter.start()
        time.sleep(0.2)
        assert waiter.is_alive(), "the waiter must wait while the GPU is leased"
        holder_released.set()
    waiter.join(timeout=10)
    [placement] = result
    assert placement.device == "cuda:0"
    assert "leased after waiting" in placement.reason


def test_a_trial_waiting_for_a_leased_gpu_stops_with_its_flow_run(lease_dir: Path) -> None:
    """A sweep's trial in a thread waits for the GPU; a Ctrl-C of the flow stops the wait, not its end."""
    from cnn_train.flows.interrupts import interrupt_trials, trial

    waiting, seen = threading.Event(), []

    def trial_waiting_for_gpu() -> None:
        try:
            with trial():
                waiting.set()
                with place_task("train", "gpu-required", inventory=gpus(1), lease_dir=lease_dir, wait_timeout=60, poll_interval=POLL):
                    seen.append("placed")
        except KeyboardInterrupt:
            seen.append("interrupted")

    with place_task("train", "gpu-required", inventory=gpus(1), lease_dir=lease_dir):
        waiter = threading.Thread(target=trial_waiting_for_gpu)
        waiter.start()
        assert waiting.wait(10)
        time.sleep(0.2)  # in its wait loop
        assert interrupt_trials(None, wait_seconds=10) == 1
        waiter.join(10)
        assert seen == ["interrupted"]  # within the join, not after the 60 s wait


def test_explicit_gpu_waits_for_its_own_card_not_another(place) -> None:
    with place("train", "cuda:1", inventory=gpus(2)):
        with pytest.raises(PlacementError, match=r"evaluate requires cuda:1 \(cuda:1\), but none became free"):
            with place("evaluate", "cuda:1", inventory=gpus(2)):
                pass
        with place("evaluate", "gpu-required", inventory=gpus(2)) as other:
            assert other.device == "cuda:0"


def test_lease_is_released_after_an_exception(place, lease_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="training diverged"):
        with place("train", "gpu-required", inventory=gpus(1)):
            assert (lease_dir / "cuda-0.holder").read_text().startswith("pid=")
            raise RuntimeError("training diverged")
    assert not (lease_dir / "cuda-0.holder").exists()
    with place("evaluate", "gpu-required", inventory=gpus(1)) as placement:
        assert placement.device == "cuda:0"


def test_default_lease_dir_is_under_the_state_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    with place_task("train", "gpu-required", inventory=gpus(1)):
        assert (tmp_path / "state" / "gpu-leases" / "cuda-0.lock").exists()


# --- leases across processes ----------------------------------------------------------------------

HOLDER_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from cnn_train.flows.placement import GpuInfo, place_task

    lease_dir, count, request = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    fake = [GpuInfo(0, "Fake T4", 15360, 9000), GpuInfo(1, "Fake A100", 40960, 30000)][:count]
    with place_task("train", request, inventory=lambda: fake, lease_dir=lease_dir) as placement:
        print(placement.device, flush=True)
        sys.stdin.readline()  # hold the lease until told to finish, or until killed
    """
)


@pytest.fixture
def holder_process(lease_dir: Path):
    """Start a separate process holding a lease; yields (process, device). Killed at teardown if still alive."""
    processes: list[subprocess.Popen[str]] = []

    def start(count: int, request: str = "gpu-required") -> tuple[subprocess.Popen[str], str]:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER_SCRIPT, str(lease_dir), str(count), request],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "the holder process did not report its lease"
        return process, process.stdout.readline().strip()

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_another_process_gets_a_distinct_gpu(place, holder_process) -> None:
    _, held = holder_process(2)
    assert held == "cuda:1"
    with place("evaluate", "gpu-required", inventory=gpus(2)) as placement:
        assert placement.device == "cuda:0"


def test_lease_held_by_another_process_blocks_then_is_released_on_success(place, holder_process) -> None:
    holder, held = holder_process(1)
    assert held == "cuda:0"
    with pytest.raises(PlacementError, match=rf"cuda:0 by pid={holder.pid} host=\S+ task=train"):
        with place("evaluate", "gpu-required", inventory=gpus(1)):
            pass
    with place("evaluate", "gpu-preferred", inventory=gpus(1)) as fallback:
        assert fallback.device == "cpu"
    holder.communicate("done\n", timeout=10)
    assert holder.returncode == 0
    with place("evaluate", "gpu-required", inventory=gpus(1)) as placement:
        assert placement.device == "cuda:0"


def test_lease_of_a_sigkilled_holder_is_released(lease_dir: Path, holder_process) -> None:
    holder, held = holder_process(1)
    assert held == "cuda:0"
    result: list[Placement] = []

    def wait_for_gpu() -> None:
        with place_task(
            "evaluate", "gpu-required", inventory=gpus(1), lease_dir=lease_dir, wait_timeout=20, poll_interval=POLL
        ) as placement:
            result.append(placement)

    waiter = threading.Thread(target=wait_for_gpu)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive(), "the waiter must wait while the holder lives"
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=10) == -signal.SIGKILL
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "a killed holder's lease must not block"
    assert [placement.device for placement in result] == ["cuda:0"]


# --- the scheduler hook (Ray) ---------------------------------------------------------------------


def test_scheduler_assigned_uses_cuda_0_without_leasing(place, lease_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv(SCHEDULER_ASSIGNED_ENV, "1")
    with (
        place("train", "gpu-required", inventory=gpus(2)) as first,
        place("evaluate", "cuda:1", inventory=gpus(2)) as second,
    ):
        assert first.device == second.device == "cuda:0"
        assert first.gpu == FAKE_GPUS[0]
        assert "assigned by the scheduler" in first.reason
    assert not lease_dir.exists()


def test_scheduler_assigned_parameter_overrides_the_environment(place, monkeypatch) -> None:
    monkeypatch.setenv(SCHEDULER_ASSIGNED_ENV, "1")
    with place("train", "gpu-required", inventory=gpus(2), assigned_by_scheduler=False) as placement:
        assert placement.device == "cuda:1"
    monkeypatch.delenv(SCHEDULER_ASSIGNED_ENV)
    with place("train", "gpu-required", inventory=gpus(2), assigned_by_scheduler=True) as placement:
        assert placement.device == "cuda:0"


@pytest.mark.parametrize(
    ("ray_gpu_ids", "request_text", "expected"),
    [
        ([3], "gpu-required", "cuda:0"),
        ([], "gpu-preferred", "cpu"),
        ([], "gpu-required", PlacementError(NO_GPU)),
    ],
    ids=["ray-assigned-one", "ray-assigned-none-preferred", "ray-assigned-none-required"],
)
def test_scheduler_assigned_respects_ray_gpu_ids(
    place, monkeypatch, ray_gpu_ids: list[int], request_text: str, expected: str | PlacementError
) -> None:
    fake_ray = type(sys)("ray")
    fake_ray.is_initialized = lambda: True  # inside a Ray task
    fake_ray.get_gpu_ids = lambda: ray_gpu_ids
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    placing = place("train", request_text, inventory=gpus(1), assigned_by_scheduler=True)
    if isinstance(expected, PlacementError):
        with pytest.raises(PlacementError, match=str(expected)), placing:
            pass
        return
    with placing as placement:
        assert placement.device == expected
        if ray_gpu_ids:
            assert f"Ray GPU ids {ray_gpu_ids}" in placement.reason


def test_scheduler_assigned_outside_ray_does_not_start_ray(place, monkeypatch) -> None:
    # Ray imported but not connected: this process is no Ray task, and asking Ray for its GPU ids
    # would start a local Ray instance (then report none, hiding the process's own GPUs).
    fake_ray = type(sys)("ray")
    fake_ray.is_initialized = lambda: False
    fake_ray.get_gpu_ids = lambda: []  # what the local instance it would start reports on a CPU node
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    with place("train", "gpu-required", inventory=gpus(2), assigned_by_scheduler=True) as placement:
        assert placement.device == "cuda:0"


# --- the real CPU path ----------------------------------------------------------------------------


@pytest.fixture
def no_real_gpu() -> None:
    if cuda_inventory():
        pytest.skip("this machine has a GPU; the CPU-path tests assume none")


def test_real_inventory_is_empty_without_cuda(no_real_gpu) -> None:
    assert cuda_inventory() == []


def test_real_gpu_preferred_runs_on_cpu(no_real_gpu, lease_dir: Path) -> None:
    import torch

    with place_task("train", "gpu-preferred", lease_dir=lease_dir) as placement:
        assert placement.device == "cpu"
        assert torch.ones(2, device=placement.device).sum().item() == 2.0


def test_real_gpu_required_fails_fast_instead_of_waiting(no_real_gpu, lease_dir: Path) -> None:
    errors: list[PlacementError] = []

    def place_required() -> None:
        try:
            with place_task("train", "gpu-required", lease_dir=lease_dir, wait_timeout=600):
                pass
        except PlacementError as error:
            errors.append(error)

    attempt = threading.Thread(target=place_required, daemon=True)
    attempt.start()
    attempt.join(timeout=20)
    assert not attempt.is_alive(), "a required GPU on a machine without one must fail at once, not wait"
    [error] = errors
    assert "no GPU is visible" in str(error)
    assert "--train-device cpu" in str(error)


@pytest.mark.parametrize(
    ("requests", "gpus", "message"),
    [
        pytest.param({"train": "gpu-required"}, 0, "no GPU is visible", id="required-none-visible"),
        pytest.param({"evaluate": "cuda:0"}, 0, "no GPU is visible", id="explicit-none-visible"),
        pytest.param({"train": "cuda:2"}, 2, "requested cuda:2, but the visible GPUs are", id="explicit-missing-index"),
    ],
)
def test_check_satisfiable_refuses_impossible_requests(requests, gpus, message):
    inventory = lambda: [GpuInfo(i, f"Fake GPU {i}", 16_000, 15_000) for i in range(gpus)]  # noqa: E731
    with pytest.raises(PlacementError, match=message):
        check_satisfiable(requests, inventory=inventory, assigned_by_scheduler=False)


@pytest.mark.parametrize(
    ("requests", "gpus"),
    [
        pytest.param({"train": "gpu-preferred", "prep": "cpu"}, 0, id="preferred-without-gpu"),
        pytest.param({"train": "gpu-required"}, 1, id="required-with-gpu"),
        pytest.param({"train": "cuda:1"}, 2, id="explicit-present"),
    ],
)
def test_check_satisfiable_accepts_possible_requests(requests, gpus):
    inventory = lambda: [GpuInfo(i, f"Fake GPU {i}", 16_000, 15_000) for i in range(gpus)]  # noqa: E731
    check_satisfiable(requests, inventory=inventory, assigned_by_scheduler=False)


def test_check_satisfiable_never_reads_inventory_for_cpu_only():
    def inventory():
        raise AssertionError("inventory read for CPU-only requests")

    check_satisfiable({"prep": "cpu", "train": "gpu-preferred"}, inventory=inventory)


@pytest.mark.parametrize(
    ("request_text", "cluster_gpus", "resources"),
    [
        pytest.param("gpu-preferred", 0, {"num_gpus": 0}, id="preferred-cpu-cluster"),
        pytest.param("gpu-preferred", 4, {"num_gpus": 1}, id="preferred-gpu-cluster"),
        pytest.param("gpu-required", 0, {"num_gpus": 1}, id="required-cpu-cluster-still-asks"),
        pytest.param("cpu", 4, {"num_gpus": 0}, id="cpu-gpu-cluster"),
    ],
)
def test_ray_resources_know_the_cluster(request_text, cluster_gpus, resources):
    assert ray_resources(request_text, cluster_gpus=cluster_gpus) == resources


AMX = frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16", "avx512_bf16"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AVX2_ONLY = frozenset({"avx", "avx2", "fma"})


@pytest.mark.parametrize(
    ("requested", "flags", "expected", "reason"),
    [
        pytest.param("auto", AMX, "bfloat16", "natively (amx_bf16, avx512_bf16)", id="auto-amx"),
        pytest.param("auto", AVX512_BF16, "bfloat16", "natively (avx512_bf16)", id="auto-avx512-bf16"),
        pytest.param("auto", AVX2_ONLY, "float32", "neither AMX nor AVX-512 BF16", id="auto-avx2"),
        pytest.param("auto", frozenset(), "float32", "neither AMX nor AVX-512 BF16", id="auto-no-cpuinfo"),
        pytest.param("bfloat16", AVX2_ONLY, "bfloat16", "set by the training, not chosen for this machine", id="bfloat16-is-kept"),
        pytest.param("float32", AMX, "float32", "set by the training, not chosen for this machine", id="float32-is-kept"),
    ],
)
def test_training_precision_on_the_cpu(requested: str, flags: frozenset[str], expected: str, reason: str) -> None:
    precision, why = training_precision(requested, "cpu", flags=flags)
    assert precision == expected
    assert reason in why


def test_this_machines_cpu_flags_decide_auto() -> None:
    """The rule reads the real /proc/cpuinfo: its answer follows the flags this CPU lists."""
    from cnn_train.flows.placement import cpu_flags

    native = bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    assert training_precision("auto", "cpu")[0] == ("bfloat16" if native else "float32")
