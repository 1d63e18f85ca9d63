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
    (share of single relations that hold), both_present and fused (the toy world)."""
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
    if "fused" in records[0]:
        out["fused"] = sum(r["fused"] for r in records) / n
    held = [h for r in records for h in r.get("relations_held", [])]
    if held:
        out["relation_accuracy"] = sum(held) / len(held)
    return out


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
