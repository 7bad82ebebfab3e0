"""docs/errors.md: every row names a test that exists, and the page is in the documentation's tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "errors.md"
CITED = re.compile(r"`(test_\w+\.py)::(test_\w+)`")


def _rows() -> list[list[str]]:
    rows = []
    for line in PAGE.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| where ") or line.startswith("| ---"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(cells)
    return rows


def test_every_row_cites_an_existing_test():
    rows = _rows()
    assert len(rows) >= 40
    for cells in rows:
        assert len(cells) == 5 and all(cells), cells
        match = CITED.fullmatch(cells[-1])
        assert match, cells
        path = ROOT / "tests" / match.group(1)
        assert path.is_file(), cells[-1]
        assert re.search(rf"^def {match.group(2)}\(", path.read_text(), re.MULTILINE), cells[-1]


def test_page_is_in_the_tree_and_cites_no_issue_numbers():
    assert "\nerrors\n" in (ROOT / "docs" / "index.md").read_text()
    text = PAGE.read_text()
    assert not re.search(r"#\d+|issue", text, re.IGNORECASE)
