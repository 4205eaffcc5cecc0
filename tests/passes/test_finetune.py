"""The ``finetune`` pass inside pipelines: masks from prune, teacher = the pipeline's input, progressive 3:4 → 2:4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from training_support import (
    FINETUNE_FIXTURE,
    example_inputs,
    mse,
    outputs,
    prune_masks,
    training_runtime,  # noqa: F401
    write_data,
)

from onnxsparse.errors import OnnxSparseError
from onnxsparse.grammar import parse_pipeline
from onnxsparse.ir.model_io import load_model
from onnxsparse.ir.tensors import to_array
from onnxsparse.pipeline import PassContext, Pipeline

pytestmark = pytest.mark.usefixtures("training_runtime")


def _weights(model: object) -> dict[str, np.ndarray]:
    return {t.name: np.array(to_array(t, model)) for t in model.proto.graph.initializer}  # type: ignore[attr-defined]


def test_options_parse_from_pipeline_text() -> None:
    (p,) = parse_pipeline(
        "finetune{steps=7;lr=0.01;batch-size=16;loss=mse;labels=y;outputs=a,b;train=weights,norms;"
        "mask-input=attention_mask;bucket-by-length=true;eval-every=5}"
    )
    cfg = p.config
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.loss, cfg.labels, cfg.outputs, cfg.train) == (
        7,
        0.01,
        16,
        "mse",
        "y",
        ("a", "b"),
        ("weights", "norms"),
    )
    assert (cfg.mask_input, cfg.bucket_by_length, cfg.eval_every) == ("attention_mask", True, 5)
    with pytest.raises(OnnxSparseError, match="unknown trainable set 'heads'"):
        parse_pipeline("finetune{train=weights,heads}")
    with pytest.raises(OnnxSparseError, match="needs mask-input"):
        parse_pipeline("finetune{bucket-by-length=true}")
    assert parse_pipeline(p.text())[0].config == cfg
    with pytest.raises(OnnxSparseError, match="needs labels"):
        parse_pipeline("finetune{loss=ce}")


def test_prune_then_finetune_distils_to_the_pipeline_input(tmp_path: Path) -> None:
    data = write_data(tmp_path / "train.npz")
    dense = load_model(FINETUNE_FIXTURE)
    x = example_inputs(1024, seed=21)
    y_dense = outputs(dense, x)
    pruned_only = Pipeline("prune").run(load_model(FINETUNE_FIXTURE)).model
    result = Pipeline(
        f"prune,finetune{{data={data};steps=300;lr=0.003;batch-size=64}},validate{{require-all=true}}"
    ).run(load_model(FINETUNE_FIXTURE), PassContext())
    _, ft_r, _ = result.results
    assert ft_r.modified and {c["name"] for c in ft_r.report.changed} >= {"fc1.weight", "fc2.weight", "head.weight"}
    assert ft_r.report.details["teacher"] == str(FINETUNE_FIXTURE.resolve())
    gap, left = mse(outputs(pruned_only, x), y_dense), mse(outputs(result.model, x), y_dense)
    assert 1 - left / gap >= 0.5
    onnx.checker.check_model(result.model.proto, full_check=True)
    assert [n.op_type for n in result.model.proto.graph.node] == [n.op_type for n in dense.proto.graph.node]


def test_progressive_preset_keeps_the_first_zeros(tmp_path: Path) -> None:
    """``progressive`` = prune 3:4, finetune, prune 2:4, finetune, validate — data from the run's --calib."""
    from onnxsparse.passes.prune import PROGRESSIVE

    data = write_data(tmp_path / "train.npz", n=1024)
    text = PROGRESSIVE.replace("finetune", "finetune{steps=60;lr=0.003;batch-size=64}")
    ctx = PassContext(calibration=str(data))
    seen: dict[str, dict[str, np.ndarray]] = {}

    def snapshot(p: object, r: object) -> None:
        if getattr(p, "name", "") == "finetune":
            seen[str(len(seen))] = _weights(r.model)  # type: ignore[attr-defined]

    result = Pipeline(text).run(load_model(FINETUNE_FIXTURE), ctx, on_pass=snapshot)
    assert [r.name for r in result.results] == ["prune", "finetune", "prune", "finetune", "validate"]
    assert all(r.modified for r in result.results[:4])
    step1, final = seen["0"], _weights(result.model)
    for name in ("fc1.weight", "fc2.weight", "head.weight"):
        assert not final[name][step1[name] == 0].any(), f"{name}: a 3:4 zero came back"
        assert np.count_nonzero(final[name]) == final[name].size // 2
    assert result.results[-1].report.details["summary"]["sparse"] == 3


