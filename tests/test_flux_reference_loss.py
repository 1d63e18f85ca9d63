"""Flux with an imported published-style classifier: `l2s steer`'s first loss is the reference's
cross-entropy (docs/classifier.md, "Published classifiers"), checked against a reading that
shares no code with l2s's capture.

The independent side runs diffusers' own FluxPipeline (its prompt encoding, seeded latent draw,
packing, sigmas and guidance input) with diffusers' own attention processors, and reads the
query and key each processor hands to ``dispatch_attention_fn`` (after QK-norm and RoPE,
[text; image] order) during the first transformer forward; the classifier is
tests/reference_impl.py's torch-module reading of the checkpoint.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from reference_impl import CLASSES, flux_config, make_checkpoint, torch_reference_logits
from typer.testing import CliRunner

from l2s.cli import app
from l2s.families.mmdit_tiny import TINY_T5_TOKENS, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
PROMPT = "a dog to the right of a teddy bear"
TARGET, OTHER = "to the right of", "to the left of"
SCHNELL_STEPS = [1, 3]  # the published schnell classifier's steps (of 4)
DEV_STEPS = [5, 10, 15, 20, 25, 49]  # dev's (of 50)


class _FirstForwardDone(Exception):  # noqa: N818 (control flow)
    """Ends the pipeline call once step 0's transformer forward has run."""


def _first_step_qk(folder, prompt, *, seed, steps, guidance, text_len, monkeypatch):
    """(query, key) of every attention call in the first transformer forward of diffusers'
    FluxPipeline with ``text_len`` T5 tokens, in call order, and the pipeline (for its
    tokenizer)."""
    from diffusers import FluxPipeline
    from diffusers.models.transformers import transformer_flux

    pipe = FluxPipeline.from_pretrained(folder)  # fp32, CPU
    seen = []
    dispatch = transformer_flux.dispatch_attention_fn

    def spy(query, key, value, **kw):
        seen.append((query.detach().clone(), key.detach().clone()))
        return dispatch(query, key, value, **kw)

    def stop(*_):
        raise _FirstForwardDone

    hook = pipe.transformer.register_forward_hook(stop)
    # The folder's default image side as l2s reads it: its look-alike preset's token grid
    # (schnell 16, dev 32 a side) at 2 px per token (VAE factor 1, 2x2 packing).
    size = (32 if pipe.transformer.config.guidance_embeds else 16) * 2
    with monkeypatch.context() as m, pytest.raises(_FirstForwardDone):
        m.setattr(transformer_flux, "dispatch_attention_fn", spy)
        pipe(prompt, height=size, width=size, num_inference_steps=steps,
             guidance_scale=guidance, max_sequence_length=text_len,
             generator=torch.Generator().manual_seed(seed), output_type="latent")
    hook.remove()
    tf = pipe.transformer
    assert len(seen) == len(tf.transformer_blocks) + len(tf.single_transformer_blocks)
    return seen, pipe


def _word_tokens(tokenizer, prompt, word):
    enc = tokenizer(prompt, return_offsets_mapping=True)
    start = prompt.index(word)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"])
            if b > a and a < start + len(word) and b > start]


def _maps(seen, text_len, groups, renormalise_16):
    """(1, 2, C, 16, 16): per object, every layer's heads (layer-major, head-minor); each
    image-query x text-key map softmaxed over the text keys, its word's tokens averaged;
    resized bilinearly and renormalised when not 16x16 (renormalised anyway with
    ``renormalise_16``, the rule the schnell classifier does not use)."""
    objs = []
    for group in groups:
        chans = []
        for q, k in seen:  # (1, text + image, heads, D), text first
            probs = (torch.einsum("bshd,bthd->bhst", q[:, text_len:], k[:, :text_len])
                     * q.shape[-1] ** -0.5).softmax(-1)[0]  # (heads, image, text)
            side = int(probs.shape[1] ** 0.5)
            m = probs[:, :, group].mean(-1).reshape(-1, 1, side, side)  # row-major grid
            if side != 16:
                m = F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False)
            if side != 16 or renormalise_16:
                m = m / (m.sum(dim=(-2, -1), keepdim=True) + 1e-8)
            chans.append(m[:, 0])
        objs.append(torch.cat(chans))
    return torch.stack(objs)[None]


