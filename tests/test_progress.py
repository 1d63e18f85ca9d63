"""Progress on stderr: one-line statuses off a terminal and with --json (done/total, rate,
ETA), --quiet and --verbose on every command."""

import json

import pytest
from typer.testing import CliRunner

from l2s import bench
from l2s.cli import app, output
from l2s.engine import loading

runner = CliRunner()


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_line_progress_says_done_total_rate_and_eta_at_most_every_interval(capsys):
    """Catches a status printed at every update (a flood in logs) or never before the end:
    the first update, then one per interval, and the completion, each with rate and ETA."""
    bars = output.LineProgress(info=lambda f: f"loss {f['loss']:.2f}", every=10.0)
    clock = bars._now = _Clock()
    task = bars.add_task("epoch", total=100, loss=1.0)
    lines = []
    for done in range(1, 101):
        clock.t = done * 0.5  # two a second
        bars.update(task, completed=done, loss=1 / done)
        lines += [x for x in capsys.readouterr().err.splitlines() if x]
    assert len(lines) == 6  # the first (0.5 s), every 10 s (10.5 ... 40.5 s), the last
    assert lines[0].startswith("epoch: 1/100 (1%), 2/s, ETA 0:50")
    assert lines[1].startswith("epoch: 21/100 (21%), 2/s, ETA 0:40, elapsed 0:10, loss 0.05")
    assert lines[-1].startswith("epoch: 100/100 (100%)")


def _oracle(monkeypatch):
    from test_bench import _oracle as make

    monkeypatch.setitem(bench.METHODS, "oracle", make()[0])


@pytest.mark.parametrize("flags", [["--json"], []])
def test_bench_off_a_terminal_tells_progress_on_stderr(monkeypatch, tmp_path, flags):
    """Catches a long bench silent in logs until it finishes, and --json switching progress
    off: stderr gets one-line statuses, stdout only the result."""
    _oracle(monkeypatch)
    monkeypatch.setattr(output, "PROGRESS_EVERY", 0.0)
    r = runner.invoke(app, ["bench", "--method", "oracle", "--prompts", "4", "--num-images",
                            "1", "--batch-size", "1", "--out", str(tmp_path), *flags])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.startswith("oracle: ")]
    assert lines[0].startswith("oracle: 0/4 (0%)")
    assert lines[-1].startswith("oracle: 4/4 (100%)") and "/s, ETA 0:00" in lines[-1]
    if flags:
        assert json.loads(r.stdout)["methods"]["oracle"]["n_images"] == 4


def test_quiet_tells_nothing_while_working_and_verbose_tells_every_step(monkeypatch,
                                                                        tmp_path):
    """Catches --quiet still printing statuses, and --verbose throttled like the default."""
    _oracle(monkeypatch)
    args = ["bench", "--method", "oracle", "--prompts", "3", "--num-images", "1",
            "--batch-size", "1", "--json"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "q"), "--quiet"])
    assert r.exit_code == 0 and "oracle:" not in r.stderr
    assert json.loads(r.stdout)["methods"]["oracle"]["n_images"] == 3
    monkeypatch.setattr(output, "PROGRESS_EVERY", 1e9)  # default: first and last only
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "d")])
    assert [x.split(",")[0] for x in r.stderr.splitlines() if x.startswith("oracle:")] == [
        "oracle: 0/3 (0%)", "oracle: 3/3 (100%)"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "v"), "--verbose"])
    assert [x.split(" (")[0] for x in r.stderr.splitlines() if x.startswith("oracle:")] == [
        "oracle: 0/3", "oracle: 1/3", "oracle: 2/3", "oracle: 3/3"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--quiet", "--verbose"])
    assert r.exit_code == 2 and "contradict" in r.output


def test_invert_and_train_with_json_tell_progress(monkeypatch, tmp_path, den):
    """Catches invert and train silent off a terminal (and with --json) until they end."""
    monkeypatch.setattr(loading, "load_backbone", lambda *a, **k: den)
    monkeypatch.setattr(output, "PROGRESS_EVERY", 0.0)
    r = runner.invoke(app, ["invert", "--data", "shapes", "--cache-dir", str(tmp_path),
                            "--limit", "32", "--per-relation", "4,2,2", "--inversion", "noise",
                            "--steps", "10", "--timesteps", "2,9", "--json"])
    assert r.exit_code == 0, r.output
    assert any(x.startswith("shapes: ") and "written" in x for x in r.stderr.splitlines())
    json.loads(r.stdout)
    r = runner.invoke(app, ["train", "--cache-dir", str(tmp_path), "--epochs", "2", "--split",
                            "recorded", "--out", str(tmp_path / "clf"), "--json"])
    assert r.exit_code == 0, r.output
    epochs = [x for x in r.stderr.splitlines() if x.startswith("epoch ")]
    assert epochs and "train loss" in epochs[-1] and "/2 (" in epochs[-1]


@pytest.mark.parametrize("command", ["steer", "invert", "train", "bench", "speed", "models",
                                     "doctor", "classifier import"])
def test_every_command_takes_quiet_and_verbose(command):
    r = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--quiet" in r.output and "--verbose" in r.output


def test_a_long_unit_still_gets_a_status_line_on_a_timer(monkeypatch, capsys):
    """Catches a log silent during one long unit (a bench batch, an inversion batch): the
    status lines came only with updates; now the last one is told again every
    HEARTBEAT_EVERY seconds until the display stops, and never after."""
    import time

    monkeypatch.setattr(output, "HEARTBEAT_EVERY", 0.05)
    with output.LineProgress(every=10.0) as bars:
        task = bars.add_task("bench", total=4)
        bars.update(task, completed=1)
        time.sleep(0.6)  # one long unit: no update
    lines = [x for x in capsys.readouterr().err.splitlines() if x]
    assert lines[0].startswith("bench: 1/4 (25%)") and "still working" not in lines[0]
    assert len(lines) >= 3 and all(x.startswith("bench: 1/4 (25%)") and
                                   x.endswith("(still working)") for x in lines[1:])
    time.sleep(0.2)
    assert capsys.readouterr().err == ""  # stopped with the display
    with output._LineStatus("training"):
        time.sleep(0.6)
    lines = [x for x in capsys.readouterr().err.splitlines() if x]
    assert lines and lines[0].startswith("training (still working, elapsed 0:00)")
