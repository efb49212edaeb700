#!/usr/bin/env bash
# The GPU checks in one go, at most SESSION_BUDGET seconds (default 570: one command of at most 10 minutes, with
# start-up and the copies back) on one H200.
# Each part runs under its own timeout, cut to what the budget has left for it and the parts after it, so one
# failing or slow part does not stop the rest:
#   1. qwen3_train_step.py (<= 420 s): a whole Qwen3-1.7B built from its config, trained through a Lightning Trainer
#      (bf16-mixed, 16,384 tokens per optimizer step, AdamW weight decay 0.1): plain against FORA with every default,
#      step time, peak device memory, FORA's state, fit-start time and leakage after 200 steps (fewer if its
#      --time-budget ends the run first: the table says so);
#   2. step_cost.py (<= 180 s): FORA's per-step cost per precision on 2 Qwen3-1.7B blocks, STEP_COST_STEPS (100) steps;
#   3. gpu_check.py (<= 90 s): the NCCL strategy checks.
# Tables land in benchmarks/results/ (commit them); tables and full logs in $OUT too.
#   bash benchmarks/gpu_session.sh
set -u
PY="${PYTHON:-python3}"
OUT="${OUT:-results/gpu_logs}"
BUDGET="${SESSION_BUDGET:-570}"
mkdir -p "$OUT" benchmarks/results
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
START=$SECONDS

left() { echo $((BUDGET - (SECONDS - START))); }
# part_timeout WANTED LATER: WANTED seconds, or less so that LATER seconds stay for the parts after this one
part_timeout() {
    local t=$(($(left) - $2))
    ((t > $1)) && t=$1
    ((t < 1)) && t=1
    echo "$t"
}
# run NAME TIMEOUT CMD...: full log in $OUT/NAME.log, its exit status and seconds appended
run() {
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name (timeout ${limit}s, $(left)s of the session left)" | tee -a "$OUT/session.txt"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/$name.log" "$OUT/session.txt"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
"$PY" -c "import torch, lightning, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"

T1=$(part_timeout 420 140)
QB=$((T1 - 40 > T1 / 2 ? T1 - 40 : T1 / 2)) # its FORA run stops by then (start-up and the report fit in the rest)
run qwen3_train_step "$T1" "$PY" benchmarks/qwen3_train_step.py --device cuda --time-budget "$QB"
cp benchmarks/results/qwen3_train_step_cuda.json benchmarks/results/qwen3_train_step_cuda.md "$OUT/" 2>/dev/null

T2=$(part_timeout 180 60)
run step_cost "$T2" bash -c "cd benchmarks && exec '$PY' step_cost.py --device cuda --model qwen3-1.7b --steps ${STEP_COST_STEPS:-100}"
cp benchmarks/results/step_cost_cuda.json benchmarks/results/step_cost_cuda.csv benchmarks/results/step_cost_cuda.md "$OUT/" 2>/dev/null

T3=$(part_timeout 90 0)
run gpu_check "$T3" "$PY" benchmarks/gpu_check.py
cp "$OUT/gpu_check.log" benchmarks/results/gpu_check.txt

for f in qwen3_train_step step_cost gpu_check; do
    echo "---------------- $f (last lines)"
    tail -n 25 "$OUT/$f.log"
done
echo "session: $((SECONDS - START))s of ${BUDGET}s"
