#!/usr/bin/env bash
# Steering speed on SDXL base: `l2s speed --model sdxl --random-weights` (the exact
# architecture, random weights, no download) in fp16, batch 1, `--units-only`: the plain CFG
# step, our steering iteration, a reference-style iteration (explicit attention in every
# layer, every token's maps kept) and peak memory, at 1024 px (the preset's size) and at
# 512 px. Not yet run: memory and time are estimates (well under an H100's 80 GB: a 2.6B
# UNet in fp16; a few minutes, building included).
#
#   bash scripts/gpu/sdxl_speed.sh                  # from the repository root
#   SIZES="1024" bash scripts/gpu/sdxl_speed.sh     # one size
#
# Results: $OUT/sdxl-<size>.json (the `l2s speed` report), .txt / .log (its stdout and
# stderr) and table.md. l2s installed (or PYTHONPATH=.) and a CUDA build of torch.
set -uo pipefail
OUT=${OUT:-out/gpu-sdxl}
PY=${PY:-python}
mkdir -p "$OUT"
rc=0
for size in ${SIZES:-1024 512}; do
  echo "== l2s speed --model sdxl --image-size $size" >&2
  "$PY" -m l2s speed --model sdxl --random-weights --image-size "$size" --dtype float16 \
      --repeats 3 --units-only --out "$OUT/sdxl-$size.json" > "$OUT/sdxl-$size.txt" \
      2> "$OUT/sdxl-$size.log" \
    || { echo "sdxl at $size px failed (exit $?), see $OUT/sdxl-$size.log" >&2; rc=1; }
done
"$PY" scripts/gpu/speed_table.py "$OUT"/*.json | tee "$OUT/table.md"
exit $rc
