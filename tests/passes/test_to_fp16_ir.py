"""to-fp16 on its onnx-ir path (``onnxsparse.ir.onnxir.IrView``): subgraph weights, kept tensors, the proto and
the layer index after the rewrite.

The conversion plans on ``ir.Value`` / ``ir.Node`` objects and writes the result back into the same
``ModelProto``. These tests check what that path must keep: weights stay in the graph that held them (If
branches, Loop bodies, outer weights read inside subgraphs), pruned zeros stay zero, tensors the pass does not
convert are the very objects they were (not copied), external data round-trips, the layer index is rebuilt
after a change and kept after a no-op. Numerics against float32 use ``REL_TOL`` of ``test_to_fp16`` (its
docstring derives it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES_DIR, REPO_ROOT, copy_proto, make_feeds, run_ort
from onnx import TensorProto as T
from onnx import numpy_helper as nh
from test_to_fp16 import REL_TOL, _assert_no_cast_chains, _rel, cnn

from onnxsparse.ir.graph import iter_graphs, iter_graphs_with_path
from onnxsparse.ir.index import layer_index
from onnxsparse.ir.layers import find_layers
from onnxsparse.ir.model_io import Model, load_model, save_model
from onnxsparse.ir.tensors import external_info, to_array
from onnxsparse.passes.to_fp16 import ToFp16Pass
from onnxsparse.pipeline import PassContext, Pipeline

SUBGRAPH_FIXTURES = ("if_model", "loop_model")


def _weights_by_graph(m: onnx.ModelProto, model: Model | None = None) -> dict[str, dict[str, np.ndarray]]:
    """graph path → initializer name → values (read through ``model``'s store when given)."""
    return {
        path: {t.name: np.asarray(to_array(t, model) if model else nh.to_array(t)) for t in g.initializer}
        for path, g in iter_graphs_with_path(m.graph)
    }


def _feeds(m: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Two seeds; for a model with a bool input (the If's condition) both branches."""
    bool_input = any(i.type.tensor_type.elem_type == T.BOOL for i in m.graph.input)
    conds = (True, False) if bool_input else (True,)
    return [make_feeds(m, seed=s, cond=c) for s in (0, 1) for c in conds]


@pytest.mark.parametrize("name", SUBGRAPH_FIXTURES)
def test_pruned_subgraph_model_keeps_its_zeros_and_weights_in_their_graphs(name: str) -> None:
    """prune 2:4, then to-fp16 on If/Loop models: every weight — main graph, branch, body, an outer weight read
    only inside a branch — is float16 in the graph that held it, with exactly its zeros; the 2:4 pattern still
    checks out; the full checker passes; ORT gives the pruned float32 model's outputs within REL_TOL."""
    model = load_model(FIXTURES_DIR / f"{name}.onnx")
    pruned = Pipeline("prune").run(model)
    assert pruned.results[0].modified
    ref = copy_proto(model.proto)
    before = _weights_by_graph(ref)
    pruned_layers = [layer.name for layer in find_layers(ref) if layer.check_pattern(4) is None]
    assert pruned_layers, "the fixture has 2:4 layers after prune"

    proto = model.proto
    res = Pipeline("to-fp16").run(model)
    assert res.results[0].modified and res.model.proto is proto  # in place: the same ModelProto
    out = res.model.proto
    onnx.checker.check_model(out, full_check=True)
    _assert_no_cast_chains(out)
    after = _weights_by_graph(out)
    for path, weights in before.items():
        floats = {k: v for k, v in weights.items() if v.dtype == np.float32}
        assert floats, path
        for k, v in floats.items():
            assert k in after[path], (path, k)  # the weight stayed in its graph, under its name
            assert after[path][k].dtype == np.float16, (path, k)
            np.testing.assert_array_equal(after[path][k] == 0, v == 0, err_msg=f"{path}/{k}")
    layers = {layer.name: layer for layer in find_layers(out)}
    for lname in pruned_layers:
        assert layers[lname].check_pattern(4) is None, lname
    for feeds in _feeds(ref):
        want, got = run_ort(ref, feeds), run_ort(out, feeds)
        for a, b in zip(want, got, strict=True):
            assert b.dtype == a.dtype == np.float32
            assert _rel(a, b) < REL_TOL, (name, _rel(a, b))
        assert not all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))  # it did change precision


@pytest.mark.parametrize("name", SUBGRAPH_FIXTURES)
def test_subgraph_model_with_external_data_converts_saves_and_reloads(name: str, tmp_path: Path) -> None:
    """Every weight (subgraph ones too) saved outside the protobuf: the IR view reads them through the
    model's store, the converted model saves with external data, reloads and runs like the float32 one."""
    src = tmp_path / "ext.onnx"
    original = onnx.load(str(FIXTURES_DIR / f"{name}.onnx"))
    save_model(Model(proto=copy_proto(original)), src, external_data=True)
    m = load_model(src)
    assert m.has_external_data()
    res = Pipeline("to-fp16").run(m)
    assert res.results[0].modified
    dst = save_model(res.model, tmp_path / "ext16.onnx", external_data=True)
    out = onnx.load(str(dst))  # with its external data
    onnx.checker.check_model(out, full_check=True)
    floats = {p: {k for k, v in w.items() if v.dtype == np.float32} for p, w in _weights_by_graph(original).items()}
    for path, weights in _weights_by_graph(out).items():
        assert floats[path] and {k for k, v in weights.items() if v.dtype == np.float16} == floats[path], path
    for feeds in _feeds(original):
        for a, b in zip(run_ort(original, feeds), run_ort(out, feeds), strict=True):
            assert _rel(a, b) < REL_TOL, (name, _rel(a, b))


def test_tensors_the_pass_keeps_are_the_same_objects_and_bytes() -> None:
    """The Q/DQ fixture's int8 weights and zero points are not float: to-fp16 keeps them, so after the pass
    they are the very ``TensorProto`` objects of the model (not copies), with the same bytes."""
    m = onnx.load(str(FIXTURES_DIR / "qdq_model.onnx"))
    model = Model(proto=m)
    kept = {t.name: t for t in m.graph.initializer if t.data_type != T.FLOAT}
    raw = {name: bytes(t.raw_data) for name, t in kept.items()}
    assert len(kept) >= 8
    res = ToFp16Pass().run(model, PassContext())
    assert res.modified
    now = {t.name: t for t in m.graph.initializer}
    for name, t in kept.items():
        assert now[name] is t, name
        assert bytes(now[name].raw_data) == raw[name], name
    assert {t.data_type for t in m.graph.initializer if t.name not in kept} == {T.FLOAT16}


def test_kept_external_tensors_still_point_at_their_bytes(tmp_path: Path) -> None:
    """Lazy external weights the pass keeps (int8) are not read, moved or spilled: their external_data entries
    are unchanged; the converted ones are new tensors. The saved result runs within the Q/DQ bound."""
    src = tmp_path / "qdq.onnx"
    original = onnx.load(str(FIXTURES_DIR / "qdq_model.onnx"))
    save_model(Model(proto=copy_proto(original)), src, external_data=True)
    model = load_model(src)
    ext = {t.name: [(e.key, e.value) for e in t.external_data] for t in model.proto.graph.initializer}
    int8 = [t.name for t in model.proto.graph.initializer if t.data_type == T.INT8 and external_info(t) is not None]
    assert int8
    res = Pipeline("to-fp16").run(model)
    assert res.results[0].modified
    now = {t.name: t for t in model.proto.graph.initializer}
    for name in int8:
        assert [(e.key, e.value) for e in now[name].external_data] == ext[name], name
    out = onnx.load(str(save_model(model, tmp_path / "qdq16.onnx")))
    onnx.checker.check_model(out, full_check=True)
    dtypes = {t.name: t.data_type for t in original.graph.initializer}
    for t in out.graph.initializer:
        assert t.data_type == (T.FLOAT16 if dtypes[t.name] == T.FLOAT else dtypes[t.name]), t.name


def test_layer_index_is_rebuilt_after_a_change_and_kept_after_a_no_op() -> None:
    """``keep-io-types=false`` and no blocked op: no node or initializer is added, so only the pass's own
    invalidation can make the cached index go; the rebuilt one sees float16 weights. A second run changes
    nothing and keeps the index."""
    model = Model(proto=cnn())
    first = layer_index(model)
    assert model.layer_cache.builds == 1 and layer_index(model) is first
    n_nodes, n_inits = len(model.proto.graph.node), len(model.proto.graph.initializer)
    res = ToFp16Pass(keep_io_types=False, block_ops=()).run(model, PassContext())
    assert res.modified
    assert (len(model.proto.graph.node), len(model.proto.graph.initializer)) == (n_nodes, n_inits)
    second = layer_index(model)
    assert second is not first and model.layer_cache.builds == 2
    weights = {t.name: t for t in model.proto.graph.initializer}
    assert {weights[layer.weight_name].data_type for layer in second.layers} == {T.FLOAT16}
    again = ToFp16Pass(keep_io_types=False, block_ops=()).run(model, PassContext())
    assert again.modified is False
    assert layer_index(model) is second and model.layer_cache.builds == 2


def test_every_graph_stays_topologically_sorted_without_a_sort() -> None:
    """Casts are inserted right after what they read (or first, for a graph input), in the graph that defines
    the value: each node's inputs are defined before it, in its graph or an enclosing one. (``Pipeline.run``
    sorts at the end; the pass alone must not need it.)"""
    from test_to_fp16 import control_flow

    out = ToFp16Pass().run(Model(proto=control_flow()), PassContext()).model.proto  # no Pipeline: it would sort

    def check(g: onnx.GraphProto, outer: set[str]) -> None:
        known = outer | {i.name for i in g.input} | {t.name for t in g.initializer}
        for node in g.node:
            missing = [n for n in node.input if n and n not in known]
            assert not missing, (g.name, node.name, missing)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    check(a.g, known)
            known |= set(node.output)

    check(out.graph, set())
    assert sum(n.op_type == "Cast" for g in iter_graphs(out.graph) for n in g.node) >= 3


@pytest.mark.parametrize("module", ["onnxsparse/fp16.py", "onnxsparse/fp16_types.py"])
def test_conversion_keeps_no_identity_keyed_maps(module: str) -> None:
    """Structural guard for the issue's rule (behaviour is tested above): the conversion never calls ``id()``
    and builds no producer/reader map of its own (``ir.Value.producer()`` and ``uses()`` answer that)."""
    tree = ast.parse((REPO_ROOT / module).read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "id" not in calls
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not imported & {"producers", "consumers", "GraphIndex", "use_counts", "toposort"}


def test_model_without_float32_is_left_alone() -> None:
    """Nothing float32 to convert (an int64 graph): not modified, the proto untouched, the report's counts 0."""
    m = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (int64[3] x) => (int64[3] y) { s = Add(x, x)\n y = Mul(s, x) }'
    )
    before = m.SerializeToString()
    res = ToFp16Pass().run(Model(proto=m), PassContext())
    assert res.modified is False and m.SerializeToString() == before
    assert res.report.details["nodes_converted"] == 0 and res.report.details["casts_inserted"] == 0
