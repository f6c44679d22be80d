#!/usr/bin/env bash
# Runs the whole test suite and prints an honest tally: GPU tests that found no GPU print
# `SKIP: <reason>` and are counted as skipped here, not as passed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Build with the kernels when the project's own nvcc (scripts/install-nvcc.sh) is installed.
if [ -z "${NVCC:-}" ] && [ -x .cuda/nvidia/cu13/bin/nvcc ]; then
  export NVCC=$PWD/.cuda/nvidia/cu13/bin/nvcc
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Reused tensor buffers start as NaN, so an output that is not written in full fails its test.
export BARLOW_POISON_BUFFERS=1
# The candle op is part of the suite (its tests and the README's candle snippet).
cargo test --release --features candle "$@" -- --nocapture 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .*; ([0-9]+) failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
# Test threads print concurrently, so a SKIP line can start after another test's "test ... ok":
# every SKIP is counted wherever it stands in a line.
skips=$(grep -oE 'SKIP: .*' "$log")
skipped=$(printf '%s' "$skips" | grep -c 'SKIP: ')
echo
if [ "$skipped" -gt 0 ]; then
  echo "Skipped (they checked nothing):"
  printf '%s\n' "$skips" | sed 's/^/  /'
  if printf '%s' "$skips" | grep -q 'CUDA'; then
    echo "(without a GPU, bash scripts/test-vgpu.sh runs the GPU tests on the virtual CUDA device)"
  fi
fi
echo "$((passed - skipped)) passed, $failed failed, $skipped skipped"
exit "$status"
