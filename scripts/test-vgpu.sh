#!/usr/bin/env bash
# The GPU suite on the virtual CUDA device (tests/vgpu): every GPU test, the criterion CUDA groups
# at a tiny size, `barlow bench loss` and `barlow train` on the CUDA engine, all with
# BARLOW_REQUIRE_GPU=1, so a test that would skip fails instead; two devices with NCCL between them
# (BARLOW_REQUIRE_GPUS=2) for the multi-GPU tests. Then the checks of the device
# itself (tests/vgpu/selftest.cpp) and mutation runs: a swapped launch argument or a flipped GEMM
# transpose must make the suite fail. Ends with the tally line; exits non-zero on any failure or
# skip.
#
# It proves launches, library calls and stream order right; it measures no speed, and no figure
# from it is a GPU's. A real GPU (scripts/gpu-bundle.sh) stays the final word.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${NVCC:-}" ]; then
  eval "$(bash scripts/install-nvcc.sh)" || exit 1
fi
export NVCC BARLOW_REQUIRE_KERNELS=1
lib=$(bash scripts/build-vgpu.sh) || { echo "test-vgpu: building the virtual device failed"; exit 1; }

passed=0 failed=0 skipped=0
pass() { echo "ok    $*"; passed=$((passed + 1)); }
fail() { echo "FAIL  $*"; failed=$((failed + 1)); }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Build everything with the ordinary environment first; only the runs see the virtual device.
cargo test --release --no-run --test gpu_loss --test gpu_train --test gpu_nccl --test gpu_audit || exit 1
cargo build --release --bin barlow || exit 1
cargo bench --no-run --bench loss || exit 1
# The Python extension's own tests (a PyO3 crate's test binary links libpython).
pytarget=$PWD/target/python
(cd python && PYO3_PYTHON=${PYO3_PYTHON:-python3} CARGO_TARGET_DIR=$pytarget \
  cargo test --release --locked --no-run) >"$work/pybuild.log" 2>&1
cat "$work/pybuild.log"
pyglue=$(sed -n 's/^ *Executable unittests src\/lib.rs (\(.*\))$/\1/p' "$work/pybuild.log")
pyglue=$(cd python && realpath "$pyglue")
# ...and the module itself, importable without PyTorch (no libpython link, as maturin builds it).
(cd python && PYO3_BUILD_EXTENSION_MODULE=1 PYO3_PYTHON=${PYO3_PYTHON:-python3} \
  CARGO_TARGET_DIR=$pytarget cargo build --release --locked) || exit 1
mkdir -p "$work/pymod" && cp "$pytarget/release/lib_native.so" "$work/pymod/_native.abi3.so"
[ -x "$pyglue" ] || { echo "test-vgpu: building the Python extension's tests failed"; exit 1; }
selftest=$work/selftest
c++ -std=c++20 -O1 -g -I .cuda/nvidia/cu13/include -o "$selftest" tests/vgpu/selftest.cpp \
  -L "$lib" -lvgpu -Wl,-rpath,"$lib" -pthread || exit 1

# Two devices, so that the multi-GPU tests (NCCL through the device's stand-in) run too; the
# single-device tests use device 0.
export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} BARLOW_REQUIRE_GPU=1
export VGPU_DEVICES=2 BARLOW_REQUIRE_GPUS=2
barlow=target/release/barlow

# The device's own checks, each shown to fire on a planted violation and to stay quiet on its
# legal twin.
if "$selftest" >"$work/selftest.log" 2>&1; then pass "virtual device self-test"; else fail "virtual device self-test"; fi
grep -E '^(ok|FAIL) |^selftest:' "$work/selftest.log" | sed 's/^/      /'

