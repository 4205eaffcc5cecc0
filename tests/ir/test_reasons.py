"""Skip reasons are codes: each renders today's sentence, prune matches the code, no module compares the text."""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxsparse.ir.layers import find_layers
from onnxsparse.ir.model_io import Model
from onnxsparse.ir.reasons import Reason, Skip, code_key, render
from onnxsparse.passes.prune import PrunePass
from onnxsparse.pipeline import PassContext

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("code", list(Reason), ids=lambda c: c.name)
def test_every_reason_renders_with_its_details(code: Reason) -> None:
    fields = [f for _, f, _, _ in string.Formatter().parse(code.value) if f]
    skip = code.skip(**{f: f"<{f}>" for f in fields})
    text = str(skip)
    assert "{" not in text and all(f"<{f}>" in text for f in fields)
    assert skip.to_dict() == {"code": code.name, "reason": text} and code_key(skip) == {"code": code.name}
    assert hash(skip) == hash(code.skip(**{f: f"<{f}>" for f in fields}))  # groupable in reports
    if fields:
        with pytest.raises(KeyError):
            Skip(code)  # a missing detail fails where the Skip is made


def test_rendered_text_is_the_old_sentence() -> None:
    assert str(Reason.RESHAPE_SHAPE_UNKNOWN.skip()) == "weight shape after its Reshape is unknown"
    assert str(Reason.WEIGHT_COMPUTED.skip(op="Add", node="a")) == "weight is computed at run time by Add 'a'"
    assert str(Reason.NOT_DIVISIBLE.skip(what="K", size=6, m=4)) == "K=6 is not divisible by 4"
    assert str(Reason.WEIGHT_RANK.skip(op="MatMul", rank=1)) == "MatMul weight has rank 1"
    assert render(None, "no constant weight") == "no constant weight" and code_key("free text") == {}


def _computed_reshape_target() -> onnx.ModelProto:
    """A MatMul weight behind a Reshape whose target is a Concat: only inferred shapes give its shape."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Concat", ["d0", "d1"], ["shape"], axis=0, name="cat"),
        helper.make_node("Reshape", ["w", "shape"], ["w2"], name="reshape"),
        helper.make_node("MatMul", ["x", "w2"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])],
        [
            nh.from_array(rng.standard_normal((8, 12)).astype(np.float32), "w"),
            nh.from_array(np.array([8], np.int64), "d0"),
            nh.from_array(np.array([12], np.int64), "d1"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_prune_retries_with_shapes_on_the_code_not_the_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """The special case (re-run discovery with inferred shapes) keys on RESHAPE_SHAPE_UNKNOWN: with every
    reason rendering as other text, prune still finds the weight's shape and prunes it."""
    proto = _computed_reshape_target()
    (layer,) = find_layers(proto)
    assert layer.reason is not None and layer.reason.code is Reason.RESHAPE_SHAPE_UNKNOWN
    monkeypatch.setattr(Skip, "__str__", lambda self: "reworded")
    result = PrunePass().run(Model(proto), PassContext())
    assert result.modified and [c["name"] for c in result.report.changed] == ["w"]
    w = nh.to_array(next(t for t in result.model.proto.graph.initializer if t.name == "w"))
    assert (np.count_nonzero(w.reshape(2, 4, 12), axis=1) <= 2).all()  # 2:4 along K (axis 0)


def test_no_module_compares_reason_text() -> None:
    """Code matches ``reason.code``; a comparison of a reason with a string literal is the old bug back."""
    pattern = re.compile(
        r"reason\)?\s*[!=]=\s*[\"']|[\"']\s*[!=]=\s*\w*\.?reason\b|[\"'][^\"']*[\"']\s+in\s+\S*reason\b"
    )
    offenders = []
    for path in [*(ROOT / "onnxsparse").rglob("*.py"), *(ROOT / "passes").rglob("*.py")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
