#!/usr/bin/env bash
# The GPU path in one prepared run, for a machine with one CUDA GPU and no network whose python3
# (3.12) already has CUDA torch, transformers, accelerate, peft, pandas, scipy, pyarrow and pytest
# (scripts/gpu_image.txt): nothing is fetched and no weights travel. Before sending the checkout,
# build the wheels it lacks on a networked machine: `bash scripts/gpu_wheelhouse.sh` (.wheelhouse/,
# about 14 MiB). Steps, each under its own time limit (defaults add up to 410 s):
#   install         the cp312 wheelhouse into a --target folder on PYTHONPATH (pip --no-index
#                   --no-deps: exactly the wheels the image lacks), then `pip check` over both
#   imports         every module the steps use, from the right places; CUDA visible
#   bench_llama7b   the scoring benchmark on a random-initialised LLaMA-2-7B shape in bf16 (the
#                   shipped tokenizer's rows): speed-up over the naive loop, MFU, peak memory
#   bench_training  the training benchmark (bf16) on the tiny random model: lobass's stage against
#                   a plain Trainer+peft loop, its loss agreement, peak memory
#   pipeline        reference, score, select, train, eval on the tiny random model with the GPU
#                   config groups
#   gpu_tests       pytest -m gpu; a skipped test fails the step
# Each step appends one JSON line to steps.jsonl the moment it ends; gpu_check.json (the
# figures: scripts/gpu_check_report.py) is written at the end, or at once on SIGTERM/SIGINT (the
# running step is recorded as terminated). Files go to $OUT when it is set, else
# /tmp/lobass-gpu-check/out.
#
#   bash scripts/gpu_check.sh              # run it (on the GPU machine)
#   bash scripts/gpu_check.sh --dry-run    # print the steps and their limits, run nothing
#   bash scripts/gpu_check.sh --rehearse   # here, on the CPU: every step that needs no CUDA
#   unshare -n bash scripts/gpu_check.sh --rehearse   # ... with the network cut
#   GPU_CHECK_LIMITS="install=40 pipeline=90.5"   # seconds per step (decimals accepted)
#   GPU_CHECK_SKIP="bench_training"        # steps not to run (recorded as skipped)
#   PYTHON=/opt/torch/.venv/bin/python3    # the interpreter (default python3; rehearsal: the
#                                          # first with torch of $PYTHON, .venv/bin/python, python3)
#
# The rehearsal proves on this CPU what the GPU run assumes: that the wheelhouse resolves for
# Python 3.12 offline against the image's versions (pip install --dry-run --no-index --target,
# the image's packages stood in for by scripts/gpu_image.py stubs); that the same packages, for
# this interpreter (.wheelhouse/local), install offline over an interpreter holding only the
# image's packages (links to this interpreter's, scripts/gpu_image.py site) and import there; that
# the 7B shape builds (on the meta device); that the GPU pipeline's config is valid; that the
# pipeline step runs on the tiny model (on the CPU); and that the GPU tests collect there.
# It exits non-zero when any step fails.
set -uo pipefail  # no -e: a failing step is recorded and the next one runs
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --rehearse) MODE=rehearse ;;
  "") ;;
  *) echo "usage: gpu_check.sh [--dry-run | --rehearse]" >&2; exit 2 ;;
esac
WORK=${GPU_CHECK_WORK:-/tmp/lobass-gpu-check}
[ "$MODE" = rehearse ] && WORK=${GPU_CHECK_WORK:-/tmp/lobass-gpu-rehearse}
OUT_DIR=${OUT:-$WORK/out}
# Seconds per step. The GPU run's add up to 410 s: with the transfers it fits a 10-minute lease
# with time to rerun. The rehearsal's own steps have room for a busy shared CPU.
declare -A LIMIT=([install]=25 [imports]=30 [bench_llama7b]=120 [bench_training]=55
                  [pipeline]=120 [gpu_tests]=60
                  [resolve312]=120 [install_local]=150 [shape7b]=60 [gpu_config]=60
                  [gpu_tests_collect]=120)
