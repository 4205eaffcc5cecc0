"""TensorRT engine building for 2:4-sparse models: profiles, the precision plan, and the builder itself.

TensorRT is imported lazily (``import_tensorrt``) so that everything else in onnxsparse works without it;
where it is missing the ``build`` command prints the equivalent ``trtexec`` command instead. The API calls
follow TensorRT's documented Python API:

* TensorRT 10: ``create_network(0)`` (explicit batch is the only mode), ``BuilderFlag.SPARSE_WEIGHTS`` plus
  ``FP16``/``INT8`` flags; INT8 comes from the model's own Q/DQ nodes (no calibrator).
* TensorRT 11: every network is strongly typed and the precision flags are gone, so precision must be in
  the ONNX file: fp16 (and best) builds parse a float16 model (the ``build`` command makes a copy with the
  ``to-fp16`` pass first; this module takes the model as given and imports no pass), int8 builds parse the
  Q/DQ model as it is. ``SPARSE_WEIGHTS`` remains.

Both: optimization profile from trtexec-style min/opt/max shapes, ``set_memory_pool_limit(WORKSPACE)``,
an optional timing cache, ``build_serialized_network``, and an ``ILogger`` subclass that keeps every message
so the ``(Sparsity)`` lines can be reported. The engine file is written atomically.

None of this has run against a real TensorRT: it cannot be installed on the machines this was written on.
The API path is exercised against a mock ``tensorrt`` module in the tests, the log parser against log lines
quoted in TensorRT's issue tracker, and the trtexec commands are checked flag by flag, not run.

The trtexec equivalent lives in ``onnxsparse.trt.trtexec`` and the ``(Sparsity)`` log parser in
``onnxsparse.trt.log``; their names are re-exported here for older imports.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.graph import iter_graphs, iter_nodes
from onnxsparse.ir.model_io import Model
from onnxsparse.trt.log import SparsityReport as SparsityReport
from onnxsparse.trt.log import parse_sparsity_log as parse_sparsity_log
from onnxsparse.trt.trtexec import _dims
from onnxsparse.trt.trtexec import fp16_model_path as fp16_model_path
from onnxsparse.trt.trtexec import render_steps as render_steps
from onnxsparse.trt.trtexec import trtexec_command as trtexec_command
from onnxsparse.trt.trtexec import trtexec_script as trtexec_script
from onnxsparse.trt.trtexec import trtexec_steps as trtexec_steps
from onnxsparse.trt.trtexec import write_script as write_script

log = logging.getLogger("onnxsparse.trt.builder")

PRECISIONS = ("fp16", "int8", "best", "fp32")
#: ``BuildResult.onnx_parsed`` for a model without a file (parsed from a temporary one)
IN_MEMORY = "in-memory model (a temporary file)"
TRT_VERSIONS = (10, 11)
_QDQ = ("QuantizeLinear", "DequantizeLinear")


class TensorRTMissing(OnnxSparseError):
    """TensorRT's Python package cannot be imported here."""


# ---------------------------------------------------------------------------------------------- importing


def import_tensorrt() -> ModuleType:
    """``import tensorrt``, or TensorRTMissing with the reason in one line."""
    try:
        import tensorrt  # type: ignore[import-not-found]
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TensorRTMissing(f"TensorRT's Python package cannot be imported ({reason})") from e
    return tensorrt  # type: ignore[no-any-return]


def trt_major(trt: ModuleType) -> int:
    """Major version of an imported ``tensorrt`` (``__version__`` first, the API's shape as a fallback)."""
    version = str(getattr(trt, "__version__", ""))
    m = re.match(r"(\d+)\.", version)
    if m:
        return int(m.group(1))
    return 10 if hasattr(trt.BuilderFlag, "FP16") else 11


# ---------------------------------------------------------------------------------------------- options


