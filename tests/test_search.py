"""best-of-N search (l2s.steering.search) and its bench method: the choice, the seeds, the
verifier reading the plain pass's own maps, the verifier report and the frontier plot."""

import json

import pytest
import torch
from typer.testing import CliRunner

from l2s.bench import BenchConfig, run_bench
from l2s.bench.methods import Generated
from l2s.bench.stats import verifier_summary, wilson_interval
from l2s.engine.sampling import sample, seeded_latents, to_uint8
from l2s.errors import L2SError
from l2s.relations import parse
from l2s.steering.losses import RelationLoss
from l2s.steering.options import SteerOptions
from l2s.steering.search import best_of, candidate_seed

PROMPTS = ["a circle to the left of a square", "a triangle above a cross"]
SETTINGS = SteerOptions(steps=3).resolve("toy")


@pytest.fixture(scope="module")
def toy():
    from l2s.engine.loading import load_backbone

    return load_backbone("toy", device="cpu")


class RiggedLoss(RelationLoss):
    """A verifier whose loss per scored row comes from a table (rows: image-major, candidate
    minor), the same at every step; it keeps the maps it was given, per step."""

    def __init__(self, table, steps):
        self.table, self.steps, self.seen = torch.tensor(table), steps, {}

    def verdict_steps(self, timesteps):
        return self.steps

    def __call__(self, maps, t, relations, *, step):
        self.seen[step] = maps.clone()
        loss = self.table[: len(maps)]
        return loss, torch.exp(-loss)


def test_best_of_keeps_the_candidate_the_verifier_ranks_first(toy, one_thread):
    """Bugs caught: keeping the least probable candidate (argmin of p), candidates and images
    transposed in the (B, N) reshape, a tie not going to the first candidate, or the kept
    image not being the kept candidate's (its seed's plain image)."""
    loss = RiggedLoss([2.0, 0.1, 1.0, 0.5, 0.5, 3.0], steps=[0, 2])
    found = best_of(toy, PROMPTS, [parse(p) for p in PROMPTS], [11, 12], 3, SETTINGS, loss)
    assert found.chosen == [1, 0]
    assert torch.allclose(found.p[0], torch.exp(-torch.tensor([2.0, 0.1, 1.0])))
    assert torch.equal(found.images[0], found.candidates[0, 1])
    assert torch.equal(found.images[1], found.candidates[1, 0])
    alone = sample(toy, [PROMPTS[0]], steps=3, guidance=SETTINGS.guidance,
                   latents=seeded_latents(toy, [found.seeds[0][1]]))
    assert (to_uint8(alone) == to_uint8(found.images[:1])).all()


def test_candidates_come_from_distinct_seeds_the_same_whatever_the_batch(toy, one_thread):
    """Bugs caught: candidates sharing a seed (N copies of one image), seeds that depend on
    the batch (a resumed or re-batched run choosing among other images), or candidate 0 not
    being the image's own seed (plain's image no longer among the candidates)."""
    grid = [candidate_seed(s, k) for s in range(0, 40_000, 1000) for k in range(16)]
    assert len(set(grid)) == len(grid)
    assert all(0 <= s < 2**56 for s in grid)
    loss = RiggedLoss([0.0] * 8, steps=[2])
    both = best_of(toy, PROMPTS, [parse(p) for p in PROMPTS], [7, 8], 2, SETTINGS, loss)
    one = best_of(toy, PROMPTS[1:], [parse(PROMPTS[1])], [8], 2, SETTINGS, loss)
    assert both.seeds[1] == one.seeds[0] == [8, candidate_seed(8, 1)]
    assert (to_uint8(both.candidates[1]) == to_uint8(one.candidates[0])).all()
    assert not (to_uint8(both.candidates[0, 0]) == to_uint8(both.candidates[0, 1])).all()


