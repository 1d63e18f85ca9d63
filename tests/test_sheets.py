"""What a user looks at: steer's plain-vs-steered grid (--compare-plain) and bench's paged
contact sheets and disagreement sheet."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from l2s import bench
from l2s.bench import BenchConfig, run_bench, sheets
from l2s.engine.registry import World
from l2s.engine.sampling import seeded_latents
from l2s.families.tiny import tiny_sd
from l2s.relations import parse
from l2s.steering.job import SteerConfig, steer
from l2s.steering.losses import CentroidLoss
from l2s.steering.options import SteerOptions
from l2s.steering.verify import generate_verified

PROMPT = "a dog left of a cat"
OPTIONS = SteerOptions(steps=4, steer_from=0, steer_until=2, iterations=2, step_size=100.0)


@pytest.fixture
def tiny():
    return tiny_sd("v_prediction")


def _steer(tmp_path, den, **kw):
    cfg = SteerConfig(prompt=PROMPT, method="centroid", out=str(tmp_path / "o"),
                      num_images=3, compare_plain=True, options=OPTIONS)
    return steer(replace(cfg, **kw), denoiser=den)


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_compare_plain_saves_and_judges_the_plain_images_beside_the_steered(tmp_path, tiny,
                                                                          one_thread):
    """Catches --compare-plain that only times the plain pass: the plain images are the plain
    generation of the same seeds, saved, judged by the world's judge (the one the steered
    images get), and drawn with them in one labelled grid."""
    calls = []

    def judge(images, triplets):  # a world that says yes to bright images
        calls.append(images.copy())
        return [bool(img.mean() > 127) for img in images]

    tiny.world = World("bright", ("dog", "cat"), judge, judged_by="brightness")
    res = _steer(tmp_path, tiny)
    rep = res.report
    plain = np.stack([_read(p) for p in rep["plain_images"]])
    assert [p.split("/")[-1] for p in rep["plain_images"]] == [
        "plain_0000.png", "plain_0001.png", "plain_0002.png"]
    ref = steer(SteerConfig(prompt=PROMPT, method="plain", num_images=3, options=OPTIONS),
                denoiser=tiny).images
    np.testing.assert_array_equal(plain, ref)
    assert not np.array_equal(plain, res.pixels)  # steering moved them
    assert rep["achieved_plain"] == {"by": "brightness", "per_image": judge(plain, None),
                                     "count": sum(judge(plain, None)), "of": 3}
    assert any(np.array_equal(c, plain) for c in calls)
    assert rep["achieved"]["per_image"] == judge(res.pixels, None)
    grid = Image.open(rep["compare_grid"])
    assert grid.width > 3 * 128 and grid.height > 2 * 128  # 3 seeds x (plain, steered)


def _losses_at_probe(den, n: int, options: SteerOptions) -> list[float]:
    """Each plain image's centroid loss at the step the verdict is taken."""
    from l2s.engine.sampling import sample
    from l2s.steering.loop import Steerer
    from l2s.steering.verify import classifier_probe

    s = options.resolve("toy")
    prompts, trip = [PROMPT] * n, [parse(PROMPT)] * n
    step = classifier_probe(den, prompts, trip, CentroidLoss(), s).step
    st, losses = Steerer(den, prompts, trip, CentroidLoss(), s), []

    def spy(state):
        if state["step"] == step:
            with st.recorder() as rec, rec.truncated():
                rec.set_weights(st.token_weights(list(range(n))))
                den.predict(state["latents"], state["t"], st.cond, guidance=s.guidance)
            losses.extend(st.plan.score(CentroidLoss(), rec.stacked(), list(range(n)),
                                        state["t"], step).loss.tolist())

    sample(den, prompts, steps=s.steps, guidance=s.guidance,
           latents=seeded_latents(den, list(range(n))), callback=spy)
    return losses


def test_without_a_world_the_loss_judges_each_plain_and_steered_image(tmp_path, tiny,
                                                                     one_thread):
    """Catches an open-vocabulary comparison judged by one batch-wide number (or one image's
    verdict given to all): each plain image gets its own loss's verdict at the last steered
    step, the one --verify's check gives it; a threshold no loss is over passes every image,
    steered ones included."""
    losses = _losses_at_probe(tiny, 6, OPTIONS)
    cut = float(np.median(losses))
    opts = replace(OPTIONS, loss_threshold=cut)
    rep = _steer(tmp_path, tiny, options=opts, num_images=6).report
    assert rep["achieved_plain"]["per_image"] == [v <= cut for v in losses]
    assert 0 < rep["achieved_plain"]["count"] < 6
    assert rep["achieved"]["by"].startswith("the centroid loss")
    checked = generate_verified(tiny, [PROMPT] * 6, [parse(PROMPT)] * 6,
                                seeded_latents(tiny, list(range(6))), opts.resolve("toy"),
                                CentroidLoss())
    assert checked.passed_plain == rep["achieved_plain"]["per_image"]
    lenient = _steer(tmp_path, tiny, options=replace(OPTIONS, loss_threshold=1e9)).report
    assert lenient["achieved"]["per_image"] == lenient["achieved_plain"]["per_image"] == \
        [True] * 3


