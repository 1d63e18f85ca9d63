"""Classifier training on small synthetic caches: splits, recipe, leakage report, errors, CLI."""

import json
from dataclasses import replace

import pytest
import torch
import typer
from typer.testing import CliRunner

from l2s.classifier.data import TrainError, hash_split, load_maps, split_images
from l2s.classifier.model import load_classifier, trained_classifier_dir
from l2s.classifier.train import TrainConfig, run_train
from l2s.engine.backbone import CrossAttnLayer
from l2s.inversion.cache import AttentionCache, content_key
from l2s.relations import RELATIONS

LAYERS = (("down.attn2", 2), ("up.attn2", 3))  # C = 5 maps per object
OFFSETS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}  # y down
FP = "fp-synthetic"


pytestmark = pytest.mark.usefixtures("one_thread")


class FakeBackbone:
    """What training reads of a denoiser: name, fingerprint and recorded layers."""

    device = torch.device("cpu")

    def __init__(self, name="synthetic", fingerprint=FP, layers=LAYERS):
        self.name, self.fingerprint, self.layers = name, fingerprint, layers

    def cross_attention_layers(self):
        return [CrossAttnLayer(n, h, (8, 8)) for n, h in self.layers]


def _blob(centre, size, g):
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    m = torch.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / 2.0)
    m = m + 0.05 * torch.rand(size, size, generator=g)
    return m / m.sum()


def make_cache(root, n_images=48, size=8, timesteps=(801, 401), relations=RELATIONS,
               negatives=True, source="shapes", seed=0, text_len=None, leak_at=()):
    """Subject and object blobs placed by the true relation; each image is recorded under its
    true caption and one wrong caption with the SAME geometry, both labelled with the truth.
    At the timesteps of ``leak_at`` the blobs are placed by the CAPTION's relation instead:
    maps that carry the relation word, not the layout (relation leakage)."""
    cache = AttentionCache(root, FP)
    g = torch.Generator().manual_seed(seed)
    c = sum(h for _, h in LAYERS)
    for i in range(n_images):
        rel = relations[i % len(relations)]
        centre = size / 2 - 0.5 + (torch.rand(2, generator=g) - 0.5) * 2
        gap = size * 0.35 * (0.8 + 0.4 * torch.rand(1, generator=g).item())
        others = [r for r in RELATIONS if r != rel]
        prompts = [("pos", rel)] + ([("neg", others[i % 3])] if negatives else [])
        for polarity, prompt_rel in prompts:
            ds = [torch.tensor(OFFSETS[prompt_rel if t in leak_at else rel],
                               dtype=torch.float) * gap / 2 for t in timesteps]
            maps = torch.stack([torch.stack([torch.stack([_blob(p, size, g) for _ in range(c)])
                                             for p in (centre + d, centre - d)])
                                for d in ds])  # (T, 2, C, S, S)
            cache.put(content_key(FP, seed, i, polarity, timesteps), maps, {
                "relation": rel, "prompt_relation": prompt_rel, "polarity": polarity,
                "image_hash": f"img{seed}-{i}", "source": source, "source_id": str(i),
                "split": ("train", "train", "val", "test")[i % 4],
                "timesteps": list(timesteps), "layers": [n for n, _ in LAYERS],
                "heads": [h for _, h in LAYERS], "map_size": size, "fingerprint": FP,
                "model": "synthetic", **({} if text_len is None else {"text_len": text_len})})
    return cache


def _cfg(tmp_path, **kw):
    base = dict(model="synthetic", cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "out"),
                epochs=6, batch_size=32, lr=3e-3, d_model=32, depth=1, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_split_is_by_image_and_stable(tmp_path):
    make_cache(tmp_path / "cache", n_images=40)
    data = load_maps(tmp_path / "cache", FP, name="synthetic", model="synthetic")
    assert data.maps.shape == (40 * 2 * 2, 2, 5, 8, 8) and data.maps.dtype == torch.float16
    parts = split_images(data, _cfg(tmp_path))
    side = {}
    for s, idx in parts.items():
        for j in idx.tolist():
            assert side.setdefault(data.image[j], s) == s  # never on two sides
    assert sum(len(i) for i in parts.values()) == len(data.image)
    # Each image's true- and wrong-caption samples all sit on its side.
    for idx in parts.values():
        negs = {data.image[j] for j in idx.tolist() if data.neg[j]}
        poss = {data.image[j] for j in idx.tolist() if not data.neg[j]}
        assert negs == poss
    # A hash of the image alone: more data never moves an image; the seed reshuffles.
    assert all(hash_split(img, 0, 0.15, 0.15) == s for img, s in side.items())
    assert any(hash_split(img, 1, 0.15, 0.15) != s for img, s in side.items())
    recorded = split_images(data, _cfg(tmp_path, split="recorded"))
    assert {data.split[j] for j in recorded["val"].tolist()} == {"val"}


