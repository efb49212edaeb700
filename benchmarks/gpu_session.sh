#!/usr/bin/env bash
# The GPU checks in one go, about 8 minutes on one H200: FORA's step cost (plain vs every precision, the default and
# update-only (project_gradients=False) in float32 and auto,
# Qwen3-1.7B shapes, 16,384 tokens, with memory and leakage after 200 AdamW steps), then the NCCL strategy checks.
# Tables land in benchmarks/results/ (commit them) and, with the logs, in $OUT if set.
#   bash benchmarks/gpu_session.sh
set -u
PY="${PYTHON:-python3}"
OUT="${OUT:-results/gpu_logs}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
"$PY" -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
(cd benchmarks && timeout 300 "$PY" step_cost.py --device cuda --model qwen3-1.7b) 2>&1 | tail -n 40 > "$OUT/step_cost.log"
echo "step_cost exit ${PIPESTATUS[0]}" >> "$OUT/step_cost.log"
cp benchmarks/results/step_cost_cuda.json benchmarks/results/step_cost_cuda.csv benchmarks/results/step_cost_cuda.md "$OUT/" 2>/dev/null
timeout 180 "$PY" benchmarks/gpu_check.py 2>&1 | tail -n 40 > "$OUT/gpu_check.log"; echo "gpu_check exit ${PIPESTATUS[0]}" >> "$OUT/gpu_check.log"
tail -n 25 "$OUT"/*.log
