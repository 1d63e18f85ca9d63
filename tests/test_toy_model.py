"""The toy model: building, saving/loading, one training step, resuming, committed weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from l2s.toy.checkpoint import CheckpointError
from l2s.toy.evaluate import two_object_prompts
from l2s.toy.losses import loss_weights
from l2s.toy.model import (
    DEFAULT_WEIGHTS_DIR,
    ToyModelConfig,
    build_toy_components,
    load_toy_components,
    save_toy,
)
from l2s.toy.scenes import VOCABULARY
from l2s.toy.train import ToyTrainConfig, ToyTrainer, main, train_toy

TINY = ToyModelConfig(unet_channels=(16, 32, 32), attention_heads=2, text_width=32,
                      text_layers=1, text_heads=2, text_mlp=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two threads on a busy 2-core CPU spin in OpenMP barriers: one is several times faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def components():
    return build_toy_components(TINY, seed=0)


def _outputs(unet, text_encoder, tokenizer):
    ids = tokenizer(["a circle left of a square", ""], padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb = text_encoder(ids)[0]  # (2, T, D)
        return emb, unet(x, torch.tensor([10, 900]), encoder_hidden_states=emb).sample


def test_components_have_the_promised_shapes(components):
    unet, text_encoder, tokenizer, scheduler = components
    emb, out = _outputs(unet, text_encoder, tokenizer)
    assert emb.shape == (2, TINY.max_tokens, TINY.text_width)
    assert out.shape == (2, 3, 32, 32)
    assert text_encoder.config.eos_token_id == tokenizer.eos_token_id
    assert unet.config.cross_attention_dim == TINY.text_width
    longest = "a triangle to the right of a circle, a diamond, a cross and a ring"
    assert len(tokenizer(longest).input_ids) <= TINY.max_tokens
    assert scheduler.config.prediction_type == TINY.prediction_type


def test_every_vocabulary_word_is_one_token(components):
    """Was: 'triangle' came out as 6 pieces (the 'and' chain's a+n merge outranked the
    tri+a merge of its own chain), so a new toy saw one word as six."""
    tokenizer = components[2]
    # One token per word, so each word has exactly one cross-attention map.
    for word in VOCABULARY:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_competing_merge_chains_still_give_one_token_per_word():
    """Catches a builder that trusts each word's own merge chain: earlier-ranked merges of
    other words (a+n of "an", r+i of "ring") take letters the chain of "triangle" needs."""
    from l2s.engine.tokenizers import build_clip_tokenizer

    words = ["an", "ring", "triangle", "banana", "nab", "ban"]
    tokenizer = build_clip_tokenizer(words)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"], word


def _split_words(tokenizer) -> set[str]:
    return {w for w in VOCABULARY if len(tokenizer(w, add_special_tokens=False).input_ids) > 1}


@pytest.mark.parametrize("folder", ["weights", "weights-mmdit"])
def test_shipped_tokenizers_are_as_their_docstring_says(components, folder):
    """build_toy_tokenizer's docstring says what the shipped tokenizers do: only 'triangle'
    in pieces, every other word with the ids a new build gives, and 'triangle' still one
    supervised / recorded group. Fails if the shipped files or the builder's ids drift."""
    from transformers import CLIPTokenizer

    from l2s.engine.tokens import phrase_tokens

    path = DEFAULT_WEIGHTS_DIR.parent / folder / "tokenizer"
    if not path.is_dir():
        pytest.skip(f"no shipped tokenizer in {path}")
    shipped, built = CLIPTokenizer.from_pretrained(path), components[2]
    assert _split_words(shipped) == {"triangle"}
    assert shipped.get_vocab() == built.get_vocab()  # new builds keep the shipped ids
    for word in VOCABULARY:
        if word != "triangle":
            assert (shipped(word, add_special_tokens=False).input_ids
                    == built(word, add_special_tokens=False).input_ids), word
    pieces = phrase_tokens(shipped, "a triangle above a ring", "triangle").indices
    assert len(pieces) == 6 and list(pieces) == list(range(pieces[0], pieces[0] + 6))


