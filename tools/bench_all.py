"""Run every benchmark in one go and print one table of ratios against the issues' goals.

    python tools/bench_all.py                 # the full runs (several minutes on a 2-core machine)
    python tools/bench_all.py --quick         # smaller sizes, for a smoke test
    python tools/bench_all.py --json tools/results/bench_all.json

Each benchmark runs as its own subprocess (so timings and peak memory are its own) and writes JSON, which
this script reads back:

- ``tools/bench_prune.py``: prune and check a YOLO-size CNN, onnxsparse vs Polygraphy (passes in process,
  and the whole CLI in fresh processes) — goals: pass ≥ 100×, CLI ≥ 5× faster;
- ``tools/bench_calib.py``: streaming calibration + qdq vs ORT ``quantize_static`` at two batch counts —
  goals: ≥ 2× faster, RSS flat within 10 % from the smaller to the larger count, fidelity ≥ ORT's;
- ``tools/bench_scale.py``: a ≥ 2.2 GB external-data model through load → prune → validate → save —
  goals: ≥ 0.5 GB/s, peak RSS ≤ 1.3 × (largest tensor + graph proto).

The machine's CPU count and load average are printed with the table: the benchmarks share the CPU with
whatever else runs, and wall-time ratios move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent


def _run(script: str, args: list[str], out: Path) -> tuple[dict[str, Any] | None, str, float]:
    """Run ``tools/<script> args --json out``; returns (its JSON or None, last lines of its output, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(TOOLS / script), *args, "--json", str(out)], capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    if proc.returncode or not out.exists():
        return None, tail, seconds
    return json.loads(out.read_text()), tail, seconds


def _fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{unit}"


Row = tuple[str, str, str, str, str, str]


def prune_rows(d: dict[str, Any]) -> list[Row]:
    p = d["passes"]
    rows: list[Row] = [
        (
            "prune pass (YOLO-size CNN)",
            _fmt(p["ours_prune_s"] * 1e3, " ms", 1),
            "Polygraphy " + _fmt(p["poly_prune_s"] * 1e3, " ms", 1),
            _fmt(p["poly_prune_s"] / p["ours_prune_s"], "x", 1),
            ">= 100x",
            _met(p["poly_prune_s"] / p["ours_prune_s"] >= 100),
        ),
        (
            "check pass",
            _fmt(p["ours_check_s"] * 1e3, " ms", 1),
            "Polygraphy " + _fmt(p["poly_check_s"] * 1e3, " ms", 1),
            _fmt(p["poly_check_s"] / p["ours_check_s"], "x", 1),
            "-",
            "",
        ),
    ]
    c = d.get("cli")
    if c:
        ours, theirs = c["ours_run_s"] + c["ours_check_s"], c["poly_prune_s"] + c["poly_inspect_s"]
        rows.append(
            (
                "prune + check, whole CLI",
                _fmt(ours, " s"),
                "Polygraphy " + _fmt(theirs, " s"),
                _fmt(theirs / ours, "x", 1),
                ">= 5x",
                _met(theirs / ours >= 5),
            )
        )
    return rows


