"""Does ``onnxsparse bench``'s end-to-end estimate hold? Run whole models dense and 2:4-sparse on the GPU and compare.

On the device (an H200): transformers' BERT-base encoder and torchvision's ResNet-50, random weights, fp16,
each forward captured once in a CUDA graph and replayed (steady state, no host overhead). Variants:

* ``dense_stock``: the model as its library runs it (BERT: F.linear with the bias in cuBLASLt's epilogue,
  Gelu a separate kernel; ResNet-50: BatchNorm folded into the convs, cuDNN convs, Relu separate);
* ``dense``: the same, but every layer ``bench`` times runs as ``bench`` times it dense: a cuBLASLt GEMM with
  its epilogue fused (BERT FFN-up: bias + Gelu via ``torch._addmm_activation``; ResNet-50: each 1×1
  stride-1 conv as a GEMM over NHWC (channels_last) with bias (+ Relu) fused);
* ``sparse``: each layer that ``bench`` advises to run sparse is pruned 2:4 and runs on its own cached,
  ``matmul_search``-tuned cuSPARSELt plan (``onnxsparse.bench.gpu.SparsePlan``) with bias (+ Relu/Gelu)
  fused through ``BIAS_POINTER`` / ``ACTIVATION_*``; the others stay as in ``dense``.

Then ``onnxsparse bench`` runs on the model's ONNX export at the same shapes with ``--total-ms`` = the
measured ``dense`` total, and its predicted sparse total is compared with the measured one (criterion:
within 5%). Layers the sparse runtime here cannot run as one GEMM (ResNet-50's 3×3 and 7×7 convs, the
stride-2 1×1 downsamples, the fc with N=1000) are passed to ``bench --exclude`` and stay dense.
Every sparse model's output is checked against the dense model with the same pruned weights.

    python3 tools/bench_e2e_check.py --out DIR [--models bert,resnet50] [--bert-shapes 8x128,...]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

#: a forward is replayed this many times between two events; the median of REPEATS such blocks is kept
REPLAYS, REPEATS = 20, 7
TOLERANCE = 0.05


# ---------------------------------------------------------------- GEMM modules (x[..., K] -> y[..., N])
class DenseGemm(nn.Module):
    """y = act(x·Wᵀ + b) through cuBLASLt with the epilogue fused (what ``bench`` times dense)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None) -> None:
        super().__init__()
        self.weight, self.bias, self.act = weight, bias, act

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        wt = self.weight.t()
        if self.bias is None:
            y = x2 @ wt
            return y.relu_() if self.act == "relu" else (F.gelu(y, approximate="tanh") if self.act else y)
        if self.act is None:
            return torch.addmm(self.bias, x2, wt)
        return torch._addmm_activation(self.bias, x2, wt, use_gelu=self.act == "gelu")


class SparseGemm(nn.Module):
    """y = act(x·Wᵀ + b) on one cached cuSPARSELt plan (bias/activation fused in the plan). Rows are padded up
    to the plan's M when the real M is not a multiple of 16 (as a per-bucket plan is used)."""

    def __init__(self, plan: Any, n: int, separate_act: str | None = None) -> None:
        super().__init__()
        self.plan, self.n, self.separate_act = plan, n, separate_act

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        m = x2.shape[0]
        if m != self.plan.m:
            x2 = F.pad(x2, (0, 0, 0, self.plan.m - m))
        x2 = x2.contiguous()
        y = torch.empty(self.plan.m, self.n, device=x2.device, dtype=x2.dtype)
        self.plan.set_stream(torch.cuda.current_stream().cuda_stream)
        self.plan.run(x2, y)
        if self.separate_act == "relu":  # cuSPARSELt rejected fusing it: its own kernel, as bench times it
            y.relu_()
        elif self.separate_act == "gelu":
            torch._C._nn.gelu_(y, approximate="tanh")
        return y[:m] if m != self.plan.m else y


class Linear2d(nn.Module):
    """An nn.Linear replacement: flattens the leading dims, runs a GEMM module, restores them."""

    def __init__(self, gemm: nn.Module, n: int) -> None:
        super().__init__()
        self.gemm, self.n = gemm, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.n)


class Conv1x1(nn.Module):
    """A 1×1 stride-1 conv as a plain GEMM over NHWC: a channels_last [B, C, H, W] tensor *is* [B·H·W, C]."""

    def __init__(self, gemm: nn.Module, n: int) -> None:
        super().__init__()
        self.gemm, self.n = gemm, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.contiguous(memory_format=torch.channels_last)
        y = self.gemm(x.permute(0, 2, 3, 1).reshape(b * h * w, c))
        return y.view(b, h, w, self.n).permute(0, 3, 1, 2)


