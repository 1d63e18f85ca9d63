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
    code = (
        "import types\n"
        "from l2s import steer, SteerConfig, invert, train, run_bench\n"
        "import l2s, l2s.steering.job, l2s.inversion.job, l2s.classifier.train, l2s.bench\n"
        "for f in (steer, invert, train, run_bench, l2s.steer, l2s.invert, l2s.train):\n"
        "    assert callable(f) and not isinstance(f, types.ModuleType), f\n"
        "assert steer is l2s.steering.job.steer and invert is l2s.inversion.job.run_invert\n"
        "assert train is l2s.classifier.train.run_train and run_bench is l2s.bench.run_bench\n"
        "assert isinstance(l2s.bench, types.ModuleType)\n"
        "assert SteerConfig('a circle to the left of a square').model == 'toy'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr
