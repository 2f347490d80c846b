"""Prefect's side of a flow-run process that died without reporting: the "detect zombie flows"
automation `cnn-train up` creates crashes cnn-train's silent flow runs, and only those, and every
cnn-train process beats often enough for it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from cnn_train.flows import crashes
from cnn_train.flows.cli import app

_HEARTBEAT = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


@pytest.fixture
def no_automation(prefect_api_url: str) -> Iterator[None]:
    """The server without cnn-train's automation, before and after: left there, it would crash the
    in-process flow runs of later tests, which beat at Prefect's default."""
    from prefect.automations import Automation

    def delete() -> None:
        try:
            Automation.read(name=crashes.AUTOMATION_NAME).delete()
        except ValueError:
            pass

    delete()
    yield
    delete()


def _running_run(client, flow_name: str):
    from prefect import flow
    from prefect.states import Running

    return client.create_flow_run(flow(name=flow_name)(lambda: None), state=Running())


def _beat(run, flow_name: str) -> None:
    """The heartbeat event a flow-run process sends (prefect.flow_engine), once, sent as it is: through
    emit_event, a flow run context an earlier test left behind would add its own flow to the event."""
    import asyncio

    from prefect.events import Event
    from prefect.events.clients import get_events_client

    event = Event(
        event="prefect.flow-run.heartbeat",
        resource={"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.name": run.name},
        related=[{"prefect.resource.id": f"prefect.flow.{run.flow_id}", "prefect.resource.role": "flow",
                  "prefect.resource.name": flow_name}],
    )

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    asyncio.run(send())


@pytest.mark.slow
def test_the_automation_crashes_silent_cnn_train_runs_and_leaves_other_flows_alone(no_automation):
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    silence = 10.0
    assert crashes.ensure_zombie_automation(within_seconds=silence) == "created"
    flows = {"cnn-train": "CRASHED", "cnn-train-sweep": "CRASHED", "someone-elses-flow": "RUNNING",
             "cnn-train-completed": "COMPLETED"}
    with get_client(sync_client=True) as client:
        runs = {name: _running_run(client, name) for name in flows}
        for name, run in runs.items():
            _beat(run, name)
        # A run that ended after its last beat expects no more beats.
        client.set_flow_run_state(runs["cnn-train-completed"].id, Completed())

        def states() -> dict[str, str]:
            return {name: client.read_flow_run(run.id).state.type.value for name, run in runs.items()}

        def messages() -> dict[str, str | None]:
            return {name: client.read_flow_run(run.id).state.message for name, run in runs.items()}

        deadline = time.monotonic() + silence + 60
        while states()["cnn-train"] != "CRASHED" or states()["cnn-train-sweep"] != "CRASHED":
            assert time.monotonic() < deadline, f"the silent cnn-train runs were never crashed: {states()}"
            time.sleep(1)
        time.sleep(5)  # the other runs' silence is as old: had the automation watched them, they would be crashed
        assert states() == flows, messages()
        message = client.read_flow_run(runs["cnn-train"].id).state.message
        assert crashes.CRASH_MESSAGE in message


def test_an_automation_an_earlier_version_created_now_watches_cnn_train_flows_only(no_automation):
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    every_flow = EventTrigger(  # what cnn-train up created before: every flow run on the server
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed"},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=crashes.ZOMBIE_AFTER_SECONDS),
    )
    Automation(name=crashes.AUTOMATION_NAME, trigger=every_flow,
               actions=[ChangeFlowRunState(state=StateType.CRASHED)]).create()
    assert crashes.ensure_zombie_automation() == "updated"
    automation = Automation.read(name=crashes.AUTOMATION_NAME)
    assert automation.trigger == crashes.zombie_trigger()
    assert crashes.ensure_zombie_automation() is None  # up to date: left as it is


def test_every_command_beats_as_often_as_the_automation_expects(monkeypatch):
    """Prefect's default (180 s) is longer than the automation's 90 s of silence: a `cnn-train run`
    beside `cnn-train up`'s servers was marked Crashed 92 s into its training."""
    monkeypatch.setenv(_HEARTBEAT, "")  # recorded, so that undoing the test removes what the command sets
    monkeypatch.delenv(_HEARTBEAT)
    result = CliRunner().invoke(app, ["backends"])
    assert result.exit_code == 0, result.output
    assert int(os.environ[_HEARTBEAT]) * 3 <= crashes.ZOMBIE_AFTER_SECONDS