def calib_rows(d: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    runs = d["runs"]
    counts = sorted(runs["ours"], key=int)
    for n in counts:
        ours, ort = runs["ours"][n], runs["ort"].get(n)
        if ort is None:
            continue
        ratio = ort["seconds"] / ours["seconds"]
        rows.append(
            (
                f"calibrate + qdq, {n} batches",
                _fmt(ours["seconds"], " s"),
                "ORT " + _fmt(ort["seconds"], " s"),
                _fmt(ratio, "x", 1),
                ">= 2x",
                _met(ratio >= 2),
            )
        )
    lo, hi = counts[0], counts[-1]
    growth = runs["ours"][hi]["peak_rss_mb"] / runs["ours"][lo]["peak_rss_mb"]
    ort_growth = runs["ort"][hi]["peak_rss_mb"] / runs["ort"][lo]["peak_rss_mb"] if hi in runs["ort"] else None
    rows.append(
        (
            f"calibration peak RSS, {lo} -> {hi} batches",
            f"{runs['ours'][lo]['peak_rss_mb']:.0f} -> {runs['ours'][hi]['peak_rss_mb']:.0f} MB",
            "ORT "
            + (
                f"{runs['ort'][lo]['peak_rss_mb']:.0f} -> {runs['ort'][hi]['peak_rss_mb']:.0f} MB"
                if ort_growth
                else "-"
            ),
            f"x{growth:.2f} vs x{ort_growth:.1f}" if ort_growth else f"x{growth:.2f}",
            "<= x1.10",
            _met(growth <= 1.10),
        )
    )
    ours_q, ort_q = runs["ours"][hi].get("sqnr_db_exact"), runs["ort"].get(hi, {}).get("sqnr_db_exact")
    if ours_q is not None and ort_q is not None:
        rows.append(
            (
                f"Q/DQ fidelity (SQNR, {hi} batches)",
                _fmt(ours_q, " dB", 1),
                "ORT " + _fmt(ort_q, " dB", 1),
                _fmt(ours_q - ort_q, " dB", 1),
                ">= ORT",
                _met(ours_q >= ort_q - 1e-9),
            )
        )
    return rows


def scale_rows(d: dict[str, Any]) -> list[Row]:
    bound = d["largest_tensor_mb"] + d["proto_mb"]
    return [
        (
            f"load+prune+validate+save, {d['weights_gb']:.2f} GB",
            _fmt(d["gb_per_s"], " GB/s", 3),
            "plain copy " + _fmt(d.get("plain_copy_gb_per_s"), " GB/s", 3),
            _fmt(d.get("seconds_vs_plain_copy"), "x the copy's time", 1),
            ">= 0.5 GB/s",
            _met(d["gb_per_s"] >= 0.5),
        ),
        (
            "  peak RSS of that run",
            _fmt(d["peak_rss_mb"], " MB", 0),
            f"largest tensor + proto {bound:.0f} MB",
            _fmt(d["rss_ratio"], "x", 2),
            "<= 1.3x",
            _met(d["rss_ratio"] <= 1.3),
        ),
    ]


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def table(rows: list[Row]) -> str:
    head = ("benchmark", "onnxsparse", "reference", "ratio", "goal", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test, not the reported numbers)")
    ap.add_argument("--only", default="prune,calib,scale", help="comma-separated subset of prune,calib,scale")
    ap.add_argument("--json", type=Path, help="also write every benchmark's JSON and the table here")
    args = ap.parse_args(argv)
    selected = [s.strip() for s in args.only.split(",") if s.strip()]
    plans: dict[str, tuple[str, list[str], Callable[[dict[str, Any]], list[Row]]]] = {
        "prune": ("bench_prune.py", ["--repeat", "1" if args.quick else "3"], prune_rows),
        "calib": (
            "bench_calib.py",
            ["--batches", "4,32" if args.quick else "8,256", "--repeat", "1" if args.quick else "2"],
            calib_rows,
        ),
        "scale": (
            "bench_scale.py",
            ["--gb", "0.3" if args.quick else "2.2", "--tensor-mb", "64" if args.quick else "256"],
            scale_rows,
        ),
    }
    unknown = [s for s in selected if s not in plans]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(plans)}")
    results: dict[str, Any] = {}
    rows: list[Row] = []
    failed = []
    with tempfile.TemporaryDirectory(prefix="bench_all-") as tmp:
        for key in selected:
            script, extra, to_rows = plans[key]
            print(f"running {script} {' '.join(extra)} ...", file=sys.stderr, flush=True)
            data, tail, seconds = _run(script, extra, Path(tmp) / f"{key}.json")
            if data is None:
                failed.append(key)
                rows.append((f"{script}: FAILED", "-", "-", "-", "-", ""))
                print(tail, file=sys.stderr)
                continue
            results[key] = {"seconds": round(seconds, 1), "data": data}
            rows += to_rows(data)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    text = table(rows)
    print(text)
    print(
        f"\nmachine: {os.cpu_count()} CPUs, load average {', '.join(f'{x:.1f}' for x in load) if load else '-'}"
        f"{' (quick sizes)' if args.quick else ''}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "table": text,
                    "quick": args.quick,
                    "cpu_count": os.cpu_count(),
                    "load_average": load,
                    "results": results,
                },
                indent=1,
            )
            + "\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
