"""A newcomer's first hour (issue 19): state that does not pile up, links that open or are absent,
quiet output, a failure's reason shown where the run was triggered, and the commands that show and
prune the project's state."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnn_train.flows import housekeeping, quiet
from cnn_train.flows.cli import app
from cnn_train.flows.errors import close_names
from cnn_train.flows.settings import keep_library_state_in_project
from tests.local_stack import bare_env, free_port
from tests.processes import stop_group

BIN = Path(sys.executable).parent
TINY = {"epochs": 1, "sample_limit": 200, "test_limit": 100}
#: The acceptance command of the issue, word for word.
CLI_RUN = ["run", "--epochs", "1", "--sample-limit", "2000", "--test-limit", "1000"]
DAY = 24 * 3600


# --- fast: durations, the gc plan, Prefect's home, the quiet filter ---------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("7d", timedelta(days=7), id="days"),
        pytest.param("12h", timedelta(hours=12), id="hours"),
        pytest.param("1d12h", timedelta(days=1, hours=12), id="pieces-add-up"),
        pytest.param("2W", timedelta(weeks=2), id="upper-case"),
        pytest.param("90s", timedelta(seconds=90), id="seconds"),
    ],
)
def test_durations(text, expected):
    assert housekeeping.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["7", "d", "7x", "7d junk", "", "-1d"], ids=["no-unit", "no-number", "unknown-unit", "trailing", "empty", "negative"])
def test_bad_durations_say_what_is_allowed(text):
    with pytest.raises(housekeeping.DurationError, match=r"units w, d, h, m, s \(7d, 12h, 1d12h\); got"):
        housekeeping.parse_duration(text)


@pytest.mark.parametrize("text", ["1000000000d", "99999999999d", "999999999d999999999w"], ids=["days", "beyond-c-int", "sum"])
def test_a_duration_beyond_what_python_counts_is_refused_in_one_line(text):
    """`gc --older-than 1000000000d` ended in an OverflowError traceback."""
    with pytest.raises(housekeeping.DurationError, match=rf"^a duration is at most 999999999 days; got '{text}'$"):
        housekeeping.parse_duration(text)


def test_bad_duration_is_one_line_from_the_command():
    result = CliRunner().invoke(app, ["gc", "--older-than", "a week"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "cnn-train: --older-than: a duration is NUMBER+UNIT pieces with units w, d, h, m, s (7d, 12h, 1d12h); got 'a week'"
    ]


@pytest.mark.parametrize(
    ("typed", "names", "meant"),
    [
        pytest.param("lr", ["epochs", "learning_rate"], ["learning_rate"], id="initials"),
        pytest.param("arch", ["architecture", "batch_size"], ["architecture"], id="beginning"),
        pytest.param("size", ["batch_size", "seed"], ["batch_size"], id="last-part"),
        pytest.param("epoks", ["epochs", "seed"], ["epochs"], id="spelling"),
        pytest.param("Epochs", ["epochs"], ["epochs"], id="case"),
        pytest.param("xyz", ["epochs", "seed"], [], id="nothing-close"),
        pytest.param("--device", ["--prep-device", "--train-device", "--seed"], ["--prep-device", "--train-device"], id="options"),
        pytest.param("--compare-dense", ["--prep-device", "--compare"], ["--compare"], id="option-not-a-lookalike"),
    ],
)
def test_a_mistyped_name_is_answered_with_the_names_it_may_mean(typed, names, meant):
    separator = "-" if typed.startswith("--") else "_"
    assert close_names(typed, names, separator=separator) == meant


@pytest.mark.parametrize(
    ("arguments", "line"),
    [
        pytest.param(["run", "--epoch", "3"], "cnn-train: No such option: --epoch (Possible options: --epochs); "
                     "see `cnn-train run --help`", id="misspelt-option"),
        pytest.param(["run", "--lr", "0.01"], "cnn-train: No such option: --lr (Possible options: --learning-rate); "
                     "see `cnn-train run --help`", id="option-by-its-initials"),
        pytest.param(["run", "--device", "cpu"], "cnn-train: No such option: --device (Possible options: --evaluate-device, "
                     "--prep-device, --train-device); see `cnn-train run --help`", id="option-by-its-last-word"),
        pytest.param(["run", "--xyz", "1"], "cnn-train: No such option: --xyz; see `cnn-train run --help`",
                     id="option-like-none"),
        pytest.param(["compare", "--compare-dense"], "cnn-train: No such option: --compare-dense; "
                     "see `cnn-train compare --help`", id="option-of-another-command"),  # not --prep-device
        pytest.param(["run", "--epochs", "three"], "cnn-train: Invalid value for '--epochs': Input should be a valid "
                     "integer, unable to parse string as an integer; see `cnn-train run --help`", id="not-a-number"),
        pytest.param(["sweep", "--architecture", "resnet"], "cnn-train: Invalid value for '--architecture': 'resnet' "
                     "is not one of 'cnn', 'dense', 'cnn-improved'; see `cnn-train sweep --help`", id="closed-choice"),
        pytest.param(["up", "--host", "192.0.2.7"], "cnn-train: Invalid value for '--host': '192.0.2.7' is not one of "
                     "'127.0.0.1', '0.0.0.0'; see `cnn-train up --help`", id="host-the-clients-would-not-reach"),
        pytest.param(["predict"], "cnn-train: Missing argument 'PATH'; see `cnn-train predict --help`", id="missing-argument"),
        pytest.param(["up", "--watch-timeout", "-5"], "cnn-train: Invalid value for '--watch-timeout': Input should be greater than or equal to 1; see `cnn-train up --help`", id="negative-wait"),
        pytest.param(["run", "--epochs"], "cnn-train: Option '--epochs' requires an argument", id="option-without-value"),
        pytest.param(["trian"], "cnn-train: No such command 'trian'; see `cnn-train --help`", id="unknown-command"),
        # The last one won, without a word.
        pytest.param(["trigger", "-p", "epochs=1", "-p", "epochs=2"], "cnn-train: --param gives epochs twice; give each parameter once",
                     id="a-parameter-twice"),
        # Prefect's API answered 422 with a traceback.
        pytest.param(["runs", "--limit", "201"], "cnn-train: Invalid value for '--limit': Input should be less than or equal to 200; "
                     "see `cnn-train runs --help`", id="more-runs-than-the-api-gives"),
        pytest.param(["runs", "--state", "faild"], "cnn-train: Invalid value for '--state': 'faild' is not one of 'scheduled', "
                     "'pending', 'running', 'completed', 'failed', 'cancelled', 'crashed', 'paused', 'cancelling' (did you mean "
                     "failed?); see `cnn-train runs --help`", id="a-state-prefect-has-not"),
        pytest.param(["runs", "--state", "FAIL"], "cnn-train: Invalid value for '--state': 'FAIL' is not one of 'scheduled', "
                     "'pending', 'running', 'completed', 'failed', 'cancelled', 'crashed', 'paused', 'cancelling' (did you mean "
                     "failed?); see `cnn-train runs --help`", id="a-state-cut-short"),
        pytest.param(["run", "--architecture", "cnn_improved"], "cnn-train: Invalid value for '--architecture': 'cnn_improved' "
                     "is not one of 'cnn', 'dense', 'cnn-improved' (did you mean cnn-improved?); see `cnn-train run --help`",
                     id="closed-choice-misspelt"),
    ],
)
def test_a_command_line_mistake_is_one_line(arguments, line):
    """As typed in a terminal (the installed command, not CliRunner): Click alone prints four lines."""
    result = subprocess.run([BIN / "cnn-train", *arguments], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr.splitlines()) == (2, "", [line])


@pytest.mark.parametrize("value", ["abc", "0", "65536", "-1", "42.5"])
def test_a_port_variable_that_holds_no_port_is_one_line(tmp_path, value):
    env = os.environ | {"CNN_TRAIN_STATE_DIR": str(tmp_path / "state"), "CNN_TRAIN_MLFLOW_PORT": value}
    result = subprocess.run([BIN / "cnn-train", "status"], env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.splitlines()) == (1, [
        f"cnn-train: CNN_TRAIN_MLFLOW_PORT={value!r} is not a port: set a whole number from 1 to 65535, or unset it "
        "to use the port `cnn-train up` recorded, else 5000"
    ])


@pytest.mark.parametrize(
    ("command", "variable"),
    [(["runs"], "CNN_TRAIN_PREFECT_PORT"), (["doctor"], "CNN_TRAIN_MLFLOW_PORT"), (["models"], "CNN_TRAIN_PREFECT_PORT"),
     (["run", "--epochs", "1"], "CNN_TRAIN_MLFLOW_PORT"), (["backends"], "CNN_TRAIN_MLFLOW_PORT")],
    ids=["runs", "doctor", "models", "run", "backends"],
)
def test_every_command_refuses_a_port_variable_that_holds_no_port(tmp_path, command, variable):
    """runs, models, predict and run ignored it, and doctor blamed PREFECT_API_URL."""
    env = os.environ | {"CNN_TRAIN_STATE_DIR": str(tmp_path / "state"), variable: "abc"}
    result = subprocess.run([BIN / "cnn-train", *command], env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.splitlines()[0]) == (1, f"cnn-train: {variable}='abc' is not a port: set a whole number from 1 to 65535, or unset it to use "
                                                                    f"the port `cnn-train up` recorded, else {5000 if 'MLFLOW' in variable else 4200}")


@pytest.mark.parametrize("command", [["runs"], ["doctor"], ["run", "--epochs", "1"]])
def test_a_malformed_prefect_api_url_is_one_line_before_prefect_reads_it(tmp_path, command):
    """Prefect's first import refused it with a settings traceback ("Failed to initialize plugins")."""
    env = os.environ | {"CNN_TRAIN_STATE_DIR": str(tmp_path / "state"), "PREFECT_API_URL": "http://[::1"}
    result = subprocess.run([BIN / "cnn-train", *command], env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.splitlines()) == (1, ["cnn-train: PREFECT_API_URL 'http://[::1' is not a valid address: Invalid IPv6 URL"])


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on (and never answers)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("server", ["prefect", "mlflow"])
def test_up_on_a_port_another_program_holds_is_one_line_and_starts_nothing(tmp_path, held_port, server):
    """With MLflow's port held, `up` started the Prefect server first and left it running."""
    ports = {"prefect": str(free_port()), "mlflow": str(free_port())} | {server: str(held_port)}
    env = bare_env(tmp_path) | {"CNN_TRAIN_PREFECT_PORT": ports["prefect"], "CNN_TRAIN_MLFLOW_PORT": ports["mlflow"]}
    result = subprocess.run([BIN / "cnn-train", "up", "--no-trigger"], env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.splitlines()) == (1, [
        f"cnn-train: {server}-server cannot listen on 127.0.0.1:{held_port}: address already in use, by a program that "
        f"does not answer as {server}-server; stop it, or choose a free port with CNN_TRAIN_{server.upper()}_PORT"
    ])
    assert "starting" not in result.stdout, result.stdout
    assert list((tmp_path / "state" / "run").glob("*")) == []
    assert not (tmp_path / ".prefect" / "profiles.toml").exists(), "the user's Prefect profile is left alone"


