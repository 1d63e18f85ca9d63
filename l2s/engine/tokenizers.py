"""Tokenizers built locally from word lists, so no model or test needs a hub download."""

from __future__ import annotations

import string
from collections.abc import Iterable

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Characters every built tokenizer can fall back to, so any ASCII prompt tokenises
# (unknown words become character pieces instead of <unk>).
_FALLBACK_CHARS = string.ascii_lowercase + string.digits + "'-,.!?&/()"


def build_clip_tokenizer(
    words: Iterable[str], *, model_max_length: int = 77, vocab_size: int | None = None
) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer whose merges spell each given word as one token.

    Each word becomes a single ``word</w>`` token (so a word-level model, such as the toy
    text encoder, sees one embedding per word); other words fall back to characters.
    ``vocab_size`` (e.g. 49408 for the SD text encoders) only checks that the ids fit.

    Each word's left-to-right merge chain alone does not keep that promise: BPE applies the
    lowest-ranked merge first, so an earlier word's merge can take letters a later chain
    needs ("and" merges a+n before "triangle" merges tri+a, leaving 6 pieces). After the
    chains, each word is spelt as BPE would spell it and the pieces left are joined by merges
    ranked last; they join prefixes, already in the vocabulary, so ids stay as the chains gave
    them (the toy tokenizers shipped with l2s were built before this step: see
    ``l2s.toy.model.build_toy_tokenizer``).
    """
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    merges: list[tuple[str, str]] = []

    def add(piece: str) -> None:
        if piece not in vocab:
            vocab[piece] = len(vocab)

    for ch in _FALLBACK_CHARS:
        add(ch)
        add(ch + "</w>")
    for word in sorted({w.lower() for w in words}):
        if not word or any(c not in _FALLBACK_CHARS for c in word):
            raise ValueError(f"cannot build a token for {word!r}: only {_FALLBACK_CHARS!r} allowed")
        if word + "</w>" in vocab:
            continue
        # Left-to-right merge chain: w,o -> wo; wo,r -> wor; wor,d</w> -> word</w>.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            add(merged)
            pieces = [merged] + pieces[2:]
    ranks = {pair: i for i, pair in enumerate(merges)}
    for word in sorted({w.lower() for w in words}):
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:  # ranked after every merge so far: no other spelling changes
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
            pieces = _bpe(word, ranks)
    if vocab_size is not None and len(vocab) > vocab_size:
        raise ValueError(f"{len(vocab)} tokens do not fit a vocabulary of {vocab_size}")
    return CLIPTokenizer(vocab=vocab, merges=merges,
                         model_max_length=model_max_length)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces CLIP's BPE spells ``word`` as: the lowest-ranked adjacent pair is merged
    first (leftmost on ties), until no pair has a merge."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        found = [(ranks[pair], i) for i, pair in enumerate(zip(pieces, pieces[1:], strict=False))
                 if pair in ranks]
        if not found:
            break
        _, i = min(found)
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_t5_tokenizer(words: Iterable[str], *, model_max_length: int = 512):
    """A real T5 (Unigram sentencepiece) fast tokenizer from an in-memory vocabulary.

    Ids follow T5's layout (<pad> 0, </s> 1, <unk> 2); each word is one ``▁word`` piece and
    other text falls back to single characters, so any ASCII prompt tokenises. Offsets map
    pieces to characters as with the hub's T5 tokenizer, so token alignment is unchanged.
    """
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}
    for word in sorted({w.lower() for w in words}):
        if word and "\u2581" + word not in seen:
            seen.add("\u2581" + word)
            pieces.append(("\u2581" + word, -1.0))  # whole words win over character chains
    for ch in ["\u2581", *_FALLBACK_CHARS, *_FALLBACK_CHARS.upper()]:
        if ch not in seen:
            seen.add(ch)
            pieces.append((ch, -8.0))
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = model_max_length
    return tok
