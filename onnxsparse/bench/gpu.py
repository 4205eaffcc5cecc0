"""Steady-state timing of one GEMM shape: cuSPARSELt 2:4 (nvmath-python bindings) against dense cuBLAS (torch).

The product is y[M, N] = x[M, K] · W[N, K]ᵀ, the weight W being the structured operand (2:4 along K), as an
inference engine runs a pruned Linear/Conv. In cuSPARSELt terms (the layout torch's ``_cslt_sparse_mm`` uses):
A = W, structured, row-major [N, K], not transposed; B = x, row-major [M, K], transposed; D = yᵀ as a
column-major [N, M] matrix with ld = N, which is y[M, N] row-major in memory. Dense is ``torch.mm(x, W.t())``
(cuBLAS, the same "TN" product).

Why the timing looks like this: a single launch between two events measures launch latency and clock ramp
as much as the kernel and inflates sparse gains (REFERENCE.md: BERT-base ffn2 1.71× single-shot vs 1.21×
steady). So each measurement is ``iters`` back-to-back launches between two events, after warm-up; dense
and sparse alternate, and the median over ``repeats`` is reported. By default the launches are captured in
a CUDA graph and replayed: measured on the H100 VM, ``torch.mm`` costs 13-30 µs of host time a call, so a
Python loop leaves the GPU idle between dense products under ~30 µs and shows sparse gains of 2-3x that
are host overhead (a 4096x768x768 product: 1.4-2.0x in a loop, 1.01x from a graph). ``mode="loop"`` is kept
to compare with REFERENCE.md, and flags such shapes (``launch_bound``).

A plan is built, compressed and tuned (``matmul_search``) once per shape and then only launched: creating
a plan per call costs ~0.6–0.9 ms, far more than the product itself.

Every measurement is checked: the sparse result against the dense product of the same pruned weight
(fp16: relative Frobenius error, ~2e-4 expected; int8 → int32: bit-exact), with the output poisoned first.

torch and nvmath are imported inside functions: the CLI and CPU tests never need them.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from onnxsparse.bench.stability import Settled, settle
from onnxsparse.errors import OnnxSparseError

log = logging.getLogger("onnxsparse.bench.gpu")

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


def _lt():  # type: ignore[no-untyped-def]
    from nvmath.bindings import cusparseLt

    return cusparseLt


class SparseLt:
    """A cuSPARSELt handle for the current device; plans borrow it. Use as a context manager."""

    def __init__(self) -> None:
        lt = _lt()
        self.handle: int = lt.init()
        self.version: int = lt.get_version(self.handle)

    def close(self) -> None:
        if self.handle:
            _lt().destroy(self.handle)
            self.handle = 0

    def __enter__(self) -> SparseLt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# (name, A order, op A, A rows/cols/ld, B order, op B, B rows/cols/ld, D order, D rows/cols/ld) as functions
# of (m, n, k). Both describe the same memory: W[N, K], x[M, K], y[M, N] all row-major; the second is the
# all-column-major spelling, tried if a library build rejects the first.
_LAYOUTS = (
    (
        "A=row,B=row^T,D=col",
        "ROW",
        "NON_TRANSPOSE",
        lambda m, n, k: (n, k, k),
        "ROW",
        "TRANSPOSE",
        lambda m, n, k: (m, k, k),
        "COL",
        lambda m, n, k: (n, m, n),
    ),
    (
        "A=col^T,B=col,D=col",
        "COL",
        "TRANSPOSE",
        lambda m, n, k: (k, n, k),
        "COL",
        "NON_TRANSPOSE",
        lambda m, n, k: (k, m, k),
        "COL",
        lambda m, n, k: (n, m, n),
    ),
)


class SparsePlan:
    """One cuSPARSELt plan for y = x·Wᵀ at a fixed (M, N, K, dtype): descriptors, plan, compressed W, workspace.

    Built once; ``run`` only launches. ``weight`` must already be 2:4 along K (checked with
    ``sp_mma_prune_check``: a weight pruned along the wrong axis fails here, not silently).

    ``bias`` (a CUDA tensor of N values, the output dtype; kept referenced by the plan) and ``activation``
    ("relu" | "gelu") are fused into the GEMM's epilogue (``BIAS_POINTER``, ``ACTIVATION_RELU`` /
    ``ACTIVATION_GELU``): y = act(x·Wᵀ + b) in one kernel, as dense cuBLASLt does it.
    """

    def __init__(
        self, lt: SparseLt, weight: Any, m: int, dtype: str, bias: Any = None, activation: str | None = None
    ) -> None:
        import numpy as np
        import torch
        from nvmath import CudaDataType
        from nvmath.bindings import cusparse

        cl = _lt()
        self.lt, self.m = lt, m
        self.n, self.k = (int(d) for d in weight.shape)
        if dtype == "fp16":
            in_type, outs, compute = (
                CudaDataType.CUDA_R_16F,
                [("fp16", CudaDataType.CUDA_R_16F)],
                cl.ComputeType.COMPUTE_32F,
            )
        elif dtype == "int8":
            in_type, compute = CudaDataType.CUDA_R_8I, cl.ComputeType.COMPUTE_32I
            outs = [("int32", CudaDataType.CUDA_R_32I), ("int8", CudaDataType.CUDA_R_8I)]
        else:
            raise OnnxSparseError(f"unknown dtype '{dtype}'")
        self.dtype = dtype
        if activation not in (None, "relu", "gelu"):
            raise OnnxSparseError(f"unknown epilogue activation '{activation}' (relu | gelu)")
        self.bias, self.activation = bias, activation
        # launches timed per candidate by matmul_search. The library's default is a handful: with products
        # of 3-30 µs that picked a config 20-60% slower than the best in 1 of 3 runs on the H100 (BERT-base
        # ffn1: config 6 at 31.6 µs instead of 42 at 26 µs). Aim at ~2 ms of work per candidate, 5 to 50.
        est_s = 2 * m * self.n * self.k / 400e12  # ~400 TFLOP/s: a rough rate, only to size the search
        self.search_iterations = int(min(50, max(5, 2e-3 / max(est_s, 1e-9))))
        self._descs: list[int] = []
        self._mm = self._alg = self._plan = 0
        errors: list[str] = []
        for out_name, out_type in outs:
            for layout in _LAYOUTS:
                try:
                    self._build(layout, int(in_type), int(out_type), int(compute), cusparse)
                except cl.cuSPARSELtError as e:
                    errors.append(f"{layout[0]} out={out_name}: {e}")
                    self._destroy()
                    continue
                self.layout, self.out_dtype = layout[0], out_name
                break
            if self._plan:
                break
        if not self._plan:
            raise OnnxSparseError(f"cuSPARSELt rejected {m}x{self.n}x{self.k} {dtype}: " + "; ".join(errors))
        self.torch_out = {"fp16": torch.float16, "int32": torch.int32, "int8": torch.int8}[self.out_dtype]
        self.alpha = np.ones(1, dtype=np.float32)
        self.beta = np.zeros(1, dtype=np.float32)
        self.streams = np.zeros(1, dtype=np.int64)
        self.set_stream(torch.cuda.current_stream().cuda_stream)
        stream = int(self.streams[0])
        weight = weight.contiguous()
        # prune_check writes 1 when the pattern is wrong and leaves the flag alone when it is right (seen on
        # cuSPARSELt 0.8.0): start from 0
        valid = torch.zeros(1, dtype=torch.int32, device=weight.device)
        cl.sp_mma_prune_check(lt.handle, self._mm, weight.data_ptr(), valid.data_ptr(), stream)
        torch.cuda.synchronize()
        if int(valid.item()) != 0:
            self._destroy()
            raise OnnxSparseError("weight is not 2:4 along K as cuSPARSELt sees it (sp_mma_prune_check failed)")
        size, buffer_size = cl.sp_mma_compressed_size(lt.handle, self._plan)
        self.compressed = torch.empty(int(size), dtype=torch.uint8, device=weight.device)
        buffer = torch.empty(max(int(buffer_size), 1), dtype=torch.uint8, device=weight.device)
        cl.sp_mma_compress(
            lt.handle, self._plan, weight.data_ptr(), self.compressed.data_ptr(), buffer.data_ptr(), stream
        )
        self.workspace = torch.empty(
            max(int(cl.matmul_get_workspace(lt.handle, self._plan)), 1), dtype=torch.uint8, device=weight.device
        )
        torch.cuda.synchronize()
        self.alg_id: int | None = None

    def _build(self, layout: tuple[Any, ...], in_type: int, out_type: int, compute: int, cusparse: Any) -> None:
        import numpy as np

        cl = _lt()
        h, (m, n, k) = self.lt.handle, (self.m, self.n, self.k)
        _, a_ord, a_op, a_dims, b_ord, b_op, b_dims, d_ord, d_dims = layout
        a = cl.structured_descriptor_init(
            h, *a_dims(m, n, k), 16, in_type, int(getattr(cusparse.Order, a_ord)), int(cl.Sparsity.SPARSITY_50_PERCENT)
        )
        self._descs.append(a)
        b = cl.dense_descriptor_init(h, *b_dims(m, n, k), 16, in_type, int(getattr(cusparse.Order, b_ord)))
        self._descs.append(b)
        d = cl.dense_descriptor_init(h, *d_dims(m, n, k), 16, out_type, int(getattr(cusparse.Order, d_ord)))
        self._descs.append(d)
        self._mm = cl.matmul_descriptor_init(
            h, int(getattr(cusparse.Operation, a_op)), int(getattr(cusparse.Operation, b_op)), a, b, d, d, compute
        )
        self._set_epilogue()
        self._alg = cl.matmul_alg_selection_init(h, self._mm, int(cl.MatmulAlg.DEFAULT))
        value = np.array([self.search_iterations], dtype=np.int32)
        cl.matmul_alg_set_attribute(h, self._alg, int(cl.MatmulAlgAttribute.SEARCH_ITERATIONS), value.ctypes.data, 4)
        self._plan = cl.matmul_plan_init(h, self._mm, self._alg)

    def _set_epilogue(self) -> None:
        """Bias pointer and activation on the matmul descriptor, before the plan is made from it. The bias
        has N values: the rows of D, which is yᵀ column-major here (one value per output channel)."""
        import numpy as np

        cl, h = _lt(), self.lt.handle
        if self.bias is not None:
            ptr = np.array([self.bias.data_ptr()], dtype=np.int64)
            cl.matmul_desc_set_attribute(h, self._mm, int(cl.MatmulDescAttribute.BIAS_POINTER), ptr.ctypes.data, 8)
        if self.activation is not None:
            attr = {"relu": cl.MatmulDescAttribute.ACTIVATION_RELU, "gelu": cl.MatmulDescAttribute.ACTIVATION_GELU}
            on = np.ones(1, dtype=np.int32)
            cl.matmul_desc_set_attribute(h, self._mm, int(attr[self.activation]), on.ctypes.data, 4)

    def set_stream(self, stream: int) -> None:
        """The CUDA stream launches go to (a graph capture launches on its own stream)."""
        self.streams[0] = stream

    def _args(self, x: Any, y: Any) -> tuple[Any, ...]:
        return (
            self.lt.handle,
            self._plan,
            self.alpha.ctypes.data,
            self.compressed.data_ptr(),
            x.data_ptr(),
            self.beta.ctypes.data,
            y.data_ptr(),
            y.data_ptr(),
            self.workspace.data_ptr(),
            self.streams.ctypes.data,
            1,
        )

    def search(self, x: Any, y: Any) -> int:
        """Tune the plan with ``matmul_search`` (times every kernel config and split-K); returns the config id."""
        import numpy as np

        cl = _lt()
        cl.matmul_search(*self._args(x, y))
        alg_id = np.zeros(1, dtype=np.int32)
        cl.matmul_alg_get_attribute(
            self.lt.handle, self._alg, int(cl.MatmulAlgAttribute.CONFIG_ID), alg_id.ctypes.data, 4
        )
        self.alg_id = int(alg_id[0])
        return self.alg_id

    _ALG_ATTRS = ("CONFIG_ID", "SPLIT_K", "SPLIT_K_MODE", "SPLIT_K_BUFFERS")

    def alg_attributes(self) -> dict[str, int]:
        """The kernel choice ``matmul_search`` left in the algorithm selection (config id and split-K)."""
        import numpy as np

        cl, out = _lt(), {}
        for name in self._ALG_ATTRS:
            value = np.zeros(1, dtype=np.int32)
            cl.matmul_alg_get_attribute(
                self.lt.handle, self._alg, int(getattr(cl.MatmulAlgAttribute, name)), value.ctypes.data, 4
            )
            out[name] = int(value[0])
        return out

    def run(self, x: Any, y: Any) -> None:
        """One launch of y = x·Wᵀ on the plan's stream (asynchronous)."""
        _lt().matmul(*self._args(x, y))

    def launcher(self, x: Any, y: Any) -> Callable[[], None]:
        """A zero-argument launch of y = x·Wᵀ with its arguments built once: at a few µs per kernel, Python
        work per call would otherwise be timed too. The stream is read at launch (``set_stream``)."""
        matmul, args = _lt().matmul, self._args(x, y)

        def launch() -> None:
            matmul(*args)

        return launch

    def _destroy(self) -> None:
        cl = _lt()
        steps = [
            (cl.matmul_plan_destroy, self._plan),
            (cl.matmul_alg_selection_destroy, self._alg),
            (cl.matmul_descriptor_destroy, self._mm),
        ] + [(cl.mat_descriptor_destroy, d) for d in self._descs]
        self._descs, self._mm, self._alg, self._plan = [], 0, 0, 0
        for destroy, ptr in steps:
            if ptr:
                try:
                    destroy(ptr)
                except Exception as e:  # e.g. AlgSelectionDestroy is missing before cuSPARSELt 0.8: leak, go on
                    log.debug("cuSPARSELt cleanup: %s", e)

    def close(self) -> None:
        self._destroy()


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


