#!/usr/bin/env bash
# Train the toy-mmdit (issue 12) on one GPU (H200: ~200 s of training, ~5 min wall), then score it.
#
#   PYTHONPATH=. OUT=/some/dir bash scripts/gpu/train_toy_mmdit.sh
#
# Needs torch with CUDA, transformers and diffusers (PYTHONPATH=. for l2s itself). The run
# folder (checkpoints with the optimizer state, too big to return) lives in $RUN; what comes
# back in $OUT (6 files, each under 16 MB):
#   weights-mmdit.tar   the exported EMA model (transformer/, text_encoder/, tokenizer/,
#                       scheduler/): untar into l2s/toy/weights-mmdit/. Refreshed every ~60 s
#                       while training, so a cut run still returns the latest export.
#   train.log           the trainer's progress (loss, steps/s, evaluations, the final step)
#   eval-plain.json/png 100 prompts, 20 Euler steps, no guidance (schnell-like plain sampling)
#   eval-cfg3.json/png  the same prompts with classifier-free guidance 3
set -euo pipefail
OUT=${OUT:-out/gpu-toy-mmdit}
RUN=${RUN:-/tmp/toy-mmdit-run}
PY=${PY:-python}
STEPS=${STEPS:-2696}          # the shipped run's length (H200, 200 s); MAX_SECONDS stops a slow GPU
MAX_SECONDS=${MAX_SECONDS:-600}
WORKERS=${WORKERS:-14}
# For a plumbing check on a CPU: DEVICE=cpu STEPS=2 BATCH=4 WORKERS=2 EVAL_PROMPTS=4
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-256}
EVAL_PROMPTS=${EVAL_PROMPTS:-100}
# No --bf16: bf16 autocast failed in backward (CUBLAS_STATUS_EXECUTION_FAILED on torch 2.11 +
# cu130); the shipped weights were trained in fp32. BF16=--bf16 to try it anyway.
BF16=${BF16:-}
mkdir -p "$OUT"
rm -rf "$RUN"
export PYTHONPATH=${PYTHONPATH:-.}
start=$(date +%s)
$PY -c "import torch, diffusers, transformers; assert '$DEVICE' != 'cuda' or torch.cuda.is_available(), 'no CUDA'; \
print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true

# Ship whatever the trainer exported last, every ~60 s (a cut run still returns weights).
ship() {
  if [ -f "$RUN/export/transformer/diffusion_pytorch_model.safetensors" ]; then
    tar -C "$RUN/export" -cf "$OUT/weights-mmdit.tar.tmp" . 2>/dev/null \
      && mv "$OUT/weights-mmdit.tar.tmp" "$OUT/weights-mmdit.tar"
  fi
}
( while sleep 60; do ship; done ) &
shipper=$!
trap 'kill $shipper 2>/dev/null || true; ship' EXIT

# The recipe (same as `make toy-mmdit`): see l2s/toy/train.py and l2s/toy/mmdit.py.
$PY -m l2s.toy.train --backbone mmdit --out "$RUN" --export "$RUN/export" \
  --steps "$STEPS" --batch "$BATCH" --lr 1e-3 --warmup 300 --attention-weight 0.02 \
  --eval-every 1000 --eval-prompts 64 --guidance 3 --checkpoint-every 1000 \
  --device "$DEVICE" $BF16 --workers "$WORKERS" --max-seconds "$MAX_SECONDS" 2>&1 \
  | grep --line-buffered -v "Writing model shards" | tee "$OUT/train.log"
ship
for g in plain:1 cfg3:3; do
  $PY -m l2s.toy.train --evaluate "$RUN/export" --device "$DEVICE" --eval-prompts "$EVAL_PROMPTS" \
    --guidance "${g#*:}" --seed 1 --grid "$OUT/eval-${g%%:*}.png" | tee "$OUT/eval-${g%%:*}.json"
done
echo "final step: $($PY -c "import json; print(json.load(open('$RUN/checkpoint/state.json'))['step'])")"
echo "exported step: $(cat "$RUN/best.json" | tr -d '\n ' | cut -c1-200)"
echo "wall seconds: $(( $(date +%s) - start ))"
