"""The pass contract ``Pipeline.run`` checks: ``requires`` before any work, ``ensures`` after it, the declared
in-place vs functional behaviour, and ``modified`` computed from what each pass changed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import copy_proto, make_feeds, run_ort
from onnx import parser

from onnxsparse.errors import OnnxSparseError
from onnxsparse.ir.model_io import Model
from onnxsparse.passes.finetune import FinetunePass
from onnxsparse.passes.gemm_to_conv import GemmToConvPass
from onnxsparse.passes.prune import PrunePass
from onnxsparse.passes.qdq import QdqPass
from onnxsparse.passes.to_fp16 import ToFp16Pass
from onnxsparse.passes.validate import ValidatePass
from onnxsparse.pipeline import Pass, PassConfig, PassContext, PassContractError, PassResult, Pipeline
from onnxsparse.sparsity import is_nm


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """x[2, 8] → MatMul(w: dense 8x8) → Relu → y."""
    w = ",".join(str(float(v)) for v in np.random.default_rng(seed).standard_normal(64).round(3))
    return parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] x) => (float[2, 8] y) <float[8, 8] w = {{{w}}}> {{
          h = MatMul(x, w)
          y = Relu(h)
        }}"""
    )


def _no_layers() -> onnx.ModelProto:
    """Nothing for any pass to act on: no weighted layer, no float tensor."""
    return parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[2] x) => (int64[2] y) {
          y = Neg(x)
        }"""
    )


def _relu() -> onnx.ModelProto:
    """Float, but no weighted layer (qdq has nothing to quantize)."""
    return parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] x) => (float[2, 8] y) {
          y = Relu(x)
        }"""
    )


def _never_run(monkeypatch: pytest.MonkeyPatch, cls: type[Pass[Any]]) -> None:
    """Make ``cls.run`` fail the test: a requirement must stop the pass before it starts."""

    def run(self: Pass[Any], model: Model, ctx: PassContext) -> PassResult:
        raise AssertionError(f"{cls.name}.run was called although a requirement is missing")

    monkeypatch.setattr(cls, "run", run)


def _fails_before_work(p: Pass[Any], proto: onnx.ModelProto, ctx: PassContext, match: str) -> None:
    before = proto.SerializeToString()
    model = Model(proto)
    with pytest.raises(OnnxSparseError, match=match) as err:
        Pipeline([p]).run(model, ctx)
    assert "\n" not in str(err.value)
    assert model.proto.SerializeToString() == before  # the model is untouched


# ---------------------------------------------------------------------------------------------- requires


def test_qdq_requires_calibration_data(monkeypatch: pytest.MonkeyPatch) -> None:
    _never_run(monkeypatch, QdqPass)
    _fails_before_work(QdqPass(), _mlp(), PassContext(), r"^qdq needs calibration data: pass --calib DATA")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_prune_requires_calibration_data(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    _never_run(monkeypatch, PrunePass)
    _fails_before_work(
        PrunePass(method=method), _mlp(), PassContext(), rf"^prune: method={method} needs calibration data"
    )


def test_prune_requires_calibration_for_the_method_its_plan_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pattern": "2:4", "method": "wanda", "layers": ["h"]}))
    _never_run(monkeypatch, PrunePass)
    _fails_before_work(PrunePass(plan=str(plan)), _mlp(), PassContext(), "method=wanda needs calibration data")


def test_magnitude_prune_requires_nothing() -> None:
    result = Pipeline([PrunePass()]).run(Model(_mlp()), PassContext())
    assert result.results[0].modified


def test_finetune_requires_masks_data_and_a_teacher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    masks = tmp_path / "m.npz"
    np.savez(masks, w=np.ones((8, 8), dtype=bool))
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((4, 8), np.float32))
    _never_run(monkeypatch, FinetunePass)
    cases: list[tuple[FinetunePass, PassContext, str]] = [
        (FinetunePass(data=str(data)), PassContext(), r"^finetune: no masks — run prune earlier"),
        (FinetunePass(masks=str(tmp_path / "none.npz"), data=str(data)), PassContext(), "^no such masks file"),
        (FinetunePass(), PassContext(masks={"w": np.ones((8, 8), bool)}), r"^finetune: no training data"),
        # masks from a file: the model is the pruned one, so it cannot be its own teacher
        (FinetunePass(masks=str(masks), data=str(data)), PassContext(), r"^finetune: distillation needs teacher="),
    ]
    for p, ctx, match in cases:
        _fails_before_work(p, _mlp(), ctx, match)


