#!/usr/bin/env bash
# The GPU bundle's runner (copied to run.sh by scripts/gpu-bundle.sh). On a GPU host, with no Rust
# toolchain and no network: GPU tests (failing, not skipping, when a GPU is present but unusable),
# compute-sanitizer memcheck and racecheck, the loss benchmarks, and the PyTorch comparison when
# PyTorch is importable. Logs and summary.txt go to REPORT_DIR (default ./gpu-report).
# Exit status is non-zero if anything failed, or if there is no GPU.
#
#   bash run.sh [REPORT_DIR]
#   env: BENCH_ARGS   extra arguments for `barlow bench loss` (e.g. "--n 2048 --d 8192")
#        PT_COMPILE_N / PT_COMPILE_D   the (smaller) grid timed under torch.compile
#        EXT_N / EXT_D   the grid of the Python extension against the official loss
#        ONLY=tests,sanitizer,loss,train   the sections to run (default: all of them)
#        TRAIN_BENCH_ARGS   extra arguments for `barlow bench train`
#        PT_TRAIN_MODE=eager|compile|both   the PyTorch training-step modes (default both)
#        RUN_CRITERION=1
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The binaries come compressed; unpack them once, beside the bundle or in a temporary folder.
bin=$here
if [ -f "$here/binaries.tar.xz" ]; then
  if [ -w "$here" ]; then bin=$here/unpacked; else bin=$(mktemp -d); fi
  if [ ! -x "$bin/barlow" ]; then
    mkdir -p "$bin" && tar -C "$bin" -xJf "$here/binaries.tar.xz" || { echo "cannot unpack binaries"; exit 1; }
  fi
fi
report=$(mkdir -p "${1:-./gpu-report}" && cd "${1:-./gpu-report}" && pwd)
summary=$report/summary.txt
: >"$summary"
failed=0
note() { echo "$*" | tee -a "$summary"; }
fail() { note "FAIL: $*"; failed=1; }

want() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }
# SKIP_SANITIZER=1 and SKIP_BENCH=1 each drop their sections (together: the tests alone).
if [ -z "${ONLY:-}" ]; then
  ONLY=tests,sanitizer,loss,train
  [ "${SKIP_SANITIZER:-0}" = 1 ] && ONLY=${ONLY/,sanitizer/}
  [ "${SKIP_BENCH:-0}" = 1 ] && ONLY=${ONLY/,loss,train/}
fi
note "barlow GPU report  commit $(cat "$here/COMMIT" 2>/dev/null || echo unknown)  $(date -u +%Y-%m-%dT%H:%MZ)"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >"$report/nvidia-smi.txt" 2>&1; then
  note "no GPU: nvidia-smi is missing or found no device"
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/GPU: /' | tee -a "$summary"

# CUDA libraries: the system's, plus those inside a Python installation (nvidia/*/lib) when the
# system lacks the versions barlow loads (cuBLAS of CUDA 13, cuDNN 9): a CUDA 12 cuBLAS or a
# cuDNN 8 does not count.
libdirs=()
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13 ' || ! ldconfig -p 2>/dev/null | grep -q 'libcudnn\.so\.9 '; then
  for py in python3 python; do
    command -v "$py" >/dev/null 2>&1 || continue
    while IFS= read -r d; do libdirs+=("$d"); done < <("$py" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "*", "lib"))):
        print(d)
PY
)
    break
  done
