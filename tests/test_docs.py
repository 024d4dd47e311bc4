"""README.md and docs/*.md: every relative link points to a file that exists, every #anchor to a
heading of its page (GitHub's slugs), and the README links every docs page."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)\)")  # the target of [text](target) and ![alt](target); text may span lines
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where `](` is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, markup and punctuation dropped except '-' and '_',
    each space a '-' (so "A — B" gives "a--b")."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the page's headings, duplicates numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """Each relative link of ``path`` whose file or #anchor does not exist, with the reason."""
    problems = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ... are not checked here
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.relative_to(ROOT)}: {target}: no file {file_part}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{path.relative_to(ROOT)}: {target}: no heading #{anchor} in {linked.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    assert broken_links(page) == []


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(prose((ROOT / "README.md").read_text()))}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert missing == [], f"docs pages the README's Documentation list does not link: {missing}"


@pytest.mark.parametrize("heading, expected", [
    ("Serving: an OpenAI-compatible server", "serving-an-openai-compatible-server"),
    ("Results (held-out text, recommended settings)", "results-held-out-text-recommended-settings"),
    ("HiRE — compute only the rows that matter", "hire--compute-only-the-rows-that-matter"),
    ("16-bit weights (`--dequantized`)", "16-bit-weights---dequantized"),
    ("Measured: P = 2 on gloo, this machine (2 cores, one thread per rank)",
     "measured-p--2-on-gloo-this-machine-2-cores-one-thread-per-rank"),
    ("snake_case stays", "snake_case-stays"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def test_checker_reports_a_missing_file_and_a_missing_anchor(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)  # relative_to(ROOT) in the messages
    (tmp_path / "a.md").write_text("# Title\n\n## Two words\n\nSee [x](#two-words), [y](b.md), [z](#nope).\n"
                                   "```\nnot[a](link)\n```\n`[c](d)` and [web](https://example.org).\n")
    assert broken_links(tmp_path / "a.md") == ["a.md: b.md: no file b.md", "a.md: #nope: no heading #nope in a.md"]
    (tmp_path / "b.md").write_text("# B\n")
    assert broken_links(tmp_path / "a.md") == ["a.md: #nope: no heading #nope in a.md"]
