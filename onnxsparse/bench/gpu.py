"""Steady-state timing of one GEMM shape: cuSPARSELt 2:4 (nvmath-python bindings) against dense cuBLAS (torch).

The product is y[M, N] = x[M, K] · W[N, K]ᵀ, the weight W being the structured operand (2:4 along K), as an
inference engine runs a pruned Linear/Conv. Dense is ``torch.mm(x, W.t())`` (cuBLAS, the "TN" product); the
sparse side is a tuned plan of ``onnxsparse.bench.cusparselt`` (whose docstring gives the cuSPARSELt layout),
and ``onnxsparse.bench.timing`` says how the launches are timed.

Every measurement is checked: the sparse result against the dense product of the same pruned weight
(fp16: relative Frobenius error, ~2e-4 expected; int8 → int32: bit-exact), with the output poisoned first.

This module is the bench's one import for callers: it re-exports the plan and timing names they use.

torch and nvmath are imported inside functions: the CLI and CPU tests never need them.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from onnxsparse.bench.cusparselt import TINY_PRODUCT_US, SparseLt, SparsePlan, rounds_for, tuned_plan
from onnxsparse.bench.timing import gpu_state, time_loops, warm_up_gpu
from onnxsparse.errors import OnnxSparseError

log = logging.getLogger("onnxsparse.bench.gpu")

__all__ = [
    "FP16_TOLERANCE",
    "TINY_PRODUCT_US",
    "GemmTiming",
    "SparseLt",
    "SparsePlan",
    "device_info",
    "gpu_available",
    "gpu_state",
    "prune_2to4_rows",
    "rounds_for",
    "time_gemm",
    "time_loops",
    "tuned_plan",
    "warm_up_gpu",
]


#: fp16 relative error above this marks a result wrong (fp16 output rounding alone gives ~2e-4)
FP16_TOLERANCE = 1e-2


@dataclass
class GemmTiming:
    """Timing of one (M, N, K): per-launch milliseconds, median over repetitions, plus the raw repetitions."""

    m: int
    n: int
    k: int
    dtype: str
    dense_ms: float
    sparse_ms: float
    dense_runs: list[float] = field(default_factory=list)
    sparse_runs: list[float] = field(default_factory=list)
    #: host (CPU) ms per launch to enqueue the loop: close to the GPU time means the loop was launch-bound
    dense_host_ms: float = 0.0
    sparse_host_ms: float = 0.0
    #: fp16: ‖y_sparse − y_ref‖/‖y_ref‖ (y_ref in fp32 from the pruned weight); int8: mismatching elements
    error: float = 0.0
    ok: bool = True
    alg_id: int | None = None
    search_iterations: int = 0
    #: each matmul_search round's pick (config id, split-K) and its quick graph time; the fastest plan is kept
    search: list[dict[str, Any]] = field(default_factory=list)
    layout: str = ""
    out_dtype: str = ""
    mode: str = "loop"
    iters: int = 0
    #: seconds of warm-up before the timed repetitions, and whether its last two blocks agreed within 1%
    warmup_s: float = 0.0
    settled: bool = False
    #: NVML's SM clock, temperature, power and clock-limiting reasons right after the timed repetitions
    gpu_state: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else float("nan")

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["speedup"] = self.speedup
        # in a loop, a launch that takes the host about as long as the GPU means the GPU waited for Python
        d["launch_bound"] = self.mode == "loop" and (
            self.dense_host_ms >= 0.9 * self.dense_ms or self.sparse_host_ms >= 0.9 * self.sparse_ms
        )
        d["dense_tflops"] = self.flops / (self.dense_ms * 1e9) if self.dense_ms > 0 else None
        d["sparse_tflops"] = self.flops / (self.sparse_ms * 1e9) if self.sparse_ms > 0 else None
        return d


def gpu_available() -> str | None:
    """Why the GPU bench cannot run here (None if it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install 'onnxsparse[gpu]')"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import nvmath.bindings.cusparseLt  # noqa: F401
    except ImportError as e:
        return f"nvmath-python's cuSPARSELt bindings cannot be imported ({e}); pip install 'onnxsparse[gpu]'"
    return None


def prune_2to4_rows(w: Any) -> Any:
    """Keep the 2 largest-magnitude values in each group of 4 consecutive entries of every row (along K)."""
    import torch

    n, k = w.shape
    groups = w.reshape(n, k // 4, 4)
    idx = groups.abs().float().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return (groups * mask).reshape(n, k)


def _inputs(m: int, n: int, k: int, dtype: str, gen: Any) -> tuple[Any, Any]:
    import torch

    dev = "cuda"
    if dtype == "fp16":
        x = torch.randn(m, k, device=dev, generator=gen, dtype=torch.float32).half()
        w = (torch.randn(n, k, device=dev, generator=gen, dtype=torch.float32) / (k**0.5)).half()
    else:
        x = torch.randint(-127, 128, (m, k), device=dev, generator=gen, dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), device=dev, generator=gen, dtype=torch.int8)
    return x, w


