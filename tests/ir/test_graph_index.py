"""GraphIndex: producers and readers by value name, the same answers on a copied proto, subgraph captures."""

from __future__ import annotations

import onnx
from builders import gemm_cases, if_model

from onnxsparse.ir.graph import GraphIndex, consumers, iter_graphs


def test_producers_and_uses_match_a_scan_of_the_graph() -> None:
    graph = gemm_cases().graph
    index = GraphIndex(graph)
    for node in graph.node:
        for k, o in enumerate(node.output):
            assert index.producer(o) is node and index.producer_slot(o) == (node, k) and o in index
    for t in graph.initializer:
        assert index.producer(t.name) is None and t.name not in index
        expected = [(n, i) for n in graph.node for i, name in enumerate(n.input) if name == t.name]
        assert [(id(n), i) for n, i in index.uses(t.name)] == [(id(n), i) for n, i in expected]
    assert index.uses("no such value") == [] and index.producer("no such value") is None


def test_keys_are_names_so_a_copy_answers_the_same() -> None:
    proto = gemm_cases()
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    a, b = GraphIndex(proto.graph), GraphIndex(copy.graph)
    for node in proto.graph.node:
        for o in node.output:
            pa, pb = a.producer(o), b.producer(o)
            assert pa is not None and pb is not None and pa is not pb and pa == pb


def test_subgraph_captures_and_nested_index() -> None:
    proto = if_model()
    top = GraphIndex(proto.graph)
    captured = {name: nodes for name, nodes in consumers(proto.graph).items()}
    assert captured and all(top.consumers(name) == nodes for name, nodes in captured.items())
    if_node = next(n for n in proto.graph.node if n.op_type == "If")
    outer_reads = [name for name, nodes in captured.items() if if_node in nodes and name not in if_node.input]
    assert outer_reads, "the If body reads a name of the main graph"
    nested = GraphIndex(proto.graph, nested=True)
    for g in iter_graphs(proto.graph):
        for node in g.node:
            for o in node.output:
                assert nested.producer(o) is node and nested.graph_of(o) is g
        for t in g.initializer:
            assert nested.graph_of(t.name) is not None
    body_outputs = [o for g in list(iter_graphs(proto.graph))[1:] for n in g.node for o in n.output]
    assert body_outputs and all(o not in top for o in body_outputs)
