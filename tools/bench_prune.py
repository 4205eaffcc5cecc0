#!/usr/bin/env python3
"""Prune and check one YOLO-size CNN with onnxsparse and with Polygraphy, in one run, and print the ratios.

The model is generated here (onnx.helper + numpy, seeded; nothing is committed): a YOLOv8n-shaped network
(~3.2 M params, 63 convs, SiLU, C2f blocks, SPPF, FPN neck, decoupled head; every channel count a multiple of
4 except the 3-channel stem input), input 1x3x640x640.

Measured:
  (a) pass time, in process: ``PrunePass.run`` vs Polygraphy's ``SparsityPruner.prune`` (what
      ``polygraphy surgeon prune`` calls), and ``ValidatePass.analyse`` vs ``SparsityPruner.check``
      (what ``polygraphy inspect sparsity`` calls); the model is already in memory for both.
  (b) whole CLI wall time: ``onnxsparse run M -p prune -o A`` + ``onnxsparse check A`` vs
      ``polygraphy surgeon prune M -o B`` + ``polygraphy inspect sparsity B`` (fresh processes).
It also checks that both tools zero the same entries on every layer both handle (random weights: no ties).

Goals (issue 4): pass >= 100x faster, CLI >= 5x faster.

Usage: ``python tools/bench_prune.py [--repeat 3] [--workdir DIR] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

F = TensorProto.FLOAT


class _Net:
    """Builds a YOLOv8n-like graph; every Conv is followed by SiLU (BatchNorm folded into the conv bias)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def conv(self, x: str, c_in: int, c_out: int, k: int = 1, s: int = 1, act: bool = True, name: str = "") -> str:
        name = name or self._name("conv")
        w = self.rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))
        self.inits.append(nh.from_array(w.astype(np.float32), f"{name}.weight"))
        self.inits.append(nh.from_array((0.01 * self.rng.standard_normal(c_out)).astype(np.float32), f"{name}.bias"))
        y = f"{name}.out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight", f"{name}.bias"],
                [y],
                name=name,
                kernel_shape=[k, k],
                strides=[s, s],
                pads=[k // 2] * 4,
            )
        )
        if not act:
            return y
        sig, out = f"{name}.sig", f"{name}.silu"
        self.nodes.append(helper.make_node("Sigmoid", [y], [sig]))
        self.nodes.append(helper.make_node("Mul", [y, sig], [out]))
        return out

    def concat(self, xs: list[str]) -> str:
        out = self._name("cat")
        self.nodes.append(helper.make_node("Concat", xs, [out], axis=1))
        return out

    def c2f(self, x: str, c_in: int, c_out: int, n: int, shortcut: bool = True) -> str:
        h = c_out // 2
        y = self.conv(x, c_in, c_out)
        split = self._name("split")
        sizes = self._name("split_sizes")
        self.inits.append(nh.from_array(np.array([h, h], np.int64), sizes))
        a, b = f"{split}.a", f"{split}.b"
        self.nodes.append(helper.make_node("Split", [y, sizes], [a, b], axis=1))
        outs, cur = [a, b], b
        for _ in range(n):
            t = self.conv(self.conv(cur, h, h, 3), h, h, 3)
            if shortcut:
                add = self._name("add")
                self.nodes.append(helper.make_node("Add", [cur, t], [add]))
                t = add
            outs.append(t)
            cur = t
        return self.conv(self.concat(outs), (2 + n) * h, c_out)

    def sppf(self, x: str, c: int) -> str:
        h = c // 2
        y = self.conv(x, c, h)
        pools = [y]
        for _ in range(3):
            p = self._name("pool")
            self.nodes.append(helper.make_node("MaxPool", [pools[-1]], [p], kernel_shape=[5, 5], pads=[2] * 4))
            pools.append(p)
        return self.conv(self.concat(pools), 4 * h, c)

    def up(self, x: str) -> str:
        out = self._name("up")
        if not any(t.name == "up_scales" for t in self.inits):
            self.inits.append(nh.from_array(np.array([1, 1, 2, 2], np.float32), "up_scales"))
        self.nodes.append(helper.make_node("Resize", [x, "", "up_scales"], [out], mode="nearest"))
        return out


