"""Token alignment: which token indices of a prompt spell a word or phrase."""

from __future__ import annotations

import re
from dataclasses import dataclass

from l2s.errors import L2SError
from l2s.relations import Triplet


class TokenAlignmentError(L2SError, ValueError):
    """A phrase cannot be found in, or the prompt does not fit, the tokenizer's view."""


@dataclass(frozen=True)
class PhraseTokens:
    """The tokens one phrase of a prompt got."""

    phrase: str
    span: tuple[int, int]  # character span of the phrase in the prompt
    indices: tuple[int, ...]  # positions in the encoded sequence (BOS included as 0)
    pieces: tuple[str, ...]  # the tokenizer's pieces at those positions


def find_phrase(prompt: str, phrase: str, occurrence: int = 0) -> tuple[int, int]:
    """Character span of the n-th whole-word, case-insensitive occurrence of phrase."""
    pattern = r"(?<![\w])" + r"\s+".join(map(re.escape, phrase.split())) + r"(?![\w])"
    hits = list(re.finditer(pattern, prompt, flags=re.IGNORECASE))
    if len(hits) <= occurrence:
        raise TokenAlignmentError(
            f"{phrase!r} is not in the prompt {prompt!r}"
            + (f" {occurrence + 1} times" if occurrence else "")
            + ": name objects exactly as the prompt spells them")
    return hits[occurrence].span()


def encode_with_offsets(tokenizer, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets; errors if the prompt overflows the encoder."""
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        raise TokenAlignmentError(
            f"the prompt has {len(ids)} tokens but the text encoder reads at most {limit}: "
            "shorten the prompt (chained short phrases work best)")
    return ids, [tuple(o) for o in offsets]


def phrase_tokens(tokenizer, prompt: str, phrase: str, span: tuple[int, int] | None = None
                  ) -> PhraseTokens:
    """Tokens covering ``phrase`` (at ``span`` if given, else its first occurrence).

    Works for any fast tokenizer with offset mappings: CLIP BPE and T5 sentencepiece alike.
    """
    if span is None:
        span = find_phrase(prompt, phrase)
    ids, offsets = encode_with_offsets(tokenizer, prompt)
    start, end = span
    idx = tuple(i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start)
    if not idx:
        raise TokenAlignmentError(f"no token of the prompt covers {phrase!r}")
    return PhraseTokens(phrase, span, idx, tuple(tokenizer.convert_ids_to_tokens(
        [ids[i] for i in idx])))


def triplet_tokens(tokenizer, prompt: str, triplet: Triplet
                   ) -> tuple[PhraseTokens, PhraseTokens]:
    """Subject and object tokens of a parsed triplet, at the occurrences it refers to."""
    return (phrase_tokens(tokenizer, prompt, triplet.subject, triplet.subject_span),
            phrase_tokens(tokenizer, prompt, triplet.object, triplet.object_span))


def pair_tokens(tokenizer, prompt: str, subject: str, obj: str
                ) -> tuple[PhraseTokens, PhraseTokens]:
    """Subject tokens at its first occurrence, object tokens at its first one after that."""
    s_span = find_phrase(prompt, subject)
    rest = prompt[s_span[1]:]
    o_local = find_phrase(rest, obj)
    o_span = (o_local[0] + s_span[1], o_local[1] + s_span[1])
    return (phrase_tokens(tokenizer, prompt, subject, s_span),
            phrase_tokens(tokenizer, prompt, obj, o_span))
