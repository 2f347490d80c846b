#!/usr/bin/env bash
# The README's test command: set up what is missing, then run the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
# Four workers on two cores: many slow tests wait (servers, outages, heartbeats), so a fourth keeps both
# cores busy through those waits; each process runs one OpenMP thread (tests/conftest.py), and each
# module runs whole on one worker. `-n 0` after these runs it in one process.
exec .venv/bin/python -m pytest -n "${CNN_TRAIN_TEST_WORKERS:-4}" --dist loadfile --no-loadscope-reorder "$@"
