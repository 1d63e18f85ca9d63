"""The steering loop on tiny offline components: descent, selectivity, round robin."""

from dataclasses import replace

import pytest
import torch
from step_syncs import assert_step_syncs_do_not_grow

from l2s.engine.sampling import seeded_latents
from l2s.relations import parse
from l2s.steering.loop import SteerSettings, steer_latents
from l2s.steering.losses import CentroidLoss
from l2s.steering.optimizers import optimizers


class Spy(CentroidLoss):
    """The centroid loss, remembering which relations each call asked for."""

    def __init__(self):
        super().__init__(margin=0.3)
        self.calls = []

    def __call__(self, maps, t, relations, *, step):
        self.calls.append(list(relations))
        return super().__call__(maps, t, relations, step=step)


def test_loss_decreases_over_iterations_on_a_fixed_seed(den):
    prompt = "a dog left of a cat"
    settings = SteerSettings(steps=4, guidance=2.0, steer_until=1, iterations=6,
                             step_size=2000.0)
    imgs, stats = steer_latents(den, [prompt], [parse(prompt)], CentroidLoss(margin=0.3),
                                settings, seeded_latents(den, [0]))
    (rec,) = stats.steps
    assert imgs.shape == (1, 32, 32, 3)
    assert rec.iterations == 6
    assert rec.loss_after < rec.loss_before
    assert rec.forward_ms > 0 and rec.backward_ms > 0 and rec.update_ms >= 0


def test_no_relation_means_no_backward_pass(den, monkeypatch):
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, stats = steer_latents(den, ["a dog and a cat"], [[]], CentroidLoss(),
                             SteerSettings(steps=3, guidance=2.0), seeded_latents(den, [0]))
    assert calls == [] and stats.steps == []


def test_plain_images_in_a_batch_are_left_alone(den):
    lat = seeded_latents(den, [0, 1])
    settings = SteerSettings(steps=3, guidance=2.0, steer_until=1, iterations=3,
                             step_size=5000.0)
    steered, _ = steer_latents(den, ["a dog left of a cat", "a dog"],
                               [parse("a dog left of a cat"), []], CentroidLoss(), settings, lat)
    plain, _ = steer_latents(den, ["a dog left of a cat", "a dog"], [[], []], CentroidLoss(),
                             settings, lat)
    torch.testing.assert_close(steered[1], plain[1])
    assert not torch.allclose(steered[0], plain[0])


def test_multi_relation_prompts_go_round_robin(den):
    prompt = "a teddy bear above a cup and a cup left of a bowl"
    spy = Spy()
    settings = SteerSettings(steps=2, guidance=2.0, steer_until=1, iterations=4,
                             step_size=1.0, threshold_start=-1.0, threshold_end=-1.0)
    steer_latents(den, [prompt], [parse(prompt)], spy, settings, seeded_latents(den, [0]))
    assert spy.calls == [["above"], ["left of"], ["above"], ["left of"]]


def test_early_exit_once_the_loss_is_under_threshold(den):
    settings = SteerSettings(steps=2, guidance=2.0, steer_until=1, iterations=10,
                             threshold_start=10.0, threshold_end=10.0)
    _, stats = steer_latents(den, ["a dog left of a cat"], [parse("a dog left of a cat")],
                             CentroidLoss(), settings, seeded_latents(den, [0]))
    assert stats.steps[0].iterations == 0 and stats.steps[0].loss_before is not None


def test_settings():
    s = SteerSettings(steps=50)
    assert s.steered_steps() == 25
    assert SteerSettings(steps=50, steer_until=10).steered_steps() == 10
    assert s.threshold(0) == pytest.approx(1e-5) and s.threshold(5) == pytest.approx(7e-5)
    # the early exit rises over 3 steps (fails if the ramp's length changes)
    assert [s.threshold(k) for k in (1, 2, 3)] == pytest.approx([3e-5, 5e-5, 7e-5])
    with pytest.raises(ValueError, match="optimizer"):
        SteerSettings(optimizer="lbfgs")


class Fixed(CentroidLoss):
    """The centroid loss, except that the images listed in ``done`` report a zero loss."""

    def __init__(self, done):
        super().__init__(margin=0.3)
        self.done, self.batches = set(done), []

    def __call__(self, maps, t, relations, *, step):
        loss, p = super().__call__(maps, t, relations, step=step)
        self.batches.append(maps.shape[0])
        if len(self.batches) == 1 and self.done:  # first forward: the whole batch, in order
            mask = torch.tensor([i in self.done for i in range(maps.shape[0])])
            loss = torch.where(mask, torch.zeros_like(loss), loss)
        return loss, p


