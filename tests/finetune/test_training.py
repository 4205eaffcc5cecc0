"""Fine-tune through ONNX Runtime training: training graph, runtime handling, recovery, exported structure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh
from training_support import (
    FINETUNE_FIXTURE,
    example_inputs,
    mse,
    outputs,
    prune_masks,
    target_function,
    training_runtime,  # noqa: F401
    write_data,
)

from onnxsparse.errors import OnnxSparseError
from onnxsparse.finetune import run as training
from onnxsparse.finetune.batches import Batches
from onnxsparse.grammar import get_pass
from onnxsparse.ir.layers import find_layers
from onnxsparse.ir.model_io import Model, load_model, save_model
from onnxsparse.ir.tensors import to_array
from onnxsparse.pipeline import PassContext
from onnxsparse.sparsity import count_violations

needs_runtime = pytest.mark.usefixtures("training_runtime")


def _inits(model: Model) -> dict[str, np.ndarray]:
    return {t.name: np.array(to_array(t, model)) for t in model.proto.graph.initializer}


# ---------------------------------------------------------------------------------------------- graph


def test_training_copy_masks_every_consumer_and_lowers_versions() -> None:
    dense = load_model(FINETUNE_FIXTURE)
    dense.proto.ir_version = 11  # as onnx >= 1.18 writes it; ORT training 1.19 reads <= 10
    pruned, masks = prune_masks(dense)
    copy = training.training_copy(pruned, masks)
    assert copy.ir_version == 10
    assert dense.proto.ir_version == 11, "the input model must not change"
    muls = [n for n in copy.graph.node if n.op_type == "Mul"]
    assert sorted(n.input[0] for n in muls) == sorted(masks)
    for node in copy.graph.node:
        if node.op_type != "Mul":
            assert not set(node.input) & set(masks), f"{node.name} still reads an unmasked weight"
    ln = next(n for n in copy.graph.node if n.op_type == "LayerNormalization")
    assert len(ln.output) == 3 and all(ln.output), "ORT's LayerNorm gradient needs Mean/InvStdDev outputs"
    onnx.checker.check_model(copy, full_check=True)
    # Numerically the training copy of the *dense* weights equals the pruned model.
    x = example_inputs(64, seed=5)
    dense_copy = training.training_copy(dense, masks)
    got = ort.InferenceSession(dense_copy.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, outputs(pruned, x), rtol=1e-5, atol=1e-5)


def test_lower_for_training_converts_a_newer_opset() -> None:
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [nh.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    proto.ir_version = 11
    lowered = onnx.ModelProto()
    lowered.CopyFrom(proto)
    training.lower_for_training(lowered)
    assert lowered.ir_version == 10
    assert next(o.version for o in lowered.opset_import if o.domain == "") == 21
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    a = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    b = ort.InferenceSession(lowered.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)


def test_mask_problems_are_one_line_errors(qdq_model_path: Path) -> None:
    dense = load_model(FINETUNE_FIXTURE)
    with pytest.raises(OnnxSparseError, match="names no initializer"):
        training.check_masks(dense, {"nope": np.ones((2, 2), bool)})
    with pytest.raises(OnnxSparseError, match="has shape"):
        training.check_masks(dense, {"fc1.weight": np.ones((4, 4), bool)})
    qdq = load_model(qdq_model_path)
    source = next(layer.source for layer in find_layers(qdq.proto) if layer.dequantized and layer.source is not None)
    assert source is not None
    name = source.name
    usable, skipped = training.partition_masks(qdq, {name: np.ones(source.shape, bool)})
    assert not usable and "fine-tune the float model" in skipped[name]


def test_batches_cover_every_sample_each_epoch() -> None:
    data = {"x": np.arange(10)[:, None], "y": np.arange(10)}
    it = iter(Batches(data, batch_size=3, seed=0, drop_last=False))
    for _ in range(2):
        seen = np.concatenate([next(it)["y"] for _ in range(4)])
        assert sorted(seen.tolist()) == list(range(10))
    batch = next(it)
    np.testing.assert_array_equal(batch["x"][:, 0], batch["y"])  # rows stay aligned across keys


def test_options_are_validated() -> None:
    with pytest.raises(OnnxSparseError, match="needs labels"):
        training.FinetuneOptions(loss="ce")
    with pytest.raises(OnnxSparseError, match="either steps or epochs"):
        training.FinetuneOptions(steps=3, epochs=1)
    with pytest.raises(OnnxSparseError, match="unknown loss"):
        training.FinetuneOptions(loss="kl")


# ---------------------------------------------------------------------------------------------- runtime


def test_missing_runtime_names_the_setup_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if training.find_runtime() is not None and training.find_runtime().mode == "inprocess":  # type: ignore[union-attr]
        pytest.skip("this environment's onnxruntime trains by itself")  # never the case in CI (plain onnxruntime)
    monkeypatch.setenv("ONNXSPARSE_TRAINING_RUNTIME", str(tmp_path / "empty"))
    assert training.find_runtime() is None
    with pytest.raises(OnnxSparseError) as err:
        training.require_runtime()
    message = str(err.value)
    assert "onnxsparse setup-training" in message and str(tmp_path / "empty") in message and "\n" not in message


def test_runtime_dir_follows_the_cache_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONNXSPARSE_TRAINING_RUNTIME", raising=False)
    monkeypatch.setenv("ONNXSPARSE_CACHE", str(tmp_path))
    assert training.runtime_dir().parent == tmp_path
    assert training.runtime_dir().name.startswith("ort-training-1.19.2-cp")
    cmd = training.install_command(tmp_path / "rt")
    assert cmd[-1] == "onnxruntime-training-cpu==1.19.2" and "--no-deps" in cmd and str(tmp_path / "rt") in cmd


@pytest.mark.slow
def test_install_runtime_into_a_folder_leaves_this_onnxruntime_alone(tmp_path: Path) -> None:
    before = ort.__version__
    try:
        rt = training.install_runtime(tmp_path / "rt")
    except OnnxSparseError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise
        pytest.skip(f"cannot reach PyPI: {e}")
    assert rt.mode == "subprocess" and rt.version == "1.19.2"
    assert (tmp_path / "rt" / "onnxruntime" / "training" / "api").is_dir()
    assert not list(tmp_path.glob(".rt.*")), "the temporary install folder is removed"
    assert not (tmp_path / "rt" / "numpy").exists(), "numpy must come from the environment (--no-deps)"
    import importlib

    importlib.reload(ort)
    assert ort.__version__ == before


# ---------------------------------------------------------------------------------------------- fine-tune


@needs_runtime
def test_distillation_recovers_the_pruning_gap(tmp_path: Path) -> None:
    """The evidence: 2:4 magnitude pruning of the trained fixture costs a lot; 300 distillation steps win
    most of it back (measured: ~86% of the output-error gap; the test asserts an honest 50%)."""
    dense = load_model(FINETUNE_FIXTURE)
    pruned, masks = prune_masks(dense)
    data = write_data(tmp_path / "train.npz")
    x = example_inputs(2048, seed=11)
    y_dense, y_pruned = outputs(dense, x), outputs(pruned, x)
    start = time.perf_counter()
    result = training.finetune(
        pruned, masks, data, training.FinetuneOptions(steps=300, lr=3e-3, batch_size=64), teacher=dense
    )
    seconds = time.perf_counter() - start
    y_ft = outputs(result.model, x)
    gap, left = mse(y_pruned, y_dense), mse(y_ft, y_dense)
    recovered = 1 - left / gap
    truth = target_function(x)
    task = (mse(y_dense, truth), mse(y_pruned, truth), mse(y_ft, truth))
    print(
        f"output MSE to dense: pruned {gap:.4f} -> fine-tuned {left:.4f} ({recovered:.1%} recovered); "
        f"task MSE dense/pruned/fine-tuned {task[0]:.4f}/{task[1]:.4f}/{task[2]:.4f}; {seconds:.1f}s"
    )
    assert gap > 0.1, "pruning must hurt this fixture, or recovery means nothing"
    assert recovered >= 0.5
    assert task[2] < task[1] / 2
    assert seconds < 60
    assert result.first_loss is not None and result.last_loss is not None and result.last_loss < result.first_loss / 3
    assert result.outside_mask_drift == 0.0, "pruned entries must get no update at all"
    # Exactly 2:4 along each layer's reduction axis, and zero wherever the mask says so.
    report = get_pass("validate")(pattern="2:4", require_all=True).run(result.model, PassContext()).report
    assert report.details["summary"]["sparse"] == 3
    after = _inits(result.model)
    for name, mask in masks.items():
        assert not after[name][~mask].any()
    assert count_violations(after["fc2.weight"] != 0, 1, 2, 4)[0] == 0  # Gemm transB=1: groups along axis 1


@needs_runtime
def test_export_keeps_the_input_structure(tmp_path: Path) -> None:
    dense = load_model(FINETUNE_FIXTURE)
    pruned, masks = prune_masks(dense)
    before = pruned.proto.SerializeToString()
    result = training.finetune(
        pruned,
        masks,
        write_data(tmp_path / "d.npz", n=256),
        training.FinetuneOptions(steps=5, train=("weights", "biases", "norms")),
        teacher=dense,
    )
    out = result.model.proto
    assert pruned.proto.SerializeToString() == before, "the input model must not change"
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in out.graph.node] == [
        (n.op_type, n.name, list(n.input), list(n.output)) for n in pruned.proto.graph.node
    ]
    assert [t.name for t in out.graph.initializer] == [t.name for t in pruned.proto.graph.initializer]
    assert out.ir_version == pruned.proto.ir_version and list(out.opset_import) == list(pruned.proto.opset_import)
    assert not any(n.op_type == "Mul" for n in out.graph.node)
    onnx.checker.check_model(out, full_check=True)
    old, new = _inits(pruned), _inits(result.model)
    assert sorted(result.trained) == sorted([*masks, "fc1.bias", "fc2.bias", "head.bias", "ln.weight", "ln.bias"])
    assert sorted(result.changed) == sorted(result.trained)
    for name in old:
        if name not in result.trained:
            np.testing.assert_array_equal(old[name], new[name])
    path = save_model(result.model, tmp_path / "out.onnx")
    onnx.checker.check_model(str(path), full_check=True)


@needs_runtime
def test_label_losses_mse_and_cross_entropy(tmp_path: Path) -> None:
    dense = load_model(FINETUNE_FIXTURE)
    pruned, masks = prune_masks(dense)
    data = write_data(tmp_path / "labels.npz", n=2048, labels=True)
    x = example_inputs(1024, seed=12)
    truth = target_function(x)
    res = training.finetune(
        pruned, masks, data, training.FinetuneOptions(steps=200, lr=3e-3, batch_size=64, loss="mse", labels="y")
    )
    assert mse(outputs(res.model, x), truth) < mse(outputs(pruned, x), truth) / 2

    # Cross-entropy on a 4-class problem: the class is the argmax of a fixed linear map.
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((16, 4)).astype(np.float32)
    xs = rng.standard_normal((2048, 16)).astype(np.float32)
    labels = np.argmax(xs @ proj, axis=1).astype(np.int64)
    w = (rng.standard_normal((16, 4)) * 0.3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
        [nh.from_array(w, "w")],
    )
    clf = Model(proto=helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    clf_pruned, clf_masks = prune_masks(clf)
    np.savez(tmp_path / "clf.npz", x=xs, label=labels)
    res = training.finetune(
        clf_pruned,
        clf_masks,
        tmp_path / "clf.npz",
        training.FinetuneOptions(epochs=3, lr=0.05, batch_size=64, loss="ce", labels="label"),
    )

    def accuracy(m: Model) -> float:
        logits = ort.InferenceSession(m.proto.SerializeToString()).run(None, {"x": xs})[0]
        return float(np.mean(np.argmax(logits, 1) == labels))

    assert res.steps == 3 * 32
    assert accuracy(res.model) > accuracy(clf_pruned) + 0.2
    assert not _inits(res.model)["w"][~clf_masks["w"]].any()


@needs_runtime
def test_a_diverging_run_is_a_one_line_error(tmp_path: Path) -> None:
    dense = load_model(FINETUNE_FIXTURE)
    pruned, masks = prune_masks(dense)
    data = tmp_path / "big.npz"
    np.savez(data, x=example_inputs(256, 0) * 1e30)
    with pytest.raises(OnnxSparseError, match=r"fine-tune failed in ORT training: .*(nan|inf)") as err:
        training.finetune(pruned, masks, data, training.FinetuneOptions(steps=20, lr=1e6), teacher=dense)
    assert "\n" not in str(err.value)


@needs_runtime
def test_bad_data_is_reported_before_training(tmp_path: Path) -> None:
    dense = load_model(FINETUNE_FIXTURE)
    pruned, masks = prune_masks(dense)
    np.savez(tmp_path / "wrong.npz", features=example_inputs(8, 0))
    with pytest.raises(OnnxSparseError, match="no array for model input 'x'"):
        training.finetune(pruned, masks, tmp_path / "wrong.npz", teacher=dense)
    with pytest.raises(OnnxSparseError, match="needs a dense teacher"):
        training.finetune(pruned, masks, tmp_path / "wrong.npz")


@needs_runtime
def test_in_process_when_the_environment_onnxruntime_trains(tmp_path: Path, training_runtime) -> None:  # noqa: F811
    """With the training build first on sys.path (as in an env that installed it), no subprocess is used."""
    if training_runtime.mode != "subprocess":
        pytest.skip("already in-process")
    data = write_data(tmp_path / "d.npz", n=256)
    code = f"""
