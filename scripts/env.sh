#!/usr/bin/env bash
# Runs a command inside the project's environment, creating it first when it is missing or stale:
#   bash scripts/env.sh python train.py
#   bash scripts/env.sh python -m pytest
# The environment is .venv (from requirements.txt, and this project installed into it in editable mode, so that
# `import tract` and `python -m tract.export` work from any directory and follow the checkout's code) plus two Debian
# packages: dataset-fashion-mnist (the data `python train.py` trains on by default) and shellcheck (the launch-script
# tests).
#
# TORCH_INDEX_URL: install torch and torchvision from one of torch's own wheel indexes. torch's PyPI wheel is a CUDA 13
# build with kernels from sm_75 (Turing) on that needs a recent driver; V100s (sm_70) and older drivers need the
# CUDA 12.6 build, which torch 2.14 is the last release to have (train.py names this command when it is needed):
#   rm -rf .venv && TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash scripts/env.sh python train.py \
#       --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.requirements.sha256

missing_debs=()
[ -d /usr/share/datasets/fashion-mnist ] || missing_debs+=(dataset-fashion-mnist)
command -v shellcheck >/dev/null 2>&1 || missing_debs+=(shellcheck)
if [ ${#missing_debs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else sudo=(none); fi
  if [ "${sudo[0]:-}" = none ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "env.sh: please install the Debian packages: ${missing_debs[*]} (continuing without them)" >&2
  else
    echo "env.sh: installing ${missing_debs[*]}" >&2
    "${sudo[@]}" apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing_debs[@]}" >/dev/null
  fi
fi

TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
want=$({ cat requirements.txt pyproject.toml scripts/env.sh; [ -z "$TORCH_INDEX_URL" ] || echo "$TORCH_INDEX_URL"; } \
  | sha256sum | cut -d' ' -f1)
if [ ! -x $VENV/bin/python ] || [ "$(cat $STAMP 2>/dev/null)" != "$want" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "env.sh: Python >= 3.10 is needed, $PYTHON is $("$PYTHON" --version)" >&2; exit 1; }
  echo "env.sh: setting up $VENV (a few minutes the first time)" >&2
  "$PYTHON" -m venv $VENV
  if [ -n "$TORCH_INDEX_URL" ]; then
    echo "env.sh: torch and torchvision from $TORCH_INDEX_URL" >&2
    $VENV/bin/python -m pip install -q --disable-pip-version-check --index-url "$TORCH_INDEX_URL" torch torchvision
  fi
  $VENV/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  $VENV/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > $STAMP
fi

export PATH="$PWD/$VENV/bin:$PATH" VIRTUAL_ENV="$PWD/$VENV"
exec "$@"
