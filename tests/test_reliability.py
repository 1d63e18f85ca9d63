"""Bad input, broken files and shared caches: one test per class of failure in
docs/reliability.md. Each asserts the clean answer (exit 2, the option named, no traceback,
nothing written) or the repair."""

import json
import os
import re
import sys

import pytest
import torch
from typer.testing import CliRunner

from l2s.classifier.model import ClassifierError, load_classifier
from l2s.cli import app
from l2s.config import ConfigError, check_writable_dir
from l2s.engine.backbone import BackboneError
from l2s.engine.loading import load_backbone, resolve_device
from l2s.inversion.cache import AttentionCache
from l2s.steering.job import prompt_warnings

runner = CliRunner()
PROMPT = "a circle to the left of a square"


def _clean_error(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    text = re.sub(r"[│╭╮╰╯─\s]+", " ", r.output)  # typer's usage errors come boxed and wrapped
    for n in needles:
        assert n in text, r.output


# --- 1. option values that used to give garbage with exit 0 --------------------------------
@pytest.mark.parametrize(("args", "needle"), [
    (["--step-size", "nan"], "--step-size must be a finite number"),
    (["--step-size", "0"], "--step-size must be > 0"),
    (["--loss-threshold", "nan"], "--loss-threshold must be a finite number"),
    (["--steps", "-5"], "--steps must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--guidance", "-1"], "--guidance must be >= 0"),
    (["--steer-until", "inf"], "--steer-until must be a finite number"),
    (["--iterations", "-1"], "--iterations must be >= 0"),
    (["--num-images", "0"], "--num-images must be >= 1"),
    (["--optimizer", "rmsprop"], "--optimizer must be one of sgd, adam"),
    # were: nothing steered, exit 0 (the toy steers steps 1..4 of 20)
    (["--steer-from", "50"], "--steer-from 50 leaves no step to steer: steering ends before "
                             "step 5 (--steer-until 5 of 20 steps)"),
    (["--steer-from", "3", "--steer-until", "0.1"], "--steer-from 3 leaves no step to steer"),
    (["--steer-until", "0.05"], "--steer-from 1 (the model's default) leaves no step to steer"),
])
def test_steer_refuses_bad_numbers_before_loading_anything(tmp_path, args, needle):
    out = tmp_path / "never"
    r = runner.invoke(app, ["steer", PROMPT, "--out", str(out), *args])
    _clean_error(r, needle)
    assert not out.exists()


def test_threads_past_the_machine_are_refused_before_torch_sees_them():
    """Catches --threads 2000 (no output, hung) and 100000 (a segfault in OpenBLAS)."""
    import torch

    from l2s.cli import max_threads

    before = torch.get_num_threads()
    for n in (2000, 100000):
        _clean_error(runner.invoke(app, ["--threads", str(n), "models"]),
                     f"--threads': {n} is more than {max_threads()}")
    assert torch.get_num_threads() == before


def test_a_diverging_generation_is_an_error_not_a_black_image(tmp_path, one_thread):
    """Catches --guidance 1e30 writing an all-black image with exit 0 (NaN latents turned into
    zeros by the uint8 cast); any diverging latent (e.g. from --step-size) ends the same way."""
    from l2s.engine.sampling import GenerationError, to_uint8

    with pytest.raises(GenerationError, match="1 of 2 images hold NaN"):
        to_uint8(torch.tensor([0.5, float("nan")]).view(2, 1, 1, 1).expand(2, 2, 2, 3))
    out = tmp_path / "o"
    r = runner.invoke(app, ["steer", PROMPT, "--guidance", "1e30", "--steps", "4",
                            "--steer-until", "3", "--out", str(out)])
    _clean_error(r, "generation diverged", "--guidance or --step-size")
    assert not list(out.glob("*/*.png")) and not list(out.glob("*.png"))


