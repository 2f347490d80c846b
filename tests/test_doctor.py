"""`cnn-train doctor` tells what is missing: the Prefect server, whatever serves the deployment,
the MLflow server, the dataset."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cnn_train.flows import doctor


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_missing_prefect_server_is_reported():
    finding = doctor.check_prefect_server(f"{_dead_url()}/api")
    assert not finding.ok
    assert "does not answer" in finding.detail and "cnn-train up" in finding.fix


def test_no_prefect_api_configured_is_reported():
    finding = doctor.check_prefect_server(None)
    assert not finding.ok and "no PREFECT_API_URL" in finding.detail


def test_missing_mlflow_server_is_reported():
    finding = doctor.check_tracking(_dead_url())
    assert not finding.ok
    assert "is not reachable" in finding.detail and "cnn-train up" in finding.detail


def test_missing_dataset_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_TRAIN_DATA_DIR", str(tmp_path))
    finding = doctor.check_dataset()
    assert not finding.ok
    assert "train-images-idx3-ubyte.gz" in finding.detail


def test_present_dataset_is_ok(real_fashion_mnist_dir):
    finding = doctor.check_dataset(real_fashion_mnist_dir)
    assert finding.ok and str(real_fashion_mnist_dir) in finding.detail


@pytest.mark.slow
def test_deployment_not_deployed_then_not_served(prefect_api_url):
    missing = doctor.check_deployment(prefect_api_url, name="cnn-train/doctor-test")
    assert not missing.ok and "is not deployed" in missing.detail

    from cnn_train.flows.train_flow import cnn_train

    # Registered with the server but with nothing polling for its runs, as after a dead serve process.
    cnn_train.to_deployment(name="doctor-test").apply()
    unserved = doctor.check_deployment(prefect_api_url, name="cnn-train/doctor-test")
    assert not unserved.ok
    assert "exists but nothing serves it" in unserved.detail and "cnn-train up" in unserved.fix


@pytest.mark.slow
def test_doctor_command_exit_code_and_lines(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"{_dead_url()}/api",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "CNN_TRAIN_DATA_DIR": str(tmp_path),
        "CNN_TRAIN_STATE_DIR": str(tmp_path / "state"),
    }
    result = subprocess.run([Path(sys.executable).with_name("cnn-train"), "doctor"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL prefect server:") for line in lines)
    assert any(line.startswith("FAIL deployment:") for line in lines)
    assert any(line.startswith("FAIL dataset:") for line in lines)
    assert any(line.startswith("ok   mlflow:") for line in lines)
