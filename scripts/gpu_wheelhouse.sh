#!/usr/bin/env bash
# Build .wheelhouse/: the wheels an offline GPU machine needs beyond its image, for
# scripts/gpu_check.sh. Run here, with PyPI reachable; the GPU machine then installs with
# `pip --no-index`. Two sets:
#   .wheelhouse/          cp312 manylinux x86_64 (the image's python3): travels, at most 40 MiB
#   .wheelhouse/local/    the same packages for this machine's interpreter: the rehearsal
#                         (gpu_check.sh --rehearse) installs these; they do not travel
# Each holds scripts/gpu_requirements.txt and every dependency of it that the image
# (scripts/gpu_image.txt) lacks, nothing else: the image's own packages are stood in for by empty
# stub wheels (scripts/gpu_image.py) while pip resolves, and never downloaded.
#
#   bash scripts/gpu_wheelhouse.sh                 # PYTHON: an interpreter with torch (.venv's)
#   WHEELHOUSE_MAX_MIB=40 bash scripts/gpu_wheelhouse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_python.sh
PY=$(python_with_torch)
OUT=.wheelhouse
MAX_MIB=${WHEELHOUSE_MAX_MIB:-40}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
rm -rf "$OUT"
mkdir -p "$OUT/local" "$TMP/built"
PIP=("$PY" -m pip --disable-pip-version-check)

# 1) Pure-Python dependencies published only as source (lm-eval's sqlitedict, rouge-score,
#    word2number, langdetect; omegaconf's antlr4 runtime pinned to 4.9.*): built into
#    py3-none-any wheels here, so both sets stay --only-binary and nothing compiles there.
"${PIP[@]}" wheel -q --no-deps -w "$TMP/built" \
  "antlr4-python3-runtime==4.9.3" sqlitedict rouge-score word2number "langdetect>=1.0.9"
cp "$TMP/built"/*.whl "$OUT/"
cp "$TMP/built"/*.whl "$OUT/local/"

# 2) The cp312 set: resolved against the image's versions (stubs), downloaded, stubs dropped.
"$PY" scripts/gpu_image.py stubs scripts/gpu_image.txt "$TMP/stubs312"
"${PIP[@]}" download -q -d "$OUT" --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --find-links "$OUT" --find-links "$TMP/stubs312" \
  -c "$TMP/stubs312/constraints.txt" -r scripts/gpu_requirements.txt

# 3) The local set: resolved against this interpreter's versions of the image's packages.
"$PY" scripts/gpu_image.py stubs scripts/gpu_image.txt "$TMP/stubs_local" --installed
"${PIP[@]}" download -q -d "$OUT/local" --only-binary=:all: --find-links "$OUT/local" \
  --find-links "$TMP/stubs_local" -c "$TMP/stubs_local/constraints.txt" \
  -r scripts/gpu_requirements.txt
rm -f "$OUT"/*+image-* "$OUT/local"/*+image-*

# 4) The size that travels: the cp312 set only.
bytes=$(find "$OUT" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{ s += $1 } END { print s }')
count=$(find "$OUT" -maxdepth 1 -name '*.whl' | wc -l)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 2^20 }')
echo "gpu_wheelhouse: $count cp312 wheels, $mib MiB in $OUT (limit $MAX_MIB MiB);" \
  "$(find "$OUT/local" -name '*.whl' | wc -l) local wheels in $OUT/local"
awk -v m="$mib" -v l="$MAX_MIB" 'BEGIN { exit !(m <= l) }' || {
  echo "gpu_wheelhouse: $OUT is $mib MiB, over $MAX_MIB MiB" >&2; exit 1; }
