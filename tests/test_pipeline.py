"""Pass manager: registry, text grammar ↔ API objects, honest ``modified``, cleanup/toposort, gate failures."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import pytest
from builders import gemm_cases, matmul_ranks

from onnxsparse.errors import GateFailure, OnnxSparseError
from onnxsparse.grammar import _split_top, parse_pipeline, registry
from onnxsparse.ir.graph import toposort
from onnxsparse.ir.model_io import Model
from onnxsparse.passes.gemm_to_conv import GemmToConvConfig, GemmToConvPass
from onnxsparse.pipeline import Pass, PassConfig, PassContext, PassResult, Pipeline, option


def test_registry_is_keyed_by_cli_name() -> None:
    reg = registry()
    assert reg["gemm-to-conv"] is GemmToConvPass
    for name, cls in reg.items():
        assert cls.name == name and cls.summary


def test_text_parses_into_the_same_objects_as_the_api() -> None:
    (p,) = parse_pipeline("gemm-to-conv{exclude='head\\..*';include=\"fc_(a|b),x{1,3}\"}")
    assert isinstance(p, GemmToConvPass)
    assert p.config == GemmToConvConfig(exclude="head\\..*", include="fc_(a|b),x{1,3}")
    assert parse_pipeline(p.text())[0].config == p.config  # round trip
    assert Pipeline("gemm-to-conv").text() == "gemm-to-conv"


def test_split_respects_braces_and_quotes() -> None:
    assert _split_top("a{x=1,2},b{y='c,d'},c", ",") == ["a{x=1,2}", "b{y='c,d'}", "c"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("nosuchpass", "unknown pass 'nosuchpass'"),
        ("gemm-to-conv{bogus=1}", "has no option 'bogus'"),
        ("gemm-to-conv{exclude}", "expected key=value"),
        ("gemm-to-conv{exclude=a", "unbalanced"),
        ("gemm-to-conv{exclude='a}", "unterminated quote"),
        ("", "empty pipeline"),
    ],
)
def test_grammar_errors_are_one_line(text: str, message: str) -> None:
    with pytest.raises(OnnxSparseError, match=message) as info:
        parse_pipeline(text)
    assert "\n" not in str(info.value)


@dataclass(frozen=True)
class _GateConfig(PassConfig):
    fail: bool = option(True, "fail the gate")


class _Gate(Pass[_GateConfig]):
    """A test-only pass standing in for validate's gate."""

    name = "test-gate"
    config_cls = _GateConfig
    summary = "test"
    in_place = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.config.fail:
            raise GateFailure("coverage 0.1 < 0.9")
        return PassResult(model, modified=False)


def test_gate_failure_stops_the_pipeline_after_earlier_passes() -> None:
    with pytest.raises(GateFailure) as info:
        Pipeline([GemmToConvPass(), _Gate()]).run(Model(gemm_cases()))
    result = info.value.result  # type: ignore[attr-defined]
    assert [r.name for r in result.results] == ["gemm-to-conv"]


def test_pipeline_records_provenance_timing_and_ops() -> None:
    result = Pipeline([GemmToConvPass()]).run(Model(matmul_ranks()))
    props = {p.key: p.value for p in result.model.proto.metadata_props}
    assert props["onnxsparse.pipeline"] == "gemm-to-conv"
    assert "onnxsparse.version" in props
    assert result.ops_before["MatMul"] == 2 and result.ops_after.get("MatMul", 0) == 0
    assert result.results[0].seconds >= 0
    onnx.checker.check_model(result.model.proto, full_check=True)


def test_toposort_fixes_order() -> None:
    model = matmul_ranks()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    toposort(model.graph)
    onnx.checker.check_model(model, full_check=True)


def test_config_and_options_are_exclusive() -> None:
    with pytest.raises(TypeError):
        GemmToConvPass(GemmToConvConfig(), exclude="x")