def _steer(den, settings, loss=None, n=2, prompts=None):
    prompts = prompts or ["a dog left of a cat", "a cat above a bowl"][:n]
    return steer_latents(den, prompts, [parse(p) for p in prompts],
                         loss or CentroidLoss(margin=0.3), settings,
                         seeded_latents(den, list(range(len(prompts)))))


def test_truncated_forward_changes_nothing_but_the_cost(den):
    base = SteerSettings(steps=3, guidance=2.0, steer_until=2, iterations=3, step_size=2000.0)
    full, s_full = _steer(den, replace(base, truncate_forward=False))
    cut, s_cut = _steer(den, base)
    torch.testing.assert_close(cut, full, rtol=0, atol=0)
    assert [r.image_updates for r in s_cut.steps] == [r.image_updates for r in s_full.steps]


def test_an_image_steered_in_a_batch_moves_as_it_would_alone(den):
    s = SteerSettings(steps=3, guidance=2.0, steer_until=2, iterations=3, step_size=2000.0)
    prompts = ["a dog left of a cat", "a cat above a bowl"]
    both, _ = _steer(den, s, prompts=prompts)
    for i, p in enumerate(prompts):
        alone, _ = steer_latents(den, [p], [parse(p)], CentroidLoss(margin=0.3), s,
                                 seeded_latents(den, [0, 1])[i:i + 1])
        torch.testing.assert_close(both[i], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "normalized"])
def test_an_image_that_stopped_never_moves_again_and_leaves_the_batch(den, optimizer):
    """Image 0 passes at its first check; image 1 keeps iterating (Adam's state included)."""
    s = SteerSettings(steps=2, guidance=2.0, steer_until=1, iterations=3, step_size=0.5,
                      optimizer=optimizer, threshold_start=1e-9, threshold_end=1e-9)
    loss = Fixed(done=[0])
    _, stats = _steer(den, s, loss=loss)
    plain, _ = _steer(den, replace(s, iterations=0))
    steered, _ = _steer(den, s, loss=Fixed(done=[0]))
    torch.testing.assert_close(steered[0], plain[0], rtol=0, atol=0)
    assert not torch.allclose(steered[1], plain[1])
    assert loss.batches == [2, 1, 1]  # only the image still iterating is forwarded
    assert stats.steps[0].image_updates == 3 and stats.steps[0].iterations == 3


def test_budget_caps_iterations_per_image_over_the_generation(den):
    s = SteerSettings(steps=4, guidance=2.0, steer_until=3, iterations=3, step_size=100.0,
                      threshold_start=-1.0, threshold_end=-1.0, budget=4)
    _, stats = _steer(den, s)
    assert [r.image_updates for r in stats.steps] == [6, 2, 0]
    assert sum(r.iterations for r in stats.steps) == 4


def test_steer_from_skips_the_noisiest_steps(den):
    s = SteerSettings(steps=4, guidance=2.0, steer_until=3, iterations=1, step_size=100.0,
                      steer_from=1)
    _, stats = _steer(den, s, n=1)
    assert [r.step for r in stats.steps] == [1, 2]


def test_update_rules_per_image():
    z = torch.zeros(2, 3, 4, 4)
    g = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    g[1] *= 100
    rows = torch.arange(2)
    rms = lambda d: d.flatten(1).pow(2).mean(1).sqrt()  # noqa: E731
    norm = optimizers()["normalized"](0.1, z)
    torch.testing.assert_close(rms(norm.step(rows, z, g)), torch.full((2,), 0.1))
    adam = optimizers()["adam"](0.1, z)
    first = adam.step(rows[1:], z[1:], g[1:])  # image 1 only: image 0's moments stay zero
    assert rms(first)[0] == pytest.approx(0.1, rel=1e-3)  # Adam's first step: lr * sign
    assert adam.n.tolist() == [0.0, 1.0] and adam.m[0].abs().sum() == 0


class Held(Spy):
    """The centroid loss (spying on the relations asked), except that "above" always holds:
    its loss is 0 (still in the graph)."""

    def __call__(self, maps, t, relations, *, step):
        loss, p = super().__call__(maps, t, relations, step=step)
        held = torch.tensor([r == "above" for r in relations])
        return torch.where(held, loss * 0, loss), torch.where(held, torch.ones_like(p), p)


