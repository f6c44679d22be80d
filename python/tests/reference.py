"""The official loss code and a float64 reference, for the tests and the benchmark."""

import torch


def off_diagonal(x):
    # The official implementation's off_diagonal.
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def official(z1, z2, lambd=0.0051):
    """The official loss: BatchNorm1d(affine=False), C / N, on + λ·off (its per-GPU form)."""
    n, d = z1.shape
    bn = torch.nn.BatchNorm1d(d, affine=False).to(device=z1.device, dtype=z1.dtype)
    c = bn(z1).T @ bn(z2)
    c = c / n
    on = torch.diagonal(c).add(-1).pow(2).sum()
    off = off_diagonal(c).pow(2).sum()
    return on + lambd * off, on, off * lambd


def reference(z1, z2, lambd=0.0051, eps=1e-5):
    """Float64 loss from its definition (biased variance), for values and autograd gradients."""
    z1, z2 = z1.double(), z2.double()
    n = z1.shape[0]
    h1 = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)
    h2 = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)
    c = h1.T @ h2 / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = off_diagonal(c).pow(2).sum() * lambd
    return on + off, on, off


def views(n, d, seed, shift=0.0, scale=1.0, near=False):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift
    if near:
        # Near convergence: the second view almost equals the first, so C ≈ I.
        z2 = z1 + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    else:
        z2 = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift
    return z1, z2


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