def test_finetune_teacher_from_the_context_satisfies_the_requirement(tmp_path: Path) -> None:
    """``ctx.teacher`` is a real input of the Python API: with it, masks from a file need no teacher= option."""
    masks = tmp_path / "m.npz"
    np.savez(masks, nothing=np.ones((8, 8), dtype=bool))  # names no initializer: nothing to train
    p = FinetunePass(masks=str(masks), data=str(tmp_path / "d.npz"))
    with pytest.raises(OnnxSparseError, match="teacher"):
        p.requires(Model(_mlp()), PassContext())
    p.requires(Model(_mlp()), PassContext(teacher=Model(_mlp())))  # a dense in-memory model will do
    result = p.apply(Model(_mlp()), PassContext(teacher=tmp_path / "dense.onnx"))
    assert result.modified is False and result.report.details["trained"] == []


# ---------------------------------------------------------------------------------------------- ensures


class _BadMaskPrune(PrunePass):
    """Test-only: prunes, then leaves a mask that is not 2:4 for a tensor it reports as pruned."""

    name = "test-bad-mask-prune"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        result = super().run(model, ctx)
        ctx.masks["w"] = np.ones_like(ctx.masks["w"])
        return result


def test_prune_ensures_its_masks_are_n_m() -> None:
    ctx = PassContext()
    result = Pipeline([PrunePass()]).run(Model(_mlp()), ctx)
    assert result.results[0].report.changed[0]["name"] == "w" and is_nm(ctx.masks["w"], 0)
    with pytest.raises(PassContractError, match="the mask of 'w' is not 2:4 along axis 0"):
        Pipeline([_BadMaskPrune()]).run(Model(_mlp()), PassContext())


class _MiscountingValidate(ValidatePass):
    """Test-only: reports a violating layer as sparse."""

    name = "test-miscounting-validate"

    def analyse(self, model: Model, ctx: PassContext) -> Any:
        report = super().analyse(model, ctx)
        for row in report.details["layers"]:
            if row["status"] == "eligible":
                row["status"] = "sparse"
        return report


def test_validate_ensures_what_it_calls_sparse_was_counted_so() -> None:
    Pipeline([ValidatePass()]).run(Model(_mlp()))  # honest: the dense layer is "eligible"
    with pytest.raises(PassContractError, match=r"'MatMul\(h\)' is sparse with 16 violations"):
        Pipeline([_MiscountingValidate()]).run(Model(_mlp()))


# ---------------------------------------------------------------------------------------------- in place


@dataclass(frozen=True)
class _NoConfig(PassConfig):
    pass


class _ClaimsInPlaceReturnsCopy(Pass[_NoConfig]):
    """Test-only and wrong: says in place, returns a new model."""

    name = "test-claims-in-place"
    config_cls = _NoConfig
    in_place = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(Model(copy_proto(model.proto)), False)


class _Functional(Pass[_NoConfig]):
    """Test-only: a functional pass that appends an Identity to a copy; ``edit_input`` makes it wrong."""

    name = "test-functional"
    config_cls = _NoConfig
    in_place = False
    edit_input = False
    return_input = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.return_input:
            return PassResult(model, False)
        out = Model(copy_proto(model.proto))
        for target in (out, model) if self.edit_input else (out,):
            g = target.proto.graph
            g.node.append(onnx.helper.make_node("Identity", [g.output[0].name], ["z"], name="extra"))
            g.output[0].name = "z"
        return PassResult(out, True)


class _EditsInput(_Functional):
    name = "test-functional-edits-input"
    edit_input = True


class _ReturnsInput(_Functional):
    name = "test-functional-returns-input"
    return_input = True


class _SwapsInputProto(_Functional):
    """Wrong: returns a copy, and also gives its input a new (equal) proto object."""

    name = "test-functional-swaps-input-proto"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        result = super().run(model, ctx)
        model.proto = copy_proto(model.proto)  # same nodes and names: only the object differs
        return result


def test_in_place_claim_is_checked() -> None:
    with pytest.raises(PassContractError, match="declares in_place but returned a different model"):
        Pipeline([_ClaimsInPlaceReturnsCopy()]).run(Model(_mlp()))
    model = Model(_mlp())
    assert Pipeline([PrunePass()]).run(model).model is model  # a real in-place pass: the same object


def test_functional_claim_is_checked() -> None:
    model = Model(_mlp())
    before = model.proto.SerializeToString()
    result = Pipeline([_Functional()]).run(model)
    assert result.model is not model and model.proto.SerializeToString() == before  # input untouched
    assert [n.op_type for n in result.model.proto.graph.node] == ["MatMul", "Relu", "Identity"]
    x = make_feeds(result.model.proto)
    np.testing.assert_array_equal(run_ort(result.model.proto, x)[0], run_ort(model.proto, x)[0])
    with pytest.raises(PassContractError, match=r"is functional .* but changed its input's graph"):
        Pipeline([_EditsInput()]).run(Model(_mlp()))
    with pytest.raises(PassContractError, match=r"is functional .* but returned its input model"):
        Pipeline([_ReturnsInput()]).run(Model(_mlp()))
    with pytest.raises(PassContractError, match=r"is functional .* but changed its input's graph"):
        Pipeline([_SwapsInputProto()]).run(Model(_mlp()))  # the proto is held and compared by identity