def prune_2to4(w: torch.Tensor) -> torch.Tensor:
    from onnxsparse.bench.gpu import prune_2to4_rows

    return prune_2to4_rows(w)


# ---------------------------------------------------------------- timing
def graphed(fn: Any) -> Any:
    """Capture ``fn()`` in a CUDA graph (after side-stream warm-up); returns (replay, output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def time_graphs(graphs: dict[str, Any], settle_s: float = 1.0) -> dict[str, dict[str, Any]]:
    """Per-forward ms of each graph: warm up for ``settle_s``, then REPEATS blocks of REPLAYS replays per
    graph, the graphs alternating within each repetition (order reversed every other one)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < settle_s:
        for g in graphs.values():
            g.replay()
        torch.cuda.synchronize()
    runs: dict[str, list[float]] = {k: [] for k in graphs}
    names = list(graphs)
    for r in range(REPEATS):
        for name in names if r % 2 == 0 else names[::-1]:
            start.record()
            for _ in range(REPLAYS):
                graphs[name].replay()
            end.record()
            end.synchronize()
            runs[name].append(start.elapsed_time(end) / REPLAYS)
    return {k: {"ms": statistics.median(v), "runs": v} for k, v in runs.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        return float("inf")
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ---------------------------------------------------------------- bench (the thing checked)
def run_bench(
    onnx_path: Path, shapes: str, total_ms: float | None, exclude: str | None, out_json: Path, quick: bool
) -> dict[str, Any]:
    from onnxsparse.commands.bench import command

    args = [str(onnx_path), "--shapes", shapes, "--json", str(out_json)]
    if total_ms is not None:
        args += ["--total-ms", f"{total_ms:.6f}"]
    if exclude:
        args += ["--exclude", exclude]
    if quick:
        args += ["--repeats", "3", "--gpu-warmup", "0.5"]
    command.main(args, standalone_mode=False)
    return json.loads(out_json.read_text())


def onnx_to_module(name: str, model: nn.Module) -> str | None:
    """The torch module an exported ONNX node belongs to: '/model/encoder/layer.0/attention/self/query/MatMul'
    → 'encoder.layer.0.attention.self.query'; '/layer1/layer1.0/conv1/Conv' → 'layer1.0.conv1'."""
    segs = [s for s in name.split("/") if s][:-1]
    attrs: list[str] = []
    prev = ""
    for seg in segs:
        attrs.append(seg[len(prev) + 1 :] if prev and seg.startswith(prev + ".") else seg)
        prev = seg
    for i in range(len(attrs)):
        path = ".".join(attrs[i:])
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def sparse_gemm(lt: Any, wp: torch.Tensor, m_plan: int, bias: torch.Tensor | None, act: str | None) -> SparseGemm:
    """A tuned plan for this layer's pruned weight, with the epilogue fused as bench fuses it."""
    from onnxsparse.bench import gpu
    from onnxsparse.bench.fused import epilogue_plan

    x = torch.randn(m_plan, wp.shape[1], device="cuda").half()
    y = torch.empty(m_plan, wp.shape[0], device="cuda", dtype=torch.float16)
    rounds = gpu.rounds_for(m_plan, wp.shape[0], wp.shape[1], 2)
    plan, _, separate = epilogue_plan(lt, wp, x, y, "fp16", rounds, bias, act)
    return SparseGemm(plan, wp.shape[0], separate)


def compare(
    report: dict[str, Any],
    timings: dict[str, dict[str, Any]],
    errors: dict[str, float],
    layers_dense: list[str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    e2e = report["e2e"]["e2e"]
    meas = timings["sparse"]["ms"]
    pred = e2e["total_sparse_ms"]
    row = {
        "dense_stock_ms": timings["dense_stock"]["ms"],
        "dense_ms": timings["dense"]["ms"],
        "sparse_ms": meas,
        "measured_speedup": timings["dense"]["ms"] / meas,
        "measured_speedup_vs_stock": timings["dense_stock"]["ms"] / meas,
        "predicted_sparse_ms": pred,
        "predicted_speedup": e2e["speedup"],
        "gemm_share": e2e["gemm_share"],
        "gemm_only_speedup": report["e2e"]["gemm_speedup"],
        "prediction_error": (pred - meas) / meas,
        "within_5pct": abs(pred - meas) <= TOLERANCE * meas,
        "output_rel_error": errors,
        "sparse_layers": report["summary"]["sparse_layers"],
        "keep_dense": report["summary"]["keep_dense"],
        "stay_dense_runtime": layers_dense,
        "timings": timings,
    }
    row.update(extra)
    # the same estimate fed the dense total measured beside the sparse run (the one above was measured first)
    from onnxsparse.bench.e2e import amdahl

    again = amdahl(timings["dense"]["ms"], report["e2e"]["gemm_dense_ms"], report["e2e"]["gemm_best_ms"])
    row["predicted_sparse_ms_same_run_total"] = again["total_sparse_ms"]
    row["prediction_error_same_run_total"] = (again["total_sparse_ms"] - meas) / meas
    return row


# ---------------------------------------------------------------- BERT-base
def check_bert(batch: int, seq: int, onnx_path: Path, out_dir: Path, lt: Any, quick: bool) -> dict[str, Any]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(), add_pooling_layer=True).half().cuda().eval()
    ids = torch.randint(0, 30522, (batch, seq), device="cuda")
    tt = torch.zeros_like(ids)

    def fwd() -> torch.Tensor:
        return model(input_ids=ids, token_type_ids=tt).last_hidden_state

    timings_graphs: dict[str, Any] = {}
    outs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        timings_graphs["dense_stock"], outs["dense_stock"] = graphed(fwd)
        # dense: FFN-up with bias + Gelu in the cuBLASLt epilogue, as bench times it dense (the stock modules
        # stay referenced by the first graph)
        stock = [(layer.intermediate.dense, layer.intermediate.intermediate_act_fn) for layer in model.encoder.layer]
        for layer, (lin, _) in zip(model.encoder.layer, stock, strict=True):
            layer.intermediate.dense = Linear2d(DenseGemm(lin.weight, lin.bias, "gelu"), lin.out_features)
            layer.intermediate.intermediate_act_fn = nn.Identity()
        timings_graphs["dense"], outs["dense"] = graphed(fwd)
    shapes = ",".join(f"{n}:{batch}x{seq}" for n in ("input_ids", "attention_mask", "token_type_ids"))
    # total first (needs no plans), then bench with it, then the sparse model following bench's advice
    pre = time_graphs({k: v for k, v in timings_graphs.items()})
    report = run_bench(onnx_path, shapes, pre["dense"]["ms"], None, out_dir / f"bench_bert_{batch}x{seq}.json", quick)
    choice = {r["name"]: r for r in report["layers"]}
    ref_mods: list[tuple[nn.Module, str, nn.Module]] = []
    sparse_mods: list[tuple[nn.Module, str, nn.Module]] = []
    with torch.inference_mode():
        for name, r in choice.items():
            if r["choice"] != "sparse":
                continue
            path = onnx_to_module(name, model)
            if path is None:
                raise SystemExit(f"no torch module for ONNX layer {name}")
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            mod = parent.get_submodule(attr)
            if isinstance(mod, Linear2d):  # FFN-up, already a fused dense GEMM
                w, b, act = mod.gemm.weight, mod.gemm.bias, "gelu"
            else:
                w, b, act = mod.weight, mod.bias, None
            wp = prune_2to4(w)
            m_plan = r["m_padded"]
            n = w.shape[0]
            sparse_mods.append((parent, attr, Linear2d(sparse_gemm(lt, wp, m_plan, b, act), n)))
            ref_mods.append((parent, attr, Linear2d(DenseGemm(wp, b, act), n)))
        for parent, attr, mod in ref_mods:  # the dense model with the same pruned weights: the reference
            setattr(parent, attr, mod)
        ref = fwd().clone()
        for parent, attr, mod in sparse_mods:
            setattr(parent, attr, mod)
        timings_graphs["sparse"], outs["sparse"] = graphed(fwd)
    timings = time_graphs(timings_graphs)
    errors = {
        "sparse_vs_pruned_dense": rel_err(outs["sparse"], ref),
        "dense_vs_stock": rel_err(outs["dense"], outs["dense_stock"]),
    }
    return compare(
        report,
        timings,
        errors,
        [],
        {"model": "bert-base", "shape": f"{batch}x{seq}", "dense_total_fed_to_bench_ms": pre["dense"]["ms"]},
    )


# ---------------------------------------------------------------- ResNet-50
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    )
    fused.weight.data = conv.weight.data * scale.reshape(-1, 1, 1, 1)
    b = conv.bias.data if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.data = (b - bn.running_mean) * scale + bn.bias
    return fused


class Block(nn.Module):
    """torchvision's Bottleneck with BatchNorm folded; conv1/conv3/downsample are replaceable GEMM modules
    that may fuse the Relu (``fuse1``: conv1's Relu is inside the module)."""

    def __init__(self, b: Any) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = fold_bn(b.conv1, b.bn1), fold_bn(b.conv2, b.bn2), fold_bn(b.conv3, b.bn3)
        self.downsample = fold_bn(b.downsample[0], b.downsample[1]) if b.downsample is not None else None
        self.fuse1 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = h if self.fuse1 else F.relu(h)
        h = F.relu(self.conv2(h))
        h = self.conv3(h)
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(h + identity)


class ResNet(nn.Module):
    def __init__(self, tv: Any) -> None:
        super().__init__()
        self.conv1 = fold_bn(tv.conv1, tv.bn1)
        self.maxpool = tv.maxpool
        for i in range(1, 5):
            setattr(self, f"layer{i}", nn.Sequential(*[Block(b) for b in getattr(tv, f"layer{i}")]))
        self.fc = tv.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet50_folded() -> ResNet:
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None).eval()
    for m in tv.modules():  # keep fp16 activations in range through 16 residual blocks of random weights
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=(1.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1])) ** 0.5)
    for b in [b for i in range(1, 5) for b in getattr(tv, f"layer{i}")]:
        b.conv3.weight.data *= 0.3
    return ResNet(tv).eval()


