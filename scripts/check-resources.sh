#!/usr/bin/env bash
# Every kernel's registers, shared memory and spills as ptxas reports them, for each GPU generation
# the fatbin carries machine code for (sm_80 and sm_90 by default), printed as a table. Fails on
# any register spill and on static shared memory above the 48 KiB a block gets without opting in.
#
#   scripts/check-resources.sh [ARCH ...]      e.g. scripts/check-resources.sh 80 90
#
# Needs nvcc ($NVCC, or the project's own from scripts/install-nvcc.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
nvcc=${NVCC:-$root/.cuda/nvidia/cu13/bin/nvcc}
[[ -x $nvcc ]] || { echo "check-resources: nvcc not found (run scripts/install-nvcc.sh)" >&2; exit 1; }
archs=("$@")
[[ ${#archs[@]} -gt 0 ]] || archs=(80 90)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One translation unit per kernel folder, as build.rs compiles them.
for dir in "$root"/kernels/*/; do
  folder=$(basename "$dir")
  unit=$work/$folder.cu
  for f in "$dir"*.cu; do echo "#include \"$f\""; done >"$unit"
  for a in "${archs[@]}"; do
    "$nvcc" -cubin -O3 -std=c++17 -I "$root/kernels" -arch="sm_$a" -Xptxas -v \
      -o "$work/$folder-$a.cubin" "$unit" 2>"$work/$folder-$a.log" \
      || { cat "$work/$folder-$a.log" >&2; exit 1; }
  done
done

# ptxas prints, per kernel: "Compiling entry function 'NAME' for 'sm_XX'", then its stack frame and
# spills, then "Used N registers, ... M bytes smem". Each line of the table is one kernel on one
# architecture.
cat "$work"/*.log | awk -v limit=$((48 * 1024)) '
  /Compiling entry function/ {
    match($0, /function .[A-Za-z_0-9]+. for .sm_[0-9]+./)
    s = substr($0, RSTART, RLENGTH); gsub(/function .|. for .|.$/, " ", s)
    split(s, p, " "); name = p[1]; arch = p[2]; spill = 0; next
  }
  /spill stores/ {
    match($0, /[0-9]+ bytes spill stores/); st = substr($0, RSTART, RLENGTH) + 0
    match($0, /[0-9]+ bytes spill loads/); ld = substr($0, RSTART, RLENGTH) + 0
    spill = st + ld; next
  }
  /Used [0-9]+ registers/ && name != "" {
    match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15) + 0
    smem = 0
    if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH) + 0
    bad = ""
    if (spill > 0) bad = bad " spills " spill " bytes"
    if (smem > limit) bad = bad " shared memory above 48 KiB"
    printf "%-6s %5d %8d %6d  %s%s\n", arch, regs, smem, spill, name, (bad == "" ? "" : "   <-- " bad)
    if (bad != "") failed++
    count++
    name = ""
  }
  BEGIN { printf "%-6s %5s %8s %6s  %s\n", "arch", "regs", "smem B", "spill", "kernel" }
  END {
    printf "%d kernel builds checked, %d over the limits\n", count, failed
    if (count == 0) { print "check-resources: ptxas reported no kernels" > "/dev/stderr"; exit 1 }
    exit failed > 0
  }'
