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

from l2s import locks
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


# --- the matrix: invert, train, bench and steer x a full disk and a damaged output file ---
# Each case: the fault ends in one line (no traceback), nothing written before is lost, and
# the same command run again (the disk freed; the file left damaged) ends with the results of
# an undisturbed run. The first, a middle and the last write / file of each command; those
# beyond one per command and fixture are marked slow.
COMMANDS = {
    "invert": ["invert", "--data", "shapes", "--limit", "3", "--steps", "10", "--timesteps",
               "2,5,9", "--inversion", "noise", "--json", "--cache-dir"],
    "bench": ["bench", "--method", "plain", "--method", "l2s", "--prompts", "2", "--images",
              "1", "--steps", "4", "--json", "--out"],
    "steer": ["steer", PROMPT, "--steps", "4", "--steer-until", "3", "--num-images", "2",
              "--save-attention", "--json", "--out"],
    "train": ["--model", "synthetic", "--epochs", "2", "--d-model", "32", "--depth", "1",
              "--device", "cpu", "--out"],
}
# What differs between two undisturbed runs: the machine's timings (and a plot of them), the
# paths of the run's own folder
TIMINGS = {"seconds", "cpu_seconds", "check", "created", "out", "cache_dir", "l2s-seconds",
           "l2s-cpu-seconds"}
UNCOMPARED = {"frontier.png", "report.json"}  # timings only (steer's images are compared)


def _canonical(value):
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


# A cache entry rebuilt alone (its image's other prompts were already written) is recorded
# in a smaller batch than in one run: its fp16 maps may differ by float rounding (measured:
# at most 1.5e-5 on values in [0, 1]). Everything else must be bit for bit the same.
MAPS_ATOL = 1e-4


def _differences(got, want, path: str = "") -> list[str]:
    """Where ``got`` differs from ``want`` (each a nest of dicts, lists and tensors)."""
    import torch

    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}/{k}: missing" for k in want.keys() - got.keys()]
        out += [f"{path}/{k}: not in an undisturbed run" for k in got.keys() - want.keys()]
        for k in sorted(want.keys() & got.keys()):
            out += _differences(got[k], want[k], f"{path}/{k}")
        return out
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor):
        if want.dtype != got.dtype or want.shape != got.shape:
            return [f"{path}: {got.dtype} {tuple(got.shape)} != {want.dtype} "
                    f"{tuple(want.shape)}"]
        atol = MAPS_ATOL if "/maps/" in path else 0.0
        gap = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
        return [] if gap <= atol else [f"{path}: tensors differ by up to {gap}"]
    if isinstance(want, tuple | list) and isinstance(got, tuple | list) and \
            len(want) == len(got) and any(isinstance(w, dict) for w in want):
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True))
                for d in _differences(g, w, f"{path}[{i}]")]
    return [] if got == want else [f"{path}: {str(got)[:200]} != {str(want)[:200]}"]


