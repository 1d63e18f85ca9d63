"""The jobs as library code: --shard and the launcher's rank, each process's GPU, config
validation in __post_init__, the config.yaml a Python run writes, invert-then-train from Python."""

import json
from dataclasses import replace

import pytest
import torch
import yaml

from l2s.classifier.data import TrainError
from l2s.classifier.train import TrainConfig
from l2s.config import ConfigError
from l2s.engine.backbone import BackboneError
from l2s.engine.loading import resolve_device
from l2s.errors import L2SError
from l2s.inversion.job import InvertConfig
from l2s.inversion.loop import InversionConfig
from l2s.launcher import launcher_shard, parse_shard, resolve_shard

FAST = InversionConfig(method="noise", steps=10, record_steps=(2, 5, 9))


@pytest.fixture
def no_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "L2S_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# --- --shard and the launcher's rank -------------------------------------------------------
def test_one_shard_parser_with_a_clear_error(no_launcher):
    """Catches the parser that took 3/2 (a shard with no work) or died on an `assert` (off
    under python -O) and the one that gave a ValueError for "3"."""
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None and parse_shard("") is None
    for bad in ("3", "a/b", "1/2/3", "3/2", "-1/2", "0/0"):
        with pytest.raises(ConfigError, match=r"--shard .*I/N with 0 <= I < N"):
            parse_shard(bad)


def test_the_launcher_gives_the_shard_and_an_explicit_one_wins(no_launcher):
    """Catches invert and train ignoring RANK/WORLD_SIZE (every process doing all the work)."""
    assert launcher_shard() is None and resolve_shard(None) is None
    no_launcher.setenv("WORLD_SIZE", "4")
    no_launcher.setenv("RANK", "2")
    assert launcher_shard() == (2, 4) and resolve_shard(None) == (2, 4)
    assert resolve_shard((0, 2)) == (0, 2)
    no_launcher.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK='x'"):
        launcher_shard()