def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``1.5G``, ``65536K``, ``2048`` (MiB, as trtexec reads a bare number) → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise OnnxSparseError(f"bad size '{text}': expected e.g. 4G, 512M or 2048 (MiB)")
    unit = {"": 2**20, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    size = int(float(m.group(1)) * unit)
    if size <= 0:
        raise OnnxSparseError(f"size '{text}' must be positive")
    return size


@dataclass(frozen=True)
class Profile:
    """One input's optimization-profile shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def _model_inputs(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Real graph inputs (not initializers) → dims, None where symbolic or unknown."""
    inits = {t.name for t in proto.graph.initializer}
    out: dict[str, list[int | None]] = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        dims: list[int | None] = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") else None)
        out[vi.name] = dims
    return out


def resolve_profiles(
    proto: onnx.ModelProto,
    min_shapes: dict[str, tuple[int, ...]] | None = None,
    opt_shapes: dict[str, tuple[int, ...]] | None = None,
    max_shapes: dict[str, tuple[int, ...]] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, Profile]:
    """Check trtexec-style shapes against the model; one Profile per input that has dynamic dims.

    ``shapes`` fixes min = opt = max. A missing opt takes max (else min); a missing min or max takes opt.
    Every dynamic input needs shapes; static inputs may be given only with their own shape.
    """
    mins, opts, maxs, fixed = min_shapes or {}, opt_shapes or {}, max_shapes or {}, shapes or {}
    inputs = _model_inputs(proto)
    for kind, given in (("--min-shapes", mins), ("--opt-shapes", opts), ("--max-shapes", maxs), ("--shapes", fixed)):
        for name in given:
            if name not in inputs:
                known = ", ".join(inputs) or "none"
                raise OnnxSparseError(f"{kind} names '{name}', which is not a model input (inputs: {known})")
    both = set(fixed) & (set(mins) | set(opts) | set(maxs))
    if both:
        raise OnnxSparseError(f"input '{sorted(both)[0]}' is given both --shapes and --min/--opt/--max-shapes")
    profiles: dict[str, Profile] = {}
    for name, dims in inputs.items():
        if name in fixed:
            lo = mid = hi = fixed[name]
        else:
            mid_o = opts.get(name) or maxs.get(name) or mins.get(name)
            if mid_o is None:
                if any(d is None for d in dims):
                    shown = "x".join("?" if d is None else str(d) for d in dims)
                    raise OnnxSparseError(
                        f"input '{name}' has dynamic dims ({shown}): give --shapes or --min/--opt/--max-shapes for it"
                    )
                continue
            mid = mid_o
            lo, hi = mins.get(name, mid), maxs.get(name, mid)
        for label, shape in (("min", lo), ("opt", mid), ("max", hi)):
            if len(shape) != len(dims):
                raise OnnxSparseError(
                    f"{label} shape of '{name}' has rank {len(shape)}, the model input has rank {len(dims)}"
                )
            for i, (want, got) in enumerate(zip(dims, shape, strict=True)):
                if want is not None and want != got:
                    raise OnnxSparseError(
                        f"{label} shape of '{name}': dim {i} is fixed to {want} in the model, got {got}"
                    )
        if not all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)):
            raise OnnxSparseError(
                f"shapes of '{name}' must satisfy min <= opt <= max in every dim: "
                f"{_dims(lo)}, {_dims(mid)}, {_dims(hi)}"
            )
        if any(d is None for d in dims):
            profiles[name] = Profile(tuple(lo), tuple(mid), tuple(hi))
    return profiles


@dataclass
class BuildOptions:
    """What to build: precision, profile shapes, workspace limit (bytes), timing cache file."""

    precision: str = "fp16"
    profiles: dict[str, Profile] = field(default_factory=dict)
    workspace: int | None = None
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise OnnxSparseError(f"precision must be one of {', '.join(PRECISIONS)}, not '{self.precision}'")


def has_qdq(proto: onnx.ModelProto) -> bool:
    """Whether any graph holds QuantizeLinear/DequantizeLinear (explicit quantization)."""
    return any(n.op_type in _QDQ for _, n in iter_nodes(proto.graph))


@dataclass
class BuildPlan:
    """How one precision maps onto one TensorRT major version."""

    trt_major: int
    precision: str
    flags: list[str]  # BuilderFlag member names
    strongly_typed: bool
    to_fp16: bool  # parse a float16 copy made by the to-fp16 pass
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trt_major": self.trt_major,
            "precision": self.precision,
            "builder_flags": self.flags,
            "strongly_typed": self.strongly_typed,
            "to_fp16": self.to_fp16,
            "notes": self.notes,
        }


