#!/usr/bin/env python3
"""Can onnx-ir carry the >2 GB path? load → 2:4 prune → save through onnxsparse vs through onnx-ir.

    python tools/bench_onnx_ir.py --json tools/results/bench_onnx_ir.json
    python tools/bench_onnx_ir.py --gb 0.3 --tensor-mb 32 --skip-cnn      # a quick run

Workloads (the generators of the benchmarks whose figures issue 13 must keep, imported from them):
  * ``scale``: tools/bench_scale.py's model, a chain of MatMul/Gemm with square fp32 weights of ``--tensor-mb``
    MiB in one external data file, ``--gb`` in all (default 2.2 GB of 256 MiB tensors: over protobuf's limit);
  * ``cnn``: tools/bench_prune.py's YOLOv8n-shaped CNN (63 Convs, 3.2 M params, inline weights).

Variants, each in its own fresh process (its peak RSS is that child's ``ru_maxrss``, read with ``os.wait4``:
what ``getrusage(RUSAGE_CHILDREN)`` reports for one child):
  * ``onnxsparse``: ``load_model`` → ``Pipeline("prune,validate")`` (PrunePass, ValidatePass, the full ONNX
    checker) → ``save_model``: what ``onnxsparse run -p prune,validate`` does;
  * ``onnx-ir``: ``onnx_ir.load`` → for every MatMul/Gemm/Conv weight, numpy 2:4 magnitude pruning with
    onnxsparse's own solver on the array (``sparsity.nm_keep``) and the result set as an in-memory
    ``ir.Tensor`` → ``onnx_ir.save`` (external data when the input had it). This is the straightforward port;
  * ``onnx-ir+spill`` (scale only): the same, but each pruned array is written to a scratch file at once and
    the value set as an ``ir.ExternalTensor`` over it — the "spill tensor" the issue proposes — so memory need
    not hold every edited weight; ``onnx_ir.save`` then copies the scratch bytes into the output data file.

Before the measured runs, one warm-up run of the ``onnxsparse`` variant reads the whole input (so every variant
starts with the input in the page cache), and the input is synced to disk. Each output is checked: the ONNX
checker on the written file and every pruned weight 2:4 along its reduction axis (read back memory-mapped).

Goals (issue 8, kept by issue 13) for the scale workload: ≥ 0.5 GB/s load → prune → save and peak RSS ≤ 1.3 ×
(largest tensor + graph proto). ``rss_ratio`` below is that quotient; ratios ``x_vs_onnxsparse`` are seconds and
peak RSS of a variant over ours (> 1: onnx-ir is slower / bigger).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_prune
import bench_scale

VARIANTS = ("onnxsparse", "onnx-ir", "onnx-ir+spill")
_PAGE = 4096


# ------------------------------------------------------------------------------------------ in the child


def _onnxsparse(src: Path, out: Path) -> dict[str, Any]:
    from onnxsparse.grammar import registry
    from onnxsparse.ir.model_io import load_model, save_model
    from onnxsparse.pipeline import PassContext, Pipeline

    registry()  # pass modules imported before the clock starts, as for the onnx-ir variants' imports
    t0 = time.perf_counter()
    model = load_model(src)
    t1 = time.perf_counter()
    result = Pipeline("prune,validate").run(model, PassContext())
    t2 = time.perf_counter()
    save_model(result.model, out)
    t3 = time.perf_counter()
    return {
        "seconds": {"load": t1 - t0, "prune": t2 - t1, "save": t3 - t2},
        "pruned": len(result.results[0].report.changed),
    }


def _reduction_axis(node: Any, weight: Any) -> int | None:
    """The axis of a MatMul/Gemm/Conv weight that 2:4 groups run along (K; C_in for Conv), or None."""
    if node.op_type == "MatMul" and len(weight.shape) >= 2:
        return len(weight.shape) - 2
    if node.op_type == "Gemm":
        trans = node.attributes.get("transB")
        return 1 if trans is not None and trans.value else 0
    if node.op_type == "Conv":
        return 1
    return None


def _weights(model: Any) -> list[tuple[Any, int]]:
    """(initializer value, reduction axis) of every prunable weight: input 1 of a MatMul/Gemm/Conv, fp32,
    its K a multiple of 4 (the stem's 3 input channels are not)."""
    out = []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
            continue
        value = node.inputs[1]
        tensor = value.const_value if value is not None and value.name in model.graph.initializers else None
        if tensor is None or tensor.dtype.name != "FLOAT":
            continue
        axis = _reduction_axis(node, tensor)
        if axis is not None and tensor.shape[axis] % 4 == 0:
            out.append((value, axis))
    return out


def _onnx_ir(src: Path, out: Path, spill: bool) -> dict[str, Any]:
    import onnx_ir as ir

    from onnxsparse.sparsity import nm_keep

    t0 = time.perf_counter()
    model = ir.load(str(src))
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    t1 = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bench_onnx_ir-", dir=out.parent))
    pack = scratch / "pack.bin"
    offset = 0
    weights = _weights(model)
    with open(pack, "wb") as f:
        for value, axis in weights:
            tensor = value.const_value
            array = tensor.numpy()
            pruned = np.where(nm_keep(np.abs(array), axis, 2, 4), array, np.float32(0))
            del array
            if spill:
                f.write(b"\0" * ((-offset) % _PAGE))
                offset += (-offset) % _PAGE
                f.write(pruned.data)
                value.const_value = ir.ExternalTensor(
                    pack.name,
                    offset=offset,
                    length=pruned.nbytes,
                    dtype=tensor.dtype,
                    shape=tensor.shape,
                    name=tensor.name,
                    base_dir=str(scratch),
                )
                offset += pruned.nbytes
            else:
                value.const_value = ir.Tensor(pruned, name=tensor.name)
            del pruned
    t2 = time.perf_counter()
    ir.save(model, str(out), external_data=out.name + ".data" if external else None)
    t3 = time.perf_counter()
    shutil.rmtree(scratch)
    return {"seconds": {"load": t1 - t0, "prune": t2 - t1, "save": t3 - t2}, "pruned": len(weights)}


def child(variant: str, src: Path, out: Path) -> dict[str, Any]:
    if variant == "onnxsparse":
        return _onnxsparse(src, out)
    return _onnx_ir(src, out, spill=variant == "onnx-ir+spill")


# ----------------------------------------------------------------------------------------- in the parent


def _run_child(variant: str, src: Path, out: Path) -> dict[str, Any]:
    """One variant in a fresh process; its own timings plus its peak RSS (``os.wait4``'s ru_maxrss)."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", variant, str(src), str(out)], stdout=stdout, stderr=stderr
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        stdout.seek(0)
        stderr.seek(0)
        if proc.returncode:
            raise SystemExit(f"{variant} failed ({proc.returncode}):\n{stderr.read()[-3000:]}")
        info: dict[str, Any] = json.loads(stdout.read().strip().splitlines()[-1])
    info["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # KiB on Linux
    return info


def _verify(out: Path) -> int:
    """The checker on the written file, and every pruned weight 2:4 along K; returns the weights checked."""
    import onnx_ir as ir

    from onnxsparse.sparsity import is_nm

    onnx.checker.check_model(str(out), full_check=True)
    model = ir.load(str(out))
    checked = 0
    for value, axis in _weights(model):
        if not is_nm(value.const_value.numpy(), axis, 2, 4):
            raise SystemExit(f"{out.name}: {value.name} is not 2:4")
        checked += 1
    return checked


def _sizes(src: Path) -> tuple[int, int, int]:
    """(weight bytes, largest tensor bytes, graph proto bytes) of the input, without reading its data."""
    from onnxsparse.ir.graph import iter_graphs
    from onnxsparse.ir.tensors import nbytes

    proto = onnx.load(str(src), load_external_data=False)
    sizes = [nbytes(t) for g in iter_graphs(proto.graph) for t in g.initializer]
    return sum(sizes), max(sizes), proto.ByteSize()


def bench(name: str, src: Path, work: Path, variants: tuple[str, ...]) -> dict[str, Any]:
    weights, largest, proto_bytes = _sizes(src)
    os.sync()
    warm = work / "warm"
    warm.mkdir()
    _run_child("onnxsparse", src, warm / "out.onnx")  # reads the input into the page cache
    shutil.rmtree(warm)
    os.sync()
    rows: dict[str, Any] = {}
    for variant in variants:
        folder = work / variant
        folder.mkdir()
        out = folder / "out.onnx"
        info = _run_child(variant, src, out)
        total = sum(info["seconds"].values())
        info["seconds"] = {k: round(v, 3) for k, v in info["seconds"].items()}
        info["total_seconds"] = round(total, 3)
        info["gb_per_s"] = round(weights / 1e9 / total, 3)
        info["rss_ratio"] = round(info["peak_rss_mb"] / ((largest + proto_bytes) / 2**20), 3)
        info["verified_tensors"] = _verify(out)
        rows[variant] = info
        shutil.rmtree(folder)
        os.sync()
    ours = rows["onnxsparse"]
    for variant, info in rows.items():
        if variant != "onnxsparse":
            info["seconds_vs_onnxsparse"] = round(info["total_seconds"] / ours["total_seconds"], 2)
            info["peak_rss_vs_onnxsparse"] = round(info["peak_rss_mb"] / ours["peak_rss_mb"], 2)
    return {
        "workload": name,
        "weights_gb": round(weights / 1e9, 3),
        "largest_tensor_mb": round(largest / 2**20, 1),
        "proto_mb": round(proto_bytes / 2**20, 3),
        "variants": rows,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _print(result: dict[str, Any]) -> None:
    print(
        f"\n{result['workload']}: {result['weights_gb']} GB of weights, largest tensor "
        f"{result['largest_tensor_mb']} MiB, proto {result['proto_mb']} MiB (load avg {result['load_average_1m']})"
    )
    print(
        f"{'variant':14s} {'load':>7s} {'prune':>7s} {'save':>7s} {'total s':>8s} {'GB/s':>6s} "
        f"{'peak MB':>8s} {'rss_ratio':>9s} {'s ×ours':>7s} {'RSS ×ours':>9s} {'pruned':>6s}"
    )
    for variant, v in result["variants"].items():
        s = v["seconds"]
        print(
            f"{variant:14s} {s['load']:7.2f} {s['prune']:7.2f} {s['save']:7.2f} {v['total_seconds']:8.2f} "
            f"{v['gb_per_s']:6.2f} {v['peak_rss_mb']:8.0f} {v['rss_ratio']:9.2f} "
            f"{v.get('seconds_vs_onnxsparse', 1.0):7.2f} {v.get('peak_rss_vs_onnxsparse', 1.0):9.2f} {v['pruned']:6d}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.2, help="scale model size in GB (default 2.2)")
    ap.add_argument("--tensor-mb", type=float, default=256, help="size of each scale weight in MiB (default 256)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: the system temp dir)")
    ap.add_argument("--skip-scale", action="store_true", help="only the CNN")
    ap.add_argument("--skip-cnn", action="store_true", help="only the >2 GB model")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        variant, src, out = args.child
        print(json.dumps(child(variant, Path(src), Path(out))))
        return 0
    import onnx_ir

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_onnx_ir-", dir=args.dir) as tmp:
        root = Path(tmp)
        if not args.skip_cnn:
            (root / "cnn").mkdir()
            src = root / "cnn" / "yolo_like.onnx"
            onnx.save(bench_prune.make_yolo_like(), str(src))
            results.append(bench("cnn (bench_prune)", src, root / "cnn", VARIANTS[:2]))
            _print(results[-1])
        if not args.skip_scale:
            src = bench_scale.make_model(root / "scale", args.gb, args.tensor_mb)
            results.append(bench(f"scale {args.gb} GB (bench_scale)", src, root / "scale", VARIANTS))
            _print(results[-1])
    for r in results:
        if r["workload"].startswith("scale"):
            for variant, v in r["variants"].items():
                met = v["gb_per_s"] >= 0.5 and v["rss_ratio"] <= 1.3
                print(f"goal (≥ 0.5 GB/s, rss_ratio ≤ 1.3) {variant}: {'met' if met else 'NOT met'}")
    if args.json:
        info = {"onnx_ir_version": onnx_ir.__version__, "onnx_version": onnx.__version__, "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