fi
if [ ${#libdirs[@]} -gt 0 ]; then
  export LD_LIBRARY_PATH="$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  note "CUDA libraries from Python: ${libdirs[*]}"
fi
# NCCL ships as libnccl.so.2 (in the system or the nvidia-nccl wheel), the name barlow loads; the
# wheel's folder goes on the path when the system has none. Without NCCL the multi-GPU tests skip.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so\.2 '; then
  nccl=
  for d in "${libdirs[@]}"; do
    [ -z "$nccl" ] && [ -f "$d/libnccl.so.2" ] && nccl=$d/libnccl.so.2
  done
  if [ -z "$nccl" ]; then
    nccl=$(python3 -c 'import glob, nvidia, os; print(next(iter(sorted(glob.glob(os.path.join(nvidia.__path__[0], "nccl", "lib", "libnccl.so.2")))), ""))' 2>/dev/null || true)
  fi
  if [ -n "$nccl" ]; then
    export LD_LIBRARY_PATH="$(dirname "$nccl")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    note "NCCL: $nccl"
  else
    note "NCCL: not found; the multi-GPU tests will skip"
  fi
fi
"$bin/barlow" info | tee -a "$summary"

export BARLOW_REQUIRE_GPU=1
[ -f "$here/data/cifar10-jpg.tar.gz" ] && export BARLOW_CIFAR10_TGZ="$here/data/cifar10-jpg.tar.gz"
cd "$here"
if want tests; then
note ""
note "== tests"
for t in "$bin"/tests/*; do
  name=$(basename "$t")
  if "$t" --nocapture --test-threads=1 >"$report/test-$name.log" 2>&1; then
    note "PASS  $name  ($(grep -Eo '[0-9]+ passed' "$report/test-$name.log" | tail -1))"
  else
    fail "$name (see test-$name.log)"
    tail -n 30 "$report/test-$name.log"
  fi
done
grep -h '^CIFAR-10 GPU run' "$report"/test-*.log 2>/dev/null | tee -a "$summary"
# The Python extension: its CUDA entry point through the driver API (no PyTorch needed), then on
# PyTorch's CUDA tensors (python/tests/test_cuda.py, run as a script).
if PYTHONPATH="$here/python/barlow" python3 "$here/python/tests/native_cuda.py" \
    >"$report/test-python-native.log" 2>&1; then
  note "PASS  python extension, driver API  ($(tail -n 1 "$report/test-python-native.log"))"
else
  fail "python extension, driver API (see test-python-native.log)"
  tail -n 30 "$report/test-python-native.log"
fi
if python3 -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
  if PYTHONPATH="$here/python${PYTHONPATH:+:$PYTHONPATH}" BARLOW_REQUIRE_GPU=1 \
      python3 "$here/python/tests/test_cuda.py" >"$report/test-python-cuda.log" 2>&1; then
    note "PASS  python extension  ($(tail -n 1 "$report/test-python-cuda.log"))"
  else
    fail "python extension (see test-python-cuda.log)"
    tail -n 30 "$report/test-python-cuda.log"
  fi
else
  note "PyTorch with CUDA not importable: the Python extension's CUDA tests not run"
fi
fi

if want sanitizer; then
  note ""
  note "== compute-sanitizer"
  san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$san" ]; then
    note "compute-sanitizer not found: not run"
  else
    for tool in memcheck racecheck; do
      # The out-of-memory test asks for far more than the card has on purpose, and the CIFAR-10
      # run is too long under instrumentation; both are left out here.
      for t in gpu_loss gpu_train; do
        log=$report/sanitizer-$tool-$t.log
        # cuDNN's heuristics instead of timing every algorithm, which is slow when instrumented.
        if BARLOW_CUDNN_FIND=0 "$san" --tool "$tool" --error-exitcode 99 "$bin/tests/$t" --test-threads=1 \
            --skip gpu_errors_are_typed --skip short_run_trains >"$log" 2>&1; then
          note "PASS  $tool $t  ($(grep -Eo 'ERROR SUMMARY: [0-9]+ error' "$log" | tail -1))"
        else
          fail "compute-sanitizer $tool $t (see $(basename "$log"))"
          tail -n 30 "$log"
        fi
      done
    done
  fi
fi

if want loss; then
  note ""
  note "== loss benchmarks"
  with=()
  if python3 -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    python3 "$here/pytorch/loss.py" --device cuda --modes eager --out "$report/pytorch-eager.jsonl" \
      2>"$report/pytorch-eager.log" || fail "PyTorch eager benchmark (see pytorch-eager.log)"
    python3 "$here/pytorch/loss.py" --device cuda --modes compile \
      --n "${PT_COMPILE_N:-2048}" --d "${PT_COMPILE_D:-2048,8192,16384}" \
      --out "$report/pytorch-compile.jsonl" 2>"$report/pytorch-compile.log" \
      || fail "PyTorch compile benchmark (see pytorch-compile.log)"
    for f in "$report"/pytorch-*.jsonl; do [ -s "$f" ] && with+=(--with "$f"); done
  else
    note "PyTorch with CUDA not importable: comparison not run"
  fi
  # shellcheck disable=SC2086
  if "$bin/barlow" bench loss --device cuda --json "$report/barlow-loss.jsonl" "${with[@]}" \
      ${BENCH_ARGS:-} >"$report/bench-table.txt" 2>"$report/bench.log"; then
    cat "$report/bench-table.txt" | tee -a "$summary"
  else
    fail "barlow bench loss (see bench.log)"
    tail -n 20 "$report/bench.log"
  fi
  # Direct vs Gram paths where C grows large (up to D = 65536), beside the PyTorch loss, which
  # runs out of memory first.
  note ""
  note "== direct vs Gram path"
  gwith=()
  if python3 -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    python3 "$here/pytorch/loss.py" --device cuda --modes eager --math f32,bf16 \
      --n 256,2048 --d 8192,16384,32768,65536 --out "$report/pytorch-large.jsonl" \
      2>"$report/pytorch-large.log" || fail "PyTorch large-D benchmark (see pytorch-large.log)"
    [ -s "$report/pytorch-large.jsonl" ] && gwith+=(--with "$report/pytorch-large.jsonl")
  fi
  if "$bin/barlow" bench loss --device cuda --n 256,2048 --d 8192,16384,32768,65536 \
      --math f32,bf16 --path direct,gram --no-baselines --repeats 5 \
      --json "$report/barlow-gram.jsonl" "${gwith[@]}" >"$report/gram-table.txt" 2>"$report/gram.log"; then
    cat "$report/gram-table.txt" | tee -a "$summary"
  else
    fail "barlow bench loss --path direct,gram (see gram.log)"
    tail -n 20 "$report/gram.log"
  fi
  # The Python extension against the official loss code (eager and torch.compile), in one process.
  if python3 -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    note ""
    note "== Python extension vs the official loss (same process)"
    if PYTHONPATH="$here/python${PYTHONPATH:+:$PYTHONPATH}" python3 "$here/pytorch/extension.py" \
        --device cuda --n "${EXT_N:-2048}" --d "${EXT_D:-2048,8192}" \
        --out "$report/extension.jsonl" 2>"$report/extension.log"; then
      grep -A 100 '^ *N  *D  *math' "$report/extension.log" | tee -a "$summary"
    else
      fail "extension benchmark (see extension.log)"
      tail -n 20 "$report/extension.log"
    fi
  fi
  if [ "${RUN_CRITERION:-0}" = 1 ]; then
    "$bin/benches/loss" --bench >"$report/criterion.log" 2>&1 || fail "criterion benches"
  fi
fi

if want train; then
  note ""
  note "== training step: barlow vs PyTorch (same card)"
  twith=()
  if python3 -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    for preset in paper small; do
      python3 "$here/pytorch/train_bench.py" --device cuda --preset "$preset" --mode "${PT_TRAIN_MODE:-both}" \
        >"$report/pytorch-train-$preset.jsonl" 2>"$report/pytorch-train-$preset.log" \
        || fail "PyTorch train benchmark $preset (see pytorch-train-$preset.log)"
      [ -s "$report/pytorch-train-$preset.jsonl" ] && twith+=(--with "$report/pytorch-train-$preset.jsonl")
    done
  else
    note "PyTorch with CUDA not importable: comparison not run"
  fi
  # shellcheck disable=SC2086
  if "$bin/barlow" bench train --device cuda --json "$report/barlow-train.jsonl" "${twith[@]}" \
      ${TRAIN_BENCH_ARGS:-} >"$report/train-table.txt" 2>"$report/train-bench.log"; then
    cat "$report/train-table.txt" | tee -a "$summary"
  else
    fail "barlow bench train (see train-bench.log)"
    tail -n 20 "$report/train-bench.log"
  fi
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
  if [ "$ngpu" -ge 2 ]; then
    note ""
    note "== data-parallel scaling on $ngpu GPUs (images/s per GPU against one GPU)"
    if "$bin/barlow" bench train --device cuda --gpus "$ngpu" --profile-steps 0 \
        --json "$report/barlow-train-gpus.jsonl" >"$report/train-gpus-table.txt" \
        2>"$report/train-gpus-bench.log"; then
      tee -a "$summary" <"$report/train-gpus-table.txt"
    else
      fail "barlow bench train --gpus $ngpu (see train-gpus-bench.log)"
      tail -n 20 "$report/train-gpus-bench.log"
    fi
  else
    note "one GPU: data-parallel scaling not measured"
  fi
fi

note ""
if [ "$failed" = 0 ]; then note "ALL PASSED"; else note "SOME CHECKS FAILED"; fi
exit "$failed"
