#!/usr/bin/env bash
# Every GPU check in one go (one H200: about 6 minutes): the distributed checks with NCCL, the projection
# step/calibration costs, and the demo under each Lightning precision. Logs and tables go to $OUT if set.
#   bash benchmarks/gpu_session.sh
set -u
PY="${PYTHON:-python3}"
OUT="${OUT:-results/gpu_logs}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
"$PY" -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
timeout 180 "$PY" benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"; echo "gpu_check exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_check.log"
timeout 120 "$PY" benchmarks/gpu_perf.py 2>&1 | tail -n 60 > "$OUT/gpu_perf.log"; echo "gpu_perf exit ${PIPESTATUS[0]}" >> "$OUT/gpu_perf.log"
cp benchmarks/results/gpu_perf.json benchmarks/results/gpu_perf.md "$OUT/" 2>/dev/null
timeout 180 "$PY" benchmarks/gpu_precision.py 2>&1 | grep -v -i warn | tail -n 40 > "$OUT/gpu_precision.log"; echo "gpu_precision exit ${PIPESTATUS[0]}" >> "$OUT/gpu_precision.log"
cp results/gpu_precision/results.json "$OUT/gpu_precision.json" 2>/dev/null
tail -n 5 "$OUT"/*.log