def test_same_seed_same_weights():
    a, _, _, _ = build_toy_components(TINY, seed=3)
    b, _, _, _ = build_toy_components(TINY, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_save_load_round_trip(components, tmp_path):
    unet, text_encoder, tokenizer, scheduler = components
    save_toy(tmp_path, unet, text_encoder, tokenizer, scheduler)
    unet2, text2, tok2, sched2 = load_toy_components(tmp_path)
    assert tok2("a ring above a cross").input_ids == tokenizer("a ring above a cross").input_ids
    assert sched2.config.prediction_type == scheduler.config.prediction_type
    for before, after in zip(_outputs(unet, text_encoder, tokenizer),
                             _outputs(unet2, text2, tok2), strict=True):
        torch.testing.assert_close(before, after)


def test_missing_weights_file_names_it_and_the_fix(components, tmp_path):
    save_toy(tmp_path, *components)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors") as err:
        load_toy_components(tmp_path)
    assert "l2s.toy.train" in str(err.value)


def test_corrupt_weights_file_says_how_to_rebuild(components, tmp_path):
    save_toy(tmp_path, *components)
    (tmp_path / "text_encoder" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match="make toy-model"):
        load_toy_components(tmp_path)


def test_loss_weights_follow_min_snr():
    s = torch.tensor([0.01, 1.0, 100.0])
    torch.testing.assert_close(loss_weights("uniform", "sample", s, 5.0), torch.ones(3))
    torch.testing.assert_close(loss_weights("min_snr", "sample", s, 5.0),
                               torch.tensor([0.01, 1.0, 5.0]))
    # In epsilon space Min-SNR is min(s, gamma) / s (Hang et al., 2023).
    torch.testing.assert_close(loss_weights("min_snr", "epsilon", s, 5.0),
                               torch.tensor([1.0, 1.0, 0.05]))
    torch.testing.assert_close(loss_weights("clamped_snr", "sample", s, 5.0),
                               torch.tensor([1.0, 1.0, 5.0]))


def test_two_object_prompts_cover_every_pair_and_relation():
    items = two_object_prompts(120, seed=1)
    assert len({(a, rel, b) for _, a, rel, b in items}) == 120
    prompt, a, rel, b = items[0]
    assert prompt.startswith(f"a {a} ") and prompt.endswith(f" a {b}")
    assert two_object_prompts(10, seed=1) == items[:10]


def _tiny_run(tmp_path, **kw) -> ToyTrainConfig:
    return ToyTrainConfig(out=str(tmp_path), batch=4, warmup=2, eval_every=0, model=TINY, **kw)


def _weights(trainer):
    return [p.detach().clone() for p in trainer.params + trainer.ema_params]


def test_training_step_and_resume_are_exact(tmp_path):
    cfg = _tiny_run(tmp_path)
    first = ToyTrainer(cfg)
    losses = [first.train_step() for _ in range(2)]
    assert all(np.isfinite(losses))
    first.save()
    first.train_step()
    resumed = ToyTrainer(cfg)
    assert resumed.resume() and resumed.step == 2
    resumed.train_step()
    for a, b in zip(_weights(first), _weights(resumed), strict=True):
        assert torch.equal(a, b)


def test_resume_refuses_a_checkpoint_tokenized_otherwise(tmp_path, capsys):
    """A checkpoint from before one-token-per-word (no recorded spelling) or with another
    spelling would pair its text encoder with other token ids: catches a silent resume."""
    import json

    cfg = _tiny_run(tmp_path)
    first = ToyTrainer(cfg)
    first.train_step()
    first.save()
    state_file = first.checkpoint_dir / "state.json"
    state = json.loads(state_file.read_text())
    state["spelling"]["triangle"] = [40, 139, 99, 14, 24, 11]  # the shipped tokenizer's
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="'triangle' tokenized as"):
        ToyTrainer(cfg).resume()
    del state["spelling"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="start the run afresh"):
        ToyTrainer(cfg).resume()
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    with pytest.raises(SystemExit, match="error: .*does not record how its captions"):
        main(["--out", str(tmp_path), "--steps", "2", "--resume"])


