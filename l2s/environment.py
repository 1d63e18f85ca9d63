"""The environment l2s runs in, as one JSON-ready report (`l2s doctor` renders it)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

# The ranges pyproject.toml pins and the tests ran with.
TESTED = {"torch": "2.4 - 2.14", "diffusers": "0.42.x", "transformers": "5.x",
          "accelerate": "1.x"}


# Past 4 threads the models l2s runs on a CPU gain little, and each extra thread is one more
# to wait for at every OpenMP barrier when other jobs share the cores.
MAX_DEFAULT_THREADS = 4


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's
    share), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def default_threads() -> int:
    """The torch CPU threads l2s uses when ``--threads`` is not given: the usable CPUs (at
    most 4) less the machine's 1-minute load average (rounded), at least 1.

    torch's own default (one thread per core) collapses when other jobs keep the cores busy:
    its threads spin at every OpenMP barrier waiting for one that is descheduled (`make demo`
    on a 2-core machine at load 6: 91 s with 2 threads, 17-30 s with 1).
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        load = 0.0
    cpus = usable_cpus()
    return max(1, min(cpus, MAX_DEFAULT_THREADS, round(cpus - load)))


def environment_report() -> dict:
    """Python, torch/device, library versions, HF cache and the locally usable presets."""
    import torch

    from l2s.bench.detectors import describe_detectors
    from l2s.classifier.model import describe_models
    from l2s.engine.backbone import BackboneError
    from l2s.engine.loading import hf_cache_dir, hf_offline, resolve_device

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    try:
        selected, problem = str(resolve_device()), None
    except BackboneError as e:
        selected, problem = None, str(e)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "l2s_device": os.environ.get("L2S_DEVICE"),  # the override, if set
        "selected_device": selected,  # what l2s commands will run on
        "device_problem": problem,  # why the override cannot be used
        "packages": {p: {"installed": version(p), "tested": r} for p, r in TESTED.items()},
        "hf_cache": str(hf_cache_dir()),
        "hf_offline": hf_offline(),
        "models": {m["name"]: {"available": m["available"], "classifier": m["classifier"]}
                   for m in describe_models()},
        # `l2s bench` detectors and GenEval's colour model: loadable with no network?
        "detectors": describe_detectors(),
    }
