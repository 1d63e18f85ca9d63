"""The invert job on tiny offline components: dual prompts, resume, corruption, shards."""

import multiprocessing as mp
import random
from collections import Counter
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from l2s.cli import app
from l2s.engine import loading
from l2s.families.tiny import tiny_sd
from l2s.inversion.cache import AttentionCache
from l2s.inversion.job import InvertConfig, run_invert, sample_prompts
from l2s.inversion.loop import InversionConfig
from l2s.relations import RELATIONS, Triplet

FAST = InversionConfig(method="noise", steps=10, record_steps=(2, 5, 9))


def _cfg(tmp_path, **kw):
    base = {"data": ("shapes",), "cache_dir": str(tmp_path), "limit": 6, "batch_size": 4,
            "per_relation": (2, 1, 1), "inversion": FAST}
    return InvertConfig(**{**base, **kw})


def test_negatives_are_uniform_over_the_other_relations():
    rng = random.Random(0)
    t = Triplet("circle", "above", "square")
    counts = Counter()
    for _ in range(3000):
        (pos, rel, pol), (neg, nrel, npol) = sample_prompts(t, 1, rng)
        assert (rel, pol, npol) == ("above", "pos", "neg") and nrel != "above"
        counts[nrel] += 1
    assert set(counts) == set(RELATIONS) - {"above"}
    assert all(900 < c < 1100 for c in counts.values())
    three = sample_prompts(t, 3, rng)
    assert sorted(r for _, r, _ in three[1:]) == sorted(set(RELATIONS) - {"above"})


def test_entries_are_dual_and_labelled_with_the_true_relation(tmp_path, den):
    res = run_invert(_cfg(tmp_path, negatives=2), den)
    assert res.written == 6 * 3 and res.skipped == 0
    entries = list(AttentionCache(tmp_path, den.fingerprint).entries())
    c = sum(la.heads for la in den.cross_attention_layers())
    by_image = {}
    for e in entries:
        assert e.maps.shape == (3, 2, c, 16, 16)
        assert e.meta["relation"] in RELATIONS
        assert (e.meta["polarity"] == "pos") == (e.meta["prompt_relation"] == e.meta["relation"])
        by_image.setdefault(e.meta["image_hash"], []).append(e.meta)
    for metas in by_image.values():
        assert len({m["relation"] for m in metas}) == 1  # every prompt: the image's label
        assert sorted(m["polarity"] for m in metas) == ["neg", "neg", "pos"]
    assert res.stats["by_polarity"] == {"pos": 6, "neg": 12}


def test_rerun_skips_and_an_interrupted_run_resumes(tmp_path, den, monkeypatch):
    cfg = _cfg(tmp_path)
    real_put = AttentionCache.put
    written = []

    def flaky_put(self, key, maps, meta):
        if len(written) == 5:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-run
        written.append(key)
        real_put(self, key, maps, meta)

    monkeypatch.setattr(AttentionCache, "put", flaky_put)
    with pytest.raises(KeyboardInterrupt):
        run_invert(cfg, den)
    monkeypatch.setattr(AttentionCache, "put", real_put)
    res = run_invert(cfg, den)
    assert (res.skipped, res.written) == (5, 7)
    again = run_invert(cfg, den)
    assert (again.skipped, again.written, again.inverted) == (12, 0, 0)


def test_corrupt_entry_is_rebuilt(tmp_path, den):
    cfg = _cfg(tmp_path, limit=2)
    run_invert(cfg, den)
    cache = AttentionCache(tmp_path, den.fingerprint)
    row = cache.manifest()[0]
    cache.map_path(row["key"]).write_bytes(b"not a safetensors file")
    # `has` sees a file; loading it finds the damage, deletes it, and the job rebuilds it.
    assert cache.get(row["key"]) is None
    res = run_invert(cfg, den)
    assert res.written == 1 and cache.get(row["key"]) is not None