if [ "$MODE" = rehearse ]; then  # a 2-core CPU shared with others imports and trains slower
  LIMIT[imports]=120 LIMIT[pipeline]=300
fi
for pair in ${GPU_CHECK_LIMITS:-}; do
  name=${pair%%=*} value=${pair#*=}
  if [ -z "${LIMIT[$name]+x}" ] || ! [[ "$value" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "GPU_CHECK_LIMITS: '$pair' must be STEP=SECONDS (a number, decimals allowed) with STEP" \
      "one of: ${!LIMIT[*]}" >&2
    exit 2
  fi
  LIMIT[$name]=$value
done
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
SITE=$WORK/site  # the wheelhouse's packages (pip --target)
export PYTHONPATH=$SITE:$ROOT

if [ "$MODE" = rehearse ]; then
  source scripts/gpu_python.sh
  DEV_PY=$(python_with_torch) || exit 1
  # A venv of the same Python with no packages of its own (the base interpreter's may hold
  # anything) and only the image's packages on its path: the GPU image's python3, as far as this
  # machine can stand for it.
  "$("$DEV_PY" -c "import sys; print(sys._base_executable)")" -m venv --clear --without-pip \
    "$WORK/venv" || exit 1
  PY=$WORK/venv/bin/python
  IMAGE_SITE=$WORK/image_site
  export PYTHONPATH=$SITE:$IMAGE_SITE:$ROOT
  WHEELS=.wheelhouse/local
else
  PY=${PYTHON:-python3}
  WHEELS=.wheelhouse
fi

if [ "$MODE" != dry ]; then
  # nothing reused: the image site of an earlier rehearsal links into its venv, which may be gone
  rm -rf "$SITE" "${IMAGE_SITE:-$SITE}" "$WORK/artifacts" "$WORK/run" "$OUT_DIR/steps.jsonl"
  mkdir -p "$OUT_DIR" "$WORK"
  LOG=$OUT_DIR/gpu_check.log
  : >"$LOG"
  if [ "$MODE" = run ]; then
    nvidia-smi >"$OUT_DIR/nvidia_smi.txt" 2>&1
    cat "$OUT_DIR/nvidia_smi.txt" >>"$LOG"
    "$PY" -m pip freeze >"$OUT_DIR/image_freeze.txt" 2>>"$LOG"  # pins for scripts/gpu_image.txt
  fi
  echo "=== mode $MODE, python $PY ($("$PY" --version 2>&1)), PYTHONPATH=$PYTHONPATH" | tee -a "$LOG"
fi

report() {
  "$PY" scripts/gpu_check_report.py "$OUT_DIR" --mode "$MODE" >>"$LOG" 2>&1
}

CHILD="" CURRENT="" STEP_START=0
on_signal() {  # record the running step as terminated, write the summary, stop
  trap - TERM INT
  [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
  if [ -n "$CURRENT" ]; then
    record "$CURRENT" terminated "$STEP_START"
  fi
  report
  echo "=== terminated; summary in $OUT_DIR/gpu_check.json" | tee -a "$LOG"
  exit 143
}

# record NAME RC START: append the step's JSON line (name, rc, seconds, limit) to steps.jsonl.
record() {
  local seconds
  seconds=$(awk -v a="$3" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  "$PY" scripts/gpu_check_report.py "$OUT_DIR" --append "$1" "$2" "$seconds" "${LIMIT[$1]}" \
    >>"$LOG" 2>&1 || echo "=== could not record step $1" | tee -a "$LOG"
}

# step NAME COMMAND...: run under its time limit, log everything, append its JSON line.
step() {
  local name=$1 limit=${LIMIT[$1]} rc
  shift
  if [ "$MODE" = dry ]; then
    printf '%-15s %6ss  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    record "$name" skipped "$(date +%s%N)"
    echo "=== $name: skipped (GPU_CHECK_SKIP)" | tee -a "$LOG"
    return 0
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  CURRENT=$name STEP_START=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=""
  record "$name" "$rc" "$STEP_START"
  CURRENT=""
  echo "=== $name: rc=$rc" | tee -a "$LOG"
}
trap on_signal TERM INT

PIPELINE=(
  model=tiny_offline logger=none data.max_rows=48 data.mix.gsm8k.max_rows=16
  data.max_length=256 selection.ratio=0.25
  reference.max_steps=4 reference.save_steps=2 train.max_steps=3
  eval.gsm8k.limit=4 eval.gsm8k.num_fewshot=0 eval.gsm8k.max_gen_toks=16
  eval.ifeval.limit=2 eval.ifeval.max_gen_toks=16 eval.heldout.max_rows=8
  eval.generation.max_new_tokens=16 eval.generation.sets.vicuna.max_rows=2
  eval.generation.sets.mt_bench.max_rows=2 eval.generation.sets.heldout_prompts.max_rows=2
  "artifacts_dir=$WORK/artifacts" "models_dir=$WORK/models" "output_dir=$WORK/run"
)
GPU_GROUPS=(model.device=cuda model.dtype=bfloat16 reference=lora_gpu train=lora_gpu score=gpu
            eval=gpu reference.global_batch_size=8 train.global_batch_size=8)
# pip check over the image and the wheelhouse: any broken requirement fails, except lobass's own
# wandb and gguf when a checkout's egg-info is on the path (left out on purpose: see
# scripts/gpu_requirements.txt).
PIP_CHECK="{ '$PY' -m pip check || true; } | { ! grep -v -e '^lobass ' -e '^No broken'; }"
IMPORTS="import hydra, omegaconf, lm_eval, datasets, torch, transformers, peft, accelerate
import lobass.pipeline, lobass.evaluation.harness
from lm_eval.tasks import TaskManager
site = '$SITE'
for module in (hydra, omegaconf, lm_eval, datasets):
    assert module.__file__.startswith(site), f'{module.__name__} from {module.__file__}, not {site}'
assert lobass.__file__.startswith('$ROOT'), lobass.__file__
print('imports ok: torch', torch.__version__, 'transformers', transformers.__version__,
      'lm_eval', lm_eval.__version__ if hasattr(lm_eval, '__version__') else '?')"

if [ "$MODE" = rehearse ]; then
  # 1) the cp312 wheelhouse resolves offline against the image (its packages as stubs)
  step resolve312 bash -c "rm -rf '$WORK/stubs312' '$WORK/target312' &&
    '$DEV_PY' scripts/gpu_image.py stubs scripts/gpu_image.txt '$WORK/stubs312' &&
    '$DEV_PY' -m pip install --dry-run --no-index --find-links .wheelhouse \
      --find-links '$WORK/stubs312' -c '$WORK/stubs312/constraints.txt' --python-version 3.12 \
      --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
      --platform manylinux2014_x86_64 --only-binary=:all: --target '$WORK/target312' \
      -r scripts/gpu_requirements.txt"
  # 2) the same packages for this interpreter, offline, over an image-like interpreter
  step install_local bash -c "rm -rf '$IMAGE_SITE' &&
    '$DEV_PY' scripts/gpu_image.py site scripts/gpu_image.txt '$IMAGE_SITE' \
      --exclude-wheels '$WHEELS' &&
    '$DEV_PY' -m pip install -q --no-index --no-deps --target '$SITE' '$WHEELS'/*.whl &&
    $PIP_CHECK"
  step imports "$PY" -c "$IMPORTS"
  # 3) LLaMA-2-7B's shape on the meta device: the architecture the GPU benchmark builds
  step shape7b "$PY" -c "
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM
import lobass
from lobass.memory import architecture_config
with initialize_config_dir(config_dir='$ROOT/conf', version_base='1.3'):
    model_cfg = compose(config_name='config', overrides=['model=llama2_7b']).model
with torch.device('meta'):
    model = AutoModelForCausalLM.from_config(architecture_config(model_cfg), dtype=torch.bfloat16)
params = sum(p.numel() for p in model.parameters())
assert params == 6_738_415_616, params  # LLaMA-2-7B's published count
assert next(model.parameters()).dtype == torch.bfloat16
print('llama2_7b on meta:', params, 'parameters, bf16')"
  # 4) the GPU pipeline's config is valid (a typo would cost a GPU run), then the step on the CPU
  step gpu_config "$PY" -c "
import sys
from hydra import compose, initialize_config_dir
import lobass
from lobass.config import validate
with initialize_config_dir(config_dir='$ROOT/conf', version_base='1.3'):
    cfg = compose(config_name='config', overrides=sys.argv[1:])
validate(cfg)
print('the GPU pipeline config is valid:', cfg.model.name, cfg.model.device, cfg.model.dtype)
" "${PIPELINE[@]}" "${GPU_GROUPS[@]}"
  step pipeline "$PY" run.py "${PIPELINE[@]}" model.device=cpu
  # 5) the GPU tests collect here as they will there (the shipped tokenizer, no GGUF package)
  step gpu_tests_collect bash -c "LOBASS_TEST_TINY_MODEL=tiny_offline '$PY' -m pytest -m gpu \
    --collect-only -q -p no:cacheprovider tests | grep -E '^[1-9][0-9]*/[0-9]+ tests? collected'"
else
  # 1) the wheels the image lacks, offline; pip check over image + wheelhouse
  step install bash -c "'$PY' -m pip install -q --no-index --no-deps --target '$SITE' \
    '$WHEELS'/*.whl && $PIP_CHECK"
  step imports "$PY" -c "$IMPORTS
assert torch.cuda.is_available(), 'torch sees no GPU'
print(torch.cuda.get_device_name())"
  # 2) benchmarks, bf16 on CUDA: scoring on the 7B shape (512 real Alpaca rows, 16k tokens per
  #    batch), training on the tiny model (correctness and the JSON; no 7B weights travel)
  step bench_llama7b "$PY" benchmarks/scoring.py --device cuda --model tiny_offline \
    --shape llama2_7b --rows 512 --max-tokens 16384 --models-dir "$WORK/models" \
    --json "$OUT_DIR/bench_llama7b.json"
  step bench_training "$PY" benchmarks/training.py --device cuda --model tiny_offline --steps 8 \
    --repeats 1 --micro-batch-size 0 --models-dir "$WORK/models" \
    --json "$OUT_DIR/bench_training.json"
  # 3) the whole pipeline on the tiny model with the GPU groups
  step pipeline "$PY" run.py "${PIPELINE[@]}" "${GPU_GROUPS[@]}"
  # 4) the CUDA-only tests (memory estimates against torch's measured peaks); a skip fails
  step gpu_tests bash -c "LOBASS_TEST_TINY_MODEL=tiny_offline '$PY' -m pytest -m gpu -q \
    -p no:cacheprovider --junitxml '$OUT_DIR/gpu_tests.xml' tests; rc=\$?;
    '$PY' scripts/gpu_check_report.py '$OUT_DIR' --junit '$OUT_DIR/gpu_tests.xml' || exit 1;
    exit \$rc"
fi
[ "$MODE" != dry ] && cp "$WORK/run/summary.json" "$OUT_DIR/pipeline_summary.json" 2>/dev/null

if [ "$MODE" != dry ]; then
  trap - TERM INT
  report
  "$PY" -c "import json, sys; r = json.load(open('$OUT_DIR/gpu_check.json'));
print(json.dumps(r, indent=1)); sys.exit(0 if r['all_ok'] else 1)" | tee -a "$LOG"
  exit "${PIPESTATUS[0]}"
fi
