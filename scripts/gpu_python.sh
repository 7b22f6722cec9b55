# Sourced by scripts/gpu_wheelhouse.sh and gpu_check.sh --rehearse: python_with_torch prints the
# first interpreter that imports torch: $PYTHON, the set-up's .venv, then python3.
python_with_torch() {
  local candidate
  for candidate in ${PYTHON:-} .venv/bin/python python3; do
    if "$candidate" -c "import torch" >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  echo "no interpreter with torch: set PYTHON=/path/to/python (scripts/setup.sh makes .venv)" >&2
  return 1
}
