"""Timing one GEMM shape with its epilogue: dense cuBLASLt and 2:4 cuSPARSELt both fusing bias + activation.

Why: an inference engine runs y = act(x·Wᵀ + b) as one kernel. Dense, torch reaches cuBLASLt's fused
epilogues through ``torch.addmm`` (bias) and ``torch._addmm_activation`` (bias + Relu / Gelu); sparse, the
cuSPARSELt plan gets ``BIAS_POINTER`` and ``ACTIVATION_RELU`` / ``ACTIVATION_GELU`` (``cusparselt.SparsePlan``).
Also timed: the *unfused* sparse path (plain sparse GEMM, then a bias-add kernel and an activation
kernel), which is what a runtime without sparse epilogue fusion costs; measured on the H200 end to end, that
path loses the whole 2:4 gain on BERT-base (0.89× at 32×128 against 1.05× fused).

Dense runs at the layer's real M (cuBLAS takes any M); sparse at the plan's M (M rounded up to the
cuSPARSELt multiple, or to a dynamic-shape server's M bucket), so padding costs show up as they would.

Every result is checked against the fp32 product with the epilogue (the pruned weight for the sparse paths),
with the output poisoned first. cuBLASLt's and cuSPARSELt's Gelu epilogues use the tanh approximation; the
reference is the graph's own form (erf or tanh), and the difference (≲1e-3) is inside the fp16 tolerance.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from onnxsparse.bench import cusparselt, gpu, timing
from onnxsparse.errors import OnnxSparseError

log = logging.getLogger("onnxsparse.bench.fused")

#: the epilogue kinds timed (``Epilogue.kind``); an activation without a bias is timed with a zero bias
KINDS = ("", "bias", "bias+relu", "bias+gelu", "relu", "gelu")


@dataclass
class EpilogueTiming:
    """Per-launch ms of one (M, N, K, epilogue): dense fused, sparse fused, sparse unfused (medians)."""

    m: int  # the sparse plan's M
    n: int
    k: int
    dtype: str
    epilogue: str
    m_dense: int
    dense_ms: float
    sparse_ms: float
    sparse_unfused_ms: float
    dense_runs: list[float] = field(default_factory=list)
    sparse_runs: list[float] = field(default_factory=list)
    unfused_runs: list[float] = field(default_factory=list)
    #: relative Frobenius errors against the fp32 reference (dense, sparse fused, sparse unfused)
    dense_error: float = 0.0
    error: float = 0.0
    unfused_error: float = 0.0
    ok: bool = True
    alg_id: int | None = None
    search: list[dict[str, Any]] = field(default_factory=list)
    #: False where cuSPARSELt rejected the fused activation and the sparse figure includes it as its own kernel
    activation_fused: bool = True
    mode: str = "graph"
    iters: int = 0
    warmup_s: float = 0.0
    settled: bool = False
    gpu_state: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else float("nan")

    @property
    def unfused_speedup(self) -> float:
        return self.dense_ms / self.sparse_unfused_ms if self.sparse_unfused_ms > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        flops = 2 * self.m_dense * self.n * self.k
        d.update(
            speedup=self.speedup,
            unfused_speedup=self.unfused_speedup,
            launch_bound=False,
            dense_tflops=flops / (self.dense_ms * 1e9) if self.dense_ms > 0 else None,
            sparse_tflops=flops / (self.sparse_ms * 1e9) if self.sparse_ms > 0 else None,
        )
        return d


def _split(kind: str) -> tuple[bool, str | None]:
    if kind not in KINDS:
        raise OnnxSparseError(f"unknown epilogue '{kind}' (one of {', '.join(k or 'none' for k in KINDS)})")
    act = kind.replace("bias", "").strip("+") or None
    return bool(kind), act  # any epilogue gets a bias vector (zeros when the graph has none)


def reference(x: Any, w: Any, bias: Any, act: str | None, gelu_form: str = "gelu") -> Any:
    """fp32 act(x·Wᵀ + b), with the graph's Gelu form ("gelu" = erf, "gelu_tanh")."""
    import torch.nn.functional as F

    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    if act == "relu":
        y = y.relu()
    elif act == "gelu":
        y = F.gelu(y, approximate="tanh" if gelu_form == "gelu_tanh" else "none")
    return y


