"""The ``(Sparsity)`` lines of a TensorRT builder log: which layers were eligible for sparse tactics, which won.

Read from the Python builder's logger messages (``onnxsparse.trt.builder``) and from a saved trtexec log alike. The
patterns follow log lines quoted in TensorRT's issue tracker (TensorRT 10's "Found/Chose N layer(s)" and 8.x's
older wording); no TensorRT is needed to parse them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

_FOUND = re.compile(r"\(Sparsity\) Found (\d+) layer\(s\) eligible to use sparse tactics:?\s*(.*)$")
_CHOSE = re.compile(r"\(Sparsity\) Chose (\d+) layer\(s\) using sparse tactics:?\s*(.*)$")
# TensorRT 8.x wording
_ELIGIBLE_OLD = re.compile(r"\(Sparsity\) Layers eligible for sparse math:\s*(.*)$")
_PICKED_OLD = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:\s*(.*)$")


@dataclass
class SparsityReport:
    """What the builder's log says about sparse tactics (None: the log had no such line)."""

    eligible: int | None = None
    chosen: int | None = None
    eligible_layers: list[str] = field(default_factory=list)
    chosen_layers: list[str] = field(default_factory=list)

    @property
    def seen(self) -> bool:
        return self.eligible is not None or self.chosen is not None

    @property
    def dense_layers(self) -> list[str]:
        """Eligible layers TensorRT left dense (a dense kernel was faster)."""
        chosen = set(self.chosen_layers)
        return [n for n in self.eligible_layers if n not in chosen]

    def to_dict(self) -> dict[str, Any]:
        return {
            "eligible": self.eligible,
            "chosen": self.chosen,
            "eligible_layers": self.eligible_layers,
            "chosen_layers": self.chosen_layers,
            "eligible_left_dense": self.dense_layers,
        }


def _names(text: str) -> list[str]:
    """Layer names from ``a, b + c, d`` (fused layers keep their ``+``)."""
    return [n.strip() for n in text.strip().rstrip(".").split(", ") if n.strip()]


def parse_sparsity_log(lines: Iterable[str]) -> SparsityReport:
    """Read the ``(Sparsity)`` lines of a TensorRT builder log (Python logger messages or trtexec output).

    Counts from "Found N layer(s)"/"Chose M layer(s)" are kept as written; where a log repeats them (one
    per optimization pass) the last one wins, like the engine that comes out of the build.
    """
    report = SparsityReport()
    for raw in lines:
        for line in str(raw).splitlines():
            if "(Sparsity)" not in line:
                continue
            if m := _FOUND.search(line):
                report.eligible, report.eligible_layers = int(m.group(1)), _names(m.group(2))
            elif m := _CHOSE.search(line):
                report.chosen, report.chosen_layers = int(m.group(1)), _names(m.group(2))
            elif m := _ELIGIBLE_OLD.search(line):
                report.eligible_layers = _names(m.group(1))
                report.eligible = len(report.eligible_layers)
            elif m := _PICKED_OLD.search(line):
                report.chosen_layers = _names(m.group(1))
                report.chosen = len(report.chosen_layers)
    return report
