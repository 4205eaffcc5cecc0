"""gemm-to-conv's rewrite on onnx-ir: Gemms inside If branches and a Loop body (sibling branches that reuse a value
name, captured outer weights, a body output), readers outside the layer index, and kept weights of a lazily
loaded external-data model written back byte for byte, still external."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import copy_proto, run_ort
from onnx import numpy_helper, parser

from onnxsparse.ir.graph import iter_graphs, iter_nodes, op_counts
from onnxsparse.ir.model_io import Model, load_model, save_model
from onnxsparse.passes.gemm_to_conv import GemmToConvPass
from onnxsparse.pipeline import PassContext, Pipeline

_OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        assert float(np.abs(x - y).max()) / max(float(np.abs(x).max()), 1e-6) <= 1e-5


def _weights(graph: onnx.GraphProto, seed: int, **shapes: tuple[int, ...]) -> None:
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))


def _control_flow_model() -> onnx.ModelProto:
    """If whose branches both write ``h`` with a Gemm (outer captured weight + branch bias; branch-local weight),
    then a Loop whose body output is a Gemm of the carried state (outer weight and bias)."""
    model = parser.parse_model(
        _OPSET
        + """
        g (float[N, 8] x, bool cond) => (float[N, 6] y, float[N, 6] z) {
            y = If (cond) <
                then_branch = then_g () => (float[N, 6] h) {
                    h = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, W_then, C_then)
                },
                else_branch = else_g () => (float[N, 6] h) { h = Gemm (x, W_else) }
            >
            z = Loop (trips, "", y) <body = body_g (int64 i, bool c, float[N, 6] s) => (bool c_out, float[N, 6] s_out) {
                c_out = Identity (c)
                s_out = Gemm <transB = 1> (s, W_loop, C_loop)
            }>
        }
        """
    )
    graph = model.graph
    graph.node[0].name, graph.node[1].name = "branch", "loop"
    then_g, else_g = (a.g for a in graph.node[0].attribute)
    body = graph.node[1].attribute[0].g
    then_g.node[0].name, else_g.node[0].name, body.node[1].name = "fc_then", "fc_else", "fc_loop"
    _weights(graph, 0, W_then=(6, 8), W_loop=(6, 6), C_loop=(6,))
    _weights(then_g, 1, C_then=(1, 6))
    _weights(else_g, 2, W_else=(8, 6))
    graph.initializer.append(numpy_helper.from_array(np.array(3, np.int64), "trips"))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_gemms_in_if_branches_and_loop_body() -> None:
    model = _control_flow_model()
    result = Pipeline([GemmToConvPass()]).run(Model(copy_proto(model)), PassContext())
    out = result.model.proto
    onnx.checker.check_model(out, full_check=True)
    report = result.results[0].report
    assert {c["name"] for c in report.changed} == {"fc_then", "fc_else", "fc_loop"} and not report.skipped
    then_g, else_g = (a.g for a in out.graph.node[0].attribute)
    body = out.graph.node[1].attribute[0].g
    for g in (then_g, else_g, body):  # each Gemm became a Conv in its own graph, its constants beside it
        assert op_counts(g) == {"Reshape": 2, "Conv": 1, "Shape": 1, "Slice": 1, "Concat": 1} | (
            {"Identity": 1} if g is body else {}
        )
        conv = next(n for n in g.node if n.op_type == "Conv")
        local = {t.name for t in g.initializer}
        assert all(name in local for name in conv.input[1:])
    assert [o.name for o in then_g.output] == ["h"] == [o.name for o in else_g.output]  # outputs keep their names
    assert [o.name for o in body.output] == ["c_out", "s_out"]
    # the old weights and biases nobody reads any more are gone, wherever they lived
    names = {t.name for g in iter_graphs(out.graph) for t in g.initializer}
    assert not names & {"W_then", "C_then", "W_else", "W_loop", "C_loop"} and "trips" in names
    for n in (1, 4):
        for cond in (True, False):
            x = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
            feeds = {"x": x, "cond": np.array(cond)}
            _close(run_ort(model, feeds), run_ort(out, feeds))


def test_readers_outside_the_layer_index_keep_the_weight() -> None:
    """A weight that an Add reads too, or that is a graph output, is shared: the Gemm stays."""
    model = parser.parse_model(
        _OPSET
        + """
        g (float[N, 4] x) => (float[N, 4] y, float[4, 4] s, float[N, 4] y2, float[4, 4] W_out) {
            y = Gemm (x, W_add)
            s = Add (W_add, W_add)
            y2 = MatMul (x, W_out)
        }
        """
    )
    model.graph.node[0].name, model.graph.node[2].name = "fc_add", "mm_out"
    _weights(model.graph, 0, W_add=(4, 4), W_out=(4, 4))
    onnx.checker.check_model(model, full_check=True)
    result = Pipeline([GemmToConvPass()]).run(Model(copy_proto(model)), PassContext())
    skipped = {s["name"]: s["reason"] for s in result.results[0].report.skipped}
    assert skipped == {
        "fc_add": "weight 'W_add' is shared with another consumer",
        "mm_out": "weight 'W_out' is shared with another consumer",
    }
    assert not result.modified
    assert op_counts(result.model.proto.graph) == op_counts(model.graph)


def _external_model(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Conv (kept) → Flatten → Gemm (rewritten) → Gemm with transA (kept, so batch 2 is fixed), every weight in a
    .data file."""
    model = parser.parse_model(
        _OPSET
        + """
        g (float[2, 3, 4, 4] x) => (float[16, 5] y) {
            c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W_conv, B_conv)
            f = Flatten (c)
            h = Gemm <transB = 1> (f, W_fc, C_fc)
            y = Gemm <transA = 1> (h, W_ta)
        }
        """
    )
    for node, name in zip(model.graph.node, ("conv", "flatten", "fc", "fc_ta"), strict=True):
        node.name = name
    _weights(model.graph, 0, W_conv=(4, 3, 3, 3), B_conv=(4,), W_fc=(16, 64), C_fc=(16,), W_ta=(2, 5))
    onnx.checker.check_model(model, full_check=True)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    path = folder / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    return path, arrays


