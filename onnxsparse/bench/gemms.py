"""The GEMMs a model's weighted layers compute, for timing on the GPU (CPU only, no CUDA needed).

Every eligible layer is one product y[M, N] = x[M, K] · W[N, K]ᵀ with the weight W as the 2:4-structured
operand, grouped along K: M = batch × positions (a Conv is an implicit GEMM with M = N·H_out·W_out,
K = C_in·kh·kw), N = output channels. Shapes come from the layer index (``ir.index``) + ``Layer.gemm_shape`` over
``shapes.infer_shapes`` (with ``--shapes`` overrides), so the bench times exactly what the prune pass
would sparsify. Identical shapes are timed once and counted (a BERT encoder has 72 layers but 3 shapes).

cuSPARSELt wants the structured operand's rows and columns (N and K) to be multiples of 16 for fp16 and 32
for int8; a layer that misses that cannot use sparse kernels and is reported as such. M only needs padding
(the seed's plug-in pre-builds one plan per bucket of 16 rows), so M is rounded up and the padded value timed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import onnx

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.index import model_layers
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.shapes import Shape, infer_shapes

#: dtype → required multiple of N and K (structured operand) and of the padded M, per cuSPARSELt's rules.
ALIGNMENT = {"fp16": 16, "int8": 32}


#: what one timing covers: (plan M, N, K, epilogue kind, real M)
GemmKey = tuple[int, int, int, str, int]


@dataclass(frozen=True)
class LayerGemm:
    """One weighted layer as a GEMM, or why it is not benchmarked (``reason``)."""

    name: str
    op_type: str
    m: int | None = None
    n: int | None = None
    k: int | None = None
    groups: int = 1
    #: M rounded up to the dtype's multiple: the M that is timed
    m_padded: int | None = None
    #: why this layer is not timed (None: it is)
    reason: str | None = None
    #: the ``Reason`` code behind ``reason`` when the layer index gave it (None for bench's own reasons)
    code: str | None = None
    #: the epilogue fused after the GEMM (``Epilogue.kind``: "", "bias", "bias+relu", "bias+gelu", ...), the
    #: graph's activation spelling ("gelu" = erf form, "gelu_tanh") and the ONNX nodes the epilogue covers
    epilogue: str = ""
    activation: str | None = None
    epilogue_nodes: tuple[str, ...] = ()

    @property
    def flops(self) -> int:
        """2·M·N·K of the real (unpadded) product; 0 where the shape is unknown."""
        if self.m is None or self.n is None or self.k is None:
            return 0
        return 2 * self.m * self.n * self.k

    @property
    def key(self) -> GemmKey | None:
        """What is timed for this layer: (plan M, N, K, epilogue, real M); None when it is not timed."""
        if self.reason is not None or self.m_padded is None or self.n is None or self.k is None or self.m is None:
            return None
        return (self.m_padded, self.n, self.k, self.epilogue, self.m)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops"] = self.flops
        return d


@dataclass
class UniqueGemm:
    """A distinct (plan M, N, K, epilogue, real M) and the layers that compute it."""

    m: int
    n: int
    k: int
    epilogue: str = ""
    m_real: int = 0
    layers: list[str] = field(default_factory=list)
    #: the graph's Gelu spelling of the first layer (the reference a Gelu epilogue is checked against)
    activation: str | None = None

    @property
    def count(self) -> int:
        return len(self.layers)

    @property
    def key(self) -> GemmKey:
        return (self.m, self.n, self.k, self.epilogue, self.m_real)

    def to_dict(self) -> dict[str, Any]:
        return {
            "m": self.m,
            "n": self.n,
            "k": self.k,
            "epilogue": self.epilogue,
            "m_real": self.m_real,
            "count": self.count,
            "layers": list(self.layers),
        }


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_m(m: int, dtype: str, bucket: int | None = None) -> int:
    """The M a sparse plan is built for: M rounded up to ``bucket`` rows (a dynamic-shape server's plan per
    bucket), then to the dtype's cuSPARSELt multiple."""
    if bucket is not None and bucket < 1:
        raise OnnxSparseError(f"--m-buckets must be a positive number of rows (got {bucket})")
    return round_up(round_up(m, bucket or 1), ALIGNMENT[dtype])