TWO = "a teddy bear above a cup and a cup left of a bowl"


@pytest.mark.parametrize("schedule", ["worst", "sum"])
def test_a_held_relation_leaves_the_iterations_to_the_one_that_fails(den, schedule):
    """With "above" held, steering both relations is steering "cup left of bowl" alone.

    Catches a schedule that stops an image when the relation it happens to read holds (the
    round robin's exit: no update at all here), steers the held relation or the wrong row's,
    or scores only one relation per iteration."""
    s = SteerSettings(steps=3, guidance=2.0, steer_until=2, iterations=3, step_size=2000.0,
                      threshold_start=1e-6, threshold_end=1e-6)
    lat = seeded_latents(den, [0])
    spy = Held()
    both, stats = steer_latents(den, [TWO], [parse(TWO)], spy,
                                replace(s, relation_schedule=schedule), lat)
    only, _ = steer_latents(den, [TWO], [parse(TWO)[1:]], Held(), s, lat)
    torch.testing.assert_close(both, only, atol=1e-5, rtol=1e-4)
    assert stats.steps[0].image_updates == 3
    assert spy.calls[0] == ["above", "left of"]  # every relation scored from one forward
    rr, rr_stats = steer_latents(den, [TWO], [parse(TWO)], Held(), s, lat)  # round robin
    assert rr_stats.steps[0].image_updates == 0 and not torch.allclose(rr, both)


def test_worst_schedule_in_a_batch_moves_each_image_as_it_would_alone(den):
    """Images with 2 and 1 relations in one batch: the padded loss table keeps each image's
    losses on its own row."""
    s = SteerSettings(steps=3, guidance=2.0, steer_until=2, iterations=3, step_size=2000.0,
                      relation_schedule="worst", threshold_start=-1.0, threshold_end=-1.0)
    prompts = ["a dog left of a cat", TWO]
    lat = seeded_latents(den, [0, 1])
    both, _ = steer_latents(den, prompts, [parse(p) for p in prompts], CentroidLoss(0.3), s, lat)
    for i, p in enumerate(prompts):
        alone, _ = steer_latents(den, [p], [parse(p)], CentroidLoss(0.3), s, lat[i:i + 1])
        torch.testing.assert_close(both[i], alone[0], atol=1e-5, rtol=1e-4)


def test_relation_schedule_is_checked():
    with pytest.raises(ValueError, match="relation schedule"):
        SteerSettings(relation_schedule="random")


