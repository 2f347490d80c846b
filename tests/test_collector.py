"""The collector is paused while a command imports what its flow needs, and back on for the flow run."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from cnn_train.flows import collector


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    """Objects frozen here would never be collected in this long-lived test process."""
    yield
    gc.unfreeze()


@pytest.mark.parametrize("enabled_before", [True, False], ids=["on-before", "off-before"])
def test_paused_freezes_what_start_up_made_and_restores_the_collector(enabled_before: bool) -> None:
    (gc.enable if enabled_before else gc.disable)()
    try:
        frozen_before = gc.get_freeze_count()
        with collector.paused():
            assert not gc.isenabled()
            made_inside = [[] for _ in range(1000)]
        assert gc.isenabled() is enabled_before
        assert gc.get_freeze_count() >= frozen_before + len(made_inside)
    finally:
        gc.enable()


def test_the_collector_is_back_on_even_when_start_up_fails() -> None:
    with pytest.raises(RuntimeError, match="a check failed"), collector.paused():
        raise RuntimeError("a check failed")
    assert gc.isenabled()


def test_cnn_train_run_imports_with_the_collector_paused_and_runs_the_flow_with_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cnn_train.flows.cli import app, training  # app: the application with every command registered

    seen: dict[str, Any] = {}

    def flow_call(flow_fn: Any, values: dict[str, Any], api: Any) -> dict[str, Any]:
        seen.update(name=flow_fn.name, enabled=gc.isenabled(), frozen=gc.get_freeze_count())
        return {"mlflow_run_url": None, "mlflow_open": "-", "test_accuracy": 0.5}

    monkeypatch.setattr(training, "require_reachable_servers", lambda: seen.setdefault("checked_while", gc.isenabled()))
    monkeypatch.setattr(training, "_run_flow", flow_call)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # configured: no temporary server starts
    result = CliRunner().invoke(app, ["run", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert seen == {"checked_while": False, "name": "cnn-train", "enabled": True, "frozen": seen["frozen"]}
    assert seen["frozen"] > 10_000  # the imported modules' objects, out of every later scan
