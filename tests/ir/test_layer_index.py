"""The weighted-layer index: built once per model state, dropped by passes that change the graph, kept by prune,
and always equal to ``find_layers`` on a fresh copy of the proto."""

from __future__ import annotations

from typing import Any

import onnx
from builders import gemm_cases, if_model

from onnxsparse.ir.index import layer_index, model_layers
from onnxsparse.ir.layers import Layer, find_layers
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.shapes import infer_shapes
from onnxsparse.passes.gemm_to_conv import GemmToConvPass
from onnxsparse.passes.prune import PrunePass
from onnxsparse.pipeline import Pass, PassResult, Pipeline


def _sig(layers: list[Layer]) -> list[tuple[Any, ...]]:
    """What a layer says, without proto object identity (so two protos can be compared)."""
    return [
        (
            layer.name,
            layer.op_type,
            layer.graph_path,
            layer.weight_name,
            layer.weight_shape,
            layer.reduction_axis,
            layer.channel_axis,
            layer.source_reduction_axis,
            layer.source_channel_axis,
            None if layer.reason is None else (layer.reason.code, str(layer.reason)),
            [n.op_type for n in layer.chain],
            layer.shared_with,
        )
        for layer in layers
    ]


def _fresh(model: Model, shapes: dict | None = None) -> list[Layer]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model.proto)
    return find_layers(copy, shapes)


def test_two_lookups_build_once_per_shapes() -> None:
    model = Model(gemm_cases())
    first = model_layers(model)
    second = model_layers(model)
    assert model.layer_cache.builds == 1 and first is not second  # a new list each time, the same layers
    assert all(a is b for a, b in zip(first, second, strict=True))
    shapes = infer_shapes(model.proto)
    with_shapes = model_layers(model, shapes)
    assert model.layer_cache.builds == 2 and model_layers(model, dict(shapes)) == with_shapes
    assert model.layer_cache.builds == 2
    assert _sig(first) == _sig(_fresh(model)) and _sig(with_shapes) == _sig(_fresh(model, shapes))
    assert layer_index(model).get(first[0].name) is first[0]


def test_a_replaced_proto_is_never_answered_from_the_old_index() -> None:
    model = Model(gemm_cases())
    model_layers(model)
    model.proto = if_model()
    assert _sig(model_layers(model)) == _sig(_fresh(model)) and model.layer_cache.builds == 2


def _run_watching(model: Model, p: Pass[Any]) -> tuple[int, PassResult]:
    """Run ``p`` in a pipeline and return how many builds the index needs right after it (0: still valid)."""
    seen: dict[str, int] = {}

    def after(_: Pass[Any], result: PassResult) -> None:
        before = result.model.layer_cache.builds
        layers = model_layers(result.model)
        seen["builds"] = result.model.layer_cache.builds - before
        assert _sig(layers) == _sig(_fresh(result.model))

    result = Pipeline([p]).run(model, on_pass=after)
    return seen["builds"], result.results[0]


def test_gemm_to_conv_invalidates_and_the_rebuilt_index_sees_the_convs() -> None:
    model = Model(gemm_cases())
    before = model_layers(model)
    assert {layer.op_type for layer in before} >= {"Gemm"}
    rebuilt, result = _run_watching(model, GemmToConvPass())
    assert result.modified and rebuilt == 1
    ops = [layer.op_type for layer in model_layers(result.model)]
    assert "Conv" in ops and _sig(model_layers(result.model)) == _sig(_fresh(result.model))


def test_prune_keeps_the_index() -> None:
    model = Model(gemm_cases())
    model_layers(model)
    rebuilt, result = _run_watching(model, PrunePass())
    assert result.modified and result.report.changed and rebuilt == 0
    # after the pipeline's final cleanup + toposort (which copy nodes and tensors) it is rebuilt, and right
    assert _sig(model_layers(result.model)) == _sig(_fresh(result.model))