def test_every_schedule_steers_one_relation_alike(den):
    """A prompt with one relation is steered the same whatever the schedule (so a model's
    schedule default leaves single-relation results as they were)."""
    s = SteerSettings(steps=3, guidance=2.0, steer_until=2, iterations=3, step_size=2000.0,
                      threshold_start=1e-3, threshold_end=1e-3)
    ref, _ = _steer(den, s)
    for schedule in ("worst", "sum"):
        other, _ = _steer(den, replace(s, relation_schedule=schedule))
        torch.testing.assert_close(other, ref, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", ["round-robin", "sum"])
def test_host_syncs_per_step_do_not_grow_with_iterations(den, schedule):
    """Every extra host read or tensor made from host data inside an iteration stalls a GPU
    once per iteration (the SD2.1 iteration went 96.6 -> 65.4 ms on an H100 when three were
    removed). The loop reads the device once per iteration by design (``.tolist()`` of the
    go-on mask, a device-to-host copy on a GPU, not a dispatched op on a CPU), and the step's
    counters and losses once, in one ``.tolist()``. Fails if a forward gets its timestep from
    the host (diffusers copies a Python timestep to the device), if "sum" rebuilds its loss
    table every iteration, if the step reads a counter or loss on its own (``.item()``,
    ``int(t)``: one sync each; the step used to read six), or if every step copies its
    images' indices to the device again."""
    assert_step_syncs_do_not_grow(den, "a dog left of a cat", iterations=(1, 4),
                                  relation_schedule=schedule)


def test_a_loss_registered_by_name_is_a_method_of_steer_and_bench(den, monkeypatch):
    """``register_loss`` makes a loss a ``--method`` choice: ``l2s steer`` and ``l2s bench``
    build it from its factory and steer with it. Fails if the method choices are a fixed
    list, or the loss steered with is not the registered one."""
    from l2s.steering import losses as registry
    from l2s.steering.job import SteerConfig, SteerError, steer
    from l2s.steering.options import SteerOptions

    monkeypatch.setattr(registry._LOSSES, "_items", dict(registry._LOSSES._items))
    spy, asked = Spy(), []
    registry.register_loss("test-spy")(lambda request: asked.append(request) or spy)
    res = steer(SteerConfig("a dog left of a cat", method="test-spy",
                            options=SteerOptions(steps=3, steer_until=2, iterations=2)),
                denoiser=den)
    assert res.report["method"] == "test-spy" and asked[0].denoiser is den
    assert spy.calls and all(r == ["left of"] for r in spy.calls)
    with pytest.raises(SteerError, match="unknown method 'nope'.*test-spy"):
        registry.make_loss("nope", asked[0])
    # ... and of bench, scored the way l2s and centroid are
    from l2s.bench.methods import MethodContext, methods
    from l2s.bench.run import BenchConfig
    from l2s.bench.suites import BenchPrompt

    spy.calls.clear()
    cfg = BenchConfig(model="toy", options=SteerOptions(steps=3, steer_until=2, iterations=2))
    ctx = MethodContext(den, cfg, lambda images, prompts: [True] * len(images))
    prompt = BenchPrompt(0, "a dog left of a cat", {"tag": "position"},
                         tuple(parse("a dog left of a cat")))
    images = methods()["test-spy"](ctx)([prompt], [0])
    assert images.shape == (1, 32, 32, 3) and spy.calls


def test_plugins_add_losses_and_optimizers_through_entry_points(den, monkeypatch):
    """An installed plugin names a module under the ``l2s.losses`` / ``l2s.optimizers`` entry
    points; loading it registers its loss or update rule, which then steers. Fails if the
    registries do not read the entry points, or the loop does not take its update rule from
    the registry."""
    import importlib.metadata

    from l2s.steering import losses, optimizers
    from l2s.steering.job import SteerConfig, steer_methods
    from l2s.steering.options import SteerOptions

    class Sign(optimizers.LatentOptimizer):
        steps = 0

        def step(self, rows, z, g):
            Sign.steps += 1
            return z - self.step_size * g.sign()

    class EntryPoint:  # what importlib.metadata gives for an installed plugin
        def __init__(self, register):
            self.load = register

    plugins = {"l2s.losses": [EntryPoint(lambda: losses.register_loss("test-plugin")(
                   lambda request: CentroidLoss(margin=0.4)))],
               "l2s.optimizers": [EntryPoint(lambda: optimizers.register_optimizer(
                   "test-sign")(Sign))]}
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: plugins.get(group, []))
    for module, table in ((losses, "_LOSSES"), (optimizers, "_OPTIMIZERS")):
        reg = getattr(module, table)
        monkeypatch.setattr(reg, "_items", dict(reg._items))
        monkeypatch.setattr(reg, "_discovered", False)
    assert "test-plugin" in steer_methods()
    SteerConfig("a dog left of a cat", method="test-plugin",
                options=SteerOptions(optimizer="test-sign"))  # accepted
    s = SteerSettings(steps=2, guidance=2.0, steer_until=1, iterations=2, step_size=0.01,
                      optimizer="test-sign", threshold_start=-1.0, threshold_end=-1.0)
    lat = seeded_latents(den, [0])
    steered, _ = steer_latents(den, ["a dog left of a cat"], [parse("a dog left of a cat")],
                               CentroidLoss(margin=0.3), s, lat)
    plain, _ = steer_latents(den, ["a dog left of a cat"], [[]], CentroidLoss(), s, lat)
    assert Sign.steps == 2 and not torch.allclose(steered, plain)


def test_steering_modules_import_one_way():
    """No import circle among the modules of ``l2s.steering``, imports inside functions
    included (``verify`` used to import ``job``, which imports ``verify``). Fails on a new
    circle."""
    import ast
    from graphlib import CycleError, TopologicalSorter
    from pathlib import Path

    import l2s.steering

    folder = Path(l2s.steering.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        name = f"l2s.steering.{path.stem}" if path.stem != "__init__" else "l2s.steering"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("l2s.steering"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("l2s.steering")}
        graph[name] = deps - {name}
    assert "l2s.steering.loop" in graph["l2s.steering.verify"]  # the walk sees imports
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"import circle in l2s.steering: {e.args[1]}")
