"""The steering options declared once (SteerOptions), the flags generated from them, the shared
flag vocabulary with its hidden old spellings, and the checks every config makes when built."""

import json
import math
from dataclasses import fields

import pytest
import torch
from typer.testing import CliRunner

from l2s import bench
from l2s.bench import BenchConfig, BenchError, run_bench
from l2s.cli import app
from l2s.config import MAX_SEED, ConfigError
from l2s.errors import L2SError
from l2s.steering import job
from l2s.steering.job import PromptError, SteerConfig
from l2s.steering.options import SteerOptions
from l2s.steering.speed import SpeedConfig

STEERING_COMMANDS = ("steer", "bench", "speed")
P = "a circle to the left of a square"


def _options_of(command: str) -> dict:
    """{param name: click option} of an `l2s` command."""
    import typer.main

    cmd = typer.main.get_command(app).commands[command]
    return {p.name: p for p in cmd.params}


def test_every_steering_option_is_a_flag_of_every_steering_command_with_one_help():
    """Was: bench had no --optimizer, --steer-from or --budget, speed no --guidance, and the
    help texts were written per command."""
    per_command = {c: _options_of(c) for c in STEERING_COMMANDS}
    for f in fields(SteerOptions):
        flag = "--" + f.name.replace("_", "-")
        helps = set()
        for c, params in per_command.items():
            assert f.name in params, f"{c} lacks {flag}"
            assert params[f.name].opts == [flag]
            helps.add(params[f.name].help)
        assert len(helps) == 1, f"{flag} has different help texts: {helps}"


def test_shared_flags_are_spelled_alike():
    """Was: bench said --images where steer said --num-images; steer and bench had no
    --device/--dtype; speed had no --config."""
    for c in ("steer", "bench"):
        assert _options_of(c)["num_images"].opts[0] == "--num-images"
    for c in STEERING_COMMANDS:
        params = _options_of(c)
        for name in ("device", "dtype", "config", "image_size"):
            assert name in params, f"{c} lacks --{name.replace('_', '-')}"
        assert len({params["device"].help} | {_options_of("speed")["device"].help}) == 1


def _capture_settings(monkeypatch) -> list:
    """Patch the generation steer and bench share: record its SteerSettings, return blanks."""
    seen = []

    def generate(denoiser, prompts, triplets, latents, settings, loss, on_step=None,
                 keep_maps=False):
        seen.append(settings)
        return torch.zeros(len(prompts), 32, 32, 3), job.SteerStats()

    monkeypatch.setattr(job, "generate", generate)
    return seen


