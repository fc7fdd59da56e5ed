#!/bin/bash
# One suite process per task and seed, all at once (bench/accuracy.md item 37: 8 of them shared one H200 and
# finished in about 3 minutes, each process host-bound at one thread). Logs in runs/log-PREFIX-TASK-SEED.txt,
# suites in runs/PREFIX-TASK-SEED; combine them with bench/budget_table.py --setting NAME.
#   CONFIG=accuracy_r1 SEEDS="0 1" bash bench/parallel_suite.sh
# env: CONFIG (accuracy_r1), PREFIX (g), SEEDS (0 1), TASKS (the four offline tasks), LIMIT (seconds per process,
# 3000), EXTRA (more --set arguments, split on spaces: write lists without spaces, [5,10,15]), PY (python3)
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}; PREFIX=${PREFIX:-g}; mkdir -p runs
start=$(date +%s)
pids=(); declare -A names
for s in ${SEEDS:-0 1}; do for t in ${TASKS:-dsprites_loc dsprites_ori fashion_mnist mnist}; do
  timeout "${LIMIT:-3000}" "$PY" run_search.py suite --config "${CONFIG:-accuracy_r1}" --tasks "$t" --seeds "$s" \
    --set threads=1 --set precision=fp32 --set "output_dir=runs/$PREFIX-$t-$s" --no-progress ${EXTRA:-} \
    > "runs/log-$PREFIX-$t-$s.txt" 2>&1 &
  pids+=($!); names[$!]="$PREFIX-$t-$s"
done; done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do
  sleep 20
  echo "$(( $(date +%s) - start ))s: running $(jobs -rp | wc -l); grid points done" \
       "$(find runs/"$PREFIX"-* -name val.json 2>/dev/null | wc -l); suites done $(ls runs/"$PREFIX"-*/suite.csv 2>/dev/null | wc -l)"
done
failed=0
for pid in "${pids[@]}"; do
  wait "$pid" || { echo "${names[$pid]}: exit $? (124: over LIMIT); see runs/log-${names[$pid]}.txt"; failed=1; }
done
echo "all done after $(( $(date +%s) - start ))s"
for f in runs/"$PREFIX"-*/suite.md; do [ -f "$f" ] && sed -n 3p "$f"; done
exit $failed
