"""cuSPARSELt through nvmath-python's low-level bindings: a handle, one plan per GEMM shape, and plan tuning.

The product is y[M, N] = x[M, K] · W[N, K]ᵀ, the weight W being the structured operand (2:4 along K). In
cuSPARSELt terms (the layout torch's ``_cslt_sparse_mm`` uses): A = W, structured, row-major [N, K], not
transposed; B = x, row-major [M, K], transposed; D = yᵀ as a column-major [N, M] matrix with ld = N, which is
y[M, N] row-major in memory.

A plan is built, compressed and tuned (``matmul_search``) once per shape and then only launched: creating
a plan per call costs ~0.6–0.9 ms, far more than the product itself.

torch and nvmath are imported inside functions: the CLI and CPU tests never need them.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from typing import Any

from onnxsparse.bench.timing import time_loops
from onnxsparse.errors import OnnxSparseError

log = logging.getLogger("onnxsparse.bench.cusparselt")


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
