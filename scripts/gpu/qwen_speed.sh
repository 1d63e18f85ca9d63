#!/usr/bin/env bash
# Steering speed on Qwen-Image: `l2s speed --model qwen-image --random-weights` in bf16,
# batch 1, `--units-only`: the plain step (true CFG: two branches), our steering iteration
# (conditional branch, maps of the recorded tokens only), a reference-style iteration (the
# joint attention matrix materialised in every layer) and peak memory, at 512 and 1024 px
# (the size; the preset's own is 1328). Weights alone are ~58 GB in bf16 (20B
# transformer, 8B Qwen2.5-VL with its vision tower): an H200 (141 GB) runs both sizes; on an
# 80 GB card run SIZES=512 first. Not yet run: the numbers go to docs/results.md with the card.
#
#   bash scripts/gpu/qwen_speed.sh                 # from the repository root
#   SIZES=512 bash scripts/gpu/qwen_speed.sh       # one size
#
# Results: $OUT/qwen-image-<px>.json (the `l2s speed` report), .txt / .log (its stdout and
# stderr) and table.md. l2s installed (or PYTHONPATH=.) and a CUDA build of torch.
set -uo pipefail
OUT=${OUT:-out/gpu-qwen}
PY=${PY:-python}
mkdir -p "$OUT"
rc=0
for px in ${SIZES:-512 1024}; do
  name="qwen-image-$px"
  echo "== l2s speed --model qwen-image --image-size $px" >&2
  "$PY" -m l2s speed --model qwen-image --random-weights --image-size "$px" --dtype bfloat16 \
      --repeats 3 --units-only --out "$OUT/$name.json" > "$OUT/$name.txt" 2> "$OUT/$name.log" \
    || { echo "$name failed (exit $?), see $OUT/$name.log" >&2; rc=1; }
done
"$PY" scripts/gpu/speed_table.py "$OUT"/*.json | tee "$OUT/table.md"
exit $rc
