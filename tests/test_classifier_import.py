"""`l2s classifier import`: round trip through a .pth, refusals, and steering with the result."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from reference_impl import (
    CLASSES,
    STEPS,
    flux_config,
    make_checkpoint,
    torch_reference_logits,
)
from typer.testing import CliRunner

from l2s.classifier.importer import ImportRefused, import_classifier, read_checkpoint
from l2s.classifier.model import load_classifier, trained_classifier_dir
from l2s.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
PROMPT = "a dog to the right of a teddy bear"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD folder whose maps come at 32x32 (resized) and 16x16 (renormalised only).

    (64x64 maps would cost seconds of self-attention per forward; the 64 -> 16 bilinear
    resize is checked in test_reference_classifier.py.)"""
    from l2s.families.tiny import tiny_sd_components

    folder = tmp_path_factory.mktemp("tiny-sd")
    unet, vae, text_encoder, tokenizer, scheduler = tiny_sd_components(sample_size=32)
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder),
                       ("tokenizer", tokenizer), ("scheduler", scheduler)):
        part.save_pretrained(folder / name)
    return folder


def _save(tmp_path, ckpt, name="clf.pth"):
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def _import(*args):
    return runner.invoke(app, ["classifier", "import", *map(str, args)])


def test_round_trip_through_pth_and_cli(tmp_path, sd_folder):
    ckpt = make_checkpoint(rows=40)
    pth = _save(tmp_path, ckpt)
    res = _import(pth, "--model", sd_folder, "--out", tmp_path / "clf", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    card = json.loads((tmp_path / "clf" / "card.json").read_text())
    assert summary["card"] == str(tmp_path / "clf" / "card.json")
    assert card["source"]["sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    assert card["classes"] == list(CLASSES)
    assert card["timesteps"] == STEPS and card["clock"] == "step"
    assert card["architecture"]["kind"] == "reference"
    assert card["architecture"]["max_maps"] == 40 and card["architecture"]["n_maps"] == 10
    # Tiny UNet, forward order: down0 (2 heads, 32x32), mid (4, 16x16), up1 a0, a1 (2 each).
    assert card["layout"] == {"name": "unet", "order": [2, 3, 4, 5, 0, 1, 6, 7, 8, 9],
                              "resize": "bilinear", "renormalise": "always"}
    assert card["backbone"]["model"] == str(sd_folder) and "licence" in card
    net, _ = load_classifier(tmp_path / "clf")
    for k, v in ckpt["model_state_dict"].items():
        assert torch.equal(net.state_dict()[k], v), k


def test_installs_where_steer_looks_and_models_lists_it(tmp_path, sd_folder):
    from l2s.engine.loading import load_backbone

    den = load_backbone(str(sd_folder))
    pth = _save(tmp_path, make_checkpoint(rows=40))
    res = import_classifier(pth, str(sd_folder), denoiser=den)
    assert res.card_path == trained_classifier_dir(str(sd_folder)) / "card.json"
    from l2s.classifier.model import default_classifier

    assert default_classifier(str(sd_folder), den.fingerprint) == res.card_path
    with pytest.raises(ImportRefused, match="already holds a classifier: pass --force"):
        import_classifier(pth, str(sd_folder), denoiser=den)
    import_classifier(pth, str(sd_folder), denoiser=den, force=True)


def test_models_shows_imported_classifier(tmp_path, monkeypatch):
    from l2s.classifier.model import describe_models

    pth = _save(tmp_path, make_checkpoint(rows=40))
    dest = trained_classifier_dir("sd2.1-base")
    dest.mkdir(parents=True)
    (dest / "card.json").write_text(json.dumps({"format": "x", "source": {"file": pth.name}}))
    rows = {r["name"]: r for r in describe_models()}
    assert rows["sd2.1-base"]["classifier_origin"] == "imported from clf.pth"
    assert "published L2S SD2 classifier" in rows["sd2.1-base"]["description"]
    assert "does not fit" in rows["sd2.1"]["description"]


def test_refuses_more_maps_than_the_position_table(tmp_path, sd_folder):
    res = _import(_save(tmp_path, make_checkpoint(rows=8)), "--model", sd_folder, "--out",
                  tmp_path / "x")
    assert res.exit_code == 2
    assert "gives 10 maps per object but the checkpoint's position table has 8 rows" in \
        " ".join(res.output.split())


def test_refuses_unknown_class_names(tmp_path, sd_folder):
    ckpt = make_checkpoint(rows=40, classes=("above", "below", "inside", "to the left of",
                                             "to the right of"))
    res = _import(_save(tmp_path, ckpt), "--model", sd_folder, "--out", tmp_path / "x")
    assert res.exit_code == 2 and "['inside'] are unknown to l2s" in " ".join(res.output.split())


class Gadget:
    """Stands for any object a pickle may carry."""


def test_refuses_a_pickle_holding_objects(tmp_path):
    ckpt = make_checkpoint(rows=40)
    ckpt["config"] = Gadget()
    with pytest.raises(ImportRefused, match=r"object of type test_classifier_import\.Gadget"):
        read_checkpoint(_save(tmp_path, ckpt))


class Payload:
    """A pickle that would run a command when unpickled (never unpickled here)."""

    def __reduce__(self):
        import os

        return (os.system, ("echo unpickled",))


def test_a_malicious_pickle_is_named_as_such(tmp_path):
    """Catches torch 2.13's wording of a blocked module ("unsupported GLOBAL posix.system
    whose module posix is blocked") taken for a file that is no checkpoint: "download it
    again" was the advice."""
    ckpt = make_checkpoint(rows=40)
    ckpt["config"] = Payload()
    with pytest.raises(ImportRefused, match=r"holds a call of (posix|nt)\.system, which loading "
                                            r"it as a pickle would run.*may be malicious"):
        read_checkpoint(_save(tmp_path, ckpt))


@pytest.mark.parametrize("content", [b"<!DOCTYPE html><html>Sign in</html>", b"", b"PK\x03\x04"])
def test_a_file_that_is_no_checkpoint_says_so(tmp_path, content):
    # Was, for a text file: "holds a Python object of type Check the documentation of
    # torch.load ...".
    path = tmp_path / "sd2.pth"
    path.write_bytes(content)
    with pytest.raises(ImportRefused, match="is not a (readable )?PyTorch checkpoint.*"
                                            "download it again") as e:
        read_checkpoint(path)
    assert "object of type" not in str(e.value)


def test_refuses_weights_that_do_not_match_the_config(tmp_path, sd_folder):
    ckpt = make_checkpoint(rows=40)
    ckpt["config"]["extractor"]["num_layers"] = 1  # the file holds two layers
    res = _import(_save(tmp_path, ckpt), "--model", sd_folder, "--out", tmp_path / "x")
    assert res.exit_code == 2
    assert "unexpected tensors ['object_extractor.transformer.layers.1." in \
        " ".join(res.output.split())
    ckpt = make_checkpoint(rows=40)
    del ckpt["rel_name_to_idx"]
    with pytest.raises(ImportRefused, match="lacks rel_name_to_idx"):
        read_checkpoint(_save(tmp_path, ckpt))


@pytest.mark.parametrize(("cast", "needle"), [
    (lambda v: torch.full_like(v, float("nan")), "holds NaN or infinite values"),
    (lambda v: v.to(torch.int64), "is int64, not a float16"),
    (lambda v: v > 0, "is bool, not a float16"),
    (lambda v: v.to(torch.complex64), "is complex64, not a float16"),
    (lambda v: v.to(torch.float8_e4m3fn), "is float8_e4m3fn, not a float16"),
])
def test_refuses_weights_it_would_cast_silently(tmp_path, sd_folder, cast, needle):
    """Catches NaN, int64, bool, complex and float8 weights imported with a silent .float()
    (a classifier that steers nothing, exit 0)."""
    ckpt = make_checkpoint(rows=40)
    state = ckpt["model_state_dict"]
    name = next(k for k, v in state.items() if v.ndim == 2)
    state[name] = cast(state[name])
    res = _import(_save(tmp_path, ckpt), "--model", sd_folder, "--out", tmp_path / "x")
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"{name} {needle}" in text and "Traceback" not in text
    assert not (tmp_path / "x" / "card.json").exists()


def _independent_losses(folder, ckpt, prompt, seed, steps):
    """The reference's cross-entropy at step 0, computed without l2s's engine or module; and,
    to show the comparison can fail, the same with the maps in forward order and with another
    target class."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextModel, CLIPTokenizerFast

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tok = CLIPTokenizerFast.from_pretrained(folder / "tokenizer")
    sched = DDIMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(steps)
    enc = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_offsets_mapping=True, return_tensors="pt")

    def tokens(word):
        start = prompt.index(word)
        return [i for i, (a, b) in enumerate(enc.offset_mapping[0].tolist())
                if b > a and a < start + len(word) and b > start]

    groups = [tokens("dog"), tokens("teddy bear")]
    assert len(groups[1]) == 2  # a two-token object: its maps are averaged
    captured = []
    unet.set_attn_processor(AttnProcessor())
    for name, mod in unet.named_modules():
        if name.endswith("attn2"):
            def scores(q, k, mask=None, _m=mod, _f=mod.get_attention_scores):
                p = _f(q, k, mask)  # (heads, HW, T): softmax over every key, padding included
                captured.append((p.shape[1], _m.heads, p))
                return p
            mod.get_attention_scores = scores
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        unet(latents, sched.timesteps[0], encoder_hidden_states=text(enc.input_ids)[0])

    def maps(layers):
        objs = []
        for g in groups:
            chans = []
            for hw, heads, p in layers:
                side = int(hw**0.5)
                m = p.reshape(heads, hw, -1)[:, :, g].mean(-1).reshape(heads, 1, side, side)
                m = F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False)
                chans.append((m / (m.sum(dim=(-2, -1), keepdim=True) + 1e-8))[:, 0])
            objs.append(torch.cat(chans))
        return torch.stack(objs)[None]  # (1, 2, C, 16, 16)

    def ce(m, target):
        logits = torch_reference_logits(ckpt, m, STEPS[0])  # step 0 -> time input 5
        return F.cross_entropy(logits, torch.tensor([CLASSES.index(target)])).item()

    by_resolution = maps(sorted(captured, key=lambda c: c[0]))  # stable: coarsest first
    return {"reference": ce(by_resolution, "to the right of"),
            "forward_order": ce(maps(captured), "to the right of"),
            "other_target": ce(by_resolution, "to the left of")}


def test_steer_loss_before_is_the_references_cross_entropy(tmp_path, sd_folder):
    ckpt = make_checkpoint(rows=40, seed=3)
    assert _import(_save(tmp_path, ckpt), "--model", sd_folder, "--out",
                   tmp_path / "clf").exit_code == 0
    res = runner.invoke(app, ["steer", PROMPT, "--model", str(sd_folder), "--classifier",
                              str(tmp_path / "clf"), "--steps", "4", "--steer-until", "1",
                              "--iterations", "1", "--seed", "7", "--out", str(tmp_path / "o"),
                              "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["steps"][0]["loss_before"]
    want = _independent_losses(sd_folder, ckpt, PROMPT, seed=7, steps=4)
    assert got == pytest.approx(want["reference"], rel=1e-4)
    # The comparison can fail: another channel order or target class moves the loss 10x
    # beyond the tolerance or more.
    assert want["forward_order"] != pytest.approx(want["reference"], rel=1e-3)
    assert want["other_target"] != pytest.approx(want["reference"], rel=1e-3)


def test_seed_contract(sd_folder):
    from l2s.engine.loading import load_backbone
    from l2s.engine.sampling import seeded_latents

    den = load_backbone(str(sd_folder))
    lat = seeded_latents(den, [5, 6])
    for i, s in enumerate((5, 6)):
        want = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(s),
                           dtype=torch.float32)
        assert torch.equal(lat[i : i + 1].cpu(), want)


def test_flux_layout_and_refusals(tmp_path, sd_folder):
    from l2s.families.mmdit_tiny import save_tiny

    flux = save_tiny(tmp_path / "flux", "flux")
    flux_ckpt = make_checkpoint(rows=40, config=flux_config())
    res = _import(_save(tmp_path, flux_ckpt), "--model", flux, "--out", tmp_path / "f", "--json")
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "f" / "card.json").read_text())
    # Double- then single-stream blocks, head-minor: l2s's own order; 16x16 maps kept as they
    # are, larger ones resized and renormalised.
    assert card["layout"] == {"name": "flux", "order": None, "resize": "bilinear",
                              "renormalise": "resized"}
    assert card["backbone"]["layers"][0]["name"].startswith("transformer_blocks.")
    assert card["backbone"]["layers"][-1]["name"].startswith("single_transformer_blocks.")
    # An SD-shaped checkpoint on Flux, a Flux-shaped one on a UNet: refused.
    res = _import(_save(tmp_path, make_checkpoint(rows=40), "sd.pth"), "--model", flux,
                  "--out", tmp_path / "x")
    assert res.exit_code == 2 and "published SD classifiers' shape" in " ".join(res.output.split())
    res = _import(_save(tmp_path, flux_ckpt, "fx.pth"), "--model", sd_folder, "--out",
                  tmp_path / "y")
    assert res.exit_code == 2 and "Flux classifiers need the flux family" in \
        " ".join(res.output.split())


def test_flux_layout_on_the_published_block_list():
    from l2s.classifier.layout import LayoutError, channels
    from l2s.engine.backbone import CrossAttnLayer
    from l2s.families.flux import flux_layout

    layers = ([CrossAttnLayer(f"transformer_blocks.{i}.attn", 24, (16, 16)) for i in range(19)]
              + [CrossAttnLayer(f"single_transformer_blocks.{j}.attn", 24, (16, 16))
                 for j in range(38)])
    assert channels(layers) == 1368 and flux_layout(layers).order is None
    with pytest.raises(LayoutError, match="all 57 blocks"):
        flux_layout(layers[:19])  # layers="double"


@pytest.mark.parametrize("preset,rows,config,n_maps", [
    ("sd1.4", 200, None, 128), ("sd2.1-base", 200, None, 195),
    ("flux-dev", 1400, "flux", 1368)])
def test_a_preset_imports_from_its_architecture_with_no_weights(tmp_path, preset, rows, config,
                                                                n_maps):
    """Bug: importing for a preset loaded the whole backbone, so with HF_HUB_OFFLINE=1 and an
    empty HF cache (conftest) it was refused although only the architecture is needed."""
    from l2s.classifier.model import check_backbone
    from l2s.engine.hub import hf_cache_dir
    from l2s.engine.loading import load_architecture

    ckpt = make_checkpoint(rows=rows, config=flux_config() if config else None)
    res = _import(_save(tmp_path, ckpt), "--model", preset, "--out", tmp_path / "c", "--json")
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "c" / "card.json").read_text())
    assert card["architecture"]["n_maps"] == n_maps
    assert card["backbone"]["name"] == preset and card["backbone"]["fingerprint"] is None
    assert not list(hf_cache_dir().glob("models--*"))  # nothing was downloaded
    # Bound to the architecture: any weights of it pass, another layer list does not.
    den = load_architecture(preset)
    den.fingerprint = "weights-of-some-download"
    check_backbone(card, den)
    if preset.startswith("sd"):
        with pytest.raises(Exception, match="belongs to backbone"):
            check_backbone(card, load_architecture("sd2.1-base" if preset == "sd1.4"
                                                   else "sd1.4"))
