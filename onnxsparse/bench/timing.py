"""GPU timing in steady state: launches replayed from a CUDA graph, warm-up until clocks settle, NVML state.

Why the timing looks like this: a single launch between two events measures launch latency and clock ramp
as much as the kernel and inflates sparse gains (REFERENCE.md: BERT-base ffn2 1.71× single-shot vs 1.21×
steady). So each measurement is ``iters`` back-to-back launches between two events, after warm-up; dense
and sparse alternate, and the median over ``repeats`` is reported. By default the launches are captured in
a CUDA graph and replayed: measured on the H100 VM, ``torch.mm`` costs 13-30 µs of host time a call, so a
Python loop leaves the GPU idle between dense products under ~30 µs and shows sparse gains of 2-3x that
are host overhead (a 4096x768x768 product: 1.4-2.0x in a loop, 1.01x from a graph). ``mode="loop"`` is kept
to compare with REFERENCE.md, and flags such shapes (``launch_bound``).

torch is imported inside functions: the CLI and CPU tests never need it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

from onnxsparse.bench.stability import Settled, settle

log = logging.getLogger("onnxsparse.bench.timing")


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
