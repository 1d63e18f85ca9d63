"""An independent functional reading of the published L2S classifier, for tests only.

Built from torch's own TransformerEncoderLayer / MultiheadAttention loaded with slices of a
checkpoint's state dict, straight from the published network's description, so l2s's module
(l2s/classifier/reference.py) and map layout are checked against something they share no code
with. Also the checkpoint files and tiny SD folders the import tests use.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import nn

from l2s.classifier.reference import ReferenceClassifier, ReferenceConfig

CLASSES = ("above", "below", "is", "to the left of", "to the right of")  # sorted, as published
STEPS = [5, 10, 15, 20, 25, 49]


def tiny_config(**over) -> dict:
    """A published-style ``config`` dict with small sizes."""
    cfg = {"num_timesteps": 50, "map_size": 16, "d_model": 32,
           "extractor": {"nhead": 2, "num_layers": 2, "dim_feedforward": 24,
                         "layer_attn_nheads": 4, "dropout": 0.1,
                         "timestep_embedding": {"enable": True, "mode": "mid"}},
           "classifier": {"nhead": 4, "num_layers": 2, "dim_feedforward": 24, "dropout": 0.1,
                          "timestep_embedding_dim": 16}}
    for k, v in over.items():
        cfg[k] = v
    return cfg


def flux_config() -> dict:
    """``tiny_config`` with the published Flux classifiers' extractor (4 layers, ff 512): the
    shape `l2s classifier import` accepts for Flux backbones only."""
    cfg = tiny_config()
    cfg["extractor"] = {**cfg["extractor"], "num_layers": 4, "dim_feedforward": 512}
    return cfg


def make_checkpoint(rows: int = 40, classes=CLASSES, seed: int = 0, config: dict | None = None
                    ) -> dict:
    """A checkpoint dict as the authors publish it, with weights from l2s's module perturbed
    (so every LayerNorm, bias and table matters)."""
    cfg = config or tiny_config()
    arch = ReferenceConfig(
        n_maps=rows, relations=tuple(classes), max_maps=rows, d_model=cfg["d_model"],
        n_times=cfg["num_timesteps"], extractor_heads=cfg["extractor"]["nhead"],
        extractor_layers=cfg["extractor"]["num_layers"],
        extractor_ff=cfg["extractor"]["dim_feedforward"],
        pool_heads=cfg["extractor"]["layer_attn_nheads"],
        relation_heads=cfg["classifier"]["nhead"],
        relation_layers=cfg["classifier"]["num_layers"],
        relation_ff=cfg["classifier"]["dim_feedforward"],
        relation_time_dim=cfg["classifier"]["timestep_embedding_dim"])
    torch.manual_seed(seed)
    net = ReferenceClassifier(arch)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        # Maps sum to 1 over 256 pixels: scaled up, their content (not the biases) drives
        # the logits, so a wrong channel order or resize shows in the loss.
        net.object_extractor.input_projection.weight.mul_(300)
    state = collections.OrderedDict((k, v.clone()) for k, v in net.state_dict().items())
    return {"model_state_dict": state,
            "rel_name_to_idx": {c: i for i, c in enumerate(classes)},
            "idx_to_rel_name": dict(enumerate(classes)),
            "input_channels": rows, "config": cfg,
            "training_config": {"timesteps": list(STEPS), "lr": 1e-4, "batch_size": 64}}


def _encoder_layers(state, prefix: str, n: int, d: int, heads: int, ff: int) -> list[nn.Module]:
    layers = []
    for i in range(n):
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="relu",
                                           batch_first=True, norm_first=True)
        p = f"{prefix}.{i}."
        layer.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)})
        layers.append(layer.eval())
    return layers


@torch.no_grad()
def torch_reference_logits(ckpt: dict, maps: torch.Tensor, time_input: int) -> torch.Tensor:
    """Logits (B, K) of a checkpoint for maps (B, 2, C, 16, 16) at one time input."""
    s, cfg = ckpt["model_state_dict"], ckpt["config"]
    d, ex, rc = cfg["d_model"], cfg["extractor"], cfg["classifier"]
    b, _, c = maps.shape[:3]
    ext = _encoder_layers(s, "object_extractor.transformer.layers", ex["num_layers"], d,
                          ex["nhead"], ex["dim_feedforward"])
    pool = nn.MultiheadAttention(d, ex["layer_attn_nheads"], batch_first=True)
    pool.load_state_dict({k.split("layer_attention.")[1]: v for k, v in s.items()
                          if k.startswith("object_extractor.layer_attention.")})
    pool.eval()
    e = s["object_extractor.timestep_embedding.weight"][time_input][None, None]  # (1, 1, d)
    pooled = []
    for k in range(2):
        x = F.linear(maps[:, k].reshape(b, c, 256), s["object_extractor.input_projection.weight"],
                     s["object_extractor.input_projection.bias"])
        x = x + s["object_extractor.positional_encoding.pe"][:, :c]
        for layer in ext:
            x = layer(x + e)
        q = s["object_extractor.query_vector"].expand(b, 1, d)
        out, _ = pool(q, x, x)
        pooled.append(F.linear(out[:, 0], s["object_extractor.output_projection.weight"],
                               s["object_extractor.output_projection.bias"]))
    z = F.linear(torch.cat(pooled, dim=1), s["relation_classifier.projection.weight"],
                 s["relation_classifier.projection.bias"])[:, None]
    z = z + s["relation_classifier.positional_encoding.pe"][:, :1]
    for layer in _encoder_layers(s, "relation_classifier.transformer.layers", rc["num_layers"],
                                 d, rc["nhead"], rc["dim_feedforward"]):
        z = layer(z)
    temb = s["relation_classifier.timestep_embedding.weight"][time_input].expand(b, -1)
    fc = nn.Sequential(nn.Linear(d + rc["timestep_embedding_dim"], 256), nn.LayerNorm(256),
                       nn.LeakyReLU(0.1), nn.Identity(), nn.Linear(256, 128),
                       nn.LayerNorm(128), nn.LeakyReLU(0.1), nn.Identity(),
                       nn.Linear(128, len(ckpt["rel_name_to_idx"])))
    fc.load_state_dict({k.split("relation_classifier.fc.")[1]: v for k, v in s.items()
                        if k.startswith("relation_classifier.fc.")})
    return fc.eval()(torch.cat([z[:, 0], temb], dim=1))
