#!/usr/bin/env python3
"""Can onnx-ir carry the >2 GB path? load → 2:4 prune → save through onnxsparse vs through onnx-ir.

    python tools/bench_onnx_ir.py --json tools/results/bench_onnx_ir.json
    python tools/bench_onnx_ir.py --gb 0.3 --tensor-mb 32 --skip-cnn      # a quick run

Workloads (the generators of the benchmarks whose figures issue 13 must keep, imported from them):
  * ``scale``: tools/bench_scale.py's model, a chain of MatMul/Gemm with square fp32 weights of ``--tensor-mb``
    MiB in one external data file, ``--gb`` in all (default 2.2 GB of 256 MiB tensors: over protobuf's limit);
  * ``cnn``: tools/bench_prune.py's YOLOv8n-shaped CNN (63 Convs, 3.2 M params, inline weights).

Variants, each in its own fresh process (peak RSS: the child's own VmHWM, whole run and per phase; see
``_run_child`` for why not ``RUSAGE_CHILDREN``):
  * ``onnxsparse``: ``load_model`` → ``Pipeline("prune,validate")`` (PrunePass, ValidatePass, the full ONNX
    checker) → ``save_model``: what ``onnxsparse run -p prune,validate`` does;
  * ``onnx-ir``: ``onnx_ir.load`` → for every MatMul/Gemm/Conv weight, numpy 2:4 magnitude pruning with
    onnxsparse's own solver on the array (``sparsity.nm_keep``) and the result set as an in-memory
    ``ir.Tensor`` → ``onnx_ir.save`` (external data when the input had it). This is the straightforward port;
  * ``onnx-ir+spill`` (scale only): what the port would have to be — each weight pruned 16 MiB of rows at a
    time (the same solver, so the same zeros) straight into a scratch file, and the value set as an
    ``ir.ExternalTensor`` over it (the "spill tensor" the issue proposes), so memory never holds an edited
    weight; ``onnx_ir.save`` then copies the scratch bytes into the output data file. This variant isolates
    what onnx-ir itself costs: its load and its save.

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
_BLOCK_BYTES = 16 * 2**20  # rows of a weight pruned at a time by the spill variant
_PAGE = 4096


# ------------------------------------------------------------------------------------------ in the child


def _vm_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


class _Phases:
    """Wall time and peak RSS of each phase of a child's run: the kernel's peak mark (VmHWM) is reset before
    a phase (``/proc/self/clear_refs``) and read after it, so a phase's peak is its own; the peak before the
    first phase is the imports'."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float | None] = {"imports": _vm_mb("VmHWM")}
        self._name = ""
        self._t0 = 0.0

    def start(self, name: str) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # not Linux: the phase peaks are then the process's peak so far
            pass
        self._name, self._t0 = name, time.perf_counter()

    def stop(self) -> None:
        self.seconds[self._name] = time.perf_counter() - self._t0
        self.peak_mb[self._name] = _vm_mb("VmHWM")

    def info(self, **extra: Any) -> dict[str, Any]:
        peaks = [v for v in self.peak_mb.values() if v is not None]
        return {
            "seconds": self.seconds,
            "peak_rss_mb": max(peaks) if peaks else None,
            "phase_peak_rss_mb": self.peak_mb,
            **extra,
        }


def _onnxsparse(src: Path, out: Path) -> dict[str, Any]:
    from onnxsparse.grammar import registry
    from onnxsparse.ir.model_io import load_model, save_model
    from onnxsparse.pipeline import PassContext, Pipeline

    registry()  # pass modules imported before the clock starts, as for the onnx-ir variants' imports
    phases = _Phases()
    phases.start("load")
    model = load_model(src)
    phases.stop()
    phases.start("prune")
    result = Pipeline("prune,validate").run(model, PassContext())
    phases.stop()
    phases.start("save")
    save_model(result.model, out)
    phases.stop()
    return phases.info(pruned=len(result.results[0].report.changed))


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