def _dense_fn(x: Any, w: Any, dtype: str) -> tuple[Any, Any]:
    """(launch function, output) for the dense cuBLAS product through torch."""
    import torch

    wt = w.t()  # a view: cuBLAS runs the transposed ("TN") product without a copy
    if dtype == "fp16":
        y = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=torch.float16)
        return (lambda: torch.mm(x, wt, out=y)), y
    y = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=torch.int32)
    return (lambda: torch._int_mm(x, wt, out=y)), y


def _check(plan: SparsePlan, x: Any, wp: Any, y: Any) -> tuple[float, bool]:
    """Run the sparse plan once into a poisoned output and compare with the dense product of ``wp``."""
    import torch

    if plan.out_dtype == "fp16":
        y.fill_(float("nan"))
    else:
        y.fill_(-77)
    plan.run(x, y)
    torch.cuda.synchronize()
    if plan.dtype == "fp16":
        ref = x.float() @ wp.float().t()
        if not bool(torch.isfinite(y).all()):
            return float("inf"), False
        err = float(torch.linalg.norm(y.float() - ref) / torch.linalg.norm(ref))
        return err, err <= FP16_TOLERANCE
    ref = torch._int_mm(x, wp.t())
    if plan.out_dtype == "int8":
        ref = ref.clamp(-128, 127).to(torch.int8)
    bad = int((y != ref).sum())
    return float(bad), bad == 0


def time_gemm(
    lt: SparseLt,
    m: int,
    n: int,
    k: int,
    dtype: str = "fp16",
    repeats: int = 7,
    iters: int = 50,
    warmup: int = 3,
    mode: str = "graph",
    seed: int = 0,
    search_rounds: int = 2,
    warmup_s: float = 0.3,
) -> GemmTiming:
    """Time y[M,N] = x[M,K]·W[N,K]ᵀ dense (cuBLAS) and 2:4-sparse (cuSPARSELt, tuned plan) in steady state.

    Before the timed repetitions both products run alternately for at least ``warmup_s`` seconds and until
    two consecutive 50 ms blocks agree within 1% (at most 2 s)."""
    import torch

    if mode not in ("loop", "graph"):
        raise OnnxSparseError(f"unknown timing mode '{mode}' (loop | graph)")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x, w = _inputs(m, n, k, dtype, gen)
    wp = prune_2to4_rows(w)
    out_dtype = torch.float16 if dtype == "fp16" else torch.int32
    y_sparse = torch.empty(m, n, device="cuda", dtype=out_dtype)
    plan, tried = tuned_plan(lt, wp, x, y_sparse, dtype, rounds_for(m, n, k, search_rounds))
    try:
        if plan.torch_out != out_dtype:  # int8 fell back to an int8 output
            y_sparse = torch.empty(m, n, device="cuda", dtype=plan.torch_out)
        alg_id = plan.alg_id
        plan.set_stream(torch.cuda.current_stream().cuda_stream)
        error, ok = _check(plan, x, wp, y_sparse)
        if not ok:
            log.warning("sparse result wrong for %dx%dx%d %s (error %.3g)", m, n, k, dtype, error)
        dense_fn, _ = _dense_fn(x, w, dtype)

        sparse_fn = plan.launcher(x, y_sparse)
        if mode == "graph":
            launch = sparse_fn

            def sparse_fn() -> None:
                # a capture runs on torch's graph stream: point the plan at the stream current at capture
                plan.set_stream(torch.cuda.current_stream().cuda_stream)
                launch()

        runs, host, settled = time_loops(
            {"dense": dense_fn, "sparse": sparse_fn}, iters, repeats, warmup, mode, warmup_s=warmup_s
        )
        state = gpu_state()
        torch.cuda.synchronize()
        return GemmTiming(
            m=m,
            n=n,
            k=k,
            dtype=dtype,
            dense_ms=statistics.median(runs["dense"]),
            sparse_ms=statistics.median(runs["sparse"]),
            dense_runs=runs["dense"],
            sparse_runs=runs["sparse"],
            dense_host_ms=host["dense"],
            sparse_host_ms=host["sparse"],
            error=error,
            ok=ok,
            alg_id=alg_id,
            search_iterations=plan.search_iterations,
            layout=plan.layout,
            out_dtype=plan.out_dtype,
            mode=mode,
            iters=iters,
            search=tried,
            warmup_s=settled.seconds,
            settled=settled.settled,
            gpu_state=state,
        )
    finally:
        plan.close()


def device_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "gpu": props.name,
        "sm": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import nvmath

        info["nvmath"] = nvmath.__version__
        with SparseLt() as lt:
            info["cusparselt"] = lt.version
    except Exception as e:  # informational only
        info["nvmath_error"] = str(e)
    return info
