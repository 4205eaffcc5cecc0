# mypy: disable-error-code="name-defined"
"""Export the real-model corpus into ``fixtures/corpus/`` (needs torch; run by hand, not by the tests).

    python -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers onnx
    /work/venv-torch/bin/python tools/export_corpus.py

Each model is exported with ``torch.onnx.export`` (TorchScript exporter, dynamic axes where natural), its float
weights are stripped into an external-data reference that is not committed (``tools/corpus.py`` regenerates
them from a seed at test time, so the test suite never needs torch), and a manifest entry records the inputs
with example shapes and facts the tests check against. The facts come from the *torch modules*, not from the
ONNX graph, so they are an oracle independent of onnxsparse's own layer discovery:

- ``weighted_layers``: Conv2d + Linear modules (each becomes one Conv/Gemm/MatMul with a constant weight);
- ``eligible_2_4``: those whose reduction size (C_in/groups, in_features) is a multiple of 4;
- ``params`` / ``eligible_params``: their weight elements (the coverage basis when FLOPs are unknown);
- ``macs`` / ``eligible_macs``: multiply-accumulates of those layers at the example shape (forward hooks), so
  the FLOP-weighted 2:4 coverage after pruning is ``eligible_macs / macs``.
"""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import CORPUS_DIR, MANIFEST, strip_weights

warnings.filterwarnings("ignore")


def _torch() -> Any:
    import torch

    return torch


