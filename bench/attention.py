"""The cuDNN attention bug (pytorch issue 196678), and our attention on the same inputs.

    python bench/attention.py --device cuda     # one line each: cuDNN as SDPA would pick it, then ours
    python bench/attention.py                   # CPU: a dry run of the same code (no cuDNN there)

With an explicit mask, SDPA on H100/H200 prefers cuDNN, whose backward returns NaN in dQ when the row
length % 128 == 64 and a row's log-sum-exp is below -88.7 (the fp32 exp underflows). Qwen2.5's
"massive activation" heads produce such rows, and our packed DPO rows always carry a mask. The inputs
here: Qwen2.5-0.5B's heads (14 query, 2 key/value, head size 64), bf16, rows of 320 tokens (320 % 128 ==
64), a packed [prompt | chosen | rejected] mask, and in head 0 queries and keys pointing in opposite
directions so that every score is about -100. Gradients are compared with float64 ones; the cuDNN line
says whether its dQ has NaN (the bug); ours must be finite and within bf16 rounding of float64.

Then, on a GPU, the memory of the masks (model.additive_mask's claims): 8 "layers" of masked attention
share one mask of rows of 2045 tokens (not a multiple of 8), forward then backward; the peak above the
inputs for a bool mask (SDPA makes an additive one at each call), a contiguous additive one (its rows
not 8-aligned: CUDA pads a copy at each call) and additive_mask's (8-aligned rows, shared). The first
two should cost about a mask (bf16) per layer more than the third.
"""
import argparse
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data            # noqa: E402
from model import additive_mask, attend, MASKED_BACKENDS  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
p.add_argument("--T", type=int, default=320, help="row length (the bug needs T %% 128 == 64)")
args = p.parse_args()
dev, B, NH, NKV, HD, T = torch.device(args.device), 2, 14, 2, 64, args.T


