#!/usr/bin/env bash
# The prepared GPU check: what one GPU without vLLM or Ray can verify of the cluster's GPU path (gpu-path review §2),
# in under 8 minutes in all. Each probe is one process of scripts/gpu_probes.py (its own memory peak, its own
# timeout); each prints one JSON line, collected into OUT_DIR/gpu_probes.json.
#
#   scripts/gpu_check.sh [OUT_DIR] [key=value ...]     (OUT_DIR default: runs/gpu_check; overrides: the recipe's GRPO
#                                                       runs', RECIPE=1 only; the cold start's come in SFT_ARGS)
#
# Time budget (the timeouts: their sum, 470 s, is the worst case; measured times go in gpu_probes.json):
#   setup: wheels, nvidia-smi, torch                     20 s
#   d. nccl-group         PROBE_D_S=30   the weight-sync group on NCCL at world size 1, 1 GiB bucketed broadcast
#   a. zero3-lora         PROBE_A_S=150  ZeRO-2 vs ZeRO-3 learners with the 1-GPU recipe's LoRA (2 steps each on HF
#                                        chains), the export through from_pretrained / peft, a ZeRO-3 checkpoint
#   b. learner-7b-memory  PROBE_B_S=150  a Qwen2.5-VL-7B-shaped learner (random bf16 on the GPU), full and LoRA: one
#                                        micro-batch at grpo_8node's sizes, peak memory, the sync gather
#   c. sr-cluster-batch   PROBE_C_S=120  an SD-x4-upscaler-shaped SR model: one rollout actor's batch (3 x 8 images)
#                                        through the three stages at 20 steps, then a TraceScorer backward per stage
#   collect                              ~1 s
# The 1-GPU recipe this script ran before (cold start 240 s + GRPO and placebo 330 s, ~10 min) no longer fits the
# budget: RECIPE=1 runs it after the probes (then the script takes ~18 min; it writes grpo.log, placebo.log,
# gpu_curves.png, gpu_summary.json as before). PROBES="a b c d" picks probes; PROBE_ARGS adds flags to every probe
# (e.g. "--tiny" for a quick look). The device tool brings back at most 8 files: this writes 2 (gpu_check.log, the
# probes' stderr included, and gpu_probes.json), 6 with RECIPE=1.
#
# Missing packages travel as wheels in .whl/ (deepspeed, diffusers, omegaconf; the device tool's README; WHEELS=none
# skips them); PYTHON picks the interpreter. Exit status: non-zero when a probe failed or timed out (or a RECIPE run).
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
status=0
LINES=$(mktemp -d)
# one probe: its JSON line into $LINES/<name>.json (a timeout or crash without one leaves a line saying so)
probe() {
  local name=$1 limit=$2 rc=0 t0
  t0=$(date +%s)
  echo "gpu_check: probe $name (timeout ${limit} s)"
  timeout -k 10 "$limit" "$PY" scripts/gpu_probes.py "$name" --device "${DEVICE:-cuda}" ${PROBE_ARGS:-} \
    > "$LINES/$name.json" || rc=$?
  if ! grep -q '^{' "$LINES/$name.json"; then
    local why="crashed"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then why="timed out after ${limit} s"; fi
    printf '{"probe": "%s", "ok": false, "exit": %d, "error": "%s: no result line"}\n' "$name" "$rc" "$why" \
      > "$LINES/$name.json"
  fi
  echo "gpu_check: probe $name exit $rc in $(( $(date +%s) - t0 )) s"
  [ "$rc" -eq 0 ] || status=1
}
for p in ${PROBES:-d a b c}; do
  case $p in
    d) probe nccl-group "${PROBE_D_S:-30}" ;;
    a) probe zero3-lora "${PROBE_A_S:-150}" ;;
    b) probe learner-7b-memory "${PROBE_B_S:-150}" ;;
    c) probe sr-cluster-batch "${PROBE_C_S:-120}" ;;
    *) echo "gpu_check: PROBES: unknown probe $p (a b c d)"; status=1 ;;
  esac
done
"$PY" - "$LINES" "$OUT/gpu_probes.json" <<'PY'
import json, sys
from pathlib import Path
lines = {}
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    text = [l for l in f.read_text().splitlines() if l.startswith("{")]
    lines[f.stem] = json.loads(text[-1]) if text else {"probe": f.stem, "ok": False, "error": "no result line"}
json.dump(lines, open(sys.argv[2], "w"), indent=1)
for name, line in lines.items():
    print(f"gpu_check: {name}: {'ok' if line.get('ok') else 'FAILED'} {line.get('failures') or line.get('error') or ''}")
print("wrote", sys.argv[2])
PY
rm -rf "$LINES"
echo "gpu_check: probes in $(( $(date +%s) - start )) s (exit $status)"
[ "${RECIPE:-0}" = 1 ] || exit $status

# ---- RECIPE=1: the 1-GPU recipe (configs/grpo_1gpu.yaml and its cold start configs/sft_1gpu.yaml) in one process per
# run (rl.one_process: no Ray, no vLLM): the learner's NCCL/bf16 path (DeepSpeed ZeRO-2), HF rollouts and the SR model
# on CUDA, the reward metrics on CUDA; then the GRPO run and its placebo side by side on the same GPU.
# 1. the cold start (skipped when its export exists)
timeout "${SFT_TIMEOUT_S:-240}" "$PY" -m rl.one_process configs/sft_1gpu.yaml trainer.progress_bar=false ${SFT_ARGS:-} \
  || status=1
echo "gpu_check: cold start done at $(( $(date +%s) - start )) s"
# 2. the GRPO run and its placebo (advantages shuffled within each group) side by side on the GPU, the text from HF
#    generate (no vLLM there); each capped at GRPO_TIMEOUT_S: TensorBoard is written every step, so a cut run still
#    leaves its curve
T=${GRPO_TIMEOUT_S:-330}
timeout "$T" "$PY" -m rl.one_process configs/grpo_1gpu.yaml rollout.engine=hf trainer.progress_bar=false "$@" \
  > "$OUT/grpo.log" 2>&1 &
real=$!
timeout "$T" "$PY" -m rl.one_process configs/grpo_1gpu.yaml name=grpo_1gpu_placebo rollout.engine=hf trainer.progress_bar=false \
  "grpo.advantage_transforms=[{name: placebo_shuffle}]" "$@" > "$OUT/placebo.log" 2>&1 &
placebo=$!
wait $real || status=1
wait $placebo || status=1
tail -n 5 "$OUT/grpo.log" "$OUT/placebo.log"
echo "gpu_check: all runs in $(( $(date +%s) - start )) s (exit $status)"
"$PY" -m tools.plot runs/grpo_1gpu runs/grpo_1gpu_placebo --out "$OUT/gpu_curves.png" --window 1 --tags \
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
exit $status
