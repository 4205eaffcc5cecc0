"""Make ``fixtures/finetune_mlp.onnx``: a small MLP trained dense on a synthetic regression task.

Why a trained model: on random weights 2:4 pruning costs little that fine-tuning could win back, and
"recovery" would measure noise. This MLP first learns a smooth nonlinear map (the outputs of a fixed random
narrow tanh network on Gaussian inputs) to low error; 2:4 magnitude pruning then clearly hurts it, which is
the situation NVIDIA's prune → retrain recipe is for.

The layers cover the three weight layouts the fine-tune must keep the masks right on: MatMul ``B[K, N]``
(groups along axis 0), Gemm with ``transB=1`` (``B[N, K]``, groups along axis 1), plus a LayerNormalization
whose scale/bias the fine-tune may train. Training runs through onnxsparse's own fine-tune with all-True
masks and an MSE loss on labels (so this also exercises the label path). Inputs at test time are
``example_inputs(n, seed)`` (standard normal, 32 features), so the data need not be committed.

Run: ``python tools/make_finetune_fixture.py`` (needs the training runtime: ``onnxsparse setup-training``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D_IN, HIDDEN, D_OUT = 32, 128, 16
OUT = Path(__file__).resolve().parents[1] / "fixtures" / "finetune_mlp.onnx"


def example_inputs(n: int, seed: int) -> np.ndarray:
    """The input distribution the fixture was trained on."""
    return np.random.default_rng(seed).standard_normal((n, D_IN)).astype(np.float32)


def target_function(x: np.ndarray) -> np.ndarray:
    """The task: a fixed random two-layer tanh network of width 24 (narrower than the MLP, so a 2:4 MLP can fit it)."""
    rng = np.random.default_rng(1234)
    a = rng.standard_normal((D_IN, 24)) / np.sqrt(D_IN) * 1.5
    b = rng.standard_normal((24, D_OUT)) / np.sqrt(24) * 2.0
    return (np.tanh(x.astype(np.float64) @ a) @ b).astype(np.float32)


def build_untrained(seed: int = 0) -> onnx.ModelProto:
    """x → MatMul+Add → Relu → Gemm(transB=1) → LayerNorm → Relu → MatMul+Add → y."""
    rng = np.random.default_rng(seed)

    def init(shape: tuple[int, int], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    inits = [
        numpy_helper.from_array(init((D_IN, HIDDEN), D_IN), "fc1.weight"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "fc1.bias"),
        numpy_helper.from_array(init((HIDDEN, HIDDEN), HIDDEN), "fc2.weight"),  # [N, K]: Gemm transB=1
        numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "fc2.bias"),
        numpy_helper.from_array(np.ones(HIDDEN, np.float32), "ln.weight"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "ln.bias"),
        numpy_helper.from_array(init((HIDDEN, D_OUT), HIDDEN), "head.weight"),
        numpy_helper.from_array(np.zeros(D_OUT, np.float32), "head.bias"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["fc1.mm"], name="fc1"),
        helper.make_node("Add", ["fc1.mm", "fc1.bias"], ["fc1.out"], name="fc1.add"),
        helper.make_node("Relu", ["fc1.out"], ["act1"], name="act1"),
        helper.make_node("Gemm", ["act1", "fc2.weight", "fc2.bias"], ["fc2.out"], name="fc2", transB=1),
        helper.make_node(
            "LayerNormalization", ["fc2.out", "ln.weight", "ln.bias"], ["ln.out"], name="ln", axis=-1, epsilon=1e-5
        ),
        helper.make_node("Relu", ["ln.out"], ["act2"], name="act2"),
        helper.make_node("MatMul", ["act2", "head.weight"], ["head.mm"], name="head"),
        helper.make_node("Add", ["head.mm", "head.bias"], ["y"], name="head.add"),
    ]
    graph = helper.make_graph(
        nodes,
        "finetune_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", D_OUT])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxsparse-tools")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def train_dense(model: onnx.ModelProto, steps: int, samples: int) -> onnx.ModelProto:
    """Train every weight (all-True masks) on the task with MSE on labels, through onnxsparse's fine-tune."""
    from onnxsparse.finetune.run import FinetuneOptions, finetune
    from onnxsparse.ir.model_io import Model

    masks = {
        t.name: np.ones(tuple(t.dims), bool)
        for t in model.graph.initializer
        if t.name.endswith(".weight") and len(t.dims) == 2
    }
    with tempfile.TemporaryDirectory() as tmp:
        x = example_inputs(samples, seed=7)
        data = Path(tmp) / "train.npz"
        np.savez(data, x=x, y=target_function(x))
        opts = FinetuneOptions(
            steps=steps, lr=3e-3, batch_size=64, loss="mse", labels="y", train=("weights", "biases", "norms")
        )
        result = finetune(Model(proto=model), masks, data, opts, progress=True)
    print(f"dense training: loss {result.first_loss:.4f} -> {result.last_loss:.5f} in {result.seconds:.1f}s")
    return result.model.proto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("-o", "--output", type=Path, default=OUT)
    args = parser.parse_args()
    model = train_dense(build_untrained(), args.steps, args.samples)
    x = example_inputs(2048, seed=99)
    import onnxruntime as ort

    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    ref = target_function(x)
    print(f"held-out MSE {float(np.mean((y - ref) ** 2)):.5f} (target variance {float(ref.var()):.4f})")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(args.output))
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
