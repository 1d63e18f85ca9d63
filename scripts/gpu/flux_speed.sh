#!/usr/bin/env bash
# Flux.1 speed with random weights in bf16 (and SD3.5 Medium when time is left): the plain
# step, our steering iteration, a reference-style iteration (the full joint attention matrix
# materialised in every layer, every token's maps kept) and peak memory, side by side.
# Expected: about 3-4 minutes on one H100 / H200, model materialisation included.
#
#   OUT=/some/dir bash scripts/gpu/flux_speed.sh      # from the repo root, PYTHONPATH=.
#
# Results: $OUT/<run>.json (the `l2s speed` report), <run>.txt / .log, and table.md.
set -uo pipefail
OUT=${OUT:-out/gpu-flux}
PY=${PYTHON:-python}
mkdir -p "$OUT"
start=$SECONDS

run() {  # name, time limit (s), l2s speed arguments...
  local name=$1 limit=$2
  shift 2
  echo "== $name: l2s speed $* (limit ${limit}s, $((SECONDS - start))s elapsed)" >&2
  timeout "$limit" "$PY" -m l2s speed "$@" --dtype bfloat16 --repeats 3 --units-only \
      --out "$OUT/$name.json" > "$OUT/$name.txt" 2> "$OUT/$name.log" \
    || echo "$name: failed or timed out (exit $?), see $OUT/$name.log" >&2
}

"$PY" -c "import torch; print(torch.cuda.get_device_name(0), torch.__version__)" >&2
run flux-schnell-256 110 --model flux-schnell --random-weights
run flux-dev-512 110 --model flux-dev --random-weights --image-size 512
if (( SECONDS - start < 150 )); then
  run sd3.5-medium-512 75 --model sd3.5-medium --random-weights --image-size 512
fi

"$PY" scripts/gpu/speed_table.py "$OUT"/*.json | tee "$OUT/table.md"
echo "total $((SECONDS - start)) s" >&2
