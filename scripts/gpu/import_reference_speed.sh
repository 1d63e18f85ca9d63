#!/usr/bin/env bash
# Issue 13 on a GPU (~3-5 min on one H100; run from the repo root with PYTHONPATH=.): cost of one steering iteration on SD2.1-base
# (exact architecture, random weights, fp16, 512 px) with our classifier vs the published
# reference network (a random checkpoint at the published SD sizes, converted by
# `l2s classifier import`). Writes $OUT/import13_*.json.
set -euo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export L2S_CACHE_DIR="$OUT/cache"
python - <<'PY'
import collections, torch
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
           "/tmp/import13_random_sd2.pth")
print("parameters", num_parameters(net))
PY
python -m l2s classifier import /tmp/import13_random_sd2.pth --model sd2.1-base --random-weights \
    --out "$OUT/ref-clf" --json > "$OUT/import13_import.json"
python -m l2s speed --model sd2.1-base --random-weights --units-only --json \
    > "$OUT/import13_speed_ours.json"
python -m l2s speed --model sd2.1-base --random-weights --units-only --json \
    --classifier "$OUT/ref-clf" > "$OUT/import13_speed_reference.json"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for k in ("ours", "reference"):
    print(k, json.dumps(json.load(open(f"{out}/import13_speed_{k}.json")))[:2000])
PY
