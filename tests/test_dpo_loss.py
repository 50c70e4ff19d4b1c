# python -m pytest -q tests/test_dpo_loss.py
# dpo_loss and nll_loss against the closed form, written out independently with `math` in float64.
import math

import pytest
import torch

from scdpo import dpo_loss, nll_loss


def _inputs():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-40 * torch.rand(7, generator=g, dtype=torch.float64) for _ in range(4))
    return [t.requires_grad_() for t in (pc, pr, rc, rr)]


def _sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_sigmoid_closed_form(beta, eps):
    pc, pr, rc, rr = _inputs()
    loss, r_w, r_l = dpo_loss(pc, pr, rc, rr, beta, "sigmoid", label_smoothing=eps)
    assert loss.shape == (7,) and loss.dtype == torch.float64
    loss.sum().backward()
    for i in range(7):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        want = -(1 - eps) * math.log(_sig(beta * h)) - eps * math.log(_sig(-beta * h))
        dh = -beta * ((1 - eps) * _sig(-beta * h) - eps * _sig(beta * h))
        assert loss[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert pc.grad[i].item() == pytest.approx(dh, rel=1e-10, abs=1e-14)
        assert pr.grad[i].item() == pytest.approx(-dh, rel=1e-10, abs=1e-14)
        assert rc.grad[i].item() == pytest.approx(-dh, rel=1e-10, abs=1e-14)
        assert rr.grad[i].item() == pytest.approx(dh, rel=1e-10, abs=1e-14)
        assert r_w[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-12)
        assert r_l[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), rel=1e-12)
    assert not r_w.requires_grad and not r_l.requires_grad


def test_sigmoid_known_values():
    z = torch.zeros(1, dtype=torch.float64)
    # policy == reference: h = 0, loss = log 2 for every beta, rewards 0
    loss, r_w, r_l = dpo_loss(z, z, z, z, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-15) and r_w.item() == 0 and r_l.item() == 0
    # h = 10, beta = 0.1: loss = log(1 + e^-1)
    loss, _, _ = dpo_loss(z + 10, z, z, z, beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-14)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_closed_form(beta):
    pc, pr, rc, rr = _inputs()
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo")
    loss.sum().backward()
    for i in range(7):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert loss[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
        assert pc.grad[i].item() == pytest.approx(2 * (h - 1 / (2 * beta)), rel=1e-10)
        assert pr.grad[i].item() == pytest.approx(-2 * (h - 1 / (2 * beta)), rel=1e-10)
    # at the target margin h = 1/(2 beta) the loss and its gradient vanish
    z = torch.zeros(1, dtype=torch.float64)
    loss, _, _ = dpo_loss(z + 1 / (2 * beta), z, z, z, beta, "ipo")
    assert loss.item() == pytest.approx(0.0, abs=1e-20)


def test_nll_and_bad_loss_type():
    lp = torch.tensor([-6.0, -3.0], dtype=torch.float64, requires_grad=True)
    n = torch.tensor([3, 1])
    out = nll_loss(lp, n)
    out.sum().backward()
    assert out.tolist() == [2.0, 3.0] and lp.grad.tolist() == [-1 / 3, -1.0]
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(z, z, z, z, 0.1, "hinge")
