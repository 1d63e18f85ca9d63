"""Worlds and the registries of sources, detectors and suites: the core asks the backbone's
world (never a family or detector name) and finds extensions through entry points."""

import sys
from importlib.metadata import EntryPoint
from types import SimpleNamespace

import pytest
import torch

from l2s.bench import BenchConfig, BenchError, run_bench
from l2s.bench.detectors import DETECTOR_REGISTRY, detector_available, load_detector
from l2s.bench.scoring import score_relation
from l2s.bench.suites import SUITE_REGISTRY, suite_names, suite_prompts
from l2s.engine.registry import World, world_of
from l2s.inversion.sources.base import SOURCE_REGISTRY, SourceOptions, per_relation, sources
from l2s.relations import Triplet
from l2s.steering.job import relation_achieved
from l2s.steering.loop import SteerStats
from l2s.steering.verify import detector_check
from l2s.toy.scenes import layout_scene
from l2s.toy.world import WORLD, ToyDetector

LEFT = Triplet("circle", "left of", "square")
# A toy-drawn layout where "circle left of square" holds: the toy detector says yes.
IMAGE = layout_scene([("circle", (2, 12, 12, 22)), ("square", (20, 12, 30, 22))], 32).image


def _dots_world(calls: list) -> World:
    """A made-up closed world whose objects are toy shape names, with a judge that says no."""
    def judge(images, triplets):
        calls.append((len(images), [list(ts) for ts in triplets]))
        return [False] * len(images)

    return World("dots", ("circle", "square"), judge, judged_by="dot counter",
                 description="two dots", suites=("dots",),
                 extras=lambda names, by_class, size: {"dots_seen": len(by_class)})


def test_a_second_closed_world_is_judged_by_its_own_judge_not_as_the_toy():
    """Catches "is this the toy?" answered by the known objects: a world whose objects are
    toy shapes would be judged by the toy detector (which says the relation holds here)."""
    calls = []
    den = SimpleNamespace(world=_dots_world(calls), name="dots")
    assert WORLD.judge(IMAGE[None], [[LEFT]]) == [True]  # the toy's verdict differs
    got = relation_achieved(den, IMAGE[None], [LEFT], SteerStats())
    assert got == {"by": "dot counter", "per_image": [False], "count": 0, "of": 1}
    check = detector_check(den, [[LEFT]])
    assert check(torch.from_numpy(IMAGE[None]).float() / 255) == [False]
    assert calls == [(1, [[LEFT]]), (1, [[LEFT]])]
    # An open-vocabulary backbone has no world: no detector check, steer reports p(target).
    assert detector_check(SimpleNamespace(world=None), [[LEFT]]) is None


def test_bench_refuses_and_extras_by_the_backbones_world(tmp_path):
    """Catches the refusal and the bench extras keyed on family or detector names."""
    den = SimpleNamespace(world=_dots_world([]), name="dots")
    with pytest.raises(BenchError, match="only draws two dots \\(the dots world\\).*--suite dots"):
        run_bench(BenchConfig(suite="shapes", model="dots", out=str(tmp_path)), denoiser=den)
    assert world_of("dots", den) is den.world
    assert world_of("toy") is WORLD and world_of("sd2.1") is None
    rec = score_relation(IMAGE, LEFT, ToyDetector(), den.world)
    assert rec["correct"] and rec["dots_seen"] == 2 and "both_present" not in rec
    toy_rec = score_relation(IMAGE, LEFT, ToyDetector(), WORLD)
    assert toy_rec["both_present"] and not toy_rec["fused"]


def test_the_toy_world_registers_what_it_names():
    """Catches a world naming suites, sources or a detector no registry knows."""
    assert set(WORLD.suites) <= set(suite_names())
    assert set(WORLD.sources) <= set(sources())
    assert DETECTOR_REGISTRY.get(WORLD.detector) is not None
    assert all(SUITE_REGISTRY.get(s).detector == WORLD.detector for s in WORLD.suites)
    assert isinstance(load_detector("toy"), ToyDetector) and detector_available("toy")


PLUGIN = '''
from l2s.bench.detectors import RegisteredDetector, register_detector
from l2s.bench.geneval import position_metadata
from l2s.bench.suites import BenchPrompt, Suite, register_suite
from l2s.inversion.sources.base import Source, register_source
from l2s.relations import Triplet


def prompts(n, seed):
    t = Triplet("dot", "above", "ring")
    return [BenchPrompt(i, "a dot above a ring", position_metadata([t], "a dot above a ring"),
                        (t,)) for i in range(n or 2)]


register_suite(Suite("dots", prompts, 3, "dot-counter"))
register_detector(RegisteredDetector("dot-counter", lambda device: "a dot counter", "dots"))
register_source(Source("dots", lambda options, report, denoiser=None: iter(()), (1, 1, 1)))
'''


@pytest.mark.parametrize(("registry", "group"), [(SUITE_REGISTRY, "l2s.suites"),
                                                 (DETECTOR_REGISTRY, "l2s.detectors"),
                                                 (SOURCE_REGISTRY, "l2s.sources")])
def test_entry_points_of_an_installed_distribution_are_discovered(
        registry, group, tmp_path, monkeypatch):
    """Catches a registry that never reads its entry-point group (a plugin package's suite,
    detector or source would be unknown)."""
    (tmp_path / "l2s_dots_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "l2s_dots_plugin", raising=False)  # imported afresh
    eps = {group: [EntryPoint("dots", "l2s_dots_plugin", group)]}
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: eps.get(group, []))
    for reg in (SUITE_REGISTRY, DETECTOR_REGISTRY, SOURCE_REGISTRY):
        monkeypatch.setattr(reg, "_items", dict(reg._items))  # restored afterwards
    monkeypatch.setattr(registry, "_discovered", False)
    name = "dot-counter" if registry is DETECTOR_REGISTRY else "dots"
    assert name in registry.names()
    if registry is SUITE_REGISTRY:
        assert [p.prompt for p in suite_prompts("dots", 1, 0)] == ["a dot above a ring"]
    elif registry is DETECTOR_REGISTRY:
        assert load_detector("dot-counter") == "a dot counter"
    else:
        assert per_relation("dots", SourceOptions()) == (1, 1, 1)