def make_plan(proto: onnx.ModelProto, precision: str, major: int) -> BuildPlan:
    """Builder flags and model preparation for ``precision`` on TensorRT ``major``."""
    if major < 10:
        raise OnnxSparseError(f"TensorRT {major}.x is not supported by build (needs 10 or 11); use trtexec")
    qdq = has_qdq(proto)
    if precision == "int8" and not qdq:
        raise OnnxSparseError(
            "int8 needs a model with Q/DQ nodes (run the qdq pass first); onnxsparse uses no int8 calibrator"
        )
    notes: list[str] = []
    if major == 10:
        flags = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8"], "best": ["FP16", "INT8"]}[precision]
        if precision == "best" and not qdq:
            notes.append("best without Q/DQ nodes: INT8 is on but no layer has int8 scales, so this builds as fp16")
        if precision in ("fp16", "fp32") and qdq:
            notes.append("the model has Q/DQ nodes, which TensorRT 10 runs in int8 only with --precision int8 or best")
        plan = BuildPlan(major, precision, [*flags, "SPARSE_WEIGHTS"], strongly_typed=False, to_fp16=False, notes=notes)
        return plan
    # TensorRT 11: strongly typed; precision lives in the model
    to_fp16 = precision in ("fp16", "best")
    if to_fp16:
        notes.append("TensorRT 11 is strongly typed: the builder parses a float16 copy made by the to-fp16 pass")
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        if qdq and opset < 19:
            notes.append(f"Q/DQ at opset {opset} stays float32 around each quantized layer (float16 scales need 19)")
    elif precision == "int8":
        notes.append("TensorRT 11: the Q/DQ model is parsed as it is; layers without Q/DQ run in float32")
    return BuildPlan(major, precision, ["SPARSE_WEIGHTS"], strongly_typed=True, to_fp16=to_fp16, notes=notes)


# ---------------------------------------------------------------------------------------------- building


@dataclass
class BuildResult:
    """A finished build: where the engine went and what the builder said."""

    engine: Path
    engine_bytes: int
    trt_version: str
    plan: BuildPlan
    options: BuildOptions
    sparsity: SparsityReport
    seconds: float
    onnx_parsed: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": str(self.engine),
            "engine_bytes": self.engine_bytes,
            "tensorrt": self.trt_version,
            **self.plan.to_dict(),
            "profiles": {k: {"min": v.min, "opt": v.opt, "max": v.max} for k, v in self.options.profiles.items()},
            "workspace_bytes": self.options.workspace,
            "timing_cache": str(self.options.timing_cache) if self.options.timing_cache else None,
            "onnx_parsed": self.onnx_parsed,
            "seconds": round(self.seconds, 3),
            "sparsity": self.sparsity.to_dict(),
            "warnings": self.warnings,
        }