def test_a_batch_cap_generates_in_chunks_and_chooses_the_same_images(toy, one_thread):
    """Bugs caught: a cap that is ignored (every candidate still in one batch), chunks that
    restart the seeds or shuffle the rows (other candidates, or verdicts joined to the wrong
    candidate), or a chunk that splits an image's candidates losing some of their verdicts.
    The real toy classifier verifies, so the choice depends on every candidate's maps."""
    from l2s.steering.job import build_loss

    loss, _ = build_loss("l2s", toy, "toy", None)
    triplets = [parse(p) for p in PROMPTS]
    whole = best_of(toy, PROMPTS, triplets, [21, 22], 4, SETTINGS, loss)
    calls = []
    predict = toy.predict

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return predict(*args, **kwargs)

    toy.predict = counting
    try:  # 8 candidates in chunks of 3, 3 and 2: image 0's last candidate shares a chunk
        capped = best_of(toy, PROMPTS, triplets, [21, 22], 4, SETTINGS, loss, batch_size=3)
    finally:
        del toy.predict
    assert sorted(set(calls)) == [4, 6]  # CFG batches of 3 and 2 candidates, never 8
    assert capped.seeds == whole.seeds
    # the same images up to float rounding (matmuls of another batch size sum in another order)
    assert torch.allclose(capped.candidates, whole.candidates, atol=1e-4)
    assert torch.allclose(capped.p, whole.p, atol=1e-5)
    assert len(set(whole.p[0].tolist())) == 4  # distinct verdicts: the choice is informative
    assert capped.chosen == whole.chosen
    assert torch.allclose(capped.images, whole.images, atol=1e-4)


def test_the_verifier_reads_the_plain_pass_and_makes_no_forward_of_its_own(toy, one_thread):
    """Bugs caught: an extra denoiser forward per verdict step (best-of would then cost more
    than N plain generations), or reading the unconditional half of the CFG batch instead of
    the prompt's branch (the maps must equal those of a conditional-only forward)."""
    from l2s.steering.loop import RelationPlan

    calls = []
    predict = toy.predict

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return predict(*args, **kwargs)

    loss = RiggedLoss([0.0] * 4, steps=[1, 2])
    toy.predict = counting
    try:
        best_of(toy, PROMPTS, [parse(p) for p in PROMPTS], [3, 4], 2, SETTINGS, loss)
    finally:
        del toy.predict
    assert calls == [8, 8, 8]  # 3 steps, one CFG batch of 2 images x 2 candidates each
    assert sorted(loss.seen) == [1, 2]
    read = loss.seen[1]
    # The same maps from a conditional-only forward of the same latents at step 1.
    texts = [p for p in PROMPTS for _ in range(2)]
    plan = RelationPlan.build(toy.tokenizer, texts, [parse(p) for p in texts])
    seeds = [candidate_seed(s, k) for s in (3, 4) for k in range(2)]
    kept = {}

    def capture(state):
        if state["step"] == 1:
            from l2s.engine.hooks import AttentionRecorder

            with AttentionRecorder(toy, toy.cross_attention_layers(), plan.groups) as rec:
                toy.predict(state["latents"], state["t"], state["cond"])
            kept["maps"] = plan.score(RiggedLoss([0.0] * 4, [1]), rec.stacked(), [0, 1, 2, 3],
                                      state["t"], 1).maps

    sample(toy, texts, steps=3, guidance=SETTINGS.guidance,
           latents=seeded_latents(toy, seeds), callback=capture)
    assert torch.allclose(read, kept["maps"], atol=1e-5)


