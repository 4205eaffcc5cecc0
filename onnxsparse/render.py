"""Plain-text rendering shared by every command: aligned tables, sizes, JSON output.

Library code returns data (dicts, dataclasses); only the CLI turns it into text through these helpers, so
every table in the tool looks the same and ``--json`` always carries the same data as the table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], align: str | None = None) -> str:
    """An aligned text table. ``align`` gives one of ``l``/``r`` per column (default: numbers right)."""
    body = [["" if v is None else str(v) for v in row] for row in rows]
    head = [str(h) for h in headers]
    widths = [len(h) for h in head]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    if align is None:
        align = "".join("r" if body and all(_numeric(r[i]) for r in body if r[i]) else "l" for i in range(len(head)))

    def fmt(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if align[i] == "r" else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(head), fmt(["-" * w for w in widths])]
    lines.extend(fmt(r) for r in body)
    return "\n".join(lines)


def grouped_reasons(items: Iterable[dict[str, Any]], verb: str = "skipped", show: int = 4) -> list[str]:
    """``skipped 3: <reason> [a, b, c]`` lines, one per distinct reason, for reports' skip lists."""
    by_reason: dict[str, list[str]] = {}
    for item in items:
        by_reason.setdefault(str(item["reason"]), []).append(str(item["name"]))
    lines = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:show]) + (f", … (+{len(names) - show})" if len(names) > show else "")
        lines.append(f"  {verb} {len(names)}: {reason} [{shown}]")
    return lines


def _numeric(text: str) -> bool:
    t = text.replace(",", "").replace("%", "").replace("x", "").replace("×", "").strip()
    try:
        float(t)
    except ValueError:
        return False
    return True


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def write_json(data: Any, path: str | os.PathLike[str], flag: str = "--json") -> None:
    """Write JSON atomically (``-`` writes to stdout); an error names ``flag`` and ``path``, not a temp file."""
    text = json.dumps(data, indent=2, default=_default) + "\n"
    if str(path) == "-":
        import click

        click.echo(text, nl=False)
        return
    from onnxsparse.paths import write_text

    write_text(path, text, flag=flag)


def _default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")
