#!/usr/bin/env bash
# Machine code of the Hopper W4A4 GEMM and where its instructions go, on a GPU machine with
# CUDA's tools (ptxas, cuobjdump, ncu):
#
#   bash scripts/sass_w4a4_hopper.sh OUT_DIR ["variant,variant,..."] [MxKxN]
#
# Writes, per variant, <kernel>.sass (ptxas + cuobjdump of the PTX Mosaic GPU emits) and, for
# the first variant and the activation kernel, ncu's per-instruction source view
# (<name>.source.csv: executed instructions and stall samples per SASS line).
set -euo pipefail
out=${1:?usage: sass_w4a4_hopper.sh OUT_DIR [variants] [MxKxN]}
variants=${2:-"s8 m64 w3 g2 s4"}
shape=${3:-4608x3072x3072}
export PATH=/usr/local/cuda/bin:$PATH
here=$(cd "$(dirname "$0")" && pwd)
dump=$(mktemp -d)
MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO=$dump \
  python3 "$here/profile_w4a4_hopper.py" --variants "$variants" --shape "$shape"
for ptx in "$dump"/*.ptx; do
  name=$(basename "${ptx%.ptx}")
  ptxas -arch=sm_90a -v "$ptx" -o "$dump/$name.cubin" 2>&1 | tail -3
  cuobjdump -sass "$dump/$name.cubin" > "$out/$name.sass"
done
first=${variants%%,*}
ncu --clock-control none -k regex:w4a4 --section SourceCounters --section InstructionStats \
  -o "$dump/gemm" python3 "$here/profile_w4a4_hopper.py" --variants "$first" --shape "$shape"
ncu --import "$dump/gemm.ncu-rep" --page source --print-source sass --csv > "$out/gemm.source.csv"
ncu --clock-control none -k regex:quantize_act --section SourceCounters \
  -o "$dump/act" python3 "$here/profile_w4a4_hopper.py" --act --shape "$shape"
ncu --import "$dump/act.ncu-rep" --page source --print-source sass --csv > "$out/act.source.csv"
ls -la "$out"