def inputs():
    """q, k, v (bf16 leaves), the packed mask (B, 1, T, T) and the output gradient."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, HD, generator=g) for h in (NH, NKV, NKV))
    e = torch.zeros(HD)
    e[0] = (100 * HD ** 0.5) ** 0.5                  # q.k / sqrt(hd) = -100 for every pair in head 0
    q[:, 0] = e + 0.01 * q[:, 0]
    k[:, 0] = -e + 0.01 * k[:, 0]
    P = T // 2                                        # prompt, chosen, rejected: T/2, T/4, T/4 tokens
    rows = [{"prompt": list(range(P)), "chosen": list(range(T // 4)),
             "rejected": list(range(T - P - T // 4))}] * B
    mask = data.collate_pairs(rows, packed=True)["mask"][:, None]          # (B, 1, T, T) bool
    grad = torch.randn(B, NH, T, HD, generator=g)
    to = lambda t: t.to(dev, torch.bfloat16).requires_grad_()
    return to(q), to(k), to(v), mask.to(dev), grad.to(dev, torch.bfloat16)


def reference(q, k, v, mask, grad):
    """float64 gradients, softmax written out (grouped-query heads repeated)."""
    q, k, v = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    rep = NH // NKV
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) / HD ** 0.5
    s = s.masked_fill(~mask.cpu(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    y = torch.softmax(s, -1) @ v.repeat_interleave(rep, 1)
    y.backward(grad.double().cpu())
    return lse, [t.grad for t in (q, k, v)]


def grads(fn, q, k, v, mask, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    fn(q, k, v, mask).backward(grad)
    return [t.grad.double().cpu() for t in (q, k, v)]


def report(name, got, ref):
    bad = [int((~torch.isfinite(g)).sum()) for g in got]
    err = [float((g - r).norm() / r.norm()) for g, r in zip(got, ref)]
    print(f"{name:<34} | non-finite dq dk dv: {bad[0]} {bad[1]} {bad[2]} | relative error vs float64: "
          + " ".join(f"{e:.2e}" for e in err), flush=True)
    return bad, err


q, k, v, mask, grad = inputs()
lse, ref = reference(q, k, v, mask, grad)
name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
print(f"device {dev} ({name}), torch {torch.__version__} | "
      f"B {B}, heads {NH}/{NKV}, hd {HD}, T {T} (T % 128 = {T % 128}) | head 0's log-sum-exp "
      f"{lse[:, 0].max():.1f} (< -88.7: {bool(lse[:, 0].max() < -88.7)}) | our masked kernels: "
      f"{', '.join(b.name for b in MASKED_BACKENDS)}")
sdpa = lambda backends: lambda q, k, v, m: _sdpa(backends, q, k, v, m)


def _sdpa(backends, q, k, v, m):   # kv heads repeated: not every kernel of every torch takes grouped queries
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(NH // NKV, 1),
                                              v.repeat_interleave(NH // NKV, 1), attn_mask=m)


lines = [("SDPA math (bf16, the baseline)", sdpa([SDPBackend.MATH]))]
if dev.type == "cuda":
    lines.insert(0, ("SDPA cuDNN (what torch would pick)", sdpa([SDPBackend.CUDNN_ATTENTION])))
lines.append(("ours: model.attend", lambda q, k, v, m: attend(q, k, v, m)))
results = {}
for name, fn in lines:
    try:
        results[name] = report(name, grads(fn, q, k, v, mask, grad), ref)
    except Exception:
        print(f"{name:<34} | FAILED: {traceback.format_exc(limit=1).strip().splitlines()[-1]}", flush=True)
ours = results.get("ours: model.attend")
if ours is not None:   # bf16 keeps 8 bits: a relative error of a few 2^-8 is rounding; NaN or 1e-1 is a bug
    ok = sum(ours[0]) == 0 and max(ours[1]) <= 4 * 2 ** -8
    print(f"verdict: our gradients finite and within 4 bf16 ulps (1.6e-2) of float64: "
          f"{'PASS' if ok else 'FAIL'}")



def mask_memory(form, L=8, B=4, H=8, T=2045):
    """Peak bytes above the inputs of L masked attention calls sharing one mask, forward and backward."""
    allowed = torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(B, T, T)
    mask = {"bool": lambda: allowed[:, None].contiguous(),
            "additive, unaligned": lambda: additive_mask(allowed, torch.bfloat16).contiguous(),
            "additive_mask (8-aligned)": lambda: additive_mask(allowed, torch.bfloat16)}[form]()
    qkv = [torch.randn(3, B, H, T, HD, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(L)]
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    sum(attend(x[0], x[1], x[2], mask).float().sum() for x in qkv).backward()
    return torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else None


FORMS = ("bool", "additive, unaligned", "additive_mask (8-aligned)")
shape = dict(T=2045) if dev.type == "cuda" else dict(L=2, T=67)   # a CPU only runs the code
one_mask = 4 * shape["T"] ** 2 * 2                                 # B x T x T in bf16
peaks = {}
for form in FORMS:
    try:
        peaks[form] = mask_memory(form, **shape)
        mib = "no CUDA memory stats on a CPU" if peaks[form] is None else f"{peaks[form] / 2**20:8.1f} MiB"
        print(f"mask memory, {form:<26} | peak above the inputs: {mib}", flush=True)
    except Exception:
        print(f"mask memory, {form:<26} | FAILED: {traceback.format_exc(limit=1).strip().splitlines()[-1]}",
              flush=True)
if len(peaks) == 3 and dev.type == "cuda":
    more = {f: (peaks[f] - peaks[FORMS[2]]) / one_mask for f in FORMS[:2]}
    print(f"mask memory: one mask is {one_mask / 2**20:.1f} MiB; over 8 layers, more than additive_mask's: "
          f"bool {more['bool']:+.1f} masks, unaligned {more['additive, unaligned']:+.1f} masks")
