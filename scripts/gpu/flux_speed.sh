#!/usr/bin/env bash
# Steering speed on the MMDiT families: `l2s speed` on Flux.1-schnell (256 px, no CFG),
# Flux.1-dev (512 px, guidance embedding) and SD3.5 Medium (512 px, CFG) with random weights
# in bf16, batch 1, `--units-only`: the plain step, our steering iteration, a reference-style
# iteration (the joint attention matrix materialised in every layer, every token's maps kept)
# and peak memory, side by side. Needs ~40 GB of GPU memory (Flux's 12B transformer); about
# 3-4 minutes on one H100 or H200, building the models included.
#
#   bash scripts/gpu/flux_speed.sh                          # from the repository root
#   MODELS="flux-schnell" bash scripts/gpu/flux_speed.sh    # one of them
#
# Results: $OUT/<model>.json (the `l2s speed` report), <model>.txt / .log (its stdout and
# stderr) and table.md.
# l2s installed (or PYTHONPATH=.) and a CUDA build of torch.
set -uo pipefail
OUT=${OUT:-out/gpu-flux}
PY=${PY:-python}
mkdir -p "$OUT"
rc=0
for model in ${MODELS:-flux-schnell flux-dev sd3.5-medium}; do
  size=()
  [ "$model" = flux-schnell ] || size=(--image-size 512)
  echo "== l2s speed --model $model ${size[*]}" >&2
  "$PY" -m l2s speed --model "$model" --random-weights "${size[@]}" --dtype bfloat16 \
      --repeats 3 --units-only --out "$OUT/$model.json" > "$OUT/$model.txt" 2> "$OUT/$model.log" \
    || { echo "$model failed (exit $?), see $OUT/$model.log" >&2; rc=1; }
done
"$PY" scripts/gpu/speed_table.py "$OUT"/*.json | tee "$OUT/table.md"
exit $rc
