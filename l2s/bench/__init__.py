"""Benchmarks: prompt suites, detectors, GenEval's scorer, resumable runs and their summaries.

Modules: `suites` (prompts + metadata), `geneval` (the pure scorer), `detectors` /
`hf_detectors` / `colors` (detection and colour), `scoring` (one image's verdict), `methods`
(the registry of generation methods), `store` (files, resume, shards), `stats` (summaries,
bootstrap), `sheets` (contact sheets), `run` (the job).
"""

from l2s.bench.geneval import Detection, GenevalScore, score
from l2s.bench.methods import METHODS, MethodContext, register_method
from l2s.bench.run import BenchConfig, BenchResult, image_seed, run_bench
from l2s.bench.scoring import score_shapes
from l2s.bench.suites import SUITES, BenchError, BenchPrompt, shapes_prompts, suite_prompts

__all__ = ["METHODS", "SUITES", "BenchConfig", "BenchError", "BenchPrompt", "BenchResult",
           "Detection", "GenevalScore", "MethodContext", "image_seed", "register_method",
           "run_bench", "score", "score_shapes", "shapes_prompts", "suite_prompts"]
