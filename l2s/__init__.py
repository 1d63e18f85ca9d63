"""l2s: Learn-to-Steer spatial relations in text-to-image diffusion models (WACV 2026).

The Python API mirrors the CLI; each job takes a frozen config and returns a result object:

    from l2s import steer, SteerConfig
    result = steer(SteerConfig("a circle to the left of a square", num_images=4))

``steer``, ``invert`` and ``train`` are functions (their modules are ``l2s.jobs.*``);
``l2s.bench`` is the benchmark package, whose job is ``run_bench``.
"""

__version__ = "0.1.0"

# name -> (module, attribute); imported on first use so `import l2s` stays light. No name here
# may also be a submodule of l2s: importing the submodule would rebind the package attribute
# (tests/test_api.py checks this in a fresh interpreter).
_API = {
    "steer": ("l2s.steering.job", "steer"),
    "SteerConfig": ("l2s.steering.job", "SteerConfig"),
    "invert": ("l2s.inversion.job", "run_invert"),
    "InvertConfig": ("l2s.inversion.job", "InvertConfig"),
    "train": ("l2s.classifier.train", "run_train"),
    "TrainConfig": ("l2s.classifier.train", "TrainConfig"),
    "run_bench": ("l2s.bench.run", "run_bench"),
    "BenchConfig": ("l2s.bench.run", "BenchConfig"),
    "load_backbone": ("l2s.engine.loading", "load_backbone"),
    "parse": ("l2s.relations", "parse"),
    "steering_callback": ("l2s.steering.pipeline", "steering_callback"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'l2s' has no attribute {name!r}")
