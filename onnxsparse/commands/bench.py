"""``onnxsparse bench MODEL``: time the model's own layer GEMMs dense (cuBLAS) vs 2:4 sparse (cuSPARSELt), each
with the epilogue the graph applies, and turn that into an end-to-end estimate with its assumptions.

``--shapes-only`` stops after the CPU part (the GEMMs each layer computes, deduplicated) and needs no GPU.
"""

from __future__ import annotations

from typing import Any

import click

from onnxsparse.errors import OnnxSparseError
from onnxsparse.render import table, write_json


@click.command("bench")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--shapes",
    default=None,
    metavar="NAME:DxD,...",
    help="Concrete input shapes (trtexec syntax), e.g. input_ids:32x128; M comes from these.",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp16", "int8"]),
    default="fp16",
    show_default=True,
    help="Precision of both products (int8 accumulates into int32).",
)
@click.option("--json", "json_path", default=None, metavar="PATH|-", help="Write the full report as JSON.")
@click.option(
    "--epilogues/--no-epilogues",
    default=True,
    show_default=True,
    help="Time each GEMM with the bias/activation the graph applies after it, fused on both sides "
    "(cuBLASLt epilogue vs cuSPARSELt BIAS_POINTER/ACTIVATION_*), plus the unfused sparse time "
    "(fp16; int8 times plain GEMMs).",
)
@click.option(
    "--total-ms",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="MS",
    help="The dense model's measured latency (same shapes and precision) on your engine: the "
    "end-to-end gain follows by Amdahl's law.",
)
@click.option(
    "--trt-profile",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="A `trtexec --exportProfile` JSON of the dense engine: its total, and its layer times where "
    "a TensorRT layer matches one of ours by name.",
)
@click.option(
    "--m-buckets",
    type=click.IntRange(1),
    default=None,
    metavar="ROWS",
    help="Also time sparse plans built for M rounded up to this many rows, as a dynamic-shape "
    "server pre-builds them (dense stays at the real M), next to the exact-M figures.",
)
@click.option(
    "--exclude",
    default=None,
    metavar="REGEX",
    help="Layers (node or weight names) that stay dense: not timed, counted as non-GEMM time.",
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=7,
    show_default=True,
    help="Timed repetitions per shape; the median is reported.",
)
@click.option(
    "--iters",
    type=click.IntRange(1),
    default=50,
    show_default=True,
    help="Back-to-back launches per repetition (steady state, not single-launch latency).",
)
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True, help="Untimed repetitions first.")
@click.option(
    "--gpu-warmup",
    type=click.FloatRange(0),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Load the GPU with dense products for at least this long (and until two 0.1 s blocks agree "
    "within 1%, at most 5x longer) before the first shape: idle clocks take seconds to settle. "
    "0 = off.",
)
@click.option(
    "--mode",
    type=click.Choice(["graph", "loop"]),
    default="graph",
    show_default=True,
    help="Replay a CUDA graph of the launches (what an engine sees), or loop over them from Python "
    "(host-bound below ~30 µs a product: torch.mm costs 13-30 µs of CPU a call).",
)
@click.option(
    "--search-rounds",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="matmul_search runs per shape (x3 for tiny products); the fastest pick is kept "
    "(one search is sometimes 10-20% off).",
)
@click.option(
    "--min-speedup",
    type=float,
    default=1.0,
    show_default=True,
    help="A layer whose (fused) sparse speed-up is below this stays dense.",
)
@click.option("--shapes-only", is_flag=True, help="Print the extracted GEMMs and stop (no GPU needed).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random test data.")
def command(
    model: str,
    shapes: str | None,
    dtype: str,
    json_path: str | None,
    epilogues: bool,
    total_ms: float | None,
    trt_profile: str | None,
    m_buckets: int | None,
    exclude: str | None,
    repeats: int,
    iters: int,
    warmup: int,
    gpu_warmup: float,
    mode: str,
    search_rounds: int,
    min_speedup: float,
    shapes_only: bool,
    seed: int,
) -> None:
    """Measure cuSPARSELt 2:4 against dense cuBLASLt for each weighted layer's GEMM (M = batch × positions),
    with the layer's fused bias/activation, and estimate the end-to-end gain.

    \b
    Examples:
      onnxsparse bench bert.onnx --shapes input_ids:32x128,attention_mask:32x128 --shapes-only
      onnxsparse bench bert.onnx --shapes input_ids:32x128 --total-ms 4.1 --json bench.json
      onnxsparse bench bert.onnx --shapes input_ids:32x128 --trt-profile dense_profile.json
      onnxsparse bench resnet50.onnx --shapes input:64x3x224x224 --m-buckets 64

    Weights are random (times depend on shapes, not values), pruned 2:4 along K. Each shape gets one
    cuSPARSELt plan, tuned with matmul_search; every result is checked against the dense product with
    its epilogue. Times are per launch: --iters back-to-back launches (a CUDA graph by default), median of
    --repeats. The GEMM-time figure covers the weighted GEMMs only; the end-to-end figure needs the dense
    total (--total-ms or --trt-profile), else it is shown for GEMM shares of 50/70/90%.
    """
    from onnxsparse.bench.e2e import parse_trt_profile
    from onnxsparse.bench.gemms import extract_gemms, unique_gemms, with_m_bucket
    from onnxsparse.ir.model_io import load_model
    from onnxsparse.ir.paths import check_outputs
    from onnxsparse.ir.shapes import parse_shapes

    if total_ms is not None and trt_profile is not None:
        raise OnnxSparseError("give --total-ms or --trt-profile, not both")
    check_outputs([model, trt_profile], [("--json", json_path)])
    profile = parse_trt_profile(trt_profile) if trt_profile else None
    loaded = load_model(model, lazy=True)
    fused = epilogues and dtype == "fp16"
    layers = extract_gemms(loaded, parse_shapes(shapes), dtype=dtype, epilogues=fused, exclude=exclude)
    if not layers:
        raise OnnxSparseError(f"{model} has no Conv/ConvTranspose/Gemm/MatMul layer with a weight")
    bucketed = with_m_bucket(layers, m_buckets, dtype) if m_buckets else None
    unique = unique_gemms(layers)
    if shapes_only:
        _print_shapes(layers, unique, dtype, json_path, bucketed)
        return
    if not unique:
        raise OnnxSparseError("no layer can be timed (see --shapes-only for the reasons)")
    extra = [u for u in unique_gemms(bucketed) if u.key not in {v.key for v in unique}] if bucketed else []

    from onnxsparse.bench import gpu

    why = gpu.gpu_available()
    if why:
        raise OnnxSparseError(f"cannot bench on the GPU: {why} (--shapes-only needs no GPU)")
    settings = {
        "model": str(model),
        "shapes": shapes,
        "repeats": repeats,
        "iters": iters,
        "warmup": warmup,
        "mode": mode,
        "seed": seed,
        "search_rounds": search_rounds,
        "gpu_warmup_s": gpu_warmup,
        "epilogues": fused,
        "m_buckets": m_buckets,
        "exclude": exclude,
        "total_ms": total_ms,
        "trt_profile": trt_profile,
    }
    timings, warmed = _time_all(unique + extra, dtype, fused, settings)
    settings["gpu_warmup"] = warmed
    data, lines = _reports(
        layers, bucketed, timings, dtype, min_speedup, settings, total_ms, profile, gpu.device_info()
    )
    if json_path:
        write_json(data, json_path)
    if json_path == "-":
        return
    for line in lines:
        click.echo(line)


def _time_all(unique: list[Any], dtype: str, fused: bool, settings: dict[str, Any]) -> tuple[dict[Any, Any], Any]:
    """Time every distinct shape on the GPU, with a progress line at least every 30 s without a TTY."""
    from onnxsparse.bench import gpu
    from onnxsparse.bench.fused import time_gemm_epilogue
    from onnxsparse.progress import progress

    s = settings
    warm = s["gpu_warmup_s"]
    warmed = gpu.warm_up_gpu(min_s=warm, max_s=5 * warm).to_dict() if warm > 0 else None
    timings: dict[Any, Any] = {}
    current = {"shape": ""}
    with gpu.SparseLt() as lt:
        for u in progress(unique, desc="bench", unit="shape", postfix=lambda: current):
            current["shape"] = f"{u.m}x{u.n}x{u.k} {u.epilogue}".strip()
            common = {
                "dtype": dtype,
                "repeats": s["repeats"],
                "iters": s["iters"],
                "warmup": s["warmup"],
                "mode": s["mode"],
                "seed": s["seed"],
                "search_rounds": s["search_rounds"],
            }
            if fused:
                timings[u.key] = time_gemm_epilogue(
                    lt, u.m, u.n, u.k, epilogue=u.epilogue, m_dense=u.m_real, gelu_form=u.activation or "gelu", **common
                )
            else:
                timings[u.key] = gpu.time_gemm(lt, u.m, u.n, u.k, **common)
    return timings, warmed


def _reports(
    layers: list[Any],
    bucketed: list[Any] | None,
    timings: dict[Any, Any],
    dtype: str,
    min_speedup: float,
    settings: dict[str, Any],
    total_ms: float | None,
    profile: Any,
    device: dict[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    """The JSON report and the text lines: per-layer and per-shape tables, summary, end-to-end estimate
    (GPU-free: the timings are given, so the arithmetic and JSON are tested on CPU)."""
    from onnxsparse.bench.e2e import estimate
    from onnxsparse.bench.e2e import summary_lines as e2e_lines
    from onnxsparse.bench.report import (
        LAYER_HEADERS,
        SHAPE_HEADERS,
        build_report,
        layer_rows,
        shape_rows,
        summary_lines,
    )

    report = build_report(layers, timings, dtype, min_speedup=min_speedup, device=device, settings=settings)
    data = report.to_dict()
    data["e2e"] = estimate(report.layer_times(), total_ms=total_ms, profile=profile)
    dev = report.device
    lines = [
        f"{dev.get('gpu', '?')} (sm {dev.get('sm', '?')}), torch {dev.get('torch', '?')}, "
        f"cuSPARSELt {dev.get('cusparselt', '?')}; {settings['mode']} of {settings['iters']} launches, "
        f"median of {settings['repeats']}",
        table(layer_rows(report), LAYER_HEADERS),
        "",
        table(shape_rows(report), SHAPE_HEADERS),
        "",
        *summary_lines(report),
        *e2e_lines(data["e2e"]),
    ]
    if bucketed is not None:
        bucket = build_report(bucketed, timings, dtype, min_speedup=min_speedup)
        section = estimate(bucket.layer_times(), total_ms=total_ms, profile=profile)
        data["m_buckets"] = {
            "rows": settings["m_buckets"],
            "summary": bucket.summary(),
            "e2e": section,
            "layers": [
                {
                    "name": r.layer.name,
                    "m": r.layer.m,
                    "plan_m": r.layer.m_padded,
                    "sparse_ms": r.sparse_ms,
                    "speedup": r.speedup,
                    "choice": r.choice,
                }
                for r in bucket.layers
            ],
        }
        s = bucket.summary()
        e2e = section.get("e2e")
        tail = f", end to end {e2e['speedup']:.2f}x" if e2e else ""
        if s["speedup_estimate"] is not None:
            lines.append(
                f"M buckets of {settings['m_buckets']} rows (plans for M rounded up, dense at the real M): "
                f"weighted GEMMs {s['speedup_estimate']:.2f}x{tail} (exact M: "
                f"{report.summary()['speedup_estimate']:.2f}x)"
            )
    return data, lines


def _print_shapes(
    layers: list[Any], unique: list[Any], dtype: str, json_path: str | None, bucketed: list[Any] | None
) -> None:
    timed = sum(1 for lg in layers if lg.key is not None)
    data: dict[str, Any] = {
        "dtype": dtype,
        "layers": [lg.to_dict() for lg in layers],
        "shapes": [u.to_dict() for u in unique],
        "timed_layers": timed,
    }
    if bucketed is not None:
        data["m_buckets"] = [
            {"name": lg.name, "m": lg.m, "plan_m": lg.m_padded} for lg in bucketed if lg.key is not None
        ]
    if json_path:
        write_json(data, json_path)
    if json_path == "-":
        return
    rows = [
        [
            lg.name,
            lg.op_type,
            "" if lg.m is None else f"{lg.m}x{lg.n}x{lg.k}",
            "" if lg.key is None else lg.m_padded,
            lg.epilogue or "-",
            f"{lg.flops / 1e9:.2f}" if lg.flops else "",
            lg.reason or "",
        ]
        for lg in layers
    ]
    click.echo(table(rows, ("layer", "op", "MxNxK", "plan M", "epilogue", "GFLOP", "not timed because")))
    click.echo("")
    if not unique:
        click.echo(
            f"no layer would be timed: none of the {len(layers)} weighted layers has a usable GEMM "
            "(see 'not timed because')"
        )
        return
    click.echo(
        table(
            [[f"{u.m}x{u.n}x{u.k}", u.epilogue or "-", u.count] for u in unique], ("unique MxNxK", "epilogue", "layers")
        )
    )
    click.echo(f"\n{timed} of {len(layers)} weighted layers would be timed as {len(unique)} distinct {dtype} GEMMs")