def _oracle(flip_every: int | None):
    """A bench method drawing the prompt's layout (mirrored on every flip_every-th prompt)."""
    from test_bench import _LAYOUT, _OPPOSITE

    from l2s.toy.scenes import layout_scene

    def method(prompts, seeds):
        imgs = []
        for p in prompts:
            t = p.triplet
            flip = flip_every is not None and p.index % flip_every == 0
            a, b = _LAYOUT[_OPPOSITE[t.relation] if flip else t.relation]
            imgs.append(layout_scene([(t.subject, a), (t.object, b)], 32).image)
        import torch

        return torch.from_numpy(np.stack(imgs)).float() / 255

    return lambda ctx: method


def test_bench_sheets_show_every_image_paged_and_where_methods_disagree(monkeypatch, tmp_path,
                                                                       one_thread):
    """Catches contact sheets cut at 40 images, one sheet per method only: every image is on
    a page (a stale page of a larger earlier summary goes), and the disagreement sheet has a
    row for each image that one method gets right and the other wrong."""
    monkeypatch.setitem(bench.METHODS, "right", _oracle(None))
    monkeypatch.setitem(bench.METHODS, "mixed", _oracle(3))
    monkeypatch.setattr(sheets, "COLUMNS", 2)
    monkeypatch.setattr(sheets, "PAGE_ROWS", 2)
    monkeypatch.setattr(sheets, "DISAGREE_ROWS", 2)
    (tmp_path / "contact_right_position-9.png").write_bytes(b"stale")
    run_bench(BenchConfig(methods=("right", "mixed"), prompts=9, num_images=1,
                          out=str(tmp_path)), denoiser=object())
    pages = sorted(p.name for p in tmp_path.glob("contact_right_position*.png"))
    assert pages == ["contact_right_position-2.png", "contact_right_position-3.png",
                     "contact_right_position.png"]  # 9 images, 4 a page
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    wrong = sorted(r["prompt_index"] for r in records if r["method"] == "mixed"
                   and not r["correct"])
    assert wrong == [0, 3, 6]  # three disagreements, two rows a page
    assert sorted(p.name for p in tmp_path.glob("disagreements*.png")) == [
        "disagreements-2.png", "disagreements.png"]
    first, second = (Image.open(tmp_path / n) for n in ("disagreements.png",
                                                         "disagreements-2.png"))
    assert first.height > second.height  # two rows, then one


def test_attention_figure_draws_each_images_own_curves_from_before_the_first_update(
        tmp_path, tiny, monkeypatch, one_thread):
    """Catches the batch-wide curves drawn in every image's figure, starting after the first
    update: each figure gets its own image's loss and p(target) per steered step, before the
    step's updates and after them; their mean over the images is the step's record."""
    from l2s.steering import plots

    got = {}
    real = plots.attention_figure

    def spy(image, attention, values, names, path, title="", **kw):
        got[title.split(":")[0]] = (values, len(attention))
        return real(image, attention, values, names, path, title, **kw)

    monkeypatch.setattr(plots, "attention_figure", spy)
    res = steer(SteerConfig(prompt=PROMPT, method="centroid", out=str(tmp_path / "o"),
                            num_images=2, save_attention=True,
                            options=replace(OPTIONS, step_size=3000.0)), denoiser=tiny)
    steps = res.report["steps"]
    (a, na), (b, nb) = got["seed 0"], got["seed 1"]
    assert na == nb == len(steps) == len(a) == len(b)
    assert [v.step for v in a] == [r["step"] for r in steps]
    assert [v.loss_before for v in a] != [v.loss_before for v in b]  # each image its own
    for r, va, vb in zip(steps, a, b, strict=True):
        assert (va.loss_before + vb.loss_before) / 2 == pytest.approx(r["loss_before"], rel=1e-4)
        assert (va.loss_after + vb.loss_after) / 2 == pytest.approx(r["loss_after"], rel=1e-4)
        assert (va.p_after + vb.p_after) / 2 == pytest.approx(r["p_target"], rel=1e-4, abs=1e-6)
    # the first point is before any update: the updates of step 0 lowered the loss
    assert a[0].loss_before > a[0].loss_after or b[0].loss_before > b[0].loss_after


def test_steer_summary_gives_before_and_after_of_the_same_quantity():
    """Catches "loss 15.21 -> 0.0144, p(target) 1.000 -> 0.986": the first step's loss
    before its updates beside the last step's loss after them, and p(target) values of
    different steps as if one moved to the other."""
    from l2s.cli.steer import _summary

    rec = {"iterations": 2, "forward_ms": 1.0, "backward_ms": 1.0, "update_ms": 1.0}
    rep = {"settings": {"steps": 10}, "steps": [
        {**rec, "step": 0, "loss_before": 15.21, "loss_after": 0.5, "p_target": 0.9},
        {**rec, "step": 3, "loss_before": 0.2, "loss_after": 0.0144, "p_target": 0.986}]}
    line = _summary(rep)[0]
    assert "step 0 15.21 -> 0.5, step 3 0.2 -> 0.0144" in line
    assert "15.21 -> 0.0144" not in line and "0.900 -> 0.986" not in line
    assert "p(target) after the last steered step 0.986" in line
