"""The training artefacts: the loss graph (masked MSE, MSE, cross-entropy) and ``generate_artifacts``.

Loaded by the training worker from this file's folder (``training_worker._sibling``), in the process that
runs ONNX Runtime's training build: it imports onnx and ``onnxruntime.training`` inside its functions only,
and nothing else from onnxsparse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _masked_mse(onnxblock: Any, mask_name: str, mask_rank: int) -> Any:
    """MSE averaged over the positions where ``mask_name`` is non-zero, broadcast over the output's trailing
    dims: sum(m·(y−t)²) / (max(sum(m), 1) · size(y)/size(m)).

    onnxblock has no masked loss, so this block writes the nodes itself (``onnxblock.Block.build`` may edit
    ``self.base``, the model being built, as its own blocks do). The mask is a graph input the model already
    reads; it is cast to bool and back so any non-zero counts as one.
    """
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.training.onnxblock import _graph_utils, blocks

    class _MaskedMSE(blocks.Block):  # type: ignore[misc, name-defined]
        def build(self, output: str, target: str) -> str:
            graph = self.base.graph
            if not _graph_utils.node_arg_exists(self.base, target):
                target = blocks.InputLike(output)(target)
            p = _graph_utils.generate_graph_name("onnxsparse_mmse")
            out_rank = next((len(v.type.tensor_type.shape.dim) for v in graph.output if v.name == output), None)
            extra = [] if out_rank is None else list(range(mask_rank, out_rank))
            graph.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), p + "_one")])
            nodes = [
                helper.make_node("Cast", [mask_name], [p + "_b"], to=TensorProto.BOOL),
                helper.make_node("Cast", [p + "_b"], [p + "_m"], to=TensorProto.FLOAT),
                helper.make_node("Sub", [output, target], [p + "_d"]),
                helper.make_node("Mul", [p + "_d", p + "_d"], [p + "_sq"]),
            ]
            m = p + "_m"
            if extra:
                graph.initializer.append(numpy_helper.from_array(np.array(extra, np.int64), p + "_axes"))
                nodes.append(helper.make_node("Unsqueeze", [p + "_m", p + "_axes"], [p + "_mu"]))
                m = p + "_mu"
            nodes += [
                helper.make_node("Mul", [p + "_sq", m], [p + "_msq"]),
                helper.make_node("ReduceSum", [p + "_msq"], [p + "_num"], keepdims=0),
                helper.make_node("ReduceSum", [p + "_m"], [p + "_cnt"], keepdims=0),
                helper.make_node("Max", [p + "_cnt", p + "_one"], [p + "_cnt1"]),
                helper.make_node("Size", [output], [p + "_sy"]),
                helper.make_node("Size", [p + "_m"], [p + "_sm"]),
                helper.make_node("Div", [p + "_sy", p + "_sm"], [p + "_tr"]),
                helper.make_node("Cast", [p + "_tr"], [p + "_trf"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [p + "_cnt1", p + "_trf"], [p + "_den"]),
                helper.make_node("Div", [p + "_num", p + "_den"], [p + "_loss"]),
            ]
            graph.node.extend(nodes)
            return p + "_loss"

    return _MaskedMSE()


def _loss_block(onnxblock: Any, job: dict[str, Any]) -> Any:
    """Sum of per-output MSE losses (distillation / regression; masked where the job names a mask input), or
    cross-entropy on one output."""
    kind, outputs = job["loss"], list(job["loss_outputs"])
    mask = job.get("mask") or {}
    masked = set(mask.get("masked_outputs", ()))

    class _Loss(onnxblock.Block):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            if kind == "ce":
                self._parts = [onnxblock.loss.CrossEntropyLoss()]
            else:
                self._parts = [
                    _masked_mse(onnxblock, mask["name"], int(mask["rank"])) if o in masked else onnxblock.loss.MSELoss()
                    for o in outputs
                ]
            self._add = [onnxblock.blocks.Add() for _ in outputs[1:]]

        def build(self, *graph_outputs: str) -> str:
            if kind == "ce":
                return self._parts[0](outputs[0], "onnxsparse_labels")
            total = self._parts[0](outputs[0], target_name(0))
            for i in range(1, len(outputs)):
                total = self._add[i - 1](total, self._parts[i](outputs[i], target_name(i)))
            return total

    return _Loss()


#: AdamW's epsilon, PyTorch's default. Distillation gradients are small (a weight's is ~1e-5 on MiniLM-L3),
#: and onnxblock's default of 1e-6 damped updates measurably (0.969 vs 0.971 cosine after 300 steps).
ADAM_EPS = 1e-8


def _adamw(onnxblock: Any, weight_decay: float, eps: float) -> Any:
    """onnxblock's AdamW in PyTorch's formulation (``adam_mode=0``: ε added after the bias correction).

    onnxblock hard-codes ``adam_mode=1`` (Hugging Face's AdamW: ε added to √v before the step is rescaled by
    √(1−β₂ᵗ)), which makes ε ~30× larger in the first steps than ``torch.optim.AdamW``'s; the ORT kernel
    implements both, so this subclass only changes the attribute.
    """

    from onnxruntime.training.onnxblock.optim import optim as optim_blocks

    class _TorchAdamWNode(optim_blocks.AdamWOptimizer):  # type: ignore[misc, name-defined]
        def _build_optimizer_node(
            self, input_names: Any, output_name: str, node_name: str, node_attributes: dict[str, Any]
        ) -> str:
            attrs = {**node_attributes, "adam_mode": 0}
            return str(super()._build_optimizer_node(input_names, output_name, node_name, attrs))

    optimizer = onnxblock.optim.AdamW(eps=eps, weight_decay=weight_decay)
    # onnxblock.optim.AdamW builds its node through this block; swap in the one that writes adam_mode=0
    optimizer._adamw = _TorchAdamWNode(bias_correction=True, betas=(0.9, 0.999), eps=eps, weight_decay=weight_decay)
    return optimizer


def target_name(i: int) -> str:
    return f"onnxsparse_target_{i}"


def build_artifacts(job: dict[str, Any], artifacts_mod: Any, out_dir: Path, requires_grad: list[str]) -> None:
    """Training / eval / optimizer models and the checkpoint for the job's graph.

    The eval model also returns the loss outputs themselves (after the loss), so the eval curve's cosine to
    the teacher comes from the same session that computes the eval loss.
    """
    import onnx
    from onnxruntime.training import onnxblock

    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(job["train_model"])
    loss = _loss_block(onnxblock, job)
    optimizer = _adamw(onnxblock, float(job.get("weight_decay", 0.0)), float(job.get("adam_eps", ADAM_EPS)))
    artifacts_mod.generate_artifacts(
        model,
        requires_grad=requires_grad,
        frozen_params=job["frozen"],
        loss=loss,
        optimizer=optimizer,
        artifact_directory=str(out_dir),
    )
    # onnx >= 1.17 stamps a newer IR version than ORT 1.19 reads.
    ir = int(job.get("ir_version", 10))
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        path = out_dir / name
        m = onnx.load(str(path))
        changed = m.ir_version > ir
        m.ir_version = min(m.ir_version, ir)
        if name == "eval_model.onnx" and job.get("eval_data"):
            for out in job["loss_outputs"]:
                m.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
            changed = True
        if changed:
            onnx.save(m, str(path))