def test_report_json_is_valid_json_with_nan(capsys):
    """Catches `"p_target": NaN` in report.json / --json (steering with a NaN classifier):
    NaN is not JSON, so strict readers refused the file."""
    from l2s.cli.output import emit_json
    from l2s.inversion.cache import finite_json

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))

    report = {"steps": [{"p_target": float("nan"), "loss": float("inf")}], "n": (1, 2.5)}
    assert strict(json.dumps(finite_json(report))) == \
        {"steps": [{"p_target": None, "loss": None}], "n": [1, 2.5]}
    emit_json(report)
    assert strict(capsys.readouterr().out)["steps"][0]["p_target"] is None


def test_empty_prompt_is_an_error_and_same_object_prompts_warn():
    r = runner.invoke(app, ["steer", "  "])
    _clean_error(r, "the prompt is empty")
    from l2s.relations import parse

    warn = prompt_warnings(parse("a circle to the left of a circle"))
    assert len(warn) == 1 and "'circle' twice" in warn[0]
    assert prompt_warnings(parse(PROMPT)) == []


@pytest.mark.parametrize(("args", "needle"), [
    (["--negatives", "99"], "at most 3 distinct negatives"),
    (["--limit", "-1"], "--limit must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    # was: one timestep recorded, stored and trained on three times
    (["--timesteps", "1,1,1"], "--timesteps lists step 1 more than once"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--data", "nosuch"], "--data must be one of gqa, folder, shapes, generated"),
    # were: --steps 0 "recorded steps [0] must lie in 0..-1"; --per-relation 1,2 named
    # "per_relation"; --fixed-point -1 and --min-psnr nan inverted (a nan threshold kept
    # every image)
    (["--steps", "0", "--timesteps", "0"], "--steps must be >= 1, got 0"),
    (["--per-relation", "1,2"], "--per-relation takes three counts train,val,test >= 0"),
    (["--fixed-point", "-1"], "--fixed-point must be >= 0, got -1"),
    (["--min-psnr", "nan"], "--min-psnr must be a finite number, got nan"),
])
def test_invert_refuses_bad_values(args, needle):
    small = ["--limit", "1", "--steps", "2", "--timesteps", "1"]  # quick if it is not refused
    _clean_error(runner.invoke(app, ["invert", *small, *args]), needle)


def test_train_unknown_data_does_not_suggest_inverting_it():
    r = runner.invoke(app, ["train", "--data", "nosuch"])
    _clean_error(r, "--data must be one of")
    assert "invert --data nosuch" not in r.output


def test_bench_batch_size_zero_leaves_no_files(tmp_path):
    out = tmp_path / "b"
    r = runner.invoke(app, ["bench", "--batch-size", "0", "--out", str(out)])
    _clean_error(r, "--batch-size must be >= 1")
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--model", "nosuch-model"], "unknown model 'nosuch-model'"),
    (["--method", "l2s", "--classifier", "nosuch/card.json"], "no classifier card at"),
])
def test_bench_that_cannot_load_leaves_no_files(tmp_path, args, needle):
    # Was: config.json (and metadata) written before the backbone and the classifier loaded,
    # so the rerun with the mistake fixed was refused as "a run with other settings".
    out = tmp_path / "b"
    r = runner.invoke(app, ["bench", "--prompts", "1", "--out", str(out), *args])
    _clean_error(r, needle)
    assert not out.exists()


# --- 2. environment ------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_variable_is_checked_and_doctor_honours_it(monkeypatch):
    monkeypatch.setenv("L2S_DEVICE", "cuda")
    with pytest.raises(BackboneError, match="no usable CUDA GPU"):
        resolve_device()
    rep = json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)
    assert rep["selected_device"] is None and "L2S_DEVICE=cuda" in rep["device_problem"]
    monkeypatch.setenv("L2S_DEVICE", "nonsense")
    with pytest.raises(BackboneError, match="not a device"):
        resolve_device()
    _clean_error(runner.invoke(app, ["steer", PROMPT]), "L2S_DEVICE='nonsense' is not a device")
    monkeypatch.setenv("L2S_DEVICE", "cpu")
    assert json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)["selected_device"] == "cpu"


