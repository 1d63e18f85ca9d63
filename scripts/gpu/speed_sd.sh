#!/usr/bin/env bash
# Steering speed on Stable Diffusion UNets: `l2s speed` on SD2.1-base and SD1.4 with random
# weights (exact architectures; costs do not depend on the weights) at 512 px, fp16, batch 1:
# the plain CFG step, our steering iteration, a reference-style iteration and peak memory, with
# and without each lever (truncated forward, channels_last, torch.compile). One line per run on
# stdout; the full reports in $OUT/speed_<model>_<variant>.json.
#
#   bash scripts/gpu/speed_sd.sh                       # every model and variant, ~5-10 min
#   MODELS="sd2.1-base" VARIANTS="default compile-cudagraphs" E2E=0 bash scripts/gpu/speed_sd.sh
#
# MODELS: presets to time (default "sd2.1-base sd1.4"). VARIANTS (default "default full-forward
# channels-last compile-cudagraphs"): default (truncated forward, plus whole generations unless
# E2E=0), full-forward (the truncation off), channels-last, compile-default (Inductor kernels),
# compile-cudagraphs (Inductor + CUDA graphs, `--compile reduce-overhead`). A compile variant
# pays one compilation (1-3 min) on its first iteration, outside the medians; read its
# `compiled_vs_eager_update_error` first (~1e-3 is fp16 rounding, more is a wrong gradient).
# Run from the repository root with l2s installed (or PYTHONPATH=.) and a CUDA build of torch.
set -euo pipefail
OUT=${OUT:-out/gpu-speed-sd}
PY=${PY:-python}
E2E=${E2E:-1}  # 0: the default variant is timed --units-only too
mkdir -p "$OUT"
run() {  # model, variant name, extra flags...
  local model=$1 name=$2; shift 2
  echo "== $model $name" >&2
  "$PY" -m l2s speed --model "$model" --random-weights --image-size 512 --json "$@" \
    > "$OUT/speed_${model}_${name}.json"
  "$PY" - "$OUT/speed_${model}_${name}.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
u, q = r["units"], r["ratios"]
line = (f"{r['model']} {sys.argv[1].split('_', 2)[-1][:-5]}: plain {u['plain_step']['ms']:.1f} ms, "
        f"ours {u['ours_iteration']['ms']:.1f} ms (x{q['ours_iteration_vs_plain_step']}), "
        f"reference {u['reference_iteration']['ms']:.1f} ms")
if r["config"].get("compile", "off") != "off":
    line += (f", eager {u['ours_eager_iteration']['ms']:.1f} ms (compiled / eager "
             f"x{q['compiled_vs_eager_iteration']}, update error "
             f"{q['compiled_vs_eager_update_error']:.2g}), "
             f"compile {u['ours_iteration']['warmup_ms'] / 1000:.0f} s")
e = r.get("end_to_end")
if e:
    line += (f"; end to end: plain {e['plain']['seconds']:.2f} s, 1 it/step "
             f"x{e['ratios']['steered_one_iteration']}, worst x{e['ratios']['steered_worst_case']}")
print(line)
PYEOF
}
for model in ${MODELS:-sd2.1-base sd1.4}; do
  for variant in ${VARIANTS:-default full-forward channels-last compile-cudagraphs}; do
    case $variant in
      default) if [ "$E2E" = 1 ]; then run "$model" default; else
                 run "$model" default --units-only; fi ;;
      full-forward) run "$model" full-forward --full-forward --units-only ;;
      channels-last) run "$model" channels-last --channels-last --units-only ;;
      compile-default) run "$model" compile-default --compile default --units-only ;;
      compile-cudagraphs) run "$model" compile-cudagraphs --compile reduce-overhead --units-only ;;
      *) echo "unknown variant $variant (default, full-forward, channels-last, compile-default," \
           "compile-cudagraphs)" >&2; exit 2 ;;
    esac
  done
done
"$PY" scripts/gpu/speed_table.py "$OUT"/*.json > "$OUT/table.md"
echo "table: $OUT/table.md" >&2
