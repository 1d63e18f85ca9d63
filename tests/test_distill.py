"""`l2s distill` and the LoRA path: diffusers-format folders, merging, the +lora bench methods,
resumable training, held-out pairs, one-line errors."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from l2s.distill.lora import (
    LoRAError,
    LoRASpec,
    attach,
    resolve_lora,
    save_lora,
    shipped_lora,
    with_lora,
)


def _random_lora(net, seed=0, spec=LoRASpec(rank=4, alpha=4.0)):
    """Attach a LoRA whose B is non-zero (a fresh one is the identity)."""
    params = attach(net, spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return params, spec


def _unet_out(unet, den, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *den.latent_shape), generator=g)
    cond = den.encode_prompt(["a dog left of a cat", "a cup above a bowl"])
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=cond["states"]).sample


def test_lora_round_trip_merges_what_was_trained(den, tmp_path):
    """The saved folder, merged into a copy of the network, computes what the network with the
    attached LoRA computed (a wrong scale, a dropped module or a transposed A/B fails), and the
    original denoiser is left as it was."""
    net = copy.deepcopy(den.unet)
    _, spec = _random_lora(net)
    adapted_out = _unet_out(net, den)
    base_out = _unet_out(den.unet, den)
    save_lora(tmp_path, net, spec, {"base_fingerprint": den.fingerprint})
    merged = with_lora(den, tmp_path)
    assert torch.allclose(_unet_out(merged.unet, den), adapted_out, atol=1e-5)
    assert not torch.allclose(adapted_out, base_out, atol=1e-3)  # the LoRA does something
    assert torch.equal(_unet_out(den.unet, den), base_out)  # the base is untouched
    # merged: plain modules, no LoRA layer left to cost time at every step
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_lora_files_respect_the_umask_and_leave_no_temp_behind(den, tmp_path, umask):
    """Catches the LoRA weights written owner-only (0600, diffusers' own writer) whatever the
    umask: a LoRA folder shared with another user could not be read. Nothing else is left."""
    import os

    net = copy.deepcopy(den.unet)
    _, spec = _random_lora(net)
    old = os.umask(umask)
    try:
        save_lora(tmp_path, net, spec, {"base_fingerprint": den.fingerprint})
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == {"pytorch_lora_weights.safetensors": oct(0o666 & ~umask),
                     "card.json": oct(0o666 & ~umask)}


def test_diffusers_load_lora_weights_reads_the_folder_and_changes_the_output(tmp_path):
    """A stock diffusers pipeline (tiny SD built from configs) loads the folder with
    load_lora_weights and generates something else than without it."""
    from diffusers import StableDiffusionPipeline

    from l2s.families.tiny import tiny_sd, tiny_sd_components

    unet, vae, text_encoder, tokenizer, scheduler = tiny_sd_components()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    den = tiny_sd()
    net = copy.deepcopy(den.unet)
    _, spec = _random_lora(net)
    save_lora(tmp_path / "lora", net, spec, {"base_fingerprint": den.fingerprint})

    def run():
        return pipe("a dog left of a cat", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = run()
    pipe.load_lora_weights(tmp_path / "lora")
    after = run()
    assert not torch.allclose(torch.as_tensor(before), torch.as_tensor(after), atol=1e-4)
    pipe.unload_lora_weights()
    assert torch.allclose(torch.as_tensor(run()), torch.as_tensor(before), atol=1e-5)


def test_lora_of_another_base_model_is_refused(den, tmp_path):
    """A card naming another base model's fingerprint is refused in one line, not merged into
    a network it was not trained on."""
    net = copy.deepcopy(den.unet)
    _, spec = _random_lora(net)
    save_lora(tmp_path, net, spec, {"base_fingerprint": "0" * 64})
    with pytest.raises(LoRAError, match="another base model"):
        with_lora(den, tmp_path)


def test_resolve_lora_names_the_fix(tmp_path):
    """A missing folder, a folder without the weights file, and a model without a shipped LoRA
    are one-line errors naming what to give."""
    with pytest.raises(LoRAError, match="does not exist"):
        resolve_lora(str(tmp_path / "nope"), "toy")
    with pytest.raises(LoRAError, match="pytorch_lora_weights.safetensors"):
        resolve_lora(str(tmp_path), "toy")
    with pytest.raises(LoRAError, match="no LoRA ships"):
        resolve_lora(None, "sd2.1-base")


def test_bad_lora_path_is_a_one_line_cli_error(tmp_path):
    from l2s.cli import app

    r = CliRunner().invoke(app, ["steer", "a circle to the left of a square", "--lora",
                                 str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and "--lora" in r.output
    assert "Traceback" not in r.output


def test_distill_prompts_never_use_held_out_objects():
    """Every distillation prompt avoids the held-out objects (else held-out numbers measure
    nothing), and prompt i depends only on (seed, i) (resumed chunks are the same)."""
    from l2s.distill.data import distill_prompts

    names = ("circle", "square", "triangle", "diamond", "cross", "ring")
    ps = distill_prompts(names, ("ring",), 400, seed=3)
    assert all("ring" not in (p.triplet.subject, p.triplet.object) for p in ps)
    assert {p.triplet.subject for p in ps} == set(names[:-1])
    assert distill_prompts(names, ("ring",), 5, seed=3, start=100) == ps[100:105]


def test_distill_config_checks_and_round_trips(tmp_path):
    from l2s.config import dump_yaml
    from l2s.distill.job import DistillConfig

    cfg = DistillConfig(hold_out="ring", targets="to_q, to_k", steps=5, out=str(tmp_path))
    assert cfg.hold_out == ("ring",) and cfg.targets == ("to_q", "to_k")
    dump_yaml(cfg.options(), tmp_path / "config.yaml")
    assert DistillConfig.from_yaml(tmp_path / "config.yaml") == cfg
    assert DistillConfig(recipe="reward", keep=0.5).recipe == "reward"
    for bad in ({"rank": 0}, {"lr": -1.0}, {"recipe": "nope"}, {"drop_text": 1.0},
                {"noisy_fraction": 0.0}, {"keep": -1.0}):
        with pytest.raises(Exception, match="--"):
            DistillConfig(**bad)
    with pytest.raises(LoRAError, match="unknown distill option"):
        DistillConfig.from_options({"stepz": 3})


@pytest.fixture(scope="module")
def toy():
    from l2s.engine.loading import load_backbone

    return load_backbone("toy", device="cpu")


def test_distill_resumes_to_the_lora_of_an_uninterrupted_run(toy, tmp_path, one_thread):
    """Training cut after its first checkpoint and rerun with the same settings ends with the
    same LoRA, bit for bit, as a run never cut (a batch drawn from the process's random state,
    or moments not restored, would differ); the data chunks are generated once."""
    from safetensors.torch import load_file

    from l2s.distill.job import DistillConfig, distill

    base = dict(images=4, chunk=2, batch_size=2, checkpoint_every=2, eval_prompts=0,
                preserve=1)
    whole = distill(DistillConfig(out=str(tmp_path / "a"), steps=4, **base), toy)
    cut = DistillConfig(out=str(tmp_path / "b"), steps=2, **base)
    distill(cut, toy)
    stamp = (tmp_path / "b" / "data" / "chunk-00000.safetensors").stat().st_mtime_ns
    events = []
    distill(DistillConfig(out=str(tmp_path / "b"), steps=4, **base), toy, callback=events.append)
    assert any(e.get("resumed") and e["step"] == 2 for e in events)
    assert (tmp_path / "b" / "data" / "chunk-00000.safetensors").stat().st_mtime_ns == stamp
    a = load_file(str(whole.out / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((whole.out / "card.json").read_text())
    assert card["base_fingerprint"] == toy.fingerprint
    assert card["data"]["held_out_objects"] == ["ring"]
    # other settings in the same folder: refused, not silently mixed
    with pytest.raises(LoRAError, match="other settings"):
        distill(DistillConfig(out=str(tmp_path / "b"), steps=6, **{**base, "lr": 0.5}), toy)


def _reward_setup(toy, lr_scale=1.0):
    from l2s.distill.lora import network_attribute
    from l2s.steering.job import build_loss
    from l2s.steering.options import SteerOptions

    settings = SteerOptions(steps=6).resolve("toy")
    loss, _ = build_loss("l2s", toy, "toy", None)
    net = copy.deepcopy(toy.unet)
    trained = copy.copy(toy)
    setattr(trained, network_attribute(toy), net)
    return settings, loss, net, trained


def test_reward_lowers_the_classifier_loss_it_is_trained_on(toy, one_thread):
    """A few reward steps on one fixed batch lower the classifier's loss on the latents the
    LoRA's own sampling steps reach (a gradient of the wrong sign, or one that never reaches
    the LoRA through the sampling steps, leaves it where it was)."""
    from l2s.distill.data import distill_prompts
    from l2s.distill.reward import reward_step
    from l2s.engine.sampling import seeded_latents

    settings, loss, net, trained = _reward_setup(toy)
    params = attach(net, LoRASpec(rank=4, alpha=4.0), seed=0)
    ps = distill_prompts(tuple(toy.known_objects), ("ring",), 2, seed=0)
    texts, trips = [p.prompt for p in ps], [[p.triplet] for p in ps]
    noise = seeded_latents(toy, [1, 2])
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses = []
    with torch.enable_grad():
        for _ in range(8):
            value = reward_step(toy, trained, loss, settings, texts, trips, noise)[0]
            opt.zero_grad()
            value.backward()
            opt.step()
            losses.append(value.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_reward_keep_term_measures_the_lora(toy, one_thread):
    """The keep-close term is zero for a LoRA that changes nothing (a fresh one) and positive
    for one that changes the network's outputs (a term read off the wrong network is zero)."""
    from l2s.distill.data import distill_prompts
    from l2s.distill.reward import reward_step
    from l2s.engine.sampling import seeded_latents

    settings, loss, net, trained = _reward_setup(toy)
    attach(net, LoRASpec(rank=4, alpha=4.0), seed=0)
    ps = distill_prompts(tuple(toy.known_objects), ("ring",), 2, seed=0)
    texts, trips = [p.prompt for p in ps], [[p.triplet] for p in ps]
    noise = seeded_latents(toy, [1, 2])
    grid = toy.timesteps(settings.steps)
    keep_t, keep_noise = [grid[-1], grid[2]], seeded_latents(toy, [3, 4])
    with torch.no_grad():
        fresh = reward_step(toy, trained, loss, settings, texts, trips, noise, keep_t,
                            keep_noise)[1].item()
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.full_like(p, 0.05))
        changed = reward_step(toy, trained, loss, settings, texts, trips, noise, keep_t,
                              keep_noise)[1].item()
    assert fresh == 0.0 and changed > 1e-6, (fresh, changed)


