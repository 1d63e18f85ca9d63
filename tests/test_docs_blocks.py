"""Every code block of README.md and docs/*.md does what it shows, as a reader would use it.

Shell blocks: each `l2s ...` command is parsed by the CLI's own parser (every option it names
exists on that command, its arguments fit); other programs are checked without running them
(`make` targets exist, `python -m MODULE` / `python scripts/X.py` exist and take each option
named). Python blocks run, offline, in a temp folder (a final expression followed by a comment
must print as that comment says). The toy commands run too: `steer`, `models` and `doctor` in
the fast suite, the longer jobs (invert, train, bench, distill, speed), made small, under `-m
slow`. A block whose commands need what the tests do not have carries a marker on the line
before it, `<!-- needs: weights -->` (real model weights, a published checkpoint or a
benchmark detector), `data` (a dataset such as GQA), `large` (a full-size model built with
random weights: GBs of memory, a GPU in practice) or `network` (the hub); several are
comma-separated. Its other commands still run; python blocks
marked so only have their imports checked. docs/cli.md is --help output (test_cli_doc.py).
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from markdown_it import MarkdownIt
from typer.testing import CliRunner

from l2s.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "cli.md")]
MARKER = re.compile(r"^<!--\s*(?:needs:\s*([a-z, ]+?)|(sketch))\s*-->\s*$")
NEEDS = {"weights", "data", "large", "network"}
SKETCH = "sketch"  # <!-- sketch -->: a python outline with names the reader supplies
SHELL = {"bash", "sh", "shell", "console"}
# Programs a shell block may run: l2s (parsed, and run on the toy) and the ones checked
# without running (make, python) or not checked at all (pip, hf, accelerate's launcher).
PROGRAMS = {"l2s", "make", "python", "pip", "hf", "accelerate", "source"}
TOY_MODELS = {None, "toy", "toy-mmdit"}
FAST = {"steer", "models", "doctor"}  # toy commands cheap enough for the fast suite
# Appended to a slow toy command so it runs in seconds (click keeps an option's last value).
SMALL = {"bench": ["--prompts", "2", "--num-images", "1"],
         "invert": ["--per-relation", "5,2,2"],
         "train": ["--epochs", "1"],
         "distill": ["--images", "4", "--steps", "1", "--batch-size", "2", "--eval-prompts", "2",
                     "--preserve", "1"],
         "speed": ["--repeats", "1"]}


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # 1-based line of the opening fence (or first indented line)
    lang: str  # "python", "shell" or "text"
    text: str
    needs: frozenset[str]  # from the marker before the block

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


def _lang(info: str, text: str) -> str:
    info = info.strip().split(" ")[0].lower() if info.strip() else ""
    if info in ("python", "py"):
        return "python"
    if info in SHELL:
        return "shell"
    if info:
        return info
    # An indented or untyped block is shell when its first line runs a known program; other
    # untyped blocks are file layouts and samples.
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    words = [w for w in first.split() if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
    return "shell" if words and words[0] in PROGRAMS else "text"


def blocks() -> list[Block]:
    md = MarkdownIt("commonmark")
    out = []
    for doc in DOCS:
        tokens = md.parse(doc.read_text(encoding="utf-8"))
        for i, tok in enumerate(tokens):
            if tok.type not in ("fence", "code_block"):
                continue
            needs: frozenset[str] = frozenset()
            prev = tokens[i - 1] if i else None
            if prev is not None and prev.type == "html_block":
                m = MARKER.match(prev.content.strip())
                if m:
                    needs = frozenset(n.strip() for n in (m.group(1) or m.group(2)).split(",")
                                      if n.strip())
            out.append(Block(str(doc.relative_to(ROOT)), tok.map[0] + 1,
                             _lang(tok.info, tok.content), tok.content, needs))
    return out


BLOCKS = blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL_BLOCKS = [b for b in BLOCKS if b.lang == "shell"]


# ---------------------------------------------------------------------------------------------
# Shell blocks: commands, parsed


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block, each as argv (env assignments dropped): lines
    joined at a trailing backslash, comments dropped, split at ;, &&, || and |; a for loop's
    body is kept with its variable unexpanded."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        argv: list[str] = []
        for tok in [*lex, ";"]:
            if tok in (";", "&&", "||", "|", "&"):
                while argv and argv[0] in ("do", "then", "else"):
                    argv.pop(0)
                while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
                    argv.pop(0)
                if argv and argv[0] not in ("for", "done", "fi", "if"):
                    out.append(argv)
                argv = []
            else:
                argv.append(tok)
    return out


def l2s_argv(argv: list[str]) -> list[str] | None:
    """The l2s arguments of a command that runs l2s (`l2s ...`, `python -m l2s ...`,
    `accelerate launch ... -m l2s ...`), else None."""
    if argv[0] == "l2s":
        return argv[1:]
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "l2s":
            return argv[i + 2:]
    return None


@dataclass
class Parsed:
    path: tuple[str, ...]  # ("classifier", "import")
    params: dict  # the leaf command's parsed values


def parse(args: list[str]) -> Parsed:
    """Parse l2s arguments with the CLI's own click commands, invoking nothing. Raises the
    parser's usage error for an unknown option, a missing or extra argument, a bad value."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("l2s", list(args))
    path: list[str] = []
    while hasattr(cmd, "commands"):
        rest = [*ctx._protected_args, *ctx.args]
        assert rest, f"l2s {' '.join(path)} needs a command"
        name, cmd, rest = ctx.command.resolve_command(ctx, rest)
        path.append(name)
        ctx = cmd.make_context(name, rest, parent=ctx)
    return Parsed(tuple(path), dict(ctx.params))


