"""Values found by a hostile-user trial (docs/reliability.md) that gave tracebacks, hung, or
were written somewhere else than checked: each is refused in one line before any work."""

import os

import pytest
from typer.testing import CliRunner

from l2s.cli import app
from l2s.config import ConfigError, check_writable_dir
from l2s.errors import L2SError

runner = CliRunner()
PROMPT = "a circle to the left of a square"


def _one_error_line(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), r.output
    assert all(n in lines[-1] for n in needles), r.output


@pytest.mark.parametrize("model", ["toy", "toy-mmdit"])
def test_more_steps_than_the_schedule_has_are_refused(model, tmp_path):
    """Catches `--steps 99999999999999999999`: a ValueError traceback from diffusers' DDIM
    scheduler (toy), a sigma grid built until memory ran out (a flow model)."""
    out = tmp_path / "never"
    r = runner.invoke(app, ["steer", PROMPT, "--model", model, "--steps", "1001", "--out",
                            str(out)])
    _one_error_line(r, "--steps 1001", "at most 1000 steps")
    assert not out.exists()


def test_a_device_type_l2s_does_not_run_on_is_refused():
    """Catches `--device meta`: accepted by torch.device, then a NotImplementedError traceback
    while loading."""
    from l2s.engine.loading import resolve_device

    for device in ("meta", "xpu", "cpu:0:1"):
        with pytest.raises(L2SError, match="is not a device: use cpu, cuda, cuda:N or mps"):
            resolve_device(device)
    assert resolve_device("cpu").type == "cpu"


def test_an_out_name_too_long_for_the_disk_is_refused(tmp_path):
    """Catches an --out with a 300-character name: an `OSError: [Errno 36] File name too long`
    traceback from the write probe."""
    with pytest.raises(ConfigError, match="cannot be used .File name too long.: pass another"):
        check_writable_dir(tmp_path / ("x" * 300))


def test_a_leading_tilde_is_the_home_folder_where_the_files_go(tmp_path, monkeypatch):
    """Catches `--out "~/x"` (quoted, or `--out=~/x`, which no shell expands): checked as
    $HOME/x, written to a folder named "~" in the working folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["steer", PROMPT, "--steps", "4", "--out", "~/x"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "home" / "x" / "image_0000.png").exists()
    assert not (tmp_path / "~").exists()
    from l2s import BenchConfig, DistillConfig, InvertConfig

    home = str(tmp_path / "home")
    assert BenchConfig(out="~/b").out == f"{home}/b"
    assert InvertConfig(cache_dir="~/c").cache_dir == f"{home}/c"
    assert DistillConfig(out="~/d").out == f"{home}/d"


@pytest.mark.parametrize("build,message", [
    # were: a ValueError traceback ("expected non-negative integer") / an overflow
    (lambda: __import__("l2s").InvertConfig(seed=-1), "--seed must be >= 0, got -1"),
    (lambda: __import__("l2s").TrainConfig(seed=2**40), "past 4294967295"),
    (lambda: __import__("l2s").DistillConfig(seed=10**20), "past 4294967295"),
    (lambda: __import__("l2s").DistillConfig(eval_seed=-3), "--eval-seed must be >= 0"),
    # were: ran forever without a word
    (lambda: __import__("l2s").SpeedConfig(repeats=10**20), "--repeats must be <= 1000"),
    (lambda: __import__("l2s.inversion.loop", fromlist=["x"]).InversionConfig(
        fixed_point=10**9), "--fixed-point must be <= 100"),
    # was: "--seed 0 gives image seeds up to ...: pass a smaller --seed"
    (lambda: __import__("l2s").SteerConfig(PROMPT, num_images=10**20),
     "--num-images 100000000000000000000 gives that many image seeds"),
])
def test_seeds_and_counts_past_their_range_are_refused_when_built(build, message):
    with pytest.raises(L2SError) as e:
        build()
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("changes,message", [
    ({"targets": ("to_q", "nosuch")}, "LoRA targets nosuch name no module"),
    ({"rank": 10**20}, "--rank 100000000000000000000 is wider than the layers it adapts"),
])
def test_distill_refuses_its_lora_before_generating_any_image(changes, message, tmp_path):
    """Catches targets the network lacks found only after the whole data phase (hours at the
    default 3000 images) and a huge --rank ending in a torch traceback."""
    from l2s import DistillConfig, distillation
    from l2s.engine.loading import load_backbone

    out = tmp_path / "lora"
    events = []
    with pytest.raises(L2SError, match=message):
        distillation(DistillConfig(out=str(out), images=2, chunk=2, steps=1, eval_prompts=0,
                                   **changes), load_backbone("toy"), callback=events.append)
    assert not events and not out.exists()


def test_distill_out_that_is_a_file_is_refused(tmp_path):
    """Catches `distill --out FILE` / `--out /dev/null`: a FileExistsError traceback."""
    f = tmp_path / "f"
    f.write_text("x")
    r = runner.invoke(app, ["distill", "--out", str(f), "--images", "1", "--chunk", "1"])
    _one_error_line(r, "is a file, not a folder")
    assert os.path.getsize(f) == 1
