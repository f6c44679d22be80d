"""The extension on CUDA tensors: parity with the official loss code and a float64 reference, and
no host synchronization inside the call. Runs wherever PyTorch sees a GPU and skips otherwise
(BARLOW_REQUIRE_GPU=1 makes that a failure). Runs under pytest, or as a script where pytest is
not installed: `python test_cuda.py`.
"""

import os
import sys

import torch

import barlow
from reference import official, reference, rel, views

try:
    import pytest
except ImportError:  # the script runner below stands in
    pytest = None

if not torch.cuda.is_available():
    reason = "PyTorch sees no CUDA device"
    if os.environ.get("BARLOW_REQUIRE_GPU") == "1":
        raise RuntimeError(f"BARLOW_REQUIRE_GPU=1 but {reason}")
    print(f"SKIP: {reason}")
    if pytest is not None and __name__ != "__main__":
        pytest.skip(reason, allow_module_level=True)
    elif __name__ == "__main__":
        sys.exit(0)

DEV = torch.device("cuda", 0)


class Skipped(Exception):
    """A test that cannot run here (the script runner counts it apart from the passes)."""


def skip(reason):
    print(f"SKIP: {reason}")
    if pytest is not None:
        pytest.skip(reason)
    raise Skipped(reason)

# (n, d, views' options): odd shapes, |mean| ≫ std, near convergence, and one beyond the direct
# path's auto choice (N < D/2 picks the Gram path).
CASES = [
    (37, 19, dict()),
    (64, 128, dict(scale=3.0)),
    (33, 65, dict(near=True)),
    (48, 31, dict(shift=50.0)),
    (40, 300, dict()),
]


def on_device(z, dtype):
    return z.detach().to(DEV, dtype).requires_grad_()


def truth(z1, z2):
    """The official loss and its gradients, run in float64 on the device."""
    a, b = z1.detach().to(DEV).requires_grad_(), z2.detach().to(DEV).requires_grad_()
    want, on, off = official(a, b)
    ga, gb = torch.autograd.grad(want, [a, b])
    r, _, _ = reference(a.detach(), b.detach())
    assert abs(r.item() - want.item()) <= 1e-10 * want.item()
    return want, on, off, ga, gb


def check(n, d, kw, dtype, tol, **config):
    z1, z2 = views(n, d, seed=n * d, **kw)
    # The truth of the inputs as the extension sees them (rounded to the dtype).
    z1, z2 = z1.to(dtype).double(), z2.to(dtype).double()
    want, want_on, want_off, g1, g2 = truth(z1, z2)
    a, b = on_device(z1, dtype), on_device(z2, dtype)
    loss_fn = barlow.BarlowTwinsLoss(**config)
    got = loss_fn(a, b)
    assert got.device == DEV and got.dim() == 0 and got.dtype == torch.float32
    got.backward()
    on, off = loss_fn.last_terms
    assert abs(got.item() - want.item()) <= tol * abs(want.item()), (got.item(), want.item())
    assert abs(on.item() - want_on.item()) <= tol * abs(want.item())
    assert abs(off.item() - want_off.item()) <= tol * abs(want.item())
    assert loss_fn.last_non_finite.item() == 0.0
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert rel(a.grad, g1) <= tol, rel(a.grad, g1)
    assert rel(b.grad, g2) <= tol, rel(b.grad, g2)


def test_float32_matches_the_official_loss_in_float64():
    for n, d, kw in CASES:
        for path in ("direct", "gram", "auto"):
            check(n, d, kw, torch.float32, 1e-5, path=path)


def test_tf32_and_half_inputs_within_their_precision():
    for n, d, kw in CASES:
        check(n, d, kw, torch.float32, 1e-3, math="tf32")
        check(n, d, kw, torch.bfloat16, 1e-2)
        check(n, d, kw, torch.float16, 1e-2)
        check(n, d, kw, torch.bfloat16, 1e-2, math="bf16")


def test_cuda_agrees_with_the_cpu_path():
    z1, z2 = views(96, 160, seed=5)
    loss_fn = barlow.BarlowTwinsLoss()
    cpu = [z.float().requires_grad_() for z in (z1, z2)]
    gpu = [on_device(z, torch.float32) for z in (z1, z2)]
    lc, lg = loss_fn(*cpu), loss_fn(*gpu)
    lc.backward()
    lg.backward()
    assert abs(lc.item() - lg.item()) <= 1e-5 * lc.item()
    for c, g in zip(cpu, gpu):
        assert rel(g.grad.cpu(), c.grad) <= 1e-5


