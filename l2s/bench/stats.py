"""Summaries of scored images: per-task accuracy, GenEval's overall score, paired bootstrap.

GenEval's summary_scores.py averages images per task (tag) and the overall score is the mean of
the task accuracies; we do the same, per method. Methods run on the same prompts and seeds, so
they are compared per prompt: the difference of the overall scores with a 95% percentile
bootstrap interval, prompts resampled within each task.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def task_accuracy(records: list[dict]) -> dict[str, float]:
    """Mean image score per task tag, tags in order of first appearance."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_task[r["tag"]].append(float(r["score"]))
    return {tag: float(np.mean(v)) for tag, v in by_task.items()}


def summarise(records: list[dict]) -> dict:
    """One method's numbers: n_images, tasks, overall (mean of tasks), and the suite's extras:
    position_accuracy (an image counts when every relation it asks for holds), relation_accuracy
    (share of single relations that hold) with position_ci95 (its 95% Wilson interval),
    both_present and fused (the toy world)."""
    n = len(records)
    out: dict = {"n_images": n}
    if n == 0:
        return out
    tasks = task_accuracy(records)
    out["tasks"] = tasks
    out["overall"] = float(np.mean(list(tasks.values())))
    if "both_present" in records[0]:
        out["both_present"] = sum(r["both_present"] for r in records) / n
    relational = [r for r in records if _relations(r)]
    if relational:
        out["position_accuracy"] = sum(r["correct"] for r in relational) / len(relational)
        out["position_ci95"] = wilson_interval(out["position_accuracy"], len(relational))
    if "fused" in records[0]:
        out["fused"] = sum(r["fused"] for r in records) / n
    held = [h for r in records for h in r.get("relations_held", [])]
    if held:
        out["relation_accuracy"] = sum(held) / len(held)
    return out


def wilson_interval(p: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a proportion ``p`` measured on ``n`` images (Wilson,
    1927): never outside [0, 1], and not of width 0 at p = 0 or 1 as the normal one is."""
    if n <= 0:
        return [0.0, 1.0]
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def verifier_summary(records: list[dict]) -> dict:
    """How a search method's verifier agreed with the benchmark's judge, over the images whose
    records hold the search ("best_of": the verifier's p per candidate, the kept one) and
    every candidate's verdict under the judge ("candidates_correct"); {} for other methods.

    verifier_accuracy: share of all candidates where the verifier's verdict (p >= 0.5 that
    every relation holds) equals the judge's. Under "verifier": the same, candidates and
    images counted, chosen_correct (the judge accepts the kept candidate), oracle (it accepts
    at least one candidate: what a perfect verifier would keep), first_correct (it accepts
    candidate 0, plain's image), random_pick (the mean share of accepted candidates: a blind
    pick), picked_when_possible (chosen_correct among the images where oracle holds).
    """
    rows = [r for r in records if (r.get("best_of") or {}).get("p") is not None
            and r.get("candidates_correct") is not None]
    if not rows:
        return {}
    agree = [(p >= 0.5) == ok for r in rows
             for p, ok in zip(r["best_of"]["p"], r["candidates_correct"], strict=True)]
    chosen = [r["candidates_correct"][r["best_of"]["chosen"]] for r in rows]
    possible = [any(r["candidates_correct"]) for r in rows]
    n = len(rows)
    picked = [c for c, ok in zip(chosen, possible, strict=True) if ok]
    acc = sum(agree) / len(agree)
    return {"verifier_accuracy": acc,
            "verifier": {"verifier_accuracy": acc, "candidates": len(agree), "images": n,
                         "chosen_correct": sum(chosen) / n, "oracle": sum(possible) / n,
                         "first_correct": sum(r["candidates_correct"][0] for r in rows) / n,
                         "random_pick": float(np.mean([np.mean(r["candidates_correct"])
                                                       for r in rows])),
                         "picked_when_possible": sum(picked) / len(picked) if picked else None}}


def _relations(record: dict) -> bool:
    """Whether an image's prompt asks for a relation (GenEval position tags, multi tags)."""
    return record["tag"] == "position" or "relations_held" in record


def per_prompt(records: list[dict]) -> dict[int, tuple[str, float]]:
    """prompt index -> (task, mean image score)."""
    acc: dict[int, list[float]] = defaultdict(list)
    tags = {}
    for r in records:
        acc[r["prompt_index"]].append(float(r["score"]))
        tags[r["prompt_index"]] = r["tag"]
    return {i: (tags[i], float(np.mean(v))) for i, v in acc.items()}


def paired_difference(method: list[dict], baseline: list[dict], seed: int = 0,
                      samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """Overall score of `method` minus `baseline` on the prompts both scored, with a 95%
    bootstrap interval: prompts resampled with replacement within each task, overall score =
    mean over tasks of the mean prompt score (= GenEval's image mean with equal images/prompt)."""
    a, b = per_prompt(method), per_prompt(baseline)
    common = sorted(set(a) & set(b))
    if not common:
        return {"difference": None, "ci95": None, "n_prompts": 0}
    tasks = sorted({a[i][0] for i in common})
    diffs = [np.array([a[i][1] - b[i][1] for i in common if a[i][0] == t]) for t in tasks]
    point = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    boots = np.zeros(samples)
    for d in diffs:
        picks = rng.integers(0, len(d), size=(samples, len(d)))  # (samples, n_task_prompts)
        boots += d[picks].mean(1)
    boots /= len(diffs)
    low, high = np.percentile(boots, [2.5, 97.5])
    return {"difference": point, "ci95": [float(low), float(high)], "n_prompts": len(common)}
