#!/usr/bin/env bash
# The pre-registered study of experiments/cpu_gemma_learnability/PROTOCOL.md (issue 17), every arm
# in order, then the reports and the pre-registered decisions. Config:
# conf/experiment/cpu_gemma_learnability.yaml (Gemma 3 270M base, 200 Alpaca rows, k = 12, S = 9).
#
#   bash experiments/cpu_gemma_learnability.sh            # the study (88.5 min measured on 2 idle cores)
#   DRY=1 bash experiments/cpu_gemma_learnability.sh      # the same arms on a tiny random model
#
# Resumable: every reference, scoring, fine-tune and evaluation is a content-addressed artifact
# under artifacts/, so a rerun after a kill rebuilds only what is missing (finished arms cost a
# model load each). Shared artifacts (the reference, the initial model's losses) are built once.
# Run nothing else on the machine meanwhile: the wall time is part of the result.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-multirun/cpu_gemma_learnability}
RESULTS=${RESULTS:-experiments/results/cpu_gemma_learnability}
EXTRA=()
if [[ "${DRY:-0}" == 1 ]]; then  # mechanics only: every arm on a tiny model and tiny sets
  OUT=multirun/cpu_gemma_learnability_dry
  RESULTS=/tmp/cpu_gemma_learnability_dry
  EXTRA=(model=tiny_random model.template=alpaca data.max_rows=40 data.max_length=128 reference.max_steps=3
         eval.heldout.max_rows=6 eval.reference_loss.alpaca_eval_gpt4_turbo.max_rows=8
         eval.reference_loss.mt_bench_math_reasoning_coding_ref.max_rows=4
         eval.reference_loss.gsm8k_test_solutions.max_rows=4)
fi
H1="$OUT/pool_alpaca"   # H1-H3: the Alpaca-only pool
H4="$OUT/pool_mix"      # H4: the same Alpaca rows + 40 GSM8K train rows
MIX=(data.name=cpu_gemma_alpaca200_gsm8k40
     '+data.mix.gsm8k={path: ${pkg_data:gsm8k/gsm8k_train_300.jsonl}, reader: gsm8k, max_rows: 40}'
     eval.reference_loss.gsm8k_test_solutions.enabled=true)
start=$(date +%s)

arm() {  # arm <sweep dir> <overrides...>: one arm, one run per seed (seed=... in the overrides)
  local dir=$1; shift
  local t0; t0=$(date +%s)
  "$PY" run.py -m experiment=cpu_gemma_learnability "hydra.sweep.dir=$dir" \
    'hydra.sweep.subdir=s${seed}' "$@" "${EXTRA[@]}"
  echo "[study] $(basename "$dir"): $(( $(date +%s) - t0 )) s (elapsed $(( $(date +%s) - start )) s)"
}

# The floor every arm moved from (no reference, scoring or training).
arm "$H1/initial" train=none 'stages=[eval]'
# LoBaSS top-k: builds the seed-0 reference and both loss passes, shared by every arm below.
arm "$H1/lobass_top" scorer=lobass seed=0,1
arm "$H1/random" scorer=random seed=0,1,2
arm "$H1/random_tokens" scorer=random selection.budget=tokens \
  "selection.match_tokens=$H1/lobass_top/s0" seed=0,1,2
arm "$H1/lobass_bottom" scorer=lobass selection.order=bottom
arm "$H1/length_short" scorer=length selection.order=bottom
arm "$H1/length_long" scorer=length
arm "$H1/rho_top" scorer=rho
arm "$H1/ifd_top" scorer=ifd
arm "$H1/alpagasus" scorer=random 'selection.listed=${pkg_data:alpagasus/claude_t45_in_pool_1k.json}'
arm "$H1/lobass_no_eos" scorer=lobass score.exclude_eos=true
arm "$H1/full_matched" scorer=random selection.ratio=1.0
# Full data trained as the reference was (1 epoch of 8-row batches, seed 0): the same fine-tune
# key as the reference, so its adapter is reused, not retrained.
arm "$H1/full_reference" scorer=random selection.ratio=1.0 train.max_steps=-1 train.epochs=1 \
  train.batch_size=8
# Reference-seed stability (diagnostic only): a second reference, scored and selected, not trained.
arm "$H1/lobass_top_ref1" scorer=lobass reference.seed=1 'stages=[reference,score,select]'
# H4: LoBaSS ranks the Alpaca rows alone (6%) and GSM8K is kept whole; against full Alpaca + GSM8K.
arm "$H4/lobass_mix" scorer=lobass selection.by_source=true 'selection.keep_sources=[gsm8k]' \
  seed=0,1 "${MIX[@]}"
arm "$H4/full_mix" scorer=random selection.ratio=1.0 "${MIX[@]}"
echo "[study] runs done: $(( $(date +%s) - start )) s"

"$PY" -m lobass.report "$H1" --out "$RESULTS/report_alpaca"
"$PY" -m lobass.report "$H4" --out "$RESULTS/report_mix"
"$PY" experiments/cpu_gemma_learnability/decide.py "$OUT" --out "$RESULTS/decisions.md"
echo "[study] cpu_gemma_learnability took $(( $(date +%s) - start )) s"