def rel_error(y: Any, ref: Any) -> float:
    import torch

    if not bool(torch.isfinite(y).all()):
        return float("inf")
    return float(torch.linalg.norm(y.float() - ref) / max(float(torch.linalg.norm(ref)), 1e-30))


def dense_epilogue_fn(x: Any, w: Any, bias: Any, act: str | None, y: Any) -> Callable[[], None]:
    """The dense launch with its cuBLASLt epilogue, writing into ``y`` (``torch.mm`` when there is none)."""
    import torch

    wt = w.t()
    if bias is None:
        return lambda: torch.mm(x, wt, out=y)
    if act is None:
        return lambda: torch.addmm(bias, x, wt, out=y)
    gelu = act == "gelu"
    return lambda: torch._addmm_activation(bias, x, wt, use_gelu=gelu, out=y)


def unfused_fn(launch: Callable[[], None], bias: Any, act: str | None, y: Any) -> Callable[[], None]:
    """Sparse GEMM, then the epilogue as separate kernels (bias add, activation), in place on ``y``."""
    activation = activation_fn(act, y)

    def run() -> None:
        launch()
        if bias is not None:
            y.add_(bias)
        activation()

    return run


def epilogue_plan(
    lt: cusparselt.SparseLt, wp: Any, x: Any, y: Any, dtype: str, rounds: int, bias: Any, act: str | None
) -> tuple[cusparselt.SparsePlan, list[dict[str, Any]], str | None]:
    """A tuned plan with the bias and activation fused; where cuSPARSELt rejects the activation (seen on the
    H200 with cuSPARSELt 0.8.0: ``ACTIVATION_GELU`` with fp16 in/out, status 3, in both layouts), the plan
    fuses the bias only. Returns (plan, search rounds, the activation left to a separate kernel or None)."""
    try:
        plan, tried = cusparselt.tuned_plan(lt, wp, x, y, dtype, rounds, bias=bias, activation=act)
        return plan, tried, None
    except OnnxSparseError as e:
        if act is None:
            raise
        log.warning(
            "cuSPARSELt rejected the fused %s epilogue for %dx%dx%d (%s): bias fused, %s as a separate kernel",
            act,
            x.shape[0],
            wp.shape[0],
            wp.shape[1],
            e,
            act,
        )
    plan, tried = cusparselt.tuned_plan(lt, wp, x, y, dtype, rounds, bias=bias)
    return plan, tried, act


def activation_fn(act: str | None, y: Any) -> Callable[[], None]:
    """The activation as its own in-place kernel on ``y`` (a no-op for None)."""
    import torch

    def relu() -> None:
        y.relu_()

    def gelu() -> None:
        torch._C._nn.gelu_(y, approximate="tanh")

    def none() -> None:
        pass

    return {"relu": relu, "gelu": gelu}.get(act or "", none)


