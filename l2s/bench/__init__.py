"""Benchmarks: prompt suites, detectors, GenEval's scorer, resumable runs and their summaries.

Modules: `suites` (prompts + metadata), `geneval` (the pure scorer), `detectors` /
`hf_detectors` / `colors` (detection and colour), `scoring` (one image's verdict), `methods`
(the registry of generation methods), `store` (files, resume, shards), `stats` (summaries,
bootstrap), `sheets` (contact sheets), `run` (the job).
"""

from l2s.bench.geneval import Detection, GenevalScore, score
from l2s.bench.methods import METHOD_ARGUMENTS, METHODS, MethodContext, register_method
from l2s.bench.run import BenchConfig, BenchResult, image_seed, run_bench
from l2s.bench.scoring import score_relation
from l2s.bench.suites import (
    BenchError,
    BenchPrompt,
    Suite,
    register_suite,
    suite_names,
    suite_prompts,
)

__all__ = ["METHOD_ARGUMENTS", "METHODS", "SUITES", "BenchConfig", "BenchError", "BenchPrompt",
           "BenchResult",
           "Detection", "GenevalScore", "MethodContext", "Suite", "image_seed",
           "register_method", "register_suite", "run_bench", "score", "score_relation",
           "suite_names", "suite_prompts"]


def __getattr__(name: str):
    if name == "SUITES":  # the names, once every suite has registered
        return suite_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