@pytest.mark.parametrize("pool", ["bad/pool", "a&b", "<pool>"])
def test_up_worker_with_a_pool_name_prefect_refuses_is_one_line_and_starts_or_stops_nothing(tmp_path, pool):
    """It printed pydantic's traceback after stopping the serve process: nothing ran the deployments."""
    env = bare_env(tmp_path) | {
        "CNN_TRAIN_WORK_POOL": pool, "CNN_TRAIN_PREFECT_PORT": str(free_port()), "CNN_TRAIN_MLFLOW_PORT": str(free_port()),
    }
    result = subprocess.run([BIN / "cnn-train", "up", "--worker", "--no-trigger"], env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.splitlines()) == (1, [
        f"cnn-train: CNN_TRAIN_WORK_POOL={pool!r} is no work pool name: Prefect's take any characters but / % & > <; "
        "unset it for 'cnn-train'"
    ])
    assert list((tmp_path / "state" / "run").glob("*")) == []


def test_the_mlflow_server_on_a_held_port_is_refused_before_it_starts(tmp_path, monkeypatch, held_port):
    from cnn_train.flows.ops import services
    from cnn_train.flows.ops.detached import PortInUseError

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CNN_TRAIN_MLFLOW_PORT", str(held_port))
    with pytest.raises(PortInUseError, match=f"^mlflow-server cannot listen on 127.0.0.1:{held_port}: .*"
                       "CNN_TRAIN_MLFLOW_PORT$"):
        services.mlflow_server.start(timeout=30)
    assert not services.mlflow_server.pid_file.exists()


@pytest.fixture
def answering_server() -> Iterator[Callable[[dict[str, object]], int]]:
    """Start a loopback HTTP server that answers every GET, with the JSON given for a path; returns its port."""
    import http.server
    import threading

    servers: list[http.server.ThreadingHTTPServer] = []

    def start(answers: dict[str, object]) -> int:
        class Answering(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = json.dumps(answers.get(self.path, {})).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answering)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_prefect_server_up_did_not_start_is_used_and_named_as_such(tmp_path, monkeypatch, answering_server):
    """A Prefect server of the user's own on this project's port: up serves the deployments there, and says so."""
    from cnn_train.flows.ops import launcher, services

    port = answering_server({})
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CNN_TRAIN_PREFECT_PORT", str(port))
    said: list[str] = []
    launcher.start_service(services.prefect_server, said.append, timeout=5)
    assert said == [
        f"prefect-server: already running on port {port}, but not started from this project (no pid in "
        f"{tmp_path / 'state' / 'run'}): runs are recorded where that server keeps them; stop it, or choose "
        "another port with CNN_TRAIN_PREFECT_PORT, to have this project's own"
    ]
    for worker in (False, True):  # nothing runs cnn-train/default there yet: up may take it, either way
        launcher.refuse_taking_the_deployments(worker=worker)


_SERVED_ELSEWHERE = (
    "cnn-train/default is already served on the Prefect server on port {port}, which was not started from this "
    "project (no pid in {run}); a second {what} would run some of its runs with this checkout's code: stop the "
    "other (`cnn-train down` in its project), or choose another port with CNN_TRAIN_PREFECT_PORT"
)
_ON_A_POOL = (
    "cnn-train/default runs from work pool 'cnn-train' on the Prefect server on port {port}, which was not started "
    "from this project (no pid in {run}); serving it here would take it off that pool: join the pool with "
    "`cnn-train up --worker`, or choose another port with CNN_TRAIN_PREFECT_PORT"
)


