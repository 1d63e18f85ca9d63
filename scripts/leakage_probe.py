"""Probe a toy for relation leakage: does the relation word reach the object word, and its map?

    python scripts/leakage_probe.py --model toy            # a preset of the toy world
    python scripts/leakage_probe.py --weights runs/literate-mmdit/model   # a toy export folder

Three numbers (docs/classifier.md, "Relation leakage on the toy: what was tried"):

* encoder cosine: the text encoder's output at the object word of "a A REL a B" against the
  same caption with the opposite relation, averaged over every ordered pair of shapes and both
  axes (above/below, left/right). The encoder is causal, so the object word (after the relation)
  is the only word the relation can change; 1.0 means it does not. Beside it, the mean attention
  the object word pays the relation word inside the encoder, per layer, and (toy-mmdit only)
  the same cosine on the transformer's own text stream after its last double-stream block, at
  the noisiest recorded step, where text tokens attend to each other without a causal mask.
* map shift: for two-shape scenes (forward-noised to each recorded step, as ``l2s invert
  --inversion noise`` records them), the subject-to-object offset between the two words' maps
  (attention centroids, all layers and heads averaged, in cells of the 16x16 map) under a
  caption stating the opposite relation minus under the true caption, projected on the
  direction the wrong caption asks for. A leaky model moves it by cells toward the wrong
  relation at noisy steps; a model that reads the layout moves it by ~0.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Where the object lies from the subject when "subject REL object" holds (x right, y down).
OBJECT_DIRECTION = {"left of": (1.0, 0.0), "right of": (-1.0, 0.0), "above": (0.0, 1.0),
                    "below": (0.0, -1.0)}


def _denoiser(args):
    if not args.weights:
        from l2s.engine.loading import load_backbone

        return load_backbone(args.model, device="cpu")
    folder = Path(args.weights)
    if (folder / "transformer").is_dir():
        from l2s.families.toy_mmdit import ToyMMDiTDenoiser
        from l2s.toy.mmdit import load_mmdit_components

        net, text, tok, sched = load_mmdit_components(folder)
        return ToyMMDiTDenoiser(net, text, tok, dict(sched.config))
    from l2s.families.unet import UNetDenoiser
    from l2s.toy.model import load_toy_components

    return UNetDenoiser(*load_toy_components(folder), name="toy")


def _scenes(seed: int, n: int):
    """The first n two-shape scenes of ``seed`` that GenEval relates, each with one relation."""
    from l2s.relations import geneval_relations
    from l2s.toy.scenes import random_scene

    out, i = [], 0
    while len(out) < n:
        scene = random_scene(np.random.default_rng([seed, i]), size=32, n_objects=2)
        held = sorted(geneval_relations(scene.objects[0].box, scene.objects[1].box))
        if held:
            out.append((scene, held[0]))
        i += 1
    return out


def _prompt(a: str, rel: str, b: str) -> str:
    from l2s.relations import Triplet, format_prompt

    return format_prompt([Triplet(a, rel, b)], style="plain")


def _word_state(states: torch.Tensor, indices) -> torch.Tensor:
    return states[list(indices)].mean(0)  # a word spelled in pieces: their mean


def encoder_probe(den) -> dict:
    """Cosine of the object word's encoder state under a relation and its opposite, the
    subject's, and the object word's attention to the relation word per encoder layer."""
    from l2s.engine.tokens import find_phrase, pair_tokens, phrase_tokens
    from l2s.toy.scenes import CATEGORY_NAMES

    tok, enc = den.tokenizer, den.text_encoder
    try:  # attention weights need the eager kernel (sdpa does not return them)
        enc.set_attn_implementation("eager")
    except (AttributeError, ValueError):
        pass
    obj_cos, subj_cos, attn = [], [], []
    for (a, b), rel in itertools.product(itertools.permutations(CATEGORY_NAMES, 2),
                                         ("above", "left of")):
        prompts = [_prompt(a, rel, b), _prompt(a, OPPOSITE[rel], b)]
        ids = tok(prompts, padding="max_length", truncation=True,
                  max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            out = enc(ids.to(enc.device), output_attentions=True)
        states = out.last_hidden_state.float().cpu()
        for p, q in enumerate(prompts):
            s, o = pair_tokens(tok, q, a, b)
            rel_word = OPPOSITE[rel] if p else rel
            r = phrase_tokens(tok, q, rel_word, find_phrase(q, rel_word))
            if out.attentions and out.attentions[0] is not None:  # (B, heads, T, T) per layer
                attn.append([float(layer[p, :, list(o.indices)][..., list(r.indices)]
                                   .sum(-1).mean()) for layer in out.attentions])
        cos = torch.nn.functional.cosine_similarity
        obj_cos.append(float(cos(_word_state(states[0], o.indices),
                                 _word_state(states[1], o.indices), dim=0)))
        subj_cos.append(float(cos(_word_state(states[0], s.indices),
                                  _word_state(states[1], s.indices), dim=0)))
    return {"object_cosine": float(np.mean(obj_cos)), "object_cosine_min": float(np.min(obj_cos)),
            "subject_cosine": float(np.mean(subj_cos)),
            "object_to_relation_attention": np.mean(attn, 0).tolist() if attn else None}


def joint_text_probe(den, x_t: torch.Tensor, t, prompts: list[str], objects) -> float | None:
    """Toy-mmdit only: mean cosine of the object word's text-stream state after the last
    double-stream block, true vs wrong caption (prompt pairs interleaved in ``prompts``)."""
    net = getattr(den, "transformer", None)
    blocks = getattr(net, "transformer_blocks", None)
    if not blocks:
        return None
    seen = {}
    def keep(module, inputs, out):  # returns None: the block's output stays as it is
        seen["txt"] = out[0]

    handle = blocks[-1].register_forward_hook(keep)
    try:
        with torch.no_grad():
            den.predict(x_t, t, den.encode_prompt(prompts))
    finally:
        handle.remove()
    txt = seen["txt"].float().cpu()
    cos = [float(torch.nn.functional.cosine_similarity(
        _word_state(txt[2 * i], o[0].indices), _word_state(txt[2 * i + 1], o[1].indices), dim=0))
        for i, o in enumerate(objects)]
    return float(np.mean(cos))


def _centroid(m: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[: m.shape[0], : m.shape[1]]
    w = m / m.sum()
    return np.array([(xs * w).sum(), (ys * w).sum()])


def map_probe(den, scenes, record: list[int], schedule: int, seed: int) -> dict:
    """Mean map shift toward the wrong caption's relation per recorded step (cells)."""
    from l2s.engine.tokens import pair_tokens
    from l2s.inversion.loop import noised_latents, record_maps

    prompts, groups, wrong, objects = [], [], [], []
    for scene, rel in scenes:
        a, b = (o.category for o in scene.objects)
        pair = [_prompt(a, rel, b), _prompt(a, OPPOSITE[rel], b)]
        toks = [pair_tokens(den.tokenizer, q, a, b) for q in pair]
        prompts += pair
        groups += [[list(g.indices) for g in t] for t in toks]
        wrong.append(OPPOSITE[rel])
        objects.append((toks[0][1], toks[1][1]))
    images = torch.from_numpy(np.stack([s.image for s, _ in scenes]).copy()).float().div(255)
    x0 = den.encode_image(images)  # (N, H, W, 3) in [0, 1]
    lat = noised_latents(den, x0, schedule, torch.Generator().manual_seed(seed))
    lat = lat.repeat_interleave(2, dim=1)  # each scene's trajectory for its two captions
    maps = record_maps(den, lat, prompts, groups, record, schedule)
    maps = maps.float().mean(3).numpy()  # (2N, T, 2 words, S, S)
    ts = den.timesteps(schedule)
    shifts, joint = {}, {}
    for j, s in enumerate(record):
        moved = []
        for i, w in enumerate(wrong):
            off = [_centroid(maps[2 * i + k, j, 1]) - _centroid(maps[2 * i + k, j, 0])
                   for k in (0, 1)]
            moved.append(float((off[1] - off[0]) @ np.array(OBJECT_DIRECTION[w])))
        shifts[int(ts[s])] = float(np.mean(moved))
        joint[int(ts[s])] = joint_text_probe(den, lat[s], ts[s], prompts, objects)
    return {"map_shift": shifts, "joint_text_cosine": joint}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", help="a preset of the toy world")
    p.add_argument("--weights", help="instead of --model: a toy (UNet or mmdit) export folder")
    p.add_argument("--scenes", type=int, default=24, help="two-shape scenes for the map shift")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", type=int, default=50, help="steps of the noise schedule")
    p.add_argument("--steps", default="2,5,10,49", help="recorded steps of that schedule")
    args = p.parse_args()
    torch.set_num_threads(1)
    den = _denoiser(args)
    enc = encoder_probe(den)
    print(f"encoder: object-word cosine {enc['object_cosine']:.4f} (min "
          f"{enc['object_cosine_min']:.4f}), subject {enc['subject_cosine']:.4f}; object -> "
          f"relation attention per layer {enc['object_to_relation_attention']}")
    res = map_probe(den, _scenes(args.seed, args.scenes), [int(s) for s in args.steps.split(",")],
                    args.schedule, args.seed)
    for t, shift in res["map_shift"].items():
        joint = res["joint_text_cosine"][t]
        extra = "" if joint is None else f"   joint text-stream object cosine {joint:.4f}"
        print(f"t={t:4d}: map shift toward the wrong relation {shift:+.3f} cells{extra}")


if __name__ == "__main__":
    main()
