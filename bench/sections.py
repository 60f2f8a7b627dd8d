"""Sections of bench/results.md, each owned by one benchmark: a benchmark replaces the text
between its own markers and leaves the rest of the file (other sections, notes) alone."""
from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, name: str, text: str, *, first: bool = False) -> None:
    """Put `text` between the markers of section `name` in `path`. When the markers are missing
    the section is appended (or, with `first`, put at the top)."""
    begin = f"<!-- {name}:begin (written by the benchmark; edits here are overwritten) -->"
    end = f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    elif first:
        new = block + "\n\n" + old.lstrip()
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)
