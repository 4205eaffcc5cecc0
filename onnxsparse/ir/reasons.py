"""Why a weighted layer is left out: a code that programs match, and the sentence that people read.

``find_layers`` (and the ``check_pattern`` / ``select_reason`` questions asked of a layer) used to write free
text, and other modules matched those sentences (``prune`` re-ran discovery with shapes when it saw "weight shape
after its Reshape is unknown"): a reworded message silently broke the match. A ``Skip`` carries a ``Reason`` code
plus the details its sentence needs; ``str(skip)`` renders exactly the text reports, JSON and the CLI have always
shown, and code compares ``skip.code``, never the text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Reason(enum.Enum):
    """Skip codes; each value is the template its sentence is rendered from (``str.format`` fields)."""

    #: the weight is a graph input that also has an initializer: a caller may feed another value
    WEIGHT_INPUT_OVERRIDABLE = "weight '{name}' is a graph input (overridable at run time)"
    #: the weight is a plain graph input
    WEIGHT_INPUT = "weight '{name}' is a graph input, not a constant"
    #: the weight name is produced by nothing (a dangling reference)
    NO_PRODUCER = "weight '{name}' has no producer"
    #: the weight is the output of an op outside the known chain ops
    WEIGHT_COMPUTED = "weight is computed at run time by {op} '{node}'"
    #: a Reshape in the weight chain has a target shape that is neither constant nor inferred
    RESHAPE_SHAPE_UNKNOWN = "weight shape after its Reshape is unknown"
    #: the weight's rank does not fit the op (Conv rank < 3, Gemm rank != 2, MatMul rank 1)
    WEIGHT_RANK = "{op} weight has rank {rank}"
    #: not a Conv/ConvTranspose/Gemm/MatMul
    NOT_WEIGHTED_OP = "{op} is not a weighted op"
    #: the reduction axis has no single axis of the stored tensor behind the chain's Reshape
    AXIS_LOST_IN_RESHAPE = "the reduction axis does not survive the weight's Reshape"
    #: one stored tensor, several layers reducing over different axes of it
    SHARED_AXIS_CONFLICT = "weight '{name}' is shared with {others} which reduce over a different axis"
    #: the weight shape is known but its reduction axis is not
    REDUCTION_SIZE_UNKNOWN = "reduction axis size unknown"
    #: the reduction axis length is not a multiple of the group size m
    NOT_DIVISIBLE = "{what}={size} is not divisible by {m}"
    #: the ``include`` regex matches neither the node nor the weight name
    NOT_INCLUDED = "not matched by include '{pattern}'"
    #: the ``exclude`` regex matches the node or the weight name
    EXCLUDED = "excluded by '{pattern}'"

    def skip(self, **detail: object) -> Skip:
        """This code with the details its sentence names, e.g. ``Reason.NO_PRODUCER.skip(name="w")``."""
        return Skip(self, tuple((k, str(v)) for k, v in detail.items()))


@dataclass(frozen=True)
class Skip:
    """A skip reason: its ``code`` and the (name, text) details its sentence is rendered from.

    Immutable and hashable, so reports may group by it; ``str()`` is the human sentence.
    """

    code: Reason
    detail: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        str(self)  # a missing detail fails here, where the Skip is made, not when a report renders it

    def __str__(self) -> str:
        return self.code.value.format(**dict(self.detail))

    def to_dict(self) -> dict[str, str]:
        """``{"code": ..., "reason": ...}`` for JSON reports: the code next to the unchanged text."""
        return {"code": self.code.name, "reason": str(self)}


def render(reason: Skip | str | None, default: str) -> str:
    """A reason's text, or ``default`` when there is none (the ``layer.reason or "..."`` of every report)."""
    return default if reason is None else str(reason)


def code_key(reason: Skip | str | None) -> dict[str, str]:
    """``{"code": NAME}`` for a coded reason, ``{}`` for free text: the extra key of a JSON skip entry."""
    return {"code": reason.code.name} if isinstance(reason, Skip) else {}
