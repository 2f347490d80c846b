#!/usr/bin/env bash
# Set up a fresh machine for cnn-train: the Fashion-MNIST files, a virtualenv, the project.
# Idempotent: a second run only checks what the first one did.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing Debian's dataset-fashion-mnist"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "bootstrap: Fashion-MNIST not in /usr/share/datasets/fashion-mnist and apt-get is unavailable or not root;"
    echo "           cnn-train will look in CNN_TRAIN_DATA_DIR and the Keras cache, then download it."
  fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi

# Torch first and pinned: a bare `torch` requirement can pull a multi-GB CUDA build.
# Set TORCH_SPEC (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126") to choose.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
stamp=".venv/.cnn-train-installed"
want="$(cat pyproject.toml plugins/examples/sklearn_mlp/pyproject.toml; echo "$TORCH_SPEC")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing $TORCH_SPEC and cnn-train (editable, with the test and ray extras)"
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q --disable-pip-version-check $TORCH_SPEC
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,ray]"
  printf '%s' "$want" > "$stamp"
fi