def _loaded(path) -> dict:
    """The tensors of a safetensors file, copied out of its memory map: a file damaged in
    place later would otherwise pull the pages from under them (a bus error)."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(path).items()}


def _results(folder) -> dict:
    """The results in ``folder``, file by file, as two undisturbed runs agree on them: images
    as pixels and seed, JSON and YAML without timings and paths, JSON lines as their set of
    records, weights as tensors, every other file as its bytes."""
    import hashlib

    import numpy as np
    import yaml
    from PIL import Image

    got = {}
    for p in files_of(folder):
        rel = str(p.relative_to(folder))
        if p.name in UNCOMPARED or p.name == locks.GUARD_NAME:
            continue
        if p.suffix == ".png":
            with Image.open(p) as im:
                pixels = np.asarray(im.convert("RGB"))
                got[rel] = (hashlib.sha256(pixels.tobytes()).hexdigest(),
                            _canonical(dict(im.info)).get("l2s-seed"))
        elif p.suffix == ".safetensors":
            got[rel] = _loaded(p)
        elif p.suffix in (".json", ".yaml"):
            value = yaml.safe_load(p.read_text())
            if rel == "card.json":  # the weights are compared as tensors: safetensors
                value["training"].pop("seconds")  # writes its metadata in any order
                value.pop("weights_sha256")
            got[rel] = _canonical(value)
        elif p.suffix == ".jsonl":  # records and indexes: their lines, in any order
            recs = [_canonical(json.loads(x)) for x in p.read_text().splitlines()]
            got[rel] = sorted(recs, key=lambda r: json.dumps(r, sort_keys=True))
        else:
            got[rel] = p.read_bytes()
    return got


def _invoke(name, folder, monkeypatch, tmp_path):
    """Run command ``name`` writing ``folder``; train reads a synthetic cache."""
    if name != "train":
        return runner.invoke(app, [*COMMANDS[name], str(folder)])
    from test_train import _cli, make_cache

    cache = tmp_path / "train-cache"
    if not cache.exists():
        make_cache(cache, n_images=24)
    return runner.invoke(_cli(monkeypatch), ["--cache-dir", str(cache), *COMMANDS[name],
                                             str(folder)])


def _written(name, r, folder):
    """The folder a finished run wrote its results into (steer never reuses a folder: a
    rerun writes ``OUT-1``)."""
    assert r.exit_code == 0, r.output
    return folder if name != "steer" else type(folder)(json.loads(r.stdout)["out"])


def _one_line_error(r, names) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    text = re.sub(r"\s+", " ", r.output)
    assert len(lines) == 1 and any(str(n) in text for n in names), r.output


def _case(name, where, slow_unless):
    return pytest.param(name, where, marks=() if where == slow_unless else pytest.mark.slow,
                        id=f"{name}-{where}")


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
@pytest.mark.parametrize(("name", "where"), [_case(c, w, "middle") for c in COMMANDS
                                             for w in ("first", "middle", "last")])
def test_a_full_disk_at_the_nth_write_ends_in_one_line_and_the_rerun_matches(
        tmp_path, monkeypatch, full_disk, name, where, error):
    """Catches a command that meets a full or read-only disk at its first, a middle or its
    last write ending in a traceback, leaving an empty or half-written file, losing what it
    had written, or whose rerun ends with other results than an undisturbed run."""
    clean = tmp_path / "clean"
    if name == "train":  # its cache made before the writes are counted
        _invoke(name, tmp_path / "warm-up", monkeypatch, tmp_path)
    total = _count_writes(full_disk, lambda: _invoke(name, clean, monkeypatch, tmp_path))
    want = _results(clean)
    n = {"first": 1, "middle": max(total // 2, 1), "last": total}[where]
    folder = tmp_path / "run"
    full_disk.arm(n, error)
    r = _invoke(name, folder, monkeypatch, tmp_path)
    full_disk.disarm()
    _one_line_error(r, [folder])
    before = _results(folder) if folder.exists() else {}
    _no_empty_or_temporary_files(tmp_path / "run")
    r = _invoke(name, folder, monkeypatch, tmp_path)
    again = _results(_written(name, r, folder))
    assert not _differences(again, want), _differences(again, want)
    if name != "steer":  # what the failed run had written is still there, as it was
        for k in before.keys() & want.keys():
            if isinstance(before[k], list):  # records: the failed run's are all kept
                assert all(rec in again[k] for rec in before[k]), k
            else:
                assert not _differences(again[k], before[k], k), k


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize(("name", "where"), [_case(c, w, "last") for c in COMMANDS
                                             for w in ("first", "middle", "last")])
def test_a_damaged_nth_output_file_is_repaired_or_refused_in_one_line(
        tmp_path, monkeypatch, corrupt, name, where, how):
    """Catches a command rerun over a finished run's folder with its first, a middle or its
    last file damaged (a bit flipped, cut in half, deleted) ending in a traceback, keeping the
    damage (a deleted metadata.jsonl, a damaged classifier taken as "already trained"), or
    ending with other results than the undisturbed run. Only files that cannot be rebuilt
    may be refused, in one line naming them: bench's config.json (the settings it checks a
    resume against). steer is rerun as `steer --config OUT/config.yaml`, which repeats it."""
    folder = tmp_path / "run"
    r = _invoke(name, folder, monkeypatch, tmp_path)
    assert r.exit_code == 0, r.output
    want = _results(folder)
    files = [p for p in files_of(folder) if p.name != locks.GUARD_NAME
             and not (name == "steer" and p.name == "config.yaml")]  # see the one above
    i = {"first": 0, "middle": len(files) // 2, "last": len(files) - 1}[where]
    damaged = corrupt(folder, files_of(folder).index(files[i]), how)
    if name == "steer":
        r = runner.invoke(app, ["steer", "--config", str(folder / "config.yaml"), "--json"])
    else:
        r = _invoke(name, folder, monkeypatch, tmp_path)
    if name == "bench" and damaged.name == "config.json" and how != "delete":
        _one_line_error(r, [damaged])
        return
    diff = _differences(_results(_written(name, r, folder)), want)
    assert not diff, (damaged, diff)


# --- kill -9 at random moments ------------------------------------------------------------
KILLED_INVERT = ["invert", "--data", "shapes", "--limit", "6", "--steps", "10", "--timesteps",
                 "2,5,9", "--negatives", "1", "--batch-size", "1", "--inversion", "noise"]


def _cache_state(cache) -> dict:
    """Every file of a cache folder an invert run leaves, as the content a rerun must match:
    entries as tensors and metadata, the manifest as its set of lines."""
    import yaml
    from safetensors import safe_open

    got = {}
    for p in files_of(cache):
        rel = str(p.relative_to(cache))
        if p.name == locks.GUARD_NAME:  # left by a takeover of the killed run's claims
            continue
        if p.suffix == ".safetensors":
            with safe_open(p, "pt") as f:
                got[rel] = {"tensors": _loaded(p), "metadata": f.metadata()}
        elif p.name == "manifest.jsonl":
            got[rel] = sorted(p.read_text().splitlines())
        elif p.name == "config.yaml":
            got[rel] = {k: v for k, v in yaml.safe_load(p.read_text()).items()
                        if k != "cache_dir"}
        else:
            got[rel] = p.read_bytes()
    return got


def _entries(cache) -> int:
    return len([p for p in cache.glob("*/maps/*/*.safetensors") if not p.name.startswith(".")])


def _kill_invert_at(cache, more: int, delay: float) -> bool:
    """Start `l2s invert` in a process of its own and SIGKILL it ``delay`` seconds after it
    wrote ``more`` map entries into the cache; whether it was killed (not finished first)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    target = _entries(cache) + more
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "l2s", "--threads", "1", *KILLED_INVERT,
                             "--cache-dir", str(cache)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if _entries(cache) >= target:
                time.sleep(delay)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("kills", [pytest.param(1, id="once"),
                                   pytest.param(4, id="four-times", marks=pytest.mark.slow)])
