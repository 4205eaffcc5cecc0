"""The pass manager: Pass base class, results and reports, the registry, and the text pipeline grammar.

A pass is a frozen config dataclass plus a class with ``run(model, ctx) -> PassResult``. The registry is keyed
by the pass's CLI name; the CLI's ``passes`` listing, the text grammar and option parsing are all generated
from the config dataclasses, so every option has one name everywhere:

    gemm-to-conv,prune{pattern=2:4;exclude=head\\..*},validate{min-coverage=0.9}

Grammar: passes separated by top-level commas; options inside ``{...}`` separated by ``;``; values may be
quoted with '...' or "..." to contain ``;``, ``{`` or ``}``. Option names use dashes (``min-params``) and map
to dataclass fields with underscores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import pkgutil
import shutil
import time
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import onnx

from onnxsparse.errors import GateFailure, OnnxSparseError
from onnxsparse.ir.graph import cleanup, iter_graphs, op_counts, toposort
from onnxsparse.ir.model_io import Model, record_provenance
from onnxsparse.ir.tensors import external_path, is_spilled
from onnxsparse.presets import DEFAULT_PIPELINE as DEFAULT_PIPELINE  # re-exported: passes and tests import them here
from onnxsparse.presets import PRESETS as PRESETS

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
    """Run-wide inputs shared by passes: shapes for symbolic dims, calibration data, artefacts, progress."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calibration: Any = None
    calib_samples: int | None = None
    progress: bool = False
    #: artefacts passes leave for later passes (e.g. prune's masks for finetune)
    artifacts: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None


class Pass(ABC, Generic[C]):
    """Base class of every pass: ``name`` (CLI key), ``config_cls``, a one-line ``summary``, ``run``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[PassConfig]]
    summary: ClassVar[str] = ""

    def __init__(self, config: C | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("give either a config object or keyword options, not both")
        self.config: C = config if config is not None else self.config_cls(**options)  # type: ignore[assignment]
        if not isinstance(self.config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}")

    @abstractmethod
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        """Apply the pass in place on ``model`` and say what changed."""

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
        parts = []
        for f in dataclasses.fields(self.config):
            value = getattr(self.config, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
                continue
            parts.append(f"{f.name.replace('_', '-')}={_format_value(value)}")
        return self.name + ("{" + ";".join(parts) + "}" if parts else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    text = "" if value is None else str(value)
    if any(c in text for c in ";{}'\""):
        return "'" + text.replace("'", "\\'") + "'"
    return text


# ---------------------------------------------------------------------------------------------- registry


def registry() -> dict[str, type[Pass[Any]]]:
    """CLI name → pass class, discovered from the modules of ``onnxsparse.passes``."""
    import onnxsparse.passes as pkg

    found: dict[str, type[Pass[Any]]] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(module).values():
            # ``types.GenericAlias`` (``tuple[int, ...]`` in a module namespace) passes ``isinstance(.., type)``
            # on Python 3.10, and issubclass then raises: exclude it explicitly.
            is_class = isinstance(obj, type) and not isinstance(obj, types.GenericAlias)
            is_pass = is_class and issubclass(obj, Pass) and obj is not Pass
            if is_pass and getattr(obj, "name", None) and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return dict(sorted(found.items()))


def get_pass(name: str) -> type[Pass[Any]]:
    reg = registry()
    if name not in reg:
        raise OnnxSparseError(f"unknown pass '{name}' (known: {', '.join(reg)})")
    return reg[name]


# ---------------------------------------------------------------------------------------------- grammar


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside braces and quotes."""
    parts, buf, depth, quote = [], [], 0, ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and i + 1 < len(text):
                buf.append(text[i : i + 2])
                i += 2
                continue
            if c == quote:
                quote = ""
            buf.append(c)
        elif c in "'\"":
            quote = c
            buf.append(c)
        elif c == "{":
            depth += 1
            buf.append(c)
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise OnnxSparseError(f"unbalanced '}}' in pipeline '{text}'")
            buf.append(c)
        elif c == sep and depth == 0:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    if quote:
        raise OnnxSparseError(f"unterminated quote in '{text}'")
    if depth:
        raise OnnxSparseError(f"unbalanced '{{' in pipeline '{text}'")
    parts.append("".join(buf))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1].replace("\\" + value[0], value[0])
    return value


def config_fields(cls: type[PassConfig]) -> dict[str, dataclasses.Field[Any]]:
    """Option name (dashed) → dataclass field."""
    return {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}


def coerce(f: dataclasses.Field[Any], raw: str, owner: type[PassConfig]) -> Any:
    """Turn option text into the field's type (bool/int/float/str/tuple[str, ...], Optional of those)."""
    hints = typing.get_type_hints(owner)
    tp = hints[f.name]
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        if raw.lower() in ("", "none", "null"):
            return None
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp)
    name = f.name.replace("_", "-")
    try:
        if tp is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if origin in (tuple, list):
            items = tuple(_unquote(x) for x in _split_top(raw, ",") if x.strip())
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            return tuple(inner(x) for x in items) if inner in (int, float) else items
        if tp is str:
            return raw
    except ValueError:
        raise OnnxSparseError(f"option {name}: cannot read '{raw}' as {getattr(tp, '__name__', tp)}") from None
    raise OnnxSparseError(f"option {name} has unsupported type {tp}")


def make_pass(name: str, options: dict[str, str]) -> Pass[Any]:
    """Build a pass from its CLI name and text options (validated against its config)."""
    cls = get_pass(name)
    fields = config_fields(cls.config_cls)
    kwargs: dict[str, Any] = {}
    for key, raw in options.items():
        if key.replace("_", "-") not in fields:
            known = ", ".join(fields) or "none"
            raise OnnxSparseError(f"pass '{name}' has no option '{key}' (options: {known})")
        f = fields[key.replace("_", "-")]
        kwargs[f.name] = coerce(f, raw, cls.config_cls)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise OnnxSparseError(f"pass '{name}': {e}") from e