# The GPU tests: cudnnFind* ranking, then cuDNN's heuristics (BARLOW_CUDNN_FIND=0).
run_tests() {
  local what=$1
  shift
  cargo test --release "$@" -- --nocapture >"$work/t.log" 2>&1
  local p f s
  p=$(grep -Eo '^test result: .* ([0-9]+) passed' "$work/t.log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
  f=$(grep -Eo '^test result: .*; ([0-9]+) failed' "$work/t.log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
  # Test threads print concurrently: a SKIP counts wherever it stands in a line.
  s=$(grep -o 'SKIP: ' "$work/t.log" | wc -l)
  grep -E '^test .* \.\.\. |^vgpu: |panicked|SKIP: ' "$work/t.log" | sed "s/^/      [$what] /"
  passed=$((passed + p - s))
  failed=$((failed + f))
  skipped=$((skipped + s))
  if [ "$p" -eq 0 ] || ! grep -q '^test result: ok' "$work/t.log" || grep -q '^vgpu: ' "$work/t.log"; then
    fail "GPU tests ($what)"
    tail -n 30 "$work/t.log"
  fi
}
run_tests "cudnnFind" --test gpu_loss --test gpu_train --test gpu_nccl
BARLOW_CUDNN_FIND=0 run_tests "heuristics" --test gpu_train
# The launch audit: every kernel's grid at the paper's shapes (kernels and GEMMs recorded, not
# run), against an H100's 132 SMs; its table goes into the log.
: >"$work/launches.log"
RUST_TEST_THREADS=1 VGPU_LAUNCH_LOG=$work/launches.log VGPU_SKIP_COMPUTE=1 run_tests "launch audit" --test gpu_audit
awk '/^kernel  /{on=1} on && /^test /{on=0} on' "$work/t.log" | sed 's/^/      /'

# The Python extension's CUDA glue (python/src/device.rs) with a stream of the test's own standing
# in for PyTorch's: each call forks from it and joins back, which the device checks.
if "$pyglue" --nocapture >"$work/py.log" 2>&1 && grep -q '^test result: ok. 2 passed' "$work/py.log"; then
  pass "Python extension: CUDA tensors through PyTorch's stream (2 tests)"
else
  fail "Python extension's device tests"; tail -n 20 "$work/py.log"
fi
# The module's CUDA entry point called from Python, on buffers and a stream made through the
# driver API (python/tests/native_cuda.py; no PyTorch, whose CUDA runtime the device cannot host).
if PYTHONPATH=$work/pymod ${PYO3_PYTHON:-python3} python/tests/native_cuda.py >"$work/pyn.log" 2>&1 \
  && grep -q '^native cuda: 4 cases and 2 errors passed' "$work/pyn.log"; then
  pass "Python extension: the CUDA entry point from Python (f32, bf16, f16, errors)"
else
  fail "Python extension's CUDA entry point"; tail -n 20 "$work/pyn.log"
fi

if cargo bench --bench loss -- --test loss_cuda >"$work/bench.log" 2>&1 && grep -q 'loss_cuda on the virtual CUDA device' "$work/bench.log"; then
  pass "criterion CUDA groups (tiny shape)"
else
  fail "criterion CUDA groups"; tail -n 20 "$work/bench.log"
fi

if "$barlow" info >"$work/info.log" 2>&1 && grep -q 'virtual' "$work/info.log"; then
  pass "barlow info names the virtual device"
else
  fail "barlow info"; cat "$work/info.log"
fi

if "$barlow" bench loss --device cuda --n 33 --d 65 --repeats 2 >"$work/bl.log" 2>&1 \
  && grep -q 'vgpu' "$work/bl.log" && grep -q 'not GPU figures' "$work/bl.log"; then
  pass "barlow bench loss --device cuda (rows labelled vgpu)"
else
  fail "barlow bench loss --device cuda"; tail -n 20 "$work/bl.log"
fi

if "$barlow" train --device cuda --max-train 128 --batch-size 32 --epochs 1 --width 8 \
  --projector 64,64,64 --knn-every 0 --out "$work/run" >"$work/train.log" 2>&1 \
  && [ -f "$work/run/checkpoint.safetensors" ]; then
  pass "barlow train --device cuda (4 steps on the built-in sample)"
else
  fail "barlow train --device cuda"; tail -n 20 "$work/train.log"
fi

# A worker thread per device, NCCL between them; rank 0 alone writes.
if "$barlow" train --device cuda --gpus 2 --max-train 128 --batch-size 32 --epochs 1 --width 8 \
  --projector 64,64,64 --knn-every 0 --out "$work/run2" >"$work/train2.log" 2>&1 \
  && grep -q 'data parallel: 2 ranks of 16 images' "$work/train2.log" \
  && [ "$(grep -c '"event":"step"' "$work/run2/metrics.jsonl")" -eq 4 ]; then
  pass "barlow train --device cuda --gpus 2 (4 steps of 2 x 16 images)"
else
  fail "barlow train --device cuda --gpus 2"; tail -n 20 "$work/train2.log"
fi

if "$barlow" bench train --device cuda --gpus 2 --preset small --image 8 --batch 4 --width 4 \
  --projector 16,16,16 --warmup 1 --steps 2 --profile-steps 0 >"$work/bt.log" 2>&1 \
  && grep -q 'barlow x2 GPUs' "$work/bt.log" && grep -q 'scaling efficiency' "$work/bt.log"; then
  pass "barlow bench train --gpus 2 (a row per GPU count, the scaling line)"
else
  fail "barlow bench train --gpus 2"; tail -n 20 "$work/bt.log"
fi

# Mutations: the suite must notice a wrong launch or GEMM. Each run must fail.
mutant() {
  local spec=$1 test=$2
  if VGPU_MUTATE=$spec cargo test --release --test gpu_loss -- --exact "$test" >"$work/m.log" 2>&1; then
    fail "mutation $spec went unnoticed by $test"
  elif grep -q '^vgpu: mutation active' "$work/m.log" && grep -Eq '^test .* FAILED|^vgpu: ' "$work/m.log"; then
    pass "mutation $spec caught by $test"
  else
    fail "mutation $spec: $test failed without the mutation taking effect"; tail -n 20 "$work/m.log"
  fi
}
mutant swap:standardize_fwd_f32_f32 fused_loss_matches_reference_f32
mutant swap:standardize_bwd_f32 standardize_backward_matches_reference
mutant transpose cublas_gemms_match_reference_in_every_mode

echo
echo "virtual CUDA device: $((passed + failed + skipped)) checks"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ] && [ "$skipped" -eq 0 ]
