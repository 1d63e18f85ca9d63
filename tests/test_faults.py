"""Fault injection: a disk that fills up (or turns read-only) at the N-th write, and damaged
output files, against invert, train, bench and steer (fixtures ``full_disk`` and ``corrupt``,
``tests/faults.py``). Each must end in one line naming the file and its folder, leave no
empty or half-written file, and lose nothing a rerun cannot finish."""

import errno
import json
import re

import pytest
from faults import files_of
from typer.testing import CliRunner

from l2s.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
PROMPT = "a circle to the left of a square"


def _one_line_write_error(r, folder) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    text = re.sub(r"\s+", " ", r.output)
    assert "error: cannot write" in text and str(folder) in text, r.output


def _no_empty_or_temporary_files(folder) -> None:
    files = files_of(folder)
    assert not [p for p in files if p.stat().st_size == 0], files
    assert not [p for p in files if p.name.startswith(".tmp-")], files


def _count_writes(full_disk, invoke) -> int:
    full_disk.arm(10**9)
    r = invoke()
    assert r.exit_code == 0, r.output
    n = full_disk.writes
    full_disk.disarm()
    return n


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_steer_on_a_full_disk_ends_in_one_line_and_no_empty_png(tmp_path, full_disk, error):
    """Catches steer ending in an `OSError: [Errno 28]` traceback after generating, with a
    0-byte attention PNG and no report left behind."""
    args = ["steer", PROMPT, "--steps", "4", "--steer-until", "3", "--num-images", "2",
            "--save-attention"]
    total = _count_writes(full_disk, lambda: runner.invoke(
        app, [*args, "--out", str(tmp_path / "clean")]))
    assert total >= 5  # config.yaml, two images, two attention figures, report.json
    for n in (2, total):  # an image; the report, last
        out = tmp_path / f"full-{n}"
        full_disk.arm(n, error)
        r = runner.invoke(app, [*args, "--out", str(out)])
        full_disk.disarm()
        _one_line_write_error(r, out)
        _no_empty_or_temporary_files(tmp_path / f"full-{n}")


def test_bench_on_a_full_disk_ends_in_one_line_and_the_rerun_finishes(tmp_path, full_disk):
    """Catches bench ending in a traceback on a full disk, and a rerun that scores an image
    twice or never."""
    out = tmp_path / "b"
    args = ["bench", "--method", "plain", "--prompts", "3", "--images", "1", "--steps", "4"]
    total = _count_writes(full_disk, lambda: runner.invoke(
        app, [*args, "--out", str(tmp_path / "clean")]))
    clean = [json.loads(x) for x in (tmp_path / "clean" / "results.jsonl").read_text()
             .splitlines()]
    full_disk.arm(total // 2)
    r = runner.invoke(app, [*args, "--out", str(out)])
    full_disk.disarm()
    _one_line_write_error(r, out)
    _no_empty_or_temporary_files(out)
    r = runner.invoke(app, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    got = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    key = lambda rec: (rec["prompt_index"], rec["seed"], rec["correct"])  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, clean))


def test_invert_on_a_full_disk_ends_in_one_line_and_the_rerun_finishes(tmp_path, full_disk):
    """Catches invert ending in an `OSError: [Errno 28]` traceback, and a cache left with an
    entry the rerun does not rebuild."""
    args = ["invert", "--data", "shapes", "--limit", "3", "--steps", "10", "--timesteps",
            "2,5,9", "--inversion", "noise", "--json"]
    total = _count_writes(full_disk, lambda: runner.invoke(
        app, [*args, "--cache-dir", str(tmp_path / "clean")]))
    clean = json.loads(runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "clean")]
                                     ).stdout)["stats"]
    cache = tmp_path / "c"
    full_disk.arm(total // 2)
    r = runner.invoke(app, [*args, "--cache-dir", str(cache)])
    full_disk.disarm()
    _one_line_write_error(r, cache)
    _no_empty_or_temporary_files(cache)
    r = runner.invoke(app, [*args, "--cache-dir", str(cache)])
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)["stats"]
    assert (stats["entries"], stats["images"], stats["by_relation"]) == \
        (clean["entries"], clean["images"], clean["by_relation"])


def test_train_on_a_full_disk_ends_in_one_line_and_the_rerun_finishes(tmp_path, full_disk,
                                                                      monkeypatch):
    """Catches train ending in a traceback when its checkpoint or card cannot be written."""
    from test_train import _cli, make_cache

    train_app = _cli(monkeypatch)
    make_cache(tmp_path / "cache", n_images=24)
    args = ["--cache-dir", str(tmp_path / "cache"), "--model", "synthetic", "--epochs", "2",
            "--d-model", "32", "--depth", "1", "--device", "cpu"]
    total = _count_writes(full_disk, lambda: runner.invoke(
        train_app, [*args, "--out", str(tmp_path / "clean")]))
    out = tmp_path / "clf"
    for n in (2, total):  # a checkpoint; the card, last
        full_disk.arm(n)
        r = runner.invoke(train_app, [*args, "--out", str(out)])
        full_disk.disarm()
        _one_line_write_error(r, out)
        _no_empty_or_temporary_files(out)
    r = runner.invoke(train_app, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "card.json").is_file()