# --- 3. outputs that cannot be written: found before the work ------------------------------
def test_unwritable_out_is_found_before_generating(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_writable_dir(blocker / "sub")
    called = []
    monkeypatch.setattr("l2s.engine.loading.load_backbone", lambda *a, **k: called.append(1))
    _clean_error(runner.invoke(app, ["steer", PROMPT, "--out", str(blocker / "o")]), "is a file")
    _clean_error(runner.invoke(app, ["bench", "--out", str(blocker / "o")]), "is a file")
    assert called == []  # nothing was loaded, so nothing was generated and lost


@pytest.mark.parametrize("command", ["steer", "bench"])
def test_a_dangling_symlink_as_out_is_found_before_the_work(tmp_path, command):
    """Catches --out naming a symbolic link whose target is gone: FileExistsError after every
    image was generated."""
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    args = [PROMPT] if command == "steer" else ["--prompts", "1"]
    _clean_error(runner.invoke(app, [command, *args, "--out", str(link)]),
                 f"{link} is a symbolic link to {tmp_path / 'gone'}, which does not exist")


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 120000000000 bytes."),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB"),
    MemoryError(),
])
def test_running_out_of_memory_is_a_one_line_error(tmp_path, monkeypatch, error):
    # Was: a traceback (`steer --image-size 100000`: the CPU allocator's RuntimeError).
    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr("l2s.steering.job.seeded_latents", boom)
    r = runner.invoke(app, ["steer", PROMPT, "--out", str(tmp_path / "o")])
    _clean_error(r, "error: out of memory (", "use a smaller --image-size")
    monkeypatch.setattr("l2s.steering.job.seeded_latents", lambda *a, **k: 1 / 0)
    assert isinstance(runner.invoke(app, ["steer", PROMPT, "--out", str(tmp_path / "o")]
                                    ).exception, ZeroDivisionError)  # other bugs still raise


