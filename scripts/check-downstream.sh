#!/usr/bin/env bash
# Builds a throw-away crate that depends on the loss alone (`default-features = false,
# features = ["cuda"]`) beside candle-core 0.11 and cudarc with candle's CUDA feature set
# (`dynamic-linking`, `cuda-version-from-build-system`), then checks that the loss pulls in only its
# few dependencies. Fails if barlow forces a linking mode or CUDA version that clashes.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${DOWNSTREAM_DIR:-$root/target/downstream}
rm -rf "$dir/src"
mkdir -p "$dir/src"
cat >"$dir/Cargo.toml" <<TOML
[package]
name = "barlow-downstream-check"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
barlow = { path = "$root", default-features = false, features = ["cuda"] }
candle-core = { version = "0.11", default-features = false }
cudarc = { version = "0.19", default-features = false, features = ["std", "cublas", "cublaslt", "curand", "driver", "nvrtc", "f16", "cuda-version-from-build-system", "dynamic-linking"] }

[workspace]
TOML
cat >"$dir/src/lib.rs" <<'RS'
//! Calls the loss with candle's cudarc types, so the two must agree.
pub fn loss_on(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    za: &cudarc::driver::CudaSlice<f32>,
    zb: &cudarc::driver::CudaSlice<f32>,
    n: usize,
    d: usize,
) -> barlow::Result<f64> {
    let loss = barlow::BarlowTwinsLoss::new(barlow::LossConfig::default())?;
    Ok(loss.forward(stream, za, zb, barlow::Dims::new(n, d))?.total)
}
RS
cp "$root/Cargo.lock" "$dir/Cargo.lock" 2>/dev/null || true
# nvcc on PATH: cudarc reads the CUDA version from it, as candle's build does.
nvcc_dir=$(dirname "${NVCC:-$root/.cuda/nvidia/cu13/bin/nvcc}")
export PATH="$nvcc_dir:$PATH"
(cd "$dir" && CARGO_TARGET_DIR="$dir/target" cargo build --quiet)
# What the loss itself depends on: its direct dependencies (what they pull in beyond that is
# shaped by the application's feature choices, e.g. candle turns on half's `rand_distr`).
deps=$(cd "$dir" && cargo tree --quiet -e normal -p barlow --depth 1 --prefix none | tail -n +2 \
       | sed 's/ v[0-9].*//' | sort -u)
echo "barlow (features = [\"cuda\"]) depends directly on:" $deps
want="cudarc gemm half libloading rayon thiserror"
if [ "$(echo $deps)" != "$want" ]; then
  echo "check-downstream: expected exactly: $want" >&2
  exit 1
fi
all=$(cd "$root" && CUDARC_CUDA_VERSION=13000 cargo tree --quiet -e normal --no-default-features \
      --features cuda --prefix none | sed 's/ v[0-9].*//; s/ (\*)//' | sort -u | wc -l)
echo "check-downstream: ok (barlow alone with the loss's features: $all crates, itself included)"
