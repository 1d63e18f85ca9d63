"""Record the cross-attention maps of two objects and differentiate a loss through them.

Runs offline on tiny random SD-shaped components (swap in `load_backbone("sd2.1")` for the
real model):  python examples/record_attention.py
"""

import torch

from l2s.engine.hooks import AttentionRecorder
from l2s.engine.tokens import triplet_tokens
from l2s.families.tiny import tiny_sd
from l2s.relations import parse

den = tiny_sd()
prompt = "a teddy bear to the left of a dog"
(triplet,) = parse(prompt)
subj, obj = triplet_tokens(den.tokenizer, prompt, triplet)
print(f"{triplet}: subject tokens {subj.indices} {subj.pieces}, object tokens {obj.indices}")

latents = den.prepare_latents(1, torch.Generator().manual_seed(0)).requires_grad_(True)
cond = den.encode_prompt([prompt])
layers = den.cross_attention_layers()
with AttentionRecorder(den, layers, [subj.indices, obj.indices],
                       keep_grad=True) as rec, torch.enable_grad():
    den.predict(latents, 500, cond)
    maps = rec.stacked()  # (B=1, G=2, C=sum of heads, 16, 16)
    # A hand-made loss: the subject's horizontal centroid should sit left of the object's.
    xs = torch.linspace(0, 1, maps.shape[-1])
    cx = (maps.sum(-2) * xs).sum(-1).mean(-1)  # (B, G)
    loss = torch.relu(cx[:, 0] - cx[:, 1] + 0.1).sum()
    loss.backward()
print(f"maps {tuple(maps.shape)}, loss {loss.item():.4f}, |grad| {latents.grad.norm():.3e}")
