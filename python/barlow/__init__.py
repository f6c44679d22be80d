"""The fused Barlow Twins loss as a PyTorch module.

    from barlow import BarlowTwinsLoss
    loss_fn = BarlowTwinsLoss()          # lambd=0.0051, eps=1e-5, as the paper
    loss = loss_fn(z1, z2)               # z1, z2: N×D projector outputs of the two views

Each column of z1 and z2 is standardized over the batch (biased variance, eps), C = Ẑ1ᵀẐ2 / N,
and the loss is Σᵢ(1 − Cᵢᵢ)² + λ·Σᵢ≠ⱼ Cᵢⱼ², computed with its gradient in one fused call.
"""

import torch

from . import _native

__all__ = ["BarlowTwinsLoss", "barlow_twins_loss"]


def _check(z1, z2):
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, not {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be N×D (2-D), not of shape {tuple(z.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 differ in shape: {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.dtype != z2.dtype:
        raise TypeError(f"z1 and z2 differ in dtype: {z1.dtype} and {z2.dtype}")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 are on different devices: {z1.device} and {z2.device}")


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1, z2, native, want_grad):
        n, d = z1.shape
        if z1.device.type != "cpu":
            raise NotImplementedError("CUDA tensors are not supported by this build yet")
        if z1.dtype == torch.float64:
            call, dtype = native.cpu_f64, torch.float64
        elif z1.dtype in (torch.float32, torch.bfloat16, torch.float16):
            call, dtype = native.cpu_f32, torch.float32
        else:
            raise TypeError(f"z1 and z2 must be float32, bfloat16, float16 or float64, not {z1.dtype}")
        a = z1.detach().to(dtype).contiguous()
        b = z2.detach().to(dtype).contiguous()
        if want_grad:
            da, db = torch.empty_like(a), torch.empty_like(b)
            total, on, off = call(a.data_ptr(), b.data_ptr(), n, d, da.data_ptr(), db.data_ptr())
            ctx.save_for_backward(da.to(z1.dtype), db.to(z2.dtype))
        else:
            total, on, off = call(a.data_ptr(), b.data_ptr(), n, d)
        out = torch.tensor([total, on, off], dtype=torch.float32 if dtype != torch.float64 else dtype)
        ctx.mark_non_differentiable(out[1:])
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, grad, _on, _off):
        da, db = ctx.saved_tensors
        return grad * da, grad * db, None, None


class BarlowTwinsLoss(torch.nn.Module):
    """The Barlow Twins loss of two views' projector outputs, fused.

    `math` ("f32", "tf32", "bf16") sets the GPU's precision for C; `path` ("auto", "direct",
    "gram") how C is formed on the GPU. The CPU computes in f32 (float64 inputs through the
    float64 reference).
    """

    def __init__(self, lambd=0.0051, eps=1e-5, math="f32", path="auto"):
        super().__init__()
        self.lambd, self.eps, self.math, self.path = lambd, eps, math, path
        self._native = _native.Loss(lambd, eps, math, path)
        self.last_terms = None

    def forward(self, z1, z2):
        _check(z1, z2)
        want = torch.is_grad_enabled() and (z1.requires_grad or z2.requires_grad)
        total, on, off = _Fused.apply(z1, z2, self._native, want)
        self.last_terms = (on, off)
        return total

    def terms(self, z1, z2):
        """(on-diagonal term, off-diagonal term × λ) as 0-d tensors, without gradients."""
        _check(z1, z2)
        with torch.no_grad():
            _, on, off = _Fused.apply(z1, z2, self._native, False)
        return on, off

    def extra_repr(self):
        return f"lambd={self.lambd}, eps={self.eps}, math={self.math!r}, path={self.path!r}"


def barlow_twins_loss(z1, z2, lambd=0.0051, eps=1e-5):
    """The loss as a function (builds its workspace each call; keep a module for training)."""
    return BarlowTwinsLoss(lambd, eps)(z1, z2)
