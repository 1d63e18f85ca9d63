"""The benchmark job on the toy suites with oracle methods: layout, scoring, resume, shards."""

import json

import numpy as np
import pytest
import torch

from l2s import bench
from l2s.bench import BenchConfig, BenchError, run_bench, suite_prompts
from l2s.bench.run import image_seed
from l2s.relations import RELATIONS, geneval_relations
from l2s.toy.scenes import layout_scene


def shapes_prompts(n, seed):
    return suite_prompts("shapes", n, seed)

# Boxes for "A REL B" on a 32 px canvas: A's box first.
_LAYOUT = {"left of": ((2, 12, 12, 22), (20, 12, 30, 22)),
           "right of": ((20, 12, 30, 22), (2, 12, 12, 22)),
           "above": ((12, 2, 22, 12), (12, 20, 22, 30)),
           "below": ((12, 20, 22, 30), (12, 2, 22, 12))}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _oracle(flip=False):
    calls = []

    def method(prompts, seeds):
        calls.append(list(seeds))
        imgs = []
        for p in prompts:
            t = p.triplet
            a, b = _LAYOUT[_OPPOSITE[t.relation] if flip else t.relation]
            imgs.append(layout_scene([(t.subject, a), (t.object, b)], 32).image)
        return torch.from_numpy(np.stack(imgs)).float() / 255

    return (lambda ctx: method), calls


@pytest.fixture
def oracle(monkeypatch):
    method, calls = _oracle()
    monkeypatch.setitem(bench.METHODS, "oracle", method)
    return calls


def test_layouts_mean_what_they_say():
    for rel, (a, b) in _LAYOUT.items():
        assert rel in geneval_relations(a, b)


def test_prompts_are_seeded_and_prefix_stable():
    a, b = shapes_prompts(30, seed=1), shapes_prompts(10, seed=1)
    assert [p.prompt for p in a[:10]] == [p.prompt for p in b]
    assert [p.prompt for p in shapes_prompts(10, seed=2)] != [p.prompt for p in b]
    assert {p.triplet.relation for p in a} == set(RELATIONS)
    assert all(p.triplet.subject != p.triplet.object for p in a)


def test_shapes_prompts_are_the_ones_the_published_numbers_used():
    # docs/results.md's 200-prompt toy numbers were measured on exactly these prompts.
    assert [p.prompt for p in shapes_prompts(3, 0)] == [
        "a diamond to the left of a ring", "a square to the left of a cross",
        "a circle to the left of a ring"]


@pytest.mark.parametrize(("flip", "accuracy"), [(False, 1.0), (True, 0.0)])
def test_oracle_layouts_score_as_expected(monkeypatch, tmp_path, flip, accuracy):
    method, _ = _oracle(flip)
    monkeypatch.setitem(bench.METHODS, "oracle", method)
    res = run_bench(BenchConfig(methods=("oracle",), prompts=12, num_images=2,
                                out=str(tmp_path)),
                    denoiser=object())
    m = res.to_json()["methods"]["oracle"]
    assert {k: m[k] for k in ("n_images", "both_present", "position_accuracy", "fused")} == {
        "n_images": 24, "both_present": 1.0, "position_accuracy": accuracy, "fused": 0.0}
    assert m["tasks"] == {"position": accuracy} and m["overall"] == accuracy
    assert (tmp_path / "contact_oracle_position.png").exists()
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 24
    # GenEval's result fields, plus method and seed.
    assert {"filename", "tag", "prompt", "correct", "reason", "metadata", "details", "method",
            "seed"} <= set(lines[0])
    assert (lines[0]["reason"] == "") == (accuracy == 1.0)