@pytest.mark.parametrize("how", ["flip", "truncate", "zero", "delete"])
def test_a_damaged_cache_entry_is_rebuilt_by_the_next_invert(tmp_path, corrupt, how):
    """Catches a damaged entry (a bit flipped in its header or tensor, cut, zeroed, deleted)
    that invert keeps or train trains on."""
    args = ["invert", "--data", "shapes", "--limit", "3", "--steps", "10", "--timesteps",
            "2,5,9", "--inversion", "noise", "--json", "--cache-dir", str(tmp_path)]
    first = json.loads(runner.invoke(app, args).stdout)
    corrupt(tmp_path, 1, how, "maps/*/*.safetensors")
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["written"] == 1 and again["stats"]["entries"] == first["stats"]["entries"]
    assert again["corrupt_rebuilt"] == (0 if how == "delete" else 1)


@pytest.mark.parametrize(("pattern", "how"), [("samples/*.png", "flip"),
                                              ("samples/*.png", "truncate"),
                                              ("samples/*.png", "delete"),
                                              ("results.jsonl", "zero"),
                                              ("results.jsonl", "flip"),
                                              ("results.jsonl", "truncate"),
                                              ("plain/results.jsonl", "zero"),
                                              ("plain/results.jsonl", "flip"),
                                              ("plain/results.jsonl", "truncate"),
                                              ("plain/results.jsonl", "delete")])
def test_a_damaged_bench_file_is_regenerated_by_the_rerun(tmp_path, corrupt, pattern, how):
    """Catches a damaged image or results file (the pooled <out>/results.jsonl or a method's
    GenEval <out>/<method>/results.jsonl) sticking a benchmark (a traceback on every rerun),
    counting an image twice, or left damaged for GenEval's summary_scores.py."""
    args = ["bench", "--method", "plain", "--prompts", "3", "--images", "1", "--steps", "4",
            "--json", "--out", str(tmp_path)]
    first = json.loads(runner.invoke(app, args).stdout)
    geneval = (tmp_path / "plain" / "results.jsonl").read_bytes()
    if pattern == "results.jsonl":  # the pooled file (rglob also finds plain/results.jsonl)
        n = files_of(tmp_path, pattern).index(tmp_path / "results.jsonl")
    else:
        n = 1 if pattern.endswith(".png") else 0
    corrupt(tmp_path, n, how, pattern)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["complete"] and again["methods"]["plain"]["n_images"] == 3
    assert again["methods"]["plain"]["overall"] == first["methods"]["plain"]["overall"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    method_file = (tmp_path / "plain" / "results.jsonl").read_bytes()
    assert [json.loads(x) for x in method_file.splitlines()] == \
        [json.loads(x) for x in geneval.splitlines()]


@pytest.mark.parametrize("how", ["flip", "truncate", "zero"])
def test_a_damaged_train_checkpoint_is_refused_and_fresh_starts_over(tmp_path, monkeypatch,
                                                                     full_disk, corrupt, how):
    """Catches a damaged checkpoint resumed silently (a flipped weight bit) or failing in a
    traceback; the checkpoint is left by a run the full disk stopped before its card."""
    from test_train import _cli, make_cache

    train_app = _cli(monkeypatch)
    make_cache(tmp_path / "cache", n_images=24)
    out = tmp_path / "clf"
    args = ["--cache-dir", str(tmp_path / "cache"), "--model", "synthetic", "--epochs", "2",
            "--d-model", "32", "--depth", "1", "--device", "cpu", "--out", str(out)]
    for n in range(2, 10):  # the first write that fails after a checkpoint was saved
        full_disk.arm(n)
        assert runner.invoke(train_app, args).exit_code == 2
        full_disk.disarm()
        if (out / "train-checkpoint.safetensors").exists():
            break
    corrupt(out, 0, how, "train-checkpoint.safetensors")
    r = runner.invoke(train_app, args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "--fresh" in r.output and "train-checkpoint.safetensors" in r.output
    r = runner.invoke(train_app, [*args, "--fresh"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("how", ["zero", "delete"])
def test_a_damaged_steer_config_is_a_one_line_error(tmp_path, corrupt, how):
    """Catches `steer --config out/config.yaml` (the file that repeats a run) failing in a
    traceback once damaged."""
    out = tmp_path / "o"
    r = runner.invoke(app, ["steer", PROMPT, "--steps", "4", "--steer-until", "3",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    config = corrupt(out, 0, how, "config.yaml")
    r = runner.invoke(app, ["steer", "--config", str(config), PROMPT])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "config file" in r.output