@pytest.mark.parametrize("command, target, says", [
    (["classifier", "import", "x.pth", "--model", "toy"],
     "l2s.classifier.importer.import_classifier", "import on a machine with more memory"),
    (["train", "--model", "toy"], "l2s.classifier.train.train", "use a smaller --batch-size"),
    (["invert", "--model", "toy"], "l2s.inversion.job.invert", "use a smaller --batch-size"),
])
def test_out_of_memory_advice_names_only_the_commands_own_options(monkeypatch, command, target,
                                                                  says):
    """Catches `classifier import` (and train, invert) advising --image-size and --num-images,
    options they do not have."""
    def boom(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(target, boom)
    monkeypatch.setattr("l2s.engine.loading.load_backbone", lambda *a, **k: object())
    r = runner.invoke(app, command)
    _clean_error(r, "error: out of memory (", says)
    assert "--image-size" not in r.output and "--num-images" not in r.output


def test_speed_out_that_cannot_be_written_is_found_before_timing(tmp_path, monkeypatch):
    # Was: a FileExistsError / IsADirectoryError traceback after the whole timing run.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    called = []
    monkeypatch.setattr("l2s.engine.loading.load_backbone", lambda *a, **k: called.append(1))
    _clean_error(runner.invoke(app, ["speed", "--out", str(blocker / "r.json")]),
                 f"--out {blocker / 'r.json'}: {blocker} is a file, not a folder")
    _clean_error(runner.invoke(app, ["speed", "--out", str(tmp_path)]),
                 f"--out {tmp_path} is a folder: give a file name")
    assert called == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_found_before_generating(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot be written"):
            check_writable_dir(ro / "steer")
    finally:
        ro.chmod(0o700)


# --- 4. files that are not what they claim -------------------------------------------------
def test_binary_or_escaping_classifier_cards_are_clean_errors(tmp_path):
    card = tmp_path / "c" / "card.json"
    card.parent.mkdir()
    card.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ClassifierError, match="not readable JSON"):
        load_classifier(card)
    from l2s.classifier.model import CARD_FORMAT

    (tmp_path / "model.safetensors").write_bytes(b"x")
    card.write_text(json.dumps({"format": CARD_FORMAT, "architecture": {},
                                "weights": "../model.safetensors"}))
    with pytest.raises(ClassifierError, match="outside its own folder"):
        load_classifier(card)


def _toy_card(tmp_path, card_edit=None, weights_edit=None):
    """A copy of the shipped toy classifier with its card and/or weights changed (the card's
    weights_sha256 follows the new weights, as a card written with them would)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from l2s.classifier.model import PACKAGE_CLASSIFIERS, sha256_file

    folder = tmp_path / "clf"
    shutil.copytree(PACKAGE_CLASSIFIERS / "toy", folder)
    card = json.loads((folder / "card.json").read_text())
    if weights_edit is not None:
        state = load_file(folder / "model.safetensors")
        weights_edit(state)
        save_file(state, folder / "model.safetensors")
        card["weights_sha256"] = sha256_file(folder / "model.safetensors")
    if card_edit is not None:
        card_edit(card)
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def _set(path, value):
    def edit(card):
        *parents, last = path.split(".")
        d = card
        for k in parents:
            d = d[k]
        d[last] = value
    return edit


def _nan(state):
    state["embed.weight"] = torch.full_like(state["embed.weight"], float("nan"))


def _int32(state):
    state["embed.weight"] = state["embed.weight"].to(torch.int32)


def _without_below(card):
    card["classes"] = card["architecture"]["relations"] = ["left of", "right of", "above", "on"]


@pytest.mark.parametrize(("card_edit", "weights_edit", "needle"), [
    (_set("architecture.n_heads", 0), None, "n_heads must be an integer >= 1, got 0"),
    (_set("architecture.d_model", -4), None, "d_model must be an integer >= 1, got -4"),
    (_set("architecture.dropout", 2), None, "dropout must be a number in [0, 1)"),
    (_set("text_len", "long"), None, "has text_len 'long'"),
    (_set("timesteps", []), None, "has timesteps []"),
    (_set("classes", ["left of", "right of"]), None, "not the 4 outputs its architecture"),
    (_without_below, None, "lack 'below', which l2s steers"),
    (None, _nan, "embed.weight holds NaN or infinite values"),
    (None, _int32, "embed.weight is int32, not a float16, bfloat16 or float32 tensor"),
])
def test_a_card_or_weights_that_lie_are_refused_in_one_line(tmp_path, card_edit, weights_edit,
                                                            needle):
    """Catches cards that ended in tracebacks deep in torch or steering (ZeroDivisionError for
    n_heads 0, a negative dimension, `'below' is not in list`) and weights that steered with a
    NaN loss or were cast from int32 silently (exit 0, nothing steered)."""
    folder = _toy_card(tmp_path, card_edit, weights_edit)
    with pytest.raises(ClassifierError, match=re.escape(needle)) as e:
        load_classifier(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
    r = runner.invoke(app, ["steer", PROMPT, "--classifier", str(folder), "--steps", "4",
                            "--out", str(tmp_path / "o")])
    _clean_error(r, needle)


def test_pickled_weights_in_a_local_folder_need_allow_pickle(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from l2s.families.tiny import save_tiny_sd

    folder = save_tiny_sd(tmp_path / "tiny")
    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), folder / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    monkeypatch.delenv("L2S_ALLOW_PICKLE", raising=False)
    with pytest.raises(BackboneError, match="--allow-pickle"):
        load_backbone(str(folder), device="cpu")
    monkeypatch.setenv("L2S_ALLOW_PICKLE", "1")
    assert load_backbone(str(folder), device="cpu").image_size == (32, 32)


def test_model_that_is_a_file_is_not_sent_to_the_hub(tmp_path):
    f = tmp_path / "model.txt"
    f.write_text("x")
    with pytest.raises(BackboneError, match="is a file") as e:
        load_backbone(str(f), device="cpu")
    assert "hf download" not in str(e.value)


def test_uncached_hub_model_offline_fails_fast_with_the_fix():
    with pytest.raises(BackboneError, match="hf download org/model") as e:
        load_backbone("org/model", device="cpu")
    assert "HF_HUB_OFFLINE" in str(e.value)
    # --random-weights builds presets only, and only speed (and classifier import) take it
    # (was: "use --random-weights for speed work" for any hub id, on any command)
    assert "random-weights" not in str(e.value)
    with pytest.raises(BackboneError, match="hf download stabilityai/stable-diffusion-2-1-base"
                                            ".*`l2s speed --model sd2.1-base --random-weights`"):
        load_backbone("sd2.1-base", device="cpu")


def test_error_messages_keep_their_brackets(tmp_path):
    r = runner.invoke(app, ["steer", PROMPT, "--classifier", str(tmp_path / "[x0, y0]")])
    _clean_error(r, "[x0, y0]")


# --- 5. the cache repairs itself -----------------------------------------------------------
def _cache(tmp_path, n=3) -> AttentionCache:
    c = AttentionCache(tmp_path / "cache", "fp")
    for i in range(n):
        c.put(f"{i:02d}key", torch.full((2, 2, 3, 4, 4), float(i)),
              {"source": "shapes", "relation": "above"})
    return c


def test_entries_are_verified_by_content(tmp_path):
    c = _cache(tmp_path)
    zeroed, flipped = c.map_path("00key"), c.map_path("01key")
    zeroed.write_bytes(bytes(zeroed.stat().st_size))  # right size, all zero
    raw = bytearray(flipped.read_bytes())
    raw[-4:] = bytes(4)  # the header still parses, the values changed
    flipped.write_bytes(bytes(raw))
    fresh = AttentionCache(tmp_path / "cache", "fp")
    assert not fresh.has("00key") and not fresh.has("01key") and fresh.has("02key")
    assert sorted(fresh.corrupt) == ["00key", "01key"]
    assert not zeroed.exists() and not flipped.exists()  # deleted, so invert rebuilds them


@pytest.mark.parametrize(("old", "new"), [(b"above", b"abxve"), (b"1a2b3c", b"1a2c3c")])
def test_a_flipped_byte_in_an_entry_header_is_found_and_the_entry_rebuilt(tmp_path, old, new):
    """Catches a header byte flipped (`below` -> `bdlow`; an image_hash digit, which counted
    one image twice and could split its recordings across train and test): the sha256 covered
    the tensor only, so invert reported "0 corrupt" and nothing repaired it."""
    c = AttentionCache(tmp_path / "cache", "fp")
    c.put("00key", torch.ones(2, 2, 3, 4, 4),
          {"source": "shapes", "relation": "above", "image_hash": "1a2b3c"})
    path = c.map_path("00key")
    raw = path.read_bytes()
    assert raw.count(old) == 1
    path.write_bytes(raw.replace(old, new))
    fresh = AttentionCache(tmp_path / "cache", "fp")
    assert not fresh.has("00key") and fresh.corrupt == ["00key"] and not path.exists()


def test_a_missing_or_damaged_settings_json_keeps_the_geometry_guard(tmp_path):
    """Catches a truncated or deleted settings.json turning the geometry guard off, so entries
    of another shape were written beside the cached ones again."""
    from dataclasses import replace

    from l2s.families.tiny import tiny_sd
    from l2s.inversion.cache import CacheError
    from l2s.inversion.job import InvertConfig, run_invert
    from l2s.inversion.loop import InversionConfig

    den = tiny_sd()
    inv = InversionConfig(method="noise", steps=10, record_steps=(2, 5, 9))
    cfg = InvertConfig(data=("shapes",), cache_dir=str(tmp_path), limit=1, batch_size=4,
                       per_relation=(1, 1, 1), inversion=inv)
    assert run_invert(cfg, den).written == 2
    settings = tmp_path / den.fingerprint / "settings.json"
    other = replace(cfg, inversion=replace(inv, record_steps=(1, 4, 8)))
    for damage in ("truncate", "delete"):
        if damage == "truncate":
            settings.write_text(settings.read_text()[:20])
        else:
            settings.unlink()
        with pytest.raises(CacheError, match=r"timesteps \[.*\] \(cached\) vs"):
            run_invert(other, den)
    assert run_invert(cfg, den).skipped == 2  # the cached settings still resume


@pytest.mark.parametrize("damage", ["truncate", "zero", "delete", "binary", "duplicate"])
def test_manifest_is_rebuilt_from_the_entries(tmp_path, damage):
    c = _cache(tmp_path)
    m = c.manifest_path
    if damage == "truncate":
        m.write_bytes(m.read_bytes()[:30])
    elif damage == "zero":
        m.write_bytes(bytes(m.stat().st_size))
    elif damage == "delete":
        m.unlink()
    elif damage == "binary":
        m.write_bytes(bytes(range(256)))
    else:  # a rebuilt entry appends its line again
        c.put("01key", torch.ones(2, 2, 3, 4, 4), {"source": "shapes", "relation": "below"})
    rows = AttentionCache(tmp_path / "cache", "fp").manifest()
    assert sorted(r["key"] for r in rows) == ["00key", "01key", "02key"]
    lines = m.read_text().splitlines()
    assert len(lines) == 3 and len({json.loads(x)["key"] for x in lines}) == 3
    if damage == "duplicate":
        assert {json.loads(x)["key"]: json.loads(x)["relation"] for x in lines}["01key"] == "below"


def test_claims_split_work_and_dead_claims_are_taken_over(tmp_path):
    a = AttentionCache(tmp_path / "cache", "fp")
    b = AttentionCache(tmp_path / "cache", "fp")
    assert a.claim("img") and not b.claim("img")  # a live process holds it
    a.release("img")
    assert b.claim("img")
    b.release("img")
    dead = __import__("subprocess").Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (a.dir / "claims" / "img").write_text(f"{socket.gethostname()} {dead.pid}\n")
    assert a.claim("img")  # its owner is gone


def test_invert_leaves_claimed_images_to_the_other_process(tmp_path, monkeypatch, one_thread):
    from l2s.inversion.job import InvertConfig, run_invert
    from l2s.inversion.loop import InversionConfig

    den = load_backbone("toy")
    cfg = InvertConfig(cache_dir=str(tmp_path / "c"), limit=2, batch_size=1,
                       inversion=InversionConfig(method="noise"))
    monkeypatch.setattr(AttentionCache, "claim", lambda self, key: False)  # all taken
    res = run_invert(cfg, den)
    assert res.written == 0 and res.left_to_others == 4
    monkeypatch.undo()
    res = run_invert(cfg, den)
    assert res.written == 4 and res.left_to_others == 0
    assert not list((tmp_path / "c" / den.fingerprint / "claims").iterdir())  # released


# --- 6. YAML configs -----------------------------------------------------------------------
def test_yaml_config_flags_win_and_the_written_config_repeats_the_run(tmp_path, one_thread):
    import numpy as np
    import yaml
    from PIL import Image

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"prompt: {PROMPT}\nsteps: 4\nsteer-until: 2\niterations: 2\nseed: 3\n"
                   f"out: {tmp_path / 'a'}\n")
    r = runner.invoke(app, ["steer", "--config", str(cfg), "--seed", "5", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["seeds"] == [5] and rep["settings"]["steps"] == 4  # flag over file over default
    written = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert written["seed"] == 5 and written["steps"] == 4 and written["prompt"] == PROMPT
    r = runner.invoke(app, ["steer", "--config", str(tmp_path / "a" / "config.yaml"), "--json"])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["out"] == str(tmp_path / "a-1")  # a used folder is never overwritten
    first, second = (np.asarray(Image.open(p)) for p in (rep["images"][0], again["images"][0]))
    assert np.array_equal(first, second)


def test_yaml_config_unknown_keys_and_bad_files_are_clean_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_imgs: 2\n")
    _clean_error(runner.invoke(app, ["steer", "--config", str(bad), PROMPT]),
                 "unknown key(s) num_imgs", "num_images")
    bad.write_text("- a list\n")
    _clean_error(runner.invoke(app, ["invert", "--config", str(bad)]), "must hold a mapping")
    bad.write_bytes(bytes(range(256)))
    _clean_error(runner.invoke(app, ["train", "--config", str(bad)]), "not UTF-8")
    _clean_error(runner.invoke(app, ["bench", "--config", str(tmp_path / "none.yaml")]),
                 "does not exist")


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n"
    for a, b in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize("kind", ["aliases", "huge", "device", "fifo"])
def test_yaml_config_bombs_are_refused_without_reading_them_whole(tmp_path, kind):
    """Catches `--config` files that made l2s grow without bound or block: nested aliases
    (billion laughs, ~45 MB/s), `/dev/zero`, a file of many megabytes, a FIFO nobody writes."""
    path = tmp_path / "c.yaml"
    if kind == "aliases":
        path.write_text(BILLION_LAUGHS + "prompt: *i\n")
        needle = "expands to more than"
    elif kind == "huge":
        path.write_text("# padding\n" * 200_000 + "steps: 4\n")
        needle = "is larger than 1 MiB"
    elif kind == "device":
        path, needle = "/dev/zero", "is not a regular file"
    else:
        os.mkfifo(path)
        needle = "is not a regular file"
    r = runner.invoke(app, ["steer", "--config", str(path), PROMPT])
    _clean_error(r, needle)


def test_invert_reads_a_config_and_writes_it_beside_the_cache(tmp_path, one_thread):
    import yaml

    cfg = tmp_path / "inv.yaml"
    cfg.write_text(f"data: shapes\nlimit: 2\ninversion: noise\ncache_dir: {tmp_path / 'c'}\n")
    r = runner.invoke(app, ["invert", "--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["written"] == 4
    written = yaml.safe_load((tmp_path / "c" / res["stats"]["fingerprint"] / "config.yaml")
                             .read_text())
    assert written["data"] == ["shapes"] and written["limit"] == 2


def test_speed_refuses_what_steer_refuses(one_thread):
    r = runner.invoke(app, ["speed", "--prompt", "a dog to the left of a cat"])
    _clean_error(r, "'dog' is not in the toy model's vocabulary")


def test_train_checks_out_and_cache_dir_first(tmp_path, one_thread):
    f = tmp_path / "file"
    f.write_text("x")
    _clean_error(runner.invoke(app, ["train", "--cache-dir", str(f)]),
                 "is a file, not a folder: pass the --cache-dir")
    _clean_error(runner.invoke(app, ["train", "--out", str(f / "clf")]),
                 "is a file, not a folder: pass another --out")


@pytest.mark.parametrize("args", [["classifier", "import", "", "--model", "toy"],
                                  ["classifier", "import", "x.pth", "--model", ""],
                                  ["classifier", "import", "x.pth", "--model", "toy", "--out", ""],
                                  ["steer", "--config", "", PROMPT]])
def test_empty_strings_are_refused_not_taken_as_unset(args):
    """Catches `classifier import ''` looking for the checkpoint '.', `--model ''` / `--out ''`
    taken as unset, and `--config ''` silently reading no file."""
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert re.search(r"must be a non-empty text, got ''|an empty name names none",
                     " ".join(r.output.replace("│", " ").split()))


def test_options_a_method_does_not_read_are_reported(tmp_path, one_thread):
    """Catches `--method plain --step-size 3 --classifier x` (and bench's plain-only runs)
    ignoring the steering options without a word."""
    r = runner.invoke(app, ["steer", PROMPT, "--method", "plain", "--step-size", "3",
                            "--classifier", "x", "--steps", "4", "--out", str(tmp_path / "s"),
                            "--json"])
    assert r.exit_code == 0, r.output
    assert any("--method plain does not use --step-size, --classifier" in w
               for w in json.loads(r.stdout)["warnings"])
    r = runner.invoke(app, ["steer", PROMPT, "--method", "plain", "--steps", "4", "--out",
                            str(tmp_path / "t"), "--json"])
    assert json.loads(r.stdout)["warnings"] == []  # --steps is plain's own
    args = ["bench", "--method", "plain", "--iterations", "3", "--steps", "4", "--prompts", "1",
            "--images", "1", "--out", str(tmp_path / "b"), "--json"]
    r = runner.invoke(app, args)
    assert any("does not use --iterations" in w for w in json.loads(r.stdout)["warnings"])
    # a config.yaml a run wrote holds the model's resolved defaults: no false warning
    r = runner.invoke(app, ["bench", "--method", "plain", "--steps", "4", "--prompts", "1",
                            "--images", "1", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bench", "--config", str(tmp_path / "c" / "config.yaml"),
                            "--json"])
    assert r.exit_code == 0, r.output
    assert not any("does not use" in w for w in json.loads(r.stdout)["warnings"])
