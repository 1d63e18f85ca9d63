"""docs/architecture.md names every module of l2s/ (the module map must not go stale)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    """Every module of l2s/ as its path relative to l2s/; a subpackage's __init__.py is the
    package itself, named by its folder."""
    pkg = ROOT / "l2s"
    return sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                  if not (p.name == "__init__.py" and p.parent != pkg))


def test_every_module_is_in_the_architecture_doc():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    # A module counts when its path relative to l2s/ is written out, not preceded by a folder
    # (so toy/train.py does not vouch for jobs/train.py).
    missing = [m for m in _modules()
               if not re.search(r"(?<![\w/])" + re.escape(m) + r"\b", doc)]
    assert not missing, f"docs/architecture.md lacks {missing}: add each to its module map"


def test_the_check_sees_a_missing_module():
    doc = "| `toy/train.py` | the trainer |"
    assert not re.search(r"(?<![\w/])" + re.escape("train.py") + r"\b", doc)
    assert re.search(r"(?<![\w/])" + re.escape("toy/train.py") + r"\b", doc)