def test_bench_passes_every_steering_option_on(monkeypatch, tmp_path):
    """Was: bench dropped --optimizer, --steer-from and --budget (they did not exist), and its
    config.json could not hold them."""
    seen = _capture_settings(monkeypatch)
    r = CliRunner().invoke(app, ["bench", "--method", "centroid", "--prompts", "1",
                                 "--num-images", "1", "--optimizer", "adam", "--steer-from", "1",
                                 "--budget", "3", "--steps", "4", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (s,) = seen
    assert (s.optimizer, s.steer_from, s.budget, s.steps) == ("adam", 1, 3, 4)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["optimizer"], saved["steer_from"], saved["budget"]) == ("adam", 1, 3)


def test_the_old_spelling_still_works_but_is_not_shown(monkeypatch, tmp_path):
    """`bench --images N` (the spelling before --num-images) and `images: N` in a config file
    keep working for one release; --help shows only --num-images."""
    method_calls = []

    def oracle(ctx):
        def run(prompts, seeds):
            method_calls.append(list(seeds))
            return torch.zeros(len(prompts), 32, 32, 3)
        return run

    monkeypatch.setitem(bench.METHODS, "oracle", oracle)
    monkeypatch.setattr("l2s.engine.loading.load_backbone", lambda *a, **k: object())
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "--method", "oracle", "--prompts", "1", "--images=2",
                            "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["images"] == 2
    cfg = tmp_path / "c.yaml"
    cfg.write_text("images: 3\nprompts: 1\nmethod: oracle\n")
    r = runner.invoke(app, ["bench", "--config", str(cfg), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["images"] == 3
    assert [len(c) for c in method_calls] == [2, 3]
    shown = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "200"}).output
    assert "--num-images" in shown and "--images" not in shown


def test_cli_and_api_write_bench_results_to_the_same_default_folder(monkeypatch, tmp_path):
    """Was: the CLI wrote to out/bench-SUITE-MODEL, BenchConfig to out/bench."""
    monkeypatch.chdir(tmp_path)
    assert BenchConfig(suite="shapes-multi", model="org/model").out == \
        "out/bench-shapes-multi-org_model"
    monkeypatch.setitem(bench.METHODS, "oracle",
                        lambda ctx: lambda prompts, seeds: torch.zeros(len(prompts), 32, 32, 3))
    monkeypatch.setattr("l2s.engine.loading.load_backbone", lambda *a, **k: object())
    r = CliRunner().invoke(app, ["bench", "--method", "oracle", "--prompts", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / BenchConfig().out / "config.json").exists()


def test_reports_keep_their_flat_keys(tmp_path):
    """The options are nested in the configs but not in what is written: report.json's
    "settings" and bench's config.json keep one flat key per option (config.json's image
    count still "images"), so readers of earlier files keep working."""
    opts = SteerOptions(steps=4, budget=2)
    flat = SteerConfig(P, options=opts).to_json()
    assert "options" not in flat and flat["steps"] == 4 and flat["budget"] == 2
    saved = BenchConfig(num_images=2, options=opts).to_json()
    assert "options" not in saved and "num_images" not in saved
    assert (saved["images"], saved["steps"], saved["budget"]) == (2, 4, 2)
    assert "options" not in SpeedConfig(options=opts).to_json()


def test_a_run_written_before_the_new_options_resumes(monkeypatch, tmp_path):
    """A config.json without optimizer/steer_from/budget/dtype (written before bench had
    them) is the same run as one with them unset: resumed, not refused as "other settings"."""
    monkeypatch.setitem(bench.METHODS, "oracle",
                        lambda ctx: lambda prompts, seeds: torch.zeros(len(prompts), 32, 32, 3))
    cfg = BenchConfig(methods=("oracle",), prompts=2, num_images=1, out=str(tmp_path))
    run_bench(cfg, denoiser=object())
    path = tmp_path / "config.json"
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("optimizer", "steer_from", "budget", "device", "dtype")}
    path.write_text(json.dumps(old))
    assert run_bench(cfg, denoiser=object()).complete
    with pytest.raises(BenchError, match="other settings"):  # a real difference still is
        run_bench(BenchConfig(methods=("oracle",), prompts=2, num_images=1, out=str(tmp_path),
                              options=SteerOptions(budget=1)), denoiser=object())


BAD = [  # (build, message): each was noise, a black image or a deep traceback before
    (lambda: BenchConfig(options=SteerOptions(steps=-5)), "--steps must be >= 1, got -5"),
    (lambda: SteerOptions(guidance=math.nan), "--guidance must be a finite number"),
    (lambda: SteerOptions(step_size=math.inf), "--step-size must be a finite number"),
    (lambda: SteerOptions(steps=2.5), "--steps must be a whole number, got 2.5"),
    (lambda: SteerOptions(iterations=True), "--iterations must be a whole number"),
    (lambda: SteerOptions(optimizer="lbfgs"), "--optimizer must be one of sgd"),
    (lambda: SteerOptions(relation_schedule="all"), "--relation-schedule must be one of"),
    (lambda: SteerOptions(compile="fast"), "--compile must be one of"),
    (lambda: SteerOptions(budget=-1), "--budget must be >= 0"),
    (lambda: BenchConfig(num_images=0), "--num-images must be >= 1, got 0"),
    (lambda: BenchConfig(num_images=1001), "--num-images must be <= 1000"),
    (lambda: BenchConfig(prompts=2.0), "--prompts must be a whole number"),
    (lambda: BenchConfig(prompts=10**8), "--prompts must be <= 10000"),
    (lambda: BenchConfig(seed=-1), "--seed must be >= 0"),
    (lambda: BenchConfig(seed=1000), "where the noise generator's seeds wrap"),
    (lambda: BenchConfig(shard=(3, 2)), "--shard (3, 2): use I/N with 0 <= I < N"),
    (lambda: BenchConfig(methods="l2s"), "--method: give a tuple of methods"),
    (lambda: BenchConfig(batch_size=0), "--batch-size must be >= 1"),
    (lambda: BenchConfig(model=""), "--model must be a non-empty text"),
    (lambda: SteerConfig(None), "the prompt must be text"),
    (lambda: SteerConfig(P, num_images=2.0), "--num-images must be a whole number, got 2.0"),
    (lambda: SteerConfig(P, seed=None), "--seed must be a whole number, got None"),
    (lambda: SteerConfig(P, seed=MAX_SEED, num_images=2), "--seed 4294967295 gives image "
                                                          "seeds up to 4294967296"),
    (lambda: SteerConfig(P, image_size=0), "--image-size must be >= 1"),
    (lambda: SteerConfig(P, options={"steps": 4}), "options must be a SteerOptions"),
    (lambda: SteerConfig(P, out=""), "--out must be a non-empty text"),
    (lambda: SpeedConfig(repeats=0), "--repeats must be >= 1"),
    (lambda: SpeedConfig(options=SteerOptions(iterations=0)), "--iterations must be >= 1"),
]


@pytest.mark.parametrize("build,message", BAD, ids=[m for _, m in BAD])
def test_configs_refuse_bad_values_when_built(build, message):
    with pytest.raises(L2SError) as e:
        build()
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ConfigError | BenchError | PromptError)


def test_steering_range_that_steers_nothing_is_refused_when_resolved():
    with pytest.raises(ConfigError, match="--steer-from 9 leaves no step to steer"):
        SteerOptions(steps=10, steer_from=9, steer_until=0.5).resolve("toy")


def test_the_model_defaults_spelled_out_resolve_as_left_out():
    """Catches `steer --config OUT/config.yaml` of a `--steps 1` toy run refused ("--steer-from
    1 leaves no step to steer"): the written file spells out the model's steer_from and
    steer_until, which steer nothing at one step, as the run that wrote it did."""
    from l2s.engine.registry import steer_defaults

    toy = steer_defaults("toy")
    left_out = SteerOptions(steps=1)
    assert left_out.with_all_model_defaults("toy").resolve("toy") == left_out.resolve("toy")
    assert SteerOptions(steps=1).resolve("toy").steered_count() == 0
    with pytest.raises(ConfigError, match="--steer-from 1 \\(the model's default\\) leaves"):
        SteerOptions(steps=1, steer_from=toy.steer_from,
                     steer_until=toy.steer_until + 1).resolve("toy")


@pytest.mark.parametrize("args,message", [
    (["steer", P, "--steps", "0"], "--steps must be >= 1, got 0"),
    (["bench", "--optimizer", "lbfgs"], "--optimizer must be one of sgd"),
    (["bench", "--num-images", "0"], "--num-images must be >= 1, got 0"),
    (["speed", "--guidance", "nan"], "--guidance must be a finite number"),
    (["speed", "--iterations", "0"], "--iterations must be >= 1"),
])
def test_cli_gives_the_configs_message_in_one_line(args, message, tmp_path):
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and message in r.output, r.output
    assert "Traceback" not in r.output
