"""Per-layer spread of repeated ``onnxsparse bench --json`` runs of one model (issue 7: "three runs agree
within ±5% per layer").

    python tools/bench_stability.py run1.json run2.json run3.json [--json stability.json] [--limit 0.05]

Prints, for each distinct GEMM shape, the largest deviation from the mean over the runs of the dense time,
the sparse time and the speed-up (layers of one shape share one timing, so a shape stands for its layers),
and whether every layer is within ``--limit``. Exit status 0 either way: this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxsparse.bench.stability import compare_runs
from onnxsparse.render import table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--limit", type=float, default=0.05)
    args = ap.parse_args(argv)
    reports = [json.loads(p.read_text()) for p in args.reports]
    result = compare_runs(reports)
    result["files"] = [p.name for p in args.reports]
    result["limit"] = args.limit
    result["within_limit"] = {m: w["deviation"] <= args.limit for m, w in result["worst"].items()}
    rows, seen = [], set()
    for row in result["layers"]:
        shape = tuple(row["shape"])
        if shape in seen:
            continue
        seen.add(shape)
        count = sum(1 for r in result["layers"] if tuple(r["shape"]) == shape)
        rows.append(
            [
                "x".join(map(str, shape)),
                count,
                " ".join(f"{v * 1000:.2f}" for v in row["dense_ms"]),
                f"±{row['dense_ms_deviation']:.1%}",
                " ".join(f"{v * 1000:.2f}" for v in row["sparse_ms"]),
                f"±{row['sparse_ms_deviation']:.1%}",
                " ".join(f"{v:.3f}" for v in row["speedup"]),
                f"±{row['speedup_deviation']:.1%}",
            ]
        )
    print(table(rows, ("MxNxK", "layers", "dense µs", "spread", "2:4 µs", "spread", "speed-up", "spread")))
    for metric, w in result["worst"].items():
        verdict = "within" if result["within_limit"][metric] else "OUTSIDE"
        print(f"{metric}: worst ±{w['deviation']:.2%} ({w['layer']}), {verdict} ±{args.limit:.0%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
