"""The repository's documentation: every relative link in README.md and docs/ leads to a file and heading that
exist."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(document: Path) -> set[str]:
    """GitHub's anchors: a heading lowercased, punctuation dropped (letters, digits, _ and - kept), spaces to -."""
    headings = re.findall(r"^#+ (.+)$", document.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(REPO).as_posix())
def test_relative_links_resolve(document):
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists() or (anchor and anchor not in heading_anchors(linked)):
            broken.append(target)
    assert not broken, f"{document.name} links to what does not exist: {broken}"


def test_the_docs_exist_and_the_readme_points_to_each():
    readme = (REPO / "README.md").read_text()
    for name in ("method.md", "sites.md", "protocols.md", "results.md"):
        assert (REPO / "docs" / name).is_file() and f"(docs/{name})" in readme, name
