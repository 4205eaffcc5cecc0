"""Fine-tuning transformers: masked distillation loss, trimmed and bucketed batches, trainable sets, eval curve.

The model is ``training_support.tiny_encoder`` (one BERT-shaped layer, random weights: these tests prove
structure and arithmetic, not accuracy — accuracy is measured on the trained MiniLM-L3 by
``tools/bench_finetune.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from training_support import (
    encoder_data,
    prune_masks,
    tiny_encoder,
    training_runtime,  # noqa: F401
)

from onnxsparse.errors import OnnxSparseError
from onnxsparse.finetune import run as training
from onnxsparse.finetune.batches import Batches, row_lengths, trim
from onnxsparse.ir.model_io import Model, load_model
from onnxsparse.ir.tensors import to_array

needs_runtime = pytest.mark.usefixtures("training_runtime")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Model, dict[str, np.ndarray]]:
    """(dense model path, 2:4-pruned model, masks)."""
    dense = tiny_encoder(tmp_path_factory.mktemp("enc") / "dense.onnx")
    pruned, masks = prune_masks(load_model(dense))
    assert len(masks) == 6, "q, k, v, out, ffn1, ffn2 are pruned"
    return dense, pruned, masks


def _opts(**kw: object) -> training.FinetuneOptions:
    base: dict[str, object] = dict(steps=1, lr=1e-3, batch_size=8, mask_input="attention_mask")
    base.update(kw)
    return training.FinetuneOptions(**base)  # type: ignore[arg-type]


def _run(model: Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feeds)[0])


# ---------------------------------------------------------------------------------------------- batches


def test_row_lengths_use_the_last_real_position() -> None:
    mask = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert row_lengths(mask, 1).tolist() == [2, 4, 0, 3], "left padding keeps the full length"
    assert row_lengths(mask[:, None, None, :], 3).tolist() == [2, 4, 0, 3]


def test_batches_are_trimmed_to_their_longest_row() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 17, 50)
    mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1, 9, (50, 16)), 0)
    data = {"input_ids": ids, "attention_mask": mask, "other": np.arange(50)}
    b = Batches(
        data, 8, seed=1, drop_last=False, lengths=row_lengths(mask, 1), trim_axes={"input_ids": 1, "attention_mask": 1}
    )
    seen = 0
    fed = b.epoch_order()
    b.rng = np.random.default_rng(1)  # replay the same epoch
    for idx in b.epoch_order():
        batch = b.take(idx)
        want = int(lengths[idx].max())
        assert batch["input_ids"].shape == (len(idx), want) and batch["attention_mask"].shape == (len(idx), want)
        np.testing.assert_array_equal(batch["input_ids"], ids[idx, :want])
        np.testing.assert_array_equal(batch["other"], idx)  # untrimmed inputs are left alone
        seen += len(idx)
    assert seen == 50
    assert b.tokens_fed == sum(int(lengths[i].max()) * len(i) for i in fed)
    assert b.tokens_fed < b.tokens_full == 50 * 16
    assert trim({"x": np.zeros((2, 5))}, {"x": 1}, 9)["x"].shape == (2, 5), "never padded up"


def test_bucketing_is_seeded_reproducible_and_cuts_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, 2000)
    mask = (np.arange(64)[None] < lengths[:, None]).astype(np.int64)
    data = {"attention_mask": mask}

    def orders(seed: int, bucket: bool) -> tuple[list[list[int]], Batches]:
        b = Batches(
            data,
            16,
            seed,
            drop_last=False,
            lengths=row_lengths(mask, 1),
            trim_axes={"attention_mask": 1},
            bucket=bucket,
        )
        epochs = [[i.tolist() for i in b.epoch_order()] for _ in range(2)]
        for idx in b.epoch_order():
            b.take(idx)
        return [[i for batch in e for i in batch] for e in epochs], b

    a, ba = orders(3, True)
    again, _ = orders(3, True)
    other, _ = orders(4, True)
    _, bp = orders(3, False)
    assert a == again, "same seed, same batches"
    assert a != other
    for epoch in a:
        assert sorted(epoch) == list(range(2000)), "each epoch covers every sample once"
    assert a[0] != a[1], "epochs differ"
    assert ba.tokens_fed < 0.8 * bp.tokens_fed, (ba.tokens_fed, bp.tokens_fed)
    spans = [np.ptp(lengths[i]) for i in Batches(data, 16, 3, False, row_lengths(mask, 1), bucket=True).epoch_order()]
    assert np.median(spans) < 10, "a bucketed batch holds similar lengths"
    with pytest.raises(ValueError, match="lengths"):
        Batches(data, 16, 0, False, bucket=True)


# ---------------------------------------------------------------------------------------------- checks


def test_trainable_sets_are_reported(encoder: tuple[Path, Model, dict[str, np.ndarray]]) -> None:
    _, pruned, masks = encoder
    sets = training.trainable_sets(pruned, masks, ("weights", "biases", "norms", "embeddings"))
    assert sorted(sets["weights"]) == sorted(masks)
    assert sorted(sets["biases"]) == sorted(
        f"{n}.bias" for n in ("attn.q", "attn.k", "attn.v", "attn.out", "ffn1", "ffn2")
    )
    assert sorted(sets["norms"]) == sorted(
        [f"{n}.{p}" for n in ("embed.ln", "attn.ln") for p in ("gamma", "beta")] + ["out.gamma", "out.beta"]
    )
    assert sets["embeddings"] == ["embed.word"]
    assert training.trainable_sets(pruned, masks, ("norms",)) == {"norms": sets["norms"]}


def test_mask_layout_names_what_is_trimmed(encoder: tuple[Path, Model, dict[str, np.ndarray]], tmp_path: Path) -> None:
    _, pruned, _ = encoder
    data = encoder_data(tmp_path / "d.npz")
    headers = training.npz_shapes(data)
    from onnxsparse.finetune.data import mask_layout

    layout = mask_layout(pruned.proto, "attention_mask", ["hidden"], headers, data)
    assert layout.trim == {"input_ids": 1, "attention_mask": 1} and layout.static_reason is None
    assert layout.masked_outputs == ["hidden"] and layout.seq_axis == 1
    static = tiny_encoder(tmp_path / "static.onnx", seq=12)
    layout = mask_layout(load_model(static).proto, "attention_mask", ["hidden"], headers, data)
    assert layout.trim == {} and "sequence dim is fixed" in (layout.static_reason or "")


# ---------------------------------------------------------------------------------------------- training


@needs_runtime
def test_masked_loss_is_the_mean_over_real_positions_and_ignores_pads(
    encoder: tuple[Path, Model, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    dense, pruned, masks = encoder
    a = encoder_data(tmp_path / "a.npz", pad_id=0)
    b = encoder_data(tmp_path / "b.npz", pad_id=7)  # the same rows, other tokens at the padded positions
    ra = training.finetune(pruned, masks, a, _opts(), teacher=dense)
    rb = training.finetune(pruned, masks, b, _opts(), teacher=dense)
    assert ra.first_loss is not None and rb.first_loss is not None
    # The first step's loss is computed before any update: recompute it here from the same (seeded, trimmed)
    # first batch with plain ONNX Runtime inference.
    with np.load(a) as z:
        data = {k: z[k] for k in z.files}
    batches = Batches(
        data,
        8,
        seed=0,
        drop_last=False,
        lengths=row_lengths(data["attention_mask"], 1),
        trim_axes={"input_ids": 1, "attention_mask": 1},
    )
    first = batches.take(batches.epoch_order()[0])
    y, t = _run(pruned, first), _run(load_model(dense), first)
    m = first["attention_mask"].astype(bool)
    want = float(np.mean((y - t)[m] ** 2))
    assert ra.first_loss == pytest.approx(want, rel=1e-4)
    # Changing the padded positions changes the model's outputs there, but not the loss.
    first_b = dict(first, input_ids=np.where(m, first["input_ids"], 7))
    assert not np.allclose(_run(pruned, first_b)[~m], y[~m])
    assert rb.first_loss == pytest.approx(ra.first_loss, rel=1e-5)
    # Without the mask the pads count, and the same two data sets give different losses.
    ua = training.finetune(pruned, masks, a, _opts(mask_input=None), teacher=dense)
    ub = training.finetune(pruned, masks, b, _opts(mask_input=None), teacher=dense)
    assert ua.first_loss != pytest.approx(ub.first_loss, rel=1e-3)
    assert ra.batching["trimmed"] == ["attention_mask", "input_ids"]
    assert 0 < ra.batching["tokens_fed"] < ra.batching["tokens_untrimmed"]


@needs_runtime
def test_static_sequence_dim_warns_and_trains_untrimmed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dense = tiny_encoder(tmp_path / "static.onnx", seq=12)
    pruned, masks = prune_masks(load_model(dense))
    data = encoder_data(tmp_path / "d.npz")
    with caplog.at_level(logging.WARNING, logger="onnxsparse.finetune.run"):
        result = training.finetune(pruned, masks, data, _opts(steps=2), teacher=dense)
    assert any("sequence dim is fixed" in r.getMessage() for r in caplog.records)
    assert result.batching["trimmed"] == [] and result.steps == 2
    assert result.batching["tokens_fed"] == 0, "nothing was trimmed"


@needs_runtime
def test_trainable_sets_train_only_what_they_name_and_masked_weights_stay_zero(
    encoder: tuple[Path, Model, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    dense, pruned, masks = encoder
    data = encoder_data(tmp_path / "d.npz")
    eval_data = encoder_data(tmp_path / "e.npz", n=24, seed=5)
    result = training.finetune(
        pruned, masks, data, _opts(steps=30, lr=3e-3, eval_every=10), teacher=dense, eval_data=eval_data
    )
    assert set(result.train_sets) == {"weights", "biases", "norms", "embeddings"}
    assert set(result.changed) == {n for names in result.train_sets.values() for n in names}
    assert result.outside_mask_drift == 0.0
    after = {t.name: np.array(to_array(t, result.model)) for t in result.model.proto.graph.initializer}
    for name, mask in masks.items():
        assert not after[name][~mask].any(), f"{name} has non-zeros where its mask is 0"
        assert np.count_nonzero(after[name]) == np.count_nonzero(mask)
    # The curve: start, every 10 steps, end; the loss falls and the cosine rises.
    assert [p["step"] for p in result.curve] == [0, 10, 20, 30]
    assert result.curve[-1]["loss"] < result.curve[0]["loss"]
    assert result.curve[-1]["cosine"] > result.curve[0]["cosine"]
    only = training.finetune(pruned, masks, data, _opts(steps=3, train=("norms",)), teacher=dense)
    assert only.train_sets == {"norms": result.train_sets["norms"]}
    assert set(only.changed) == set(result.train_sets["norms"])


@needs_runtime
def test_bad_mask_input_and_data_are_one_line_errors(
    encoder: tuple[Path, Model, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    dense, pruned, masks = encoder
    data = encoder_data(tmp_path / "d.npz")
    with np.load(data) as z:
        good = {k: z[k] for k in z.files}
    np.savez(tmp_path / "two.npz", **{**good, "attention_mask": good["attention_mask"] * 2})
    np.savez(tmp_path / "f32.npz", **{**good, "input_ids": good["input_ids"].astype(np.float32)})
    np.savez(tmp_path / "rank.npz", **{**good, "input_ids": good["input_ids"][:, :, None]})
    np.savez(tmp_path / "name.npz", ids=good["input_ids"], attention_mask=good["attention_mask"])
    cases = [
        (data, _opts(mask_input="nope"), "mask input 'nope' is not a model input"),
        (tmp_path / "two.npz", _opts(), "holds 2: it must hold only 0 and 1"),
        (tmp_path / "f32.npz", _opts(), "input 'input_ids' is float32, the model takes int64"),
        (tmp_path / "rank.npz", _opts(), "(rank 3), the model takes rank 2"),
        (tmp_path / "name.npz", _opts(), "has no array for model input 'input_ids'"),
    ]
    for path, opts, message in cases:
        with pytest.raises(OnnxSparseError) as err:
            training.finetune(pruned, masks, path, opts, teacher=dense)
        assert message in str(err.value) and "\n" not in str(err.value), (message, str(err.value))
    with pytest.raises(OnnxSparseError, match=r"eval data .* has no array for model input 'input_ids'"):
        training.finetune(pruned, masks, data, _opts(), teacher=dense, eval_data=tmp_path / "name.npz")
    other = tiny_encoder(tmp_path / "wide.onnx", hidden=20)
    with pytest.raises(OnnxSparseError, match=r"teacher .*output hidden: float32\[batchxseqx20\] does not match"):
        training.finetune(pruned, masks, data, _opts(), teacher=other)


@needs_runtime
def test_adamw_is_pytorchs_formulation(tmp_path: Path) -> None:
    """One AdamW step on y = x @ W with MSE to labels, checked against the update written out in numpy.

    Gradients of ~1e-7 make the two AdamW formulations differ 4x: PyTorch's (ε after the bias correction)
    moves each weight by lr·g/(|g| + ε); Hugging Face's (onnxblock's default) by lr·g/(|g| + ε/√(1−β₂)).
    """
    import onnx
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [nh.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(tmp_path / "m.onnx"))
    x = (1e-5 * rng.standard_normal((16, 8))).astype(np.float32)  # small inputs, well-resolved residuals
    y = x @ w
    labels = (y + 0.1 * rng.standard_normal(y.shape)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=labels)
    mask = np.ones_like(w, bool)
    mask[::2, 0] = False
    lr = 1e-3
    opts = training.FinetuneOptions(steps=1, lr=lr, batch_size=16, loss="mse", labels="y", train=("weights",))
    result = training.finetune(load_model(tmp_path / "m.onnx"), {"w": mask}, tmp_path / "d.npz", opts)
    w1 = np.array(to_array(result.model.proto.graph.initializer[0], result.model))
    g = (2.0 / y.size) * x.T.astype(np.float64) @ ((x @ (w * mask)).astype(np.float64) - labels) * mask
    assert 1e-8 < np.median(np.abs(g[mask])) < 1e-6, "the gradients this test needs"
    torch_step = w - lr * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(w1[mask], torch_step[mask], rtol=0, atol=lr * 0.02)
    hf_step = w - lr * g / (np.abs(g) + 1e-8 / np.sqrt(1 - 0.999))
    assert np.abs(w1 - hf_step)[mask].max() > lr * 0.2, "not Hugging Face's formulation"
    assert not w1[~mask].any()


def test_tanh_gelu_cube_is_spelled_with_mul_in_the_training_copy() -> None:
    """ORT would fuse Pow(x, 3)-GELU into FastGelu, whose CPU gradient is slow; the copy spells x³ as x·x·x."""
    import onnx
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    c = {
        k: nh.from_array(np.array(v, np.float32), k)
        for k, v in (("three", 3.0), ("k", 0.044715), ("s", np.sqrt(2 / np.pi)), ("half", 0.5), ("one", 1.0))
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Pow", ["h", "three"], ["h3"]),
        helper.make_node("Mul", ["h3", "k"], ["kh3"]),
        helper.make_node("Add", ["h", "kh3"], ["inner"]),
        helper.make_node("Mul", ["inner", "s"], ["si"]),
        helper.make_node("Tanh", ["si"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]),
        helper.make_node("Mul", ["h", "half"], ["hh"]),
        helper.make_node("Mul", ["hh", "t1"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [nh.from_array(w, "w"), *c.values()],
    )
    model = Model(proto=helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    copy = training.training_copy(model, {"w": np.ones_like(w, bool)})
    assert not [n for n in copy.graph.node if n.op_type == "Pow"]
    assert [n.op_type for n in model.proto.graph.node].count("Pow") == 1, "the model itself keeps its Pow"
    onnx.checker.check_model(copy, full_check=True)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    got = ort.InferenceSession(copy.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _run(model, {"x": x}), rtol=1e-6, atol=1e-6)
