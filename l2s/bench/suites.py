"""Benchmark prompt suites: each prompt with its GenEval-style metadata and the triplets to steer.

Suites: `geneval` (all 553 GenEval prompts, six tasks), `geneval-position` (its 100 position
prompts), `compbench-spatial` (the 300 T2I-CompBench spatial validation prompts), `multirel`
(l2s's multi-relation stress test over GenEval's 80 object names) and the toy world's `shapes`
and `shapes-multi`. Prompt i of a generated suite depends only on (seed, i).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

from l2s.bench.geneval import position_metadata
from l2s.errors import L2SError
from l2s.relations import RELATIONS, Triplet, format_prompt, parse

# Suites scored with the toy detector (the toy world) and with real detectors.
TOY_SUITES = ("shapes", "shapes-multi")
REAL_SUITES = ("geneval", "geneval-position", "compbench-spatial", "multirel")
SUITES: tuple[str, ...] = TOY_SUITES + REAL_SUITES
# Images per prompt by default: GenEval renders 4, T2I-CompBench 10; the toy world 1.
SUITE_IMAGES = {"shapes": 1, "shapes-multi": 1, "geneval": 4, "geneval-position": 4,
                "multirel": 4, "compbench-spatial": 10}
GENERATED_PROMPTS = 200  # default size of the generated suites (shapes, shapes-multi, multirel)
# T2I-CompBench queries its detector with these nouns as "person" (UniDet_eval/2D_spatial_eval.py).
COMPBENCH_PERSON = frozenset({"girl", "boy", "man", "woman"})
# Multi-relation structures, by prompt index modulo 4: (objects, relations).
MULTI_STRUCTURES = ((3, 2), (4, 3), (3, 2), (5, 3))


class BenchError(L2SError, ValueError):
    """A benchmark cannot start or resume as asked; says what to do."""


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark prompt: its text, what the scorer checks and what steering aims at."""

    index: int  # position in the full suite (GenEval: line of evaluation_metadata.jsonl)
    prompt: str
    metadata: dict = field(compare=False)  # GenEval metadata (tag, include, exclude, prompt)
    triplets: tuple[Triplet, ...] = ()  # steered relations; () for prompts without one

    @property
    def tag(self) -> str:
        return self.metadata["tag"]

    @property
    def triplet(self) -> Triplet:
        """The first relation (two-object suites have exactly one)."""
        return self.triplets[0]


def _data(*parts: str) -> str:
    return resources.files("l2s").joinpath("data", *parts).read_text()


def geneval_names() -> tuple[str, ...]:
    """GenEval's 80 COCO class names, in its (mmdet's) order."""
    return tuple(line.strip() for line in _data("geneval", "object_names.txt").splitlines()
                 if line.strip())


def _geneval_triplets(meta: dict) -> tuple[Triplet, ...]:
    """The relations a GenEval metadata entry asks for, with spans from parsing its prompt."""
    wanted = []
    for req in meta.get("include", []):
        if "position" in req:
            rel, target = req["position"]
            wanted.append(Triplet(req["class"], rel, meta["include"][target]["class"]))
    parsed = {t: t for t in parse(meta["prompt"])}  # Triplet equality ignores spans
    return tuple(parsed.get(t, t) for t in wanted)


def geneval_prompts(position_only: bool = False) -> list[BenchPrompt]:
    lines = [json.loads(x) for x in _data("geneval", "evaluation_metadata.jsonl").splitlines()
             if x.strip()]
    return [BenchPrompt(i, m["prompt"], m, _geneval_triplets(m)) for i, m in enumerate(lines)
            if not position_only or m["tag"] == "position"]


def compbench_prompts() -> list[BenchPrompt]:
    """The 300 spatial prompts; objects are the first and last noun, as CompBench picks them."""
    out = []
    for i, prompt in enumerate(x.strip() for x in _data("t2i-compbench",
                                                        "spatial_val.txt").splitlines()):
        triplets = parse(prompt)
        first, last = triplets[0], triplets[-1]
        t = Triplet(first.subject, first.relation, last.object, first.subject_span,
                    last.object_span)
        meta = {"tag": "spatial", "prompt": prompt, "relation": t.relation,
                "subject": t.subject, "object": t.object,
                "queries": [compbench_query(t.subject), compbench_query(t.object)]}
        out.append(BenchPrompt(i, prompt, meta, (t,)))
    return out


def compbench_query(noun: str) -> str:
    """What the detector looks for: CompBench maps girl/boy/man/woman to person."""
    return "person" if noun in COMPBENCH_PERSON else noun


def shapes_prompts(n: int, seed: int) -> list[BenchPrompt]:
    """Prompts "a A REL a B" over the toy categories; prompt i depends only on (seed, i)."""
    from l2s.toy.scenes import CATEGORY_NAMES

    out = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        a, b = rng.sample(CATEGORY_NAMES, 2)
        t = Triplet(a, rng.choice(RELATIONS), b)
        prompt = format_prompt([t], style="plain")
        out.append(BenchPrompt(i, prompt, position_metadata([t], prompt), (t,)))
    return out


def multi_prompts(names: Sequence[str], n: int, seed: int, style: str) -> list[BenchPrompt]:
    """Multi-relation prompts over distinct `names`: 3 objects with 2 relations (a chain
    "A r1 B r2 C"), 4 objects with 3 (a chain), 5 objects with 3 ("A r1 B r2 C and D r3 E"),
    by index (MULTI_STRUCTURES); relations drawn uniformly; tag "3obj-2rel" and so on."""
    out = []
    for i in range(n):
        n_obj, n_rel = MULTI_STRUCTURES[i % len(MULTI_STRUCTURES)]
        rng = random.Random(seed * 1_000_033 + i)
        objs = rng.sample(list(names), n_obj)
        chains = [objs] if n_obj == n_rel + 1 else [objs[:3], objs[3:]]
        wanted = [Triplet(c[k], rng.choice(RELATIONS), c[k + 1])
                  for c in chains for k in range(len(c) - 1)]
        prompt = format_prompt(wanted, style=style)
        parsed = parse(prompt)
        if parsed != wanted:  # the prompt must say exactly what is scored
            raise BenchError(f"{prompt!r} parses to {parsed}, not {wanted}")
        tag = f"{n_obj}obj-{n_rel}rel"
        out.append(BenchPrompt(i, prompt, position_metadata(parsed, prompt, tag), tuple(parsed)))
    return out


def suite_prompts(suite: str, n: int | None, seed: int) -> list[BenchPrompt]:
    """The first `n` prompts of a suite (None: a fixed suite's full set, GENERATED_PROMPTS
    of a generated one)."""
    if suite not in SUITES:
        raise BenchError(f"unknown suite {suite!r}: available suites are {', '.join(SUITES)}")
    count = GENERATED_PROMPTS if n is None else n
    if suite == "shapes":
        return shapes_prompts(count, seed)
    if suite == "shapes-multi":
        from l2s.toy.scenes import CATEGORY_NAMES

        return multi_prompts(CATEGORY_NAMES, count, seed, "short")
    if suite == "multirel":
        return multi_prompts(geneval_names(), count, seed, "geneval")
    fixed = (compbench_prompts() if suite == "compbench-spatial"
             else geneval_prompts(position_only=suite == "geneval-position"))
    return fixed if n is None else fixed[:n]
