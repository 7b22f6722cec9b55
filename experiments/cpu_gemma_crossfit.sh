#!/usr/bin/env bash
# Study 2 (issue 29), experiments/cpu_gemma_crossfit/PROTOCOL.md: stage 1 (six references and
# their scores, the manipulation-check table, the pre-registered choice), then stage 2 (the arms,
# 4 training runs each), then the decisions. Config: conf/experiment/cpu_gemma_crossfit.yaml.
#
#   bash experiments/cpu_gemma_crossfit.sh              # the study (budget: 150 min, 2 idle cores)
#   STAGE=1 bash experiments/cpu_gemma_crossfit.sh      # stage 1 and its table only
#   DRY=1 bash experiments/cpu_gemma_crossfit.sh        # the same runs on a tiny random model
#
# Everything it makes lives outside the work tree, in $STUDY (default ../lobass-studies/ next to
# the repository): run dirs and content-addressed artifacts. Resumable: after a kill, the same
# command rebuilds only what is missing (a finished run costs a model load). The committed
# tables go to $RESULTS. Run nothing else on the machine meanwhile: wall time is a result.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STUDY=${STUDY:-$(cd .. && pwd)/lobass-studies/cpu_gemma_crossfit}
RESULTS=${RESULTS:-experiments/results/cpu_gemma_crossfit}
EXTRA=()
if [[ "${DRY:-0}" == 1 ]]; then  # mechanics only: every run on a tiny model and tiny sets
  STUDY=${STUDY}_dry
  RESULTS=$STUDY/results
  EXTRA=(model=tiny_random model.template=alpaca data.max_rows=40 data.max_length=128
         reference.max_steps=4 eval.reference_loss.alpaca_eval_gpt4_turbo.max_rows=8)
fi
ART=$STUDY/artifacts
S1=$STUDY/stage1
S2=$STUDY/stage2
mkdir -p "$RESULTS" "$STUDY"
start=$(date +%s)
log() { echo "[study] $* (elapsed $(( $(date +%s) - start )) s)" | tee -a "$STUDY/wall.log"; }

# Stage 1: each reference scored and its top k selected; no arm trained.
reference() {  # reference <name> <overrides...>
  local t0; t0=$(date +%s)
  "$PY" run.py experiment=cpu_gemma_crossfit "artifacts_dir=$ART" "output_dir=$S1/$1" \
    scorer=lobass 'stages=[reference,score,select]' "${@:2}" "${EXTRA[@]}"
  log "stage1 $1: $(( $(date +%s) - t0 )) s"
}
reference in_sample_e1_r0 reference.fit=in_sample reference.epochs=1 reference.seed=0
reference cross_fit_e1_r0 reference.fit=cross_fit reference.epochs=1 reference.seed=0
reference in_sample_e3_r0 reference.fit=in_sample reference.epochs=3 reference.seed=0
reference cross_fit_e3_r0 reference.fit=cross_fit reference.epochs=3 reference.seed=0
reference in_sample_e3_r1 reference.fit=in_sample reference.epochs=3 reference.seed=1
reference cross_fit_e3_r1 reference.fit=cross_fit reference.epochs=3 reference.seed=1
"$PY" experiments/cpu_gemma_crossfit/stage1.py "$S1" --out "$RESULTS/stage1.md" \
  --choice "$STUDY/stage1_choice.json"
log "stage 1 done"
[[ "${STAGE:-}" == 1 ]] && exit 0

# Stage 2: every arm trains S steps of 4 rows at k rows, 4 training runs (seed=0..3). LoBaSS
# arms take reference seed r for training seeds r and r+2, so each reference seed trains twice.
arm() {  # arm <name> <overrides...> (seed=... among them)
  local t0; t0=$(date +%s)
  "$PY" run.py -m experiment=cpu_gemma_crossfit "artifacts_dir=$ART" "hydra.sweep.dir=$S2/$1" \
    'hydra.sweep.subdir=s${seed}' "${@:2}" "${EXTRA[@]}"
  log "stage2 $1 ($(echo "$@" | grep -o 'seed=[0-9,]*$' || true)): $(( $(date +%s) - t0 )) s"
}
arm initial train=none 'stages=[eval]' seed=0
arm random scorer=random seed=0,1,2,3
for r in 0 1; do
  arm lobass_in_sample scorer=lobass reference.fit=in_sample reference.seed=$r seed=$r,$((r + 2))
  arm lobass_cross_fit scorer=lobass reference.fit=cross_fit reference.seed=$r seed=$r,$((r + 2))
  arm length_matched_random scorer=random selection.rule=length_matched_random \
    "selection.match_lengths=$S2/lobass_in_sample/s$r" seed=$r,$((r + 2))
done
arm longest scorer=length seed=0,1,2,3
if "$PY" -c "import json,sys; sys.exit(0 if json.load(open('$STUDY/stage1_choice.json'))['residual_arm'] else 1)"; then
  for r in 0 1; do
    arm lobass_cross_fit_residual scorer=lobass reference.fit=cross_fit reference.seed=$r \
      selection.rank=residual_length seed=$r,$((r + 2))
  done
fi
log "stage 2 done"
"$PY" experiments/cpu_gemma_crossfit/decide.py "$S2" --out "$RESULTS/decisions.md" \
  --per-prompt "$RESULTS/per_prompt_losses.csv"
log "study done"
