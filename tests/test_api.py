"""What a fresh interpreter sees: `from l2s import steer` gives the function, and importing the
Flux helpers prints no third-party warning. Both checks run in one subprocess (starting an
interpreter and importing torch is most of their cost); each has its own test."""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import l2s

ROOT = Path(__file__).resolve().parents[1]
MARK = "=== l2s fresh-interpreter check:"

# Each part prints its result on stdout and a marker on stderr, so a test reads only its part.
# The API part runs first, while the interpreter is fresh: nothing of l2s imported yet.
_PARTS = {
    "api": (
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
        "print('ok')\n"
    ),
    "flux_sigmas": (
        "from l2s.families.mmdit import pipeline_sigmas\n"
        "print(len(pipeline_sigmas({}, 4, 16, flux=True)))\n"
    ),
}


def _script() -> str:
    lines = ["import sys, traceback"]
    for name, code in _PARTS.items():
        lines += [f"print({MARK + ' ' + name!r}, flush=True)",
                  f"print({MARK + ' ' + name!r}, file=sys.stderr, flush=True)",
                  "try:", *("    " + c for c in code.splitlines()),
                  "except Exception:", "    traceback.print_exc()", "    print('FAILED')"]
    return "\n".join(lines) + "\n"


def _split(text: str) -> dict[str, str]:
    parts, name = {}, None
    for line in text.splitlines():
        if line.startswith(MARK):
            name = line[len(MARK):].strip()
            parts[name] = ""
        elif name is not None:
            parts[name] += line + "\n"
    return parts


@pytest.fixture(scope="module")
def fresh():
    """One fresh interpreter running every part: {part: (stdout, stderr)}."""
    res = subprocess.run([sys.executable, "-c", _script()], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr
    out, err = _split(res.stdout), _split(res.stderr)
    assert set(out) == set(_PARTS), res.stdout + res.stderr  # every part ran
    return {name: (out[name], err.get(name, "")) for name in _PARTS}


def test_no_exported_name_is_also_a_submodule():
    # Importing l2s.<name> rebinds the package attribute <name> to the module: an exported
    # function of that name would then resolve to the module (the old `l2s.steer` clash).
    submodules = {m.name for m in pkgutil.iter_modules(l2s.__path__)}
    assert not submodules & set(l2s.__all__)


def test_api_names_resolve_to_functions_in_a_fresh_interpreter(fresh):
    """Catches an exported job shadowed by a submodule of the same name, a job exported under
    two schemes (run_x for some, x for others) without its alias, and a missing `speed`; a
    fresh interpreter, since pytest's own imports would hide a shadowed name here."""
    out, err = fresh["api"]
    assert out.strip() == "ok", out + err


def test_flux_sigmas_print_no_transformers_warning(fresh):
    # Was, on every toy-mmdit / Flux run without torchvision: two "[transformers]
    # `CLIPImageProcessor` requires torchvision" lines, from importing FluxPipeline's module.
    # The whole interpreter's stderr is checked: the API part may import that module first.
    out, err = fresh["flux_sigmas"]
    whole = "".join(e for _, e in fresh.values())
    assert out.strip() == "4", out + err
    assert "torchvision" not in whole, whole
