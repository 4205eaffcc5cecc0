"""Plain-text rendering shared by every command: aligned tables, sizes, JSON output.

Library code returns data (dicts, dataclasses); only the CLI turns it into text through these helpers, so
every table in the tool looks the same and ``--json`` always carries the same data as the table.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: a shortened column keeps at least this many characters (or its header's width, if wider)
MIN_CELL = 16
#: click context meta key set by ``--wide`` (every command has it: cli.LazyGroup adds it)
WIDE_KEY = "onnxsparse.wide"


def output_width() -> int | None:
    """The width tables must fit, or None for no limit.

    ``--wide``: no limit. Else ``COLUMNS`` when set (shells export it; CI can set it), else the terminal's
    width when stdout is one. Output to a file or pipe is not shortened: a log keeps full names.
    """
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get(WIDE_KEY):
        return None
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def shorten_middle(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by replacing its middle with '…' (names differ at both ends:
    ``/encoder/layer.11/attention/…/MatMul``)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    keep = width - 1
    head = (keep + 1) // 2
    return text[:head] + "…" + (text[len(text) - (keep - head) :] if keep - head else "")


def shorten_end(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters at the end, marked with '…' (prose reads from its start)."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"[: max(width, 0)]


def table(
    rows: Iterable[Sequence[Any]],
    headers: Sequence[str],
    align: str | None = None,
    width: int | None = None,
    prose: Sequence[str] = (),
) -> str:
    """An aligned text table. ``align`` gives one of ``l``/``r`` per column (default: numbers right).

    Fits ``width`` characters (None: ``output_width()``, which may be no limit). Prose columns (headers in
    ``prose``, and a left-aligned last column) are narrowed first and cut at the end; then the widest other
    text columns, cut in the middle (names differ at both ends) — down to ``MIN_CELL`` characters, then,
    if that is not enough, to half of it. Numbers are never cut (a table of numbers may stay wider).
    The full values belong in the JSON output, which is never shortened.
    """
    body = [["" if v is None else str(v) for v in row] for row in rows]
    head = [str(h) for h in headers]
    widths = [len(h) for h in head]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    if align is None:
        align = "".join("r" if body and all(_numeric(r[i]) for r in body if r[i]) else "l" for i in range(len(head)))
    is_prose = [h in prose or (i == len(head) - 1 and align[i] == "l") for i, h in enumerate(head)]
    limit = output_width() if width is None else width
    if limit is not None:
        excess = sum(widths) + 2 * (len(widths) - 1) - limit
        text = [i for i in range(len(head)) if align[i] == "l"]
        for least in (MIN_CELL, MIN_CELL // 2):  # a second, harder squeeze only where the first was not enough
            floors = [max(min(w, least), len(h)) for w, h in zip(widths, head, strict=True)]
            for group in ([i for i in text if is_prose[i]], [i for i in text if not is_prose[i]]):
                excess = _narrow(widths, floors, group, excess)

    common = [_common_ends([r[i] for r in body]) if not is_prose[i] else (0, 0) for i in range(len(head))]

    def fmt(cells: Sequence[str], shared: bool = True) -> str:
        out = []
        for i, cell in enumerate(cells):
            if is_prose[i]:
                cell = shorten_end(cell, widths[i])
            elif len(cell) > widths[i]:
                pre, suf = common[i] if shared else (0, 0)
                if pre or suf:  # what the rows share says nothing: show what tells them apart
                    cell = ("…" if pre else "") + cell[pre : len(cell) - suf] + ("…" if suf else "")
                cell = shorten_middle(cell, widths[i])
            out.append(cell.rjust(widths[i]) if align[i] == "r" else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(head, shared=False), fmt(["-" * w for w in widths], shared=False)]
    lines.extend(fmt(r) for r in body)
    return "\n".join(lines)


def _common_ends(cells: list[str]) -> tuple[int, int]:
    """Lengths of the prefix and suffix (cut at a '/', '.' or '_') that every one of several distinct cells
    shares: exporter paths like ``/model/encoder/layer.3/…/MatMul`` differ only in the middle."""
    values = [c for c in dict.fromkeys(cells) if c and c != "-"]
    if len(values) < 2:
        return 0, 0
    pre = len(os.path.commonprefix(values))  # noqa: RUF071 - by character on purpose: names, not paths
    suf = len(os.path.commonprefix([v[::-1] for v in values]))  # noqa: RUF071
    shortest = min(len(v) for v in values)
    seps = "/._"
    pre = max((i + 1 for i in range(min(pre, shortest)) if values[0][i] in seps), default=0)
    suf = max((i + 1 for i in range(min(suf, shortest - pre)) if values[0][-1 - i] in seps), default=0)
    return pre, suf


def _narrow(widths: list[int], floors: list[int], columns: list[int], excess: int) -> int:
    """Narrow ``columns`` in place, widest first, not below their floors, by up to ``excess`` in all;
    returns the excess left."""
    while excess > 0:
        candidates = [i for i in columns if widths[i] > floors[i]]
        if not candidates:
            break
        widest = max(candidates, key=lambda i: widths[i])
        others = [widths[i] for i in candidates if i != widest]
        step = max(1, min(excess, widths[widest] - max([floors[widest], *others])))
        widths[widest] -= step
        excess -= step
    return excess


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
    from onnxsparse.ir.paths import write_text

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