def test_invert_killed_at_random_moments_resumes_to_the_cache_of_an_uninterrupted_run(
        tmp_path, kills):
    """Catches an `l2s invert` killed with SIGKILL (no handler runs: a half-renamed entry, a
    claim and an inverting mark left, a manifest line unwritten) whose rerun loses an entry,
    writes one twice, keeps a half-written or temporary file, or ends with another cache than
    a run never interrupted."""
    import random

    clean = tmp_path / "clean"
    r = runner.invoke(app, [*KILLED_INVERT, "--cache-dir", str(clean)])
    assert r.exit_code == 0, r.output
    want = _cache_state(clean)
    total = sum(1 for k in want if "/maps/" in k)  # 12: 6 images, a true and a wrong caption
    rng = random.Random(28)
    cache = tmp_path / "killed"
    killed = 0
    while killed < kills and total - _entries(cache) > 1:  # each kill after 1+ new entries
        killed += _kill_invert_at(cache, rng.randrange(1, total - _entries(cache)),
                                  rng.uniform(0.0, 0.3))
    assert killed  # at least one run died mid-way
    r = runner.invoke(app, [*KILLED_INVERT, "--json", "--cache-dir", str(cache)])
    assert r.exit_code == 0, r.output
    diff = _differences(_cache_state(cache), want)
    assert not diff, diff
    assert json.loads(r.stdout)["left_to_others"] == 0


@pytest.mark.parametrize("how", ["flip", "delete"])
def test_a_damaged_geneval_metadata_file_is_written_again(tmp_path, corrupt, how):
    """Catches a prompt's metadata.jsonl (what GenEval's evaluation reads beside its images)
    deleted or damaged and never written again: only prompts with images left to make had it
    written."""
    args = ["bench", "--method", "plain", "--prompts", "2", "--images", "1", "--steps", "4",
            "--out", str(tmp_path)]
    assert runner.invoke(app, args).exit_code == 0
    want = (tmp_path / "plain" / "00001" / "metadata.jsonl").read_bytes()
    corrupt(tmp_path, 1, how, "plain/*/metadata.jsonl")
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "plain" / "00001" / "metadata.jsonl").read_bytes() == want