# --- each launched process on its own GPU --------------------------------------------------
def _fake_cuda(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_a_launched_process_gets_the_gpu_of_its_local_rank(no_launcher):
    """Catches every rank of `accelerate launch -m l2s invert` (or train) stacking on cuda:0:
    only bench set the per-rank device, in its CLI."""
    _fake_cuda(no_launcher, 2)
    assert resolve_device() == torch.device("cuda")  # no launcher: CUDA as before
    no_launcher.setenv("LOCAL_RANK", "1")
    assert resolve_device() == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")  # --device wins
    no_launcher.setenv("L2S_DEVICE", "cuda:0")
    assert resolve_device() == torch.device("cuda", 0)  # and so does $L2S_DEVICE
    no_launcher.delenv("L2S_DEVICE")
    no_launcher.setenv("LOCAL_RANK", "2")
    with pytest.raises(BackboneError, match=r"LOCAL_RANK='2' names no GPU .* 2"):
        resolve_device()
    _fake_cuda(no_launcher, 0)
    assert resolve_device() == torch.device("cpu")  # a launcher on a CPU machine


def test_invert_and_train_load_the_backbone_on_the_ranks_gpu(no_launcher, tmp_path):
    """The jobs ask resolve_device, not the CLI: a Python run under a launcher is per-rank."""
    from l2s.classifier import train as train_job
    from l2s.engine import loading
    from l2s.inversion import job

    _fake_cuda(no_launcher, 4)
    no_launcher.setenv("LOCAL_RANK", "3")
    seen = []

    def fake_load(model, device=None, **kw):
        seen.append(resolve_device(device))
        raise BackboneError("stop here")

    no_launcher.setattr(loading, "load_backbone", fake_load)
    for run, cfg in ((job.invert, InvertConfig(cache_dir=str(tmp_path))),
                     (train_job.train, TrainConfig(cache_dir=str(tmp_path)))):
        with pytest.raises(BackboneError):
            run(cfg)
    assert seen == [torch.device("cuda", 3)] * 2


# --- validation in __post_init__ (issue: the Python API checked nothing) ---------------------
@pytest.mark.parametrize("kw, words", [
    ({"shard": (3, 2)}, "--shard 3/2"),
    ({"shard": (0.5, 2)}, "--shard must be two integers"),
    ({"limit": 2.5}, "--limit must be a whole number"),
    ({"limit": 0}, "--limit must be >= 1"),
    ({"batch_size": True}, "--batch-size must be a whole number"),
    ({"negatives": 4}, "at most 3 distinct negatives"),
    ({"seed": None}, "--seed must be a whole number"),
    ({"data": "shapes"}, "tuple such as ('shapes',)"),
    ({"data": ()}, "--data takes one or more sources"),
    ({"data": ("cats",)}, "--data must be one of"),
    ({"model": ""}, "--model must be a non-empty text"),
    ({"per_relation": (1, 2)}, "--per-relation takes three"),
    ({"per_relation": (1, 2.0, 3)}, "--per-relation takes three"),
    ({"inversion": "noise"}, "inversion must be an l2s.inversion.loop.InversionConfig"),
])
def test_invert_config_refuses_what_the_cli_refuses(kw, words):
    with pytest.raises(L2SError, match=words.replace("(", r"\(").replace(")", r"\)")):
        InvertConfig(**kw)


@pytest.mark.parametrize("kw, words", [
    ({"steps": -5}, "--steps must be >= 1, got -5"),
    ({"steps": 10.0}, "--steps must be a whole number"),
    ({"fixed_point": -1}, "--fixed-point must be >= 0"),
    ({"record_steps": (1.5,)}, "--timesteps takes whole step indices"),
    ({"record_steps": (60,)}, "must lie in 0..49"),
    ({"method": "magic"}, "unknown inversion 'magic'"),
])
def test_inversion_config_raises_l2s_errors(kw, words):
    with pytest.raises(ConfigError, match=words):
        InversionConfig(**kw)


@pytest.mark.parametrize("kw, words", [
    ({"epochs": -5}, "--epochs must be >= 1, got -5"),
    ({"epochs": 10.5}, "--epochs must be a whole number"),
    ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    ({"seed": None}, "--seed must be a whole number"),
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"val_fraction": "a lot"}, "--val-fraction must be a number"),
    ({"dropout": 1.0}, r"dropout \(1.0\) in \[0, 1\)"),
    ({"invert": "sometimes"}, "--invert must be one of auto, always, never"),
    ({"inversion": "magic"}, "--inversion must be one of ddim, noise"),
    ({"negatives": 9}, "--negatives 9"),
    ({"limit": 0}, "--limit must be >= 1"),
    ({"data": "shapes"}, "tuple such as ('shapes',)"),
    ({"out": ""}, "--out must be a non-empty text"),
    ({"positive_only": "yes"}, "positive_only must be True or False"),
])
def test_train_config_refuses_what_the_cli_refuses(kw, words):
    with pytest.raises((TrainError, ConfigError),
                       match=words.replace("('", r"\('").replace("',)", r"',\)")):
        TrainConfig(**kw)


# --- the options round trip, and the config.yaml a Python run writes ---------------------------
def test_invert_options_round_trip_through_the_cli_vocabulary():
    """Catches a config.yaml the CLI's --config cannot read back (tuples, the nested
    InversionConfig, the shard) or that loses a setting."""
    cfg = InvertConfig(data=("shapes", "generated"), limit=3, negatives=2, seed=4, shard=(1, 3),
                       per_relation=(2, 1, 1), inversion=FAST)
    opts = cfg.options()
    assert opts["timesteps"] == "2,5,9" and opts["shard"] == "1/3" and opts["inversion"] == "noise"
    assert InvertConfig.from_options(yaml.safe_load(yaml.safe_dump(opts))) == cfg
    assert InvertConfig.from_options({"data": "shapes"}).data == ("shapes",)
    with pytest.raises(ConfigError, match="unknown invert option"):
        InvertConfig.from_options({"num_images": 2})
    with pytest.raises(ConfigError, match="--timesteps takes comma-separated whole numbers"):
        InvertConfig.from_options({"timesteps": "5,x"})
    odd = replace(cfg, inversion=replace(FAST, map_size=8))  # no option: kept for Python
    assert InvertConfig.from_options(odd.options()) == odd