@pytest.mark.parametrize(
    ("deployment", "worker", "refused"),
    [
        pytest.param({"status": "READY", "work_pool_name": None}, False, _SERVED_ELSEWHERE, id="serve-beside-a-serve-process"),
        pytest.param({"status": "READY", "work_pool_name": None}, True, _SERVED_ELSEWHERE, id="worker-beside-a-serve-process"),
        pytest.param({"status": "READY", "work_pool_name": "cnn-train"}, False, _ON_A_POOL, id="serve-off-a-polled-pool"),
        pytest.param({"status": "READY", "work_pool_name": "cnn-train"}, True, None, id="worker-joins-a-polled-pool"),
        pytest.param({"status": "NOT_READY", "work_pool_name": None}, False, None, id="registered-but-not-served"),
        pytest.param({"status": "NOT_READY", "work_pool_name": "cnn-train"}, False, None, id="a-pool-nobody-polls"),
    ],
)
def test_up_does_not_take_the_deployments_from_another_checkout(
    tmp_path, monkeypatch, answering_server, deployment, worker, refused
):
    """Two serve processes of one deployment would take turns at its runs, each with its own checkout's code;
    serving a pooled deployment takes it off the pool its workers poll (as `cnn-train up` does after
    `up --worker` on this project's own server, where it is meant)."""
    from cnn_train.flows.ops import launcher

    port = answering_server({"/api/deployments/name/cnn-train/default": deployment})
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CNN_TRAIN_PREFECT_PORT", str(port))
    if refused is None:
        launcher.refuse_taking_the_deployments(worker=worker)
        return
    with pytest.raises(launcher.ForeignServerError) as caught:
        launcher.refuse_taking_the_deployments(worker=worker)
    what = "worker" if worker else "serve process"
    assert str(caught.value) == refused.format(port=port, run=tmp_path / "state" / "run", what=what)


def test_an_mlflow_server_up_did_not_start_is_refused_unless_this_shell_logs_there(tmp_path, monkeypatch, answering_server):
    """Its serve process would log to that server and every other command to the project's mlflow.db."""
    from cnn_train.flows.ops import launcher

    port = answering_server({})
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CNN_TRAIN_ROOT", str(tmp_path))
    monkeypatch.setenv("CNN_TRAIN_MLFLOW_PORT", str(port))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(launcher.ForeignServerError) as caught:
        launcher.refuse_foreign_mlflow_server()
    assert str(caught.value) == (
        f"mlflow-server: port {port} answers, but not started from this project (no pid in {tmp_path / 'state' / 'run'}); "
        f"this project's deployment runs would be recorded there and its other runs in sqlite:///{tmp_path}/mlflow.db: "
        "stop that server, or choose another port with CNN_TRAIN_MLFLOW_PORT"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}/")
    launcher.refuse_foreign_mlflow_server()


def test_a_heartbeat_prefect_would_refuse_is_one_line_and_help_still_shows(tmp_path):
    env = os.environ | {"CNN_TRAIN_STATE_DIR": str(tmp_path / "state"), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "10"}
    shown = subprocess.run([BIN / "cnn-train", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert (shown.returncode, shown.stderr) == (0, "") and "Usage: cnn-train" in shown.stdout
    result = subprocess.run([BIN / "cnn-train", "status"], env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr.splitlines()) == (1, [
        "cnn-train: PREFECT_FLOWS_HEARTBEAT_FREQUENCY='10' is refused by Prefect: set a whole number of seconds, "
        "at least 30, or unset it for cnn-train's 30"
    ])


@pytest.mark.parametrize(
    ("value", "whole", "expected"),
    [
        pytest.param(None, False, 20.0, id="unset"),
        pytest.param("", False, 20.0, id="empty"),
        pytest.param("2.5", False, 2.5, id="a-number"),
        pytest.param(" 45 ", True, 45, id="a-whole-number"),
        pytest.param("45.0", True, 45, id="a-whole-number-with-a-point"),
        pytest.param("2.5", True, 20.0, id="not-whole"),
        pytest.param("0.01", False, 20.0, id="below-the-minimum"),
        pytest.param("nan", False, 20.0, id="nan"),
        pytest.param("inf", False, 20.0, id="infinite"),
        pytest.param("soon", False, 20.0, id="not-a-number"),
    ],
)
def test_env_number_takes_a_valid_value_and_ignores_any_other_saying_so(monkeypatch, caplog, value, whole, expected):
    from cnn_train.flows.settings import env_number

    if value is None:
        monkeypatch.delenv("CNN_TRAIN_TEST_KNOB", raising=False)
    else:
        monkeypatch.setenv("CNN_TRAIN_TEST_KNOB", value)
    with caplog.at_level(logging.WARNING, logger="cnn_train.flows.settings"):
        number = env_number("CNN_TRAIN_TEST_KNOB", 20.0, minimum=0.1, whole=whole)
    assert (number, type(number)) == (expected, type(expected))
    ignored = expected == 20.0 and value not in (None, "")
    assert [record.getMessage().split(":")[0] for record in caplog.records] == (
        [f"ignoring $CNN_TRAIN_TEST_KNOB={value!r}"] if ignored else []
    )


def _aged(path: Path, days: float, *, size: int = 10, folder: bool = False) -> Path:
    """A file, or a folder holding one, last written ``days`` ago."""
    file = path / "weights" if folder else path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(b"x" * size)
    when = time.time() - days * DAY
    for item in {file, path}:
        os.utime(item, (when, when))
    return path


#: What a `cnn-train` command sets in its environment before it runs (and the test session must not keep).
_CLI_ENVIRONMENT = (
    "MPLCONFIGDIR", "PREFECT_PROFILES_PATH", "MLFLOW_LOGGING_LEVEL", "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED",
    "MLFLOW_DISABLE_TELEMETRY", "PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM", "MLFLOW_CONFIGURE_LOGGING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
)


@pytest.fixture(autouse=True)
def _undo_the_commands_settings(monkeypatch):
    """Commands invoked here in-process run the CLI's settings and quieting: keep them from outliving the test."""
    for name in _CLI_ENVIRONMENT:
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    loggers = [logging.getLogger(name) for name in quiet._ANNOUNCEMENTS]
    filters = [list(logger.filters) for logger in loggers]
    mlflow_level = logging.getLogger("mlflow").level
    yield
    for logger, kept in zip(loggers, filters):
        logger.filters[:] = kept
    logging.getLogger("mlflow").setLevel(mlflow_level)


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / ".state"))
    return tmp_path / ".state"


RUN = {name: f"{index:032x}" for index, name in enumerate(
    ["finished", "failed-old", "failed-young", "killed-old", "running-young", "running-old", "unknown-old"]
)}


@pytest.mark.parametrize(
    ("run", "status", "days", "pruned"),
    [
        pytest.param("finished", "FINISHED", 0, True, id="finished-goes-at-once"),
        pytest.param("failed-old", "FAILED", 9, True, id="failed-older-than-the-age"),
        pytest.param("failed-young", "FAILED", 2, False, id="failed-young-kept-for-a-retry"),
        pytest.param("killed-old", "KILLED", 9, True, id="killed-older-than-the-age"),
        pytest.param("running-young", "RUNNING", 0, False, id="running-kept"),
        # A run still training between two checkpoints (`gc --older-than 1s` removed its checkpoint).
        pytest.param("running-old", "RUNNING", 9, False, id="running-kept-whatever-its-age"),
        pytest.param("unknown-old", None, 9, True, id="unknown-to-the-store-by-age"),
    ],
)
def test_gc_prunes_checkpoints_by_status_and_age(state, run, status, days, pruned):
    checkpoint = _aged(state / "checkpoints" / RUN[run], days, folder=True)
    plan = housekeeping.plan_gc(timedelta(days=7), run_status={RUN[run]: status}.get, running_services=[])
    assert [removal.path for removal in plan] == ([checkpoint] if pruned else [])


