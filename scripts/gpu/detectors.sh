#!/usr/bin/env bash
# The bench detectors (Mask2Former, OWLv2) and CLIP colours on CUDA against the CPU, on tiny
# random models built offline (the gpu-marked tests of tests/test_hf_detectors.py). About
# 1 minute on one H100 / H200, most of it imports.
#
#   bash scripts/gpu/detectors.sh     # from the repository root
#
# Needs torch with CUDA, transformers, scipy (transformers' Mask2Former builds its loss even
# for inference) and pytest. Writes $OUT/detectors.txt (pytest's report) and $OUT/env.txt.
set -uo pipefail
OUT=${OUT:-out/gpu-detectors}
PY=${PY:-python}
mkdir -p "$OUT"
"$PY" - > "$OUT/env.txt" 2>&1 <<'PYEOF'
import importlib.util, torch, transformers
print(torch.cuda.get_device_name(0), "torch", torch.__version__, "transformers",
      transformers.__version__, "scipy", "yes" if importlib.util.find_spec("scipy") else "MISSING")
PYEOF
cat "$OUT/env.txt" >&2
"$PY" -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_hf_detectors.py \
  > "$OUT/detectors.txt" 2>&1
rc=$?
tail -5 "$OUT/detectors.txt" >&2
exit $rc
