"""The CLI through typer's runner: help, version, models and doctor."""

import json

import pytest
from typer.testing import CliRunner

from l2s import __version__
from l2s.cli import app

runner = CliRunner()


def test_help_and_version():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "models" in r.output and "doctor" in r.output
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_models_json_lists_presets_with_availability():
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert {"toy", "sd1.4", "sd2.1"} <= set(rows)
    assert rows["sd2.1"]["available"] is False  # offline, empty HF cache
    assert rows["sd2.1"]["repo_id"] == "stabilityai/stable-diffusion-2-1"
    assert "classifier" in rows["toy"]
    # What --steps, --steer-until ... default to per model (their --help points here).
    assert rows["toy"]["defaults"]["steer_until"] == 5
    assert rows["sd1.4"]["defaults"]["step_size"] == 7.5


def test_doctor_json_reports_versions_and_offline_mode():
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0
    rep = json.loads(r.stdout)
    assert rep["hf_offline"] is True
    assert rep["packages"]["diffusers"]["installed"].startswith("0.42")
    assert set(rep["models"]) >= {"toy", "sd2.1"}
    # bench detectors: the toy ships; the hub ones are not in the (empty) test cache
    assert rep["detectors"]["toy"]["available"] and not rep["detectors"]["mask2former"]["available"]
    r = runner.invoke(app, ["doctor"])
    assert "detector mask2former" in r.output and "hf download" in r.output


def test_threads_option_sets_torch_threads():
    import torch

    n = torch.get_num_threads()
    try:
        r = runner.invoke(app, ["--threads", "1", "models", "--json"])
        assert r.exit_code == 0 and torch.get_num_threads() == 1
        r = runner.invoke(app, ["--threads", "0", "models"])
        assert r.exit_code == 2 and "--threads" in r.output
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("cpus,load,want", [(2, 6.0, 1), (2, 0.3, 2), (16, 0.0, 4),
                                            (16, 13.5, 2), (4, 1.2, 3)])
def test_default_threads_leave_room_for_the_load(monkeypatch, cpus, load, want):
    """Bug: torch's one-thread-per-core default made `make demo` 5x slower than --threads 1
    on a loaded 2-core machine; the default now subtracts the load and caps at 4."""
    import os

    from l2s.environment import default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert default_threads() == want


def test_no_threads_option_takes_the_load_aware_default(monkeypatch):
    """Bug: without --threads the CLI left torch's default (every core) on a loaded machine;
    OMP_NUM_THREADS, when set, still wins."""
    import os

    import torch

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert runner.invoke(app, ["models", "--json"]).exit_code == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert runner.invoke(app, ["models", "--json"]).exit_code == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