def test_kept_weights_of_an_external_model_stay_external_and_byte_identical(tmp_path: Path) -> None:
    src, arrays = _external_model(tmp_path)
    model = load_model(src, lazy=True)
    result = Pipeline([GemmToConvPass()]).run(model, PassContext())
    assert {c["name"] for c in result.results[0].report.changed} == {"fc"}
    (tmp_path / "out").mkdir()
    out = save_model(result.model, tmp_path / "out" / "conv.onnx")
    saved = onnx.load(str(out), load_external_data=False)
    stored = {t.name: t for t in saved.graph.initializer}
    assert not {"W_fc", "C_fc"} & set(stored)  # folded into the Conv weight and bias
    for name in ("W_conv", "B_conv", "W_ta"):  # untouched: still external, the same bytes
        assert stored[name].data_location == onnx.TensorProto.EXTERNAL
    full = onnx.load(str(out))
    values = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
    for name in ("W_conv", "B_conv", "W_ta"):
        assert values[name].dtype == arrays[name].dtype and values[name].tobytes() == arrays[name].tobytes()
    onnx.checker.check_model(str(out), full_check=True)
    for seed in (1, 2):
        feeds = {"x": np.random.default_rng(seed).standard_normal((2, 3, 4, 4)).astype(np.float32)}
        _close(run_ort(str(src), feeds), run_ort(str(out), feeds))


@pytest.mark.parametrize("lazy", [True, False])
def test_inline_model_weights_stay_inline(tmp_path: Path, lazy: bool) -> None:
    src, arrays = _external_model(tmp_path)
    inline = tmp_path / "inline.onnx"
    onnx.save(onnx.load(str(src)), str(inline))
    result = Pipeline([GemmToConvPass()]).run(load_model(inline, lazy=lazy), PassContext())
    (tmp_path / "out").mkdir()
    out = save_model(result.model, tmp_path / "out" / "conv.onnx")
    saved = onnx.load(str(out), load_external_data=False)
    assert not list(tmp_path.joinpath("out").glob("*.data"))
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in saved.graph.initializer)
    values = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    for name in ("W_conv", "B_conv", "W_ta"):
        assert values[name].tobytes() == arrays[name].tobytes()
    assert [n.op_type for _, n in iter_nodes(saved.graph)].count("Conv") == 2
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)}
    _close(run_ort(str(inline), feeds), run_ort(str(out), feeds))
