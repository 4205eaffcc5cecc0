#!/usr/bin/env bash
# Issue 7's stability check on a lent GPU: three `onnxsparse bench` runs of BERT-base in one call (separate
# processes: fresh handle, plans and matmul_search each), then their per-layer spread (tools/bench_stability.py).
# Then the GPU tests, and, if time is left, three runs with the GPU warm-up off for contrast (a warm GPU by then).
#   carried along: .whl/ (as for tools/run_device_bench.sh). Writes under $OUT (default /tmp/out), 7 files at most.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
if ! python3 -c "import nvmath.bindings.cusparseLt" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/alt/*.whl
fi
smi() { nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
        --format=csv,noheader; }
smi
python3 -c "
import sys; sys.path.insert(0, '.')
from tools.corpus import materialize
print(materialize('bert_base', '/tmp/models'))
" || exit 1
SHAPES="input_ids:32x128,attention_mask:32x128,token_type_ids:32x128"
bench() { python3 -c "from onnxsparse.commands.bench import command; command()" /tmp/models/bert_base.onnx \
          --shapes "$SHAPES" "$@"; }
for run in 1 2 3; do
    echo "== run $run ($(( $(date +%s) - T0 )) s)"; smi
    bench --json "$OUT/bert_base_fp16_graph_run$run.json" | tail -8
done
smi
python3 tools/bench_stability.py "$OUT"/bert_base_fp16_graph_run{1,2,3}.json --json "$OUT/bert_base_stability.json"
echo "== tests ($(( $(date +%s) - T0 )) s)"
python3 -m pytest -q -p no:cacheprovider tests/bench tests/commands/test_bench.py 2>&1 | tail -8
if [ $(( $(date +%s) - T0 )) -lt ${CONTRAST_BEFORE_S:-330} ]; then
    mkdir -p /tmp/contrast
    for run in 1 2 3; do
        echo "== contrast run $run, --gpu-warmup 0 ($(( $(date +%s) - T0 )) s)"
        bench --gpu-warmup 0 --json "/tmp/contrast/bert_base_fp16_nowarmup_run$run.json" | tail -3
    done
    python3 tools/bench_stability.py /tmp/contrast/bert_base_fp16_nowarmup_run{1,2,3}.json \
        --json /tmp/contrast/bert_base_nowarmup_stability.json
    tar -C /tmp -czf "$OUT/contrast_nowarmup.tar.gz" contrast
fi
echo "== done ($(( $(date +%s) - T0 )) s)"
