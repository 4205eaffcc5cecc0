"""The pass contract: the ``Pass`` base class, its config, results and reports, the run-wide context.

A pass is a frozen config dataclass plus a class with ``run(model, ctx) -> PassResult``. The contract, after
onnx-ir's pass infrastructure (``passes/_pass_infra.py``), is checked by ``Pass.apply`` (and so by
``Pipeline.run``) around every pass:

- ``requires(model, ctx)``: what the pass needs (calibration data, masks), a one-line ``OnnxSparseError``
  raised before the pass does any work;
- ``ensures(model, ctx, result)``: what it promises afterwards (e.g. the n:m pattern of what it pruned),
  checked from what the pass already computed, never by re-reading the weights; a failure is a bug in the
  pass (``PassContractError``);
- ``in_place``: an in-place pass edits the model it is given and returns that same object; a functional
  pass returns a new model and leaves its input alone;
- ``PassResult.modified``: computed from what the pass changed, never a constant.

Passes hand each other artefacts through typed fields of ``PassContext`` (``masks``, ``teacher``), not
through a free-form dict.

Why apart from ``pipeline`` (the runner) and ``grammar`` (the registry and text form): a pass, and the
modules under the passes that fill its report (``pruning.targets``, ``fp16``), need the contract alone; the
grammar needs it to recognise pass classes, and the runner needs the grammar to read ``Pipeline("text")``.
With the contract in one module below both, the imports run one way: passes and grammar → ``pass_base`` ←
``pipeline`` → ``grammar``. A pass's own text form (``pass_text``) lives here, with the configs it prints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from onnxsparse.ir.model_io import Model

log = logging.getLogger("onnxsparse")


@dataclass(frozen=True)
class PassConfig:
    """Base for pass configs. Subclasses are frozen dataclasses whose fields carry ``doc`` metadata."""


C = TypeVar("C", bound=PassConfig)


def option(default: Any, doc: str, *, output: bool = False, input: bool = False, **kwargs: Any) -> Any:
    """A config field with its help text (shown by ``onnxsparse passes`` and ``--help``).

    ``output=True`` marks a path the pass writes, ``input=True`` one it reads: ``pass_paths`` collects them so
    the CLI checks every output against every input (``paths.check_outputs``) before any pass runs.
    """
    metadata = {"doc": doc, "output": output, "input": input}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def pass_paths(passes: Iterable[Pass[Any]]) -> tuple[list[str], list[tuple[str, str]]]:
    """The paths the passes' options read and write: ``(inputs, [("prune{masks}", path), ...])``."""
    inputs: list[str] = []
    outputs: list[tuple[str, str]] = []
    for p in passes:
        for f in dataclasses.fields(p.config):
            value = getattr(p.config, f.name)
            if value is None or value == "":
                continue
            if f.metadata.get("output"):
                outputs.append((f"{p.name}{{{f.name.replace('_', '-')}}}", str(value)))
            elif f.metadata.get("input"):
                inputs.append(str(value))
    return inputs, outputs


@dataclass
class PassReport:
    """What a pass did: changed items, skipped items with reasons, and free-form details."""

    changed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def skip(self, what: str, reason: str, **extra: Any) -> None:
        self.skipped.append({"name": what, "reason": reason, **extra})
        log.info("skipped %s: %s", what, reason)

    def change(self, what: str, **extra: Any) -> None:
        self.changed.append({"name": what, **extra})

    def to_dict(self) -> dict[str, Any]:
        return {"changed": self.changed, "skipped": self.skipped, "details": self.details}


@dataclass
class PassResult:
    """Outcome of one pass. ``modified`` must be honest: tests check it against the graph."""

    model: Model
    modified: bool
    report: PassReport = field(default_factory=PassReport)
    seconds: float = 0.0
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        head = {"pass": self.name, "modified": self.modified, "seconds": round(self.seconds, 4)}
        return {**head, **self.report.to_dict()}


@dataclass
class PassContext:
    """Run-wide inputs shared by passes, and the artefacts one pass hands to a later one.

    ``masks``: initializer name → bool array shaped like the stored tensor (True = may be non-zero). The
    prune pass adds the masks of every tensor it pruned or found already n:m; the finetune pass trains with
    them held fixed (unless given ``masks=PATH``), and a later prune chooses its keep-set inside them.

    ``teacher``: the dense model the finetune pass distils to when its ``teacher=`` option is not given — a
    path or an in-memory ``Model``, for the Python API (e.g. a pipeline run on a model that has no file).
    Without either, finetune distils to the file the pipeline's model was loaded from.
    """

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calibration: Any = None
    calib_samples: int | None = None
    progress: bool = False
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    teacher: Model | str | os.PathLike[str] | None = None
    workdir: Path | None = None