def needs(parsed: Parsed, made: set[str] = frozenset()) -> set[str]:
    """What an l2s command needs beyond the toy world and this test's offline machine;
    ``made``: the --out folders of the block's earlier commands."""
    p, out = parsed.params, set()
    if parsed.path == ("classifier", "import"):
        out.add("weights")  # the published checkpoint, downloaded by the reader
    if parsed.path == ("classifier", "push"):
        out.add("network")
    if p.get("model") not in TOY_MODELS:
        out.add("large" if p.get("random_weights") else "weights")
    if p.get("gqa_root") or "gqa" in str(p.get("data") or ""):
        out.add("data")
    if p.get("suite"):
        from l2s.bench.suites import get_suite

        if (p.get("detector") or get_suite(p["suite"]).detector) != "toy":
            out.add("weights")
    clf = str(p.get("classifier") or "")
    if "/" in clf and clf not in made and not Path(clf).expanduser().exists():
        out.add("network")  # a hub repo id
    return out


def _other_program(argv: list[str]) -> str | None:
    """What is wrong with a non-l2s command of the docs, checked without running it."""
    prog = argv[0]
    if prog not in PROGRAMS:
        return f"{prog!r} is not a program the docs run ({', '.join(sorted(PROGRAMS))})"
    if prog == "make":
        makefile = (ROOT / "Makefile").read_text()
        for arg in argv[1:]:
            name, eq, _ = arg.partition("=")
            if eq and not re.search(rf"^{re.escape(name)} \?=", makefile, flags=re.M):
                return f"the Makefile has no variable {name}"
            if not eq and not re.search(rf"^{re.escape(arg)}:", makefile, flags=re.M):
                return f"the Makefile has no target {arg}"
    if prog == "python":
        if argv[1] == "-m":
            import importlib.util

            spec = importlib.util.find_spec(argv[2])
            if spec is None or spec.origin is None:
                return f"no module {argv[2]}"
            source, opts = Path(spec.origin).read_text(), argv[3:]
        else:
            script = ROOT / argv[1]
            if not script.is_file():
                return f"no script {argv[1]}"
            source, opts = script.read_text(), argv[2:]
        for opt in opts:
            flag = opt.split("=")[0]
            if flag.startswith("--") and f'"{flag}"' not in source:
                return f"{argv[1] if argv[1] != '-m' else argv[2]} takes no {flag}"
    return None


