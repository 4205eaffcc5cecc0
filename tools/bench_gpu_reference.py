"""Reproduce REFERENCE.md's H100 fp16 cuSPARSELt-vs-cuBLAS figures with the bench's own timing code.

    python tools/bench_gpu_reference.py --runs 3 --json tools/results/reference_h100_fp16.json

Each shape is y[M,N] = x[M,K]·W[N,K]ᵀ, W 2:4 along K, timed by ``onnxsparse.bench.gpu.time_gemm`` (plan built
and tuned once, loops of back-to-back launches, median of repetitions, result checked). ``--runs`` repeats the
whole set, each run with a fresh cuSPARSELt handle and fresh plans (and so a fresh matmul_search), and reports
the spread between runs. ``--single`` also times single launches (iters=1), the method that REFERENCE.md
says inflates gains. A shape passes when its median speed-up over runs is within ±10% of the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxsparse.bench import gpu
from onnxsparse.render import table

#: (name, M, N, K, reference speed-up (low, high) from REFERENCE.md, or None where it gives none)
SHAPES: list[tuple[str, int, int, int, tuple[float, float] | None]] = [
    ("bert-base ffn1", 4096, 3072, 768, (1.35, 1.35)),
    ("bert-base ffn2", 4096, 768, 3072, (1.21, 1.21)),
    ("bert-base q/k/v/out (768x768)", 4096, 768, 768, (2.2, 2.4)),
    ("bert-base fused qkv (768x2304)", 4096, 2304, 768, None),
    ("minilm ffn1 (384->1536)", 4096, 1536, 384, (2.0, 2.2)),
    ("bert-large ffn1 M=256", 256, 4096, 1024, (3.1, 3.1)),
    ("bert-large ffn1 M=8192", 8192, 4096, 1024, (1.4, 1.4)),
    ("llm mlp 16384x4096x11008", 16384, 11008, 4096, (1.48, 1.48)),
    ("square 8192", 8192, 8192, 8192, (1.45, 1.45)),
]
TOLERANCE = 0.10


def within(value: float, ref: tuple[float, float] | None, tol: float = TOLERANCE) -> bool | None:
    """True when ``value`` lies within ±tol of the reference range (None without a reference)."""
    if ref is None:
        return None
    return ref[0] * (1 - tol) <= value <= ref[1] * (1 + tol)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--mode", choices=["loop", "graph"], default="loop")
    ap.add_argument("--dtype", choices=["fp16", "int8"], default="fp16")
    ap.add_argument("--search-rounds", type=int, default=2)
    ap.add_argument("--single", action="store_true", help="also time single launches (iters=1)")
    ap.add_argument("--only", default=None, help="comma-separated substrings of shape names to run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    why = gpu.gpu_available()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 1
    shapes = [s for s in SHAPES if not args.only or any(o in s[0] for o in args.only.split(","))]
    runs: list[dict[str, dict]] = []
    for r in range(args.runs):
        results: dict[str, dict] = {}
        with gpu.SparseLt() as lt:
            for name, m, n, k, _ in shapes:
                t = gpu.time_gemm(
                    lt,
                    m,
                    n,
                    k,
                    dtype=args.dtype,
                    repeats=args.repeats,
                    iters=args.iters,
                    mode=args.mode,
                    seed=r,
                    search_rounds=args.search_rounds,
                )
                d = t.to_dict()
                if args.single:
                    s = gpu.time_gemm(
                        lt,
                        m,
                        n,
                        k,
                        dtype=args.dtype,
                        repeats=args.repeats,
                        iters=1,
                        mode="loop",
                        seed=r,
                        search_rounds=1,
                    )
                    d["single_launch"] = s.to_dict()
                results[name] = d
                print(
                    f"run {r + 1}: {name:32s} dense {t.dense_ms * 1e3:9.1f} us  sparse {t.sparse_ms * 1e3:9.1f} us"
                    f"  {t.speedup:5.2f}x  err {t.error:.1e}  alg {t.alg_id}",
                    flush=True,
                )
        runs.append(results)

    rows, summary = [], []
    for name, m, n, k, ref in shapes:
        speedups = [run[name]["speedup"] for run in runs]
        dense = [run[name]["dense_ms"] for run in runs]
        sparse = [run[name]["sparse_ms"] for run in runs]
        med = statistics.median(speedups)
        spread = {key: max(v) / min(v) - 1 for key, v in (("dense", dense), ("sparse", sparse))}
        ok = within(med, ref) if args.dtype == "fp16" else None
        single = [run[name]["single_launch"]["speedup"] for run in runs if "single_launch" in run[name]]
        entry = {
            "name": name,
            "m": m,
            "n": n,
            "k": k,
            "reference": ref,
            "speedups": speedups,
            "speedup": med,
            "dense_ms": statistics.median(dense),
            "sparse_ms": statistics.median(sparse),
            "run_spread": spread,
            "within_10pct": ok,
            "all_results_ok": all(run[name]["ok"] for run in runs),
            "max_error": max(run[name]["error"] for run in runs),
            "single_launch_speedup": statistics.median(single) if single else None,
        }
        summary.append(entry)
        ref_text = "" if ref is None else (f"{ref[0]:.2f}" if ref[0] == ref[1] else f"{ref[0]:.1f}-{ref[1]:.1f}")
        rows.append(
            [
                name,
                f"{m}x{n}x{k}",
                f"{entry['dense_ms'] * 1e3:.1f}",
                f"{entry['sparse_ms'] * 1e3:.1f}",
                f"{med:.2f}x",
                " ".join(f"{s:.2f}" for s in speedups),
                f"{100 * max(spread.values()):.1f}%",
                ref_text,
                {True: "yes", False: "NO", None: ""}[ok],
                "" if entry["single_launch_speedup"] is None else f"{entry['single_launch_speedup']:.2f}x",
                f"{entry['max_error']:.1e}",
            ]
        )
    device = gpu.device_info()
    print(
        f"\n{device.get('gpu')} torch {device.get('torch')} cuSPARSELt {device.get('cusparselt')}; {args.dtype}, "
        f"{args.mode} of {args.iters} launches, median of {args.repeats}, {args.runs} runs"
    )
    print(
        table(
            rows,
            [
                "shape",
                "MxNxK",
                "dense µs",
                "2:4 µs",
                "speed-up",
                "per run",
                "run spread",
                "REFERENCE",
                "±10%",
                "single-launch",
                "error",
            ],
        )
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": device, "settings": vars(args), "shapes": summary, "runs": runs}, indent=2) + "\n"
        )
    failed = [e["name"] for e in summary if e["within_10pct"] is False or not e["all_results_ok"]]
    if failed:
        print(f"outside ±10% of REFERENCE.md or wrong results: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