def test_masks_from_a_file_need_a_teacher(tmp_path: Path) -> None:
    pruned, masks = prune_masks(load_model(FINETUNE_FIXTURE))
    np.savez(tmp_path / "m.npz", **masks)  # type: ignore[arg-type]
    data = write_data(tmp_path / "d.npz", n=64)
    with pytest.raises(OnnxSparseError, match="teacher"):
        Pipeline(f"finetune{{masks={tmp_path / 'm.npz'};data={data};steps=2}}").run(pruned)
    result = Pipeline(f"finetune{{masks={tmp_path / 'm.npz'};data={data};steps=20;teacher={FINETUNE_FIXTURE}}}").run(
        pruned
    )
    assert result.results[0].modified


def test_without_masks_or_data_the_pass_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(OnnxSparseError, match="no masks"):
        Pipeline("finetune{steps=2}").run(load_model(FINETUNE_FIXTURE))
    with pytest.raises(OnnxSparseError, match="no training data"):
        Pipeline("prune,finetune{steps=2}").run(load_model(FINETUNE_FIXTURE))


def test_qdq_model_fine_tunes_quantization_aware(qdq_model_path: Path, tmp_path: Path) -> None:
    """A Q/DQ model (conv, transposed and reshaped int8 weights, one fp16 weight) trains through FakeQuant:
    every int8 weight stays int8 behind its DequantizeLinear, 2:4 zeros stay the zero point, fp16 is skipped."""
    import onnxruntime as ort

    model = load_model(qdq_model_path)
    x = np.random.default_rng(0).standard_normal((256, 16, 8, 8)).astype(np.float32)
    y = ort.InferenceSession(model.proto.SerializeToString()).run(None, {"x": x})[0]
    np.savez(tmp_path / "d.npz", x=x, y=y * 1.2)
    ctx = PassContext(calibration=str(tmp_path / "d.npz"))
    after_prune: dict[str, np.ndarray] = {}

    def snapshot(p: object, r: object) -> None:
        if getattr(p, "name", "") == "prune":
            after_prune.update(_weights(r.model))  # type: ignore[attr-defined]

    result = Pipeline("prune,finetune{steps=30;loss=mse;labels=y;batch-size=16},validate").run(
        model, ctx, on_pass=snapshot
    )
    prune_r, ft, val = result.results
    assert ft.modified and ft.report.details["last_loss"] < ft.report.details["first_loss"]
    pruned_int8 = {c["name"] for c in prune_r.report.changed if c["dtype"] == "int8"}
    assert pruned_int8 and pruned_int8 <= set(ft.report.details["qat"])
    final = _weights(result.model)
    for name in pruned_int8:
        assert not final[name][after_prune[name] == 0].any(), f"{name}: a pruned entry came back"
        assert not np.array_equal(final[name], after_prune[name]), f"{name} did not train"
    assert [s["name"] for s in ft.report.skipped] == ["fc3.weight_fp16"]
    assert "FLOAT16" in ft.report.skipped[0]["reason"]
    assert val.report.details["summary"]["sparse"] >= len(ft.report.details["qat"])
    assert [n.op_type for n in result.model.proto.graph.node] == [n.op_type for n in model.proto.graph.node]
    for t in result.model.proto.graph.initializer:
        if t.name in ft.report.details["qat"]:
            assert t.data_type == onnx.TensorProto.INT8
    onnx.checker.check_model(result.model.proto, full_check=True)