def test_end_to_end_learns_geometry_not_words(tmp_path):
    make_cache(tmp_path / "cache", n_images=48)
    events = []
    res = run_train(_cfg(tmp_path), FakeBackbone(), callback=events.append)
    assert [e["epoch"] for e in events] == list(range(1, len(events) + 1))
    assert set(events[0]) >= {"epoch", "train_loss", "val_loss", "val_acc", "lr"}
    m = res.metrics
    assert m["test_accuracy_true_caption"] >= 0.9 and m["test_accuracy_wrong_caption"] >= 0.9
    assert m["test_wrong_caption_predicts_caption"] <= 0.1
    assert sum(map(sum, m["confusion"])) == sum(m["test_samples"].values())
    card = json.loads(res.card_path.read_text())
    assert card["backbone"] == {"name": "synthetic", "fingerprint": FP, "model": "synthetic",
                                "layers": [{"name": "down.attn2", "heads": 2},
                                           {"name": "up.attn2", "heads": 3}]}
    assert card["timesteps"] == [801, 401] and card["map_size"] == 8
    entries = card["data"]["entries"]["shapes"]  # split -> polarity -> entries used
    assert sum(e["pos"] for e in entries.values()) == sum(e["neg"] for e in entries.values()) == 48
    assert entries["train"]["pos"] == card["data"]["images"]["train"]
    assert card["training"]["lr"] == 3e-3 and card["training"]["epochs_run"] == len(events)
    assert "test_accuracy_wrong_caption" in card["metrics"]
    # a shared card names no folder of the machine that trained it (it held cache_dir and out)
    assert str(tmp_path) not in res.card_path.read_text()
    assert str(tmp_path) in (res.card_path.parent / "config.yaml").read_text()  # the rerun's
    model, _ = load_classifier(res.card_path, denoiser=FakeBackbone())
    x = torch.stack([torch.zeros(2, 5, 8, 8)])
    x[0, 0, :, 4, 1] = 1  # subject at the left
    x[0, 1, :, 4, 6] = 1  # object at the right
    assert RELATIONS[model(x, torch.tensor([801])).argmax().item()] == "left of"
    assert json.dumps(res.to_json())  # JSON-ready


def test_reference_arch_trains_from_the_cache(tmp_path):
    from l2s.classifier.model import time_input

    make_cache(tmp_path / "cache", n_images=48)
    # Fed raw sum-1 maps (tiny values), it plateaus for ~150 steps before reading them.
    res = run_train(_cfg(tmp_path, arch="reference", epochs=16, batch_size=8, lr=1e-3,
                         early_stop_patience=16), FakeBackbone())
    m = res.metrics
    assert m["test_accuracy_true_caption"] >= 0.9 and m["test_accuracy_wrong_caption"] >= 0.9
    card = json.loads(res.card_path.read_text())
    assert card["architecture"]["kind"] == "reference"
    assert card["architecture"]["n_times"] == 2 and card["training"]["arch"] == "reference"
    # Its time input is the row of the trained timestep: 801 -> 0, 401 -> 1 (also from 500).
    tin = time_input(card)
    assert (tin(801, 0), tin(401, 9), tin(500, 9), tin(999, 0)) == (0, 1, 1, 0)
    model, _ = load_classifier(res.card_path, denoiser=FakeBackbone())
    x = torch.stack([torch.zeros(2, 5, 8, 8)])
    x[0, 0, :, 4, 1] = 1  # subject at the left
    x[0, 1, :, 4, 6] = 1  # object at the right
    assert RELATIONS[model(x, torch.tensor([0])).argmax().item()] == "left of"
    with pytest.raises(TrainError, match="--arch must be one of l2s, reference, got"):
        _cfg(tmp_path, arch="big")


def test_positive_only_drops_wrong_captions_but_still_reports_them(tmp_path):
    make_cache(tmp_path / "cache", n_images=32)
    res = run_train(_cfg(tmp_path, positive_only=True, epochs=1), FakeBackbone())
    samples = res.card["data"]["samples"]
    data = load_maps(tmp_path / "cache", FP, name="synthetic", model="synthetic")
    parts = split_images(data, _cfg(tmp_path))
    assert samples["train"] == int((~data.neg[parts["train"]]).sum())
    assert samples["test"] == len(parts["test"])  # the test keeps both captions
    assert res.metrics["test_samples"]["wrong_caption"] > 0
    assert res.metrics["test_accuracy_wrong_caption"] is not None
    assert "neg" not in res.card["data"]["entries"]["shapes"]["train"]


