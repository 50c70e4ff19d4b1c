# Run with: python -m pytest -q tests/test_kernels.py
# The Triton kernels run on the CPU through TRITON_INTERPRET=1 (set in conftest.py before triton is
# imported); the interpreter is slow, so there the 151936 vocab is scaled down. The torch fallback is
# tested on the real vocab sizes. Truth is always a float64 log_softmax + gather, never our code.
import pytest
import torch

import kernels.logprobs as lp_mod
from kernels import logprobs_from_logits, token_logprobs, which_backend


def truth(hidden, weight, targets, grad):
    """float64 log_softmax + gather, its value and both gradients under the upstream grad."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    logp = torch.where(targets == -100, 0.0, logp)
    return (logp.detach(), *torch.autograd.grad(logp, (h, w), grad.double()))


def plain_torch(hidden, weight, targets, grad):
    """What a trainer writes, run in the input dtype: the bf16 baseline the kernels must match."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    logp = torch.where(targets == -100, 0.0, logp)
    return (logp.detach(), *torch.autograd.grad(logp, (h, w), grad.to(logp.dtype)))


def make(N, D, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.3).to(dtype)   # logits of a few units, like a real head
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100                                          # ignored positions, first row included
    targets[1] = V - 1                                           # the last column, in the ragged vocab tile
    grad = torch.randn(N, generator=g)
    return hidden, weight, targets, grad


def check(backend, N, D, V, dtype):
    hidden, weight, targets, grad = make(N, D, V, dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    logp = token_logprobs(hidden, weight, targets, backend=backend)
    dh, dw = torch.autograd.grad(logp, (hidden, weight), grad)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert (logp[targets == -100] == 0).all() and (dh[targets == -100] == 0).all()
    want = truth(hidden, weight, targets, grad)
    if dtype == torch.float32:
        for got, ref in zip((logp, dh, dw), want):
            torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
    else:
        no_worse_than_torch((logp, dh, dw), want, plain_torch(hidden, weight, targets, grad))


def no_worse_than_torch(got, want, base):
    # apple/ml-cross-entropy's criterion: no further from the float64 truth than plain torch in the
    # same dtype is, plus 1e-5. Error = L2 norm over the tensor (a max over single elements is decided
    # by which side one bf16 rounding falls, so it flips between two equally good methods).
    for name, x, ref, b in zip(("logp", "dH", "dW"), got, want, base):
        err, base_err = (x.double() - ref).norm(), (b.double() - ref).norm()
        assert err <= base_err + 1e-5, f"{name}: {err:.3g} vs plain torch {base_err:.3g}"


# Triton under the interpreter. Blocks are 64 tokens x 128 vocab x 64 hidden, so N=150 and D=80
# leave ragged token and hidden tiles and several vocab splits to merge; V is 1000 and 32000 and
# 151936 scaled down to 1/16, none a multiple of 128.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D,V", [(150, 80, 1000), (37, 48, 32000), (37, 48, 151936 // 16)])
def test_triton(N, D, V, dtype):
    check("triton", N, D, V, dtype)


# The torch fallback on the real vocab sizes, with chunks cut small so that N=37 spans three
# chunks, the last one ragged.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D,V", [(37, 48, 1000), (37, 32, 32000), (37, 16, 151936)])
def test_torch(N, D, V, dtype, monkeypatch):
    monkeypatch.setattr(lp_mod, "CHUNK_BYTES", 4 * V * 16)
    check("torch", N, D, V, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_ignored_and_frozen_head(backend):
    # every target ignored -> zeros and zero dH; a frozen head (LoRA) asks for dH only
    hidden, weight, targets, grad = make(70, 40, 300, torch.float32)
    hidden.requires_grad_()
    logp = token_logprobs(hidden, weight, torch.full_like(targets, -100), backend=backend)
    (dh,) = torch.autograd.grad(logp, hidden, grad)
    assert (logp == 0).all() and (dh == 0).all()
    logp = token_logprobs(hidden, weight, targets, backend=backend)
    (dh,) = torch.autograd.grad(logp, hidden, grad)
    want = truth(hidden, weight, targets, grad)
    torch.testing.assert_close(dh.double(), want[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_far_negative_logits(backend):
    # softmax is shift-invariant; a -300 shift on every logit must change nothing (no exp overflow,
    # no inf * 0 in the padded vocab columns of the last tile, no rounding of lse = m + log s, which
    # at |m| ~ 300 is 1.5e-5 per token). Inputs are multiples of 1/8, so every logit is exact in fp32
    # whatever the matmul's summation order (which differs between BLAS builds and CPUs): what is
    # measured is the log-sum-exp and softmax arithmetic, against plain torch's in fp32.
    hidden, weight, targets, grad = make(70, 40, 300, torch.float32)
    hidden, weight = (hidden * 8).round() / 8, (weight * 8).round() / 8
    hidden[:, -1], weight[:, -1] = 1.0, -300.0
    hidden.requires_grad_()
    weight.requires_grad_()
    logp = token_logprobs(hidden, weight, targets, backend=backend)
    got = (logp, *torch.autograd.grad(logp, (hidden, weight), grad))
    assert all(x.isfinite().all() for x in got)
    want, base = truth(hidden, weight, targets, grad), plain_torch(hidden, weight, targets, grad)
    # dH of the shift feature is -300 * sum_j dZ_ij = -300 * g_i * (1 - sum_j p_ij), ill-conditioned
    # in any fp32 code: its error is bounded by fp32's worst case for a V-term sum of terms <= 300|g_i|
    # (2 * V * 2^-24 * 300 |g_i|), not compared with torch's, whose summation order is a coin toss.
    bound = 2 * 300 * 2.0**-24 * 300 * grad.abs() + 1e-6
    assert ((got[1][:, -1].double() - want[1][:, -1]).abs() <= bound).all()
    cut = lambda t: (t[0], t[1][:, :-1], t[2])
    no_worse_than_torch(cut(got), cut(want), cut(base))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_logits(dtype, monkeypatch):
    monkeypatch.setattr(lp_mod, "CHUNK_BYTES", 4 * 32000 * 8)        # 8-row chunks over 3 x 12 rows
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 13, 32000, generator=g) * 3).to(dtype)[:, :-1]   # a shifted, strided view
    targets = torch.randint(0, 32000, (3, 12), generator=g)
    targets[:, :2] = -100
    grad = torch.randn(3, 12, generator=g)
    x = logits.detach().requires_grad_()
    logp = logprobs_from_logits(x, targets)
    (dx,) = torch.autograd.grad(logp, x, grad)
    x64 = logits.detach().double().requires_grad_()
    ref = torch.where(targets == -100, 0.0, torch.log_softmax(x64, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1))
    (dref,) = torch.autograd.grad(ref, x64, grad.double())
    assert logp.dtype == torch.float32 and logp.shape == targets.shape and dx.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2                 # logits given exactly; dx rounded to dtype
    torch.testing.assert_close(logp.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx.double(), dref, atol=tol, rtol=tol)


def test_backend_choice_is_explicit(monkeypatch):
    h, w, t, _ = make(5, 16, 50, torch.float32)
    assert which_backend(h) == "torch"                             # CPU tensors, backend=None
    assert which_backend(h, "triton") == "triton"                  # allowed: TRITON_INTERPRET=1 here
    with pytest.raises(ValueError):
        which_backend(h, "cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError):                              # no silent fallback to torch
        token_logprobs(h, w, t, backend="triton")
    with pytest.raises(ValueError):
        token_logprobs(h, w, torch.full_like(t, 50))               # target id == V
