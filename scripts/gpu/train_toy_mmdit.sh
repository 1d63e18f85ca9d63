#!/usr/bin/env bash
# Trains the toy-mmdit (the tiny Flux-architecture shapes model) with the shipped recipe on one
# CUDA GPU, then scores it: the same training as `make toy-mmdit`, into a run folder of its own,
# followed by the trainer's evaluation with and without guidance. About 5 minutes on one H200
# (2696 steps, ~200 s of training).
#
#   bash scripts/gpu/train_toy_mmdit.sh              # from the repository root
#   cp -r out/gpu-toy-mmdit/run/export/. l2s/toy/weights-mmdit/    # to ship the result
#
# Results in $OUT: run/ (checkpoints with the optimiser state; run/export holds the EMA model:
# transformer/, text_encoder/, tokenizer/, scheduler/), train.log (loss, steps/s, evaluations),
# eval-plain.json/png (100 prompts, 20 Euler steps, no guidance, as the preset samples) and
# eval-cfg3.json/png (the same prompts with classifier-free guidance 3).
# For a quick check of the plumbing on a CPU: DEVICE=cpu STEPS=2 BATCH=4 WORKERS=2 EVAL_PROMPTS=4
set -euo pipefail
OUT=${OUT:-out/gpu-toy-mmdit}
PY=${PY:-python}
STEPS=${STEPS:-2696}          # the shipped weights' step
WORKERS=${WORKERS:-14}        # processes building batches ahead of the GPU
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-256}
EVAL_PROMPTS=${EVAL_PROMPTS:-100}
# fp32 by default: bf16 autocast failed in backward (CUBLAS_STATUS_EXECUTION_FAILED on torch
# 2.11 + CUDA 13) and the shipped weights were trained without it. BF16=--bf16 to try it.
BF16=${BF16:-}
RUN=$OUT/run
mkdir -p "$OUT"
rm -rf "$RUN"
start=$(date +%s)
"$PY" -c "import torch, diffusers; assert '$DEVICE' != 'cuda' or torch.cuda.is_available(), 'no CUDA'; \
print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"

"$PY" -m l2s.toy.train --backbone mmdit --out "$RUN" --export "$RUN/export" \
  --steps "$STEPS" --batch "$BATCH" --lr 1e-3 --warmup 300 --attention-weight 0.02 \
  --eval-every 1000 --eval-prompts 64 --guidance 3 --checkpoint-every 1000 \
  --device "$DEVICE" $BF16 --workers "$WORKERS" 2>&1 | tee "$OUT/train.log"
for g in plain:1 cfg3:3; do
  "$PY" -m l2s.toy.train --evaluate "$RUN/export" --device "$DEVICE" \
    --eval-prompts "$EVAL_PROMPTS" --guidance "${g#*:}" --seed 1 --grid "$OUT/eval-${g%%:*}.png" \
    | tee "$OUT/eval-${g%%:*}.json"
done
echo "wall seconds: $(( $(date +%s) - start ))"
