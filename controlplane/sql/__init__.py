"""Named SQL queries, loaded from ``queries.sql`` (``-- name --`` headers), so that the
control plane's hot-path SQL lives in one file instead of scattered strings."""

from __future__ import annotations

import re
from pathlib import Path

_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def load_queries(path: Path) -> dict[str, str]:
    """The ``-- name --`` blocks of a .sql file, by name."""
    text = path.read_text()
    found: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(text)
        body = "\n".join(
            line
            for line in text[match.end() : end].strip().splitlines()
            if not line.lstrip().startswith("--")
        )
        found[match.group(1)] = body
    return found


queries: dict[str, str] = load_queries(Path(__file__).with_name("queries.sql"))