def test_reward_recipe_resumes_to_the_lora_of_an_uninterrupted_run(toy, tmp_path, one_thread):
    """Recipe reward cut after its first checkpoint and rerun ends with the LoRA of a run
    never cut (prompts and noise drawn from the process's random state would differ); its card
    says which steps the reward read."""
    from safetensors.torch import load_file

    from l2s.distill.job import DistillConfig, distill

    base = dict(recipe="reward", batch_size=2, checkpoint_every=1, eval_prompts=0, keep=1.0)
    whole = distill(DistillConfig(out=str(tmp_path / "a"), steps=2, **base), toy)
    distill(DistillConfig(out=str(tmp_path / "b"), steps=1, **base), toy)
    distill(DistillConfig(out=str(tmp_path / "b"), steps=2, **base), toy)
    a = load_file(str(whole.out / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)
    card = json.loads((whole.out / "card.json").read_text())
    assert card["recipe"]["name"] == "reward"
    assert card["training"]["read_steps"] == [1, 2, 3, 4, 5]
    assert card["data"]["held_out_objects"] == ["ring"]


def test_bench_json_has_the_lora_methods(toy, tmp_path, one_thread):
    """plain+lora and l2s+lora are bench methods with seconds and the ratio to plain; the
    LoRA changes plain+lora's images while plain keeps the base model's."""
    from l2s.bench import BenchConfig, run_bench
    from l2s.bench.store import image_path
    from l2s.steering.options import SteerOptions

    net = copy.deepcopy(toy.unet)
    _, spec = _random_lora(net, spec=LoRASpec(rank=4, alpha=1.0))
    save_lora(tmp_path / "lora", net, spec, {"base_fingerprint": toy.fingerprint})
    cfg = BenchConfig(suite="shapes", methods=("plain", "plain+lora", "l2s+lora"), prompts=2,
                      lora=str(tmp_path / "lora"), out=str(tmp_path / "bench"),
                      options=SteerOptions(steps=4))
    res = run_bench(cfg, denoiser=toy).to_json()
    for m in ("plain+lora", "l2s+lora"):
        assert {"position_accuracy", "both_present", "fused", "seconds",
                "seconds_vs_plain"} <= set(res["methods"][m])
    from PIL import Image

    def pixels(method):
        return torch.as_tensor(np.array(Image.open(image_path(tmp_path / "bench", method, 0,
                                                               0))))

    assert not torch.equal(pixels("plain"), pixels("plain+lora"))


@pytest.mark.slow
@pytest.mark.skipif(shipped_lora("toy") is None, reason="no shipped toy LoRA")
@pytest.mark.xfail(strict=True, reason="the shipped toy LoRA (2000 steps on 3000 images, what a "
                   "CPU allowed) beats plain by less than 0.2: docs/results.md, Distillation")
def test_shipped_toy_lora_beats_plain_on_held_in_and_held_out_pairs(toy, one_thread):
    """The shipped toy LoRA raises the judge's position accuracy over plain generation on a
    small fixed set (seeds the distillation never used), held-out pairs included."""
    from l2s.distill.job import evaluate
    from l2s.steering.options import SteerOptions

    settings = SteerOptions().resolve("toy")
    res = evaluate(toy, with_lora(toy, resolve_lora("toy", "toy")), settings,
                   toy.known_objects, ("ring",), 24, seed=123)
    for split in ("distilled_pairs", "held_out_pairs"):
        assert res[split]["plain+lora"] >= res[split]["plain"] + 0.2, res


def test_two_distillations_on_one_out_are_refused_naming_the_other(toy, tmp_path, one_thread):
    """Catches two `l2s distill` on one --out both generating the data chunks and writing one
    checkpoint in turn: the second is refused naming the live one, nothing is written."""
    import socket
    import subprocess
    import sys

    from l2s import locks
    from l2s.distill.job import LOCK_NAME, DistillConfig, distill

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(
            f"{socket.gethostname()} {holder.pid} {locks.process_start(holder.pid)}\n")
        with pytest.raises(locks.LockError, match=rf"in use by another l2s distill \(pid "
                                                  rf"{holder.pid}"):
            distill(DistillConfig(out=str(out), steps=1, images=2, chunk=2, batch_size=2,
                                  eval_prompts=0), toy)
        assert not (out / "data").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_lora_run_prints_no_transformers_warnings(tmp_path):
    """Catches the diffusers pipeline import behind LoRA loading letting transformers warn
    about torchvision image processors l2s never uses (two stray stderr lines per run)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "l2s", "--threads", "1", "steer",
                        "a circle to the left of a square", "--lora", "toy", "--method",
                        "plain", "--out", str(tmp_path / "o"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[transformers]" not in r.stderr and "torchvision" not in r.stderr, r.stderr


def _reward_run(out, steps, **kw):
    from l2s.distill.job import DistillConfig

    return DistillConfig(out=str(out), recipe="reward", batch_size=2, checkpoint_every=1,
                         eval_prompts=0, steps=steps, **kw)


def test_distill_config_yaml_holds_the_held_out_objects_it_used(toy, tmp_path, one_thread):
    """Catches `l2s distill`'s config.yaml writing hold_out: null ("the model's last
    object") where the run held out the ring: --config of it repeated the run only while that
    default stayed. `--config` of the file resumes the folder's training."""
    import yaml

    from l2s.distill.job import DistillConfig, distill

    distill(_reward_run(tmp_path, 1), toy)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["hold_out"] == "ring"
    again = replace(DistillConfig.from_yaml(tmp_path / "config.yaml"), steps=2)
    assert again.hold_out == ("ring",)
    events = []
    distill(again, toy, callback=events.append)
    assert any(e.get("resumed") and e["step"] == 1 for e in events)


def test_a_distill_folder_written_with_null_hold_out_still_resumes(toy, tmp_path, monkeypatch,
                                                                   one_thread):
    """Catches a training checkpoint an older l2s wrote (its identity holding hold_out null,
    "the model's default") refused as "other settings" once the held-out objects are written
    as used: by its own command and by `--config` of the config.yaml now written. Another
    hold-out is still refused."""
    from l2s.distill import job
    from l2s.distill.job import DistillConfig, distill

    with monkeypatch.context() as m:  # what distill's checkpoints held before
        m.setattr(job, "_training_identity", lambda path, ident, default: {
            **ident, "hold_out": None})
        distill(_reward_run(tmp_path, 1), toy)
    events = []
    distill(_reward_run(tmp_path, 2), toy, callback=events.append)  # the same command
    assert any(e.get("resumed") and e["step"] == 1 for e in events)
    events.clear()
    again = replace(DistillConfig.from_yaml(tmp_path / "config.yaml"), steps=3)
    assert again.hold_out == ("ring",)
    distill(again, toy, callback=events.append)
    assert any(e.get("resumed") and e["step"] == 2 for e in events)
    with pytest.raises(LoRAError, match="other settings"):
        distill(_reward_run(tmp_path, 4, hold_out="square"), toy)


def test_data_chunks_of_another_hold_out_or_classifier_are_regenerated(toy, tmp_path,
                                                                         one_thread):
    """Catches a rerun with another --hold-out (or seed, or classifier) training on the
    chunks an earlier run left in the folder: their prompts hold the objects now held out.
    A chunk of this very run is kept as it is."""
    from l2s.distill.data import chunk_path, generate_chunks
    from l2s.steering.job import build_loss
    from l2s.steering.options import SteerOptions

    settings = SteerOptions(steps=4).resolve("toy")
    loss, _ = build_loss("l2s", toy, "toy", None)
    folder = tmp_path / "data"
    objects = tuple(toy.known_objects)

    def run(hold, made_by):
        generate_chunks(toy, loss, settings, folder, objects=objects, hold_out=hold,
                        images=4, chunk=4, seed=0, made_by=made_by)
        path = chunk_path(folder, 0)
        return json.loads(path.with_suffix(".json").read_text())["prompts"], \
            path.stat().st_mtime_ns

    first, stamp = run(("ring",), {"classifier_sha256": "a"})
    assert not any("ring" in p for p in first)
    again, stamp2 = run(("ring",), {"classifier_sha256": "a"})
    assert (again, stamp2) == (first, stamp)  # this run's chunk: kept
    held = objects[0]
    other, stamp3 = run((held,), {"classifier_sha256": "a"})
    assert not any(held in p.split() for p in other), other
    _, stamp4 = run((held,), {"classifier_sha256": "b"})
    assert stamp4 != stamp3  # another classifier: made again


def test_distill_off_a_terminal_tells_its_progress_on_stderr(toy, tmp_path, monkeypatch,
                                                             one_thread):
    """Catches `l2s distill` silent in a log (and with --json) until it ends: its data and
    training phases print one-line statuses (done/total, rate, ETA) like every long command."""
    from l2s.cli import app, output
    from l2s.engine import loading

    monkeypatch.setattr(loading, "load_backbone", lambda *a, **k: toy)
    monkeypatch.setattr(output, "PROGRESS_EVERY", 0.0)
    r = CliRunner().invoke(app, ["distill", "--out", str(tmp_path / "d"), "--images", "2",
                                 "--chunk", "2", "--steps", "2", "--batch-size", "2",
                                 "--preserve", "1", "--eval-prompts", "0", "--json"])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert any(x.startswith("steered images: 2/2 (100%)") and "accepted" in x for x in lines)
    assert any(x.startswith("training: 2/2 (100%)") and "loss" in x for x in lines), lines
    json.loads(r.stdout)


def test_recipe_self_trains_plain_images_of_every_object_held_out_ones_too(toy, tmp_path,
                                                                          monkeypatch,
                                                                          one_thread):
    """Catches the prior left out of training (a toy LoRA trained on ring-free prompts alone
    drew the ring in 0.30 of held-out prompts) or made of pairs (held-out pairs would be seen):
    training gets the steered images plus --preserve plain images per object, each prompt
    naming one object, the held-out ring included; a rerun makes them no second time."""
    from l2s.distill import train as dtrain
    from l2s.distill.data import PRESERVE_FILE
    from l2s.distill.job import DistillConfig, distill

    seen = {}
    real = dtrain.train_lora

    def spy(denoiser, net, params, latents, prompts, **kw):
        seen.update(n=len(latents), prompts=list(prompts), paired=kw["paired"])
        return real(denoiser, net, params, latents, prompts, **kw)

    monkeypatch.setattr(dtrain, "train_lora", spy)
    cfg = DistillConfig(out=str(tmp_path / "d"), images=2, chunk=2, steps=1, batch_size=2,
                        eval_prompts=0, preserve=2)
    res = distill(cfg, toy)
    objects = list(toy.known_objects)
    singles = [p for p in seen["prompts"] if p.startswith("a ") and " " not in p[2:]]
    assert sorted(singles) == sorted(f"a {o}" for o in objects for _ in range(2))
    assert "a ring" in singles
    assert seen["n"] == len(seen["prompts"]) == res.card["data"]["accepted"] + 12
    assert seen["paired"].shape[0] == seen["n"]
    assert res.card["data"]["preserved"] == 12
    stamp = (tmp_path / "d" / "data" / PRESERVE_FILE).stat().st_mtime_ns
    distill(replace(cfg, steps=2), toy)
    assert (tmp_path / "d" / "data" / PRESERVE_FILE).stat().st_mtime_ns == stamp