def time_loops(
    fns: dict[str, Any],
    iters: int,
    repeats: int,
    warmup: int,
    mode: str,
    warmup_s: float = 0.3,
    settle_max_s: float = 2.0,
    block_s: float = 0.05,
) -> tuple[dict[str, list[float]], dict[str, float], Settled]:
    """Per-launch GPU ms of each function, once per repetition (the functions alternate within a repetition),
    the median host ms per launch spent enqueuing them, and how the warm-up ended."""
    import torch

    runners: dict[str, Any] = {}
    if mode == "graph":
        for name, fn in fns.items():
            fn()  # first call outside capture (lazy init, cuBLAS handles)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(iters):
                    fn()
            runners[name] = graph.replay
    else:
        for name, fn in fns.items():

            def loop(fn: Any = fn) -> None:
                for _ in range(iters):
                    fn()

            runners[name] = loop

    def one_round() -> None:
        for run in runners.values():
            run()
        torch.cuda.synchronize()

    for _ in range(max(warmup, 1)):  # lazy initialisation, caches
        one_round()
    # then warm up for a time, until two consecutive blocks of rounds agree within 1%: clocks settle under
    # sustained load (seen: a dense 8192x4096x1024 product drifting from 110 to 123 µs over its first ~50 ms;
    # BERT-base FFN-up 8% slower in one of three runs after a fixed 0.3 s), and steady state is what an
    # engine sees
    settled = settle(_event_block(one_round, block_s), warmup_s, settle_max_s)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out: dict[str, list[float]] = {name: [] for name in fns}
    host: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            start.record()
            runners[name]()
            end.record()
            host[name].append((time.perf_counter() - t0) * 1e3 / iters)
            end.synchronize()
            out[name].append(start.elapsed_time(end) / iters)
    return out, {name: statistics.median(v) for name, v in host.items()}, settled