def test_train_options_hold_python_only_fields_only_when_changed():
    """The CLI's --config refuses keys it has no option for: a plain run's config.yaml must
    hold none of them; a Python run that changed one must keep it (to be repeated)."""
    import inspect

    from l2s.cli.train import train as cli_train

    cli_names = set(inspect.signature(cli_train).parameters) - {"ctx", "fresh", "config",
                                                                 "json_out"}
    assert set(TrainConfig().options()) == cli_names
    tuned = TrainConfig(dropout=0.2, data=("shapes",))
    assert tuned.options()["dropout"] == 0.2
    assert TrainConfig.from_options(tuned.options()) == tuned


def test_a_python_invert_writes_the_config_that_repeats_it(tmp_path, den, one_thread):
    """Catches config.yaml written only by the CLI: a Python run could not be repeated."""
    from l2s.inversion import job

    cfg = InvertConfig(cache_dir=str(tmp_path), limit=2, batch_size=4, per_relation=(2, 1, 1),
                       inversion=FAST)
    res = job.invert(cfg, den)
    path = tmp_path / den.fingerprint / "config.yaml"
    # the model's defaults written resolved (fixed_point None -> the toy's 2)
    assert InvertConfig.from_yaml(path) == replace(cfg, inversion=cfg.inversion.resolve("toy"))
    assert InvertConfig.from_yaml(path).inversion.fixed_point == 2
    assert job.invert(InvertConfig.from_yaml(path), den).skipped == res.written  # same entries


# --- invert what the cache lacks, then train: from Python ----------------------------------
def test_python_train_inverts_what_the_cache_lacks_then_trains(tmp_path, one_thread):
    """Catches invert-then-train living only in the CLI (`l2s.train` refused an empty cache)."""
    from l2s import TrainResult, train

    events = []
    cfg = TrainConfig(data=("shapes",), inversion="noise", limit=24, epochs=1,
                      cache_dir=str(tmp_path / "c"), out=str(tmp_path / "clf"))
    res = train(cfg, callback=events.append)
    assert isinstance(res, TrainResult) and res.inverted is not None
    assert res.inverted.written == 48  # 24 images x (true + 1 wrong caption)
    stages = [ev["stage"] for ev in events]
    assert stages[0] == "invert" and events[0]["sources"] == ["shapes"]
    assert "result" in events[stages.index("train") - 1]  # the invert summary, then epochs
    # the model's defaults written as used (were null: the file repeated the run only while
    # the defaults stayed the same)
    (d_model, depth), lr = cfg.resolved_size(), cfg.resolved_lr()
    assert TrainConfig.from_yaml(res.config_path) == replace(
        cfg, out=str(tmp_path / "clf"), lr=lr, d_model=d_model, depth=depth)
    assert None not in (lr, d_model, depth)
    assert "invert" not in res.card["training"]  # how data was gathered is not a setting
    assert json.loads(json.dumps(res.to_json()))["inverted"]["written"] == 48
    assert train(cfg).inverted is None  # the cache has shapes now: nothing to invert


