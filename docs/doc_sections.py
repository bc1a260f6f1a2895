"""Rewrite one generated section of a docs page, between its start and end markers (shared by the
table scripts in this folder: scale_table.py, device_stats_table.py, device_sweeps.py)."""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path


def regenerate(doc: Path, start: str, end: str, make_text: Callable[[], str], what: str, description: str,
               argv: list[str] | None = None) -> int:
    """``--print`` prints ``make_text()``; otherwise it replaces what stands between ``start`` and ``end``
    in ``doc`` (written as ``start\\n{text}end``: the text brings its own final newline)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--print", action="store_true", help=f"print {what} instead of rewriting {doc.name}")
    args = parser.parse_args(argv)
    text = make_text()
    if args.print:
        print(text)
        return 0
    page = doc.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(page):
        raise SystemExit(f"{doc} has no {start} ... {end} section to rewrite")
    doc.write_text(pattern.sub(lambda _: f"{start}\n{text}{end}", page))
    print(f"rewrote {what} in {doc}")
    return 0
