"""Pruning plans: which layers to prune, as ``sensitivity`` chooses them and ``prune{plan=PATH}`` applies them.

The file is JSON: ``{"version": 1, "method": "sparsegpt", "pattern": "2:4", "layers": ["<node name>", ...]}``
(extra keys, such as sensitivity's estimates, are kept by the writer and ignored here). One reader and one
writer, so the command that writes a plan and the pass that reads it cannot drift apart.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxsparse.errors import OnnxSparseError
from onnxsparse.sparsity import parse_pattern

PLAN_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """The layers (node names) to prune, with the method and pattern they were chosen for."""

    layers: frozenset[str]
    method: str | None = None
    pattern: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def read_plan(path: str | os.PathLike[str], pattern: str | None = None) -> Plan:
    """Read a plan; with ``pattern``, refuse one made for a different n:m pattern (one-line errors)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise OnnxSparseError(f"prune: cannot read plan '{path}': {str(e).splitlines()[0][:160]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("layers"), list):
        raise OnnxSparseError(f"prune: plan '{path}' has no 'layers' list")
    if raw.get("version", PLAN_VERSION) != PLAN_VERSION:
        raise OnnxSparseError(f"prune: plan '{path}' has version {raw.get('version')}, expected {PLAN_VERSION}")
    made_for = raw.get("pattern")
    if made_for and pattern and parse_pattern(str(made_for)) != parse_pattern(pattern):
        raise OnnxSparseError(f"prune: plan '{path}' was made for pattern {made_for}, not {pattern}")
    method = raw.get("method")
    if method is not None:
        from onnxsparse.pruning.apply import METHODS

        if method not in METHODS:
            raise OnnxSparseError(f"prune: plan '{path}' names unknown method '{method}'")
    extra = {k: v for k, v in raw.items() if k not in ("version", "layers", "method", "pattern")}
    return Plan(frozenset(map(str, raw["layers"])), method, made_for, extra)


def check_plan(plan: Plan, known: Collection[str], path: str) -> None:
    """Refuse a plan naming layers the model does not have (a plan for another model, or a renamed node)."""
    unknown = sorted(plan.layers - set(known))
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise OnnxSparseError(f"prune: plan '{path}' names unknown layer(s) {', '.join(unknown[:3])}{more}")


def write_plan(path: str | os.PathLike[str], layers: Iterable[str], method: str, pattern: str, **extra: Any) -> Path:
    """Write a plan atomically (no half-written file if anything fails); ``extra`` keys are stored as given."""
    out = Path(path)
    body = {"version": PLAN_VERSION, "method": method, "pattern": pattern, "layers": list(layers), **extra}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".json", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
