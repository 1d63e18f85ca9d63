"""The compiled steering forward (``--compile``): same maps, gradients and latents as eager.

On the toy: its trained UNet gives the maps real gradients (a tiny random UNet's are ~1e-10,
rounding noise that no comparison can check).
"""

from dataclasses import replace

import pytest
import torch

from l2s.engine.compiled import compiled_maps
from l2s.engine.sampling import seeded_latents
from l2s.relations import parse
from l2s.steering.loop import Steerer, SteerSettings, steer_latents
from l2s.steering.losses import CentroidLoss
from l2s.steering.options import SteerOptions

PROMPT = "a circle left of a square"


@pytest.fixture(scope="module")
def den():
    from l2s.engine.loading import load_backbone

    return load_backbone("toy", device="cpu")


def _eager_and_compiled(den, n: int, rows: int):
    """(maps, grad) of n images, eager and through the compiled path run eagerly (its
    padding to ``rows``' bucket, tensor timestep and maps-only forward, without compiling)."""
    st = Steerer(den, [PROMPT] * n, [parse(PROMPT)] * n, CentroidLoss(),
                 SteerSettings(steps=4, guidance=2.0, truncate_forward=False))
    t = den.timesteps(4)[1]
    x = seeded_latents(den, list(range(n)))
    w = torch.rand(n, 1, 1) + st.token_weights(range(n))  # rows differ: a mixed-up row shows
    # A loss that weighs map positions differently (each map sums to 1, so a constant weight
    # per map would have no gradient at all).
    probe = torch.rand(n, 2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = []
    with st.recorder() as rec:
        for compiled in (False, True):
            z = x.clone().requires_grad_(True)
            with torch.enable_grad(), torch.compiler.set_stance("force_eager"):
                maps = (compiled_maps(den, rec, z, t, st.cond, w, None, rows=rows,
                                      mode="default") if compiled
                        else st.forward_maps(rec, z, t, st.cond, w))
                (grad,) = torch.autograd.grad((maps * probe).sum(), z)
            out.append((maps.detach(), grad))
    return out


@pytest.mark.parametrize(("n", "rows", "forwarded"), [(3, 8, 4), (2, 3, 2)])
def test_compiled_path_pads_the_batch_and_matches_eager(den, n, rows, forwarded, monkeypatch):
    seen = []
    real = den.model_output
    monkeypatch.setattr(den, "model_output", lambda z, *a: seen.append(len(z)) or real(z, *a))
    (maps, grad), (cmaps, cgrad) = _eager_and_compiled(den, n, rows)
    assert seen == [n, forwarded]  # a power of two, at most the step's batch
    assert cmaps.shape == maps.shape
    torch.testing.assert_close(cmaps, maps, rtol=1e-4, atol=1e-6)
    assert grad.abs().max() > 1e-3  # a gradient worth comparing
    torch.testing.assert_close(cgrad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("n", "rows"), [(2, 2), (3, 8)])
def test_compiled_path_makes_no_tensor_from_host_data(den, n, rows):
    """Everything the compiled path adds around the graph (padding, the timestep tensor) is
    made on the device: a tensor made from Python data is a copy from the host, which
    synchronises a GPU at every iteration. Fails with ``torch.as_tensor(t, device=...)``."""
    from l2s.engine.timing import OpCounter

    st = Steerer(den, [PROMPT] * n, [parse(PROMPT)] * n, CentroidLoss(),
                 SteerSettings(steps=4, guidance=2.0))
    t, x, w = den.timesteps(4)[1], seeded_latents(den, list(range(n))), st.token_weights(
        range(n))
    with st.recorder() as rec, torch.compiler.set_stance("force_eager"), OpCounter() as c:
        compiled_maps(den, rec, x, t, st.cond, w, None, rows=rows, mode="default")
    assert c.counts()["host_tensors"] == 0


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile mode 'fast'.*reduce-overhead"):
        SteerSettings(compile="fast")


def test_compile_option_reaches_the_steering_settings(monkeypatch, tmp_path, one_thread):
    from typer.testing import CliRunner

    import l2s.steering.job as job
    from l2s.cli import app

    seen = []

    def stop(den, prompts, triplets, latents, settings, *a, **k):
        seen.append(settings.compile)
        raise job.SteerError("stopped before generating")

    monkeypatch.setattr(job, "generate", stop)
    res = CliRunner().invoke(app, ["steer", "a circle left of a square", "--compile",
                                   "reduce-overhead", "--out", str(tmp_path / "s")])
    assert seen == ["reduce-overhead"], res.output
    assert SteerOptions(compile="default").resolve("toy").compile == "default"
    bad = CliRunner().invoke(app, ["bench", "--compile", "fast", "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "--compile must be one of" in bad.output


def test_speed_times_the_eager_iteration_beside_the_compiled_one(den, one_thread):
    from l2s.steering.speed import SpeedConfig, run_speed

    cfg = SpeedConfig(model="toy", options=SteerOptions(steps=4, steer_until=2, iterations=2,
                                                        compile="reduce-overhead"),
                      repeats=1, end_to_end=False)
    with torch.compiler.set_stance("force_eager"):  # the plumbing, not the compiler
        rep = run_speed(cfg, denoiser=den)
    assert list(rep.units) == ["plain_step", "ours_iteration", "ours_eager_iteration",
                                  "reference_iteration"]
    assert rep.ratios["compiled_vs_eager_iteration"] > 0
    assert rep.ratios["compiled_vs_eager_update_error"] < 1e-5  # the same update
    assert "ops" not in rep.units["ours_iteration"]  # a compiled region is not counted
    assert rep.units["ours_iteration"]["warmup_ms"] > 0  # the compilation, on a device
    plain = run_speed(replace(cfg, options=replace(cfg.options, compile="off")), denoiser=den)
    assert "ours_eager_iteration" not in plain.units
    assert plain.ratios["compiled_vs_eager_iteration"] is None
    assert plain.ratios["compiled_vs_eager_update_error"] is None


@pytest.mark.slow
def test_compiled_steering_gives_the_eager_images_in_one_graph(den, one_thread):
    """Compiles the toy UNet's forward + backward (1-3 min on a CPU, the first time): no graph
    break, and a batch whose images stop at different iterations (padded batches of 3, 2 and 1)
    steers as it does eagerly. Fails with Inductor's vectorised CPU code, whose batch-1
    backward is wrong (l2s.engine.compiled)."""
    from torch._dynamo.utils import counters

    from l2s.steering.job import build_loss

    prompts = ["a circle left of a square", "a triangle above a ring",
               "a square below a circle"]
    triplets = [parse(p) for p in prompts]
    loss, _ = build_loss("l2s", den, "toy")
    settings = SteerOptions().resolve("toy")
    lat = seeded_latents(den, [0, 1, 2])
    torch._dynamo.reset()
    counters.clear()
    eager, es = steer_latents(den, prompts, triplets, loss, settings, lat)
    comp, cs = steer_latents(den, prompts, triplets, loss, replace(settings, compile="default"),
                             lat)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert [r.image_updates for r in cs.steps] == [r.image_updates for r in es.steps]
    assert len({r.image_updates for r in es.steps}) > 1 or es.steps[0].image_updates < \
        3 * es.steps[0].iterations  # images stopped at different iterations: padding ran
    for a, b in zip(cs.steps, es.steps, strict=True):
        assert a.loss_after == pytest.approx(b.loss_after, rel=1e-3, abs=1e-5)
    torch.testing.assert_close(comp, eager, rtol=1e-3, atol=1e-3)