def gemm_convs(model: ResNet) -> list[tuple[str, Block, str, str | None]]:
    """(module path, block, attribute, fused activation) of the 1×1 stride-1 convs: the ones run as GEMMs."""
    out = []
    for i in range(1, 5):
        for j, blk in enumerate(getattr(model, f"layer{i}")):
            out.append((f"layer{i}.{j}.conv1", blk, "conv1", "relu"))
            out.append((f"layer{i}.{j}.conv3", blk, "conv3", None))
            if blk.downsample is not None and blk.downsample.stride == (1, 1):
                out.append((f"layer{i}.{j}.downsample", blk, "downsample", None))
    return out


def export_resnet(model: ResNet, path: Path) -> list[str]:
    """ONNX export (TorchScript exporter; the dynamo exporter if that one is gone); the node names of the
    exported Conv/Gemm layers."""
    import onnx

    x = torch.randn(1, 3, 224, 224)
    try:
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}},
        )
    except Exception as e:  # fall back, and say why
        print(f"TorchScript ONNX export failed ({e}); using the dynamo exporter", flush=True)
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )
    proto = onnx.load(str(path), load_external_data=False)
    return [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


def check_resnet(batch: int, onnx_path: Path, names: list[str], out_dir: Path, lt: Any, quick: bool) -> dict[str, Any]:
    model = resnet50_folded().half().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").half().contiguous(memory_format=torch.channels_last)
    convs = gemm_convs(model)
    gemm_paths = {p for p, *_ in convs}
    mods = {name: onnx_to_module(name, model) for name in names}
    stay = [n for n, p in mods.items() if p not in gemm_paths]
    exclude = "^(" + "|".join(re.escape(n) for n in stay) + ")$"
    graphs: dict[str, Any] = {}
    outs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        graphs["dense_stock"], outs["dense_stock"] = graphed(lambda: model(x))
        originals = {p: getattr(blk, attr) for p, blk, attr, _ in convs}
        for p, blk, attr, act in convs:
            conv = originals[p]
            n = conv.out_channels
            w = conv.weight.reshape(n, -1)
            setattr(blk, attr, Conv1x1(DenseGemm(w, conv.bias, act), n))
            if act:
                blk.fuse1 = True
        graphs["dense"], outs["dense"] = graphed(lambda: model(x))
    pre = time_graphs(dict(graphs))
    report = run_bench(
        onnx_path,
        f"input:{batch}x3x224x224",
        pre["dense"]["ms"],
        exclude,
        out_dir / f"bench_resnet50_{batch}.json",
        quick,
    )
    choice = {mods[r["name"]]: r for r in report["layers"] if r["name"] in mods}
    with torch.inference_mode():
        swaps = []
        for p, blk, attr, act in convs:
            r = choice.get(p)
            if r is None or r["choice"] != "sparse":
                continue
            conv = originals[p]
            n = conv.out_channels
            wp = prune_2to4(conv.weight.reshape(n, -1).contiguous())
            sparse = Conv1x1(sparse_gemm(lt, wp, r["m_padded"], conv.bias, act), n)
            swaps.append((blk, attr, sparse, Conv1x1(DenseGemm(wp, conv.bias, act), n)))
        for blk, attr, _, ref_mod in swaps:
            setattr(blk, attr, ref_mod)
        ref = model(x).clone()
        for blk, attr, sparse_mod, _ in swaps:
            setattr(blk, attr, sparse_mod)
        graphs["sparse"], outs["sparse"] = graphed(lambda: model(x))
    timings = time_graphs(graphs)
    errors = {
        "sparse_vs_pruned_dense": rel_err(outs["sparse"], ref),
        "dense_vs_stock": rel_err(outs["dense"], outs["dense_stock"]),
    }
    return compare(
        report,
        timings,
        errors,
        stay,
        {"model": "resnet50", "shape": f"{batch}x3x224x224", "dense_total_fed_to_bench_ms": pre["dense"]["ms"]},
    )


# ---------------------------------------------------------------- main
def markdown(rows: list[dict[str, Any]], device: dict[str, Any]) -> str:
    lines = [
        f"# `bench`'s end-to-end estimate against measured whole-model runs ({device.get('gpu', '?')})",
        "",
        f"torch {device.get('torch')}, CUDA {device.get('cuda')}, cuSPARSELt {device.get('cusparselt')}, "
        f"nvmath {device.get('nvmath')}; fp16, random weights, CUDA-graph replay, median of {REPEATS} "
        f"blocks of {REPLAYS} forwards. Produced by `tools/bench_e2e_check.py`.",
        "",
        "| model | shape | dense stock ms | dense (fused epilogues) ms | 2:4 sparse ms | measured | bench "
        "predicted ms | predicted | error | ≤5% | GEMMs only | GEMM share | sparse layers | output rel. err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['dense_stock_ms']:.3f} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f}"
            f" | {r['measured_speedup']:.3f}× | {r['predicted_sparse_ms']:.3f} | {r['predicted_speedup']:.3f}× | "
            f"{100 * r['prediction_error']:+.1f}% | {'yes' if r['within_5pct'] else '**no**'} | "
            f"{r['gemm_only_speedup']:.2f}× | {100 * r['gemm_share']:.0f}% | {r['sparse_layers']} | "
            f"{r['output_rel_error']['sparse_vs_pruned_dense']:.1e} |"
        )
    stay = {r["model"]: r["stay_dense_runtime"] for r in rows if r["stay_dense_runtime"]}
    for model, names in stay.items():
        lines += [
            "",
            f"{model}: {len(names)} layers stay dense in this runtime (passed to `bench --exclude`): "
            + ", ".join(f"`{n}`" for n in names),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    ap.add_argument("--models", default="bert,resnet50")
    ap.add_argument("--bert-shapes", default="8x128,32x128,64x384")
    ap.add_argument("--resnet-batches", default="8,32,64")
    ap.add_argument("--quick", action="store_true", help="fewer bench repetitions (a smoke run)")
    args = ap.parse_args(argv)
    from corpus import materialize

    from onnxsparse.bench import gpu

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="e2e_"))
    reports = args.out / "bench"  # each case's own `bench --json` report
    reports.mkdir(exist_ok=True)
    gpu.warm_up_gpu(min_s=2.0, max_s=10.0)
    rows: list[dict[str, Any]] = []
    device = gpu.device_info()

    def save() -> None:  # after every row: a run cut short keeps what it measured
        (args.out / "bench_e2e.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1) + "\n")
        (args.out / "bench_e2e.md").write_text(markdown(rows, device))

    with gpu.SparseLt() as lt:
        models = args.models.split(",")
        if "bert" in models:
            onnx_path = materialize("bert_base", work)
            for shape in args.bert_shapes.split(","):
                b, s = (int(v) for v in shape.split("x"))
                rows.append(check_bert(b, s, onnx_path, reports, lt, args.quick))
                save()
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "timings"}), flush=True)
                torch.cuda.empty_cache()
        if "resnet50" in models:
            onnx_path = work / "resnet50.onnx"
            names = export_resnet(resnet50_folded(), onnx_path)
            for batch in (int(v) for v in args.resnet_batches.split(",")):
                rows.append(check_resnet(batch, onnx_path, names, reports, lt, args.quick))
                save()
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "timings"}), flush=True)
                torch.cuda.empty_cache()
    save()
    print(markdown(rows, device))
    return 0 if all(r["within_5pct"] for r in rows) else 3


if __name__ == "__main__":
    raise SystemExit(main())
