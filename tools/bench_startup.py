"""Start-up time of ``onnxsparse --help`` (and ``import onnxsparse.cli``) against ``polygraphy --help``.

Not a timed test: the machine is shared, so absolute times swing with its load; the ratio against a peer
measured in the same run, interleaved, is what this reports. Each command runs ``--rounds`` times in a fresh
process; the median wall time counts (the first, cold-cache round is discarded).

    python tools/bench_startup.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.25


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    commands = {
        "onnxsparse --help": [_bin("onnxsparse"), "--help"],
        "python -c 'import onnxsparse.cli'": [sys.executable, "-c", "import onnxsparse.cli"],
        "onnxsparse run --help": [_bin("onnxsparse"), "run", "--help"],
        "polygraphy --help": [_bin("polygraphy"), "--help"],
        # what any command that touches a model pays first (onnx imports numpy and ml_dtypes)
        "python -c 'import onnx'": [sys.executable, "-c", "import onnx"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for cmd in commands.values():
        _time(cmd)  # warm the page cache
    for _ in range(args.rounds):
        for name, cmd in commands.items():  # interleaved: a load spike hits every command alike
            times[name].append(_time(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    peer = med["polygraphy --help"]
    load = os.getloadavg()[0]
    print(f"median of {args.rounds} runs each, load average {load:.2f}, {os.cpu_count()} CPUs")
    for name, t in med.items():
        print(f"  {name:36s} {t * 1000:7.1f} ms  ({t / peer:4.2f}x polygraphy --help)")
    verdict = "meets" if med["onnxsparse --help"] < TARGET_S else "MISSES"
    print(f"onnxsparse --help {med['onnxsparse --help'] * 1000:.0f} ms {verdict} the {TARGET_S * 1000:.0f} ms target")


if __name__ == "__main__":
    main()
