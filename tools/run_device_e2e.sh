#!/usr/bin/env bash
# The GPU half of issue 15, as run on a lent H200: epilogue-aware bench tests, then tools/bench_e2e_check.py.
#
#   prerequisites carried along: .whl/ (nvmath-python wheel; .whl/alt/ newer cuda-core/cuda-pathfinder, used only
#   if the machine's own are too old). Writes everything under $OUT (default /tmp/out): log.txt, results.tar.gz.
#   STAGES picks what runs: smoke tests e2e (default: all); E2E_ARGS is passed to bench_e2e_check.py.
set -u
OUT=${OUT:-/tmp/out}
STAGES=${STAGES:-"smoke tests e2e"}
E2E_ARGS=${E2E_ARGS:-}
mkdir -p "$OUT/res"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
if ! python3 -c "import nvmath.bindings.cusparseLt" 2>/dev/null; then
    echo "nvmath import failed with the machine's cuda-core/cuda-pathfinder; installing .whl/alt"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/alt/*.whl
fi
python3 - <<'PY'
import importlib.metadata as md
for p in ("torch", "nvmath-python", "nvidia-cusparselt-cu13", "transformers", "torchvision", "onnx", "click"):
    try:
        print(p, md.version(p))
    except Exception as e:
        print(p, "?", e)
from onnxsparse.bench import gpu
print(gpu.device_info())
PY
has() { [[ " $STAGES " == *" $1 "* ]]; }
snap() { tar -C "$OUT" -czf "$OUT/results.tar.gz" res; }

if has smoke; then
python3 - <<'PY'
from onnxsparse.bench import gpu
from onnxsparse.bench.fused import time_gemm_epilogue
with gpu.SparseLt() as lt:
    for ep in ("bias", "bias+relu", "bias+gelu"):
        t = time_gemm_epilogue(lt, 4096, 3072, 768, epilogue=ep, repeats=3, iters=10)
        d = t.to_dict()
        print("smoke", ep, {k: d[k] for k in ("dense_ms", "sparse_ms", "sparse_unfused_ms", "speedup",
                                              "dense_error", "error", "unfused_error", "ok",
                                              "activation_fused")})
PY
[ $? -eq 0 ] || { echo "SMOKE FAILED: stopping"; exit 1; }
fi
if has tests; then
    python3 -m pytest -q -p no:cacheprovider tests/bench tests/commands/test_bench.py 2>&1 | tail -25
fi
if has e2e; then
    # shellcheck disable=SC2086
    timeout "${E2E_TIMEOUT:-500}" python3 tools/bench_e2e_check.py --out "$OUT/res" $E2E_ARGS
    echo "bench_e2e_check exit $?"
fi
snap && rm -rf "$OUT/res"