def test_forward_queues_without_waiting_for_the_device():
    # PyTorch's own checker fails on any synchronizing PyTorch call in the forward...
    z1, z2 = views(128, 256, seed=7)
    a, b = on_device(z1, torch.float32), on_device(z2, torch.float32)
    loss_fn = barlow.BarlowTwinsLoss()
    loss_fn(a, b).backward()  # the first call allocates the device's workspace
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loss_fn(a, b)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # ...and a CUDA graph capture fails on any wait for the device at all, the extension's
    # included. The captured forward and backward, replayed on new inputs, match eager calls.
    x1 = torch.empty_like(a.detach()).requires_grad_()
    x2 = torch.empty_like(b.detach()).requires_grad_()
    x1.data.copy_(a.detach())
    x2.data.copy_(b.detach())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss_fn(x1, x2).backward()  # warm-up on the capture's stream
    torch.cuda.current_stream().wait_stream(side)
    x1.grad, x2.grad = None, None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = loss_fn(x1, x2)
        loss.backward()
    for seed in (11, 12):
        y1, y2 = views(128, 256, seed=seed)
        with torch.no_grad():
            x1.copy_(y1.to(DEV, torch.float32))
            x2.copy_(y2.to(DEV, torch.float32))
        graph.replay()
        e1, e2 = on_device(y1, torch.float32), on_device(y2, torch.float32)
        eager = barlow.BarlowTwinsLoss()(e1, e2)
        eager.backward()
        assert abs(loss.item() - eager.item()) <= 1e-6 * eager.item()
        assert rel(x1.grad, e1.grad) <= 1e-6 and rel(x2.grad, e2.grad) <= 1e-6


def test_runs_on_the_current_stream_in_order():
    # Inputs written on a side stream, the loss queued there, its value read on that stream: a
    # missing fork would read unwritten inputs, a missing join a loss not yet written.
    z1, z2 = views(200, 96, seed=9)
    want = official(z1, z2)[0].item()
    s = torch.cuda.Stream()
    loss_fn = barlow.BarlowTwinsLoss()
    with torch.cuda.stream(s):
        for _ in range(3):
            a = torch.empty(200, 96, device=DEV)
            b = torch.empty(200, 96, device=DEV)
            torch.cuda._sleep(1_000_000)  # the writes land long after the call is queued
            a.copy_(z1.float(), non_blocking=True)
            b.copy_(z2.float(), non_blocking=True)
            loss = loss_fn(a, b)
            got = loss.clone()
    s.synchronize()
    assert abs(got.item() - want) <= 1e-5 * want


def test_non_finite_inputs_give_nan_and_the_flag():
    z1, z2 = views(16, 8, seed=3)
    z1[3, 2] = float("nan")
    loss_fn = barlow.BarlowTwinsLoss()
    a, b = on_device(z1, torch.float32), on_device(z2, torch.float32)
    loss = loss_fn(a, b)
    loss.backward()
    assert torch.isnan(loss).item()
    assert loss_fn.last_non_finite.item() == 1.0


def test_non_contiguous_inputs_are_copied():
    z1, z2 = views(64, 40, seed=4)
    want = official(z1, z2)[0].item()
    a = z1.T.contiguous().to(DEV, torch.float32).T  # a transposed view
    b = z2.to(DEV, torch.float32)[:, :]
    assert not a.is_contiguous()
    got = barlow.BarlowTwinsLoss()(a, b).item()
    assert abs(got - want) <= 1e-5 * want


def test_bad_inputs_are_python_errors():
    loss_fn = barlow.BarlowTwinsLoss()
    one = torch.randn(1, 8, device=DEV)
    raises(ValueError, "batch", loss_fn, one, one)
    a64 = torch.randn(8, 4, device=DEV, dtype=torch.float64)
    raises(TypeError, "float32", loss_fn, a64, a64)
    raises(ValueError, "devices", loss_fn, torch.randn(8, 4, device=DEV), torch.randn(8, 4))
    empty = torch.randn(8, 0, device=DEV)
    raises(ValueError, "at least one column", loss_fn, empty, empty)


def test_each_device_gets_its_own_workspace():
    if torch.cuda.device_count() < 2:
        skip("one CUDA device; the second-device check needs two")
    loss_fn = barlow.BarlowTwinsLoss()
    z1, z2 = views(50, 30, seed=8)
    want = official(z1, z2)[0].item()
    for dev in (0, 1, 0):
        d = torch.device("cuda", dev)
        got = loss_fn(z1.to(d, torch.float32), z2.to(d, torch.float32))
        assert got.device == d
        assert abs(got.item() - want) <= 1e-5 * want


def raises(kind, text, fn, *args):
    try:
        fn(*args)
    except kind as e:
        assert text.lower() in str(e).lower(), str(e)
        return
    raise AssertionError(f"expected {kind.__name__}")


if __name__ == "__main__":
    failed = skipped = 0
    tests = [(k, v) for k, v in sorted(globals().items()) if k.startswith("test_")]
    for name, fn in tests:
        try:
            fn()
            print(f"ok    {name}")
        except Skipped:
            skipped += 1
        except Exception as e:  # report every test, then fail at the end
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}")
    passed = len(tests) - failed - skipped
    print(f"python cuda: {passed} passed, {failed} failed, {skipped} skipped")
    sys.exit(1 if failed else 0)
