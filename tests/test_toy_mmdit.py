"""The toy-mmdit: packing, joint-attention capture, rectified-flow training, resume, save/load."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from l2s.engine.hooks import token_weights
from l2s.toy.mmdit import (
    JointAttentionMaps,
    ToyMMDiTConfig,
    build_mmdit_components,
    encode_text,
    image_ids,
    load_mmdit_components,
    pack,
    unpack,
    velocity,
)
from l2s.toy.train import ToyTrainer, TrainConfig, config_from_dict, main, train_toy

TINY = ToyMMDiTConfig(heads=2, head_dim=8, rope_axes=(2, 2, 4), double_layers=1,
                      single_layers=1, text_width=16, text_layers=1, text_heads=2, text_mlp=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(out=str(tmp_path), backbone="mmdit", batch=4, warmup=2, eval_every=0,
                       mmdit=TINY, **kw)


def test_pack_is_flux_packing_and_unpack_inverts_it():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    p = pack(x)
    assert p.shape == (2, 4, 12)
    # token 1 is the 2x2 block at row 0, cols 2-3; channels major, then the 2x2 offsets
    assert p[0, 1].tolist() == x[0, :, 0:2, 2:4].reshape(-1).tolist()
    assert torch.equal(unpack(p, 4), x)
    ids = image_ids(4)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]


def test_capture_leaves_the_output_alone_and_maps_are_text_softmax_maps():
    transformer, text_encoder, tokenizer, _ = build_mmdit_components(TINY, seed=0)
    ids = tokenizer(["a circle left of a square"] * 2, padding="max_length",
                    max_length=TINY.max_tokens, return_tensors="pt").input_ids
    tokens, pooled = encode_text(text_encoder, ids)
    x, s = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.8])
    with torch.no_grad():
        plain = velocity(transformer, x, s, tokens, pooled)
        with JointAttentionMaps(transformer, token_weights([[2], [6]], TINY.max_tokens),
                                TINY.max_tokens, 32) as rec:
            captured = velocity(transformer, x, s, tokens, pooled)
    assert torch.allclose(plain, captured, atol=1e-5)
    maps = rec.stacked()
    blocks = TINY.double_layers + TINY.single_layers
    assert maps.shape == (2, 2, blocks * TINY.heads, 16, 16)
    assert torch.allclose(maps.sum((-2, -1)), torch.ones(2, 2, blocks * TINY.heads), atol=1e-5)
    # the processors are restored
    assert all(type(p).__name__ == "FluxAttnProcessor"
               for p in transformer.attn_processors.values())


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