def test_empty_cache_says_to_invert_first(tmp_path):
    (tmp_path / "cache").mkdir()
    with pytest.raises(TrainError, match=r"no cached maps for synthetic \(fp-synthetic\) in .*: "
                                         r"run `l2s invert --model synthetic` first"):
        run_train(_cfg(tmp_path), FakeBackbone())
    AttentionCache(tmp_path / "cache", "other-fp")
    (tmp_path / "cache" / "other-fp" / "settings.json").write_text('{"model": "synthetic"}')
    with pytest.raises(TrainError, match=r"the cache holds maps of synthetic \(other-fp\)"):
        run_train(_cfg(tmp_path), FakeBackbone())
    with pytest.raises(TrainError, match="does not exist"):
        run_train(_cfg(tmp_path, cache_dir=str(tmp_path / "nowhere")), FakeBackbone())


def test_foreign_folder_and_unknown_source(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models--x").mkdir()
    (tmp_path / "cache" / "models--x" / "blob").write_text("not ours")
    with pytest.raises(TrainError, match="is not an l2s attention cache"):
        run_train(_cfg(tmp_path), FakeBackbone())
    make_cache(tmp_path / "cache", n_images=8)
    with pytest.raises(TrainError, match=r"no cached maps of source\(s\) gqa .*'shapes': 16"):
        run_train(_cfg(tmp_path, data=("gqa",), invert="never"), FakeBackbone())


def test_class_without_samples(tmp_path):
    make_cache(tmp_path / "cache", n_images=30, relations=RELATIONS[:3])
    with pytest.raises(TrainError, match="no training samples of class 'below'"):
        run_train(_cfg(tmp_path), FakeBackbone())


def test_too_few_images_for_a_split(tmp_path):
    make_cache(tmp_path / "cache", n_images=2)
    with pytest.raises(TrainError, match="too few images for a train/val/test split"):
        run_train(_cfg(tmp_path), FakeBackbone())


def test_entries_with_inconsistent_shapes(tmp_path):
    make_cache(tmp_path / "cache", n_images=4)
    make_cache(tmp_path / "cache", n_images=4, timesteps=(901, 501, 101), seed=1)
    with pytest.raises(TrainError, match="disagree: 8 entries of shape .* 8 entries of shape"):
        run_train(_cfg(tmp_path), FakeBackbone())
    make_cache(tmp_path / "one", n_images=4)
    with pytest.raises(TrainError, match="recorded over layers"):
        run_train(_cfg(tmp_path, cache_dir=str(tmp_path / "one")),
                  FakeBackbone(layers=(("other", 5),)))


def test_the_text_length_the_maps_were_made_with_reaches_the_card(tmp_path):
    """`l2s invert` records the text keys each map spans; the card says it when every entry
    agrees (steering then encodes prompts so), nothing when some entry predates it, and
    entries over different lengths are refused."""
    make_cache(tmp_path / "cache", n_images=16, text_len=512)
    res = run_train(_cfg(tmp_path, epochs=1), FakeBackbone())
    assert json.loads(res.card_path.read_text())["text_len"] == 512
    make_cache(tmp_path / "cache", n_images=4, seed=1)  # older entries: length unknown
    assert load_maps(tmp_path / "cache", FP, name="s", model="s").text_len is None
    make_cache(tmp_path / "cache", n_images=4, seed=2, text_len=256)
    with pytest.raises(TrainError, match="different text lengths .*over 512.*over 256"):
        load_maps(tmp_path / "cache", FP, name="s", model="s")


def test_bad_settings():
    with pytest.raises(TrainError, match="must each be in"):
        TrainConfig(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(TrainError, match="--split must be one of hash, recorded, got"):
        TrainConfig(split="random")
    with pytest.raises(TrainError, match="--augment must be one of none, mirror, all, got"):
        TrainConfig(augment="rotate")
    # were named tokens, epochs, batch_size: say the option as the command line spells it
    with pytest.raises(TrainError, match="--tokens must be one of map, layer, got 'x'"):
        TrainConfig(tokens="x")
    with pytest.raises(TrainError, match="--batch-size must be >= 1, got 0"):
        TrainConfig(batch_size=0)
    assert TrainConfig(model="toy").resolved_lr() == 1e-3
    assert TrainConfig(model="sd2.1").resolved_lr() == 1e-4
    assert TrainConfig(model="toy").resolved_size() == (64, 1)
    assert TrainConfig(model="sd2.1").resolved_size() == (256, 2)
    assert TrainConfig(model="sd2.1", d_model=128).resolved_size() == (128, 2)
    # The toy-mmdit reads its preset's training defaults like the toy (it got SD's 2M-parameter
    # classifier and lr 1e-4 when only the name "toy" was special-cased); the reference network
    # keeps its published size on any backbone, and a hub id without a preset gets SD's.
    assert TrainConfig(model="toy-mmdit").resolved_lr() == 1e-3
    assert TrainConfig(model="toy-mmdit").resolved_size() == (64, 1)
    assert TrainConfig(model="toy", arch="reference").resolved_size() == (256, 2)
    assert TrainConfig(model="someone/model").resolved_lr() == 1e-4


def _cli(monkeypatch):
    from l2s.cli.train import train
    from l2s.engine import loading

    monkeypatch.setattr(loading, "load_backbone", lambda model, **kw: FakeBackbone(name=model))
    app = typer.Typer()
    app.command("train")(train)
    return app


def test_cli_json(tmp_path, monkeypatch):
    app = _cli(monkeypatch)
    make_cache(tmp_path / "cache", n_images=24)
    r = CliRunner().invoke(app, ["--model", "synthetic", "--cache-dir", str(tmp_path / "cache"),
                                 "--epochs", "2", "--lr", "3e-3", "--batch-size", "32",
                                 "--d-model", "32", "--depth", "1", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out["metrics"]) >= {"test_accuracy_true_caption", "test_accuracy_wrong_caption",
                                   "confusion"}
    # Written where `l2s steer` looks by default.
    assert out["card"] == str(trained_classifier_dir("synthetic") / "card.json")


def test_cli_table_and_errors(tmp_path, monkeypatch):
    app = _cli(monkeypatch)
    make_cache(tmp_path / "cache", n_images=24)
    r = CliRunner().invoke(app, ["--cache-dir", str(tmp_path / "cache"), "--model", "synthetic",
                                 "--epochs", "1", "--d-model", "32", "--depth", "1",
                                 "--out", str(tmp_path / "clf"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "wrong caption" in r.output and "classifier card:" in r.output
    assert (tmp_path / "clf" / "model.safetensors").exists()
    r = CliRunner().invoke(app, ["--cache-dir", str(tmp_path / "empty"), "--model", "synthetic"])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["--model", "synthetic", "--split", "random"])
    assert r.exit_code == 2 and "--split must be one of hash, recorded" in r.output


def test_cli_says_it_resumes_an_interrupted_run(tmp_path, monkeypatch):
    # Was: a rerun continued silently (only the epoch bar started past 1).
    import l2s.classifier.train as cli_train

    app = _cli(monkeypatch)
    make_cache(tmp_path / "cache", n_images=24)
    args = ["--cache-dir", str(tmp_path / "cache"), "--model", "synthetic", "--epochs", "3",
            "--d-model", "32", "--depth", "1", "--out", str(tmp_path / "clf"), "--device", "cpu"]
    whole = cli_train.train

    def cut(cfg, den, callback=None, fresh=False):
        def stop(ev):
            callback(ev)
            if ev["epoch"] == 1:
                raise KeyboardInterrupt
        return whole(cfg, den, callback=stop, fresh=fresh)

    monkeypatch.setattr(cli_train, "train", cut)
    assert CliRunner().invoke(app, args).exit_code != 0
    monkeypatch.setattr(cli_train, "train", whole)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "resuming the interrupted run saved in" in r.output
    assert "train-checkpoint.safetensors (--fresh starts over)" in " ".join(r.output.split())
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "other")])
    assert "resuming" not in r.output


def _blob_pair(centres, size=16, heads=3):
    """(B, 2, heads, S, S) Gaussian blobs at the given (subject, object) (x, y) centres."""
    ax = torch.arange(size, dtype=torch.float32) + 0.5
    out = []
    for (sx, sy), (ox, oy) in centres:
        pair = []
        for cx, cy in ((sx, sy), (ox, oy)):
            m = torch.exp(-((ax[None] - cx) ** 2 + (ax[:, None] - cy) ** 2) / 4.0)
            pair.append((m / m.sum()).expand(heads, size, size))
        out.append(torch.stack(pair))
    return torch.stack(out)


def _geometric_label(x):
    """The relation the blobs' centroids show (x: (B, 2, C, S, S)), as RELATIONS indices."""
    from l2s.relations import geneval_relations

    s = x.shape[-1]
    ax = torch.arange(s, dtype=torch.float32) + 0.5
    m = x.mean(2)
    cx = (m.sum(-2) * ax).sum(-1)
    cy = (m.sum(-1) * ax).sum(-1)
    labels = []
    for b in range(len(x)):
        boxes = [(cx[b, i] - 1, cy[b, i] - 1, cx[b, i] + 1, cy[b, i] + 1) for i in (0, 1)]
        (rel,) = geneval_relations(*[tuple(map(float, bx)) for bx in boxes])
        labels.append(RELATIONS.index(rel))
    return torch.tensor(labels)


@pytest.mark.parametrize("mode", ["mirror", "all"])
def test_augmentation_keeps_labels_true_to_the_geometry(mode):
    from l2s.classifier.train import augment_batch

    gen = torch.Generator().manual_seed(0)
    centres = [((3, 8), (12, 8)), ((12, 8), (3, 8)), ((8, 2), (8, 13)), ((8, 13), (8, 2))] * 16
    x = _blob_pair(centres)
    y = _geometric_label(x)
    assert y[:4].tolist() == [RELATIONS.index(r) for r in ("left of", "right of", "above",
                                                           "below")]
    ax, ay = augment_batch(x, y, mode, RELATIONS, gen)
    assert torch.equal(ay, _geometric_label(ax))
    changed = (ax != x).flatten(1).any(1)
    assert 0 < changed.float().mean() < 1  # a random part of the batch, not all or none
    if mode == "mirror":  # no up-down flip: vertical relations change only by the swap
        vertical = y >= 2
        swapped = ~torch.isclose(ax[:, 0], x[:, 0]).flatten(1).all(1)
        assert torch.equal(ay[vertical] != y[vertical], swapped[vertical])
    assert torch.equal(augment_batch(x, y, "none", RELATIONS, gen)[0], x)


def test_broken_entries_are_dropped_said_and_recorded_in_the_card(tmp_path, monkeypatch):
    cache = make_cache(tmp_path / "cache", n_images=24)
    victim = cache.map_path(cache.manifest()[0]["key"])
    victim.write_bytes(bytes(victim.stat().st_size))  # zeroed, right size
    cache.manifest_path.unlink()  # and the index is gone: rebuilt from the entries
    r = CliRunner().invoke(_cli(monkeypatch), [
        "--model", "synthetic", "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
        "--d-model", "32", "--depth", "1", "--out", str(tmp_path / "clf"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "1 broken cache entries were deleted" in r.output
    card = json.loads((tmp_path / "clf" / "card.json").read_text())
    assert card["data"]["corrupt_dropped"] == 1
    assert sum(card["data"]["entries"]["shapes"][s][p] for s in card["data"]["entries"]["shapes"]
               for p in card["data"]["entries"]["shapes"][s]) == 47
    assert (tmp_path / "clf" / "config.yaml").exists()


def test_train_data_inverts_what_the_cache_lacks_first(tmp_path, monkeypatch):
    from l2s.inversion.job import InvertResult

    calls = []

    def fake_invert(cfg, den, callback=None):  # fills the cache as `l2s invert` would
        calls.append(cfg)
        make_cache(tmp_path / "cache", n_images=24, source=cfg.data[0], seed=1)
        return InvertResult(written=48)

    monkeypatch.setattr("l2s.inversion.job.invert", fake_invert)
    app = _cli(monkeypatch)
    base = ["--model", "synthetic", "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
            "--d-model", "32", "--depth", "1", "--device", "cpu", "--json"]
    make_cache(tmp_path / "cache", n_images=8, source="shapes")
    r = CliRunner().invoke(app, [*base, "--data", "gqa", "--invert", "never"])
    assert r.exit_code == 2 and "no cached maps of source(s) gqa" in r.output and not calls
    r = CliRunner().invoke(app, [*base, "--data", "gqa", "--gqa-root", "/data/gqa"])
    assert r.exit_code == 0, r.output
    assert [c.data for c in calls] == [("gqa",)] and calls[0].gqa_root == "/data/gqa"
    assert json.loads(r.stdout)["data"]["entries"].keys() == {"gqa"}
    # gqa is cached now: nothing to invert; an invert that was cut off is resumed
    assert CliRunner().invoke(app, [*base, "--data", "gqa"]).exit_code == 0 and len(calls) == 1
    AttentionCache(tmp_path / "cache", FP).begin_source("gqa")
    assert CliRunner().invoke(app, [*base, "--data", "gqa"]).exit_code == 0 and len(calls) == 2


@pytest.mark.slow
def test_train_data_shapes_inverts_then_trains_the_toy(tmp_path):
    """One command from an empty cache to a classifier (the design card's example)."""
    from l2s.cli import app

    r = CliRunner().invoke(app, ["--threads", "1", "train", "--data", "shapes", "--inversion",
                                 "noise", "--limit", "40", "--epochs", "2", "--cache-dir",
                                 str(tmp_path / "c"), "--out", str(tmp_path / "clf")])
    assert r.exit_code == 0, r.output
    assert "inverting what the cache lacks of shapes" in r.output and "wrote 80 entries" in r.output
    assert (tmp_path / "clf" / "card.json").exists()


def test_interrupted_training_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """Catches a resume that loses any part of the state (AdamW moments, the plateau
    scheduler, the batch-order / augmentation generator, dropout's global stream, the best
    weights) or repeats or skips an epoch: each changes the final weights."""
    from safetensors.torch import load_file

    from l2s.classifier.checkpoint import CHECKPOINT_NAME

    make_cache(tmp_path / "cache", n_images=32)
    cfg = _cfg(tmp_path, epochs=4, dropout=0.2, out=str(tmp_path / "whole"))
    whole = run_train(cfg, FakeBackbone())
    assert not (tmp_path / "whole" / CHECKPOINT_NAME).exists()  # removed once the card exists

    cut = replace(cfg, out=str(tmp_path / "cut"))

    def stop_after_two(ev):
        if ev["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(cut, FakeBackbone(), callback=stop_after_two)
    assert (tmp_path / "cut" / CHECKPOINT_NAME).is_file()
    assert not (tmp_path / "cut" / "card.json").exists()

    # Another setting, or other data, does not silently continue (nor discard) the run.
    with pytest.raises(TrainError, match=r"lr 0\.003 -> 0\.001.*--fresh"):
        run_train(replace(cut, lr=1e-3), FakeBackbone())
    events = []
    resumed = run_train(cut, FakeBackbone(), callback=events.append)
    assert [e.get("resumed", False) for e in events] == [True, True, False, False]
    assert [e["epoch"] for e in events] == [1, 2, 3, 4]
    assert resumed.history == whole.history
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics == whole.metrics


def test_fresh_discards_an_interrupted_run_and_a_broken_checkpoint_is_refused(tmp_path):
    from l2s.classifier.checkpoint import CHECKPOINT_NAME

    make_cache(tmp_path / "cache", n_images=24)
    cfg = _cfg(tmp_path, epochs=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / CHECKPOINT_NAME).write_bytes(b"\x00" * 64)  # cut mid-copy, say
    with pytest.raises(TrainError, match="cannot be read.*--fresh"):
        run_train(cfg, FakeBackbone())
    events = []
    res = run_train(cfg, FakeBackbone(), callback=events.append, fresh=True)
    assert [e["epoch"] for e in events] == [1, 2] and not any("resumed" in e for e in events)
    assert res.card["training"]["epochs_run"] == 2


@pytest.mark.parametrize("damage", ["weight bit", "header field", "header field, no sha256",
                                    "rng state, no sha256"])
def test_a_damaged_checkpoint_is_refused_not_resumed(tmp_path, damage):
    """Catches a flipped exponent bit in a weight resuming silently (final weights off by up to
    0.03: the checkpoint had no checksum), a missing header field (`KeyError: 'plateau'`) and
    a malformed random state (a RuntimeError traceback), also in checkpoints written before the
    checksum existed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from l2s.classifier.checkpoint import EpochState, load_epoch, save_epoch

    def fresh():
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt), torch.Generator()

    ident = {"settings": {"lr": 1e-2}, "data": "abc"}
    path = tmp_path / "ckpt.safetensors"
    save_epoch(path, ident, *fresh(), EpochState(epoch=1))
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["l2s_train"])
    if damage == "weight bit":
        w = tensors["model.weight"].clone()
        w.view(torch.int32)[0, 0] ^= 1 << 23  # the lowest exponent bit: x2 or /2
        tensors["model.weight"] = w
    elif damage.startswith("header field"):
        del header["plateau"]
    else:
        tensors["rng.torch"] = tensors["rng.torch"][:7]
    meta["l2s_train"] = json.dumps(header)
    if "no sha256" in damage:
        del meta["l2s_sha256"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(TrainError, match=r"checkpoint .* is damaged .*--fresh") as e:
        load_epoch(path, ident, *fresh())
    assert "\n" not in str(e.value)


def test_checkpoint_round_trip_restores_every_part_of_the_state(tmp_path):
    """save_epoch -> load_epoch into fresh objects gives back each piece exactly (a piece left
    out, e.g. the plateau's bad-epoch count or a reduced lr, fails its own comparison)."""
    from l2s.classifier.checkpoint import EpochState, load_epoch, save_epoch

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
        return model, opt, plateau, torch.Generator().manual_seed(0)

    model, opt, plateau, order = fresh()
    for loss in (1.0, 2.0, 3.0, 4.0):  # the lr halved once, one bad epoch pending
        model(torch.randn(2, 4, generator=order)).sum().backward()
        opt.step()
        plateau.step(loss)
    assert opt.param_groups[0]["lr"] == 5e-3 and plateau.num_bad_epochs == 1
    state = EpochState(epoch=4, history=[{"epoch": 4}], best_loss=1.0, best_epoch=1,
                       best_state={k: v + 1 for k, v in model.state_dict().items()}, seconds=3.5)
    ident = {"settings": {"lr": 1e-2}, "data": "abc"}
    path = tmp_path / "ckpt.safetensors"
    save_epoch(path, ident, model, opt, plateau, order, state)
    rng_now = torch.get_rng_state()
    torch.manual_seed(123)  # the global stream moves on; load must bring it back

    model2, opt2, plateau2, order2 = fresh()
    got = load_epoch(path, ident, model2, opt2, plateau2, order2)
    assert torch.equal(torch.get_rng_state(), rng_now)
    assert torch.equal(order2.get_state(), order.get_state())
    assert plateau2.state_dict() == plateau.state_dict()
    assert opt2.param_groups[0]["lr"] == 5e-3
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, got.best_state[k]) for k, v in state.best_state.items())
    assert (got.epoch, got.history, got.best_loss, got.best_epoch, got.seconds) == \
        (4, [{"epoch": 4}], 1.0, 1, 3.5)
    assert load_epoch(tmp_path / "none.safetensors", ident, *fresh()) is None


def _diagnosed(pred_of, n=60, timesteps=(901, 701, 501, 301)):
    """relation_metrics on n images x timesteps, each under its true and one wrong caption;
    ``pred_of(y, caption_relation, t)`` is what the classifier predicts."""
    from types import SimpleNamespace

    from l2s.classifier.train import relation_metrics

    rows = [(i % 4, neg, (i % 4 + 1 + i % 3) % 4 if neg else i % 4, t)
            for i in range(n) for neg in (False, True) for t in timesteps]
    y, neg, py, t = (torch.tensor(c) for c in zip(*rows, strict=True))
    data = SimpleNamespace(y=y, neg=neg, prompt_y=py, t=t)
    pred = torch.tensor([pred_of(a, b, c) for a, _, b, c in rows])
    return relation_metrics(pred, data, torch.arange(len(rows)))


def test_leakage_verdict_flags_a_word_reader_not_a_layout_reader():
    """A classifier that returns the caption's relation must be called leaky (share predicted as
    the caption's relation 1.0, wrong-caption accuracy 0), one that reads the layout must not."""
    word = _diagnosed(lambda y, caption, t: caption)
    assert word["leakage"]["leaky"]
    assert word["test_wrong_caption_predicts_caption"] == 1.0
    assert word["test_leakage_by_timestep"]["901"]["wrong_caption"] == 0.0
    layout = _diagnosed(lambda y, caption, t: y)
    assert not layout["leakage"]["leaky"] and layout["leakage"]["reasons"] == []
    assert layout["test_leakage_by_timestep"]["301"] == {
        "true_caption": 1.0, "wrong_caption": 1.0, "wrong_caption_predicts_caption": 0.0,
        "samples": {"true_caption": 60, "wrong_caption": 60}}
    assert list(layout["test_leakage_by_timestep"]) == ["901", "701", "501", "301"]


def test_leakage_verdict_catches_a_leak_at_one_noisy_timestep():
    """Leakage confined to the noisiest timestep is diluted under the threshold overall
    (0.5 / 4 = 0.125 < 0.15); the per-timestep check must still flag it."""
    m = _diagnosed(lambda y, caption, t: caption if t == 901 and caption % 2 else y)
    assert m["test_wrong_caption_predicts_caption"] < 0.15
    assert m["leakage"]["leaky"]
    flagged = {r.split(":")[0] for r in m["leakage"]["reasons"]}
    assert "t=901" in flagged and not flagged & {"t=701", "t=501", "t=301"}


def test_leakage_verdict_does_not_call_a_chance_level_timestep_leaky():
    """At a timestep where the classifier is wrong regardless of the caption, a third of
    wrong-caption samples land on the caption's relation by chance: that must not count as
    leakage, since each other wrong relation gets as many."""
    m = _diagnosed(lambda y, caption, t: (y + 1) % 4 if t == 901 else y)
    noisy = m["test_leakage_by_timestep"]["901"]
    assert noisy["wrong_caption_predicts_caption"] >= 0.15  # above the bare threshold
    assert not m["leakage"]["leaky"], m["leakage"]["reasons"]


def test_cli_warns_when_a_positive_only_classifier_reads_the_word(tmp_path, monkeypatch):
    """Maps that follow the caption at t=801: trained on true captions only, the classifier reads
    them and `l2s train` must warn (a silent leaky classifier steers nothing); the card records
    the verdict and the per-timestep diagnostic names t=801."""
    app = _cli(monkeypatch)
    make_cache(tmp_path / "cache", n_images=160, leak_at=(801,))
    args = ["--cache-dir", str(tmp_path / "cache"), "--model", "synthetic", "--epochs", "6",
            "--lr", "3e-3", "--batch-size", "32", "--d-model", "32", "--depth", "1",
            "--device", "cpu", "--positive-only", "--out", str(tmp_path / "po")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "relation leakage" in r.output and "leakage per timestep" in r.output
    m = json.loads((tmp_path / "po" / "card.json").read_text())["metrics"]
    assert m["leakage"]["leaky"]
    assert m["test_leakage_by_timestep"]["801"]["wrong_caption_predicts_caption"] > 0.5
    assert m["test_leakage_by_timestep"]["401"]["wrong_caption_predicts_caption"] < 0.15


def test_a_finished_train_is_not_silently_redone_unless_fresh(tmp_path, monkeypatch):
    """Catches a rerun of a finished `l2s train` (same settings, same data) retraining and
    overwriting the classifier: it says so in one line and trains nothing; --fresh retrains;
    other settings or more data are refused naming --fresh (they overwrote it silently)."""
    app = _cli(monkeypatch)
    make_cache(tmp_path / "cache", n_images=24)
    args = ["--cache-dir", str(tmp_path / "cache"), "--model", "synthetic", "--epochs", "2",
            "--d-model", "32", "--depth", "1", "--out", str(tmp_path / "clf"), "--device", "cpu"]
    assert CliRunner().invoke(app, args).exit_code == 0
    card = tmp_path / "clf" / "card.json"
    # a mark that only a retrain removes
    card.write_text(json.dumps({**json.loads(card.read_text()), "mark": 1}))
    first = card.read_bytes()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert " ".join(r.output.split()).count("already holds the classifier trained with these "
                                            "settings and data") == 1
    assert "--fresh retrains it" in " ".join(r.output.split())
    assert len(r.output.strip().splitlines()) <= 2 and "epoch" not in r.output
    assert card.read_bytes() == first  # not rewritten
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["already_trained"] is True
    # --fresh retrains (a new card)
    r = CliRunner().invoke(app, [*args, "--fresh"])
    assert r.exit_code == 0 and "already holds" not in r.output and "classifier card:" in r.output
    assert "mark" not in json.loads(card.read_text())
    # other settings: refused in one line naming --fresh (was: retrained and overwrote the
    # classifier silently), the card untouched; --fresh replaces it
    before = card.read_bytes()
    r = CliRunner().invoke(app, [*args, "--epochs", "1"])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "already holds a classifier of another run (epochs 2 -> 1)" \
        in out and "--fresh to replace it" in out and "Traceback" not in out
    assert card.read_bytes() == before
    r = CliRunner().invoke(app, [*args, "--epochs", "1", "--fresh"])
    assert r.exit_code == 0 and json.loads(card.read_text())["training"]["epochs"] == 1
    assert "already holds" in CliRunner().invoke(app, [*args, "--epochs", "1"]).output
    # more data in the cache since: another run too, refused the same way
    make_cache(tmp_path / "cache", n_images=8, source="shapes", seed=1)
    r = CliRunner().invoke(app, [*args, "--epochs", "1"])
    assert r.exit_code == 2 and "the cached data" in r.output and "--fresh" in r.output


def test_finished_check_leaves_an_interrupted_run_to_resume(tmp_path):
    """Catches the finished-run check taking over a folder with a saved half-finished run
    (a card from an earlier finished run of the same settings beside it): it resumes."""
    from l2s.classifier.checkpoint import CHECKPOINT_NAME

    make_cache(tmp_path / "cache", n_images=24)
    cfg = _cfg(tmp_path, epochs=3)
    run_train(cfg, FakeBackbone())

    def stop(ev):
        if ev["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, FakeBackbone(), callback=stop, fresh=True)
    assert (tmp_path / "out" / CHECKPOINT_NAME).is_file()
    events = []
    res = run_train(cfg, FakeBackbone(), callback=events.append)
    assert not res.already_trained
    assert [e.get("resumed", False) for e in events] == [True, True, False]
    assert not (tmp_path / "out" / CHECKPOINT_NAME).exists()
    assert run_train(cfg, FakeBackbone()).already_trained
