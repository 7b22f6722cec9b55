#!/usr/bin/env bash
# The CPU-sized reproduction (conf/experiment/cpu_alpaca_mix.yaml): LoBaSS and RHO at 1.5%, 6%,
# 16.7% and full data, random at the same ratios over three seeds, on 800 Alpaca + 200 GSM8K rows
# with the embedded SmolLM2-135M. One reference and one scoring pass serve every point; rerunning
# skips finished points (fixed sweep dir). Measured: 63 min 37 s on 2 CPU cores. Then the report.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
.venv/bin/python run.py -m experiment=cpu_alpaca_mix selection.ratio=0.015,0.06,0.167,1.0 scorer=lobass,rho
.venv/bin/python run.py -m experiment=cpu_alpaca_mix selection.ratio=0.015,0.06,0.167 scorer=random seed=0,1,2
.venv/bin/python -m lobass.report multirun/cpu_alpaca_mix --out experiments/results/cpu_alpaca_mix
echo "cpu_alpaca_mix took $(( $(date +%s) - start )) s"