def _capture_logger(trt: ModuleType, records: list[tuple[Any, str]]) -> Any:
    """An ``ILogger`` that keeps every message (the sparsity lines come at info level) and forwards it."""
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.ERROR,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.INFO,
        severity.VERBOSE: logging.DEBUG,
    }

    class _Capture(trt.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, sev: Any, msg: str) -> None:
            records.append((sev, msg))
            log.log(levels.get(sev, logging.INFO), "TensorRT: %s", msg)

    return _Capture()


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path`` (permissions as by umask; an
    error names ``path``, not the temporary file)."""
    from onnxsparse.ir.paths import atomic_writer

    with atomic_writer(path, "wb") as f:
        f.write(data)


def _float32_only(proto: onnx.ModelProto) -> bool:
    """Whether the model has float32 weights and nothing float16 (no float16 initializer, Cast to float16 or
    float16 value): a model ``to-fp16`` has not converted."""
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    if not any(t.data_type == fp32 for g in iter_graphs(proto.graph) for t in g.initializer):
        return False
    if any(t.data_type == fp16 for g in iter_graphs(proto.graph) for t in g.initializer):
        return False
    if any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute)
        for _, n in iter_nodes(proto.graph)
    ):
        return False
    values = [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]
    return not any(v.type.tensor_type.elem_type == fp16 for v in values)


@contextlib.contextmanager
def _onnx_for_builder(model: Model, plan: BuildPlan, workdir: Path) -> Iterator[Path]:
    """The ONNX file TensorRT parses: the model's own file, or a temporary one for a model with none.

    The builder converts nothing: TensorRT 11 is strongly typed, so an fp16/best build needs a model that is
    float16 already (the ``build`` command runs ``to-fp16`` on a copy first; the core imports no pass).
    """
    if plan.to_fp16 and _float32_only(model.proto):
        raise OnnxSparseError(
            f"TensorRT 11 is strongly typed: a {plan.precision} build needs a float16 model; run the to-fp16 "
            "pass on it first (onnxsparse build does)"
        )
    if model.source is not None:
        yield model.source
        return
    from onnxsparse.ir.model_io import save_model

    # save_model points the model it saves at the new file (gone after the build): save a copy instead
    copy = Model(proto=_copy_proto(model.proto), base_dir=model.base_dir, store=model.store)
    with tempfile.TemporaryDirectory(prefix="onnxsparse-build-", dir=workdir) as tmp:
        yield save_model(copy, Path(tmp) / "model.onnx")


def _copy_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def build_engine(model: Model, engine_path: Path, options: BuildOptions, trt: ModuleType | None = None) -> BuildResult:
    """Build a serialized engine from ``model`` with sparse weights enabled.

    TensorRT parses ``model.source`` when the model has a file, else a temporary file of the in-memory model
    (so a model edited in memory must not keep its ``source``). The model is built as given: for a TensorRT
    11 fp16/best build it must be float16 already (``to-fp16``; ``onnxsparse build`` converts a copy).

    ``trt`` is the imported ``tensorrt`` module (imported here when None). Raises OnnxSparseError when
    the parser rejects the model or the build fails; nothing is written then.
    """
    trt = trt if trt is not None else import_tensorrt()
    major = trt_major(trt)
    plan = make_plan(model.proto, options.precision, major)
    start = time.perf_counter()
    records: list[tuple[Any, str]] = []
    logger = _capture_logger(trt, records)
    with _onnx_for_builder(model, plan, engine_path.parent) as onnx_path:
        builder = trt.Builder(logger)
        flags = 0  # explicit batch is the only mode since 10; strongly typed is always on in 11
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            first = errors[0].splitlines()[0] if errors else "no error message"
            raise OnnxSparseError(f"TensorRT's ONNX parser rejected the model ({len(errors)} error(s)): {first}")
        config = builder.create_builder_config()
        for name in plan.flags:
            config.set_flag(getattr(trt.BuilderFlag, name))
        if options.workspace:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace)
        _add_profile(trt, builder, network, config, options.profiles)
        cache = None
        if options.timing_cache is not None:
            data = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
            cache = config.create_timing_cache(data)
            config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is refused
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            errors = [m for s, m in records if s in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR)]
            last = errors[-1].splitlines()[0] if errors else "see the log with --verbose"
            raise OnnxSparseError(f"TensorRT did not build an engine: {last}")
        data_out = memoryview(serialized)
        _atomic_write(engine_path, data_out)
        if options.timing_cache is not None:
            _atomic_write(options.timing_cache, memoryview(config.get_timing_cache().serialize()))
        parsed = str(onnx_path) if model.source is not None else IN_MEMORY
    warnings = [m for s, m in records if s == trt.ILogger.Severity.WARNING]
    return BuildResult(
        engine=engine_path,
        engine_bytes=data_out.nbytes,
        trt_version=str(getattr(trt, "__version__", major)),
        plan=plan,
        options=options,
        sparsity=parse_sparsity_log(m for _, m in records),
        seconds=time.perf_counter() - start,
        onnx_parsed=parsed,
        warnings=warnings,
    )


def _add_profile(trt: ModuleType, builder: Any, network: Any, config: Any, profiles: dict[str, Profile]) -> None:
    """One optimization profile covering every network input with dynamic dims."""
    dynamic = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(int(d) < 0 for d in tensor.shape):
            dynamic.append(tensor.name)
    if not dynamic:
        return
    missing = [name for name in dynamic if name not in profiles]
    if missing:
        raise OnnxSparseError(f"input '{missing[0]}' has dynamic dims in TensorRT's network: give its shapes")
    profile = builder.create_optimization_profile()
    for name in dynamic:
        p = profiles[name]
        profile.set_shape(name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)


def two_four_layers(model: Model) -> list[str]:
    """Names of weighted layers whose stored weight is already 2:4 along its reduction axis.

    What TensorRT can at best call eligible; the build report sets its "Found N" against this. The layers come
    from the model's cached index (``onnxsparse.ir.index``), shared with whatever else asked of this model.
    """
    from onnxsparse.ir.index import model_layers
    from onnxsparse.ir.tensors import to_array
    from onnxsparse.sparsity import is_nm

    names = []
    for layer in model_layers(model):
        if layer.reason or layer.source is None or layer.source_reduction_axis is None:
            continue
        if layer.check_pattern(4) is not None:
            continue
        if is_nm(to_array(layer.source.tensor, model), layer.source_reduction_axis, 2, 4):
            names.append(layer.name)
    return names
