#!/usr/bin/env bash
# The default run's question, answered (conf/experiment/quick_compare.yaml): LoBaSS's 6% of the
# default pool against 6% random rows (2 seeds each) and the initial model (train=none), on the
# embedded SmolLM2-135M, then the report. One reference and one scoring pass serve every point;
# rerunning skips finished points. 12.6 min measured on 2 idle CPU cores (2026-12-05).
# usage: bash experiments/quick_compare.sh [SWEEP_DIR] [ARTIFACTS_DIR]
#        (defaults: multirun/quick_compare and ./artifacts; extra Hydra overrides via $OVERRIDES)
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=${1:-multirun/quick_compare}
artifacts=${2:-./artifacts}
python=${PYTHON:-.venv/bin/python}
common=(experiment=quick_compare "hydra.sweep.dir=$sweep" "artifacts_dir=$artifacts" ${OVERRIDES:-})
start=$(date +%s)
"$python" run.py -m "${common[@]}" scorer=lobass,random seed=0,1
"$python" run.py -m "${common[@]}" train=none
"$python" -m lobass.report "$sweep"
echo "quick_compare took $(( $(date +%s) - start )) s; report: $sweep/report.md"