def make_yolo_like(seed: int = 0, size: int = 640) -> onnx.ModelProto:
    """A YOLOv8n-shaped detector: ~3.2 M params, 63 Convs."""
    net = _Net(seed)
    x = net.conv("images", 3, 16, 3, 2)
    x = net.conv(x, 16, 32, 3, 2)
    x = net.c2f(x, 32, 32, 1)
    x = net.conv(x, 32, 64, 3, 2)
    p3 = net.c2f(x, 64, 64, 2)
    x = net.conv(p3, 64, 128, 3, 2)
    p4 = net.c2f(x, 128, 128, 2)
    x = net.conv(p4, 128, 256, 3, 2)
    x = net.c2f(x, 256, 256, 1)
    p5 = net.sppf(x, 256)
    n4 = net.c2f(net.concat([net.up(p5), p4]), 384, 128, 1, shortcut=False)
    n3 = net.c2f(net.concat([net.up(n4), p3]), 192, 64, 1, shortcut=False)
    m4 = net.c2f(net.concat([net.conv(n3, 64, 64, 3, 2), n4]), 192, 128, 1, shortcut=False)
    m5 = net.c2f(net.concat([net.conv(m4, 128, 128, 3, 2), p5]), 384, 256, 1, shortcut=False)
    outputs = []
    for i, (feat, c) in enumerate(((n3, 64), (m4, 128), (m5, 256))):
        box = net.conv(net.conv(net.conv(feat, c, 64, 3), 64, 64, 3), 64, 64, act=False)
        cls = net.conv(net.conv(net.conv(feat, c, 80, 3), 80, 80, 3), 80, 80, act=False)
        out = f"head{i}"
        net.nodes.append(helper.make_node("Concat", [box, cls], [out], axis=1))
        outputs.append(helper.make_tensor_value_info(out, F, None))
    graph = helper.make_graph(
        net.nodes, "yolo_like", [helper.make_tensor_value_info("images", F, [1, 3, size, size])], outputs, net.inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_prune")
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def _timed(fn, repeat: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeat`` runs, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _quiet_polygraphy() -> None:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    # Polygraphy's pruner makes numpy warn "overflow encountered in cast" on every group. An "ignore" filter
    # would run the filter search on each of those calls and slow Polygraphy down unfairly; the default
    # action prints it once and caches, as in its CLI.


def bench_passes(model: onnx.ModelProto, repeat: int) -> dict[str, float | int]:
    from polygraphy.tools.sparse import SparsityPruner

    from onnxsparse.ir.model_io import Model
    from onnxsparse.passes.prune import PrunePass
    from onnxsparse.passes.validate import ValidatePass
    from onnxsparse.pipeline import PassContext

    _quiet_polygraphy()
    copies = [_copy(model) for _ in range(repeat)]
    it = iter(copies)
    ours_prune, result = _timed(lambda: PrunePass().run(Model(next(it)), PassContext()), repeat)
    ours_model = result.model.proto  # type: ignore[attr-defined]
    ours_check, report = _timed(lambda: ValidatePass().analyse(Model(ours_model), PassContext()), repeat)
    t0 = time.perf_counter()
    theirs_model = SparsityPruner(_copy(model)).prune()
    poly_prune = time.perf_counter() - t0
    t0 = time.perf_counter()
    checker = SparsityPruner(theirs_model)
    checker.check()
    poly_check = time.perf_counter() - t0
    # Same zeros on every layer both handle?
    ours = {t.name: nh.to_array(t) for t in ours_model.graph.initializer}
    theirs = {t.name: nh.to_array(t) for t in theirs_model.graph.initializer}
    both = [n for n in checker.sparse_tensors if n in ours]
    same = sum(np.array_equal(ours[n], theirs[n]) for n in both)
    summary = report.details["summary"]  # type: ignore[attr-defined]
    return {
        "ours_prune_s": ours_prune,
        "poly_prune_s": poly_prune,
        "ours_check_s": ours_check,
        "poly_check_s": poly_check,
        "layers_sparse": summary["sparse"],
        "layers_eligible": summary["eligible"],
        "layers": summary["layers"],
        "poly_sparse_tensors": len(checker.sparse_tensors),
        "identical_tensors": same,
        "compared_tensors": len(both),
    }


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return elapsed


def bench_cli(model_path: Path, work: Path) -> dict[str, float]:
    bindir = Path(sys.executable).parent
    ours_bin, poly_bin = shutil.which("onnxsparse", path=str(bindir)), shutil.which("polygraphy", path=str(bindir))
    if not ours_bin or not poly_bin:
        raise SystemExit(f"need onnxsparse and polygraphy executables in {bindir}")
    a, b = work / "ours.onnx", work / "poly.onnx"
    ours_run = _run([ours_bin, "run", str(model_path), "-p", "prune", "-o", str(a)])
    ours_check = _run([ours_bin, "check", str(a)])
    poly_run = _run([poly_bin, "surgeon", "prune", str(model_path), "-o", str(b)])
    poly_check = _run([poly_bin, "inspect", "sparsity", str(b)])
    return {"ours_run_s": ours_run, "ours_check_s": ours_check, "poly_prune_s": poly_run, "poly_inspect_s": poly_check}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of our in-process passes (median is reported)")
    ap.add_argument("--workdir", type=Path, help="keep the generated and pruned models here")
    ap.add_argument("--json", type=Path, help="also write the numbers as JSON")
    ap.add_argument("--skip-cli", action="store_true", help="only the in-process comparison")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_prune-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_yolo_like()
    path = work / "yolo_like.onnx"
    onnx.save(model, str(path))
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) == 4)
    convs = sum(1 for n in model.graph.node if n.op_type == "Conv")
    print(f"model: {convs} Conv, {params / 1e6:.2f} M conv params, input 1x3x640x640 ({path})")

    p = bench_passes(model, args.repeat)
    print(f"\n(a) in-process pass time (model in memory; ours: median of {args.repeat})")
    print(
        f"  prune: onnxsparse {p['ours_prune_s'] * 1e3:8.1f} ms   polygraphy {p['poly_prune_s'] * 1e3:9.1f} ms   "
        f"ratio {p['poly_prune_s'] / p['ours_prune_s']:7.1f}x"
    )
    print(
        f"  check: onnxsparse {p['ours_check_s'] * 1e3:8.1f} ms   polygraphy {p['poly_check_s'] * 1e3:9.1f} ms   "
        f"ratio {p['poly_check_s'] / p['ours_check_s']:7.1f}x"
    )
    print(
        f"  onnxsparse: {p['layers_sparse']}/{p['layers_eligible']} eligible layers 2:4 ({p['layers']} total); "
        f"polygraphy finds {p['poly_sparse_tensors']} sparse tensors in its own result; "
        f"identical pruned tensors: {p['identical_tensors']}/{p['compared_tensors']}"
    )
    out: dict[str, object] = {"model": {"convs": convs, "conv_params": params}, "passes": p}
    if not args.skip_cli:
        c = bench_cli(path, work)
        ours, theirs = c["ours_run_s"] + c["ours_check_s"], c["poly_prune_s"] + c["poly_inspect_s"]
        print("\n(b) whole CLI wall time (fresh processes, model on disk)")
        print(f"  onnxsparse run -p prune {c['ours_run_s']:6.2f} s + check {c['ours_check_s']:6.2f} s = {ours:6.2f} s")
        print(
            f"  polygraphy surgeon prune {c['poly_prune_s']:6.2f} s + inspect sparsity {c['poly_inspect_s']:6.2f} s "
            f"= {theirs:6.2f} s"
        )
        print(f"  ratio {theirs / ours:.1f}x")
        out["cli"] = {**c, "ratio": theirs / ours}
    out["pass_ratio"] = p["poly_prune_s"] / p["ours_prune_s"]
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
