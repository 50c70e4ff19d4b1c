"""Per-token log-probabilities through the LM head without the [tokens, vocab] logits.

    logp[i] = log softmax(hidden @ weight.T)[i, targets[i]]    (0 where targets[i] == -100)

DPO needs this for every response token of the policy and the reference model. Written naively, it
materialises the logits, their fp32 copy and their gradient: 2.5 GB each at 4096 tokens and
Qwen2.5's 151,936 vocab. This is the most reported out-of-memory in DPO trainers.

One algorithm: cut the vocabulary into slices, get each slice's logits from one GEMM, and turn them
into log-sum-exp statistics (forward) or logit gradients (backward) with a row step. The row step
has two implementations; `which_backend` is the one place that picks:
  - CUDA tensors (backend=None)  -> "triton": two Triton row kernels.
  - anything else (backend=None) -> "torch": the same row step in torch ops.
  - backend="triton" / "torch"   -> forced; "triton" on CPU tensors needs TRITON_INTERPRET=1
                                   (Triton's numpy interpreter, used by the tests) and raises otherwise.
Nothing falls back silently. Both use torch.mm for the GEMMs (cuBLAS on a GPU).

Laid out like the Triton tutorials. Tests: tests/test_kernels.py. Benchmark: bench/logprobs.py.
"""

import os

import torch
import triton
import triton.language as tl

IGNORE = -100


# ----------------------------------------------------------------------------------------------
# Naive reference: what a DPO trainer usually writes. Memory in bf16 at N=8192 tokens,
# vocab V=131072 (one N x V tensor: 2 GiB in bf16, 4 GiB in fp32):
#   logits = hidden @ weight.T        writes N*V*2 bytes
#   .float().log_softmax(-1)          fp32 copy, then fp32 output kept for backward:
#                                     10 GiB alive at the forward's peak
#   .gather(targets)                  N values; backward scatters them into a new N*V*4 zero tensor
#   log_softmax backward              reads both N*V*4 tensors, writes a third: 12 GiB alive
#   .to(bf16), dH = dZ @ W, dW = dZ.T @ H   N*V*2 more, read twice
# In all: ~12 GiB and ~10 N*V-sized passes over memory, to get N values.
# ----------------------------------------------------------------------------------------------
def token_logprobs_reference(hidden, weight, targets):
    logits = hidden @ weight.T                                             # (N, V)
    logp = logits.float().log_softmax(-1)                                  # (N, V) fp32
    picked = logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)    # (N,)
    return torch.where(targets == IGNORE, 0.0, picked)


