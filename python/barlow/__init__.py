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


# The float types the f32 CPU path and the CUDA kernels take, by the names the extension uses.
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _on_cpu(native, z1, z2, want_grad):
    """(out, dz1, dz2) through the CPU path, out = [total, on, off, 0]; raises on non-finite
    inputs."""
    n, d = z1.shape
    if z1.dtype == torch.float64:
        call, dtype = native.cpu_f64, torch.float64
    elif z1.dtype in _DTYPES:
        call, dtype = native.cpu_f32, torch.float32
    else:
        raise TypeError(f"z1 and z2 must be float32, bfloat16, float16 or float64, not {z1.dtype}")
    a = z1.detach().to(dtype).contiguous()
    b = z2.detach().to(dtype).contiguous()
    if want_grad:
        da, db = torch.empty_like(a), torch.empty_like(b)
        total, on, off = call(a.data_ptr(), b.data_ptr(), n, d, da.data_ptr(), db.data_ptr())
        da, db = da.to(z1.dtype), db.to(z2.dtype)
    else:
        total, on, off = call(a.data_ptr(), b.data_ptr(), n, d)
        da = db = None
    out = torch.tensor([total, on, off, 0.0], dtype=torch.float32 if dtype != torch.float64 else dtype)
    return out, da, db


def _on_cuda(native, z1, z2, want_grad):
    """(out, dz1, dz2) with out = [total, on, off, non-finite flag] on the tensors' device, queued
    on PyTorch's current stream there; nothing waits for the device."""
    name = _DTYPES.get(z1.dtype)
    if name is None:
        raise TypeError(f"CUDA tensors must be float32, bfloat16 or float16, not {z1.dtype}")
    n, d = z1.shape
    device = z1.device
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        a = z1.detach().contiguous()
        b = z2.detach().contiguous()
        out = torch.empty(4, dtype=torch.float32, device=device)
        da = db = None
        grads = ()
        if want_grad:
            da = torch.empty((n, d), dtype=a.dtype, device=device)
            db = torch.empty((n, d), dtype=b.dtype, device=device)
            grads = (da.data_ptr(), db.data_ptr())
        native.cuda(name, device.index, stream.cuda_stream, a.data_ptr(), b.data_ptr(), n, d,
                    out.data_ptr(), out.numel(), *grads)
    return out, da, db


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1, z2, native, want_grad):
        if z1.device.type not in ("cpu", "cuda"):
            raise ValueError(f"z1 and z2 must be CPU or CUDA tensors, not {z1.device.type}")
        run = _on_cuda if z1.device.type == "cuda" else _on_cpu
        out, da, db = run(native, z1, z2, want_grad)
        if want_grad:
            ctx.save_for_backward(da, db)
        ctx.mark_non_differentiable(out[1:])
        return out[0], out[1], out[2], out[3]

    @staticmethod
    def backward(ctx, grad, _on, _off, _flag):
        da, db = ctx.saved_tensors
        return grad * da, grad * db, None, None


class BarlowTwinsLoss(torch.nn.Module):
    """The Barlow Twins loss of two views' projector outputs, fused.

    `math` ("f32", "tf32", "bf16") sets the GPU's precision for C; `path` ("auto", "direct",
    "gram") how C is formed on the GPU. The CPU computes in f32 (float64 inputs through the
    float64 reference).

    CUDA tensors (float32, bfloat16, float16) are read and written in place, on PyTorch's current
    stream of their device and without waiting for it, so the call can sit inside a CUDA graph
    (after one call outside it, which allocates the device's workspace). Non-finite inputs raise
    FloatingPointError on the CPU; on a GPU that check would have to wait for the device, so the
    loss and gradients come out NaN instead and `last_non_finite` (a device tensor) is 1.
    """

    def __init__(self, lambd=0.0051, eps=1e-5, math="f32", path="auto"):
        super().__init__()
        self.lambd, self.eps, self.math, self.path = lambd, eps, math, path
        self._native = _native.Loss(lambd, eps, math, path)
        self.last_terms = None
        self.last_non_finite = None

    def forward(self, z1, z2):
        _check(z1, z2)
        want = torch.is_grad_enabled() and (z1.requires_grad or z2.requires_grad)
        total, on, off, flag = _Fused.apply(z1, z2, self._native, want)
        self.last_terms = (on, off)
        self.last_non_finite = flag
        return total

    def terms(self, z1, z2):
        """(on-diagonal term, off-diagonal term × λ) as 0-d tensors, without gradients."""
        _check(z1, z2)
        with torch.no_grad():
            _, on, off, _ = _Fused.apply(z1, z2, self._native, False)
        return on, off

    def extra_repr(self):
        return f"lambd={self.lambd}, eps={self.eps}, math={self.math!r}, path={self.path!r}"


def barlow_twins_loss(z1, z2, lambd=0.0051, eps=1e-5):
    """The loss as a function (builds its workspace each call; keep a module for training)."""
    return BarlowTwinsLoss(lambd, eps)(z1, z2)