def _independent_losses(folder, ckpt, *, seed, steps, guidance, monkeypatch, text_len=512):
    """The reference's cross-entropy at step 0 over ``text_len`` T5 keys (the published Flux
    classifiers': 512), and the same with each thing that must matter done wrong:
    single-stream blocks first, head-major channels, the other renormalisation rule, the
    other target class."""
    seen, pipe = _first_step_qk(folder, PROMPT, seed=seed, steps=steps, guidance=guidance,
                                text_len=text_len, monkeypatch=monkeypatch)
    groups = [_word_tokens(pipe.tokenizer_2, PROMPT, w) for w in ("dog", "teddy bear")]
    assert len(groups[1]) == 2  # a two-token object: its maps are averaged
    n_double = len(pipe.transformer.transformer_blocks)
    heads = pipe.transformer.config.num_attention_heads
    steps_trained = ckpt["training_config"]["timesteps"]
    time_input = min(s for s in steps_trained if s >= 0)  # step 0 -> the first trained step

    def ce(order=None, renormalise_16=False, target=TARGET, layers=seen):
        maps = _maps(layers, text_len, groups, renormalise_16)
        if order is not None:
            maps = maps[:, :, order]
        logits = torch_reference_logits(ckpt, maps, time_input)
        return F.cross_entropy(logits, torch.tensor([CLASSES.index(target)])).item()

    c = len(seen) * heads
    head_major = [layer * heads + h for h in range(heads) for layer in range(len(seen))]
    return {"reference": ce(),
            "single_first": ce(layers=seen[n_double:] + seen[:n_double]),
            "head_major": ce(order=head_major if c > heads else None),
            "other_renormalisation": ce(renormalise_16=True),
            "other_target": ce(target=OTHER)}


def _flux_checkpoint(steps, seed):
    """A published-style Flux checkpoint trained (as far as its file says) on ``steps``.

    Its position table is scaled up: the tiny Flux's maps differ little from one channel to
    the next, and only the position rows tell the extractor which channel is which, so
    without this a wrong channel order would move the loss less than 10x the tolerance."""
    ckpt = make_checkpoint(rows=40, seed=seed, config=flux_config())
    ckpt["model_state_dict"]["object_extractor.positional_encoding.pe"] *= 10
    ckpt["training_config"]["timesteps"] = list(steps)
    return ckpt


def _steer_loss_before(tmp_path, folder, ckpt, *extra):
    """steps[0].loss_before of `l2s steer` with the imported checkpoint; checks the card's
    text length (512, the published Flux classifiers') is the one the prompt was encoded as,
    not the folder's own (TINY_T5_TOKENS)."""
    pth = tmp_path / "clf.pth"
    torch.save(ckpt, pth)
    res = runner.invoke(app, ["classifier", "import", str(pth), "--model", str(folder),
                              "--out", str(tmp_path / "clf")])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "clf" / "card.json").read_text())
    assert card["text_len"] == 512 and "512" in card["notes"][0]
    res = runner.invoke(app, ["steer", PROMPT, "--model", str(folder), "--classifier",
                              str(tmp_path / "clf"), "--steer-until", "1", "--iterations", "1",
                              "--out", str(tmp_path / "o"), "--json", *extra])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["text_len"] == 512 != TINY_T5_TOKENS
    return rep["steps"][0]["loss_before"]


def _assert_equal_and_able_to_fail(got, want, renormalisation_matters=True):
    assert got == pytest.approx(want["reference"], rel=1e-4)
    # Each mistake moves the loss at least 10x beyond the tolerance.
    wrong = ["single_first", "head_major", "other_target"]
    if renormalisation_matters:
        wrong.append("other_renormalisation")
    for k in wrong:
        assert want[k] != pytest.approx(want["reference"], rel=1e-3), k


def test_schnell_like_loss_before_is_the_references_cross_entropy(tmp_path, monkeypatch):
    """16x16 maps (schnell at 256 px): used as they are, not renormalised; no guidance
    input; step 0 reads the step table's first entry (1)."""
    folder = save_tiny(tmp_path / "flux", "flux", blocks=(2, 2))
    ckpt = _flux_checkpoint(SCHNELL_STEPS, seed=5)
    got = _steer_loss_before(tmp_path, folder, ckpt, "--steps", "4", "--seed", "11")
    want = _independent_losses(folder, ckpt, seed=11, steps=4, guidance=0.0,
                               monkeypatch=monkeypatch)
    _assert_equal_and_able_to_fail(got, want)
    # Maps over the folder's own T5 length (the card's length ignored) give another loss.
    own = _independent_losses(folder, ckpt, seed=11, steps=4, guidance=0.0,
                              monkeypatch=monkeypatch, text_len=TINY_T5_TOKENS)["reference"]
    assert own != pytest.approx(want["reference"], rel=1e-3)


def test_dev_like_loss_before_is_the_references_cross_entropy(tmp_path, monkeypatch):
    """32x32 maps (dev at 512 px): resized bilinearly to 16x16 and renormalised (so the
    16x16 rule cannot matter); the embedded guidance scale goes into the forward, 3.5 by
    default for a guidance-distilled folder (flux-dev's defaults, as the reference)."""
    folder = save_tiny(tmp_path / "flux-dev", "flux", blocks=(1, 2), guidance_embeds=True,
                       image_size=64)
    ckpt = _flux_checkpoint(DEV_STEPS, seed=6)
    got = _steer_loss_before(tmp_path, folder, ckpt, "--steps", "6", "--seed", "2")
    want = _independent_losses(folder, ckpt, seed=2, steps=6, guidance=3.5,
                               monkeypatch=monkeypatch)
    _assert_equal_and_able_to_fail(got, want, renormalisation_matters=False)
    # The guidance input reaches the maps: another scale gives another loss.
    other = _independent_losses(folder, ckpt, seed=2, steps=6, guidance=7.5,
                                monkeypatch=monkeypatch)["reference"]
    assert other != pytest.approx(want["reference"], rel=1e-3)