def test_python_steer_and_bench_write_the_config_their_commands_repeat(tmp_path, one_thread):
    """Catches steer's and bench's config.yaml written only by the CLI: a Python run (or a
    nested option such as SteerOptions.steps) could not be repeated with `--config`."""
    import json

    import yaml
    from typer.testing import CliRunner

    from l2s import BenchConfig, SteerConfig, SteerOptions, benchmark, steer
    from l2s.cli import app

    fast = SteerOptions(steps=4, steer_until=2, iterations=2)
    res = steer(SteerConfig("a circle to the left of a square", seed=3, options=fast,
                            out=str(tmp_path / "s")))
    written = yaml.safe_load((res.out / "config.yaml").read_text())
    assert written["steps"] == 4 and written["seed"] == 3 and "options" not in written
    # the model's defaults written as used (were null), the options given kept
    from l2s.engine.registry import steer_defaults

    toy = steer_defaults("toy")
    assert (written["guidance"], written["step_size"], written["optimizer"]) == \
        (toy.guidance, toy.step_size, toy.optimizer) and written["image_size"] == 32
    assert written["iterations"] == 2 and written["steer_until"] == 2
    r = CliRunner().invoke(app, ["steer", "--config", str(res.out / "config.yaml"), "--json"])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    # report.json's settings are the values used, as config.yaml's (were: the image size and
    # the loss threshold as given, null), so the repeated run reports the very same settings
    assert res.report["settings"]["image_size"] == 32
    assert res.report["settings"]["loss_threshold"] == written["loss_threshold"] \
        == toy.loss_threshold
    assert {k: v for k, v in res.report["settings"].items() if k in written} == \
        {k: v for k, v in written.items() if k in res.report["settings"]}
    assert again["settings"] == res.report["settings"]
    assert again["seeds"] == [3]

    bench_out = tmp_path / "b"
    benchmark(BenchConfig(methods=("plain",), prompts=2, options=fast, out=str(bench_out)))
    written = yaml.safe_load((bench_out / "config.yaml").read_text())
    assert written["method"] == ["plain"] and written["steps"] == 4
    r = CliRunner().invoke(app, ["bench", "--config", str(bench_out / "config.yaml"), "--json"])
    assert r.exit_code == 0, r.output  # same settings: the finished run is found, not refused
    assert json.loads(r.stdout)["methods"]["plain"]["n_images"] == 2
    # the model's defaults spelled out (image size, guidance ...) make the very same images
    assert written["image_size"] == 32 and written["guidance"] is not None
    r = CliRunner().invoke(app, ["bench", "--config", str(bench_out / "config.yaml"),
                                 "--out", str(tmp_path / "b2"), "--json"])
    assert r.exit_code == 0, r.output
    pngs = sorted(p.relative_to(bench_out) for p in bench_out.glob("plain/*/samples/*.png"))
    assert len(pngs) == 2
    import numpy as np
    from PIL import Image

    for p in pngs:
        assert np.array_equal(np.asarray(Image.open(bench_out / p)),
                              np.asarray(Image.open(tmp_path / "b2" / p)))


def test_steer_best_of_writes_the_candidate_count_it_used(tmp_path, one_thread):
    """Catches `steer --method best-of` without --candidates reporting and writing
    candidates: null (the default count) where the run searched DEFAULT_CANDIDATES: its
    config.yaml then repeated the run only while that default stayed."""
    from l2s import SteerConfig, SteerOptions, steer
    from l2s.steering.search import DEFAULT_CANDIDATES

    res = steer(SteerConfig("a circle to the left of a square", method="best-of",
                            options=SteerOptions(steps=3), out=str(tmp_path / "s")))
    assert len(res.report["best_of"][0]["seeds"]) == DEFAULT_CANDIDATES
    assert res.report["settings"]["candidates"] == DEFAULT_CANDIDATES
    assert yaml.safe_load((res.out / "config.yaml").read_text())["candidates"] == \
        DEFAULT_CANDIDATES


def test_invert_takes_device_and_dtype_like_every_job_command(tmp_path, monkeypatch):
    """Catches --device/--dtype missing on invert (the shared vocabulary): the backbone must be
    loaded where the run says, from the CLI and from a config file."""
    from typer.testing import CliRunner

    from l2s.cli import app
    from l2s.engine import loading

    seen = []

    def stop(model, **kw):
        seen.append((kw.get("device"), kw.get("dtype")))
        raise loading.BackboneError("stopped before loading")

    monkeypatch.setattr(loading, "load_backbone", stop)
    r = CliRunner().invoke(app, ["invert", "--cache-dir", str(tmp_path), "--device", "cpu",
                                 "--dtype", "float32"])
    assert r.exit_code != 0 and "stopped before loading" in r.output
    assert seen == [("cpu", "float32")]
    cfg = InvertConfig(device="cpu", dtype="bfloat16")
    assert InvertConfig.from_options(cfg.options()) == cfg
