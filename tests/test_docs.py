"""The README stays an orientation and its links and names stay true.

- README.md is at most 25,000 characters (the depth lives in docs/);
- every relative link in README.md and docs/*.md points at an existing file, and a link's
  #anchor at a heading of that file;
- every project path (`geodata/labels/`, `flows/settings.py`, ...) and every dotted project name
  (`geodata.ingest.run.ingest_osv5m`) written in backticks names a file, folder, module or
  top-level definition that exists: a module moved or renamed shows up here.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_CHARS = 25_000

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
PROJECT_PATH = re.compile(r"(?:geodata|hierloc|flows|tests|benchmarks|notebooks|docs)/[\w./-]*")
PROJECT_NAME = re.compile(r"(?:geodata|hierloc|flows)(?:\.\w+)+")


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (commands and sample output, not references)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", _prose(page), re.M)}


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_readme_is_an_orientation_not_a_manual() -> None:
    n = len(README.read_text(encoding="utf-8"))
    assert n <= MAX_README_CHARS, f"README.md has {n:,} characters (at most {MAX_README_CHARS:,}): move depth to docs/"
    assert DOCS, "docs/ holds no pages"
    linked = {m.group(1).split("#")[0] for m in LINK.finditer(_prose(README))}
    unlinked = [_rel(d) for d in DOCS if _rel(d) not in linked]
    assert not unlinked, f"README.md links none of {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_at_existing_files_and_headings(page: Path) -> None:
    broken = []
    for m in LINK.finditer(_prose(page)):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{_rel(page)}: " + "; ".join(broken)


def _top_level_names(module: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _missing_name(dotted: str) -> str | None:
    """Why `dotted` names nothing in the project, or None: the longest module prefix must exist,
    and the next part (if any) be defined at its top level."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.exists():
            rest = parts[i:]
            if rest and rest[0] not in _top_level_names(module):
                return f"{'.'.join(parts[:i])} defines no {rest[0]}"
            return None
    return "no such module"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_project_paths_and_modules_exist(page: Path) -> None:
    missing = []
    for span in CODE_SPAN.findall(_prose(page)):
        for token in span.split():
            token = token.strip(",;:()")
            if PROJECT_PATH.fullmatch(token) and not (ROOT / token).exists():
                missing.append(f"{token}: no such file or folder")
            elif PROJECT_NAME.fullmatch(token) and (why := _missing_name(token)):
                missing.append(f"{token}: {why}")
    assert not missing, f"{_rel(page)} names what is not there: " + "; ".join(missing)
