#!/usr/bin/env bash
# Installs a pinned CUDA 13.0 nvcc from PyPI into a local folder (default: .cuda/ in the project)
# and prints the NVCC path to build with. Re-running is cheap: a matching install is reused.
#
#   scripts/install-nvcc.sh [DIR]        then: export NVCC=DIR/nvidia/cu13/bin/nvcc
#
# The pins go together: an unpinned nvidia-nvvm pulls a newer NVVM whose PTX the 13.0 ptxas
# rejects, and PTX newer than the driver cannot be JIT-compiled (driver 580 = CUDA 13.0).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-$here/.cuda}
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
nvcc=$dir/nvidia/cu13/bin/nvcc
stamp=$dir/.barlow-pins

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
  echo "install-nvcc: $python not found; install Python 3 with pip" >&2
  exit 1
fi

if [[ -x $nvcc && -f $stamp && "$(cat "$stamp")" == "${pins[*]}" ]]; then
  echo "install-nvcc: reusing $dir" >&2
else
  echo "install-nvcc: installing ${pins[*]} into $dir" >&2
  tmp=$(mktemp -d "${dir%/}.tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  "$python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
    --target "$tmp" "${pins[@]}"
  [[ -x $tmp/nvidia/cu13/bin/nvcc ]] || { echo "install-nvcc: nvcc missing after install" >&2; exit 1; }
  echo "${pins[*]}" >"$tmp/.barlow-pins"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  trap - EXIT
fi

"$nvcc" --version | tail -n 2 >&2
echo "export NVCC=$nvcc"