def test_gc_prunes_the_temporary_server_and_stopped_servers_files(state):
    home = state / "prefect-temporary"
    old_result = _aged(home / "storage" / "old-result", 9)
    _aged(home / "storage" / "new-result", 1)
    old_database = [_aged(home / name, 9) for name in ("prefect.db", "prefect.db-wal")]
    stopped_log = _aged(state / "logs" / "mlflow-server.log", 9)
    _aged(state / "logs" / "prefect-server.log", 9)  # its server runs: kept
    stale_pid = _aged(state / "run" / "mlflow-server.pid", 0)
    stale_port = _aged(state / "run" / "mlflow-server.port", 0)
    _aged(state / "run" / "prefect-server.port", 0)  # its server runs: kept
    plan = housekeeping.plan_gc(timedelta(days=7), run_status=lambda run_id: None, running_services=["prefect-server"])
    assert [removal.path for removal in plan] == [old_result, *old_database, stopped_log, stale_pid, stale_port]
    housekeeping.remove(plan)
    assert sorted(path.name for path in (home / "storage").iterdir()) == ["new-result"]
    assert not any(path.exists() for path in old_database)


def test_a_database_written_within_the_age_stays(state):
    home = state / "prefect-temporary"
    _aged(home / "prefect.db", 9)
    _aged(home / "prefect.db-wal", 0)  # a run wrote to it today
    assert housekeeping.plan_gc(timedelta(days=7), run_status=lambda run_id: None, running_services=[]) == []


def test_status_shows_disk_use_per_folder(state, monkeypatch, tmp_path):
    monkeypatch.setenv("CNN_TRAIN_ROOT", str(tmp_path))
    for port in ("CNN_TRAIN_PREFECT_PORT", "CNN_TRAIN_MLFLOW_PORT"):
        monkeypatch.setenv(port, str(free_port()))
    _aged(state / "checkpoints" / RUN["failed-old"], 9, size=3 * 1024 * 1024, folder=True)
    _aged(state / "cache" / "split.npz", 0, size=2048)
    _aged(state / "optuna.db", 0, size=50)
    (tmp_path / "mlflow.db").write_bytes(b"x" * 100)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()) for line in result.output.splitlines()]
    places = ("mlflow.db 100 B", "mlartifacts/ 0 B", ".state/cache/ 2.0 KB", ".state/checkpoints/ 3.0 MB", ".state/optuna.db 50 B")
    for expected in (*places, "total 3.0 MB"):
        assert expected in lines
    assert any(line.startswith("prefect-server: not running") for line in lines)


def test_status_lines_up_the_sizes_of_a_state_folder_far_from_the_project(monkeypatch, tmp_path):
    """A state folder outside the project shows as full paths, longer than the column was: sizes went ragged."""
    far = tmp_path / "a-folder-with-a-rather-long-name" / "state"
    _aged(far / "cache" / "split.npz", 0, size=2048)
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(far))
    (tmp_path / "project").mkdir()
    monkeypatch.setenv("CNN_TRAIN_ROOT", str(tmp_path / "project"))
    for port in ("CNN_TRAIN_PREFECT_PORT", "CNN_TRAIN_MLFLOW_PORT"):
        monkeypatch.setenv(port, str(free_port()))
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    disk = lines[lines.index("disk:") + 1 : -1]
    assert any(str(far) in line for line in disk), disk
    assert len({len(line) for line in disk}) == 1, "\n".join(disk)  # sizes right-aligned in one column


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        pytest.param("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000", "its runs go to http://10.0.0.5:5000, not to this project's mlflow-server or mlflow.db", id="another-mlflow-server"),
        pytest.param("PREFECT_API_URL", "http://10.0.0.5:4200/api/", "its flow runs go to http://10.0.0.5:4200/api, not to this project's prefect-server", id="another-prefect-server"),
        pytest.param("MLFLOW_TRACKING_URI", "{project_db}", None, id="the-projects-own-mlflow-db"),
        pytest.param("PREFECT_API_URL", "{project_prefect}", None, id="the-projects-own-prefect-server"),
        # The project's own server by another loopback name was called "not this project's".
        pytest.param("MLFLOW_TRACKING_URI", "{project_mlflow_by_name}", None, id="the-projects-mlflow-server-as-localhost"),
        pytest.param("PREFECT_API_URL", "{project_prefect_by_name}/", None, id="the-projects-prefect-server-as-localhost"),
    ],
)
def test_status_says_when_this_shell_sends_runs_elsewhere(state, monkeypatch, tmp_path, variable, value, said):
    """`cnn-train status` shows the project's servers; a shell whose MLFLOW_TRACKING_URI or PREFECT_API_URL
    points elsewhere records its runs there, which the server lines alone hid."""
    from cnn_train.flows.ops import services

    monkeypatch.setenv("CNN_TRAIN_ROOT", str(tmp_path))
    for port in ("CNN_TRAIN_PREFECT_PORT", "CNN_TRAIN_MLFLOW_PORT"):
        monkeypatch.setenv(port, str(free_port()))
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value.format(
        project_db=f"sqlite:///{tmp_path / 'mlflow.db'}", project_prefect=services.prefect_api_url(),
        project_mlflow_by_name=services.mlflow_url().replace("127.0.0.1", "localhost"),
        project_prefect_by_name=services.prefect_api_url().replace("127.0.0.1", "localhost"),
    ))
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    elsewhere = [line for line in result.output.splitlines() if " is set in this shell: " in line]
    assert elsewhere == ([] if said is None else [f"{variable} is set in this shell: {said}"])