# ----------------------------------------------------------------------------------------------
# The algorithm. Cut the vocabulary into slices of C columns. Per slice, one GEMM gives
# the (N, C) fp32 logits Z = H @ W[slice].T, and a row step reads Z once:
#   forward:  online log-sum-exp (Milakov & Gimelshein 2018), carried across slices,
#                 m' = max(m, max_j z_j);   s' = s * exp(m - m') + sum_j exp(z_j - m'),
#             plus z[target] from the slice that holds it; logp = (z_t - m) - log s.
#             Only m and log s (2N floats) are saved for backward.
#   backward: with g the incoming gradient, d logp_i / d z_ij = onehot(t_i)_j - p_ij, so
#                 dZ = g[:, None] * (onehot(t) - exp(Z - m) / s)     (g = 0 for ignored tokens)
#             in the input dtype. Then two GEMMs: dH += dZ @ W[slice] (fp32 accumulator),
#             dW[slice] = dZ.T @ H (its own rows: written once, no accumulation).
# No atomics: each output element has one writer, so every run gives the same bits.
#
# Cost at N=8192, D=4096, V=131072, bf16, on an H200 (C=16384: 8 slices):
#   FLOPs   4 GEMMs of 2NDV (forward, recomputed logits, dH, dW) = 8NDV = 3.5e13:
#           44.5 ms at ~790 TFLOP/s (a large bf16 cuBLAS GEMM; 989 on paper).
#           A slice's GEMM: 1.1e12 FLOPs on 0.5-0.7 GB of operands and output, so
#           1500-2300 FLOP/byte. Memory would limit it only below ~200, so it can run at peak.
#   bytes   outside the GEMMs: the row kernels read fp32 Z twice and write bf16 dZ once,
#           N*V*(4+4+2) = 10.7 GB; dH takes 4 passes of N*D*4 per slice, x 8 = 4.3 GB;
#           15 GB at ~4 TB/s = 3.8 ms.
#   time    ~48 ms, ~90% of the GEMM peak (target 70%; bench/logprobs.py --device cuda measures it).
#   memory  beyond inputs and returned gradients: Z 512 MiB, dZ 256 MiB, the fp32 dH and
#           one slice's product 2 x 128 MiB: 1.0 GiB (naive: ~12 GiB).
# Why slice the vocabulary, not the tokens (as Liger-Kernel's fused linear cross-entropy does)?
# The FLOPs are the same. But a token chunk writes every row of dW, so dW needs an fp32 V x D
# accumulator (2 GiB here), read and written once per chunk: 17 GB of traffic with 2048-token
# chunks, and 2.5 GiB of memory with the chunk's logits, against our 1.0 GiB. Adding the returned
# gradients (1.1 GiB), that is ~0.3 of naive, over the target of 1/4; ours is 0.17.
# The trade-off flips when N > V (the dH accumulator is N x D); DPO micro-batches never get there.
#
# Numerics. Z is fp32: cuBLAS accumulates in fp32, and torch.mm(out_dtype=float32) skips the
# rounding to bf16, which at |z| ~ 30 would move a log-prob by up to 0.06. dZ is rounded once,
# to the input dtype, for the two gradient GEMMs.
# The log-sum-exp stays split as (m, log s), never lse = m + log s. LLM logits can be far from 0
# (the "massive activations" of hidden states). The rounding of m + log s (up to 1.5e-5 at
# |m| ~ 300) would then enter every p of the row: sum_j p_j drifts off 1, and dH picks up
# weight * drift along the large-weight direction. p = exp(z - m) * exp(-log s) avoids it.
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Triton row step, forward. One program per token row of a slice's (N, C) fp32 logits.
# It updates the row's running (m, s) over the C columns, BLOCK_V at a time, and picks up
# z[target] if the target is in this slice. Rows are independent: no reduction across programs.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _lse_kernel(Z, T, M, S, Z_T, C, v0, BLOCK_V: tl.constexpr):
    # program_id is int32, and row * C reaches 2**31 at 131072 rows x 16384 columns.
    # Cast once here, and all pointer math below is int64.
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * C
    m = tl.load(M + row)                                           # running max (-inf before slice 0)
    s = tl.load(S + row)                                           # running sum of exp(z - m)
    for c0 in range(0, C, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < C, other=float("-inf"))   # masked: exp(-inf) adds 0
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # rescale the old sum to the new max (first block: m = -inf, so the factor is 0)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    tl.store(M + row, m)
    tl.store(S + row, s)
    t = tl.load(T + row) - v0                                      # the target's column in this slice
    hit = (t >= 0) & (t < C)                                       # never for t = -100
    tl.store(Z_T + row, tl.load(z_row + t, mask=hit, other=0.0), mask=hit)