def _l2s_commands(block: Block) -> list[tuple[list[str], Parsed]]:
    """The block's l2s commands that parse (the others fail the shell check)."""
    out = []
    for argv in commands(block.text):
        args = l2s_argv(argv)
        if args is not None:
            with contextlib.suppress(Exception):
                out.append((args, parse(args)))
    return out


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=str)
def test_shell_block_names_only_options_and_targets_that_exist(block):
    """Catches docs naming a removed or renamed option, command, make target or script flag,
    and commands that need real weights in a block not marked as needing them (or a marker
    left on a block that no longer needs it)."""
    assert block.needs <= NEEDS, f"{block}: unknown marker {sorted(block.needs - NEEDS)}"
    found: set[str] = set()
    made: set[str] = set()
    for argv in commands(block.text):
        args = l2s_argv(argv)
        if args is None:
            problem = _other_program(argv)
            assert problem is None, f"{block}: `{shlex.join(argv)}`: {problem}"
            continue
        try:
            parsed = parse(args)
        except Exception as e:  # the parser's UsageError (typer's vendored click)
            msg = e.format_message() if hasattr(e, "format_message") else repr(e)
            pytest.fail(f"{block}: `l2s {shlex.join(args)}`: {msg}")
        need = needs(parsed, made)
        made.add(str(parsed.params.get("out")))
        assert need <= block.needs, (f"{block}: `l2s {shlex.join(args)}` needs {sorted(need)}: "
                                     f"mark the block <!-- needs: {', '.join(sorted(need))} -->")
        found |= need
    assert block.needs <= found, f"{block}: marked needs {sorted(block.needs - found)}, " \
                                 "which none of its commands does"


def test_untyped_blocks_hide_no_command():
    """A block read as a file layout or sample (no language, no program first) must not hold an
    l2s command further down, which the shell checks would then skip."""
    for block in BLOCKS:
        if block.lang == "text":
            assert not re.search(r"^\s*l2s ", block.text, flags=re.M), str(block)


def test_the_docs_have_blocks_of_every_kind():
    """The extraction finds the blocks (a parser change that found none would pass vacuously)."""
    docs = {b.doc for b in SHELL_BLOCKS}
    assert {"README.md", "docs/results.md", "docs/benchmarks.md"} <= docs
    assert any(b.doc == "README.md" for b in PYTHON)
    assert sum(len(_l2s_commands(b)) for b in SHELL_BLOCKS) >= 30


# ---------------------------------------------------------------------------------------------
# Running the toy commands


def _runnable(block: Block) -> list[tuple[list[str], Parsed, bool]]:
    """The block's l2s commands that need nothing the tests lack, each with whether it reads
    what an earlier one wrote (an --out of the block named again)."""
    out, made = [], set()
    for args, parsed in _l2s_commands(block):
        if not needs(parsed, made):
            reads = any(str(v) in made for v in parsed.params.values() if v is not None)
            out.append((args, parsed, reads))
        made.add(str(parsed.params.get("out")))
    return out


def _run_l2s(args: list[str], label: str) -> None:
    result = CliRunner().invoke(app, args, prog_name="l2s")
    assert result.exit_code == 0, f"{label}: `l2s {shlex.join(args)}` exited " \
                                  f"{result.exit_code}:\n{result.output}\n{result.exception!r}"


def _fast_runs() -> list[tuple[Block, list[str], Parsed]]:
    """The first command of each FAST kind in the docs that stands alone."""
    runs, kinds = [], set()
    for b in SHELL_BLOCKS:
        for a, p, reads in _runnable(b):
            if p.path[0] in FAST and p.path[0] not in kinds and not reads:
                kinds.add(p.path[0])
                runs.append((b, a, p))
    return runs


FAST_RUNS = _fast_runs()
_FAST_ARGS = [a for _, a, _ in FAST_RUNS]
# docs whose toy commands are not all in the fast runs
SLOW_DOCS = sorted({b.doc for b in SHELL_BLOCKS
                    if any(a not in _FAST_ARGS for a, _, _ in _runnable(b))})


@pytest.mark.parametrize(("block", "args"), [(b, a) for b, a, _ in FAST_RUNS],
                         ids=[f"{b}:{' '.join(p.path)}" for b, _, p in FAST_RUNS])
def test_toy_command_of_the_docs_runs(block, args, tmp_path, monkeypatch, one_thread):
    """Catches a documented toy command that fails (a default that no longer works, options
    that cannot go together) although it parses."""
    monkeypatch.chdir(tmp_path)
    _run_l2s(args, str(block))


