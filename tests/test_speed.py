"""The speed benchmark on tiny offline components: units, worst case, reference-style path."""

import json

import pytest
from diffusers.models.attention_processor import AttnProcessor

from l2s.steering.options import SteerOptions
from l2s.steering.speed import SpeedConfig, explicit_attention, run_speed


def test_units_and_end_to_end_on_tiny_sd(den, one_thread):
    cfg = SpeedConfig(model="tiny", options=SteerOptions(steps=4, steer_until=2, iterations=3),
                      repeats=2)
    seen = []
    rep = run_speed(cfg, denoiser=den, on_unit=lambda name, res: seen.append(name))
    assert seen == ["plain_step", "ours_iteration", "reference_iteration", "plain",
                    "steered_worst_case", "steered_one_iteration"]
    assert rep.loss == "random (timing only)"  # no classifier for this backbone
    assert rep.text_len == den.tokenizer.model_max_length  # the prompt length timed
    for name in ("plain_step", "ours_iteration", "reference_iteration"):
        u = rep.units[name]
        assert u["ms"] > 0 and len(u["all_ms"]) == 2
    for name in ("ours_iteration", "reference_iteration"):
        assert rep.units[name]["forward_ms"] > 0 and rep.units[name]["backward_ms"] > 0
    e2e = rep.end_to_end
    # The early exit is off: every steered step runs every iteration.
    assert e2e["steered_worst_case"]["iterations_run"] == 2 * 3
    assert e2e["steered_one_iteration"]["iterations_run"] == 2
    assert rep.ratios["reference_vs_ours_peak_memory"] is None  # CPU: no peak to compare
    # Launch counts: an iteration (forward + backward) launches more than a plain forward, and
    # the reference-style one (explicit attention everywhere) more than ours.
    k = {name: rep.units[name]["ops"]["kernels"] for name in rep.units}
    assert k["plain_step"] < k["ours_iteration"] < k["reference_iteration"]
    assert rep.ratios["ours_iteration_vs_plain_step_kernels"] == \
        round(k["ours_iteration"] / k["plain_step"], 3)
    assert rep.path is None  # no out: nothing written
    assert json.loads(json.dumps(rep.to_json()))["units"] == rep.units  # the report is JSON


def test_explicit_attention_covers_every_layer_and_restores(den):
    model = den.attention_model
    before = dict(model.attn_processors)
    with explicit_attention(model):
        assert all(isinstance(p, AttnProcessor) for p in model.attn_processors.values())
    assert {k: type(v) for k, v in model.attn_processors.items()} == \
        {k: type(v) for k, v in before.items()}


def test_prompt_without_relation_is_refused(den):
    for prompt in ("a dog", "a dog next to a cat"):  # no relation; one that is never steered
        with pytest.raises(ValueError, match="no steerable relation"):
            run_speed(SpeedConfig(model="tiny", prompt=prompt, repeats=1), denoiser=den)


def test_cli_speed_on_the_toy_writes_the_report(tmp_path, one_thread):
    from typer.testing import CliRunner

    from l2s.cli import app

    out = tmp_path / "speed.json"
    r = CliRunner().invoke(app, ["speed", "--steps", "4", "--repeats", "1", "--units-only",
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep == json.loads(out.read_text())
    assert rep["loss"].endswith("card.json")  # the toy's shipped classifier
    assert "end_to_end" not in rep and rep["ratios"]["ours_iteration_vs_plain_step"] > 0
    # the toy steers steps 1..3 of 4 (steer_from 1): was 4, the end index, as the count
    assert rep["steps"] == 4 and rep["steered_steps"] == 3


def test_the_library_writes_the_report_to_out(tmp_path, one_thread):
    """Catches a report written only by the CLI (a Python run left no file) or a refusal of an
    unwritable out found only after the timing."""
    from l2s.config import ConfigError
    from l2s.steering.speed import SpeedResult

    out = tmp_path / "sub" / "speed.json"
    res = run_speed(SpeedConfig(options=SteerOptions(steps=4), repeats=1, end_to_end=False,
                                out=str(out)))
    assert isinstance(res, SpeedResult) and res.path == out
    assert json.loads(out.read_text()) == res.to_json()
    assert "end_to_end" not in res.to_json() and res.to_json()["steps"] == 4
    with pytest.raises(ConfigError, match="is a folder"):
        run_speed(SpeedConfig(out=str(tmp_path)), denoiser=object())  # before any timing


def test_cli_speed_refuses_random_weights_for_the_toys_naming_every_buildable_preset():
    """Was: "--random-weights applies to the SD presets" (stale: Flux and SD3 build too), and
    each toy family wrote its own refusal. The presets are read from the registry, in any
    order, so a new buildable preset the message forgets fails here too."""
    from typer.testing import CliRunner

    from l2s.cli import app
    from l2s.engine.registry import presets

    buildable = [p.name for p in presets().values() if p.configs]
    assert {"sd1.4", "flux-dev", "sd3.5-medium"} <= set(buildable)
    for toy in ("toy", "toy-mmdit"):
        r = CliRunner().invoke(app, ["speed", "--model", toy, "--random-weights"])
        assert r.exit_code == 2 and f"the {toy} preset ships its trained weights" in r.output
        listed = r.output.rsplit("use one of ", 1)[-1].strip().split(", ")
        assert sorted(listed) == sorted(buildable), r.output


def test_speed_refuses_a_model_whose_weights_do_not_fit_before_building_it(monkeypatch):
    """Bug: `l2s speed --model flux-dev --random-weights` started building tens of GB with no
    memory check (and sd2.1 on a CPU printed nothing for minutes): the weights are now
    counted on the meta device and compared with the free memory first, naming --force."""
    from typer.testing import CliRunner

    import l2s.engine.footprint as footprint
    import l2s.engine.loading as loading
    from l2s.cli import app

    def no_build(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(loading, "load_backbone", no_build)
    monkeypatch.setattr(footprint, "free_memory", lambda device: 10 ** 9)  # 1 GB free
    monkeypatch.setattr(footprint, "matmul_rate", lambda device, dtype: 1e10)
    res = CliRunner().invoke(app, ["--threads", "1", "speed", "--model", "sd1.4",
                                   "--random-weights", "--repeats", "1"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "needs 4.3 GB for its weights (float32) and cpu has 1.0 GB free" in out
    assert "--force" in out and "Traceback" not in out
    assert "estimate: weights 4.3 GB (float32)" in out and "TFLOP" in out


def test_speed_estimate_counts_the_presets_weights_and_warns_on_a_cpu():
    """The weights come from the preset's architecture (SD1.4: UNet 859.5M + CLIP text 123.1M
    + VAE 83.7M parameters, float32), the forwards from the run's settings; a real model on a
    CPU gets the GPU-benchmark warning, the shipped toy none."""
    from l2s.steering.speed import cpu_warning, estimate

    cfg = SpeedConfig(model="sd1.4", random_weights=True, repeats=1, end_to_end=False)
    est = estimate(cfg)
    assert abs(est.weight_bytes / 4 - (859.5e6 + 123.1e6 + 83.7e6)) < 2e6
    assert est.forwards == 2 * (2 + 3 * 2)  # (warm-up + 1 repeat) x (CFG step, 2 iterations)
    assert est.forward_flops > 1e11 and est.seconds > 0
    assert "GPU benchmark" in cpu_warning(cfg, est)
    assert cpu_warning(SpeedConfig(model="toy"), estimate(SpeedConfig(model="toy"))) is None
