"""Token alignment on locally built CLIP BPE and T5 sentencepiece tokenizers."""

import pytest

from l2s.engine.tokenizers import build_clip_tokenizer
from l2s.engine.tokens import TokenAlignmentError, find_phrase, phrase_tokens, triplet_tokens
from l2s.families.tiny import TINY_WORDS
from l2s.relations import parse


@pytest.fixture(scope="module")
def tok():
    return build_clip_tokenizer(TINY_WORDS + ["cup"], model_max_length=16)


def test_single_and_multi_token_phrases(tok):
    prompt = "a teddy bear left of a dog"
    assert phrase_tokens(tok, prompt, "teddy bear").indices == (2, 3)
    assert phrase_tokens(tok, prompt, "dog").indices == (7,)
    assert phrase_tokens(tok, prompt, "dog").pieces == ("dog</w>",)


def test_word_unknown_to_the_vocabulary_spans_its_character_pieces(tok):
    # "zebra" is not a word of this tokenizer: it falls back to characters, all covered.
    pt = phrase_tokens(tok, "a zebra above a cat", "zebra")
    assert len(pt.indices) == 5 and "".join(pt.pieces).replace("</w>", "") == "zebra"


def test_repeated_word_resolves_to_the_occurrence_the_triplet_means(tok):
    prompt = "a cat left of a dog and a bird above the cat"
    first, second = parse(prompt)
    subj, obj = triplet_tokens(tok, prompt, second)
    assert subj.phrase == "bird"
    cat_positions = [i for i, p in enumerate(tok.convert_ids_to_tokens(tok(prompt).input_ids))
                     if p == "cat</w>"]
    assert obj.indices == (cat_positions[1],)
    assert triplet_tokens(tok, prompt, first)[0].indices == (cat_positions[0],)


def test_phrase_must_be_a_whole_word(tok):
    assert find_phrase("a cup and a cupboard", "cup") == (2, 5)
    with pytest.raises(TokenAlignmentError, match="not in the prompt"):
        phrase_tokens(tok, "a cupboard above a dog", "cup")


def test_prompt_too_long_for_the_encoder(tok):
    with pytest.raises(TokenAlignmentError, match="at most 16"):
        phrase_tokens(tok, "a dog " * 10 + "left of a cat", "cat")


def test_t5_sentencepiece_offsets():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0), ("▁teddy", -2.0),
             ("▁bear", -2.0), ("▁left", -2.0), ("▁of", -2.0), ("▁dog", -2.0), ("▁", -3.0)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    t5 = T5Tokenizer(vocab=vocab, extra_ids=0)
    prompt = "a teddy bear left of a dog"
    got = phrase_tokens(t5, prompt, "teddy bear")
    assert got.pieces == ("▁teddy", "▁bear")
    assert phrase_tokens(t5, prompt, "dog").pieces == ("▁dog",)