def test_ddim_inversion_drops_badly_reconstructed_images(tmp_path, den):
    inv = InversionConfig(method="ddim", steps=6, fixed_point=1, record_steps=(1, 5),
                          min_psnr=1000.0)
    res = run_invert(_cfg(tmp_path, limit=2, inversion=inv), den)
    assert res.written == 0 and res.dropped["low reconstruction PSNR"] == 4
    keep = InversionConfig(method="ddim", steps=6, fixed_point=1, record_steps=(1, 5),
                           min_psnr=-1000.0)
    res = run_invert(_cfg(tmp_path, limit=2, inversion=keep), den)
    assert res.written == 4 and res.inverted == 0  # latents were cached by the first run
    psnrs = {r["psnr"] for r in AttentionCache(tmp_path, den.fingerprint).manifest()}
    assert all(isinstance(p, float) for p in psnrs)


def _shard_worker(root, index):
    run_invert(_cfg_for(root, shard=(index, 2)), tiny_sd())


def _cfg_for(root, **kw):
    return InvertConfig(data=("shapes",), cache_dir=root, limit=8, batch_size=3,
                        per_relation=(2, 1, 1), inversion=FAST, **kw)


def test_two_processes_share_the_work_and_the_cache(tmp_path, den):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_shard_worker, args=(str(tmp_path), i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    rows = AttentionCache(tmp_path, den.fingerprint).manifest()
    assert len(rows) == 16 and len({r["source_id"] for r in rows}) == 8
    single = run_invert(_cfg_for(str(tmp_path)), den)  # the unsharded run finds all done
    assert (single.written, single.skipped) == (0, 16)


def test_cli_invert_and_stats(tmp_path, den, monkeypatch):
    monkeypatch.setattr(loading, "load_backbone", lambda *a, **k: den)
    runner = CliRunner()
    args = ["invert", "--data", "shapes", "--cache-dir", str(tmp_path), "--limit", "2",
            "--per-relation", "2,1,1", "--inversion", "noise", "--steps", "10",
            "--timesteps", "2,9", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["invert", "--stats", "--cache-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0 and '"entries": 4' in r.stdout
    r = runner.invoke(app, args[:-1] + ["--timesteps", "2,99"])
    assert r.exit_code == 2 and "0..9" in r.output
    (tmp_path / "gqa").mkdir()
    r = runner.invoke(app, ["invert", "--data", "gqa", "--gqa-root", str(tmp_path / "gqa"),
                            "--cache-dir", str(tmp_path), *args[7:-1]])  # same timesteps
    assert r.exit_code == 2 and "sceneGraphs.json" in r.output and "Traceback" not in r.output


def test_progress_events_carry_the_expected_total(tmp_path, den):
    from l2s.inversion.sources import SourceOptions, expected_samples

    events = []
    run_invert(_cfg(tmp_path), den, callback=events.append)
    final = events[-1]
    assert final["final"] and final["expected"] == final["done"]  # shapes yields exactly that
    assert all(ev["expected"] == final["expected"] for ev in events)
    opts = SourceOptions(per_relation=(3, 1, 1))
    assert expected_samples("shapes", opts) == 20
    assert expected_samples("shapes", opts, limit=7) == 7
    assert expected_samples("folder", SourceOptions()) is None  # unknown until read
    assert expected_samples("folder", SourceOptions(), limit=5) == 5


def test_a_cache_folder_keeps_one_image_size_and_text_length(tmp_path):
    # Catches: (text length) a run over other text keys finding the same keys and skipping
    # every entry as cached, though its maps would differ; (image size) a run at another size
    # writing new entries beside the old ones, which `l2s train` then mixes in one classifier.
    from l2s.families.flux import FluxDenoiser
    from l2s.families.mmdit_tiny import TINY_T5_TOKENS, tiny_flux_pipeline
    from l2s.inversion.cache import CacheError

    p = tiny_flux_pipeline()

    def flux(size):
        return FluxDenoiser(p.transformer, p.vae, p.text_encoder, p.tokenizer,
                            p.text_encoder_2, p.tokenizer_2, dict(p.scheduler.config),
                            name="tiny-flux", image_size=size, max_sequence_length=TINY_T5_TOKENS)

    cfg = _cfg(tmp_path, limit=1, per_relation=(1, 1, 1))
    assert run_invert(cfg, flux(32)).written == 2
    shorter = flux(32)
    shorter.set_text_len(TINY_T5_TOKENS - 4)
    with pytest.raises(CacheError, match="text_len 32 .* 28 .*--cache-dir"):
        run_invert(cfg, shorter)
    with pytest.raises(CacheError, match=r"image_size \[32, 32\] .* \[48, 48\]"):
        run_invert(cfg, flux(48))
    assert run_invert(cfg, flux(32)).skipped == 2  # the same geometry still resumes
    other = run_invert(_cfg(tmp_path / "other", limit=1, per_relation=(1, 1, 1)), flux(48))
    assert other.written == 2  # another cache folder takes the other size


def test_a_run_whose_every_image_failed_the_psnr_check_says_what_to_change():
    # Was: only "entries not written: low reconstruction PSNR: 16", then `l2s train` said
    # "run l2s invert first" (a random or weak backbone cannot reconstruct its images).
    from collections import Counter

    from l2s.cli.invert import summary_lines
    from l2s.inversion.job import InvertResult

    hint = "every image reconstructed below --min-psnr"
    lines = summary_lines(InvertResult(dropped=Counter({"low reconstruction PSNR": 16})))
    assert any(hint in line and "--inversion noise" in line for line in lines)
    some = summary_lines(InvertResult(written=2, dropped=Counter({"low reconstruction PSNR": 3})))
    assert not any(hint in line for line in some)


def test_a_limit_past_sys_maxsize_draws_every_sample(tmp_path, den):
    """Catches `--limit 99999999999999999999`: a ValueError traceback from islice."""
    cfg = _cfg(tmp_path, limit=10**20, per_relation=(1, 0, 0))
    assert run_invert(cfg, den).written == run_invert(_cfg(tmp_path / "b", limit=None,
                                                           per_relation=(1, 0, 0)), den).written


def test_a_cache_folder_keeps_one_set_of_recorded_timesteps(tmp_path, den):
    # Was: a run with other --timesteps (or --steps) added entries of another shape beside the
    # cached ones, and `l2s train` then refused the folder ("cache entries ... disagree").
    from l2s.inversion.cache import CacheError

    cfg = _cfg(tmp_path, limit=1, per_relation=(1, 1, 1))
    assert run_invert(cfg, den).written == 2
    other = replace(FAST, record_steps=(1, 4, 8))
    with pytest.raises(CacheError, match=r"timesteps \[.*\] \(cached\) vs .*config\.yaml"):
        run_invert(replace(cfg, inversion=other), den)
    assert run_invert(cfg, den).skipped == 2  # the same settings still resume


def test_fixed_point_default_is_the_models_and_plain_euler_reconstructs_toy_mmdit_better(
        tmp_path, one_thread):
    """Bug: every model inverted with 2 fixed-point refinements by default, which diverge on
    toy-mmdit (its scenes reconstructed at 15-70 dB against 75-120 dB with plain Euler); the
    default is now the preset's (InvertDefaults), 0 on toy-mmdit, and a run writes it."""
    import numpy as np
    import torch
    import yaml

    from l2s.engine.loading import load_backbone
    from l2s.inversion.loop import ddim_invert, psnr, reconstruct
    from l2s.toy.scenes import caption, random_scene

    assert InversionConfig().resolve("toy-mmdit").fixed_point == 0
    assert InversionConfig().resolve("toy").fixed_point == 2
    assert InversionConfig(fixed_point=3).resolve("toy-mmdit").fixed_point == 3  # given wins
    den = load_backbone("toy-mmdit", device="cpu")
    scenes = [random_scene(np.random.default_rng(s), n_objects=2) for s in (0, 2)]
    x = torch.stack([torch.from_numpy(s.image).float() / 255 for s in scenes])
    cond = den.encode_prompt([caption(s, np.random.default_rng(0), 1.0) for s in scenes])
    x0 = den.encode_image(x)

    def quality(fixed_point):
        traj = ddim_invert(den, x0, cond, 20, fixed_point)
        return psnr(den.decode(reconstruct(den, traj[0], cond, 20)).cpu(), x)

    default = InversionConfig().resolve("toy-mmdit").fixed_point
    assert (quality(default) > quality(2) + 10).all()  # dB
    inv = InversionConfig(method="noise", steps=4, record_steps=(1,))
    run_invert(InvertConfig(data=("shapes",), model="toy-mmdit", cache_dir=str(tmp_path),
                            limit=1, per_relation=(1, 0, 0), inversion=inv), den)
    written = yaml.safe_load(next(tmp_path.glob("*/config.yaml")).read_text())
    assert written["fixed_point"] == 0