@pytest.mark.parametrize("given", ["relstate", "./relstate", "~/relstate"], ids=["relative", "dot-relative", "home"])
def test_a_relative_state_dir_is_the_same_folder_from_any_working_directory(monkeypatch, tmp_path, given):
    """`cnn-train up` run from a subfolder with CNN_TRAIN_STATE_DIR=relstate gave its Prefect server (which runs
    in the project root) a database path that did not exist there: the server failed to start."""
    from cnn_train.flows.settings import state_dir

    (tmp_path / "project").mkdir()
    monkeypatch.setenv("CNN_TRAIN_ROOT", str(tmp_path / "project"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", given)
    expected = (tmp_path / "home" if given.startswith("~") else tmp_path / "project") / "relstate"
    for working in (tmp_path, tmp_path / "project"):
        working.mkdir(exist_ok=True)
        monkeypatch.chdir(working)
        assert state_dir() == expected and expected.is_dir()


def test_libraries_keep_their_files_under_the_state_dir(state, tmp_path):
    environ = {"HOME": str(tmp_path / "home")}
    keep_library_state_in_project(environ)
    assert environ["PREFECT_HOME"] == str(state / "prefect-temporary")
    assert Path(environ["PREFECT_HOME"]).is_dir()  # Prefect creates it without parents, and only warns
    # The user's profile (where `cnn-train up` sets PREFECT_API_URL) is still the one read.
    assert environ["PREFECT_PROFILES_PATH"] == str(Path("~/.prefect/profiles.toml").expanduser())
    assert environ["MPLCONFIGDIR"] == str(state / "matplotlib")
    assert environ["TORCHINDUCTOR_CACHE_DIR"] == str(state / "torchinductor")


def test_what_the_user_set_wins(state):
    mine = {"PREFECT_HOME": "/mine", "PREFECT_PROFILES_PATH": "/mine/profiles.toml", "MPLCONFIGDIR": "/mine/mpl",
            "TORCHINDUCTOR_CACHE_DIR": "/mine/inductor",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "30"}
    environ = dict(mine)
    keep_library_state_in_project(environ)
    assert environ == mine


#: What `cnn-train up` and `down` do to the user's Prefect profile, in a process of its own that starts as
#: every command does (keep_library_state_in_project, then Prefect's first import reads the profile).
_UP_THEN_DOWN = """
import json, subprocess, sys
from cnn_train.flows.settings import keep_library_state_in_project
keep_library_state_in_project()
from cnn_train.flows.ops import launcher, services
said, shell = [], json.loads(sys.argv[1])
view = lambda: subprocess.run([sys.argv[2], "config", "view", "--hide-defaults"], env=shell, capture_output=True, text=True).stdout
launcher.point_prefect_cli_at_server(said.append)
launcher.point_prefect_cli_at_server(said.append)  # a second `up`: nothing to do
after_up = view()
launcher.forget_server_in_prefect_cli(said.append, services.prefect_api_url())
print(json.dumps({"url": services.prefect_api_url(), "after_up": after_up, "after_down": view(), "said": said}))
"""


def test_a_profile_that_cannot_be_written_is_one_line_and_up_goes_on(tmp_path):
    """~/.prefect is a file: setting PREFECT_API_URL there fails; up says so and how to reach the server instead."""
    import json

    (tmp_path / ".prefect").write_text("not a folder")
    shell = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH", "PREFECT_HOME")}
    shell |= {"HOME": str(tmp_path), "CNN_TRAIN_STATE_DIR": str(tmp_path / "state"), "CNN_TRAIN_PREFECT_PORT": "4399"}
    done = subprocess.run([sys.executable, "-c", _UP_THEN_DOWN, json.dumps(shell), str(BIN / "prefect")], env=shell,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (first, *rest) = json.loads(done.stdout.strip().splitlines()[-1])["said"]
    assert first.startswith(f"prefect profile: not updated, {tmp_path / '.prefect' / 'profiles.toml'} cannot be written (")
    assert first.endswith("a plain `prefect` command reaches this server with PREFECT_API_URL=http://127.0.0.1:4399/api "
                          "set in its shell")
    assert rest == [first]  # the second `up` says it again; `down` has nothing to undo


@pytest.mark.parametrize("users_home", [False, True], ids=["prefect-home-of-the-project", "prefect-home-of-the-users"])
def test_up_points_the_profile_the_users_shell_reads_at_its_server(state, tmp_path, users_home):
    """With a PREFECT_HOME of their own, the user's `prefect deployment run` reads the profiles file
    under it: `cnn-train up` set PREFECT_API_URL in ~/.prefect's instead, so the deployment was not found."""
    import json

    shell = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH", "PREFECT_HOME")}
    shell["HOME"] = str(tmp_path / "home")  # ~ is expanded from it, never the real home
    (tmp_path / "home").mkdir()
    if users_home:
        shell["PREFECT_HOME"] = str(tmp_path / "mine")
    command = shell | {"CNN_TRAIN_PREFECT_PORT": str(free_port())}
    prefect = str(BIN / "prefect")
    done = subprocess.run([sys.executable, "-c", _UP_THEN_DOWN, json.dumps(shell), prefect], env=command,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert f"PREFECT_API_URL='{seen['url']}'" in seen["after_up"], seen["after_up"]
    assert "PREFECT_API_URL" not in seen["after_down"], seen["after_down"]
    set_line, unset_line = seen["said"]  # one line each; the second `up` said nothing
    assert "PREFECT_API_URL set to" in set_line and "PREFECT_API_URL unset" in unset_line
    profiles = (tmp_path / "mine" if users_home else tmp_path / "home" / ".prefect") / "profiles.toml"
    assert profiles.is_file()


def test_up_says_which_server_the_profile_pointed_at_before_and_down_puts_it_back(tmp_path):
    """A second checkout's `up` re-pointed the one profile without a word: the first checkout's plain `prefect`
    commands then reached the second's server, and its `down` left them none."""
    import json

    (tmp_path / ".prefect").mkdir()
    (tmp_path / ".prefect" / "profiles.toml").write_text(
        'active = "ephemeral"\n\n[profiles.ephemeral]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n'
    )
    shell = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH", "PREFECT_HOME")}
    shell |= {"HOME": str(tmp_path), "CNN_TRAIN_STATE_DIR": str(tmp_path / "state"), "CNN_TRAIN_PREFECT_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-c", _UP_THEN_DOWN, json.dumps(shell), str(BIN / "prefect")], env=shell,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["said"] == [
        f"prefect profile: PREFECT_API_URL set to {seen['url']}, in place of http://127.0.0.1:4200/api (`cnn-train down` sets it back)",
        "prefect profile: PREFECT_API_URL set back to http://127.0.0.1:4200/api, as before `cnn-train up`",
    ]
    assert "PREFECT_API_URL='http://127.0.0.1:4200/api'" in seen["after_down"], seen["after_down"]


def test_a_temporary_server_gets_time_to_start_whoever_chose_its_home(state):
    # Prefect's 20 s default failed runs on a busy 2-core box while the server migrated its database.
    environ = {"PREFECT_HOME": "/mine"}
    keep_library_state_in_project(environ)
    assert environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"


@pytest.fixture(params=[
    pytest.param(("prefect", "Starting temporary server on http://127.0.0.1:8000\nSee https://www.prefect.io/docs/v3/concepts/server"), id="prefect-temporary-server"),
    pytest.param(("ray._private.worker", "Started a local Ray instance."), id="ray-local-instance"),
    pytest.param(
        ("ray._private.authentication.authentication_token_setup",
         "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."),
        id="ray-token-notice",
    ),
])
def announcing_logger(request):
    """A logger that announces what a command starts for itself, its announcement, and the records
    that reach a handler on it."""
    name, announcement = request.param
    logger = logging.getLogger(name)
    level = logger.level
    logger.filters.clear()  # the autouse fixture above puts them back
    logger.setLevel(logging.INFO)  # as in a `cnn-train` process (the test session logs less)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    yield logger, announcement, records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize(("verbose", "shown"), [pytest.param(False, 1, id="quiet"), pytest.param(True, 2, id="verbose")])
def test_announcements_are_dropped_unless_verbose(announcing_logger, verbose, shown):
    logger, announcement, records = announcing_logger
    environ: dict[str, str] = {}
    quiet.quiet_libraries(verbose=verbose, environ=environ)
    logger.warning(announcement)
    logger.info("something else")
    assert len(records) == shown
    assert environ == ({} if verbose else {
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    })
    if verbose:  # MLflow's INFO lines get through whichever handler prints them
        assert logging.getLogger("mlflow").getEffectiveLevel() == logging.INFO


# --- slow: five runs and a sweep, as a newcomer makes them ------------------------------------------


@pytest.fixture(scope="module")
def first_hour(mlflow_store, tmp_path_factory):
    """Four runs and a sweep in this process, and the issue's `cnn-train run` through the command line
    with a HOME of its own and no Prefect server; one store and state dir, a private temp dir."""
    from cnn_train.flows.sweep_flow import cnn_train_sweep
    from cnn_train.flows.train_flow import cnn_train

    system_tmp = tmp_path_factory.mktemp("system-tmp")
    home = tmp_path_factory.mktemp("home")
    patcher = pytest.MonkeyPatch()
    patcher.setattr(tempfile, "tempdir", str(system_tmp))
    try:
        for seed in range(4):
            state = cnn_train(**TINY, seed=seed, compare_dense=False, return_state=True)
            assert state.is_completed(), state.message
        sweep = cnn_train_sweep(grid={"learning_rate": [1e-3]}, **TINY, seed=4, return_state=True)
        assert sweep.is_completed(), sweep.message
    finally:
        patcher.undo()
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_HOME", "PREFECT_API_URL")}
    env |= {"HOME": str(home), "TMPDIR": str(system_tmp)}
    cli = subprocess.run([BIN / "cnn-train", *CLI_RUN], env=env, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-3000:]
    return {"store": mlflow_store, "tmp": system_tmp, "home": home, "cli": cli, "state": Path(os.environ["CNN_TRAIN_STATE_DIR"])}


@pytest.mark.slow
def test_no_report_folders_remain_in_the_temp_dir(first_hour):
    assert [path.name for path in first_hour["tmp"].iterdir() if path.name.startswith("cnn-train")] == []


@pytest.mark.slow
def test_nothing_was_written_to_the_home_dir(first_hour):
    assert [path.name for path in first_hour["home"].iterdir()] == []  # no .prefect, no matplotlib cache
    assert (first_hour["state"] / "prefect-temporary" / "prefect.db").is_file()


@pytest.mark.slow
def test_finished_runs_leave_no_checkpoints(first_hour):
    from mlflow import MlflowClient

    client = MlflowClient(first_hour["store"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 5 + 1 + 1 and {run.info.status for run in runs} == {"FINISHED"}
    assert list((first_hour["state"] / "checkpoints").iterdir()) == []


def _cli_run_id(first_hour) -> str:
    return re.search(r"/runs/([0-9a-f]{32})", first_hour["cli"].stdout).group(1)


@pytest.mark.slow
def test_a_run_without_servers_links_nothing_broken(first_hour, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(first_hour["store"])
    run_id = _cli_run_id(first_hour)
    report = Path(client.download_artifacts(run_id, "report/report.md", str(tmp_path))).read_text()
    links = re.findall(r"\]\(([^)]*)\)", report)
    assert not [link for link in links if link.startswith(("sqlite:", "None"))]
    assert "None/" not in report
    assert "mlflow server --backend-store-uri sqlite:///" in report  # how to open it instead
    tags = client.get_run(run_id).data.tags
    assert not {key: value for key, value in tags.items() if value.startswith("None")}
    assert "prefect.flow_run_url" not in tags  # a temporary server has no UI to link to


@pytest.mark.slow
def test_the_command_prints_no_warning_and_no_prefect_docs_line(first_hour):
    stderr = first_hour["cli"].stderr
    assert not re.search(r"\w*Warning: ", stderr), stderr
    assert "prefect.io/docs" not in stderr and "temporary server" not in stderr
    assert "Creating initial MLflow database tables" not in stderr  # MLflow's INFO lines
    cli = first_hour["cli"]
    assert "Finished in state Completed" in cli.stdout + cli.stderr  # the run's own progress still shows


@pytest.mark.slow
def test_gc_prunes_a_failed_runs_old_checkpoint_and_keeps_a_young_one(first_hour):
    from mlflow import MlflowClient

    client = MlflowClient(first_hour["store"])
    experiment = client.get_experiment_by_name("cnn-train").experiment_id
    old, young = (client.create_run(experiment).info.run_id for _ in range(2))
    for run_id in (old, young):
        client.set_terminated(run_id, "FAILED")
    checkpoints = first_hour["state"] / "checkpoints"
    _aged(checkpoints / old, 9, folder=True)
    _aged(checkpoints / young, 1, folder=True)
    result = CliRunner().invoke(app, ["gc", "--older-than", "7d"])
    assert result.exit_code == 0, result.output
    assert f"removed {checkpoints / old} (10 B): checkpoint of a FAILED run, untouched for 9 d 0 h" in result.output
    assert sorted(path.name for path in checkpoints.iterdir()) == [young]


@pytest.mark.slow
def test_runs_lists_the_recent_flow_runs(first_hour, prefect_api_url):
    result = CliRunner().invoke(app, ["runs", "--limit", "3"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert re.fullmatch(rf"the newest 3 of \d+ cnn-train flow runs on {re.escape(prefect_api_url)}, newest first:", lines[0])
    assert len(lines) == 2 + 3 and all("Completed" in line.split() for line in lines[2:])
    assert "cnn-train-sweep" in lines[2].split()  # the newest: the sweep came after the four runs


def test_runs_lists_cnn_trains_flow_runs_and_says_how_many_there_are(prefect_api_url):
    """On a team's Prefect server, `cnn-train runs` showed ten runs of the team's other flow and none of
    cnn-train's, and never said how many it left out."""
    from prefect import flow

    @flow(name="team-etl", persist_result=False)
    def team_etl() -> None:
        """Another flow on the same server."""

    for _ in range(3):
        team_etl()
    ours = CliRunner().invoke(app, ["runs", "--limit", "200"], env={"COLUMNS": "250"})
    assert ours.exit_code == 0 and "team-etl" not in ours.output, ours.output
    every = CliRunner().invoke(app, ["runs", "--all-flows", "--limit", "2"], env={"COLUMNS": "250"})
    assert every.exit_code == 0, every.output
    lines = every.output.splitlines()
    assert re.fullmatch(rf"the newest 2 of \d+ flow runs on {re.escape(prefect_api_url)}, newest first:", lines[0])
    assert [line.split()[2] for line in lines[2:]] == ["team-etl", "team-etl"]


_FROM_PYTHON = """
import sys
from cnn_train.flows.settings import configure_process
configure_process()
from cnn_train.flows.train_flow import cnn_train
result = cnn_train(epochs=1, sample_limit=300, test_limit=100, data_dir=sys.argv[1])
print("accuracy", result["test_accuracy"], result["mlflow_run_url"])
"""


@pytest.mark.slow
def test_a_script_calling_the_flow_is_set_up_as_the_commands_are(tmp_path, real_fashion_mnist_dir):
    """A notebook calling the flow wrote ~/.prefect/prefect.db and printed MLflow's store set-up and
    Prefect's temporary-server notice; configure_process() does what every command does first."""
    script = tmp_path / "notebook.py"
    script.write_text(_FROM_PYTHON)
    env = bare_env(tmp_path)
    result = subprocess.run([sys.executable, str(script), str(real_fashion_mnist_dir)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "accuracy" in result.stdout and result.stdout.rstrip().endswith("None")
    output = result.stdout + result.stderr
    for noise in ("Creating initial MLflow database tables", "Starting temporary server", "system metrics", "Traceback"):
        assert noise not in output, noise
    assert not (tmp_path / ".prefect").exists(), "Prefect's state stays in the project's state folder"
    assert (tmp_path / "state" / "prefect-temporary").is_dir()


def test_runs_lists_only_the_flow_runs_in_the_states_asked_for(prefect_api_url):
    from prefect import flow

    @flow(name="team-flaky", persist_result=False)
    def team_flaky(fail: bool) -> None:
        """Another flow on the same server, failing when asked."""
        if fail:
            raise RuntimeError("flaky")

    team_flaky(False)
    with pytest.raises(RuntimeError):
        team_flaky(True)
    # Either case: the header itself says FAILED.
    failed = CliRunner().invoke(app, ["runs", "--all-flows", "--state", "FAILED", "--state", "crashed", "--limit", "200"], env={"COLUMNS": "250"})
    assert failed.exit_code == 0, failed.output
    lines = failed.output.splitlines()
    assert re.fullmatch(
        rf"all \d+ flow runs in state FAILED or CRASHED on {re.escape(prefect_api_url)}, newest first:", lines[0]
    ), lines[0]
    assert {line.split()[4] for line in lines[2:]} <= {"Failed", "Crashed"} and "team-flaky" in failed.output
    ours = CliRunner().invoke(app, ["runs", "--state", "cancelling"], env={"COLUMNS": "250"})
    assert ours.output == f"no cnn-train flow runs in state CANCELLING on {prefect_api_url} (--all-flows lists other flows' runs too)\n"


def test_runs_state_choices_are_prefects_state_types():
    from prefect.client.schemas.objects import StateType

    from cnn_train.flows.flow_runs import STATE_TYPES

    assert STATE_TYPES == tuple(state.value.lower() for state in StateType)


@pytest.mark.parametrize(
    ("pool", "nobody"),
    [
        pytest.param(None, "nothing serves give-up-probe/unserved", id="served-deployment"),
        pytest.param("nobody-polls", "no worker polls work pool 'nobody-polls'", id="pool-deployment"),
    ],
)
def test_a_watch_that_gives_up_says_who_should_have_taken_the_run(prefect_api_url, pool, nobody):
    """A run nobody takes stays Scheduled: the watch names the serve process or the pool's worker it waits for."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    name = "unserved" if pool is None else "pooled"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("give-up-probe")
        if pool:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
        deployment_id = client.create_deployment(flow_id=flow_id, name=name, work_pool_name=pool)
    try:
        result = CliRunner().invoke(app, ["trigger", f"give-up-probe/{name}", "--watch", "--watch-timeout", "2"])
        assert result.exit_code == 1, result.output
        assert result.output.splitlines()[-1] == f"cnn-train: gave up after 2 s; a run left Scheduled means {nobody} (`cnn-train doctor`)"
    finally:  # nothing left Scheduled for the session server's later tests
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))):
                client.delete_flow_run(run.id)
            client.delete_deployment(deployment_id)
            if pool:
                client.delete_work_pool(pool)


def test_ctrl_c_on_a_watch_stops_the_watch_and_says_the_run_goes_on(prefect_api_url):
    """The watch ended without a word, and a user could not tell whether the flow run had stopped too."""
    import signal

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(flow_id=client.create_flow_from_name("watch-probe"), name="unserved")
    watcher = subprocess.Popen(  # noqa: S603 - our own command
        [BIN / "cnn-train", "trigger", "watch-probe/unserved", "--watch"],
        env=os.environ | {"PREFECT_API_URL": prefect_api_url}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = watcher.stdout.readline()  # "flow run NAME: URL", printed once the run exists
        name = first.split()[2].rstrip(":")
        watcher.stdout.readline()  # its first state: the watch is waiting
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=60)
        with get_client(sync_client=True) as client:
            (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        assert watcher.returncode == 130, first + err
        assert err.splitlines() == [
            f"stopped watching flow run {name}; it goes on: `cnn-train runs` shows how it ends, "
            f"`prefect flow-run cancel {run.id}` stops it"
        ]
        assert run.state.name == "Scheduled"  # the run itself is untouched
    finally:
        watcher.kill()
        watcher.communicate()
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))):
                client.delete_flow_run(run.id)
            client.delete_deployment(deployment_id)


def test_runs_lines_up_each_column_under_its_header():
    import pandas as pd

    from cnn_train.flows.cli.state import left_aligned

    table = pd.DataFrame({
        "flow": ["cnn-train-predict", "cnn-train"],
        "state": ["Crashed", "Completed"],
        "message": ["Execution was aborted by an interrupt signal.", ""],
    })
    lines = left_aligned(table).splitlines()
    for column in table.columns:  # each value starts where its header does
        start = lines[0].index(column)
        assert all(line[start:].startswith(value) for line, value in zip(lines[1:], table[column]) if value)
    assert all(line == line.rstrip() for line in lines)


# --- slow: a failing trigger through a served deployment ---------------------------------------------


@pytest.fixture
def truncated_data_dir(real_fashion_mnist_dir, tmp_path) -> Path:
    """The real files, with the test labels cut in half."""
    folder = tmp_path / "truncated"
    folder.mkdir()
    for source in real_fashion_mnist_dir.iterdir():
        (folder / source.name).symlink_to(source)
    broken = folder / "t10k-labels-idx1-ubyte.gz"
    data = broken.read_bytes()
    broken.unlink()
    broken.write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture
def served(mlflow_store, prefect_api_url, tmp_path):
    """`python -m cnn_train.flows.ops.serve` against the session's Prefect server, until the deployment is READY."""
    from cnn_train.flows.ops import doctor

    log = tmp_path / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "cnn_train.flows.ops.serve"],
            env=os.environ | {"PREFECT_API_URL": prefect_api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while not doctor.check_deployment(prefect_api_url).ok:
            assert process.poll() is None and time.monotonic() < deadline, "the serve process did not serve cnn-train/default"
            time.sleep(1)
        yield prefect_api_url
    finally:
        stop_group(process, log=log)


class _LateLogs:
    """A Prefect client whose server shows the Failed state before the runner's last log batch lands:
    each read of the logs returns the next of ``batches``, then the last one for good."""

    def __init__(self, batches: list[list[str]]) -> None:
        self.batches = batches
        self.reads = 0

    def __enter__(self) -> _LateLogs:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read_flow_run(self, flow_run_id: str) -> object:
        state = type("State", (), {"message": "Flow run encountered an exception: boom"})()
        return type("FlowRun", (), {"state": state})()

    def read_logs(self, **_: object) -> list[object]:
        batch = self.batches[min(self.reads, len(self.batches) - 1)]
        self.reads += 1
        return [type("Log", (), {"message": message})() for message in batch]


@pytest.mark.parametrize(
    "batches, shown",
    [
        pytest.param([["boom"]], ["boom"], id="logs-already-there"),
        pytest.param([[], [], ["Task failed"], ["Task failed", "boom"]], ["Task failed", "boom"], id="logs-land-late"),
        pytest.param([[]], [], id="logs-never-reach-the-api"),
        pytest.param(
            [[
                "Finished in state Failed('Flow run encountered an exception: boom')",
                'Traceback (most recent call last):\n  File "flow.py", line 3, in run\nValueError: boom',
                "Engine execution exited with unexpected exception",
            ]],
            ["Traceback (most recent call last):", '  File "flow.py", line 3, in run', "ValueError: boom"],
            id="restatements-left-out",
        ),
    ],
)
def test_a_failures_reason_waits_for_the_runners_last_log_batch(monkeypatch, batches, shown):
    import prefect.client.orchestration

    from cnn_train.flows import flow_runs

    client = _LateLogs(batches)
    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda **_: client)
    reason = flow_runs.failure_reason("6f1c1f7e-3c1a-4c55-9a39-2d0f4f0a9c11", settle_seconds=2.0, poll_seconds=0.01)
    assert reason[0] == "state message: Flow run encountered an exception: boom"
    assert reason[1:] == (["last error log lines:", *(f"  {line}" for line in shown)] if shown else [])


FLOW_RUN = "0b5d7c1e-6a3f-4d59-9e0a-1c2d3e4f5a6b"


def _recorded(store: str, experiment: str, metrics: dict[str, float], **tags: str) -> str:
    """A finished MLflow run of flow run FLOW_RUN in ``experiment``, with ``metrics``; its id."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, tags={"prefect.flow_run_id": FLOW_RUN, **tags})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.mark.parametrize(
    ("experiment", "metrics", "shown"),
    [
        pytest.param("cnn-train", {"test_accuracy": 0.9167, "dense.test_accuracy": 0.8749, "test_loss": 0.25},
                     ["test accuracy: 0.9167", "dense network test accuracy: 0.8749"], id="training"),
        pytest.param("cnn-train", {"keras.test_accuracy": 0.9185, "torch.test_accuracy": 0.9167, "accuracy_gap_points": 0.18},
                     ["keras test accuracy: 0.9185", "torch test accuracy: 0.9167", "accuracy gap: 0.18 points"], id="compare"),
        pytest.param("cnn-train", {"best_test_accuracy": 0.9012}, ["best trial's test accuracy: 0.9012"], id="sweep"),
        pytest.param("cnn-train", {"best_value": 0.88, "trials_complete": 3}, ["best trial's objective: 0.8800"], id="study"),
        pytest.param("cnn-train-predict", {"images_classified": 3, "images_failed": 0},
                     ["images classified: 3"], id="prediction"),
        pytest.param("cnn-train-predict", {"images_classified": 2, "images_failed": 1},
                     ["images classified: 2", "images not classified (unreadable, or nothing to classify): 1"], id="prediction-with-failures"),
    ],
)
def test_a_watched_flow_runs_end_shows_its_mlflow_run_and_headline_metrics(tmp_path, experiment, metrics, shown):
    from tests.stores import new_store

    from cnn_train.flows import flow_runs

    store = new_store(tmp_path / "mlflow.db")
    run_id = _recorded(store, experiment, metrics)
    # A sweep's or a study's trials carry the flow run's tag too, and better figures: not its main run.
    _recorded(store, experiment, {"test_accuracy": 0.99}, **{"mlflow.parentRunId": run_id})
    run = flow_runs.main_mlflow_run(FLOW_RUN, store)
    assert run.info.run_id == run_id
    lines = flow_runs.outcome_lines(run, store)
    assert lines[0].startswith("MLflow run: ") and run_id in lines[0]
    assert lines[1:] == shown


@pytest.mark.parametrize(
    ("metrics", "tags", "last"),
    [
        pytest.param({"accuracy_gap_points": 2.7}, {"cnn_train.role": "compare", "mlflow.note.content": "keras against torch: "
                     "**no parity**, 2.70 points apart (tolerance 1.00).\n\nThe whole comparison: `compare/compare.md`."},
                     "keras against torch: no parity, 2.70 points apart (tolerance 1.00).", id="compare-verdict"),
        pytest.param({"best_test_accuracy": 0.7036}, {"cnn_train.role": "sweep", "mlflow.note.content": "Best trial: "
                     "learning_rate=0.003, test accuracy 70.36% (MLflow run `abc`).\n\nThe ranking: `sweep/ranking.md`."},
                     "Best trial: learning_rate=0.003, test accuracy 70.36% (MLflow run abc).", id="sweep-best-values"),
        pytest.param({"best_value": 0.7875}, {"cnn_train.role": "tune", "mlflow.note.content": "**Best trial: 3, "
                     "val_accuracy 78.75%, batch_size=64** (MLflow run `abc`).\n\nTrain it again: `cnn-train run "
                     "--batch-size 64`\n\n4 trials ended: 4 complete."},
                     "train it again: cnn-train run --batch-size 64", id="study-best-trial-and-its-command"),
        pytest.param({"test_accuracy": 0.75}, {"mlflow.note.content": "**Test accuracy 75.00%**: ..."},
                     "test accuracy: 0.7500", id="training-says-it-in-its-metrics"),
    ],
)
def test_a_watched_comparison_or_sweep_ends_on_its_verdict(tmp_path, metrics, tags, last):
    """`trigger --watch` of a comparison printed its gap but not whether the backends agreed; of a sweep,
    the best accuracy but not which values reached it."""
    from tests.stores import new_store

    from cnn_train.flows import flow_runs

    store = new_store(tmp_path / "mlflow.db")
    _recorded(store, "cnn-train", metrics, **tags)
    assert flow_runs.outcome_lines(flow_runs.main_mlflow_run(FLOW_RUN, store), store)[-1] == last


def test_a_watched_flow_runs_end_shows_its_registration(tmp_path):
    """`trigger --watch` with register=NAME ended on the test accuracy; the version and alias were only in the logs."""
    from tests.stores import new_store

    from cnn_train.flows import flow_runs, tracking

    store = new_store(tmp_path / "mlflow.db")
    registration = tracking.Registration("fmnist-cnn", 2, "challenger", "its test accuracy 75.00% does not beat ...")
    _recorded(store, "cnn-train", {"test_accuracy": 0.75}, **tracking.registration_tags(registration))
    lines = flow_runs.outcome_lines(flow_runs.main_mlflow_run(FLOW_RUN, store), store)
    assert lines[1:] == [
        "test accuracy: 0.7500", "model registry: fmnist-cnn version 2 (challenger): its test accuracy 75.00% does not beat ..."
    ]


def test_a_flow_run_that_recorded_nothing_says_so_and_creates_no_store(tmp_path):
    from cnn_train.flows import flow_runs

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = flow_runs.main_mlflow_run(FLOW_RUN, store)
    assert flow_runs.outcome_lines(run, store) == ["no MLflow run was recorded for this flow run"]
    assert not (tmp_path / "mlflow.db").exists()


def test_the_trigger_says_in_one_line_that_mlflow_did_not_answer(monkeypatch):
    from cnn_train.flows.cli.state import _mlflow_outcome

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    (line,) = _mlflow_outcome(FLOW_RUN)
    assert line.startswith("MLflow run: not looked up (MLflow tracking server http://127.0.0.1:") and "not reachable" in line


@pytest.mark.slow
def test_a_failing_trigger_says_why_in_its_terminal(served, truncated_data_dir):
    trigger = subprocess.run(
        [BIN / "cnn-train", "trigger", "cnn-train/default", "-p", f"data_dir={truncated_data_dir}",
         *(arg for key, value in TINY.items() for arg in ("-p", f"{key}={value}")), "-p", "compare_dense=false",
         "--watch", "--watch-timeout", "300"],
        env=os.environ | {"PREFECT_API_URL": served}, capture_output=True, text=True, timeout=400,
    )
    assert trigger.returncode == 1, trigger.stdout + trigger.stderr
    assert re.search(r"flow run \S+: Failed", trigger.stdout), trigger.stdout
    last = trigger.stdout.splitlines()[-1]
    assert last.startswith("MLflow run: ") and "/runs/" in last, trigger.stdout  # the failed run, to look at
    reason = trigger.stderr
    assert reason.startswith("state message: "), reason
    # One line: the state message names the file; the error logs that say it again (the task's exception,
    # its Failed state, the message itself, the engine's "Engine execution exited ...") are left out.
    assert len(reason.splitlines()) == 1, reason
    assert "t10k-labels-idx1-ubyte.gz: not a complete gzip file" in reason


def test_watching_a_flow_run_whose_server_goes_away_is_one_line():
    """Before, `trigger --watch` ended on two httpx tracebacks (106 lines) once the client's retries ran out."""
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from cnn_train.flows import flow_runs
    from cnn_train.flows.errors import ExpectedFailure

    gone = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    with temporary_settings({PREFECT_API_URL: gone, PREFECT_CLIENT_MAX_RETRIES: 0}):
        with pytest.raises(ExpectedFailure) as caught:
            flow_runs.wait_for_end(FLOW_RUN, timeout=30, on_state=lambda name: None)
    assert str(caught.value).startswith(f"the Prefect API at {gone} stopped answering while this command watched flow run {FLOW_RUN} (")
    assert str(caught.value).endswith("the run goes on where it runs: `cnn-train runs` shows how it ended once the server is back")


def test_status_with_the_worker_alive_and_the_prefect_server_gone_says_not_ready(tmp_path, monkeypatch):
    """Before, `cnn-train status` printed the services, then the worker's readiness probe's httpx traceback."""
    from cnn_train.flows.ops import services

    monkeypatch.setenv("CNN_TRAIN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CNN_TRAIN_PREFECT_PORT", str(free_port()))  # nothing listens there
    services.worker_process.pid_file.parent.mkdir(parents=True)
    services.worker_process.pid_file.write_text(str(os.getpid()))  # a live process stands in for the worker
    assert services.status()["worker"] == {
        "pid": os.getpid(), "ready": False, "log": str(services.worker_process.log_file), "port": None, "running_port": None,
        "code_changed": services.worker_process.code_changed(),
    }