# ----------------------------------------------------------------------------------------------
# Triton row step, backward. One program per row of the slice's recomputed fp32 logits.
# It writes dZ = g * (onehot(t) - p) in the input dtype; p comes from the saved (m, log s),
# so one pass is enough. For fp32 inputs dZ is Z (in place). This is safe: the same thread
# loads each element before it stores it (load and store use one layout).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dlogits_kernel(Z, DZ, T, M, LOG_S, G, C, v0, BLOCK_V: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)                            # int64: see _lse_kernel
    m = tl.load(M + row)
    inv_s = tl.exp(-tl.load(LOG_S + row))                          # 1 / s, once per row
    g = tl.load(G + row)                                           # 0 for ignored tokens
    t = tl.load(T + row) - v0                                      # target column, may be outside [0, C)
    for c0 in range(0, C, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        z = tl.load(Z + row * C + cols, mask=cols < C, other=float("-inf"))
        dz = g * (tl.where(cols == t, 1.0, 0.0) - tl.exp(z - m) * inv_s)
        if INTERPRET:
            if DZ.dtype.element_ty == tl.bfloat16:
                # Triton 3.9's interpreter casts fp32 -> bf16 by truncation; the GPU rounds
                # to nearest even. So round the fp32 bits by hand (add 0x7FFF + the lowest
                # kept bit, clear the low 16 bits); the truncating store is then exact.
                bits = dz.to(tl.uint32, bitcast=True)
                dz = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(DZ + row * C + cols, dz.to(DZ.dtype.element_ty), mask=cols < C)


# ----------------------------------------------------------------------------------------------
# The same row step in torch, for any non-CUDA tensor; the lines mirror the kernels.
# Z is overwritten in place, so a slice never needs a second (N, C) block.
# ----------------------------------------------------------------------------------------------
def _target_column(targets, v0, C):
    t = targets - v0
    return t.clamp(0, C - 1)[:, None], (t >= 0) & (t < C)         # gather index; target in this slice?


def _lse_torch(z, targets, m, s, z_t, v0):
    col, hit = _target_column(targets, v0, z.shape[1])
    z_t += torch.where(hit, z.gather(1, col).squeeze(1), 0.0)
    m_new = torch.maximum(m, z.amax(1))
    s.mul_((m - m_new).exp()).add_(z.sub_(m_new[:, None]).exp_().sum(1))
    m.copy_(m_new)


def _dlogits_torch(z, dz, targets, m, log_s, g, v0):
    col, hit = _target_column(targets, v0, z.shape[1])
    z.sub_(m[:, None]).exp_().mul_((-g * (-log_s).exp())[:, None])           # -g p
    z.scatter_add_(1, col, torch.where(hit, g, 0.0)[:, None])                # + g onehot(t)
    if dz is not z:
        dz.copy_(z)                                                          # round to nearest even


# ----------------------------------------------------------------------------------------------
# Launchers. Block sizes chosen on paper (the compile test prints registers and shared memory):
#   grid: one program per row, N programs (8192 above, ~60 per SM), whatever C is.
#   BLOCK_V=4096 fp32 over 8 warps: 16 values per thread, four 16-byte loads in flight
#     per thread and step. With several programs per SM, that hides HBM latency in a
#     kernel that only streams memory. 32 registers: 8 programs (2048 threads) fit on an SM.
#     A slice narrower than 4096 (the last, or a small vocab) gets the next power of two.
#   CHUNK_BYTES: size of one slice's fp32 (N, C) logits; C is a multiple of 256 (aligned
#     GEMM operands), at least 256. GPU, 512 MiB: C=16384 above, GEMMs of 1.1e12 FLOPs,
#     8 passes over dH. CPU, 64 MiB: its GEMMs are slow, so more slices cost nothing
#     measurable, and memory is what a CPU run is short of.
# ----------------------------------------------------------------------------------------------
BLOCK_V, NUM_WARPS = 4096, 8
CHUNK_BYTES = {"cuda": 512 * 2**20, "cpu": 64 * 2**20}


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block(C):
    return min(BLOCK_V, triton.next_power_of_2(C))


def _lse_triton(z, targets, m, s, z_t, v0):
    N, C = z.shape
    _lse_kernel[(N,)](z, targets, m, s, z_t, C, v0, BLOCK_V=_block(C), num_warps=NUM_WARPS)


def _dlogits_triton(z, dz, targets, m, log_s, g, v0):
    N, C = z.shape
    _dlogits_kernel[(N,)](z, dz, targets, m, log_s, g, C, v0, BLOCK_V=_block(C), INTERPRET=_interpreting(),
                          num_warps=NUM_WARPS)


ROW_STEPS = {"triton": (_lse_triton, _dlogits_triton), "torch": (_lse_torch, _dlogits_torch)}


# ----------------------------------------------------------------------------------------------
# The autograd Function: the slice loop, shared by both row steps.
# ----------------------------------------------------------------------------------------------
def _slices(N, V, device):
    """Vocabulary slices [v0, v1), sized so one slice's (N, C) fp32 logits are near CHUNK_BYTES."""
    budget = CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    C = max(256, budget // (4 * max(N, 1)) // 256 * 256)
    return [(v0, min(v0 + C, V)) for v0 in range(0, V, C)]


def _mm32(a, b):
    """a @ b with fp32 output and fp32 accumulation; bf16 operands are multiplied exactly."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)             # cuBLAS, no rounding of the output
    return a.float() @ b.float()                                   # CPUs have no bf16 -> fp32 GEMM


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, backend):
        lse_step = ROW_STEPS[backend][0]
        N = hidden.shape[0]
        m = torch.full((N,), float("-inf"), dtype=torch.float32, device=hidden.device)
        s, z_t = (torch.zeros(N, dtype=torch.float32, device=hidden.device) for _ in range(2))
        for v0, v1 in _slices(N, weight.shape[0], hidden.device):
            z = _mm32(hidden, weight[v0:v1].T)                     # (N, C) fp32 logits of this slice
            lse_step(z, targets, m, s, z_t, v0)
        log_s = s.log()
        ctx.save_for_backward(hidden, weight, targets, m, log_s)   # 2N floats, not N x V
        ctx.backend = backend
        return torch.where(targets == IGNORE, 0.0, (z_t - m) - log_s)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, m, log_s = ctx.saved_tensors
        dlogits_step = ROW_STEPS[ctx.backend][1]
        need_dh, need_dw = ctx.needs_input_grad[:2]
        g = torch.where(targets == IGNORE, 0.0, grad.float()).contiguous()
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
        dw = torch.empty_like(weight) if need_dw else None
        for v0, v1 in _slices(hidden.shape[0], weight.shape[0], hidden.device):
            w = weight[v0:v1]
            z = _mm32(hidden, w.T)                                 # the forward's logits, recomputed
            # fp32: in place, safe (see _dlogits_kernel)
            dz = z if weight.dtype == torch.float32 else torch.empty_like(z, dtype=weight.dtype)
            dlogits_step(z, dz, targets, m, log_s, g, v0)
            if need_dh:
                dh += _mm32(dz, w)
            if need_dw:
                torch.mm(dz.T, hidden, out=dw[v0:v1])
        return (dh.to(hidden.dtype) if need_dh else None), dw, None, None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def which_backend(hidden, backend=None):
    """The one place that decides the row step: None -> "triton" for CUDA tensors, else "torch"."""
    if backend is None:
        return "triton" if hidden.is_cuda else "torch"
    if backend not in ROW_STEPS:
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and not hidden.is_cuda and not _interpreting():
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton "
                           "is imported")
    return backend


def _check_targets(targets, V):
    ok = (targets == IGNORE) | ((targets >= 0) & (targets < V))
    if not bool(ok.all()):                                 # one host sync; cheaper than a wrong answer
        raise ValueError(f"targets must be in [0, {V}) or {IGNORE}")


def token_logprobs(hidden, weight, targets, backend=None):
    """log softmax(hidden @ weight.T)[i, targets[i]] as float32 (N,), 0 where targets == -100,
    without materialising the (N, V) logits. hidden (N, D), weight (V, D), targets (N,) int64.
    Differentiable in hidden and weight. backend: see `which_backend`."""
    assert hidden.dim() == 2 and weight.dim() == 2, (hidden.shape, weight.shape)
    assert hidden.shape[1] == weight.shape[1], (hidden.shape, weight.shape)
    assert targets.shape == hidden.shape[:1] and targets.dtype == torch.int64, (targets.shape, targets.dtype)
    assert hidden.dtype == weight.dtype, (hidden.dtype, weight.dtype)
    _check_targets(targets, weight.shape[0])
    backend = which_backend(hidden, backend)
    return _TokenLogprobs.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(), backend)
