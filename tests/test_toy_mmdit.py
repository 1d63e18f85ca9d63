"""The toy-mmdit: packing, joint-attention capture, rectified-flow training through its engine
adapter, resume, save/load."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from l2s.engine.hooks import AttentionRecorder, token_weights
from l2s.toy.backbones import MMDiTToy
from l2s.toy.mmdit import ToyMMDiTConfig, build_mmdit_components, load_mmdit_components
from l2s.toy.train import ToyTrainConfig, ToyTrainer, config_from_dict, main, train_toy

TINY = ToyMMDiTConfig(heads=2, head_dim=8, rope_axes=(2, 2, 4), double_layers=1,
                      single_layers=1, text_width=16, text_layers=1, text_heads=2, text_mlp=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(tmp_path, **kw) -> ToyTrainConfig:
    return ToyTrainConfig(out=str(tmp_path), backbone="mmdit", batch=4, warmup=2, eval_every=0,
                          mmdit=TINY, **kw)


def _denoiser(image_size: int = 32):
    cfg = ToyTrainConfig(out="", backbone="mmdit",
                         mmdit=dataclasses.replace(TINY, image_size=image_size))
    return MMDiTToy(cfg).denoiser(*build_mmdit_components(TINY, seed=0))


def test_pack_is_flux_packing_and_unpack_inverts_it():
    """Catches a pixel-space packing other than Flux's (the shipped weights were trained on
    it) and an unpack that does not invert it."""
    den = _denoiser(image_size=4)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    p = den.pack(x)
    assert p.shape == (2, 4, 12)
    # token 1 is the 2x2 block at row 0, cols 2-3; channels major, then the 2x2 offsets
    assert p[0, 1].tolist() == x[0, :, 0:2, 2:4].reshape(-1).tolist()
    assert torch.equal(den.unpack(p), x)
    assert den._img_ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]


def test_capture_leaves_the_output_alone_and_maps_are_text_softmax_maps():
    """The trainer's supervision maps come from the engine's recorder on the adapter: catches
    a capture that changes the prediction, maps that are not per-group distributions over
    the image grid, or processors left installed."""
    den = _denoiser()
    cond = den.encode_prompt(["a circle left of a square"] * 2)
    x = den.pack(torch.randn(2, 3, 32, 32))
    t = torch.tensor([200.0, 800.0])  # one model time per image, as the trainer passes them
    plain = den.predict(x, t, cond)
    rec = AttentionRecorder(den, den.cross_attention_layers(), (), map_size=16)
    rec.set_weights(token_weights([[2], [6]], TINY.max_tokens))
    with rec:
        captured = den.predict(x, t, cond)
    torch.testing.assert_close(plain, captured, rtol=0, atol=1e-5)
    maps = rec.stacked()
    blocks = TINY.double_layers + TINY.single_layers
    assert maps.shape == (2, 2, blocks * TINY.heads, 16, 16)
    assert torch.allclose(maps.sum((-2, -1)), torch.ones(2, 2, blocks * TINY.heads), atol=1e-5)
    # the processors are restored
    assert all(type(p).__name__ == "FluxAttnProcessor"
               for p in den.transformer.attn_processors.values())


def test_training_through_the_adapter_updates_both_networks(tmp_path):
    """The adapter freezes what it wraps for inference: catches a trainer whose live
    transformer or text encoder lost its gradients (a run that would learn nothing)."""
    trainer = ToyTrainer(_run(tmp_path, attention_weight=0.5))
    before = [p.detach().clone() for p in trainer.params]
    trainer.train_step()
    assert all(p.requires_grad for p in trainer.params)
    for module in (trainer.net, trainer.text_encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


def test_supervised_training_steps_and_resume_are_exact(tmp_path):
    cfg = _run(tmp_path, attention_weight=0.5)
    first = ToyTrainer(cfg)
    losses = [first.train_step() for _ in range(2)]
    assert all(np.isfinite(losses))
    first.save()
    first.train_step()
    resumed = ToyTrainer(cfg)
    assert resumed.resume() and resumed.step == 2
    resumed.train_step()
    for a, b in zip(first.params + first.ema_params, resumed.params + resumed.ema_params,
                    strict=True):
        assert torch.equal(a, b)


def test_attention_supervision_adds_to_the_flow_loss(tmp_path):
    plain = ToyTrainer(_run(tmp_path / "a"))
    supervised = ToyTrainer(_run(tmp_path / "b", attention_weight=0.5))
    lp, ls = plain.train_step(), supervised.train_step()
    assert np.isfinite(ls) and ls > lp


def test_train_export_load_and_evaluate(tmp_path):
    cfg = dataclasses.replace(_run(tmp_path), steps=2, checkpoint_every=1, eval_every=2,
                              eval_prompts=2, eval_steps=2, eval_guidance=1.0)
    result = train_toy(cfg)
    assert result.step == 2 and result.best is not None and result.best.n == 2
    transformer, text_encoder, tokenizer, scheduler = load_mmdit_components(result.model_dir)
    assert transformer.config.num_layers == TINY.double_layers
    assert transformer.config.in_channels == 12 and not transformer.config.guidance_embeds
    saved = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert saved == cfg


def test_cli_evaluates_a_toy_mmdit_export(tmp_path, capsys):
    """``--evaluate`` picks the toy from the export's folders: catches a toy-mmdit export
    read as a UNet toy (which would refuse it for a missing unet/)."""
    cfg = dataclasses.replace(_run(tmp_path), steps=1, checkpoint_every=1)
    model_dir = train_toy(cfg).model_dir
    capsys.readouterr()
    main(["--evaluate", model_dir, "--eval-prompts", "2", "--eval-steps", "1", "--guidance", "1"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == 2


def test_missing_file_names_the_rebuild_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="make toy-mmdit"):
        load_mmdit_components(tmp_path)


def test_cli_trains_mmdit_with_a_time_limit_then_resumes(tmp_path, capsys):
    run = str(tmp_path / "run")
    main(["--backbone", "mmdit", "--out", run, "--steps", "5", "--batch", "2",
          "--eval-every", "0", "--max-seconds", "0.001"])
    assert '"step": 1' in capsys.readouterr().out.splitlines()[-1]  # cut after one step
    main(["--out", run, "--steps", "2", "--resume"])
    out = capsys.readouterr()
    assert '"step": 2' in out.out.splitlines()[-1] and "resume step=1" in out.err
    load_mmdit_components(tmp_path / "run" / "model")


@pytest.mark.slow
def test_worker_batches_equal_inline_batches(tmp_path):
    from l2s.toy.batches import BatchStream, flow_batch

    cfg = _run(tmp_path, attention_weight=0.1)
    stream = BatchStream(cfg, 3, workers=2)
    try:
        for step in (3, 4, 5):
            got, want = stream.get(step), flow_batch(cfg, step)
            for f in dataclasses.fields(want):
                assert torch.equal(getattr(got, f.name), getattr(want, f.name)), f.name
    finally:
        stream.close()
