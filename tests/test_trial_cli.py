"""Refusals found by a hostile-user trial of the command line (docs/reliability.md): each must
be one `error:` line naming the option or file and the fix, with exit code 2 and nothing
written."""

import pytest
from typer.testing import CliRunner

from l2s.cli import app

runner = CliRunner()
PROMPT = "a circle to the left of a square"


def _one_error_line(r, *needles: str) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in lines[0], r.output
    return lines[0]


@pytest.mark.parametrize(("args", "needles"), [
    (["steer", PROMPT, "--num-images", "1.5"], ["'--num-images'", "l2s steer --help"]),
    (["steer", PROMPT, "--seed", "nan"], ["'--seed'"]),
    (["steer", PROMPT, "--bogus"], ["--bogus", "l2s steer --help"]),
    (["stear", PROMPT], ["'stear'", "'steer'"]),
    (["steer"], ["PROMPT"]),
    (["--threads", "0", "steer", PROMPT], ["'--threads'"]),
    (["bench", "--prompts", "2.5"], ["'--prompts'", "l2s bench --help"]),
    (["classifier", "import"], ["checkpoint", "l2s classifier import --help"]),
    (["steer", PROMPT, "--config", "/nonexistent/c.yaml"], ["does not exist"]),
])
def test_usage_errors_are_one_line_not_a_six_line_box(args, needles, tmp_path):
    """Catches typer's usage errors (a wrong type, an unknown option or command, a refused
    --config) printed as "Usage: ... Try ... --help" and a boxed message wrapped at the
    terminal: every other refusal of l2s is one line."""
    line = _one_error_line(runner.invoke(app, args), *needles)
    assert "╭" not in line and "Usage:" not in line


def test_no_arguments_still_show_the_help():
    """The one-line rendering must not swallow `l2s` / `l2s classifier` with no arguments,
    which show their help."""
    for args in ([], ["classifier"]):
        r = runner.invoke(app, args)
        assert "Usage" in r.output and "Commands" in r.output, r.output


@pytest.mark.parametrize(("text", "needles"), [
    ("steps: [1, 2]\n", ["steps takes one value", "[1, 2]"]),  # was: taken, ran
    ("seed: true\n", ["seed must be a whole number", "boolean true"]),  # was: seed 1
    ("compile: off\n", ["compile must be text", "compile: 'off'"]),  # was: got 'False'
    ("verify: 2\n", ["verify must be true or false, got 2"]),
    ("out: !!binary aGVsbG8=\n", ["out is a YAML binary"]),  # was: a folder "b'hello'"
    ("seed: 2001-12-14\n", ["seed is a YAML date"]),
    ("steps: 50\nsteps: 5\n", ["gives steps twice (lines 1 and 2): keep one"]),  # was: 5
    ("num-images: 1\nnum_images: 2\n", ["twice"]),
])
def test_config_values_the_command_line_could_not_give_are_refused(text, needles, tmp_path):
    """Catches a --config value of the wrong YAML type taken as something else (a list as
    one number, `true` as 1, `off` as the text 'False') and a key given twice silently
    keeping the last."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    out = tmp_path / "never"
    r = runner.invoke(app, ["steer", PROMPT, "--out", str(out), "--config", str(cfg)])
    _one_error_line(r, str(cfg), *needles)
    assert not out.exists()


def test_a_list_for_a_repeatable_option_is_still_taken(tmp_path):
    """The type check must keep `data: [shapes]` / `data: shapes` for a repeatable option."""
    cfg = tmp_path / "c.yaml"
    for text in ("data: [shapes]\n", "data: shapes\n"):
        cfg.write_text(text + "limit: 0\n")
        r = runner.invoke(app, ["invert", "--config", str(cfg), "--cache-dir",
                                str(tmp_path / "cache")])
        _one_error_line(r, "--limit must be >= 1")  # reached the config: the data key passed


def test_messages_quoting_user_input_print_it_as_written(tmp_path):
    """Catches rich turning `:-1:` in a quoted value into an emoji ("best-of👎")."""
    r = runner.invoke(app, ["bench", "--method", "best-of:-1", "--out", str(tmp_path / "b")])
    _one_error_line(r, "--method best-of:-1: give a whole number")
