"""Real text corpora that ship in packages, as small labelled tables for the text-model tests.

The fortunes: Debian's ``fortunes`` package (BSD-licensed fortune-mod data, /usr/share/games/fortunes),
one file per category; the category is the label. See docs/results.md.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

FORTUNES_DIR = Path("/usr/share/games/fortunes")


def fortunes(categories: tuple[str, ...], *, per_category: int, max_chars: int = 400) -> pd.DataFrame:
    """The first ``per_category`` fortunes (up to ``max_chars`` long) of each category file, as (text, label)."""
    rows = []
    for category in categories:
        raw = (FORTUNES_DIR / category).read_text(encoding="utf-8", errors="replace")
        texts = [" ".join(part.split()) for part in raw.split("\n%\n")]
        texts = [t for t in texts if 20 <= len(t) <= max_chars][:per_category]
        assert len(texts) == per_category, f"{category}: only {len(texts)} fortunes"
        rows += [{"text": t, "label": category} for t in texts]
    return pd.DataFrame(rows)
