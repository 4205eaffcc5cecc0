#!/usr/bin/env bash
# The GPU half of `onnxsparse bench`, as run on a lent H100 (see tools/results/README.md for the numbers).
#
#   prerequisites carried along: .whl/ (nvmath-python wheel; .whl/alt/ holds newer cuda-core/cuda-pathfinder
#   used only if the machine's own are too old). Writes everything under $OUT (default /tmp/out).
#   STAGES picks what runs: smoke tests ref graph int8 models (default: all of them).
set -u
OUT=${OUT:-/tmp/out}
STAGES=${STAGES:-"smoke tests ref graph int8 models"}
mkdir -p "$OUT/res"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
if ! python3 -c "import nvmath.bindings.cusparseLt" 2>/dev/null; then
    echo "nvmath import failed with the machine's cuda-core/cuda-pathfinder; installing .whl/alt"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/alt/*.whl
fi
python3 - <<'EOF'
import importlib.metadata as md, torch
for p in ("torch", "nvmath-python", "nvidia-cusparselt-cu13", "cuda-core", "cuda-pathfinder", "cuda-bindings", "onnx"):
    try:
        print(p, md.version(p))
    except Exception as e:
        print(p, "?", e)
print(torch.cuda.get_device_name(0), torch.version.cuda)
from onnxsparse.bench import gpu
print(gpu.device_info())
EOF
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv

has() { [[ " $STAGES " == *" $1 "* ]]; }
# keep the results in one archive (at most 8 files come back), refreshed after each stage in case time runs out
snap() { tar -C "$OUT" -czf "$OUT/results.tar.gz" res; }

if has smoke; then
python3 - <<'EOF'
from onnxsparse.bench import gpu
with gpu.SparseLt() as lt:
    for dtype in ("fp16", "int8"):
        t = gpu.time_gemm(lt, 1024, 768, 512, dtype=dtype, repeats=3, iters=10)
        print("smoke", dtype, t.to_dict())
EOF
[ $? -eq 0 ] || { echo "SMOKE FAILED: stopping"; exit 1; }
fi

if has tests; then
    python3 -m pytest -q -p no:cacheprovider tests/bench tests/commands/test_bench.py 2>&1 | tail -40
fi

if has ref; then
    python3 tools/bench_gpu_reference.py --runs 3 --mode loop --single --json "$OUT/res/reference_fp16_loop.json"; snap
fi
if has graph; then
    python3 tools/bench_gpu_reference.py --runs 3 --mode graph --json "$OUT/res/reference_fp16_graph.json"; snap
fi
if has int8; then
    python3 tools/bench_gpu_reference.py --runs 1 --dtype int8 --mode graph --json "$OUT/res/reference_int8_graph.json"
    snap
fi

if has models; then
    python3 -c "
import sys; sys.path.insert(0, '.')
from tools.corpus import materialize
for name in ('bert_base', 'resnet18'):
    print(materialize(name, '/tmp/models'))
" || python3 tools/make_bert_shaped.py /tmp/models/bert_base.onnx
    BERT="input_ids:32x128,attention_mask:32x128,token_type_ids:32x128"
    [ -f /tmp/models/resnet18.onnx ] || BERT="input_ids:32x128"
    bench() { python3 -c "from onnxsparse.commands.bench import command; command()" "$@"; }
    for run in 1 2 3; do  # separate processes: fresh handle, plans and matmul_search each time
        bench /tmp/models/bert_base.onnx --shapes "$BERT" --json "$OUT/res/bert_base_fp16_graph_run$run.json"; snap
    done
    bench /tmp/models/bert_base.onnx --shapes "$BERT" --mode loop --json "$OUT/res/bert_base_fp16_loop.json"
    bench /tmp/models/bert_base.onnx --shapes "$BERT" --dtype int8 --json "$OUT/res/bert_base_int8_graph.json"
    if [ -f /tmp/models/resnet18.onnx ]; then
        bench /tmp/models/resnet18.onnx --shapes input:32x3x224x224 --json "$OUT/res/resnet18_fp16_graph.json"
    fi
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
snap && rm -rf "$OUT/res"