def format_value(value: Any) -> str:
    """An option value as pipeline text (quoted where it holds a character of the grammar)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    text = "" if value is None else str(value)
    if any(c in text for c in ";{}'\""):
        return "'" + text.replace("'", "\\'") + "'"
    return text


def pass_text(name: str, config: PassConfig) -> str:
    """``name{option=value;...}`` with only the options that differ from their defaults."""
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        parts.append(f"{f.name.replace('_', '-')}={format_value(value)}")
    return name + ("{" + ";".join(parts) + "}" if parts else "")


class PassContractError(RuntimeError):
    """A pass broke its declared contract (``in_place``, ``ensures``): a bug in the pass, not in the input."""


class Pass(ABC, Generic[C]):
    """Base class of every pass: ``name`` (CLI key), ``config_cls``, a one-line ``summary``, ``in_place``,
    ``run``, and optionally ``requires`` / ``ensures`` (see the module docstring)."""

    name: ClassVar[str]
    config_cls: ClassVar[type[PassConfig]]
    summary: ClassVar[str] = ""
    #: True: ``run`` edits the model it is given and returns that same object. False: it returns a new
    #: model and leaves its input untouched. Every pass declares it; ``Pipeline.run`` checks the claim.
    in_place: ClassVar[bool]
    #: True: a modified run only rewrites initializer values in place (prune), so the model's weighted-layer
    #: index (``model.layer_cache``, ``onnxsparse.ir.index``) stays valid; otherwise ``Pipeline.run`` drops it.
    values_only: ClassVar[bool] = False

    def __init__(self, config: C | None = None, **options: Any) -> None:
        if not isinstance(getattr(type(self), "in_place", None), bool):
            raise TypeError(f"{type(self).__name__} must declare in_place: ClassVar[bool]")
        if config is not None and options:
            raise TypeError("give either a config object or keyword options, not both")
        self.config: C = config if config is not None else self.config_cls(**options)  # type: ignore[assignment]
        if not isinstance(self.config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}")

    @abstractmethod
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """The pass's work, in place or not as ``in_place`` says, and what changed. It may assume that
        ``requires`` held: call ``apply`` (or run a ``Pipeline``) to have the contract checked."""

    def apply(self, model: Model, ctx: PassContext | None = None) -> PassResult:
        """``requires``, ``run``, the ``in_place`` check, ``ensures``: one pass with its contract checked."""
        ctx = ctx if ctx is not None else PassContext()
        self.requires(model, ctx)
        before = None if self.in_place else _GraphShape.of(model)
        result = self.run(model, ctx)
        _check_in_place(self, model, result, before)
        if result.modified and not self.values_only:
            result.model.layer_cache.invalidate()  # its layers describe the graph before this pass
        self.ensures(result.model, ctx, result)
        return result

    def requires(self, model: Model, ctx: PassContext) -> None:
        """Raise a one-line ``OnnxSparseError`` when this pass, as configured, cannot run on ``model`` with
        ``ctx`` (missing calibration data, masks, ...). Called by ``Pipeline.run`` before ``run``; it must
        not change the model. The default requires nothing."""

    def ensures(self, model: Model, ctx: PassContext, result: PassResult) -> None:
        """Raise ``PassContractError`` when ``result`` breaks what the pass promises. Called by
        ``Pipeline.run`` after ``run``; it must be cheap (use what the pass computed, do not re-read a
        large model's weights). The default promises nothing beyond the ``in_place`` contract."""

    def reads_calibration(self) -> bool | None:
        """Whether this pass, as configured, reads ``ctx.calibration`` (the CLI's ``--calib``).

        ``onnxsparse run`` warns when ``--calib`` is given and every pass says False. None (the default)
        means "not declared" and never triggers the warning.
        """
        return None

    def render(self, result: PassResult) -> str | None:
        """Optional human summary of ``result`` for the CLI (e.g. validate's per-layer table)."""
        return None

    def text(self) -> str:
        """This pass as pipeline text (only options that differ from their defaults)."""
        return pass_text(self.name, self.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


@dataclass(frozen=True)
class _GraphShape:
    """What a functional pass must leave alone, cheaply: the proto object and every main-graph node's op,
    name and wiring, and the initializer names. Initializer values and subgraph bodies are not compared
    (that would mean hashing the weights); the check catches a pass that edits its input's graph, not one
    that overwrites tensor bytes in place. The proto is held (compared by identity in ``same``), not its
    ``id()``: an id can be reused by a new proto once the old one is freed."""

    proto: onnx.ModelProto = field(compare=False, repr=False)
    nodes: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]
    initializers: tuple[str, ...]

    @classmethod
    def of(cls, model: Model) -> _GraphShape:
        g = model.proto.graph
        nodes = tuple((n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in g.node)
        return cls(model.proto, nodes, tuple(t.name for t in g.initializer))

    def same(self, other: _GraphShape) -> bool:
        """The same proto object with the same main-graph wiring and initializer names."""
        return self.proto is other.proto and self == other


def _check_in_place(p: Pass[Any], model: Model, result: PassResult, before: _GraphShape | None) -> None:
    """The ``in_place`` claim of ``p``, held against what its ``run`` did with ``model``."""
    if p.in_place:
        if result.model is not model:
            raise PassContractError(f"pass '{p.name}' declares in_place but returned a different model object")
        return
    if result.model is model or result.model.proto is model.proto:
        raise PassContractError(f"pass '{p.name}' is functional (in_place=False) but returned its input model")
    if before is not None and not before.same(_GraphShape.of(model)):
        raise PassContractError(f"pass '{p.name}' is functional (in_place=False) but changed its input's graph")
