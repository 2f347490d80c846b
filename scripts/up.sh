#!/usr/bin/env bash
# The README's main command: set up what is missing, start the Prefect server, the MLflow server and
# the cnn-train/default deployment (each only if not running), run it and print the results.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/cnn-train up "$@"
