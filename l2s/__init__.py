"""l2s: Learn-to-Steer spatial relations in text-to-image diffusion models (WACV 2026).

The Python API mirrors the CLI: each job is named for its command, takes a frozen config and
returns a typed result.

    from l2s import steer, SteerConfig
    result = steer(SteerConfig("a circle to the left of a square", num_images=4))

    command       job                  config -> result
    l2s steer     steer                SteerConfig -> SteerResult (PIL images, report.json)
    l2s invert    invert               InvertConfig -> InvertResult (counts, cache stats)
    l2s train     train                TrainConfig -> TrainResult (card, metrics)
    l2s bench     benchmark            BenchConfig -> BenchResult (summary per method)
    l2s speed     speed                SpeedConfig -> SpeedResult (times, ratios)
    l2s distill   distillation         DistillConfig -> DistillResult (LoRA folder, card)
    l2s doctor    environment_report   -> dict (JSON-ready)

invert and train write the run's options as config.yaml beside their outputs
(``TrainConfig.from_yaml(path)`` or ``l2s train --config path`` repeat it); speed writes its
report to ``SpeedConfig.out``. The bench job is ``benchmark``: ``l2s.bench`` is the benchmark
package; the distill job is ``distillation`` (``l2s.distill`` is its package). ``run_invert``,
``run_train``, ``run_bench`` and ``run_speed`` are the jobs' former names, kept as aliases.
"""

__version__ = "0.1.0"

# name -> (module, attribute); imported on first use so `import l2s` stays light. No name here
# may also be a submodule of l2s: importing the submodule would rebind the package attribute
# (tests/test_api.py checks this in a fresh interpreter).
_API = {
    "steer": ("l2s.steering.job", "steer"),
    "SteerConfig": ("l2s.steering.job", "SteerConfig"),
    "SteerOptions": ("l2s.steering.options", "SteerOptions"),
    "SteerResult": ("l2s.steering.job", "SteerResult"),
    "invert": ("l2s.inversion.job", "invert"),
    "InvertConfig": ("l2s.inversion.job", "InvertConfig"),
    "InvertResult": ("l2s.inversion.job", "InvertResult"),
    "train": ("l2s.classifier.train", "train"),
    "TrainConfig": ("l2s.classifier.train", "TrainConfig"),
    "TrainResult": ("l2s.classifier.train", "TrainResult"),
    "benchmark": ("l2s.bench.run", "run_bench"),
    "BenchConfig": ("l2s.bench.run", "BenchConfig"),
    "BenchResult": ("l2s.bench.run", "BenchResult"),
    "speed": ("l2s.steering.speed", "speed"),
    "SpeedConfig": ("l2s.steering.speed", "SpeedConfig"),
    "SpeedResult": ("l2s.steering.speed", "SpeedResult"),
    "distillation": ("l2s.distill.job", "distill"),
    "DistillConfig": ("l2s.distill.job", "DistillConfig"),
    "DistillResult": ("l2s.distill.job", "DistillResult"),
    "environment_report": ("l2s.environment", "environment_report"),
    "load_backbone": ("l2s.engine.loading", "load_backbone"),
    "parse": ("l2s.relations", "parse"),
    "steering_callback": ("l2s.steering.pipeline", "steering_callback"),
    "L2SError": ("l2s.errors", "L2SError"),
    # the former names
    "run_invert": ("l2s.inversion.job", "invert"),
    "run_train": ("l2s.classifier.train", "train"),
    "run_bench": ("l2s.bench.run", "run_bench"),
    "run_speed": ("l2s.steering.speed", "speed"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'l2s' has no attribute {name!r}")
