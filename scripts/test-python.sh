#!/usr/bin/env bash
# Builds the Python package (python/: maturin + PyO3 over the loss alone) into a wheel, installs it
# beside PyTorch in a fresh virtual environment and runs its pytest suite and the README's example.
# PyTorch from PyPI is several GB (its CUDA libraries come with it): after the first run it comes
# from pip's cache.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
torch_pin=${BARLOW_TORCH:-torch==2.15.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
py=$work/venv/bin/python
"$py" -m pip install -q "$torch_pin" numpy maturin==1.16.0 pytest
export PYO3_PYTHON=$py CARGO_TARGET_DIR=$root/target/python
(
  cd python
  cargo fmt --check
  cargo clippy --release --all-targets -- -D warnings
  "$work/venv/bin/maturin" build --release --locked -o "$work/dist"
)
"$py" -m pip install -q --no-deps "$work"/dist/*.whl
# From outside the source tree, so that the installed package is the one imported.
cd "$work"
"$py" -m pytest -q "$root/python/tests"
# The README's example.
"$py" - <<'PY'
import torch
from barlow import BarlowTwinsLoss

loss_fn = BarlowTwinsLoss()
z1 = torch.randn(256, 128, requires_grad=True)
z2 = torch.randn(256, 128, requires_grad=True)
loss = loss_fn(z1, z2)
loss.backward()
assert loss.dim() == 0 and z1.grad.shape == z1.shape
print(f"python: the README example ran (loss {loss.item():.2f})")
PY
