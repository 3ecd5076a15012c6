#!/usr/bin/env bash
# Build the project's virtual environment once, outside the checkout, keyed by the lock's hash, and print
# its path. A later call with the same lock reuses it (CI does not rebuild ~7 GB each run).
# A half-built venv (no .complete stamp) is removed and built again.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCK="$ROOT/requirements/cpu.lock"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
KEY=$(cat "$LOCK" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-12)
CACHE=${REALSR_CACHE:-$HOME/.cache/realsr-r1-rl}
VENV="$CACHE/venv-$KEY"

if [ -f "$VENV/.complete" ]; then
  echo "$VENV"
  exit 0
fi
mkdir -p "$CACHE"
rm -rf "$VENV"
echo "setup_env: building $VENV from $LOCK (first time only: ~3.5 GB download, a few minutes)" >&2
start=$(date +%s)
"$PYTHON" -m venv "$VENV" >&2
# PyPI only: the machine's local find-links hold torch 2.13.0+cpu, which must not win (see requirements/README.md).
pypi() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$VENV/bin/pip" "$@"; }
pypi install -q --upgrade "pip==26.3" >&2
pypi install -q --no-deps -r "$LOCK" >&2
"$VENV/bin/python" - >&2 <<'PY'
import torch, torchvision, vllm, ray, deepspeed, diffusers, pyiqa, transformers  # noqa: F401
print(f"setup_env: torch {torch.__version__}, torchvision {torchvision.__version__}, vllm {vllm.__version__}")
PY
# DeepSpeed JIT-builds its CPU comm op on first use (~1-2 min on 2 cores): build it now, once, so no learner
# rank compiles inside a run (a rank killed mid-build used to leave torch's build lock behind: core/env.py).
PYTHONPATH="$ROOT" "$VENV/bin/python" -c \
  "from learner.engine import build_deepspeed_ops; print('setup_env: built DeepSpeed ops', build_deepspeed_ops())" >&2
touch "$VENV/.complete"
echo "setup_env: done in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)" >&2
echo "$VENV"
