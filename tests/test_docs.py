"""The documentation: README.md and docs/*.md.

* Every generated table and value (`<!-- table: NAME -->` … `<!-- /table -->`,
  `<!-- value: NAME -->…<!-- /value -->`) equals what `benchmarks.docs_tables` makes of the files
  in benchmarks/results/ — no number drifts from the result it quotes.
* The README stays a front door: at most 200 lines.
* No lab-notebook words: "session", "issue" with a number, "this run", dates of runs.
* Every relative link and image points to a file or folder that exists (and to a heading that
  exists, where it names one).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import docs_tables

ROOT = docs_tables.ROOT
DOCS = docs_tables.doc_files()
README_MAX_LINES = 200


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_generated_tables_equal_the_result_files(path):
    stale = docs_tables.differences([path])
    assert not stale, "\n".join(stale) + "\nrun `python -m benchmarks.docs_tables`"


def test_every_document_has_generated_numbers_and_all_generators_exist():
    used = set()
    for path in DOCS:
        for kind, name, _ in docs_tables.blocks(path.read_text(encoding="utf-8")):
            registry = docs_tables.TABLES if kind == "table" else docs_tables.VALUES
            assert name in registry, f"{_name(path)}: unknown {kind} generator {name!r}"
            used.add(name)
    assert "headline" in used


def test_check_names_a_stale_table(tmp_path, capsys):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = docs_tables.TABLES["headline"].make()
    first_row = body.splitlines()[2]
    assert first_row in text
    stale = tmp_path / "stale.md"
    stale.write_text(text.replace(first_row, first_row.replace("|", "| 0.0", 1)), encoding="utf-8")
    found = docs_tables.differences([stale])
    assert len(found) == 1 and "'headline'" in found[0]
    docs_tables.update([stale])
    assert stale.read_text(encoding="utf-8") == text
    assert docs_tables.main(["--check"]) == 0, capsys.readouterr().out


def test_values_are_replaced_inline():
    text = "costs <!-- value: default_cost_resnet50 -->?<!-- /value --> the paper's merge"
    rendered = docs_tables.render(text)
    assert rendered.startswith("costs <!-- value: default_cost_resnet50 -->")
    assert "?" not in rendered and rendered.endswith("<!-- /value --> the paper's merge")
    with pytest.raises(KeyError, match="unknown value generator"):
        docs_tables.render("<!-- value: no_such_value -->1<!-- /value -->")


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the manual goes into docs/"


LAB_NOTEBOOK = [
    (re.compile(r"\bsessions?\b", re.IGNORECASE), "'session'"),
    (re.compile(r"\bissues?\s*#?\s*\d", re.IGNORECASE), "'issue' and a number"),
    (re.compile(r"\bthis run\b", re.IGNORECASE), "'this run'"),
    (re.compile(r"\b20\d\d-\d\d-\d\d\b"), "a date"),
]


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_no_lab_notebook_words(path):
    text = path.read_text(encoding="utf-8")
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, what in LAB_NOTEBOOK:
            if pattern.search(line):
                found.append(f"{_name(path)}:{number}: {what}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    anchors: set[str] = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).replace("`", "").lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_relative_links_point_to_files_that_exist(path):
    broken = []
    for target in LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file or folder")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{_name(path)}: " + "; ".join(broken)
