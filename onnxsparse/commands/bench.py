"""``onnxsparse bench MODEL``: time the model's own layer GEMMs dense (cuBLAS) vs 2:4 sparse (cuSPARSELt).

``--shapes-only`` stops after the CPU part (the GEMMs each layer computes, deduplicated) and needs no GPU.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from onnxsparse.errors import OnnxSparseError
from onnxsparse.render import table, write_json


@click.command("bench")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--shapes", default=None, metavar="NAME:DxD,...",
              help="Concrete input shapes (trtexec syntax), e.g. input_ids:32x128; M comes from these.")
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default="fp16", show_default=True,
              help="Precision of both products (int8 accumulates into int32).")
@click.option("--json", "json_path", default=None, metavar="PATH|-", help="Write the full report as JSON.")
@click.option("--repeats", type=click.IntRange(1), default=7, show_default=True,
              help="Timed repetitions per shape; the median is reported.")
@click.option("--iters", type=click.IntRange(1), default=50, show_default=True,
              help="Back-to-back launches per repetition (steady state, not single-launch latency).")
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True, help="Untimed repetitions first.")
@click.option("--gpu-warmup", type=click.FloatRange(0), default=2.0, show_default=True, metavar="SECONDS",
              help="Load the GPU with dense products for at least this long (and until two 0.1 s blocks agree "
                   "within 1%, at most 5x longer) before the first shape: idle clocks take seconds to settle. "
                   "0 = off.")
@click.option("--mode", type=click.Choice(["graph", "loop"]), default="graph", show_default=True,
              help="Replay a CUDA graph of the launches (what an engine sees), or loop over them from Python "
                   "(host-bound below ~30 µs a product: torch.mm costs 13-30 µs of CPU a call).")
@click.option("--search-rounds", type=click.IntRange(1), default=2, show_default=True,
              help="matmul_search runs per shape (x3 for tiny products); the fastest pick is kept "
                   "(one search is sometimes 10-20% off).")
@click.option("--min-speedup", type=float, default=1.0, show_default=True,
              help="A layer whose sparse speed-up is below this stays dense.")
@click.option("--shapes-only", is_flag=True, help="Print the extracted GEMMs and stop (no GPU needed).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random test data.")
def command(model: str, shapes: str | None, dtype: str, json_path: str | None, repeats: int, iters: int,
            warmup: int, gpu_warmup: float, mode: str, search_rounds: int, min_speedup: float, shapes_only: bool,
            seed: int) -> None:
    """Measure cuSPARSELt 2:4 against dense cuBLAS for each weighted layer's GEMM (M = batch × positions).

    \b
    Examples:
      onnxsparse bench bert.onnx --shapes input_ids:32x128,attention_mask:32x128 --shapes-only
      onnxsparse bench bert.onnx --shapes input_ids:32x128 --json bench.json
      onnxsparse bench resnet50.onnx --shapes input:64x3x224x224 --dtype int8

    Weights are random (times depend on shapes, not values), pruned 2:4 along K. Each shape gets one
    cuSPARSELt plan, tuned once with matmul_search; results are checked against the dense product.
    Times are per launch: --iters back-to-back launches (a CUDA graph by default), median of --repeats.
    """
    from onnxsparse.bench.gemms import extract_gemms, unique_gemms
    from onnxsparse.model_io import load_model
    from onnxsparse.shapes import parse_shapes

    loaded = load_model(model)
    layers = extract_gemms(loaded.proto, parse_shapes(shapes), dtype=dtype)
    if not layers:
        raise OnnxSparseError(f"{model} has no Conv/ConvTranspose/Gemm/MatMul layer with a weight")
    unique = unique_gemms(layers)
    if shapes_only:
        _print_shapes(layers, unique, dtype, json_path)
        return
    if not unique:
        raise OnnxSparseError("no layer can be timed (see --shapes-only for the reasons)")

    from onnxsparse.bench import gpu
    from onnxsparse.bench.report import (
        LAYER_HEADERS,
        SHAPE_HEADERS,
        build_report,
        layer_rows,
        shape_rows,
        summary_lines,
    )

    why = gpu.gpu_available()
    if why:
        raise OnnxSparseError(f"cannot bench on the GPU: {why} (--shapes-only needs no GPU)")
    from tqdm import tqdm

    timings: dict[tuple[int, int, int], Any] = {}
    warmed = gpu.warm_up_gpu(min_s=gpu_warmup, max_s=5 * gpu_warmup).to_dict() if gpu_warmup > 0 else None
    with gpu.SparseLt() as lt:
        bar = tqdm(unique, desc="bench", unit="shape", file=sys.stderr, disable=not sys.stderr.isatty())
        for u in bar:
            bar.set_postfix_str(f"{u.m}x{u.n}x{u.k}")
            timings[u.key] = gpu.time_gemm(lt, u.m, u.n, u.k, dtype=dtype, repeats=repeats, iters=iters,
                                           warmup=warmup, mode=mode, seed=seed, search_rounds=search_rounds)
    settings = {"model": str(model), "shapes": shapes, "repeats": repeats, "iters": iters, "warmup": warmup,
                "mode": mode, "seed": seed, "search_rounds": search_rounds, "gpu_warmup_s": gpu_warmup,
                "gpu_warmup": warmed}
    report = build_report(layers, timings, dtype, min_speedup=min_speedup, device=gpu.device_info(),
                          settings=settings)
    if json_path:
        write_json(report.to_dict(), json_path)
    if json_path == "-":
        return
    dev = report.device
    click.echo(f"{dev.get('gpu', '?')} (sm {dev.get('sm', '?')}), torch {dev.get('torch', '?')}, "
               f"cuSPARSELt {dev.get('cusparselt', '?')}; {mode} of {iters} launches, median of {repeats}")
    click.echo(table(layer_rows(report), LAYER_HEADERS))
    click.echo("")
    click.echo(table(shape_rows(report), SHAPE_HEADERS))
    click.echo("")
    for line in summary_lines(report):
        click.echo(line)


def _print_shapes(layers: list[Any], unique: list[Any], dtype: str, json_path: str | None) -> None:
    if json_path:
        write_json({"dtype": dtype, "layers": [lg.to_dict() for lg in layers],
                    "shapes": [u.to_dict() for u in unique]}, json_path)
    if json_path == "-":
        return
    rows = [[lg.name, lg.op_type, "" if lg.m is None else f"{lg.m}x{lg.n}x{lg.k}",
             "" if lg.key is None else lg.m_padded, f"{lg.flops / 1e9:.2f}" if lg.flops else "", lg.reason or ""]
            for lg in layers]
    click.echo(table(rows, ("layer", "op", "MxNxK", "timed M", "GFLOP", "not timed because")))
    click.echo("")
    click.echo(table([[f"{u.m}x{u.n}x{u.k}", u.count] for u in unique], ("unique MxNxK", "layers")))
    timed = sum(1 for lg in layers if lg.key is not None)
    click.echo(f"\n{timed} of {len(layers)} weighted layers would be timed as {len(unique)} distinct {dtype} GEMMs")
