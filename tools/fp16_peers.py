"""Run to-fp16 and the float16 converters it was not built on, on to-fp16's own test models.

    pip install --target /tmp/occ --no-deps onnxconverter-common     # not a dependency of onnxsparse
    PYTHONPATH=/tmp/occ .venv/bin/python tools/fp16_peers.py

Per (model, converter): does ``onnx.checker.check_model(full_check=True)`` accept the result, how many Casts
(on weights, feeding another Cast), does ONNX Runtime load it, and the relative error of its first output
against the float32 model on seeded inputs. Converters: onnxconverter-common's ``convert_float_to_float16``,
onnxruntime's modified copy of it (``onnxruntime.transformers.float16``), and ``to-fp16``; all keep the
model's inputs and outputs float32. The models are built by ``tests/passes/test_to_fp16.py`` (two more here).
The why-not paragraph of ``passes/to_fp16.py`` quotes this script's output.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "passes")]

import test_to_fp16 as cases  # noqa: E402
from conftest import copy_proto, make_feeds  # noqa: E402

from onnxsparse.ir.model_io import Model  # noqa: E402
from onnxsparse.pipeline import Pipeline  # noqa: E402


def resize_opset13() -> onnx.ModelProto:
    """Conv → Resize (float32-only ``scales`` at opset 13) → Relu, as in the to-fp16 test."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Resize", ["c", "", "scales"], ["r"], mode="nearest", name="resize"),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 10])],
        [
            numpy_helper.from_array((rng.standard_normal((4, 4, 1, 1)) * 0.1).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def topk_shared_weight() -> onnx.ModelProto:
    """A weight read by a MatMul and an Add whose result feeds TopK (on onnxconverter-common's block list)."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("Add", ["w", "a"], ["b"]),
        helper.make_node("TopK", ["b", "k"], ["v", "i"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, [4, 2])],
        [
            numpy_helper.from_array((rng.standard_normal((4, 4)) * 0.1).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([2], np.int64), "k"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "dequantize_opset13": lambda: cases.qdq_conv(13),
    "resize_opset13": resize_opset13,
    "cnn": cases.cnn,
    "control_flow": cases.control_flow,
    "topk_shared_weight": topk_shared_weight,
}


def converters() -> dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]]:
    from onnxconverter_common import __version__ as occ_version
    from onnxconverter_common.float16 import convert_float_to_float16 as occ
    from onnxruntime.transformers.float16 import convert_float_to_float16 as ort_copy

    return {
        f"onnxconverter-common {occ_version}": lambda m: occ(m, keep_io_types=True),
        f"onnxruntime {ort.__version__} transformers.float16": lambda m: ort_copy(m, keep_io_types=True),
        "onnxsparse to-fp16": lambda m: Pipeline("to-fp16").run(Model(proto=m)).model.proto,
    }


def _first_line(e: Exception, n: int) -> str:
    return str(e).splitlines()[0][:n] if str(e) else type(e).__name__


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(a64), 1e-30))


def row(ref: onnx.ModelProto, convert: Callable[[onnx.ModelProto], onnx.ModelProto]) -> list[str]:
    """What one converter makes of one model."""
    dims = {d.dim_param: 2 for vi in ref.graph.input for d in vi.type.tensor_type.shape.dim if d.dim_param}
    feeds = make_feeds(ref, dims=dims)
    opts = ["CPUExecutionProvider"]
    want = ort.InferenceSession(ref.SerializeToString(), providers=opts).run(None, feeds)[0]
    try:
        out = convert(copy_proto(ref))
    except Exception as e:  # a peer's failure is a result here
        return ["convert failed: " + _first_line(e, 120)]
    cells = []
    try:
        onnx.checker.check_model(out, full_check=True)
        cells.append("checker ok")
    except Exception as e:
        cells.append("checker: " + _first_line(e, 100))
    weights = {t.name for t in out.graph.initializer}
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    made_by_cast = {o for n in casts for o in n.output}
    on_weights = sum(n.input[0] in weights for n in casts)
    chains = sum(n.input[0] in made_by_cast for n in casts)
    cells.append(f"{len(casts)} Cast ({on_weights} on weights, {chains} Cast->Cast)")
    try:
        got = ort.InferenceSession(out.SerializeToString(), providers=opts).run(None, feeds)[0]
        cells.append(f"ORT ok, rel err {_rel(want, got):.1e}")
    except Exception as e:
        cells.append("ORT: " + _first_line(e, 160))
    return cells


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    for model_name, make in MODELS.items():
        for conv_name, convert in converters().items():
            print(" | ".join([model_name, conv_name, *row(make(), convert)]))


if __name__ == "__main__":
    main()
