#!/usr/bin/env bash
# The prepared GPU check: the 1-GPU recipe (configs/grpo_1gpu.yaml and its cold start configs/sft_1gpu.yaml) on one
# GPU, in one process per run (rl.one_process: the machine it was made for has no Ray and no vLLM). It exercises the
# learner's NCCL process group and bf16 path (DeepSpeed ZeRO-2), HF rollouts and the SR model on CUDA, and the
# reward metrics on CUDA; then the GRPO run and its placebo side by side on the same GPU.
#
#   scripts/gpu_check.sh [OUT_DIR] [key=value ...]     (OUT_DIR default: runs/gpu_check; overrides: the GRPO runs'; the
#                                                       cold start's come in SFT_ARGS)
#
# Missing packages travel as wheels in .whl/ (the device tool's README; WHEELS=none skips them); PYTHON picks the
# interpreter. Writes OUT_DIR/{gpu_check.log, grpo.log, placebo.log, gpu_curves.png, gpu_summary.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
shift || true
mkdir -p "$OUT"
PY=${PYTHON:-python3}      # the interpreter (a venv's, to try the script where the project is installed)
WHEELS=${WHEELS:-.whl}     # a folder of wheels to install first, or "none"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
start=$(date +%s)
# 1. the cold start (skipped when its export exists)
timeout "${SFT_TIMEOUT_S:-240}" "$PY" -m rl.one_process configs/sft_1gpu.yaml trainer.progress_bar=false ${SFT_ARGS:-}
echo "gpu_check: cold start in $(( $(date +%s) - start )) s"
# 2. the GRPO run and its placebo (advantages shuffled within each group) side by side on the GPU, the text from HF
#    generate (no vLLM there)
# (each capped at GRPO_TIMEOUT_S: TensorBoard is written every step, so a cut run still leaves its curve)
T=${GRPO_TIMEOUT_S:-330}
timeout "$T" "$PY" -m rl.one_process configs/grpo_1gpu.yaml rollout.engine=hf trainer.progress_bar=false "$@" \
  > "$OUT/grpo.log" 2>&1 &
real=$!
timeout "$T" "$PY" -m rl.one_process configs/grpo_1gpu.yaml name=grpo_1gpu_placebo rollout.engine=hf trainer.progress_bar=false \
  "grpo.advantage_transforms=[{name: placebo_shuffle}]" "$@" > "$OUT/placebo.log" 2>&1 &
placebo=$!
status=0
wait $real || status=$?
wait $placebo || status=$?
tail -n 5 "$OUT/grpo.log" "$OUT/placebo.log"
echo "gpu_check: all runs in $(( $(date +%s) - start )) s (exit $status)"
"$PY" -m rl.plot runs/grpo_1gpu runs/grpo_1gpu_placebo --out "$OUT/gpu_curves.png" --window 1 --tags \
  eval/reward/generation/mean eval/reward/total/mean eval/panel/psnry reward/generation/mean reward/format/mean \
  learner/image_kl || true
"$PY" - "$OUT/gpu_summary.json" <<'PY'
import json, sys
from rl.monitor import read_scalars
from pathlib import Path
keep = ("eval/", "learner/", "sft/", "reward/total", "reward/generation", "timing/step")
out = {run: {tag: values for tag, values in read_scalars(f"runs/{run}/tensorboard").items() if tag.startswith(keep)}
       for run in ("sft_1gpu", "grpo_1gpu", "grpo_1gpu_placebo") if Path(f"runs/{run}/tensorboard").is_dir()}
json.dump(out, open(sys.argv[1], "w"))
print("wrote", sys.argv[1])
PY
