"""The import layers docs/architecture.md draws: dependencies between l2s modules point one way.

Every module under l2s/ is parsed with ``ast`` (nothing is imported), and every import it
makes is collected, at module level and inside functions alike (a function-level import or
one under ``if TYPE_CHECKING:`` is still a dependency, only a later or a typing one). Three
rules:

- no import circle between l2s modules;
- ``l2s.engine`` imports nothing above it: only ``l2s.engine.*``, ``l2s.errors`` and
  ``l2s.relations``;
- the core (everything but ``l2s.families``, ``l2s.toy`` and ``l2s.cli``) imports neither
  ``l2s.toy`` nor ``l2s.families``: families and the toy register themselves.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "l2s"
ENGINE_MAY_IMPORT = ("l2s.engine", "l2s.errors", "l2s.relations")
NOT_CORE = ("l2s.families", "l2s.toy", "l2s.cli")


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The l2s modules ``name`` imports anywhere in its file. ``from a import b`` is an import
    of the module ``a.b`` when that module exists, else of ``a``."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in known else mod)
    return {m for m in out if m == "l2s" or m.startswith("l2s.")} - {name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    # An import of l2s.a.b that names no file (a symbol imported the long way) counts as l2s.a.
    graph = {}
    for name, path in mods.items():
        deps = set()
        for m in _imports(name, path, known):
            while m not in known and "." in m:
                m = m.rsplit(".", 1)[0]
            deps.add(m)
        graph[name] = deps - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _violations() -> list[str]:
    graph = _graph()
    found = [f"import circle: {' <-> '.join(c)}" for c in _circles(graph)]
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if _under(mod, ("l2s.engine",)) and not _under(dep, ENGINE_MAY_IMPORT):
                found.append(f"engine imports above it: {mod} -> {dep}")
            if not _under(mod, NOT_CORE) and _under(dep, ("l2s.toy", "l2s.families")):
                found.append(f"core imports a family or the toy: {mod} -> {dep}")
    return found


def test_the_parser_sees_every_kind_of_import(tmp_path, monkeypatch):
    """Catches a layer test that passes because it reads no imports: a function-level
    import, a relative one, a ``from package import submodule`` and a circle are all seen."""
    pkg = tmp_path / "l2s"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "toy").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "toy" / "__init__.py").write_text("")
    (pkg / "toy" / "scenes.py").write_text("from l2s.bench import run\n")
    (pkg / "engine" / "core.py").write_text(
        "from ..errors import X\n\ndef f():\n    from l2s.toy import scenes\n")
    (pkg / "bench.py").write_text("import l2s.engine.core\n")
    (pkg / "run.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    graph = _graph()
    assert graph["l2s.engine.core"] == {"l2s.errors", "l2s.toy.scenes"}
    assert graph["l2s.bench"] == {"l2s.engine.core"}
    assert _circles(graph) == [["l2s.bench", "l2s.engine.core", "l2s.toy.scenes"]]
    assert _violations() == [
        "import circle: l2s.bench <-> l2s.engine.core <-> l2s.toy.scenes",
        "engine imports above it: l2s.engine.core -> l2s.toy.scenes",
        "core imports a family or the toy: l2s.engine.core -> l2s.toy.scenes",
    ]


def test_imports_point_one_way():
    """Catches an import circle between l2s modules, an engine module importing anything
    above the engine, and a core module naming a family or the toy."""
    found = _violations()
    assert not found, "\n".join(found)
