#!/usr/bin/env bash
# Builds everything the GPU checks need into one folder that runs on a GPU host with no Rust
# toolchain and no network: the test binaries, the criterion bench binary, the `barlow` CLI, the
# PyTorch reference scripts, the Python extension with its CUDA tests, CIFAR-10 when available,
# and run.sh (see scripts/gpu-run.sh).
#
#   scripts/gpu-bundle.sh [OUT_DIR]      default: target/gpu-bundle
#   then, on the GPU host:  bash OUT_DIR/run.sh [REPORT_DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-target/gpu-bundle}

if [ -z "${NVCC:-}" ]; then
  eval "$(bash scripts/install-nvcc.sh)"
fi
export NVCC BARLOW_REQUIRE_KERNELS=1

json=$(mktemp)
trap 'rm -f "$json"' EXIT
echo "gpu-bundle: building release test and bench binaries" >&2
cargo build --release --bin barlow
cargo test --release --no-run --message-format=json >"$json"
cargo bench --no-run --message-format=json >>"$json"

rm -rf "$out"
mkdir -p "$out/tests" "$out/benches" "$out/pytorch"
# Only the test binaries with GPU tests travel; the CPU suites run everywhere else.
python3 - "$json" "$out" <<'PY'
import json, shutil, sys, os
src, out = sys.argv[1], sys.argv[2]
gpu_tests = {"gpu_loss", "gpu_train", "gpu_nccl", "fatbin", "errors"}
seen = set()
for line in open(src):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind = m["target"]["kind"]
    name = m["target"]["name"]
    if "bench" in kind:
        dest = os.path.join(out, "benches", name)
    elif "test" in kind and name in gpu_tests:
        dest = os.path.join(out, "tests", name)
    else:
        continue
    if dest in seen:
        continue
    seen.add(dest)
    shutil.copy2(m["executable"], dest)
PY
# The Python extension (python/), built as a plain extension module (no maturin needed), beside
# its package source, its CUDA tests and their reference code.
echo "gpu-bundle: building the Python extension" >&2
(cd python && PYO3_BUILD_EXTENSION_MODULE=1 PYO3_PYTHON=${PYO3_PYTHON:-python3} \
  CARGO_TARGET_DIR=../target/python cargo build --release --locked)
cp target/release/barlow "$out/barlow"
cp benches/pytorch/*.py "$out/pytorch/"
mkdir -p "$out/python/barlow" "$out/python/tests"
cp python/barlow/__init__.py "$out/python/barlow/"
cp target/python/release/lib_native.so "$out/python/barlow/_native.abi3.so"
cp python/tests/test_cuda.py python/tests/reference.py python/tests/native_cuda.py "$out/python/tests/"
cp scripts/gpu-run.sh "$out/run.sh"
# CIFAR-10 for the short GPU training run, when a copy is at hand (BARLOW_CIFAR10_TGZ, or the
# data folder beside the checkout).
cifar=${BARLOW_CIFAR10_TGZ:-../shared/data/cifar10-jpg.tar.gz}
if [ -f "$cifar" ]; then
  mkdir -p "$out/data"
  cp "$cifar" "$out/data/cifar10-jpg.tar.gz"
else
  echo "gpu-bundle: no CIFAR-10 tarball at $cifar; the short GPU training run will skip" >&2
fi
chmod +x "$out/run.sh"
git rev-parse --short HEAD >"$out/COMMIT" 2>/dev/null || echo unknown >"$out/COMMIT"

if command -v strip >/dev/null 2>&1; then
  find "$out" -type f -perm -u+x ! -name '*.sh' ! -name '*.py' -exec strip --strip-all {} +
fi
# The binaries travel xz-compressed (about half the size); run.sh unpacks them.
tar -C "$out" -cf - barlow tests benches | xz -6 -T0 >"$out/binaries.tar.xz"
rm -rf "$out/barlow" "$out/tests" "$out/benches"
du -sh "$out" >&2
ls -la "$out" >&2
xz -dc "$out/binaries.tar.xz" | tar -tvf - >&2
echo "gpu-bundle: ready; on a GPU host run: bash $out/run.sh [REPORT_DIR]" >&2