def test_train_toy_reports_and_exports(tmp_path):
    events = []
    result = train_toy(dataclasses.replace(_tiny_run(tmp_path), steps=2, checkpoint_every=1),
                       callback=events.append)
    assert result.step == 2 and result.best is None
    assert {e["event"] for e in events} >= {"step", "checkpoint"}
    unet, *_ = load_toy_components(result.model_dir)
    assert unet.config.block_out_channels == list(TINY.unet_channels)


def test_cli_trains_then_resumes(tmp_path, capsys):
    run = str(tmp_path / "run")
    main(["--out", run, "--steps", "1", "--batch", "2", "--eval-every", "0"])
    main(["--out", run, "--steps", "2", "--resume"])
    out = capsys.readouterr()
    assert '"step": 2' in out.out.splitlines()[-1]
    assert "resume step=1" in out.err
    load_toy_components(tmp_path / "run" / "model")


@pytest.mark.skipif(not (DEFAULT_WEIGHTS_DIR / "unet" / "config.json").is_file(),
                    reason="no committed toy weights in l2s/toy/weights (make toy-model)")
def test_committed_weights_sample():
    from l2s.engine.sampling import sample
    from l2s.families.unet import UNetDenoiser

    denoiser = UNetDenoiser(*load_toy_components(), name="toy")
    images = sample(denoiser, ["a circle left of a square", "a ring above a cross"], steps=2,
                    guidance=3.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 32, 32, 3)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_attention_supervision_adds_to_the_loss_and_trains(tmp_path):
    plain = ToyTrainer(_tiny_run(tmp_path / "a"))
    supervised = ToyTrainer(_tiny_run(tmp_path / "b", attention_weight=0.5))
    # Same seeds, same batch: the supervised loss is the diffusion loss plus a positive term.
    lp, ls = plain.train_step(), supervised.train_step()
    assert np.isfinite(ls) and ls > lp
    for p in supervised.params:
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.skipif(not (DEFAULT_WEIGHTS_DIR / "unet").is_dir(), reason="no committed weights")
def test_toy_backbone_runs_two_steps_with_attention_capture():
    from l2s.engine.hooks import AttentionRecorder
    from l2s.engine.loading import load_backbone
    from l2s.engine.sampling import sample
    from l2s.engine.tokens import pair_tokens

    den = load_backbone("toy", device="cpu")
    prompt = "a circle to the left of a square"
    subj, obj = pair_tokens(den.tokenizer, prompt, "circle", "square")
    with AttentionRecorder(den, den.cross_attention_layers(),
                           [list(subj.indices), list(obj.indices)]) as rec:
        images = sample(den, [prompt], steps=2, guidance=3.0,
                        generator=torch.Generator().manual_seed(0))
        maps = rec.stacked()
    assert images.shape == (1, 32, 32, 3)
    c = sum(la.heads for la in den.cross_attention_layers())
    assert {la.resolution for la in den.cross_attention_layers()} == {(16, 16), (8, 8)}
    assert maps.shape == (2, 2, c, 16, 16)  # the last forward: the CFG batch of 2


def test_init_from_starts_from_the_exported_weights(tmp_path):
    """--init-from copies an export into the live and EMA networks (a fine-tune, not a fresh
    model); catches a trainer that ignores it or leaves the EMA on the random weights. A run of
    another architecture is refused with the option's name, not a state-dict traceback."""
    from l2s.errors import L2SError

    source = train_toy(dataclasses.replace(_tiny_run(tmp_path / "a"), steps=1, seed=3))
    saved = [p.detach() for m in load_toy_components(source.model_dir)[:2] for p in m.parameters()]
    cfg = _tiny_run(tmp_path / "b", init_from=source.model_dir, relation_rate=0.9)
    tuned = ToyTrainer(cfg)
    for live, ema, want in zip(tuned.params, tuned.ema_params, saved, strict=True):
        assert torch.equal(live, want) and torch.equal(ema, want)
    fresh = ToyTrainer(_tiny_run(tmp_path / "c"))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.params, saved, strict=True))
    wide = dataclasses.replace(TINY, unet_channels=tuple(2 * c for c in TINY.unet_channels))
    with pytest.raises(L2SError, match="--init-from .* do not fit"):
        ToyTrainer(dataclasses.replace(_tiny_run(tmp_path / "d", init_from=source.model_dir),
                                       model=wide))