def with_m_bucket(layers: Iterable[LayerGemm], bucket: int, dtype: str) -> list[LayerGemm]:
    """The same layers with plans built for M rounded up to ``bucket`` (untimed layers unchanged)."""
    return [
        replace(lg, m_padded=plan_m(lg.m, dtype, bucket)) if lg.key is not None and lg.m is not None else lg
        for lg in layers
    ]


def extract_gemms(
    model: Model | onnx.ModelProto,
    overrides: dict[str, tuple[int, ...]] | None = None,
    dtype: str = "fp16",
    shapes: dict[str, Shape] | None = None,
    epilogues: bool = False,
    exclude: str | None = None,
) -> list[LayerGemm]:
    """Every weighted layer of ``model`` (graph order) as a ``LayerGemm`` for ``dtype`` (fp16 | int8).

    The layers come from the model's cached index (``ir.index.model_layers``), so a ``Model`` that other code
    asked about already is not walked again; a bare proto gets an index of its own.

    ``epilogues``: record the bias/activation the graph applies after each GEMM (``epilogue.find_epilogues``).
    ``exclude``: a regex of layer or weight names that stay dense (not timed; their time counts as
    non-GEMM time in the end-to-end estimate)."""
    from onnxsparse.bench.epilogue import find_epilogues
    from onnxsparse.ir.layers import check_regex, select_reason

    if dtype not in ALIGNMENT:
        raise OnnxSparseError(f"unknown dtype '{dtype}': expected one of {', '.join(ALIGNMENT)}")
    check_regex("bench", "exclude", exclude)
    align = ALIGNMENT[dtype]
    held = model if isinstance(model, Model) else Model(model)
    if shapes is None:
        shapes = infer_shapes(held.proto, overrides)
    found = model_layers(held, shapes)
    eps = find_epilogues(held.proto, found) if epilogues else {}
    out: list[LayerGemm] = []
    for layer in found:
        ep = eps.get(layer.name)
        base = LayerGemm(
            name=layer.name,
            op_type=layer.op_type,
            epilogue=ep.kind if ep else "",
            activation=ep.activation if ep else None,
            epilogue_nodes=ep.nodes if ep else (),
        )
        skip = select_reason(layer, None, exclude)
        if skip is not None:
            out.append(replace(base, reason=f"{skip}: stays dense", code=skip.code.name))
            continue
        why = layer.check_pattern(4)
        if why is not None:
            out.append(replace(base, reason=str(why), code=why.code.name))
            continue
        if layer.op_type == "MatMul" and layer.weight_shape is not None and len(layer.weight_shape) > 2:
            out.append(replace(base, reason=f"batched weight {list(layer.weight_shape)}: one GEMM per batch"))
            continue
        gemm = layer.gemm_shape(shapes)
        if gemm is None:
            out.append(replace(base, reason=f"shape of '{layer.node.input[0]}' unknown: give it with --shapes"))
            continue
        dims = replace(base, m=gemm.m, n=gemm.n, k=gemm.k, groups=gemm.groups)
        if gemm.groups > 1:
            out.append(replace(dims, reason=f"grouped conv (group={gemm.groups}): no single GEMM"))
            continue
        if gemm.m <= 0:
            out.append(replace(dims, reason="empty input (M=0)"))
            continue
        off = [f"{name}={v}" for name, v in (("N", gemm.n), ("K", gemm.k)) if v % align]
        if off:
            out.append(replace(dims, reason=f"{' and '.join(off)} not a multiple of {align} ({dtype} cuSPARSELt)"))
            continue
        out.append(replace(dims, m_padded=plan_m(gemm.m, dtype)))
    return out


def unique_gemms(layers: Iterable[LayerGemm]) -> list[UniqueGemm]:
    """Distinct timed shapes in first-seen order, each with the layers that share it."""
    seen: dict[GemmKey, UniqueGemm] = {}
    for layer in layers:
        key = layer.key
        if key is None:
            continue
        if key not in seen:
            seen[key] = UniqueGemm(*key, activation=layer.activation)
        seen[key].layers.append(layer.name)
    return list(seen.values())