import json, sys
sys.path.insert(0, {str(training_runtime.path)!r})
import numpy as np, onnxruntime
from onnxsparse.finetune import run as training
from onnxsparse.ir.model_io import load_model
from onnxsparse.grammar import get_pass
from onnxsparse.pipeline import PassContext
rt = training.find_runtime()
dense = load_model({str(FINETUNE_FIXTURE)!r})
pruned = load_model({str(FINETUNE_FIXTURE)!r})
ctx = PassContext()
get_pass("prune")().run(pruned, ctx)
res = training.finetune(pruned, ctx.masks, {str(data)!r}, training.FinetuneOptions(steps=20),
                        teacher=dense)
print(json.dumps({{"mode": rt.mode, "ort": onnxruntime.__version__, "steps": res.steps,
                   "first": res.first_loss, "last": res.last_loss}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mode"] == "inprocess" and out["ort"].startswith("1.19") and out["steps"] == 20
    assert out["last"] < out["first"]


# ---------------------------------------------------------------------------------------------- QAT


def _sparse_qdq_fixture(tmp_path: Path) -> tuple[Model, Model, Path]:
    """(dense, 2:4-pruned + int8 Q/DQ model, data): the fixture pruned, quantized by the qdq pass."""
    dense = load_model(FINETUNE_FIXTURE)
    pruned, _ = prune_masks(dense)
    data = write_data(tmp_path / "train.npz", n=2048)
    qdq = get_pass("qdq")().run(pruned, PassContext(calibration=str(data))).model
    return dense, qdq, data


def test_qat_training_copy_replaces_qdq_by_fake_quant(tmp_path: Path) -> None:
    from onnxsparse.finetune import qat as training_qat

    _, qdq, _ = _sparse_qdq_fixture(tmp_path)
    qweights, skipped = training_qat.quantized_weights(qdq, {})
    assert not skipped and len(qweights) == 3
    copy = training.training_copy(qdq, {}, qweights)
    ops = [n.op_type for n in copy.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert ops.count("FakeQuant") == 6  # 3 weights + 3 activations
    assert {t.name for t in copy.graph.initializer} >= {q.master_name for q in qweights.values()}
    assert not {q.name for q in qweights.values()} & {t.name for t in copy.graph.initializer}
    # Re-quantizing the untouched masters gives back the stored integers exactly.
    for q in qweights.values():
        np.testing.assert_array_equal(
            q.quantize(q.master), to_array(next(t for t in qdq.proto.graph.initializer if t.name == q.name))
        )


def _all_external(model: Model, path: Path) -> Model:
    """``model`` saved with *every* tensor as external data (zero size threshold: scalar scales and zero points
    too, as some exporters do), loaded back without its data."""
    from onnx.external_data_helper import convert_model_to_external_data

    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for t in proto.graph.initializer:  # inline copies of the values, so that onnx can write them out
        t.CopyFrom(nh.from_array(np.array(to_array(t, model)), t.name))
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=0)
    onnx.save(proto, str(path))
    loaded = load_model(path)
    assert all(t.data_location == TensorProto.EXTERNAL for t in loaded.proto.graph.initializer)
    return loaded


def test_qat_reads_scales_and_zero_points_stored_as_external_data(tmp_path: Path) -> None:
    """Zero points and scales (per-channel weight zero points, per-tensor activation ones) stored as external
    data are read through the model's folder: same QAT weights and the same training copy as the inline model."""
    from onnxsparse.finetune import qat as training_qat

    _, qdq, _ = _sparse_qdq_fixture(tmp_path)
    ext = _all_external(qdq, tmp_path / "ext.onnx")
    q_inline, skipped_inline = training_qat.quantized_weights(qdq, {})
    q_ext, skipped_ext = training_qat.quantized_weights(ext, {})
    assert not skipped_ext and skipped_ext == skipped_inline and q_ext.keys() == q_inline.keys()
    for name, qw in q_inline.items():
        assert q_ext[name].zero_point == qw.zero_point
        np.testing.assert_array_equal(q_ext[name].scale, qw.scale)
        np.testing.assert_array_equal(q_ext[name].master, qw.master)
    copy_inline = training.training_copy(qdq, {}, q_inline)
    copy_ext = training.training_copy(ext, {}, q_ext)
    assert [n.op_type for n in copy_ext.graph.node].count("FakeQuant") == 6
    zero_points = {n.input[2] for n in copy_inline.graph.node if n.op_type == "FakeQuant"}
    assert len(zero_points) == 6
    ext_inits = {t.name: t for t in copy_ext.graph.initializer}
    for t in copy_inline.graph.initializer:
        if t.name in zero_points:
            np.testing.assert_array_equal(to_array(ext_inits[t.name], ext), to_array(t), err_msg=t.name)


@needs_runtime
def test_sparse_qat_lowers_the_error_of_a_pruned_int8_model(tmp_path: Path) -> None:
    """Fine-tuning a pruned Q/DQ model through FakeQuant (straight-through gradient) with fixed, deliberately
    coarse activation scales: its error to the dense model drops (gradients do pass the fake quantization),
    masks, scales, int8 storage and structure stay."""
    dense, qdq, data = _sparse_qdq_fixture(tmp_path)
    for t in qdq.proto.graph.initializer:  # a 6x too wide activation range: coarse activation quantization
        if t.name in ("act1_scale", "act2_scale"):
            t.CopyFrom(nh.from_array(nh.to_array(t) * 6, t.name))
    x = example_inputs(1024, seed=13)
    y_dense = outputs(dense, x)
    before_err = mse(outputs(qdq, x), y_dense)
    before = _inits(qdq)
    result = training.finetune(
        qdq, {}, data, training.FinetuneOptions(steps=300, lr=1e-3, batch_size=64), teacher=dense
    )
    after_err = mse(outputs(result.model, x), y_dense)
    print(f"QAT: int8 output MSE to dense {before_err:.4f} -> {after_err:.4f}")
    assert after_err < 0.7 * before_err
    assert result.outside_mask_drift == 0.0
    after = _inits(result.model)
    for name in ("fc1.weight_quantized", "fc2.weight_quantized", "head.weight_quantized"):
        assert after[name].dtype == np.int8 and name in result.changed
        assert not after[name][before[name] == 0].any()
    for name in ("act1_scale", "act2_scale", "fc1.weight_scale"):
        np.testing.assert_array_equal(after[name], before[name])
    assert [n.op_type for n in result.model.proto.graph.node] == [n.op_type for n in qdq.proto.graph.node]
    assert (
        get_pass("validate")(require_all=True).run(result.model, PassContext()).report.details["summary"]["sparse"] == 3
    )


@needs_runtime
def test_external_data_model_with_edited_tensors(tmp_path: Path) -> None:
    """A model with external data whose weights prune rewrote (scratch-file tensors): the fine-tune reads them,
    leaves the input model intact and readable, and the result saves with its own data file."""
    save_model(load_model(FINETUNE_FIXTURE), tmp_path / "dense.onnx", external_data=True)
    dense = load_model(tmp_path / "dense.onnx")
    assert dense.has_external_data()
    pruned, masks = prune_masks(dense)
    before = _inits(pruned)
    data = write_data(tmp_path / "d.npz", n=512)
    result = training.finetune(
        pruned, masks, data, training.FinetuneOptions(steps=100, lr=3e-3), teacher=tmp_path / "dense.onnx"
    )
    after_input = _inits(pruned)
    for name in before:
        np.testing.assert_array_equal(before[name], after_input[name])
    (tmp_path / "out").mkdir()
    out = save_model(result.model, tmp_path / "out" / "ft.onnx")
    assert (tmp_path / "out" / "ft.onnx.data").is_file()
    saved = load_model(out)
    got = _inits(saved)
    for name, mask in masks.items():
        assert not got[name][~mask].any()
    assert not np.array_equal(got["fc1.weight"], before["fc1.weight"])
    assert _inits(pruned)["fc1.weight"].shape == before["fc1.weight"].shape  # still readable after the save
    assert training.output_error(saved, load_model(FINETUNE_FIXTURE), data) < 0.5 * training.output_error(
        pruned, load_model(FINETUNE_FIXTURE), data
    )


def test_training_copy_keeps_batchnorm_in_inference_mode(cnn_path: Path) -> None:
    """ORT's training graph would run BatchNormalization on batch statistics; the copy spells it as x*a+b
    from the running statistics, so the forward pass it trains is the model's own."""
    model = load_model(cnn_path)
    copy = training.training_copy(model, {})
    assert "BatchNormalization" not in [n.op_type for n in copy.graph.node]
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    want = ort.InferenceSession(model.proto.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(copy.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_runtime
def test_weights_behind_an_op_without_cpu_gradient_stay_fixed(cnn_path: Path, tmp_path: Path) -> None:
    """ORT training's CPU build has no ConvTranspose gradient: the weights whose gradient would pass it are
    kept fixed (and reported), the layers after it still train, and the loss is the exported model's error."""
    dense = load_model(cnn_path)
    pruned, masks = prune_masks(dense)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((256, 3, 32, 32)).astype(np.float32))
    result = training.finetune(pruned, masks, data, training.FinetuneOptions(steps=60), teacher=cnn_path)
    assert "up.weight" in result.frozen and "block1.conv1.weight" in result.frozen
    assert all("ConvTranspose" in reason for reason in result.frozen.values())
    assert "head.weight" in result.trained and "down.weight" in result.trained
    assert not set(result.trained) & set(result.frozen)
    before, after = _inits(pruned), _inits(result.model)
    np.testing.assert_array_equal(after["up.weight"], before["up.weight"])
    assert not np.array_equal(after["head.weight"], before["head.weight"])
    err_before = training.output_error(pruned, cnn_path, data)
    err_after = training.output_error(result.model, cnn_path, data)
    assert err_after < 0.2 * err_before
    assert result.last_loss is not None and abs(err_after - result.last_loss) < 0.5 * err_after + 1e-3


def test_ort_cpp_errors_become_one_readable_line() -> None:
    from onnxsparse.finetune.worker import clean_error

    raw = (
        "/onnxruntime_src/orttraining/orttraining/core/graph/gradient_builder_base.h:123 onnxruntime::training::"
        "ArgDef onnxruntime::training::GradientBuilderBase::O(size_t, bool) const i < node_->OutputDefs().size() "
        "was false."
    )
    assert clean_error(raw) == "i < node_->OutputDefs().size() was false."
    raw = (
        "/onnxruntime_src/a/module.cc:312 onnxruntime::Module::Module(const X&, gsl::span<Y* const>) "
        "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for\nFooGrad(1) node"
    )
    assert clean_error(raw) == "NOT_IMPLEMENTED : Could not find an implementation for FooGrad(1) node"
    assert clean_error("loss became nan at step 3") == "loss became nan at step 3"


def _chain_model(middle: list[onnx.NodeProto], seed: int = 0) -> Model:
    """x → MatMul(w1) → <middle: h → r> → MatMul(w2) → y, weights 8×8 and 8×4."""
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((8, 8)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), *middle, helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [nh.from_array(w1, "w1"), nh.from_array(w2, "w2")],
    )
    return Model(proto=helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_hard_activations_are_spelled_with_relu() -> None:
    """HardSigmoid/HardSwish have no ORT gradient builder; the training copy computes the same function."""
    model = _chain_model(
        [
            helper.make_node("HardSigmoid", ["h"], ["s"], alpha=0.3, beta=0.4),
            helper.make_node("HardSwish", ["s"], ["t"]),
            helper.make_node("HardSwish", ["h"], ["u"]),
            helper.make_node("Add", ["t", "u"], ["r"]),
        ]
    )
    copy = training.training_copy(model, {})
    ops = [n.op_type for n in copy.graph.node]
    assert "HardSigmoid" not in ops and "HardSwish" not in ops
    x = np.linspace(-8, 8, 64 * 8, dtype=np.float32).reshape(64, 8)
    want = ort.InferenceSession(model.proto.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(copy.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_runtime
def test_weights_before_an_op_without_gradient_builder_stay_fixed(tmp_path: Path) -> None:
    model = _chain_model([helper.make_node("Round", ["h"], ["r"])])
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "d.npz",
        x=rng.standard_normal((64, 8)).astype(np.float32),
        y=rng.standard_normal((64, 4)).astype(np.float32),
    )
    masks = {"w1": np.ones((8, 8), bool), "w2": np.ones((8, 4), bool)}
    result = training.finetune(
        model, masks, tmp_path / "d.npz", training.FinetuneOptions(steps=5, loss="mse", labels="y")
    )
    assert result.trained == ["w2"] and list(result.frozen) == ["w1"] and "Round" in result.frozen["w1"]
    assert result.changed == ["w2"]


def test_outer_scope_weights_are_masked_inside_subgraphs_and_kept_fixed(if_model_path: Path) -> None:
    """then.fc1.weight lives in the main graph but is read inside the If's then-branch: the branch must read
    W ⊙ M, and since ORT training does not differentiate If, the weights feeding it stay fixed."""
    model = load_model(if_model_path)
    pruned, masks = prune_masks(model)
    usable, skipped = training.partition_masks(pruned, masks)
    assert set(usable) == {"then.fc1.weight", "in.weight"}
    assert all("main graph" in reason for reason in skipped.values())  # branch initializers
    dense_copy = training.training_copy(model, usable)
    then = next(a.g for a in dense_copy.graph.node[-1].attribute if a.name == "then_branch")
    assert "then.fc1.weight" + training.MASKED_SUFFIX in {i for n in then.node for i in n.input}
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    feeds = {"x": x, "cond": np.array(True)}
    got = ort.InferenceSession(dense_copy.SerializeToString()).run(None, feeds)[0]
    pruned_only_usable = load_model(if_model_path)
    for t in pruned_only_usable.proto.graph.initializer:
        if t.name in usable:
            t.CopyFrom(nh.from_array(nh.to_array(t) * usable[t.name], t.name))
    want = ort.InferenceSession(pruned_only_usable.proto.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    frozen = training.control_flow_frozen(dense_copy, [*usable, "in.bias"])
    assert set(frozen) == {"then.fc1.weight", "in.weight", "in.bias"}


@needs_runtime
def test_sparse_qat_runs_on_a_model_with_every_tensor_external(tmp_path: Path) -> None:
    """End to end on the all-external Q/DQ model: QAT trains, and the exported model keeps the int8 storage,
    scales and zero points of the input."""
    dense, qdq, data = _sparse_qdq_fixture(tmp_path)
    ext = _all_external(qdq, tmp_path / "ext.onnx")
    result = training.finetune(ext, {}, data, training.FinetuneOptions(steps=5, batch_size=64), teacher=dense)
    assert result.steps == 5
    before, after = _inits(ext), _inits(result.model)
    assert before.keys() == after.keys()
    for name, arr in before.items():
        assert after[name].dtype == arr.dtype, name
        if name.endswith(("_scale", "_zero_point")):
            np.testing.assert_array_equal(after[name], arr, err_msg=name)
    x = example_inputs(64, seed=13)
    out = save_model(result.model, tmp_path / "qat.onnx")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, {"x": x})[0]).all()
