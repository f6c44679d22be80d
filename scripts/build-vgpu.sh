#!/usr/bin/env bash
# Builds the virtual CUDA device (tests/vgpu) into one shared library, target/vgpu/libvgpu.so, with
# the names real installations ship (libcuda.so.1, libcublas.so.13, libcudnn.so.9, libnccl.so.2)
# as links to it, so they share one state. Put target/vgpu on LD_LIBRARY_PATH to run a program on it.
#
#   scripts/build-vgpu.sh            prints the folder to put on LD_LIBRARY_PATH
#
# Needs a C++20 compiler and cuda.h (scripts/install-nvcc.sh installs it into .cuda/).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${VGPU_OUT:-$root/target/vgpu}
cxx=${CXX:-c++}
inc=${CUDA_INCLUDE:-$root/.cuda/nvidia/cu13/include}
[[ -f $inc/cuda.h ]] || { echo "build-vgpu: $inc/cuda.h not found (run scripts/install-nvcc.sh)" >&2; exit 1; }
mkdir -p "$out/gen"

# The kernels, and the table of their names taken from the preprocessed sources (kernels made
# through token-pasting macros included).
src=$out/gen/kernel_sources.inc
: >"$src.tmp"
for f in "$root"/kernels/*/*.cu; do echo "#include \"$f\"" >>"$src.tmp"; done
mv "$src.tmp" "$src"
flags=(-std=c++20 -DBARLOW_HOST_EMULATION -I "$root/tests/vgpu" -I "$root/tests/emulated"
       -I "$root/kernels" -I "$out/gen" -I "$inc")
"$cxx" "${flags[@]}" -E -P -x c++ "$src" | tr -s '\n\t' '  ' \
  | grep -oE 'extern "C" +void +[A-Za-z_][A-Za-z_0-9]* *\(' \
  | sed -E 's/.*void +([A-Za-z_0-9]+).*/VGPU_KERNEL(\1)/' | sort -u >"$out/gen/kernel_table.inc"
[[ -s $out/gen/kernel_table.inc ]] || { echo "build-vgpu: no kernels found in kernels/*/*.cu" >&2; exit 1; }

lib=$out/libvgpu.so
sources=()
for s in "$root"/tests/vgpu/*.cpp; do
  [[ $s == */selftest.cpp ]] || sources+=("$s")  # a program linked against the library, not part of it
done
newest=$(ls -t "${sources[@]}" "$root"/tests/vgpu/*.h "$root"/tests/emulated/cuda_scalars.h \
         "$root"/kernels/*.cuh "$root"/kernels/*/* "${BASH_SOURCE[0]}" | head -n 1)
if [[ ! -f $lib || $newest -nt $lib ]]; then
  objs=() pids=()
  for s in "${sources[@]}"; do
    o=$out/$(basename "${s%.cpp}").o
    objs+=("$o")
    "$cxx" "${flags[@]}" -O2 -g -fPIC -pthread -Wall -Wextra -Wno-unused-parameter -c "$s" -o "$o" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  # nodelete: the loader's presence probes dlopen and dlclose each name; the state must survive.
  "$cxx" -shared -pthread -Wl,-z,nodelete -o "$lib.tmp" "${objs[@]}"
  mv "$lib.tmp" "$lib"
fi
# Only the names real installations ship (the driver's libcuda.so.1, the CUDA 13 wheels'
# libcublas.so.13, cuDNN 9, NCCL 2), so a loader that looks for another name fails here as it
# would there. Links of other names from earlier builds go.
rm -f "$out"/libcuda.so "$out"/libcublas.so "$out"/libcudnn.so "$out"/libnccl.so
for name in libcuda.so.1 libcublas.so.13 libcudnn.so.9 libcurand.so libnccl.so.2; do ln -sf libvgpu.so "$out/$name"; done
echo "$out"