@pytest.mark.slow
@pytest.mark.parametrize("doc", SLOW_DOCS)
def test_toy_commands_of_a_doc_run_in_order_made_small(doc, tmp_path, monkeypatch, one_thread):
    """Every toy command of a doc, in its order, as a reader who follows it: one cache for
    the doc (train reads what an earlier invert cached), one folder per block (steer reads
    the LoRA distill wrote; two benches of a block must not share an --out with other
    settings); each long job cut to a few samples."""
    runs = [(b, a, p) for b in SHELL_BLOCKS if b.doc == doc for a, p, _ in _runnable(b)]
    for n, (block, args, parsed) in enumerate(runs):
        folder = tmp_path / f"line-{block.line}"
        folder.mkdir(exist_ok=True)
        monkeypatch.chdir(folder)
        small = SMALL.get(parsed.path[0], [])
        if parsed.path[0] == "train":  # a one-epoch classifier must not become the default
            small = [*small, "--out", f"small-classifier-{n}"]  # of the later commands
        _run_l2s([*args, *small], str(block))


# ---------------------------------------------------------------------------------------------
# Python blocks


def _expected_output(tree: ast.Module, text: str) -> str | None:
    """The comment lines after a block's final expression: what it prints as."""
    last = tree.body[-1] if tree.body else None
    if not isinstance(last, ast.Expr):
        return None
    tail = text.splitlines()[last.end_lineno:]
    lines = [ln.strip() for ln in tail if ln.strip()]
    if not lines or not all(ln.startswith("#") for ln in lines):
        return None
    return "\n".join(ln[1:].strip() for ln in lines)


HEAVY_PY = re.compile(r"\b(train|invert|benchmark|distillation|speed)\(")


@pytest.mark.parametrize(
    "block", [pytest.param(b, marks=pytest.mark.slow) if HEAVY_PY.search(b.text) and not b.needs
              else b for b in PYTHON], ids=str)
def test_python_block_runs(block, tmp_path, monkeypatch, one_thread):
    """Catches a snippet that no longer runs as written (a renamed import or field, a missing
    definition) or prints something else than the comment after it says. A block marked as
    needing weights has its imports checked."""
    assert block.needs <= NEEDS | {SKETCH}, f"{block}: unknown marker {sorted(block.needs)}"
    tree = ast.parse(block.text, filename=str(block))
    if block.needs:
        imports = ast.Module([n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)],
                             type_ignores=[])
        exec(compile(imports, str(block), "exec"), {})
        return
    monkeypatch.chdir(tmp_path)
    expected = _expected_output(tree, block.text)
    scope: dict = {"__name__": "__docs__"}
    body = ast.Module(tree.body[:-1] if expected is not None else tree.body, type_ignores=[])
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(body, str(block), "exec"), scope)
        if expected is not None:
            value = eval(compile(ast.Expression(tree.body[-1].value), str(block), "eval"), scope)
            assert repr(value) == expected, f"{block}: prints {value!r}, the docs say {expected}"


# ---------------------------------------------------------------------------------------------
# Figures: made by the commands the docs name beside them

# (doc, the command as the doc shows it, the file it writes, the figure in docs/)
FIGURES = [
    ("docs/results.md", 'l2s --threads 1 steer "a circle to the left of a square" --num-images 4 '
     "--compare-plain --out out/compare", "out/compare/compare.png",
     "docs/images/steer-compare-plain.png"),
    ("docs/results.md", "l2s --threads 1 bench --suite shapes --method plain --method l2s "
     "--prompts 12 --num-images 1 --out out/sheets", "out/sheets/disagreements.png",
     "docs/images/bench-disagreements.png"),
    ("docs/results.md", "l2s --threads 1 bench --suite shapes --method plain --method l2s "
     "--prompts 12 --num-images 1 --out out/sheets", "out/sheets/contact_plain_position.png",
     "docs/images/bench-contact-plain.png"),
]


@pytest.mark.slow
def test_docs_figures_are_what_the_commands_beside_them_write(tmp_path, monkeypatch,
                                                              one_thread):
    """Catches a figure in docs/ that its command no longer draws (a changed grid, sheet or
    toy output) or a command changed in the docs without its figure."""
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    ran = set()
    for doc, command, written, figure in FIGURES:
        assert command in (ROOT / doc).read_text(), f"{doc} no longer shows `{command}`"
        if command not in ran:
            _run_l2s(shlex.split(command)[1:], doc)
            ran.add(command)
        made = np.asarray(Image.open(written).convert("RGB"))
        shown = np.asarray(Image.open(ROOT / figure).convert("RGB"))
        assert made.shape == shown.shape and np.array_equal(made, shown), \
            f"{figure} is not what `{command}` writes to {written}: copy it over"
