"""The toy world's data sources: "shapes" (rendered scenes) and "generated" (the toy model's
images, verified by the toy detector); registered by ``l2s.toy.world``.

shapes
    Toy scenes (`l2s.toy.scenes.random_scene`) of exactly two shapes, scene i seeded by
    (seed, i); the relation is the one GenEval's rule gives for the first shape relative to the
    second (the stronger axis when two hold); scenes where none holds are dropped ("no relation
    holds"). Images are kept in memory.
generated
    Generate and verify: prompts "a A REL a B" over the model's known toy shapes, images from
    `l2s.engine.sampling.sample`, then the toy detector; an image is kept when both shapes are
    found, apart ("objects touch" otherwise), and their detected boxes satisfy REL ("object not
    detected", "relation not verified" otherwise). Boxes are the detected ones. Only a model of
    the toy world (its ``Denoiser.world``) can be verified offline, so other models are refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np

from l2s.engine.registry import generation_defaults
from l2s.engine.sampling import sample, seeded_latents, to_uint8
from l2s.inversion.sources.base import (
    Sample,
    SourceError,
    SourceOptions,
    SourceReport,
    _Quota,
    _strongest,
    per_relation,
)
from l2s.relations import RELATIONS, Triplet, format_prompt, geneval_relations

# ---------------------------------------------------------------------------------------------
# Toy shapes


def shapes_source(options: SourceOptions, report: SourceReport, denoiser=None
                  ) -> Iterator[Sample]:
    from l2s.toy.scenes import side_range

    try:
        side_range(options.shapes_size)
    except ValueError as err:
        raise SourceError(f"shapes_size {options.shapes_size}: {err}") from None
    return _shapes_samples(options, per_relation("shapes", options), report)


def _shapes_samples(options: SourceOptions, counts, report: SourceReport) -> Iterator[Sample]:
    from l2s.toy.scenes import random_scene

    quota = _Quota(counts)
    size, seed = options.shapes_size, options.seed
    # Scenes of two shapes relate under GenEval's rule most of the time; the cap only stops a
    # pathological configuration from looping forever.
    limit = 50 * sum(counts) * len(RELATIONS) + 1000
    for i in range(limit):
        if quota.done():
            break
        scene = random_scene(np.random.default_rng([seed, i]), size=size, n_objects=2)
        a, b = scene.objects
        held = geneval_relations(a.box, b.box)
        if not held:
            report.dropped["no relation holds"] += 1
            continue
        relation = _strongest(held, a.box, b.box)
        split = quota.split_for(relation)
        if split is None:
            continue
        quota.take(split, relation)
        yield report.keep(
            Sample(
                "shapes", f"shapes:{size}:{seed}:{i}", a.category, b.category, relation,
                tuple(float(v) for v in a.box), tuple(float(v) for v in b.box), split,
                image_array=scene.image,
            )
        )
    quota.report_short(report)


# ---------------------------------------------------------------------------------------------
# Generated and verified


def generated_source(options: SourceOptions, report: SourceReport, denoiser
                     ) -> Iterator[Sample]:
    from l2s.toy.scenes import CATEGORY_NAMES, WORLD_NAME

    if denoiser is None:
        raise SourceError(
            "the generated source needs a model to generate with: load one "
            "(l2s.engine.loading.load_backbone) and pass it as denoiser, or use --data shapes"
        )
    world = getattr(denoiser, "world", None)
    if world is None or world.name != WORLD_NAME:
        raise SourceError(
            "the generated source needs a detector; only the toy model has one offline: "
            "use --model toy (or toy-mmdit), or --data gqa / --data folder for real images"
        )
    categories = [c for c in CATEGORY_NAMES if c in world.objects]
    if len(categories) < 2:
        raise SourceError(f"the generated source needs two known shapes, the model has "
                          f"{world.objects}")
    return _generated_samples(options, per_relation("generated", options), report, denoiser,
                              categories)


def candidate_triplet(seed: int, index: int, categories: Sequence[str]) -> Triplet:
    """The prompt triplet of generated candidate `index`: relations take turns, the two shapes
    are a seeded draw, so a candidate is the same whatever the batch size or quota."""
    relation = RELATIONS[index % len(RELATIONS)]
    rng = np.random.default_rng([seed, index])
    a, b = rng.choice(len(categories), size=2, replace=False)
    return Triplet(categories[int(a)], relation, categories[int(b)])


def _verify(image: np.ndarray, t: Triplet) -> tuple[str | None, tuple | None, tuple | None]:
    """(drop reason or None, subject box, object box) under the toy detector and GenEval's rule."""
    from l2s.toy.detector import score_pair

    sc = score_pair(image, t.subject, t.relation, t.object)
    if not sc.both_present:
        return "object not detected", None, None
    if sc.fused:
        return "objects touch", None, None
    if not sc.correct:
        return "relation not verified", None, None
    a, b = sc.found[t.subject], sc.found[t.object]
    return None, tuple(float(v) for v in a.box), tuple(float(v) for v in b.box)


def _generated_samples(options: SourceOptions, counts, report: SourceReport, denoiser,
                       categories: list[str]) -> Iterator[Sample]:
    quota = _Quota(counts)
    steps, guidance = generation_defaults(
        options.generated_model or denoiser.name, options.generated_steps,
        options.generated_guidance
    )
    seed = options.seed
    tried = Counter()  # relation -> candidates generated
    index = 0
    # Candidate i asks for RELATIONS[i % 4]; a relation stops drawing candidates once its quota
    # is full or its budget spent, so ids stay tied to one prompt and one noise.
    while not quota.done():
        batch: list[tuple[int, Triplet]] = []
        while len(batch) < options.generated_batch:
            live = [r for r in RELATIONS
                    if quota.relation_open(r) and tried[r] < options.generated_candidates]
            if not live:
                break
            relation = RELATIONS[index % len(RELATIONS)]
            if relation in live:
                batch.append((index, candidate_triplet(seed, index, categories)))
                tried[relation] += 1
            index += 1
        if not batch:
            break
        prompts = [format_prompt([t], style="plain") for _, t in batch]
        latents = seeded_latents(denoiser, [seed * 10_000_019 + i for i, _ in batch])
        images = to_uint8(sample(denoiser, prompts, steps=steps, guidance=guidance,
                                 latents=latents))
        for (i, t), image in zip(batch, images, strict=True):
            reason, box_a, box_b = _verify(image, t)
            if reason is not None:
                report.dropped[reason] += 1
                continue
            split = quota.split_for(t.relation)
            if split is None:  # the batch overshot this relation's quota
                continue
            quota.take(split, t.relation)
            yield report.keep(
                Sample(
                    "generated", f"generated:{seed}:{i}", t.subject, t.object, t.relation,
                    box_a, box_b, split, image_array=image,
                )
            )
    quota.report_short(report)
