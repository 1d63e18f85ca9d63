"""The reference relation classifier: the architecture of L2S's published checkpoints.

Written for l2s from the description of the published network (Yiflach et al., WACV 2026;
docs/classifier.md), not from its code. Parameter names follow the published state dicts
exactly, so a converted checkpoint loads with strict key checking. Per object (subject,
object), with shared weights: every map (C, S, S) -> a token (Linear S*S -> d) + a sinusoidal
position over the map index -> Transformer encoder layers with a learned embedding of the time input
added before each layer ("mid") -> attention pooling with a learned query -> one S x S map.
The relation head reads the two pooled maps (one token, its own encoder layers), appends a
small time embedding and runs an MLP to K logits. The time input is an integer index: the
denoising step for the published checkpoints, the position in the trained-timestep table for
ones `l2s train --arch reference` trains. This module does no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from l2s.classifier.layout import check_maps, check_relations, check_sizes

# The published checkpoints' class names -> l2s relation names; "is" (an attribute class) is
# no relation: it stays in the softmax and is never a steering target.
REFERENCE_CLASSES = {"above": "above", "below": "below", "to the left of": "left of",
                     "to the right of": "right of", "is": "is"}
TIME_MODES = ("mid", "pre", "none")  # where the extractor adds its time embedding
KIND = "reference"  # ``architecture["kind"]`` in a classifier card


@dataclass(frozen=True)
class ReferenceConfig:
    """Sizes of a ReferenceClassifier; written into its card as ``architecture``."""

    n_maps: int  # C: maps per object the backbone gives (<= max_maps)
    relations: tuple[str, ...]  # class names, in logit order
    max_maps: int | None = None  # rows of the extractor's position table (None: n_maps)
    map_size: int = 16  # S: side of every map
    d_model: int = 256  # token width of extractor and relation head
    n_times: int = 50  # rows of both time-embedding tables (valid time inputs: 0..n_times-1)
    extractor_heads: int = 2  # attention heads of the extractor's encoder layers
    extractor_layers: int = 2
    extractor_ff: int = 128  # feed-forward width of those layers
    pool_heads: int = 2  # heads of the attention pooling
    time_mode: str = "mid"  # "mid": added before every extractor layer; "pre": once; "none"
    relation_heads: int = 4
    relation_layers: int = 2
    relation_ff: int = 128
    relation_time_dim: int = 16  # width of the relation head's time embedding (0: none)
    relation_positions: int = 256  # rows of the relation head's position table
    dropout: float = 0.1  # training only

    def __post_init__(self) -> None:
        check_sizes(self, ("n_maps", "map_size", "d_model", "n_times", "extractor_heads",
                           "extractor_layers", "extractor_ff", "pool_heads", "relation_heads",
                           "relation_layers", "relation_ff", "relation_positions"))
        check_sizes(self, ("relation_time_dim",), minimum=0)
        if self.max_maps is not None:
            check_sizes(self, ("max_maps",))
        check_relations(self.relations)
        if self.time_mode not in TIME_MODES:
            raise ValueError(f"time_mode must be one of {TIME_MODES}, got {self.time_mode!r}")
        for name in ("extractor_heads", "pool_heads", "relation_heads"):
            if self.d_model % getattr(self, name):
                raise ValueError(f"d_model {self.d_model} is not divisible by {name} "
                                 f"{getattr(self, name)}")
        if self.n_maps > self.positions:
            raise ValueError(f"{self.n_maps} maps per object but the position table has only "
                             f"{self.positions} rows")
        if not self.relations:
            raise ValueError("a classifier needs at least one relation class")

    @property
    def positions(self) -> int:
        """Rows of the extractor's position table."""
        return self.max_maps if self.max_maps is not None else self.n_maps

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"kind": KIND, **d}

    @classmethod
    def from_dict(cls, d: Mapping) -> ReferenceConfig:
        """Inverse of to_dict; unknown keys are an error (a newer card format)."""
        kw = {k: v for k, v in d.items() if k != "kind"}
        unknown = set(kw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        if isinstance(kw.get("relations"), list):
            kw["relations"] = tuple(kw["relations"])
        return cls(**kw)


def sinusoid_table(rows: int, dim: int) -> torch.Tensor:
    """(1, rows, dim) position table: sin on even, cos on odd features (Vaswani et al., 2017)."""
    pos = torch.arange(rows, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(1, rows, dim)
    table[0, :, 0::2] = torch.sin(pos * freq)
    table[0, :, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


class _Positions(nn.Module):
    """Holds the fixed position table as the persistent buffer ``pe`` (part of checkpoints)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("pe", sinusoid_table(rows, dim))


class PackedAttention(nn.Module):
    """Multi-head attention with one packed q/k/v projection (``in_proj_*``) and ``out_proj``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(B, Lq, d) queries attending over (B, Lk, d) keys/values -> (B, Lq, d)."""
        b, lq, d = query.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, h, L, d/h)
            return x.reshape(b, x.shape[1], self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(F.linear(query, wq, bq)), heads(F.linear(context, wk, bk)), \
            heads(F.linear(context, wv, bv))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, h, Lq, d/h)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, d))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer, ReLU feed-forward, LayerNorm eps 1e-5, no mask."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = PackedAttention(dim, heads, dropout)
        self.linear1, self.linear2 = nn.Linear(dim, ff), nn.Linear(ff, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h))
        return x + self.drop(self.linear2(self.drop(F.relu(self.linear1(self.norm2(x))))))


class _Encoder(nn.Module):
    """A stack of encoder layers under the name ``layers`` (no final norm)."""

    def __init__(self, n: int, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ff, dropout) for _ in range(n))


class ObjectExtractor(nn.Module):
    """One object's C maps (N, C, S, S) + time inputs (N,) -> one pooled map (N, S*S)."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        d, area = cfg.d_model, cfg.map_size**2
        self.time_mode = cfg.time_mode
        self.input_projection = nn.Linear(area, d)
        if cfg.time_mode != "none":
            self.timestep_embedding = nn.Embedding(cfg.n_times, d)
        self.positional_encoding = _Positions(cfg.positions, d)
        self.transformer = _Encoder(cfg.extractor_layers, d, cfg.extractor_heads,
                                    cfg.extractor_ff, cfg.dropout)
        self.query_vector = nn.Parameter(torch.randn(1, 1, d))
        self.layer_attention = PackedAttention(d, cfg.pool_heads)
        self.output_projection = nn.Linear(d, area)

    def forward(self, maps: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        n, c = maps.shape[:2]
        x = self.input_projection(maps.reshape(n, c, -1))  # (N, C, d)
        x = x + self.positional_encoding.pe[:, :c]
        e = self.timestep_embedding(times)[:, None] if self.time_mode != "none" else None
        if self.time_mode == "pre":
            x = x + e
        for layer in self.transformer.layers:
            x = layer(x + e if self.time_mode == "mid" else x)
        pooled = self.layer_attention(self.query_vector.expand(n, -1, -1), x)  # (N, 1, d)
        return self.output_projection(pooled[:, 0])  # (N, S*S)


class RelationHead(nn.Module):
    """Two pooled maps (B, 2*S*S) + time inputs (B,) -> logits (B, K)."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.projection = nn.Linear(2 * cfg.map_size**2, d)
        self.positional_encoding = _Positions(cfg.relation_positions, d)
        self.transformer = _Encoder(cfg.relation_layers, d, cfg.relation_heads, cfg.relation_ff,
                                    cfg.dropout)
        if cfg.relation_time_dim:
            self.timestep_embedding = nn.Embedding(cfg.n_times, cfg.relation_time_dim)
        # Indices 0, 1, 4, 5, 8 hold weights, as in the published state dicts.
        self.fc = nn.Sequential(
            nn.Linear(d + cfg.relation_time_dim, 256), nn.LayerNorm(256), nn.LeakyReLU(0.1),
            nn.Dropout(cfg.dropout), nn.Linear(256, 128), nn.LayerNorm(128), nn.LeakyReLU(0.1),
            nn.Dropout(cfg.dropout), nn.Linear(128, len(cfg.relations)))

    def forward(self, pooled: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        x = self.projection(pooled)[:, None] + self.positional_encoding.pe[:, :1]  # (B, 1, d)
        for layer in self.transformer.layers:
            x = layer(x)
        x = x[:, 0]
        if hasattr(self, "timestep_embedding"):
            x = torch.cat([x, self.timestep_embedding(times)], dim=-1)
        return self.fc(x)


class ReferenceClassifier(nn.Module):
    """Maps (B, 2, C, S, S) + integer time inputs (B,) -> relation logits (B, K)."""

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        self.config = config
        self.object_extractor = ObjectExtractor(config)
        self.relation_classifier = RelationHead(config)

    def forward(self, maps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Logits (B, K) for maps (B, 2, C, S, S) at time inputs t, (B,) or one for all."""
        cfg = self.config
        check_maps(maps, cfg.n_maps, cfg.map_size)
        b = maps.shape[0]
        times = torch.as_tensor(t, device=maps.device).long().reshape(-1).expand(b)
        x = maps.to(self.object_extractor.input_projection.weight.dtype)
        # Subject and object through the one extractor: rows follow (b, object) order.
        pooled = self.object_extractor(x.flatten(0, 1), times.repeat_interleave(2))
        return self.relation_classifier(pooled.reshape(b, -1), times)  # [subject, object]


def step_time_input(trained: Sequence[int], step: int) -> int:
    """The published classifiers' time input at denoising step ``step``: the smallest trained
    step index >= step; past the last one, 0 (the reference's rule)."""
    later = [int(s) for s in trained if int(s) >= step]
    return min(later) if later else 0


def relation_of_class(name: str) -> str:
    """The l2s relation a classifier class stands for ("to the left of" -> "left of");
    l2s names and unknown names come back unchanged."""
    return REFERENCE_CLASSES.get(name, name)
