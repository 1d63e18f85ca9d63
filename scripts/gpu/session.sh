#!/usr/bin/env bash
# Everything still unmeasured on a GPU, in priority order, in one device call that stays
# under BUDGET seconds (default 420 = 7 min; a device session has 15 min with a multi-minute
# machine start, and a rerun must fit). Each part runs under its own `timeout`, cut to what
# is left of the budget; a part that no longer fits is skipped and said so.
#
#   a-flux     issue 11: the gpu test of SDPA kernel selection, then `l2s speed` flux-schnell
#              with random weights and NO cuDNN wrapper (it crashed in backward before l2s
#              chose the kernels itself; docs/results.md "cuDNN attention breaks")
#   b-sd       issue 15: SD2.1-base 512 px units with --compile reduce-overhead (torch.compile +
#              CUDA graphs: the lever for a launch-bound iteration); the same run times the
#              eager iteration too and the compiled update's error against it
#   b-regress  issue 15: SD2.1 512 px units on main and on commit 4bf2d5d (the 65 ms H100 run)
#              side by side on this one GPU, if that commit's l2s was carried in .old/ (see
#              scripts/gpu/README.md); same op counts on a CPU, so a gap here is the machine
#   c-import   issue 13: scripts/gpu/import_reference_speed.sh (our vs the published network)
#   d-detect   issue 14: scripts/gpu/detectors.sh (Mask2Former, OWLv2, CLIP colours on CUDA)
#   e-pytest   every other gpu-marked test
#
# On the device (run tool), from the repo root, diffusers carried as a wheel (scripts/gpu/env.sh):
#   command: bash scripts/gpu/session.sh   carry: [".whl", ".old"]   timeout_s: 480
# Here, to see the plan without running it:  DRY=1 bash scripts/gpu/session.sh
# A rerun of some parts only, on a smaller budget:  PARTS="b-sd" BUDGET=150 bash ...
#
# What comes back ($OUT, at most 8 files): summary.md (device, each part's exit status and
# seconds, the speed table) and one <part>.log each, holding the part's output and the small
# files it wrote (JSON reports, pytest reports); bulky outputs stay in $SCRATCH.
set -uo pipefail
OUT=${OUT:-out/gpu-session}
SCRATCH=${SCRATCH:-/tmp/l2s-session}
BUDGET=${BUDGET:-420}
PARTS=${PARTS:-a-flux b-sd b-regress c-import d-detect e-pytest}
DRY=${DRY:-0}
start=$SECONDS
mkdir -p "$OUT"
rm -rf "$SCRATCH" && mkdir -p "$SCRATCH"
if [ "$DRY" != 1 ]; then
  # shellcheck source=scripts/gpu/env.sh
  . scripts/gpu/env.sh || exit 1
fi
PY=${PY:-python3}
export PY
SUMMARY=$OUT/summary.md

# --- the parts (each runs in its own bash under timeout; $SCR is its scratch folder) -------
part_a() {
  "$PY" -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_sdpa_backends.py
  "$PY" -m l2s speed --model flux-schnell --random-weights --dtype bfloat16 --repeats 3 \
    --units-only --out "$SCR/flux-schnell-256.json"
}
part_b() {
  OUT=$SCR MODELS=sd2.1-base VARIANTS="compile-cudagraphs" E2E=0 \
    bash scripts/gpu/speed_sd.sh
}
part_b_regress() {
  if [ ! -d .old/l2s ]; then echo "no .old/l2s carried: nothing to compare"; return 0; fi
  local args=(speed --model sd2.1 --random-weights --image-size 512 --units-only --repeats 5)
  "$PY" -m l2s "${args[@]}" --out "$SCR/sd2.1-512-main.json"
  # python -m puts the working directory first on sys.path: inside .old, .old/l2s is imported
  (cd .old && "$PY" -m l2s "${args[@]}" --out "$SCR/sd2.1-512-4bf2d5d.json")
}
part_c() { OUT=$SCR bash scripts/gpu/import_reference_speed.sh; }
part_d() { OUT=$SCR PY=$PY bash scripts/gpu/detectors.sh; }
part_e() {
  "$PY" -m pytest -q -p no:cacheprovider -m gpu -rA tests \
    --ignore=tests/test_sdpa_backends.py --ignore=tests/test_hf_detectors.py
}
export -f part_a part_b part_b_regress part_c part_d part_e

run_part() {  # name, function, limit (s)
  local name=$1 fn=$2 limit=$3
  local left=$((BUDGET - (SECONDS - start)))
  [[ " $PARTS " == *" $name "* ]] || return 0
  if ((left < 30)); then
    echo "| $name | skipped: ${left} s of the budget left | |" >> "$SUMMARY"
    return
  fi
  ((limit > left)) && limit=$left
  if [ "$DRY" = 1 ]; then
    echo "== $name (timeout ${limit}s):"
    declare -f "$fn" | sed '1,2d;$d'
    return
  fi
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s, $((SECONDS - start))s elapsed)" >&2
  mkdir -p "$SCRATCH/$name"
  SCR=$SCRATCH/$name timeout -k 15 "$limit" bash -c "$fn" > "$OUT/$name.log" 2>&1
  rc=$?
  for f in "$SCRATCH/$name"/*.json "$SCRATCH/$name"/*.txt; do
    [ -f "$f" ] && { echo "== $(basename "$f")"; head -c 20000 "$f"; echo; } >> "$OUT/$name.log"
  done
  local what="exit $rc"
  ((rc == 124 || rc == 137)) && what="cut at ${limit}s"
  echo "| $name | $what | $((SECONDS - t0)) s |" >> "$SUMMARY"
}

if [ "$DRY" != 1 ]; then
  {
    echo "# GPU session $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    "$PY" -c "import torch, diffusers, transformers; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA GPU', '| torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)" 2>&1
    echo
    echo "| part | result | wall |"
    echo "|---|---|---|"
  } > "$SUMMARY"
fi
run_part a-flux part_a 170
run_part b-sd part_b 200
run_part b-regress part_b_regress 90
run_part c-import part_c 120
run_part d-detect part_d 90
run_part e-pytest part_e 60
if [ "$DRY" != 1 ]; then
  { echo; find "$SCRATCH" -name '*.json' -print0 | sort -z | xargs -0 -r "$PY" scripts/gpu/speed_table.py
    echo; echo "total $((SECONDS - start)) s of a ${BUDGET} s budget"; } >> "$SUMMARY" 2>&1
  cat "$SUMMARY"
fi
