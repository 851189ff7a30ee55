"""The README and docs/ as a reader meets them: every relative link leads to a file of the repository (and to a
heading there, where it names one), and every Python snippet parses and names only what the package defines."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def links(text: str) -> list[str]:
    """The targets of a Markdown page's inline, image and reference links, outside fenced code blocks."""
    prose = FENCE.sub("", text)
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def anchors(text: str) -> set[str]:
    """The fragment each heading of a page gets on GitHub: lower case, punctuation dropped, spaces as hyphens, a
    repeated heading numbered."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def broken_links(page: Path) -> list[str]:
    """Each relative link of ``page`` whose file does not exist in the repository, or whose ``#fragment`` names no
    heading of a Markdown target, as ``"target: why"``."""
    broken = []
    for target in links(page.read_text()):
        if EXTERNAL.match(target):
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file() or not file.is_relative_to(ROOT):
            broken.append(f"{target}: no such file in the repository")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file.read_text()):
            broken.append(f"{target}: {file.relative_to(ROOT)} has no heading #{fragment}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_of_the_repository(page):
    assert broken_links(page) == []


def test_the_readme_links_every_page_of_docs():
    targets = {t.partition("#")[0] for t in links((ROOT / "README.md").read_text())}
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in targets]
    assert missing == [], f"README.md does not link {missing}"


def test_a_broken_link_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A heading: with `code`\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/there.md) [ok](docs/there.md#a-heading-with-code) [ok](docs/there.md#twice-1) [ok](#top)\n"
        "# Top\n![gone](figures/gone.png) [gone](docs/there.md#nowhere) [out](../outside.md)\n"
        "[web](https://example.org/x.md)\n[ref]: docs/missing.md\n"
        "```bash\n[not a link](nowhere.md)\n```\n"
    )
    assert broken_links(page) == [
        "figures/gone.png: no such file in the repository",
        "docs/there.md#nowhere: docs/there.md has no heading #nowhere",
        "../outside.md: no such file in the repository",
        "docs/missing.md: no such file in the repository",
    ]


def defines(module: str, name: str) -> bool:
    """Whether a module of the package has ``name``: asked of the module itself, or, where it cannot be imported here
    (an integration whose extra is missing), read from the names its source binds at its top level."""
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return name in top_level_names(module_file(module))


def top_level_names(path: Path) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports, also under if/try)."""
    names: set[str] = set()
    statements = list(ast.parse(path.read_text()).body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):
            statements += node.body + node.orelse + getattr(node, "handlers", []) + getattr(node, "finalbody", [])
        elif isinstance(node, ast.ExceptHandler):
            statements += node.body
    return names


def module_file(module: str) -> Path | None:
    """The source file of a module of the package (``gsema_fast.kernels`` lives in ``kernels/``), or None."""
    parts = module.split(".")
    if parts[0] != "gsema_fast":
        return None
    base = ROOT / "kernels" if parts[1:2] == ["kernels"] else ROOT / "gsema_fast"
    rest = parts[2:] if parts[1:2] == ["kernels"] else parts[1:]
    for candidate in (base.joinpath(*rest, "__init__.py"), base.joinpath(*rest).with_suffix(".py")):
        if rest or candidate.name == "__init__.py":
            if candidate.is_file():
                return candidate
    return None


def unknown_names(code: str) -> list[str]:
    """Names a snippet imports from the package, or reads as attributes of a package module, that do not exist."""
    tree = ast.parse(code)
    modules: dict[str, str] = {}  # local name -> package module
    unknown = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gsema_fast"):
            file = module_file(node.module)
            if file is None:
                unknown.append(node.module)
                continue
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if module_file(submodule) is not None:
                    modules[alias.asname or alias.name] = submodule
                elif not defines(node.module, alias.name):
                    unknown.append(submodule)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            module = modules[node.value.id]
            if not defines(module, node.attr):
                unknown.append(f"{module}.{node.attr}")
    return unknown


SNIPPETS = [
    pytest.param(code, id=f"{page.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}")
    for page in PAGES
    for text in [page.read_text()]
    for match in PYTHON_BLOCK.finditer(text)
    for code in [match.group(1)]
]


@pytest.mark.parametrize("code", SNIPPETS)
def test_every_python_snippet_parses_and_names_what_the_package_defines(code):
    assert unknown_names(code) == []


def test_the_snippets_are_found_and_an_unknown_name_is_caught():
    assert len(SNIPPETS) >= 8
    code = "from gsema_fast import ops\nfrom gsema_fast.ema import GSEMA, Gone\nops.grad_stats(a, b)\nops.gone(a)\n"
    assert unknown_names(code) == ["gsema_fast.ema.Gone", "gsema_fast.ops.gone"]
    assert unknown_names("from gsema_fast.nowhere import x\n") == ["gsema_fast.nowhere"]
    assert unknown_names("from gsema_fast.kernels import variants\n") == []
    with pytest.raises(SyntaxError):
        unknown_names("def broken(:\n")
