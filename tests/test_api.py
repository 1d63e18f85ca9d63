"""The top-level API: `from l2s import steer` gives the function, in a fresh interpreter."""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import l2s

ROOT = Path(__file__).resolve().parents[1]


def test_no_exported_name_is_also_a_submodule():
    # Importing l2s.<name> rebinds the package attribute <name> to the module: an exported
    # function of that name would then resolve to the module (the old `l2s.steer` clash).
    submodules = {m.name for m in pkgutil.iter_modules(l2s.__path__)}
    assert not submodules & set(l2s.__all__)


def test_api_names_resolve_to_functions_in_a_fresh_interpreter():
    """Catches an exported job shadowed by a submodule of the same name, a job exported under
    two schemes (run_x for some, x for others) without its alias, and a missing `speed`."""
    code = (
        "import types\n"
        "from l2s import steer, SteerConfig, invert, train, benchmark, speed, run_bench\n"
        "from l2s import run_invert, run_train, run_speed, environment_report\n"
        "import l2s, l2s.steering.job, l2s.inversion.job, l2s.classifier.train, l2s.bench\n"
        "import l2s.steering.speed, l2s.environment\n"
        "for f in (steer, invert, train, benchmark, speed, l2s.steer, l2s.invert, l2s.train,\n"
        "          l2s.benchmark, l2s.speed, l2s.environment_report):\n"
        "    assert callable(f) and not isinstance(f, types.ModuleType), f\n"
        "assert steer is l2s.steering.job.steer and invert is l2s.inversion.job.invert\n"
        "assert train is l2s.classifier.train.train and benchmark is l2s.bench.run_bench\n"
        "assert speed is l2s.steering.speed.speed\n"
        "assert (run_invert, run_train, run_bench, run_speed) == \\\n"
        "    (invert, train, benchmark, speed)\n"
        "assert l2s.inversion.job.run_invert is invert\n"
        "assert l2s.classifier.train.run_train is train\n"
        "assert isinstance(l2s.bench, types.ModuleType)\n"
        "assert SteerConfig('a circle to the left of a square').model == 'toy'\n"
        "import typing\n"
        "for job, result in ((invert, 'InvertResult'), (train, 'TrainResult'),\n"
        "                    (speed, 'SpeedResult'), (steer, 'SteerResult')):\n"
        "    hint = typing.get_type_hints(job)['return']\n"
        "    assert hint is getattr(l2s, result), (job, hint)  # typed, and exported\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr
