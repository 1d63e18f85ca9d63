#!/usr/bin/env bash
# Steering speed on FLUX.2: `l2s speed` on flux2-klein (FLUX.2 [klein] 4B + Qwen3-4B) and
# flux2-dev (FLUX.2 [dev] 32B + Mistral Small 3.1 24B) with random weights in bf16 at the
# presets' 1024 px, batch 1, `--units-only`: the plain step, our steering iteration, the
# reference-style iteration (the joint attention matrix materialised in every layer) and peak
# memory. klein needs ~20 GB of GPU memory and a few minutes on one H100; dev needs ~120 GB
# (64 GB transformer + 48 GB text encoder in bf16): an H200 (MODELS=flux2-dev), not an H100.
#
#   bash scripts/gpu/flux2_speed.sh                        # from the repository root
#   MODELS="flux2-klein" bash scripts/gpu/flux2_speed.sh   # one of them
#
# Results: $OUT/<model>.json (the `l2s speed` report), <model>.txt / .log (its stdout and
# stderr) and table.md.
# l2s installed (or PYTHONPATH=.) and a CUDA build of torch.
set -uo pipefail
OUT=${OUT:-out/gpu-flux2}
PY=${PY:-python}
mkdir -p "$OUT"
rc=0
for model in ${MODELS:-flux2-klein flux2-dev}; do
  echo "== l2s speed --model $model --random-weights" >&2
  "$PY" -m l2s speed --model "$model" --random-weights --dtype bfloat16 \
      --repeats 3 --units-only --out "$OUT/$model.json" > "$OUT/$model.txt" 2> "$OUT/$model.log" \
    || { echo "$model failed (exit $?), see $OUT/$model.log" >&2; rc=1; }
done
"$PY" scripts/gpu/speed_table.py "$OUT"/*.json | tee "$OUT/table.md"
exit $rc
