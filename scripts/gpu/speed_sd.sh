#!/usr/bin/env bash
# Issue 15 GPU levers: `l2s speed` on SD2.1-base-shaped (sd2.1 at 512 px) and SD1.4 UNets with
# random weights at 512 px, ours vs the reference-style loop, with and without each lever
# (truncated forward, channels_last, torch.compile). Results: $OUT/speed_<model>_<variant>.json.
# Run from the repo root with PYTHONPATH=. on one GPU; ~3-4 min on an H100 (units: 5 repeats;
# end to end only for the default variant; each compile variant adds a compilation, ~1-3 min).
# Trimmed (scripts/gpu/session.sh):
#   MODELS="sd2.1-base" VARIANTS="default channels-last" E2E=0 bash scripts/gpu/speed_sd.sh
set -euo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
L2S="python -m l2s"
E2E=${E2E:-1}  # 0: the default variant is timed --units-only too
run() {  # model, variant name, extra flags...
  local model=$1 name=$2; shift 2
  echo "== $model $name" >&2
  $L2S speed --model "$model" --random-weights --image-size 512 --json "$@" \
    > "$OUT/speed_${model}_${name}.json"
  python - "$OUT/speed_${model}_${name}.json" <<'PY'
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
PY
}
SD21=sd2.1-base
python -c "from l2s.engine.registry import get_preset; import sys; sys.exit(get_preset('sd2.1-base') is None)" \
  2>/dev/null || SD21=sd2.1   # before the sd2.1-base preset exists: sd2.1 at 512 px
for model in ${MODELS:-$SD21 sd1.4}; do
  for variant in ${VARIANTS:-default full-forward channels-last compile-cudagraphs}; do
    case $variant in
      default) if [ "$E2E" = 1 ]; then run "$model" default; else   # truncated forward
                 run "$model" default --units-only; fi ;;
      full-forward) run "$model" full-forward --full-forward --units-only ;;  # lever off
      channels-last) run "$model" channels-last --channels-last --units-only ;;
      # torch.compile of the steering forward + backward (issue 15); the compilation is the
      # first iteration, outside the medians ("compile" in the line): Inductor kernels, and
      # Inductor + CUDA graphs (one graph replay instead of ~2,300 launches per iteration).
      compile-default) run "$model" compile-default --compile default --units-only ;;
      compile-cudagraphs) run "$model" compile-cudagraphs --compile reduce-overhead --units-only ;;
      *) echo "unknown variant $variant (default, full-forward, channels-last, compile-default," \
           "compile-cudagraphs)" >&2; exit 2 ;;
    esac
  done
done
