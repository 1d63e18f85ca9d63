"""Benchmark prompt suites: each prompt with its GenEval-style metadata and the triplets to steer.

Suites: `geneval` (all 553 GenEval prompts, six tasks), `geneval-position` (its 100 position
prompts), `compbench-spatial` (the 300 T2I-CompBench spatial validation prompts), `multirel`
(l2s's multi-relation stress test over GenEval's 80 object names); a family's world registers
its own (``register_suite``), and other packages list theirs under the ``l2s.suites``
entry-point group. Prompt i of a generated suite depends only on (seed, i).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from l2s.bench.exports import compbench_samples
from l2s.bench.geneval import position_metadata
from l2s.engine.registry import Registry
from l2s.errors import L2SError
from l2s.relations import RELATIONS, Triplet, format_prompt, parse

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


def pair_prompts(names: Sequence[str], n: int, seed: int) -> list[BenchPrompt]:
    """Prompts "a A REL a B" over distinct `names`; prompt i depends only on (seed, i)."""
    out = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        a, b = rng.sample(names, 2)
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


@dataclass(frozen=True)
class Suite:
    """A registered prompt suite: its prompts, and how it is rendered and scored by default."""

    name: str  # what --suite names
    # (n or None, seed) -> the first n prompts (None: all of a fixed suite, GENERATED_PROMPTS
    # of a generated one)
    prompts: Callable[[int | None, int], list[BenchPrompt]]
    images: int  # images per prompt by default (GenEval renders 4, T2I-CompBench 10)
    detector: str  # the --detector it scores with by default
    # (out, one method's records, images per prompt) -> the folder where that method's images
    # sit in the original harness's own layout, beside GenEval's (None: GenEval's only)
    export: Callable[[Path, list[dict], int], Path | None] | None = None


SUITE_REGISTRY: Registry[Suite] = Registry("suite", "l2s.suites")


def register_suite(suite: Suite) -> None:
    """Make a suite known to `l2s bench --suite` (a module calls this at import)."""
    SUITE_REGISTRY.register(suite.name, suite)


def suite_names() -> tuple[str, ...]:
    """Every registered suite's name."""
    return SUITE_REGISTRY.names()


def get_suite(name: str) -> Suite:
    found = SUITE_REGISTRY.get(name)
    if found is None:
        raise BenchError(f"unknown suite {name!r}: available suites are "
                         f"{', '.join(suite_names())}")
    return found


class _SuiteDetectors(Mapping):
    """Suite name -> the detector it scores with by default, read from the registry."""

    def __getitem__(self, suite: str) -> str:
        return get_suite(suite).detector

    def __iter__(self) -> Iterator[str]:
        return iter(suite_names())

    def __len__(self) -> int:
        return len(suite_names())


DEFAULT_DETECTORS: Mapping[str, str] = _SuiteDetectors()


def _fixed(prompts: Callable[[], list[BenchPrompt]]):
    return lambda n, seed: prompts() if n is None else prompts()[:n]


for _suite in (
    Suite("geneval", _fixed(geneval_prompts), 4, "mask2former"),
    Suite("geneval-position", _fixed(lambda: geneval_prompts(position_only=True)), 4,
          "mask2former"),
    Suite("compbench-spatial", _fixed(compbench_prompts), 10, "owlv2",
          export=compbench_samples),
    Suite("multirel", lambda n, seed: multi_prompts(
        geneval_names(), GENERATED_PROMPTS if n is None else n, seed, "geneval"),
        4, "mask2former"),
):
    register_suite(_suite)


def __getattr__(name: str):
    if name == "SUITES":  # the names, once every suite has registered
        return suite_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def suite_prompts(suite: str, n: int | None, seed: int) -> list[BenchPrompt]:
    """The first `n` prompts of a suite (None: a fixed suite's full set, GENERATED_PROMPTS
    of a generated one)."""
    return get_suite(suite).prompts(n, seed)