def layer_facts(module: Any, args: tuple[Any, ...]) -> dict[str, Any]:
    """Count Conv2d/Linear modules and their MACs at ``args`` with forward hooks."""
    torch = _torch()
    nn = torch.nn
    facts = {"weighted_layers": 0, "eligible_2_4": 0, "params": 0, "eligible_params": 0, "macs": 0, "eligible_macs": 0}
    hooks = []

    def hook(mod: Any, inp: Any, out: Any) -> None:
        if isinstance(mod, nn.Conv2d):
            k = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            macs = int(out.numel()) * k
            eligible = (mod.in_channels // mod.groups) % 4 == 0
        else:
            macs = int(out.numel()) * mod.in_features
            eligible = mod.in_features % 4 == 0
        facts["macs"] += macs
        facts["eligible_macs"] += macs if eligible else 0

    for mod in module.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            facts["weighted_layers"] += 1
            red = mod.in_channels // mod.groups if isinstance(mod, nn.Conv2d) else mod.in_features
            facts["eligible_2_4"] += int(red % 4 == 0)
            facts["params"] += int(mod.weight.numel())
            facts["eligible_params"] += int(mod.weight.numel()) if red % 4 == 0 else 0
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        module(*args)
    for h in hooks:
        h.remove()
    return facts


def export(
    module: Any,
    args: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
    opset: int,
) -> onnx.ModelProto:
    torch = _torch()
    buf = io.BytesIO()
    torch.onnx.export(
        module,
        args,
        buf,
        dynamo=False,
        opset_version=opset,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        do_constant_folding=True,
    )
    return onnx.load_from_string(buf.getvalue())


def _input_spec(name: str, t: Any, value_range: tuple[int, int] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "shape": list(t.shape), "dtype": str(t.numpy().dtype)}
    if value_range is not None:
        spec["range"] = list(value_range)
    return spec


# ------------------------------------------------------------------------------------------------ models


def torchvision_models() -> list[dict[str, Any]]:
    import torchvision

    torch = _torch()
    out = []
    for name in ("resnet18", "mobilenet_v3_small", "efficientnet_b0"):
        torch.manual_seed(0)
        m = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.randn(1, 3, 96, 96)
        axes = {"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
        out.append(
            dict(
                name=name,
                module=m,
                args=(x,),
                inputs=[_input_spec("input", x)],
                input_names=["input"],
                output_names=["logits"],
                axes=axes,
                opset=17,
            )
        )
    return out


def _kwargs_wrapper(model: Any, names: list[str]) -> Any:
    """transformers' forward() takes keyword arguments and returns a ModelOutput: give the exporter a plain
    positional forward returning a tuple."""
    torch = _torch()

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> tuple[Any, Any]:
            out = self.model(**dict(zip(names, args, strict=True)), return_dict=True)
            return out.last_hidden_state, out.pooler_output

    return Wrapper().eval()


def transformer_models() -> list[dict[str, Any]]:
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    torch = _torch()
    torch.manual_seed(0)
    bert = BertModel(BertConfig(attn_implementation="eager")).eval()  # BERT-base: 12 x 768, random weights
    ids = torch.randint(0, bert.config.vocab_size, (1, 32))
    mask = torch.ones(1, 32, dtype=torch.int64)
    types = torch.zeros(1, 32, dtype=torch.int64)
    seq = {0: "batch", 1: "sequence"}
    bert_entry = dict(
        name="bert_base",
        module=_kwargs_wrapper(bert, ["input_ids", "attention_mask", "token_type_ids"]),
        args=(ids, mask, types),
        inputs=[
            _input_spec("input_ids", ids, (0, bert.config.vocab_size)),
            _input_spec("attention_mask", mask, (1, 2)),
            _input_spec("token_type_ids", types, (0, 2)),
        ],
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state", "pooler_output"],
        axes={
            "input_ids": seq,
            "attention_mask": seq,
            "token_type_ids": seq,
            "last_hidden_state": seq,
            "pooler_output": {0: "batch"},
        },
        opset=17,
    )
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            hidden_size=192,
            num_hidden_layers=12,
            num_attention_heads=3,
            intermediate_size=768,
            image_size=224,
            patch_size=16,
            attn_implementation="eager",
        )
    ).eval()
    px = torch.randn(1, 3, 224, 224)
    vit_entry = dict(
        name="vit_tiny",
        module=_kwargs_wrapper(vit, ["pixel_values"]),
        args=(px,),
        inputs=[_input_spec("pixel_values", px)],
        input_names=["pixel_values"],
        output_names=["last_hidden_state", "pooler_output"],
        axes={"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}},
        opset=17,
    )
    return [bert_entry, vit_entry]


def control_flow_models() -> list[dict[str, Any]]:
    torch = _torch()
    nn = torch.nn

    class IfNet(nn.Module):
        """Data-dependent branch: each branch holds its own Linear (MatMul/Gemm inside If branches)."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(64, 64)
            self.a = nn.Linear(64, 32)
            self.b = nn.Linear(64, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.stem(x))
            if bool(h.sum() > 0):
                return self.a(h)
            return self.b(h) * 2.0

    class LoopNet(nn.Module):
        """A recurrence over a run-time trip count: the Linear's weight lives in the outer graph."""

        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.Linear(64, 64)
            self.head = nn.Linear(64, 16)

        def forward(self, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            h = x
            for _ in range(int(steps)):
                h = torch.tanh(self.cell(h)) + x
            return self.head(h)

    torch.manual_seed(0)
    ifnet = IfNet().eval()
    x = torch.randn(2, 64)
    torch.manual_seed(0)
    loopnet = LoopNet().eval()
    steps = torch.tensor(3, dtype=torch.int64)
    return [
        dict(
            name="if_branches",
            module=torch.jit.script(ifnet),
            facts_module=ifnet,
            args=(x,),
            inputs=[_input_spec("x", x)],
            input_names=["x"],
            output_names=["y"],
            axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset=17,
        ),
        dict(
            name="loop_recurrence",
            module=torch.jit.script(loopnet),
            facts_module=loopnet,
            args=(x, steps),
            inputs=[_input_spec("x", x), {"name": "steps", "shape": [], "dtype": "int64", "range": [1, 5]}],
            input_names=["x", "steps"],
            output_names=["y"],
            axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset=17,
        ),
    ]


def opset_series() -> list[dict[str, Any]]:
    """One small CNN + MLP head at every opset 11..21 (torch where it can, onnx's converter beyond)."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    out = []
    for opset in range(11, 22):
        out.append(
            dict(
                name=f"small_cnn_opset{opset}",
                module=m,
                args=(x,),
                inputs=[_input_spec("input", x)],
                input_names=["input"],
                output_names=["logits"],
                axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset=opset,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ main


def perturb(module: Any) -> None:
    """Make every float parameter/buffer distinct, as in a trained model.

    Freshly initialised models hold many identical tensors (zero biases, unit LayerNorm scales) which the
    exporter deduplicates into one initializer fanned out through Identity nodes; trained models never look
    like that. The values themselves do not matter: the tests regenerate them from a seed.
    """
    torch = _torch()
    if getattr(module, "_corpus_perturbed", False):  # the opset series exports one module many times
        return
    module._corpus_perturbed = True
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.add_(torch.rand(t.shape, generator=gen) * 1e-2)


def build(entry: dict[str, Any]) -> dict[str, Any]:
    torch = _torch()
    perturb(entry.get("facts_module", entry["module"]))
    opset = entry["opset"]
    max_torch = 20
    proto = export(
        entry["module"],
        entry["args"],
        entry["input_names"],
        entry["output_names"],
        entry["axes"],
        min(opset, max_torch),
    )
    if opset > max_torch:
        proto = onnx.version_converter.convert_version(proto, opset)
    file = entry["name"] + ".onnx"
    onnx.checker.check_model(proto, full_check=True)  # before stripping: the data file never exists here
    data_bytes = strip_weights(proto, file + ".data")
    onnx.save(proto, str(CORPUS_DIR / file))
    facts = layer_facts(entry.get("facts_module", entry["module"]), entry["args"])
    ops: dict[str, int] = {}
    stack = [proto.graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
            stack.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    facts["ops"] = {k: v for k, v in sorted(ops.items()) if k in ("Conv", "Gemm", "MatMul", "If", "Loop")}
    torch.manual_seed(0)
    return {
        "name": entry["name"],
        "file": file,
        "opset": opset,
        "seed": 0,
        "inputs": entry["inputs"],
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in (entry["axes"] or {}).items()},
        "weight_bytes": data_bytes,
        "facts": facts,
    }


def main() -> None:
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])
    entries = torchvision_models() + transformer_models() + control_flow_models() + opset_series()
    old = {e["name"]: e for e in json.loads(MANIFEST.read_text())["models"]} if MANIFEST.exists() else {}
    models = []
    for entry in entries:
        if only and entry["name"] not in only:
            if entry["name"] in old:
                models.append(old[entry["name"]])
            continue
        info = build(entry)
        size = (CORPUS_DIR / info["file"]).stat().st_size
        print(
            f"{info['name']:24s} graph {size / 1024:7.1f} KB  weights {info['weight_bytes'] / 2**20:7.1f} MB  "
            f"{info['facts']}"
        )
        models.append(info)
    MANIFEST.write_text(json.dumps({"generator": "tools/export_corpus.py", "models": models}, indent=1) + "\n")
    (CORPUS_DIR / ".gitignore").write_text("*.data\n")
    np.random.seed(0)


if __name__ == "__main__":
    main()
