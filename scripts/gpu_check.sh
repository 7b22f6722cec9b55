#!/usr/bin/env bash
# The GPU path in one prepared run, for a machine with one CUDA GPU, no hub access, ~9 minutes:
#   1) set-up (scripts/setup.sh: the torch build the driver runs, the gpu extra, a CUDA check);
#   2) the CUDA scoring benchmark on the embedded SmolLM2-135M (bf16) and on a random-initialised
#      LLaMA-7B shape (bf16): speed-up over the naive loop, MFU against the card's bf16 peak; and
#      the training benchmark (bf16, liger-kernel when installed): lobass's training stage against
#      what a user writes, the matmul fraction, peak GPU memory;
#   3) a short run of the whole pipeline on the embedded model with the GPU config groups
#      (model.device=cuda, reference/train=lora_gpu, score=gpu, eval=gpu, small sizes);
#   4) the CUDA-only tests (pytest -m gpu).
# Every step has its own time limit (`timeout`), a failed step does not stop the next, and each
# step's exit status and time go to steps.tsv. The log (gpu_check.log) and gpu_check.json (the
# figures: scripts/gpu_check_report.py) are written to $OUT when it is set, else
# /tmp/lobass-gpu-check/out.
#
#   bash scripts/gpu_check.sh              # run it
#   bash scripts/gpu_check.sh --dry-run    # print the steps and their limits, run nothing
#   PYTHON=/opt/torch/.venv/bin/python3 bash scripts/gpu_check.sh   # an interpreter that already
#                                          # has torch (CUDA) and lobass's dependencies
#   GPU_CHECK_LIMITS="setup=150 bench_training=90 pipeline=150"   # seconds per step
#   GPU_CHECK_SKIP="setup"                 # steps not to run (recorded with rc "skipped")
set -uo pipefail  # no -e: a failing step is recorded and the next one runs
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
WORK=${GPU_CHECK_WORK:-/tmp/lobass-gpu-check}
OUT_DIR=${OUT:-$WORK/out}
declare -A LIMIT=([setup]=120 [bench_embedded]=60 [bench_llama7b]=120 [bench_training]=60
                  [pipeline]=120 [gpu_tests]=60)
for pair in ${GPU_CHECK_LIMITS:-}; do LIMIT[${pair%%=*}]=${pair#*=}; done
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT_DIR" "$WORK"
  LOG=$OUT_DIR/gpu_check.log
  : >"$LOG"
  : >"$OUT_DIR/steps.tsv"
  nvidia-smi >"$OUT_DIR/nvidia_smi.txt" 2>&1
  cat "$OUT_DIR/nvidia_smi.txt" >>"$LOG"
fi

# step NAME COMMAND...: run under its time limit, log everything, record name/rc/seconds/limit.
step() {
  local name=$1 limit=${LIMIT[$1]}
  shift
  if [ "$DRY" = 1 ]; then
    printf '%-15s %4ss  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$OUT_DIR/steps.tsv"
    echo "=== $name: skipped (GPU_CHECK_SKIP)" | tee -a "$LOG"
    return 0
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start rc seconds
  start=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  seconds=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >>"$OUT_DIR/steps.tsv"
  echo "=== $name: rc=$rc after ${seconds}s" | tee -a "$LOG"
}

# The first interpreter that has CUDA torch and lobass's dependencies: $PYTHON, the set-up's
# .venv, then the machine's python3 (a GPU image often has torch but no registry to install from).
choose_python() {
  local candidate
  for candidate in ${PYTHON:-} .venv/bin/python python3; do
    if "$candidate" -c "import torch, hydra, lm_eval, peft; assert torch.cuda.is_available()" \
        >/dev/null 2>&1; then
      echo "$candidate"
      return
    fi
  done
  # none works: the steps fail and say why in the log (the set-up's interpreter if there is one)
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; elif [ -x .venv/bin/python ]; then
    echo .venv/bin/python; else echo python3; fi
}

# 1) set-up; pip gives up fast when the machine cannot reach the package index.
step setup env PIP_DEFAULT_TIMEOUT=10 PIP_RETRIES=1 bash scripts/setup.sh
PY=$([ "$DRY" = 1 ] && echo '$PY' || choose_python)
[ "$DRY" = 0 ] && echo "=== python: $PY" | tee -a "$LOG"

# 2) scoring benchmarks, bf16 on CUDA, 512 real Alpaca rows, 16k tokens per batch
step bench_embedded "$PY" benchmarks/scoring.py --device cuda --rows 512 --max-tokens 16384 \
  --models-dir "$WORK/models" --json "$OUT_DIR/bench_embedded.json"
step bench_llama7b "$PY" benchmarks/scoring.py --device cuda --shape llama_7b --rows 512 \
  --max-tokens 16384 --models-dir "$WORK/models" --json "$OUT_DIR/bench_llama7b.json"
step bench_training "$PY" benchmarks/training.py --device cuda --steps 8 --repeats 1 --micro-batch-size 0 \
  --models-dir "$WORK/models" --json "$OUT_DIR/bench_training.json"

# 3) the whole pipeline on the embedded model with the GPU groups, sized to a minute or two
PIPELINE=(
  model=smollm2_135m model.device=cuda model.dtype=bfloat16
  reference=lora_gpu train=lora_gpu score=gpu eval=gpu logger=none
  data.max_rows=96 data.mix.gsm8k.max_rows=32 selection.ratio=0.25
  reference.max_steps=6 reference.global_batch_size=16 reference.save_steps=3
  train.max_steps=4 train.global_batch_size=16
  eval.gsm8k.limit=16 eval.gsm8k.num_fewshot=0 eval.gsm8k.max_gen_toks=64
  eval.ifeval.limit=8 eval.ifeval.max_gen_toks=64 eval.heldout.max_rows=64
  eval.generation.max_new_tokens=48 eval.generation.sets.vicuna.max_rows=8
  eval.generation.sets.mt_bench.max_rows=4 eval.generation.sets.heldout_prompts.max_rows=4
  "artifacts_dir=$WORK/artifacts" "models_dir=$WORK/models" "output_dir=$WORK/run"
)
step pipeline "$PY" run.py "${PIPELINE[@]}"
[ "$DRY" = 0 ] && cp "$WORK/run/summary.json" "$OUT_DIR/pipeline_summary.json" 2>/dev/null

# 4) the CUDA-only tests (memory estimates against torch's measured peaks)
step gpu_tests "$PY" -m pytest -m gpu -q -p no:cacheprovider tests

if [ "$DRY" = 0 ]; then
  python3 scripts/gpu_check_report.py "$OUT_DIR" | tee -a "$LOG"
fi