def test_geneval_layout_is_written_and_reads_back(oracle, tmp_path):
    run_bench(BenchConfig(methods=("oracle",), prompts=3, num_images=2, out=str(tmp_path)),
              denoiser=object())
    prompts = shapes_prompts(3, 0)
    for p in prompts:
        folder = tmp_path / "oracle" / f"{p.index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == p.metadata
        assert sorted(f.name for f in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
    rec = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert (tmp_path / rec["filename"]).exists()
    assert json.loads(rec["metadata"]) == prompts[rec["prompt_index"]].metadata
    assert rec["seed"] == image_seed(0, rec["prompt_index"], rec["image_index"])


def test_interrupted_run_resumes_without_recomputing(oracle, tmp_path):
    cfg = BenchConfig(methods=("oracle",), prompts=4, num_images=1, batch_size=2,
                      out=str(tmp_path))
    run_bench(cfg, denoiser=object())
    assert sum(map(len, oracle)) == 4
    # A run cut mid-write: the truncated last line is dropped, its saved image scored again
    # (not regenerated), and only the new prompts are generated.
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    oracle.clear()
    res = run_bench(BenchConfig(methods=("oracle",), prompts=6, num_images=1, batch_size=2,
                                out=str(tmp_path)), denoiser=object())
    assert sorted(s for c in oracle for s in c) == [image_seed(0, 4, 0), image_seed(0, 5, 0)]
    assert res.methods["oracle"]["n_images"] == 6
    seeds = [json.loads(x)["seed"] for x in path.read_text().splitlines()]
    assert len(seeds) == len(set(seeds)) == 6


def test_a_finished_run_reruns_without_loading_the_detector_or_colour_model(
        oracle, monkeypatch, tmp_path):
    cfg = BenchConfig(methods=("oracle",), prompts=3, num_images=1, out=str(tmp_path))
    first = run_bench(cfg, denoiser=object())

    def broken(*args, **kwargs):
        raise BenchError("the detector cannot load")

    monkeypatch.setattr(bench.run, "load_detector", broken)
    monkeypatch.setattr("l2s.bench.colors.ClipColors.load", broken)
    oracle.clear()
    again = run_bench(cfg, denoiser=object())
    assert again.methods == first.methods and not oracle
    # With something left to score, the load still fails first, before config.json changes.
    config = (tmp_path / "config.json").read_text()
    with pytest.raises(BenchError, match="cannot load"):
        run_bench(BenchConfig(methods=("oracle",), prompts=4, num_images=1, out=str(tmp_path)),
                  denoiser=object())
    assert (tmp_path / "config.json").read_text() == config and not oracle


def test_kill_after_a_batch_keeps_every_image_already_scored(monkeypatch, tmp_path):
    calls = []

    def dying(ctx):
        def run(prompts, seeds):
            calls.append(list(seeds))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return _oracle()[0](ctx)(prompts, seeds)
        return run

    monkeypatch.setitem(bench.METHODS, "oracle", dying)
    cfg = BenchConfig(methods=("oracle",), prompts=6, batch_size=3, out=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, denoiser=object())
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    calls.clear()
    run_bench(cfg, denoiser=object())
    assert calls == [[image_seed(0, i, 0) for i in (3, 4, 5)]]


def test_resume_with_other_settings_is_refused(oracle, tmp_path):
    run_bench(BenchConfig(methods=("oracle",), prompts=2, out=str(tmp_path)), denoiser=object())
    with pytest.raises(BenchError, match="other settings"):
        run_bench(BenchConfig(methods=("oracle",), prompts=2, seed=5, out=str(tmp_path)),
                  denoiser=object())


def test_a_launched_process_benches_its_rank_shard(oracle, tmp_path, monkeypatch):
    """Catches a Python bench under accelerate launch / torchrun doing every prompt in every
    process (only the CLI read RANK and WORLD_SIZE)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    run_bench(BenchConfig(methods=("oracle",), prompts=4, num_images=1, out=str(tmp_path)),
              denoiser=object())
    assert [p.name for p in tmp_path.glob("results*.jsonl")] == ["results.shard-1-of-2.jsonl"]
    assert len(oracle) and all(len(c) for c in oracle)
    assert sum(len(c) for c in oracle) == 2  # prompts 1 and 3 of 4


def _scores(res) -> dict:
    """A result's numbers without its timings."""
    return {m: {k: v for k, v in s.items() if "seconds" not in k} for m, s in res.methods.items()}


@pytest.mark.parametrize("damage", ["null", "{}", "bytes", "missing field"])
def test_a_damaged_results_line_is_dropped_and_its_image_scored_again(oracle, tmp_path, damage):
    """Catches a results.jsonl line of `null` (was TypeError), `{}` (KeyError), non-UTF-8 bytes
    (UnicodeDecodeError, never repaired) or a record without a field the summary reads."""
    cfg = BenchConfig(methods=("oracle",), prompts=4, num_images=1, out=str(tmp_path))
    first = run_bench(cfg, denoiser=object())
    path = tmp_path / "results.jsonl"
    lines = path.read_bytes().splitlines()
    bad = {"null": b"null", "{}": b"{}", "bytes": lines[1][:10] + b"\xff\xfe" + lines[1][10:],
           "missing field": json.dumps({k: v for k, v in json.loads(lines[1]).items()
                                        if k != "score"}).encode()}[damage]
    path.write_bytes(b"\n".join([lines[0], bad, *lines[2:]]) + b"\n")
    oracle.clear()
    again = run_bench(cfg, denoiser=object())
    assert _scores(again) == _scores(first) and not oracle  # rescored from the saved image
    recs = sorted((json.loads(x) for x in path.read_text().splitlines()),
                  key=lambda r: r["prompt_index"])
    assert [r["seed"] for r in recs] == [image_seed(0, i, 0) for i in range(4)]


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_scored_image_deleted_or_truncated_is_generated_again(oracle, tmp_path, damage):
    """Catches a scored image deleted or cut after scoring: every rerun failed in the contact
    sheets (FileNotFoundError / "image file is truncated") and the image was never made again."""
    cfg = BenchConfig(methods=("oracle",), prompts=3, num_images=1, out=str(tmp_path))
    first = run_bench(cfg, denoiser=object())
    image = tmp_path / "oracle" / "00001" / "samples" / "0000.png"
    if damage == "delete":
        image.unlink()
    else:
        image.write_bytes(image.read_bytes()[:-30])
    oracle.clear()
    again = run_bench(cfg, denoiser=object())
    assert oracle == [[image_seed(0, 1, 0)]]
    assert again.complete and _scores(again) == _scores(first)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    # An image saved but not yet scored, then damaged: generated again, not scored as is.
    path = tmp_path / "results.jsonl"
    path.write_text("".join(x + "\n" for x in path.read_text().splitlines()
                            if json.loads(x)["prompt_index"] != 2))
    other = tmp_path / "oracle" / "00002" / "samples" / "0000.png"
    other.write_bytes(other.read_bytes()[:40])
    oracle.clear()
    assert _scores(run_bench(cfg, denoiser=object())) == _scores(first)
    assert oracle == [[image_seed(0, 2, 0)]]


def test_a_damaged_config_json_is_refused_in_one_line(oracle, tmp_path):
    """Catches a truncated config.json ending in a JSONDecodeError traceback."""
    cfg = BenchConfig(methods=("oracle",), prompts=2, num_images=1, out=str(tmp_path))
    run_bench(cfg, denoiser=object())
    config = tmp_path / "config.json"
    config.write_text(config.read_text()[:25])
    with pytest.raises(BenchError, match=r"config.json is damaged .* pass another --out"):
        run_bench(cfg, denoiser=object())


def test_shards_split_the_prompts_and_merge_into_one_summary(oracle, tmp_path):
    base = dict(methods=("oracle",), prompts=7, out=str(tmp_path))
    first = run_bench(BenchConfig(**base, shard=(0, 2)), denoiser=object())
    assert not first.complete and first.methods["oracle"]["n_images"] == 4
    second = run_bench(BenchConfig(**base, shard=(1, 2)), denoiser=object())
    assert second.complete and second.methods["oracle"]["n_images"] == 7
    assert sorted(s for c in oracle for s in c) == [image_seed(0, i, 0) for i in range(7)]
    merged = run_bench(BenchConfig(**base), denoiser=object())  # nothing left to generate
    assert len(oracle) == 2 and merged.methods == second.methods


def test_methods_are_compared_on_the_same_seeds_with_seconds_and_a_paired_interval(
        monkeypatch, tmp_path):
    good, good_calls = _oracle()
    bad, bad_calls = _oracle(flip=True)
    monkeypatch.setitem(bench.METHODS, "plain", bad)
    monkeypatch.setitem(bench.METHODS, "oracle", good)
    res = run_bench(BenchConfig(methods=("plain", "oracle"), prompts=8, out=str(tmp_path)),
                    denoiser=object())
    assert good_calls == bad_calls
    oracle = res.to_json()["methods"]["oracle"]
    assert oracle["vs_plain"]["difference"] == 1.0 and oracle["vs_plain"]["ci95"] == [1.0, 1.0]
    assert oracle["seconds"] >= 0 and "seconds_vs_plain" in oracle
    assert oracle["cpu_seconds"] >= 0 and "cpu_seconds_vs_plain" in oracle


def test_methods_take_turns_batch_by_batch(monkeypatch, tmp_path):
    """Catches running each method's whole suite in one block: a machine whose load changes
    during the run would then bias seconds_vs_plain (measured 1.00 for a real x1.20)."""
    order = []

    def recording(name):
        def factory(ctx):
            def run(prompts, seeds):
                order.append(name)
                return _oracle()[0](ctx)(prompts, seeds)
            return run
        return factory

    monkeypatch.setitem(bench.METHODS, "plain", recording("plain"))
    monkeypatch.setitem(bench.METHODS, "oracle", recording("oracle"))
    run_bench(BenchConfig(methods=("plain", "oracle"), prompts=6, batch_size=2,
                          out=str(tmp_path)), denoiser=object())
    assert order == ["plain", "oracle"] * 3


def test_every_method_encodes_at_the_length_a_classifier_card_sets(monkeypatch, tmp_path):
    """Setting up l2s may set the backbone's text length from its card (flux-schnell: 512,
    not 256): every method is set up before the first batch, so plain's images are encoded
    alike (catches lazy setup: plain's first batch at the old length). A run extended at
    another length is flagged."""
    class Den:
        text_len = 256

    def setting(n):
        def factory(ctx):
            ctx.denoiser.text_len = n  # what use_card_text_len does
            return _oracle()[0](ctx)
        return factory

    monkeypatch.setitem(bench.METHODS, "plain", lambda ctx: _oracle()[0](ctx))
    monkeypatch.setitem(bench.METHODS, "oracle", setting(512))
    res = run_bench(BenchConfig(methods=("plain", "oracle"), prompts=4, batch_size=2,
                                out=str(tmp_path)), denoiser=Den())
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and {r["text_len"] for r in recs} == {512} and not res.warnings
    monkeypatch.setitem(bench.METHODS, "oracle", setting(300))
    res = run_bench(BenchConfig(methods=("plain", "oracle"), prompts=6, batch_size=2,
                                out=str(tmp_path)), denoiser=Den())
    assert any("[300, 512] text tokens" in w for w in res.warnings)


def test_cpu_seconds_count_this_process_work_not_waiting(monkeypatch, tmp_path):
    """Catches cpu_seconds being wall time: a method that only waits (like one starved by other
    jobs on the machine) costs wall seconds but almost no CPU seconds."""
    import time

    def waiting(ctx):
        def run(prompts, seeds):
            time.sleep(0.3)
            return _oracle()[0](ctx)(prompts, seeds)
        return run

    monkeypatch.setitem(bench.METHODS, "plain", waiting)
    res = run_bench(BenchConfig(methods=("plain",), prompts=2, out=str(tmp_path)),
                    denoiser=object())
    plain = res.to_json()["methods"]["plain"]
    assert plain["seconds"] >= 0.3 and plain["cpu_seconds"] < 0.5 * plain["seconds"]
    reread = run_bench(BenchConfig(methods=("plain",), prompts=2, out=str(tmp_path)),
                       denoiser=object())
    assert reread.to_json()["methods"]["plain"]["cpu_seconds"] == plain["cpu_seconds"]


def test_multi_relation_toy_suite_scores_every_relation(monkeypatch, tmp_path):
    from l2s.toy.scenes import random_scene  # noqa: F401  (the toy world is importable)

    prompts = suite_prompts("shapes-multi", 4, 0)
    assert [len(p.triplets) for p in prompts] == [2, 3, 2, 3]
    assert [p.tag for p in prompts] == ["3obj-2rel", "4obj-3rel", "3obj-2rel", "5obj-3rel"]

    def blank(ctx):
        return lambda prompts, seeds: torch.zeros(len(prompts), 32, 32, 3)

    monkeypatch.setitem(bench.METHODS, "blank", blank)
    res = run_bench(BenchConfig(suite="shapes-multi", methods=("blank",), prompts=4,
                                out=str(tmp_path)), denoiser=object())
    m = res.methods["blank"]
    assert m["position_accuracy"] == 0 and m["relation_accuracy"] == 0
    assert m["both_present"] == 0
    assert res.warnings and "DETECTOR HEALTH" in res.warnings[0]


def test_unknown_suite_and_method(tmp_path):
    with pytest.raises(BenchError, match="--suite must be one of geneval, .*shapes-multi"):
        BenchConfig(suite="coco", out=str(tmp_path))
    with pytest.raises(BenchError, match="--method must be one of plain, l2s, centroid"):
        BenchConfig(methods=("magic",), out=str(tmp_path))


@pytest.mark.parametrize("model", ["toy", "toy-mmdit"])
def test_real_suites_refuse_the_toy_models(model, monkeypatch, tmp_path):
    def no_detector(name):
        raise AssertionError(f"loaded detector {name} before refusing the toy")

    monkeypatch.setattr(bench.run, "load_detector", no_detector)
    with pytest.raises(BenchError, match="only draws six coloured shapes"):
        run_bench(BenchConfig(suite="geneval-position", model=model, out=str(tmp_path)))
    assert not (tmp_path / "config.json").exists()


def test_cli_refuses_a_coco_suite_on_the_toy_and_runs_a_toy_suite(oracle, tmp_path):
    from typer.testing import CliRunner

    from l2s.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["bench", "--suite", "geneval-position", "--model", "toy",
                            "--out", str(tmp_path / "g")])
    assert r.exit_code == 2 and "six coloured shapes" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["bench", "--method", "oracle", "--prompts", "3", "--json",
                            "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["suite"] == "shapes" and doc["detector"] == "toy"
    assert doc["methods"]["oracle"]["position_accuracy"] == 1.0
    r = runner.invoke(app, ["bench", "--shard", "3", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "I/N" in r.output
    # a rerun says what it resumes (was: silent; the table alone)
    r = runner.invoke(app, ["bench", "--method", "oracle", "--prompts", "4",
                            "--out", str(tmp_path / "s")])
    assert r.exit_code == 0 and "oracle: 3 of 4 images already scored in" in r.output


@pytest.mark.parametrize("weights", ["weights", "weights-mmdit"])
def test_toy_multi_relation_prompts_fit_the_toy_text_encoders(weights):
    """Catches shapes-multi prompts longer than the toys' 24-token text encoders: steering then
    stopped the whole benchmark with a token alignment error ("27 tokens, at most 24")."""
    from pathlib import Path

    from transformers import CLIPTokenizer

    import l2s.toy

    tok = CLIPTokenizer.from_pretrained(Path(l2s.toy.__file__).parent / weights / "tokenizer")
    lengths = [len(tok(p.prompt).input_ids) for seed in range(3)
               for p in suite_prompts("shapes-multi", 200, seed)]
    assert max(lengths) <= tok.model_max_length == 24


def test_toy_detector_on_a_real_suite_is_refused_before_generating(monkeypatch, tmp_path):
    """Bug caught: `--detector toy --suite geneval` generated every image, then ended in a
    traceback when the toy detector met COCO names; now one line, before anything loads."""
    from typer.testing import CliRunner

    from l2s.cli import app

    def no_detector(name):
        raise AssertionError(f"loaded detector {name} before refusing the pairing")

    monkeypatch.setattr(bench.run, "load_detector", no_detector)
    with pytest.raises(BenchError, match="--detector toy does not fit --suite geneval"):
        run_bench(BenchConfig(suite="geneval", model="sd2.1", detector="toy",
                              out=str(tmp_path / "a")), denoiser=object())
    assert not (tmp_path / "a").exists()
    r = CliRunner().invoke(app, ["bench", "--suite", "geneval", "--model", "sd2.1",
                                 "--detector", "toy", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--detector toy does not fit" in r.output, r.output
    assert "Traceback" not in r.output and r.output.count("error:") == 1


def _geneval_summary_scores(path) -> dict:
    """GenEval's evaluation/summary_scores.py, its aggregation rewritten here: the records of one
    results file, grouped by tag in order of appearance; each task's share of correct images;
    the overall score is the mean over tasks; a prompt (by metadata) counts when any image is."""
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    tags: dict[str, list[bool]] = {}
    prompts: dict[str, list[bool]] = {}
    for r in recs:
        tags.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts.setdefault(r["metadata"], []).append(bool(r["correct"]))
    tasks = {t: sum(v) / len(v) for t, v in tags.items()}
    return {"images": len(recs), "tasks": tasks, "overall": float(np.mean(list(tasks.values()))),
            "correct_prompts": float(np.mean([any(v) for v in prompts.values()]))}


def test_each_method_has_a_geneval_results_file_that_summary_scores_reads_as_its_score(
        monkeypatch, tmp_path):
    """Bug caught: results.jsonl pools every method, so GenEval's summary_scores.py gave one
    score for plain and l2s together; each method's own file now gives that method's score."""
    good, _ = _oracle()
    method, _ = _oracle(flip=True)

    def mixed(ctx):  # wrong on every third prompt: a score strictly between 0 and 1
        def run(prompts, seeds):
            right, wrong = good(ctx)(prompts, seeds), method(ctx)(prompts, seeds)
            pick = torch.tensor([(s // 1000) % 3 == 0 for s in seeds])[:, None, None, None]
            return torch.where(pick, wrong, right)
        return run

    monkeypatch.setitem(bench.METHODS, "oracle", good)
    monkeypatch.setitem(bench.METHODS, "mixed", mixed)
    res = run_bench(BenchConfig(methods=("oracle", "mixed"), prompts=6, num_images=2,
                                out=str(tmp_path)))
    pooled = _geneval_summary_scores(tmp_path / "results.jsonl")
    scores = {m: _geneval_summary_scores(tmp_path / m / "results.jsonl") for m in res.methods}
    assert scores["oracle"]["overall"] == res.methods["oracle"]["overall"] == 1.0
    assert scores["mixed"]["overall"] == res.methods["mixed"]["overall"] == pytest.approx(4 / 6)
    assert pooled["overall"] == pytest.approx(5 / 6)  # what GenEval read before: one pooled score
    assert scores["mixed"]["images"] == 12 and scores["mixed"]["correct_prompts"] == 4 / 6
    line = json.loads((tmp_path / "mixed" / "results.jsonl").read_text().splitlines()[0])
    assert set(line) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert (tmp_path / "mixed" / line["filename"]).is_file()  # relative to the imagedir


def test_a_method_argument_reaches_its_factory_and_names_a_safe_folder(monkeypatch, tmp_path):
    """Bugs caught: `l2s:CARD` refused as an unknown method, the CARD dropped (both l2s runs
    steering with the run's classifier), or a CARD with '/' nesting the method's images in
    folders the GenEval layout does not have."""
    good, _ = _oracle()
    seen = []

    def with_arg(ctx):
        seen.append(ctx.argument)
        return good(ctx)

    monkeypatch.setitem(bench.METHODS, "oracle", with_arg)
    monkeypatch.setitem(bench.METHOD_ARGUMENTS, "oracle", "anything")
    res = run_bench(BenchConfig(methods=("oracle", "oracle:cards/a b"), prompts=2,
                                num_images=1, out=str(tmp_path)))
    assert set(seen) == {"cards/a b", None} and len(seen) == 2
    assert set(res.methods) == {"oracle", "oracle:cards/a b"}
    folders = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert "oracle" in folders and len(folders) == 2
    other = next(f for f in folders if f != "oracle")
    assert "/" not in other and " " not in other and other.startswith("oracle_cards_a_b-")
    assert (tmp_path / other / "results.jsonl").is_file()
    with pytest.raises(BenchError, match="plain takes no argument after ':'.*l2s:ARG"):
        BenchConfig(methods=("plain:x",), out=str(tmp_path / "x"))
    with pytest.raises(BenchError, match="nothing after ':'"):
        BenchConfig(methods=("l2s:",), out=str(tmp_path / "y"))


def test_records_of_other_sampling_settings_are_refused_when_config_json_is_gone(
        oracle, tmp_path):
    """Catches `rm OUT/config.json` then a rerun with other --steps/--guidance: old and new
    records were summarised together (records held neither steps nor guidance)."""
    from l2s.steering.options import SteerOptions

    cfg = BenchConfig(methods=("oracle",), prompts=2, num_images=1, out=str(tmp_path))
    run_bench(cfg, denoiser=object())
    rec = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert rec["steps"] and "guidance" in rec and rec["settings"]
    (tmp_path / "config.json").unlink()
    other = BenchConfig(methods=("oracle",), prompts=3, num_images=1, out=str(tmp_path),
                        options=SteerOptions(steps=rec["steps"] + 3))
    with pytest.raises(BenchError, match=rf"2 results made with other settings \(steps "
                                         rf"{rec['steps']} \(this run: {rec['steps'] + 3}\)\)"
                                         ".*config.json.* is gone"):
        run_bench(other, denoiser=object())
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    # The same settings resume: nothing is made twice.
    oracle.clear()
    res = run_bench(BenchConfig(methods=("oracle",), prompts=3, num_images=1,
                                out=str(tmp_path)), denoiser=object())
    assert res.methods["oracle"]["n_images"] == 3 and oracle == [[image_seed(0, 2, 0)]]


def test_a_run_that_wrote_no_result_takes_new_settings(oracle, monkeypatch, tmp_path):
    """Catches a run stopped before its first image (e.g. out of memory) pinning its
    settings: the rerun with the fix was refused as "a run with other settings"."""
    def out_of_memory(ctx):
        def run(prompts, seeds):
            raise MemoryError
        return run

    monkeypatch.setitem(bench.METHODS, "oom", out_of_memory)
    with pytest.raises(MemoryError):
        run_bench(BenchConfig(methods=("oom",), prompts=2, image_size=64, out=str(tmp_path)),
                  denoiser=object())
    assert (tmp_path / "config.json").exists()
    res = run_bench(BenchConfig(methods=("oracle",), prompts=2, image_size=32,
                                out=str(tmp_path)), denoiser=object())
    assert res.complete
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == 32


def _card_method(path):
    """A method steering (as far as the bench can tell) with the card at ``path``."""
    def factory(ctx):
        run = _oracle()[0](ctx)

        def generate(prompts, seeds):
            return run(prompts, seeds)
        generate.classifier = str(path)
        return generate
    return factory


def test_a_resume_with_another_classifier_is_refused(monkeypatch, tmp_path):
    """Catches a bench interrupted, another default classifier installed, then resumed: half
    the images were steered with each, no warning."""
    card = tmp_path / "cls" / "card.json"
    card.parent.mkdir()
    from l2s.classifier.model import CARD_FORMAT

    card.write_text(json.dumps({"format": CARD_FORMAT, "weights_sha256": "a" * 64}))
    monkeypatch.setitem(bench.METHODS, "steered", _card_method(card))
    out = tmp_path / "b"
    run_bench(BenchConfig(methods=("steered",), prompts=2, out=str(out)), denoiser=object())
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["classifier"] for r in recs} == {str(card)}
    card.write_text(json.dumps({"format": CARD_FORMAT, "weights_sha256": "b" * 64}))  # retrained
    with pytest.raises(BenchError, match=r"the steered images already there were made with "
                                         r"the classifier .*card.json .* pass --classifier"):
        run_bench(BenchConfig(methods=("steered",), prompts=3, out=str(out)),
                  denoiser=object())
    card.write_text(json.dumps({"format": CARD_FORMAT, "weights_sha256": "a" * 64}))  # resumes
    res = run_bench(BenchConfig(methods=("steered",), prompts=3, out=str(out)),
                    denoiser=object())
    assert res.complete and res.methods["steered"]["n_images"] == 3


def test_images_scored_on_resume_keep_the_classifier_they_were_steered_with(monkeypatch,
                                                                            tmp_path):
    """Catches images saved but not scored (a kill between the two) scored on resume into
    records without the classifier they were steered with: a run extended after another
    classifier was installed then mixed the two without a word."""
    from l2s.bench import store
    from l2s.classifier.model import CARD_FORMAT

    card = tmp_path / "cls" / "card.json"
    card.parent.mkdir()
    card.write_text(json.dumps({"format": CARD_FORMAT, "weights_sha256": "a" * 64}))
    monkeypatch.setitem(bench.METHODS, "steered", _card_method(card))
    out = tmp_path / "b"
    real_append = store.append_record

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "append_record", killed)  # killed once both images are saved
    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchConfig(methods=("steered",), prompts=2, batch_size=2, out=str(out)),
                  denoiser=object())
    monkeypatch.setattr(store, "append_record", real_append)
    assert len(list(out.rglob("samples/*.png"))) == 2
    card.write_text(json.dumps({"format": CARD_FORMAT, "weights_sha256": "b" * 64}))
    run_bench(BenchConfig(methods=("steered",), prompts=2, batch_size=2, out=str(out)),
              denoiser=object())  # nothing to generate: the saved images are scored
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and len({r.get("classifier_sha256") for r in recs}) == 1
    steered_with = recs[0].get("classifier_sha256")
    assert steered_with and recs[0]["classifier"] == str(card)
    with pytest.raises(BenchError, match=r"made with the classifier .*card.json \(sha256 "
                                         + steered_with[:12]):
        run_bench(BenchConfig(methods=("steered",), prompts=3, out=str(out)),
                  denoiser=object())


def test_a_resume_with_another_lora_is_refused(monkeypatch, tmp_path):
    """Catches a +lora bench interrupted, another LoRA installed (or retrained in place), then
    resumed: records did not name the LoRA, so half the images came from each."""
    from l2s.distill.lora import WEIGHTS_FILE

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / WEIGHTS_FILE).write_bytes(b"first")

    def factory(ctx):
        generate = _oracle()[0](ctx)

        def run(prompts, seeds):
            return generate(prompts, seeds)
        run.lora = str(lora)
        return run

    monkeypatch.setitem(bench.METHODS, "plain+lora", factory)
    out = tmp_path / "b"
    run_bench(BenchConfig(methods=("plain+lora",), prompts=2, out=str(out)), denoiser=object())
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["lora"] for r in recs} == {str(lora)} and all(r["lora_sha256"] for r in recs)
    (lora / WEIGHTS_FILE).write_bytes(b"second")
    with pytest.raises(BenchError, match=r"made with the LoRA .*lora .* this run uses .* pass "
                                         r"--lora .*lora \(or that LoRA back in place\)"):
        run_bench(BenchConfig(methods=("plain+lora",), prompts=3, out=str(out)),
                  denoiser=object())
    (lora / WEIGHTS_FILE).write_bytes(b"first")
    res = run_bench(BenchConfig(methods=("plain+lora",), prompts=3, out=str(out)),
                    denoiser=object())
    assert res.complete and res.methods["plain+lora"]["n_images"] == 3


def test_best_of_and_lora_methods_name_their_classifier_and_lora(tmp_path):
    """Catches best-of (whose verifier is a classifier) and the +lora methods making records
    without the classifier or LoRA they depend on."""
    from l2s.bench.methods import METHODS, MethodContext
    from l2s.bench.run import _card, _made_with
    from l2s.classifier.model import sha256_file
    from l2s.distill.lora import WEIGHTS_FILE, resolve_lora
    from l2s.engine.loading import load_backbone
    from l2s.steering.job import build_loss

    den = load_backbone("toy")
    cfg = BenchConfig(model="toy", out=str(tmp_path))
    ctx = MethodContext(den, cfg, check=lambda images, prompts: [True] * len(prompts))
    card = _card(build_loss("l2s", den, "toy")[1])
    assert _made_with(METHODS["best-of"](ctx)) == card
    lora = resolve_lora(None, "toy")
    assert _made_with(METHODS["plain+lora"](ctx)) == {
        "lora": str(lora), "lora_sha256": sha256_file(lora / WEIGHTS_FILE)}
    assert _made_with(METHODS["l2s+lora"](ctx)) == {
        **card, "lora": str(lora), "lora_sha256": sha256_file(lora / WEIGHTS_FILE)}
    assert _made_with(METHODS["plain"](ctx)) is None


def test_two_benches_on_one_out_are_refused_and_a_dead_ones_lock_is_taken_over(
        oracle, tmp_path):
    """Catches two `bench` on one --out generating and scoring every image twice (32 lines
    for 16), and a killed run's lock blocking the folder."""
    import os
    import socket
    import subprocess
    import sys

    from l2s.bench.store import lock_path
    from l2s.locks import LockError, process_start

    cfg = BenchConfig(methods=("oracle",), prompts=2, num_images=1, out=str(tmp_path))
    lock = lock_path(tmp_path, None)
    tmp_path.mkdir(exist_ok=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{socket.gethostname()} {other.pid} {process_start(other.pid)}\n")
        with pytest.raises(LockError, match=rf"in use by another l2s bench \(pid {other.pid}, "
                                            r"running for .*pass another --out"):
            run_bench(cfg, denoiser=object())
        assert not oracle and not (tmp_path / "results.jsonl").exists()
        # Another shard is another lock: shards of one folder run side by side.
        run_bench(BenchConfig(methods=("oracle",), prompts=2, num_images=1, shard=(0, 2),
                              out=str(tmp_path)), denoiser=object())
    finally:
        other.kill()
        other.wait()
    # The holder is dead (or its pid now runs another process): taken over at once.
    run_bench(cfg, denoiser=object())
    assert not lock.exists()  # released at the end
    lock.write_text(f"{socket.gethostname()} {os.getpid()} not-my-start-time\n")
    assert run_bench(cfg, denoiser=object()).complete


def test_a_results_line_altered_but_still_parsing_is_found_and_scored_again(oracle, tmp_path):
    """Catches a damaged results line that is still a valid record (one score digit or a
    `true` altered on disk): it was summarised as if the image had scored so."""
    cfg = BenchConfig(methods=("oracle",), prompts=3, num_images=1, out=str(tmp_path))
    first = run_bench(cfg, denoiser=object())
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1])
    assert rec["correct"] is True and rec["check"]
    lines[1] = lines[1].replace('"correct": true', '"correct": false')
    path.write_text("\n".join(lines) + "\n")
    oracle.clear()
    again = run_bench(cfg, denoiser=object())
    assert _scores(again) == _scores(first) and not oracle  # rescored from the saved image
    assert all(json.loads(x)["correct"] for x in path.read_text().splitlines())


def _toy_defaults(monkeypatch, **changes):
    """Change the toy preset's steering defaults (``steps=...``) or image size
    (``image_size=...``) as a later l2s might."""
    from dataclasses import replace

    from l2s.engine import registry

    toy = registry.presets()["toy"]
    size = changes.pop("image_size", toy.image_size)
    monkeypatch.setitem(registry._PRESETS, "toy", replace(
        toy, image_size=size, defaults=replace(toy.defaults, **changes)))


def test_bench_config_files_hold_the_model_defaults_so_config_repeats_the_run(
        oracle, monkeypatch, tmp_path):
    """Catches bench writing null for "the model's default" (steps, guidance, step size,
    image size ...) into config.json and config.yaml: after the defaults changed, the same
    command continued the folder with other settings unnoticed, and `--config OUT/config.yaml`
    could not repeat the run it records."""
    import yaml
    from typer.testing import CliRunner

    from l2s.cli import app
    from l2s.engine.registry import steer_defaults

    toy = steer_defaults("toy")
    run_bench(BenchConfig(methods=("oracle",), prompts=2, num_images=1, out=str(tmp_path)),
              denoiser=object())
    saved = json.loads((tmp_path / "config.json").read_text())
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for d in (saved, written):
        assert (d["steps"], d["guidance"], d["step_size"], d["iterations"], d["steer_until"],
                d["steer_from"], d["optimizer"], d["image_size"]) == (
            toy.steps, toy.guidance, toy.step_size, toy.iterations, toy.steer_until,
            toy.steer_from, toy.optimizer, 32)
    # the defaults change: the same command is another run now, the written file is not
    _toy_defaults(monkeypatch, steps=toy.steps + 1, image_size=64)
    with pytest.raises(BenchError, match=rf"other settings .*'steps': \({toy.steps}, "
                                         rf"{toy.steps + 1}\)"):
        run_bench(BenchConfig(methods=("oracle",), prompts=2, num_images=1,
                              out=str(tmp_path)), denoiser=object())
    oracle.clear()
    r = CliRunner().invoke(app, ["bench", "--config", str(tmp_path / "config.yaml"),
                                 "--prompts", "3", "--json"])
    assert r.exit_code == 0, r.output  # resumed: only the new prompt is generated
    assert oracle == [[image_seed(0, 2, 0)]]
    assert json.loads(r.stdout)["methods"]["oracle"]["n_images"] == 3
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["steps"] == toy.steps


def test_a_bench_folder_written_with_null_defaults_still_resumes(oracle, monkeypatch,
                                                                  tmp_path):
    """Catches a folder an older l2s wrote (config.json and the records' settings digest with
    null for every model default) refused as "a run with other settings" once bench writes
    the values: by its own command, by `--config` of the config.yaml now written (which holds
    the values), and with its config.json deleted. A real difference is still refused."""
    import yaml
    from typer.testing import CliRunner

    from l2s.bench import run as bench_run
    from l2s.cli import app
    from l2s.engine.registry import steer_defaults
    from l2s.steering.options import SteerOptions

    def cfg(prompts, out=tmp_path / "a", **options):
        return BenchConfig(methods=("oracle",), prompts=prompts, num_images=1, out=str(out),
                           options=SteerOptions(**options))

    def older_run(out):  # what bench wrote before it resolved the model's defaults
        with monkeypatch.context() as m:
            m.setattr(bench_run, "resolved_config", lambda c: c)
            run_bench(cfg(2, out), denoiser=object())
        saved = json.loads((out / "config.json").read_text())
        assert saved["steps"] is None and saved["image_size"] is None

    toy = steer_defaults("toy")
    older_run(tmp_path / "a")
    oracle.clear()
    assert run_bench(cfg(3), denoiser=object()).complete  # the same command resumes
    assert oracle == [[image_seed(0, 2, 0)]]
    written = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert (written["steps"], written["image_size"]) == (toy.steps, 32)
    # --config of that file: the values spelled out are the defaults the nulls stood for
    oracle.clear()
    r = CliRunner().invoke(app, ["bench", "--config", str(tmp_path / "a" / "config.yaml"),
                                 "--prompts", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["methods"]["oracle"]["n_images"] == 4
    assert oracle == [[image_seed(0, 3, 0)]]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["steps"] is None  # its form
    with pytest.raises(BenchError, match="other settings"):  # a real difference still is
        run_bench(cfg(4, steps=toy.steps + 1), denoiser=object())
    # config.json deleted: the records' digest names the null form of this very command
    other = tmp_path / "b"
    older_run(other)
    (other / "config.json").unlink()
    oracle.clear()
    assert run_bench(cfg(3, other), denoiser=object()).complete
    assert oracle == [[image_seed(0, 2, 0)]]
    assert run_bench(cfg(3, other, steps=toy.steps), denoiser=object()).complete  # spelled out
    with pytest.raises(BenchError, match="other settings"):
        run_bench(cfg(3, other, steps=toy.steps + 1), denoiser=object())