def test_every_pass_declares_in_place() -> None:
    class _Undeclared(Pass[_NoConfig]):
        name = "test-undeclared"
        config_cls = _NoConfig

        def run(self, model: Model, ctx: PassContext) -> PassResult:
            return PassResult(model, False)

    with pytest.raises(TypeError, match="must declare in_place"):
        _Undeclared()
    from onnxsparse.grammar import registry

    assert all(isinstance(cls.in_place, bool) for cls in registry().values())


# ---------------------------------------------------------------------------------------------- modified


def _modified(p: Pass[Any], proto: onnx.ModelProto, ctx: PassContext | None = None) -> bool:
    before = proto.SerializeToString()
    result = Pipeline([p]).run(Model(proto), ctx)
    changed = result.model.proto.SerializeToString() != before
    assert result.results[0].modified == changed  # honest both ways
    return result.results[0].modified


def test_prune_modified_only_when_it_zeroes_something() -> None:
    assert _modified(PrunePass(), _mlp()) is True
    pruned = Pipeline([PrunePass()]).run(Model(_mlp())).model.proto
    assert _modified(PrunePass(), copy_proto(pruned)) is False  # already 2:4
    assert _modified(PrunePass(), _no_layers()) is False


def test_validate_never_modifies() -> None:
    assert _modified(ValidatePass(), _mlp()) is False


def test_gemm_to_conv_modified_only_when_it_rewrites() -> None:
    assert _modified(GemmToConvPass(), _mlp()) is True
    assert _modified(GemmToConvPass(), _no_layers()) is False
    assert _modified(GemmToConvPass(exclude="h"), _mlp()) is False


def test_to_fp16_modified_only_when_it_converts() -> None:
    assert _modified(ToFp16Pass(), _mlp()) is True
    half = Pipeline([ToFp16Pass()]).run(Model(_mlp())).model.proto
    assert _modified(ToFp16Pass(), copy_proto(half)) is False  # nothing float32 left
    assert _modified(ToFp16Pass(), _no_layers()) is False


def test_qdq_modified_only_when_it_quantizes() -> None:
    calib = [make_feeds(_mlp(), seed=i) for i in range(3)]
    assert _modified(QdqPass(), _mlp(), PassContext(calibration=calib)) is True
    relu_calib = [make_feeds(_relu(), seed=i) for i in range(3)]
    assert _modified(QdqPass(), _relu(), PassContext(calibration=relu_calib)) is False
    assert _modified(QdqPass(exclude="h"), _mlp(), PassContext(calibration=calib)) is False


def test_finetune_with_nothing_to_train_is_not_modified(tmp_path: Path) -> None:
    """Masks that name no trainable initializer: the pass returns before training (no runtime needed). That
    it is modified when it trains is asserted in tests/passes/test_finetune.py (ORT training runtime)."""
    masks = tmp_path / "m.npz"
    np.savez(masks, nothing=np.ones((8, 8), dtype=bool))
    p = FinetunePass(masks=str(masks), data=str(tmp_path / "d.npz"), teacher=str(tmp_path / "t.onnx"))
    assert _modified(p, _mlp()) is False


def test_passes_and_grammar_stand_on_the_contract_not_on_the_runner() -> None:
    """Imports run one way: passes and the grammar need ``pass_base`` only; ``pipeline`` (the runner) is above
    both and re-exports the contract, so the API's ``onnxsparse.pipeline.Pass`` is the same class."""
    import subprocess
    import sys

    import onnxsparse.pass_base as base
    import onnxsparse.pipeline as pipeline

    code = (
        "import json, sys\n"
        "import onnxsparse.grammar\n"
        "from onnxsparse.grammar import get_pass\n"
        "for name in ('prune', 'validate', 'qdq', 'to-fp16', 'gemm-to-conv', 'finetune'):\n"
        "    get_pass(name)\n"
        "print(json.dumps(sorted(m for m in ('onnxsparse.pipeline', 'onnxsparse.ir.interop') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == []
    for name in ("Pass", "PassConfig", "PassContext", "PassReport", "PassResult", "PassContractError", "option"):
        assert getattr(pipeline, name) is getattr(base, name)
