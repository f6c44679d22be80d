#!/usr/bin/env bash
# The candle op on CUDA tensors (feature candle-cuda) on the virtual CUDA device, after clippy over
# that feature. candle's CUDA backend links the CUDA libraries when it is built; here they are the
# virtual device's library, and the few functions candle references that the device does not
# model resolve to stubs that abort with a `vgpu: not modelled:` report if anything calls them.
# Builds in its own target folder (the link flags differ from a normal build). candle's own
# kernels (PTX) do not run on the virtual device: the test checks barlow's side there (loss,
# gradients, refusals) and leaves candle's autograd arithmetic to a GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${NVCC:-}" ]; then
  eval "$(bash scripts/install-nvcc.sh)"
fi
# candle's kernels build for one compute capability, normally read from nvidia-smi.
export NVCC BARLOW_REQUIRE_KERNELS=1 CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export PATH="$(dirname "$NVCC"):$PATH"
lib=$(bash scripts/build-vgpu.sh)
mkdir -p "$lib/link-only"
# candle links CUDA at build time, by the development names (libcuda.so, libcublas.so, ...), which
# its binary then asks for at run time: those names live here, apart from the names real
# installations ship that barlow's own loader must find.
for n in libcuda.so libcublas.so libnvrtc.so libcublasLt.so libcudart.so; do ln -sf ../libvgpu.so "$lib/link-only/$n"; done

export CARGO_TARGET_DIR=target/candle-vgpu
export RUSTFLAGS="-L $lib -L $lib/link-only -C link-arg=-Wl,--unresolved-symbols=ignore-all -C link-arg=-Wl,-z,lazy"
features=(--release --no-default-features --features candle-cuda)
cargo clippy "${features[@]}" --all-targets -- -D warnings
bin=$(cargo test "${features[@]}" --test candle_op --no-run --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "candle_op":
        print(m["executable"])')
[ -x "$bin" ] || { echo "test-vgpu-candle: no candle_op test binary" >&2; exit 1; }

# CUDA functions the binary needs that the virtual device lacks: stubs that report and abort,
# except the CUDA runtime's registration of statically linked kernels, which runs at load (no
# kernel of it is ever launched here, and a launch would hit an aborting stub).
stubs=$lib/unmodelled.c
comm -23 <(nm -D --undefined-only "$bin" | awk '{print $2}' | sed 's/@.*//' | sort -u) \
         <(nm -D --defined-only "$lib/libvgpu.so" | awk '{print $3}' | sort -u) \
  | grep -E '^(cu|nvrtc|curand|__cuda)' \
  | awk 'BEGIN { print "#include <stdio.h>\n#include <stdlib.h>\nstatic void* handle;" }
         /^__cuda(RegisterFatBinary|RegisterFatBinaryEnd|RegisterFunction|RegisterVar|UnregisterFatBinary)$/ {
           printf "void* %s(void) { return &handle; }\n", $1; next }
         { printf "void %s(void) { fputs(\"\\nvgpu: not modelled: %s\\n\", stderr); abort(); }\n", $1, $1 }' \
  >"$stubs"
"${CC:-cc}" -shared -fPIC -o "$lib/libvgpu_unmodelled.so" "$stubs"

LD_LIBRARY_PATH=$lib:$lib/link-only LD_PRELOAD=$lib/libvgpu_unmodelled.so BARLOW_REQUIRE_GPU=1 \
  "$bin" --nocapture 2>&1 | tee "$CARGO_TARGET_DIR/candle_op.log"
status=${PIPESTATUS[0]}
if grep -q '^vgpu: ' "$CARGO_TARGET_DIR/candle_op.log"; then
  echo "test-vgpu-candle: the virtual device reported a problem" >&2
  exit 1
fi
exit "$status"