def test_bench_best_of_reports_the_verifier_against_the_judge_and_plots_the_frontier(
        toy, tmp_path, one_thread):
    """Bugs caught: a frontier key missing or renamed (position_accuracy, both_present, fused,
    seconds, their ratio to plain), no plot beside the results, the candidates not judged (no
    verifier_accuracy), or verifier_accuracy not being the share of candidates where the
    verifier's verdict equals the judge's."""
    res = run_bench(BenchConfig(methods=("plain", "best-of:2"), prompts=3,
                                options=SteerOptions(steps=3), out=str(tmp_path)),
                    denoiser=toy)
    doc = res.to_json()
    for name in ("plain", "best-of:2"):
        m = doc["methods"][name]
        for key in ("position_accuracy", "both_present", "fused", "seconds", "cpu_seconds",
                    "seconds_per_image", "position_ci95"):
            assert key in m, (name, key)
    best = doc["methods"]["best-of:2"]
    assert "seconds_vs_plain" in best and "cpu_seconds_vs_plain" in best
    plot = tmp_path / "frontier.png"
    assert doc["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    mine = [r for r in recs if r["method"] == "best-of:2"]
    assert all(len(r["candidates_correct"]) == 2 and len(r["best_of"]["p"]) == 2 for r in mine)
    agree = [(p >= 0.5) == ok for r in mine
             for p, ok in zip(r["best_of"]["p"], r["candidates_correct"], strict=True)]
    assert best["verifier_accuracy"] == pytest.approx(sum(agree) / 6)
    # the judge's verdict on the kept candidate is the image's own score
    assert all(r["candidates_correct"][r["best_of"]["chosen"]] == r["correct"] for r in mine)
    assert "verifier_accuracy" not in doc["methods"]["plain"]


def test_verifier_summary_and_wilson_interval():
    """Bugs caught: the chosen candidate's verdict read at the wrong index, the oracle
    counting images with no accepted candidate, an interval that is not Wilson's."""
    recs = [{"best_of": {"p": [0.9, 0.2], "chosen": 0}, "candidates_correct": [True, False]},
            {"best_of": {"p": [0.1, 0.8], "chosen": 1}, "candidates_correct": [True, False]},
            {"best_of": {"p": [0.3, 0.4], "chosen": 1}, "candidates_correct": [False, False]},
            {"best_of": {"p": None, "chosen": 0}, "candidates_correct": [True, True]}]
    s = verifier_summary(recs)
    assert s["verifier_accuracy"] == pytest.approx(4 / 6)
    v = s["verifier"]
    assert (v["images"], v["chosen_correct"], v["oracle"], v["first_correct"]) == \
        (3, pytest.approx(1 / 3), pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert v["picked_when_possible"] == 0.5 and v["random_pick"] == pytest.approx(1 / 3)
    assert verifier_summary([{"correct": True}]) == {}
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(1.0, 10)[0] == pytest.approx(0.7225, abs=1e-4)


def test_generated_records_join_the_image_records(monkeypatch, tmp_path):
    """Bug caught: a method's Generated fields dropped instead of written to its records."""
    from test_bench import _oracle

    from l2s import bench

    good, _ = _oracle()

    def tagged(ctx):
        def run(prompts, seeds):
            return Generated(good(ctx)(prompts, seeds), [{"tag_seed": s} for s in seeds])
        return run

    monkeypatch.setitem(bench.METHODS, "oracle", tagged)
    run_bench(BenchConfig(methods=("oracle",), prompts=2, out=str(tmp_path)),
              denoiser=object())
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["tag_seed"] for r in recs] == [r["seed"] for r in recs]


@pytest.mark.parametrize("bad", ["0", "-1", "2.5", "x", "1001"])
def test_a_bad_candidate_count_is_a_one_line_error(bad, tmp_path):
    """Bugs caught: best-of:0 (no candidate: an empty argmax) or best-of:x accepted, or failing
    later with a traceback instead of one line naming the option."""
    from l2s.cli import app
    from l2s.steering.job import SteerConfig

    with pytest.raises(L2SError, match=f"--method best-of:{bad}: give a whole number"):
        BenchConfig(methods=("plain", f"best-of:{bad}"), out=str(tmp_path))
    r = CliRunner().invoke(app, ["bench", "--method", f"best-of:{bad}", "--out",
                                 str(tmp_path)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert len([x for x in r.output.splitlines() if x.strip()]) == 1, r.output
    if bad in ("0", "-1", "1001"):
        with pytest.raises(L2SError, match="--candidates: give a whole number"):
            SteerConfig(prompt=PROMPTS[0], method="best-of", candidates=int(bad))
    with pytest.raises(L2SError, match="--candidates applies to --method best-of"):
        SteerConfig(prompt=PROMPTS[0], method="l2s", candidates=2)


def test_steer_best_of_reports_the_search(toy, tmp_path, one_thread):
    """Bug caught: `l2s steer --method best-of` steering, or not saying which candidate it
    kept and from which seeds."""
    from l2s.steering.job import SteerConfig, steer

    res = steer(SteerConfig(prompt=PROMPTS[0], method="best-of", candidates=2, num_images=2,
                            seed=4, options=SteerOptions(steps=3)), denoiser=toy)
    rep = res.report
    assert rep["method"] == "best-of" and rep["steps"] == []
    assert [b["seeds"][0] for b in rep["best_of"]] == [4, 5]
    assert all(len(b["p"]) == 2 and b["chosen"] in (0, 1) for b in rep["best_of"])
