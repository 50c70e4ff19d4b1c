# Run with: python -m pytest -q tests/test_kernels.py        (-s prints registers / shared memory per kernel)
# The Triton row kernels run on the CPU through TRITON_INTERPRET=1 (set in conftest.py before triton is
# imported); the interpreter is slow, so there the 151936 vocab is scaled down. The torch row step is
# tested on the real vocab sizes. Truth is always a float64 log_softmax + gather, never our code; the
# kernels are also compiled ahead of time for real GPUs (sm_90a, sm_80) with Triton's own ptxas.
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

import kernels.logprobs as lp_mod
from kernels import token_logprobs, which_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    targets[1] = V - 1                                           # the last column, in the ragged last slice
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


def slice_cols(monkeypatch, N, cols):
    # CHUNK_BYTES sized so that N tokens get vocab slices of `cols` columns
    monkeypatch.setitem(lp_mod.CHUNK_BYTES, "cpu", 4 * N * cols)


# Triton row kernels under the interpreter. BLOCK_V is 4096 (or the slice's next power of two), so:
# V=1000 in 256-column slices, the last one 232 wide; V=32000 in 8192-column slices, each two blocks,
# the last slice 7424 wide with a ragged second block; 151936 / 16 in one slice of three blocks.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D,V,cols", [(150, 80, 1000, 256), (37, 48, 32000, 8192),
                                        (37, 48, 151936 // 16, 16384)])
def test_triton(N, D, V, cols, dtype, monkeypatch):
    slice_cols(monkeypatch, N, cols)
    check("triton", N, D, V, dtype)


# The torch row step on the real vocab sizes, in several slices, the last one ragged.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D,V,cols", [(37, 48, 1000, 256), (37, 32, 32000, 8192), (37, 16, 151936, 65536)])
def test_torch(N, D, V, cols, dtype, monkeypatch):
    slice_cols(monkeypatch, N, cols)
    check("torch", N, D, V, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_ignored_frozen_head_and_empty(backend):
    # every target ignored -> zeros and zero dH; a frozen head (LoRA) asks for dH only; no tokens at all
    hidden, weight, targets, grad = make(70, 40, 300, torch.float32)
    hidden.requires_grad_()
    logp = token_logprobs(hidden, weight, torch.full_like(targets, -100), backend=backend)
    (dh,) = torch.autograd.grad(logp, hidden, grad)
    assert (logp == 0).all() and (dh == 0).all()
    logp = token_logprobs(hidden, weight, targets, backend=backend)
    (dh,) = torch.autograd.grad(logp, hidden, grad)
    want = truth(hidden, weight, targets, grad)
    torch.testing.assert_close(dh.double(), want[1], atol=1e-4, rtol=1e-4)
    empty = hidden[:0].detach().requires_grad_()
    logp = token_logprobs(empty, weight, targets[:0], backend=backend)
    assert logp.shape == (0,) and torch.autograd.grad(logp.sum(), empty)[0].shape == (0, 40)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_far_negative_logits(backend, monkeypatch):
    # softmax is shift-invariant; a -300 shift on every logit must change nothing (no exp overflow,
    # no rounding of lse = m + log s, which at |m| ~ 300 is 1.5e-5 per token), also when the running
    # max moves between slices. Inputs are multiples of 1/8, so every logit is exact in fp32 whatever
    # the matmul's summation order (which differs between BLAS builds and CPUs): what is measured is
    # the log-sum-exp and softmax arithmetic, against plain torch's in fp32.
    slice_cols(monkeypatch, 70, 256)
    hidden, weight, targets, grad = make(70, 40, 600, torch.float32)
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
    bound = 2 * 600 * 2.0**-24 * 300 * grad.abs() + 1e-6
    assert ((got[1][:, -1].double() - want[1][:, -1]).abs() <= bound).all()
    cut = lambda t: (t[0], t[1][:, :-1], t[2])
    no_worse_than_torch(cut(got), cut(want), cut(base))


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


# Ahead-of-time compilation for real GPUs, on this CPU: Triton's NVIDIA backend lowers each kernel to
# PTX and its bundled ptxas assembles it, so a kernel that cannot compile for a GPU fails here. The
# forward kernel reads fp32 logits whatever the input dtype; the backward writes dZ in the input
# dtype, bf16 or fp32. Arguments are specialised as the JIT does for aligned tensors and a slice
# width divisible by 16 (every slice but a ragged last one), at the largest block.
# It runs in a child process without TRITON_INTERPRET: under the interpreter Triton's own library
# functions (tl.max, tl.sum) are interpreted too, and the compiler cannot call them.
SIGNATURES = {
    "_lse_kernel": {"Z": "*fp32", "T": "*i64", "M": "*fp32", "S": "*fp32", "Z_T": "*fp32",
                    "C": "i32", "v0": "i32", "BLOCK_V": "constexpr"},
    "_dlogits_kernel": {"Z": "*fp32", "DZ": "*{dz}", "T": "*i64", "M": "*fp32", "LOG_S": "*fp32",
                        "G": "*fp32", "C": "i32", "v0": "i32",
                        "BLOCK_V": "constexpr", "INTERPRET": "constexpr"},
}
CASES = [(name, dz, cap) for cap in (90, 80)
         for name, dz in (("_lse_kernel", None), ("_dlogits_kernel", "bf16"), ("_dlogits_kernel", "fp32"))]


def compile_one(name, dz, cap, tmp):
    """Compile for compute capability `cap`; registers and spilled bytes from ptxas -v with the flags
    Triton's own make_cubin uses, shared memory from Triton's metadata."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, compile

    sig = {k: v.format(dz=dz) for k, v in SIGNATURES[name].items()}
    consts = {"BLOCK_V": lp_mod.BLOCK_V, "INTERPRET": False} if dz else {"BLOCK_V": lp_mod.BLOCK_V}
    aligned = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items())
               if v.startswith("*") or k in ("C", "v0")}
    compiled = compile(ASTSource(getattr(lp_mod, name), sig, consts, aligned),
                       target=GPUTarget("cuda", cap, 32),
                       options={"num_warps": lp_mod.NUM_WARPS, "enable_fp_fusion": True})
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    src = os.path.join(tmp, f"{name}_{dz}_{arch}.ptx")
    with open(src, "w") as f:
        f.write(compiled.asm["ptx"])
    cmd = [get_ptxas(cap).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o", src + ".cubin"]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return {"arch": arch, "regs": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spilled": sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)),
            "shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"])}


def compile_all():
    """Every case, each one's error kept as text so that one failure does not hide the others."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            try:
                out[repr(case)] = compile_one(*case, tmp)
            except Exception as e:                                 # reported by the test of that case
                out[repr(case)] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
    return out


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    code = "import json, test_kernels; print(json.dumps(test_kernels.compile_all()))"
    run = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("name,dz,cap", CASES)
def test_kernels_compile_for_gpus(name, dz, cap, compiled):
    r = compiled[repr((name, dz, cap))]
    assert "error" not in r, f"{name} does not compile for sm_{cap}: {r.get('error')}"
    print(f"\n{name} (dZ {dz or '-'}) {r['arch']}: {r['regs']} registers, {r['spilled']} bytes spilled, "
          f"{r['shared']} bytes shared memory, {lp_mod.NUM_WARPS} warps")
    assert r["cubin_bytes"] > 0
    assert r["spilled"] == 0, f"{name} spills {r['spilled']} bytes on {r['arch']}"
