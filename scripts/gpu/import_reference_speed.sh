#!/usr/bin/env bash
# What the published classifier network costs in one steering iteration: `l2s speed` on
# SD2.1-base (exact architecture, random weights, fp16, 512 px, batch 1, `--units-only`) once
# with our classifier and once with the published network at its SD sizes (a randomly
# initialised checkpoint in the published format, converted by `l2s classifier import`; costs do
# not depend on the weights). About 3-5 minutes on one H100.
#
#   bash scripts/gpu/import_reference_speed.sh     # from the repository root
#
# Results: $OUT/speed_ours.json and $OUT/speed_reference.json (the `l2s speed` reports), the
# converted classifier in $OUT/ref-clf, and a table of both on stdout. l2s installed (or
# PYTHONPATH=.) and a CUDA build of torch.
set -euo pipefail
OUT=${OUT:-out/gpu-import-reference}
PY=${PY:-python}
mkdir -p "$OUT"
export L2S_CACHE_DIR="$OUT/cache"
"$PY" - "$OUT/random_sd2.pth" <<'PY'
import collections, sys, torch
from l2s.classifier.model import num_parameters
from l2s.classifier.reference import ReferenceClassifier, ReferenceConfig
classes = ("above", "below", "is", "to the left of", "to the right of")
torch.manual_seed(0)
net = ReferenceClassifier(ReferenceConfig(n_maps=195, relations=classes, max_maps=1368))
cfg = {"num_timesteps": 50, "map_size": 16, "d_model": 256,
       "extractor": {"nhead": 2, "num_layers": 2, "dim_feedforward": 128, "layer_attn_nheads": 2,
                     "timestep_embedding": {"enable": True, "mode": "mid"}},
       "classifier": {"nhead": 4, "num_layers": 2, "dim_feedforward": 128,
                      "timestep_embedding_dim": 16}}
torch.save({"model_state_dict": collections.OrderedDict(net.state_dict()),
            "rel_name_to_idx": {c: i for i, c in enumerate(classes)},
            "idx_to_rel_name": dict(enumerate(classes)), "input_channels": 1368,
            "config": cfg, "training_config": {"timesteps": [5, 10, 15, 20, 25, 49]}},
           sys.argv[1])
print("parameters", num_parameters(net))
PY
"$PY" -m l2s classifier import "$OUT/random_sd2.pth" --model sd2.1-base --random-weights \
    --out "$OUT/ref-clf" --json > "$OUT/import.json"
"$PY" -m l2s speed --model sd2.1-base --random-weights --units-only --json \
    > "$OUT/speed_ours.json"
"$PY" -m l2s speed --model sd2.1-base --random-weights --units-only --json \
    --classifier "$OUT/ref-clf" > "$OUT/speed_reference.json"
"$PY" scripts/gpu/speed_table.py "$OUT/speed_ours.json" "$OUT/speed_reference.json"