def _event_block(step: Callable[[], None], block_s: float) -> Callable[[], float]:
    """A measurement for ``settle``: repeat ``step`` (which ends synchronised) for ``block_s`` seconds of host
    time and return the GPU ms per step between two events around the whole block."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def block() -> float:
        t0, n = time.perf_counter(), 0
        start.record()
        while n < 1 or time.perf_counter() - t0 < block_s:
            step()
            n += 1
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / n

    return block


def warm_up_gpu(min_s: float = 2.0, max_s: float = 10.0, tol: float = 0.01, size: int = 4096) -> Settled:
    """Load the GPU with dense fp16 products (``size``³, ~0.2 ms each on an H100, replayed from a CUDA graph)
    until at least ``min_s`` seconds have passed and two consecutive 0.1 s blocks agree within ``tol``.

    Why: an idle GPU's clocks and power state take seconds of sustained load to settle; without this the
    first shapes a ``bench`` run times can be measured in another state than the later ones (seen on the
    H100: one run's FFN-up products 8% slower, dense and sparse alike).
    """
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(size, size, device="cuda", generator=gen, dtype=torch.float32).half()
    b = torch.randn(size, size, device="cuda", generator=gen, dtype=torch.float32).half()
    c = torch.empty(size, size, device="cuda", dtype=torch.float16)
    torch.mm(a, b, out=c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            torch.mm(a, b, out=c)

    def step() -> None:
        graph.replay()
        torch.cuda.synchronize()

    settled = settle(_event_block(step, 0.1), min_s, max_s, tol)
    log.info(
        "GPU warm-up: %.2f s, last blocks %s ms per 10 products, settled=%s",
        settled.seconds,
        [round(v, 4) for v in settled.blocks[-2:]],
        settled.settled,
    )
    return settled


def gpu_state() -> dict[str, Any]:
    """SM clock (MHz), temperature (°C), power (W) and the clock-limiting reasons (NVML bit mask) right now;
    empty where NVML (nvidia-ml-py) is not available. Recorded with each timing to explain time differences
    between runs that the speed-ups do not show."""
    try:
        import pynvml

        pynvml.nvmlInit()
        import torch

        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        state: dict[str, Any] = {
            "sm_clock_mhz": int(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
            "temperature_c": int(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
        }
        reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        if reasons is not None:
            state["clock_event_reasons"] = int(reasons(h))
        return state
    except Exception as e:  # informational only
        log.debug("NVML: %s", e)
        return {}


def _graph_ms(fn: Callable[[], None], iters: int = 20, repeats: int = 3) -> float:
    """Quick GPU ms per launch of ``fn`` from a CUDA graph (for choosing between tuned plans)."""
    runs, _, _ = time_loops({"fn": fn}, iters, repeats, 1, "graph", warmup_s=0.02, settle_max_s=0.05, block_s=0.01)
    return statistics.median(runs["fn"])


def tuned_plan(
    lt: SparseLt, wp: Any, x: Any, y: Any, dtype: str, rounds: int, bias: Any = None, activation: str | None = None
) -> tuple[SparsePlan, list[dict[str, Any]]]:
    """The fastest of ``rounds`` independently built and searched plans, and what each round picked.

    Why: one ``matmul_search`` sometimes settles on a config 5-60% slower than another search's pick (seen
    on the H100: 16384x11008x4096 config 27 at 1.64-1.66 ms vs config 6 at 1.56 ms; BERT-base ffn1 config 6
    at 31.6 µs vs 42 at 26.5 µs; a 32x768x768 pooler config 2 at 5.2 µs vs 36 at 3.3 µs), which made
    repeated bench runs disagree. Each round gets its own plan: re-planning one plan with an
    earlier round's config and split-K attributes crashed cuSPARSELt 0.8.0 (segfault in plan init).
    """
    import torch

    plans: list[tuple[float, SparsePlan]] = []
    tried: list[dict[str, Any]] = []
    try:
        for _ in range(max(rounds, 1)):
            plan = SparsePlan(lt, wp, x.shape[0], dtype, bias=bias, activation=activation)
            plans.append((float("inf"), plan))
            plan.set_stream(torch.cuda.current_stream().cuda_stream)
            plan.search(x, y)
            attrs = plan.alg_attributes()
            launch = plan.launcher(x, y)

            def fn(plan: SparsePlan = plan, launch: Callable[[], None] = launch) -> None:
                plan.set_stream(torch.cuda.current_stream().cuda_stream)
                launch()

            ms = _graph_ms(fn)
            plans[-1] = (ms, plan)
            tried.append({"config": attrs["CONFIG_ID"], "split_k": attrs["SPLIT_K"], "ms": ms})
    except BaseException:
        for _, plan in plans:
            plan.close()
        raise
    best = min(range(len(plans)), key=lambda i: plans[i][0])
    for i, (_, plan) in enumerate(plans):
        if i != best:
            plan.close()
    return plans[best][1], tried


#: products estimated under this many µs (at ~400 TFLOP/s) are launch-latency bound: more search rounds
TINY_PRODUCT_US = 5.0


def rounds_for(m: int, n: int, k: int, rounds: int) -> int:
    """Search rounds for one shape: ``rounds``, tripled for tiny products.

    Why: ``matmul_search`` times each config over a few µs, and on tiny products its pick varies most (H100,
    BERT-base pooler 32x768x768: configs 36/37 at 3.2-3.5 µs in two runs, 38 and 39 at 3.7-4.0 µs in both
    rounds of a third, which moved that layer's speed-up from 1.06x to 0.98x). A round costs milliseconds
    there, so more rounds are cheap.
    """
    est_us = 2 * m * n * k / 400e12 * 1e6
    return rounds * 3 if est_us < TINY_PRODUCT_US else rounds


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