def time_gemm_epilogue(
    lt: cusparselt.SparseLt,
    m: int,
    n: int,
    k: int,
    epilogue: str = "bias",
    m_dense: int | None = None,
    dtype: str = "fp16",
    gelu_form: str = "gelu",
    repeats: int = 7,
    iters: int = 50,
    warmup: int = 3,
    mode: str = "graph",
    seed: int = 0,
    search_rounds: int = 2,
    warmup_s: float = 0.3,
) -> EpilogueTiming:
    """Time act(x·Wᵀ + b) dense (cuBLASLt epilogue) vs 2:4 sparse with the epilogue fused and unfused."""
    import torch

    if dtype != "fp16":
        raise OnnxSparseError("epilogue timing is fp16 only (int8 epilogues need a float bias and scales)")
    has_bias, act = _split(epilogue)
    m_dense = m if m_dense is None else m_dense
    if m_dense > m:
        raise OnnxSparseError(f"dense M {m_dense} exceeds the plan's M {m}")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x, w = gpu._inputs(m, n, k, dtype, gen)
    bias = (torch.randn(n, device="cuda", generator=gen) * 0.5).half() if has_bias else None
    wp = gpu.prune_2to4_rows(w)
    xd = x[:m_dense]  # a prefix of rows: contiguous
    y_dense = torch.empty(m_dense, n, device="cuda", dtype=torch.float16)
    y_sparse = torch.empty(m, n, device="cuda", dtype=torch.float16)
    y_unfused = torch.empty(m, n, device="cuda", dtype=torch.float16)
    rounds = cusparselt.rounds_for(m, n, k, search_rounds)
    plan, tried, separate = epilogue_plan(lt, wp, x, y_sparse, dtype, rounds, bias, act)
    plain, _ = cusparselt.tuned_plan(lt, wp, x, y_unfused, dtype, rounds)
    try:
        dense = dense_epilogue_fn(xd, w, bias, act, y_dense)
        sparse_launch = plan.launcher(x, y_sparse)
        plain_launch = plain.launcher(x, y_unfused)

        after = activation_fn(separate, y_sparse)

        def sparse() -> None:
            plan.set_stream(torch.cuda.current_stream().cuda_stream)
            sparse_launch()
            after()

        def plain_on_stream() -> None:
            plain.set_stream(torch.cuda.current_stream().cuda_stream)
            plain_launch()

        unfused = unfused_fn(plain_on_stream, bias, act, y_unfused)
        errors = _check(dense, sparse, unfused, (xd, w, x, wp, bias, act, gelu_form), (y_dense, y_sparse, y_unfused))
        ok = all(e <= gpu.FP16_TOLERANCE for e in errors)
        runs, _, settled = timing.time_loops(
            {"dense": dense, "sparse": sparse, "unfused": unfused}, iters, repeats, warmup, mode, warmup_s=warmup_s
        )
        state = timing.gpu_state()
        return EpilogueTiming(
            m=m,
            n=n,
            k=k,
            dtype=dtype,
            epilogue=epilogue,
            m_dense=m_dense,
            dense_ms=statistics.median(runs["dense"]),
            sparse_ms=statistics.median(runs["sparse"]),
            sparse_unfused_ms=statistics.median(runs["unfused"]),
            dense_runs=runs["dense"],
            sparse_runs=runs["sparse"],
            unfused_runs=runs["unfused"],
            dense_error=errors[0],
            error=errors[1],
            unfused_error=errors[2],
            ok=ok,
            alg_id=plan.alg_id,
            search=tried,
            activation_fused=separate is None,
            mode=mode,
            iters=iters,
            warmup_s=settled.seconds,
            settled=settled.settled,
            gpu_state=state,
        )
    finally:
        plan.close()
        plain.close()


def _check(
    dense: Callable[[], None],
    sparse: Callable[[], None],
    unfused: Callable[[], None],
    data: tuple[Any, ...],
    outs: tuple[Any, Any, Any],
) -> list[float]:
    """Run each path once into a NaN-poisoned output; relative errors against the fp32 references."""
    import torch

    xd, w, x, wp, bias, act, gelu_form = data
    for y in outs:
        y.fill_(math.nan)
    dense()
    sparse()
    unfused()
    torch.cuda.synchronize()
    ref_dense = reference(xd, w, bias, act, gelu_form)
    ref_sparse = reference(x, wp, bias, act, gelu_form)
    return [rel_error(outs[0], ref_dense), rel_error(outs[1], ref_sparse), rel_error(outs[2], ref_sparse)]