def _prune_rows(array: np.ndarray, axis: int, write: Any) -> None:
    """2:4-prune a 2-D weight block of rows at a time (``write`` gets each pruned block, in C order).

    A block of whole rows holds whole groups along either axis (its row count is a multiple of 4), so the
    result equals pruning the whole array, with a working set of a few blocks instead of a few whole tensors.
    """
    from onnxsparse.sparsity import nm_keep

    step = max(4, _BLOCK_BYTES // max(1, array.shape[1] * array.itemsize) // 4 * 4)
    for r in range(0, array.shape[0], step):
        block = np.asarray(array[r : r + step])
        write(np.where(nm_keep(np.abs(block), axis, 2, 4), block, np.float32(0)))


def _onnx_ir(src: Path, out: Path, spill: bool) -> dict[str, Any]:
    import onnx_ir as ir

    from onnxsparse.sparsity import nm_keep

    phases = _Phases()
    phases.start("load")
    model = ir.load(str(src))
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    phases.stop()
    phases.start("prune")
    scratch = Path(tempfile.mkdtemp(prefix="bench_onnx_ir-", dir=out.parent))
    pack = scratch / "pack.bin"
    offset = 0
    weights = _weights(model)
    with open(pack, "wb") as f:
        for value, axis in weights:
            tensor = value.const_value
            array = tensor.numpy()
            if spill and array.ndim == 2:
                f.write(b"\0" * ((-offset) % _PAGE))
                offset += (-offset) % _PAGE
                _prune_rows(array, axis, lambda block: f.write(block.data))
                value.const_value = ir.ExternalTensor(
                    pack.name,
                    offset=offset,
                    length=array.nbytes,
                    dtype=tensor.dtype,
                    shape=tensor.shape,
                    name=tensor.name,
                    base_dir=str(scratch),
                )
                offset += array.nbytes
            else:
                pruned = np.where(nm_keep(np.abs(array), axis, 2, 4), array, np.float32(0))
                value.const_value = ir.Tensor(pruned, name=tensor.name)
                del pruned
            del array
            if isinstance(tensor, ir.ExternalTensor):
                tensor.release()  # unmap the input's pages now rather than at garbage collection
            del tensor
    phases.stop()
    phases.start("save")
    ir.save(model, str(out), external_data=out.name + ".data" if external else None)
    phases.stop()
    shutil.rmtree(scratch)
    return phases.info(pruned=len(weights))


def child(variant: str, src: Path, out: Path) -> dict[str, Any]:
    if variant == "onnxsparse":
        return _onnxsparse(src, out)
    return _onnx_ir(src, out, spill=variant == "onnx-ir+spill")


# ----------------------------------------------------------------------------------------- in the parent


def _run_child(variant: str, src: Path, out: Path) -> dict[str, Any]:
    """One variant in a fresh process; its timings and peak RSS as the child measured them (``_Phases``).

    Not ``getrusage(RUSAGE_CHILDREN)`` / ``wait4``'s ``ru_maxrss``: on Linux a child's ``ru_maxrss`` starts
    at its parent's RSS at the fork (exec carries the old address space's high-water mark over), so after the
    parent has verified a 2.4 GB output every child would read 2.4 GB. The child's own VmHWM is its own.
    """
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, str(src), str(out)], capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    info: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
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
    head = ("variant", "load s", "prune s", "save s", "total s", "GB/s", "peak MB", "rss_ratio", "s ×ours", "RSS ×ours")
    print(f"{head[0]:22s}" + "".join(f"{h:>10s}" for h in head[1:]) + "  peak MB in load/prune/save")
    for variant, v in result["variants"].items():
        s, p = v["seconds"], v.get("phase_peak_rss_mb", {})
        cells = (s["load"], s["prune"], s["save"], v["total_seconds"], v["gb_per_s"], v["peak_rss_mb"], v["rss_ratio"])
        ratios = (v.get("seconds_vs_onnxsparse", 1.0), v.get("peak_rss_vs_onnxsparse", 1.0))
        phases = "/".join(f"{p.get(k, 0):.0f}" for k in ("load", "prune", "save"))
        print(f"{variant:22s}" + "".join(f"{c:10.2f}" for c in (*cells, *ratios)) + f"  {phases}")


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