def parse_pipeline(text: str) -> list[Pass[Any]]:
    """``gemm-to-conv,prune{pattern=2:4;exclude=head.*}`` → the same pass objects the API builds."""
    passes: list[Pass[Any]] = []
    for item in _split_top(text, ","):
        item = item.strip()
        if not item:
            continue
        if "{" in item:
            if not item.endswith("}"):
                raise OnnxSparseError(f"bad pipeline item '{item}': text after '}}'")
            name, body = item[: item.index("{")].strip(), item[item.index("{") + 1 : -1]
        else:
            name, body = item, ""
        options: dict[str, str] = {}
        for opt in _split_top(body, ";"):
            if not opt.strip():
                continue
            if "=" not in opt:
                raise OnnxSparseError(f"bad option '{opt.strip()}' in '{item}': expected key=value")
            key, value = opt.split("=", 1)
            options[key.strip()] = _unquote(value)
        passes.append(make_pass(name, options))
    if not passes:
        raise OnnxSparseError("empty pipeline")
    return passes


# ---------------------------------------------------------------------------------------------- running


@dataclass
class PipelineResult:
    """The transformed model, each pass's result, and whole-model before/after op counts."""

    model: Model
    results: list[PassResult]
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    seconds: float

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modified": self.modified,
            "seconds": round(self.seconds, 4),
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "passes": [r.to_dict() for r in self.results],
        }


class Pipeline:
    """An ordered list of passes; itself usable wherever a sequence of passes is expected."""

    def __init__(self, passes: Iterable[Pass[Any]] | str) -> None:
        self.passes: list[Pass[Any]] = parse_pipeline(passes) if isinstance(passes, str) else list(passes)

    def text(self) -> str:
        return ",".join(p.text() for p in self.passes)

    def __iter__(self) -> typing.Iterator[Pass[Any]]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def run(
        self,
        model: Model | onnx.ModelProto,
        ctx: PassContext | None = None,
        check: bool = True,
        on_pass: Callable[[Pass[Any], PassResult], None] | None = None,
    ) -> PipelineResult:
        """Run every pass in order, then one cleanup + toposort, then the full ONNX checker."""
        if isinstance(model, onnx.ModelProto):
            model = Model(proto=model)
        ctx = ctx or PassContext()
        start = time.perf_counter()
        before = op_counts(model.proto.graph)
        results: list[PassResult] = []
        gate: GateFailure | None = None
        for p in self.passes:
            t0 = time.perf_counter()
            try:
                result = p.run(model, ctx)
            except GateFailure as e:
                gate = e
                break
            result.seconds = time.perf_counter() - t0
            result.name = p.name
            model = result.model
            results.append(result)
            log.info("%s: modified=%s in %.3fs", p.name, result.modified, result.seconds)
            if on_pass is not None:
                on_pass(p, result)
        if any(r.modified for r in results):
            cleanup(model.proto.graph)
            toposort(model.proto.graph)
            record_provenance(model, self.text())
        if check:
            check_model(model)
        out = PipelineResult(model, results, before, op_counts(model.proto.graph), time.perf_counter() - start)
        if gate is not None:
            gate.result = out  # type: ignore[attr-defined]
            raise gate
        return out


def check_model(model: Model) -> None:
    """``onnx.checker`` with full_check (strict shape inference) on the in-memory model.

    The checker resolves external data against the working directory, so for a model with external data
    the check runs from the model's folder (weights are not loaded; only their files are looked at).
    """
    try:
        if any(is_spilled(t, model) for g in iter_graphs(model.proto.graph) for t in g.initializer):
            with _linked_data_files(model) as folder, _chdir(folder):
                onnx.checker.check_model(model.proto, full_check=True)
        elif model.has_external_data() and model.base_dir is not None:
            with _chdir(model.base_dir):
                onnx.checker.check_model(model.proto, full_check=True)
        else:
            onnx.checker.check_model(model.proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise OnnxSparseError(f"the result fails the ONNX checker: {str(e).splitlines()[0][:300]}") from e


@contextlib.contextmanager
def _linked_data_files(model: Model) -> typing.Iterator[Path]:
    """A temporary folder standing in for every data file the model reads, with the tensors' locations
    pointing into it for the duration.

    Edited tensors of a large model live in scratch files outside the model folder (``tensors.spill_writer``),
    at absolute paths the checker refuses. The checker never reads external bytes, it only checks that each
    location is a relative path to a regular file (and refuses symlinks and hard links), so each real file —
    whose presence ``external_path`` verifies here — is stood in for by an empty file. No weights are copied;
    locations are restored afterwards.
    """
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="onnxsparse-check-"))
    links: dict[Path, str] = {}
    saved: list[tuple[onnx.StringStringEntryProto, str]] = []
    try:
        for g in iter_graphs(model.proto.graph):
            for t in g.initializer:
                if t.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                target = external_path(t, model)
                if target not in links:
                    links[target] = f"d{len(links)}.bin"
                    (folder / links[target]).touch()
                for entry in t.external_data:
                    if entry.key == "location":
                        saved.append((entry, entry.value))
                        entry.value = links[target]
        yield folder
    finally:
        for entry, value in saved:
            entry.value = value
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _chdir(path: Path) -> typing.Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_passes(model: Model, passes: Sequence[Pass[Any]], ctx: PassContext | None = None) -> PipelineResult:
    """Shorthand for ``Pipeline(passes).run(model, ctx)``."""
    return Pipeline(passes).run(model, ctx)
