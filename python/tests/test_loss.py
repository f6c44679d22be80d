"""The extension against the official loss code and a float64 reference, on the CPU."""

import pytest
import torch

import barlow
from reference import official, reference, rel, views


CASES = [
    (37, 19, dict()),  # odd shape
    (64, 128, dict(scale=3.0)),
    (33, 65, dict(near=True)),  # near-converged
    (48, 31, dict(shift=50.0)),  # |mean| ≫ std
]


@pytest.mark.parametrize("n,d,kw", CASES)
def test_value_and_gradients_match_the_official_loss_and_float64(n, d, kw):
    z1, z2 = views(n, d, seed=n * d, **kw)
    z1.requires_grad_()
    z2.requires_grad_()
    # The truth: the official loss code itself, run in float64.
    want, want_on, want_off = official(z1, z2)
    g1, g2 = torch.autograd.grad(want, [z1, z2])
    r, _, _ = reference(z1, z2)
    assert abs(r.item() - want.item()) <= 1e-12 * want.item()
    z1, z2 = z1.detach(), z2.detach()

    a = z1.float().requires_grad_()
    b = z2.float().requires_grad_()
    loss_fn = barlow.BarlowTwinsLoss()
    got = loss_fn(a, b)
    got.backward()
    assert got.dim() == 0 and got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    on, off = loss_fn.last_terms
    assert abs(on.item() - want_on.item()) <= 1e-5 * abs(want.item())
    assert abs(off.item() - want_off.item()) <= 1e-5 * abs(want.item())
    assert loss_fn.last_non_finite.item() == 0.0
    assert rel(a.grad, g1) <= 1e-5 and rel(b.grad, g2) <= 1e-5
    # The terms alone, without gradients, are the same.
    t_on, t_off = loss_fn.terms(a, b)
    assert abs(t_on.item() - on.item()) <= 1e-6 * abs(want.item())
    assert abs(t_off.item() - off.item()) <= 1e-6 * abs(want.item())

    # The official f32 code, on the same inputs, lands as close to the float64 truth.
    oa = z1.float().requires_grad_()
    ob = z2.float().requires_grad_()
    ref, _, _ = official(oa, ob)
    ref.backward()
    assert abs(got.item() - ref.item()) <= 1e-4 * abs(ref.item())
    if not kw.get("shift"):
        assert rel(a.grad, oa.grad) <= 1e-4


def test_gradcheck_in_float64():
    z1, z2 = views(9, 5, seed=3)
    loss_fn = barlow.BarlowTwinsLoss()
    z1.requires_grad_()
    z2.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b), (z1, z2))


def test_the_incoming_gradient_scales_the_result():
    z1, z2 = views(20, 7, seed=4)
    a, b = z1.float().requires_grad_(), z2.float().requires_grad_()
    loss_fn = barlow.BarlowTwinsLoss()
    (3.5 * loss_fn(a, b)).backward()
    a1 = a.grad.clone()
    a.grad = None
    loss_fn(a, b).backward()
    assert torch.allclose(a1, 3.5 * a.grad, rtol=1e-6, atol=0)


def test_half_precision_inputs_give_gradients_of_their_dtype():
    z1, z2 = views(40, 24, seed=5)
    for dtype in (torch.bfloat16, torch.float16):
        a, b = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
        loss = barlow.BarlowTwinsLoss()(a, b)
        loss.backward()
        assert a.grad.dtype == dtype
        want, _, _ = reference(a.detach(), b.detach())
        assert abs(loss.item() - want.item()) <= 1e-2 * want.item()


def test_two_training_steps_match_the_official_loss():
    torch.manual_seed(0)

    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)
        )

    x1, x2 = torch.randn(24, 12), torch.randn(24, 12)
    params = []
    for loss_fn in (barlow.BarlowTwinsLoss(), lambda a, b: official(a, b)[0]):
        m = model()
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            loss_fn(m(x1), m(x2)).backward()
            opt.step()
        params.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert rel(params[0], params[1]) <= 1e-5


@pytest.mark.parametrize(
    "z1,z2,err,text",
    [
        (torch.randn(8, 4), torch.randn(8, 5), ValueError, "differ in shape"),
        (torch.randn(1, 4), torch.randn(1, 4), ValueError, "batch"),
        (torch.randn(8), torch.randn(8), ValueError, "2-D"),
        (torch.randn(8, 4), torch.randn(8, 4).double(), TypeError, "dtype"),
        (torch.randint(0, 3, (8, 4)), torch.randint(0, 3, (8, 4)), TypeError, "float"),
    ],
)
def test_bad_inputs_raise_with_barlows_message(z1, z2, err, text):
    with pytest.raises(err, match=text):
        barlow.BarlowTwinsLoss()(z1, z2)


def test_non_finite_inputs_raise():
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    z1[3, 2] = float("nan")
    with pytest.raises(FloatingPointError):
        barlow.BarlowTwinsLoss()(z1, z2)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="math"):
        barlow.BarlowTwinsLoss(math="f64")
    with pytest.raises(ValueError):
        barlow.BarlowTwinsLoss(eps=-1.0)


def test_non_contiguous_inputs_are_made_contiguous():
    z1, z2 = views(16, 10, seed=6)
    a = z1.float().T.contiguous().T  # a strided view
    assert not a.is_contiguous()
    got = barlow.BarlowTwinsLoss()(a, z2.float())
    want, _, _ = reference(z1, z2)
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()
