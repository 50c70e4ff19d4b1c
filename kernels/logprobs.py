"""Per-token log-probabilities through the LM head without the [tokens, vocab] logits.

    logp[i] = log softmax(hidden @ weight.T)[i, targets[i]]    (0 where targets[i] == -100)

DPO needs exactly this for every response token of the policy and the reference model. Written
naively it materialises the logits, their fp32 copy and their gradient: 2.5 GB each at 4096
tokens and Qwen2.5's 151,936 vocab, the most reported out-of-memory in DPO trainers.

Which path runs is decided in one place, `which_backend`:
  - CUDA tensors (backend=None)  -> Triton: fused kernels, logits live only in registers, one
                                   [BLOCK_N, BLOCK_V] tile at a time.
  - anything else (backend=None) -> torch: the same math chunked over tokens, so the largest
                                   temporary is one [chunk, V] fp32 block.
  - backend="triton" / "torch"   -> forced; "triton" on CPU tensors needs TRITON_INTERPRET=1
                                   (Triton's numpy interpreter, used by the tests) and raises otherwise.
Nothing falls back silently.

Layout (as in the Triton tutorials): naive reference with its memory traffic, the kernels, the
launchers, the autograd Functions, the torch fallback, then the public functions.
Tests: tests/test_kernels.py. Benchmark: bench/logprobs.py.
"""

import os

import torch
import triton
import triton.language as tl

IGNORE = -100


# ----------------------------------------------------------------------------------------------
# Naive reference: what a DPO trainer usually writes. Memory traffic for N tokens, vocab V,
# hidden D in bf16 (fp32 doubles every 2-byte term below):
#   logits = hidden @ weight.T        write N*V*2 bytes               (2.5 GB at 4096 x 151936 fp32)
#   .float().log_softmax(-1)          read N*V*2, write N*V*4 twice   (the copy, then the output kept for backward)
#   .gather(targets)                  N values; backward scatters them into a fresh N*V*4 zero tensor
#   log_softmax backward              read 2 * N*V*4, write N*V*4; then cast to bf16, N*V*2
#   dH = dlogits @ W, dW = dlogits.T @ H   read N*V*2 twice
# so a peak of several N x V tensors alive at once, for N values that are actually wanted.
# ----------------------------------------------------------------------------------------------
def token_logprobs_reference(hidden, weight, targets):
    logits = hidden @ weight.T                                             # (N, V)
    logp = logits.float().log_softmax(-1)                                  # (N, V) fp32
    picked = logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)    # (N,)
    return torch.where(targets == IGNORE, 0.0, picked)


# Two helpers that exist only because of the interpreter (TRITON_INTERPRET=1, the CPU tests);
# on a GPU, INTERPRET is False and they compile to a plain tl.dot and a plain cast. Triton 3.9's
# interpreter (runtime/interpreter.py) (1) multiplies bf16 dot operands as their raw uint16 bits,
# and (2) casts fp32 -> bf16 by truncation where the GPU rounds to nearest even.
@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    # a @ b + acc, fp32 accumulation; under the interpreter the operands go to fp32 first (exact)
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    # x.to(dtype); under the interpreter a bf16 target is rounded to nearest even by hand on the fp32
    # bits (add 0x7FFF plus the lowest kept bit, drop 16 bits) and kept in fp32 for _mm
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype)


# ----------------------------------------------------------------------------------------------
# Triton forward. One program owns a tile of BLOCK_N tokens and a contiguous slice of the vocab
# (a "split"); it walks that slice BLOCK_V columns at a time. For each logits tile
#     z = H[rows] @ W[cols].T                    (fp32 accumulation over D, BLOCK_D at a time)
# it updates the online log-sum-exp (Milakov & Gimelshein 2018):
#     m' = max(m, max_j z_j);   s' = s * exp(m - m') + sum_j exp(z_j - m');   lse = m + log s
# and picks up z[target] in the one tile whose columns contain the target. Each split writes its
# partial (m, s, z_target); the launcher merges the splits (a few ops on [splits, N] floats).
# Splitting the vocab is flash-decoding's trick: N=8192 tokens are only 128 token tiles, too few
# programs to fill a GPU, while the vocab axis has 1000+ tiles to share out.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _forward_kernel(H, W, T, M_part, S_part, Z_part, N, V, D, v_per_split,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    # program_id is int32; rows * D and cols * D pass 2**31 for large heads (V=262144 x D=8192 is
    # 2.1e9) and the pointer arithmetic would wrap silently. Start in int64 and everything stays there.
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                 # token ids of this tile
    row_ok = rows < N                                              # the last tile is ragged
    t = tl.load(T + rows, mask=row_ok, other=-100)                 # target ids (-100: ignored)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)             # running max m
    s = tl.zeros((BLOCK_N,), tl.float32)                           # running sum s = sum exp(z - m)
    z_t = tl.zeros((BLOCK_N,), tl.float32)                         # z[target], 0 unless in this split
    v_start = pid_s * v_per_split                                  # v_per_split is a multiple of BLOCK_V,
    v_end = tl.minimum(v_start + v_per_split, V)                   # so only cols >= V need masking
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)                          # vocab ids of this tile
        col_ok = cols < V
        # z = H[rows] @ W[cols].T, accumulated in fp32 over D; masked loads give 0, adding nothing
        z = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            h = tl.load(H + rows[:, None] * D + ds[None, :], mask=row_ok[:, None] & (ds[None, :] < D), other=0.0)
            w = tl.load(W + cols[:, None] * D + ds[None, :], mask=col_ok[:, None] & (ds[None, :] < D), other=0.0)
            z = _mm(h, tl.trans(w), z, PRECISION, INTERPRET)
        z = tl.where(col_ok[None, :], z, float("-inf"))            # columns past V: exp(-inf) = 0
        # online log-sum-exp; the first tile has m = -inf and exp(-inf - m') = 0 clears s
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        # the target column, if it is in this tile (never for t = -100)
        z_t += tl.sum(tl.where(cols[None, :] == t[:, None], z, 0.0), axis=1)
    tl.store(M_part + pid_s * N + rows, m, mask=row_ok)
    tl.store(S_part + pid_s * N + rows, s, mask=row_ok)
    tl.store(Z_part + pid_s * N + rows, z_t, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Triton backward. With p = softmax(z) and g the incoming gradient of logp[i]:
#     d logp_i / d z_ij = onehot(t_i)_j - p_ij         so   dZ = g[:, None] * (onehot(t) - P)
#     dH = dZ @ W         dW = dZ.T @ H                (g = 0 for ignored tokens)
# Each program owns one (token tile, vocab tile): it recomputes z from H and W (the one logits
# recompute counted in 8*N*D*V), turns it into dZ in registers from the saved row max m and
# log s (p = exp(z - m) / s: no second pass over the vocab), and adds dZ @ W[cols] into dH[rows]
# and dZ.T @ H[rows] into dW[cols], BLOCK_D columns at a time, with fp32 atomics.
# Why atomics rather than one kernel for dH (looping over vocab tiles) and one for dW (looping
# over token tiles): D is 1024-8192, so a program cannot keep its [BLOCK_N, D] share of dH in
# registers and must read-modify-write it in global memory either way; two owner kernels would
# then also recompute every logits tile twice (10*N*D*V flops instead of 8) and give only N/BLOCK_N
# (resp. V/BLOCK_V) programs. The price: fp32 atomics make dH/dW bitwise non-deterministic
# run to run (last-bit differences), and an fp32 dW buffer of V*D*4 bytes for bf16 weights.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _backward_kernel(H, W, T, M, LOG_S, G, dH, dW, N, V, D,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                     GROUP_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                     NEED_DH: tl.constexpr, NEED_DW: tl.constexpr):
    # Grouped launch order (as in Triton's matmul tutorial): programs running at the same time
    # cover GROUP_N token tiles x a few vocab tiles, so their H and W tiles are shared in L2 and
    # their atomics land on several dH and dW rows instead of piling onto one.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    v_tiles = tl.cdiv(V, BLOCK_V)
    first_n = (pid // (GROUP_N * v_tiles)) * GROUP_N
    group_n = tl.minimum(n_tiles - first_n, GROUP_N)
    pid_n = (first_n + (pid % (GROUP_N * v_tiles)) % group_n).to(tl.int64)   # int64: see forward
    pid_v = ((pid % (GROUP_N * v_tiles)) // group_n).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    t = tl.load(T + rows, mask=row_ok, other=-100)
    m = tl.load(M + rows, mask=row_ok, other=0.0)
    log_s = tl.load(LOG_S + rows, mask=row_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    g = tl.where(t != -100, g, 0.0)                                # ignored tokens get no gradient
    # recompute z = H[rows] @ W[cols].T exactly as the forward did
    z = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(H + rows[:, None] * D + ds[None, :], mask=row_ok[:, None] & (ds[None, :] < D), other=0.0)
        w = tl.load(W + cols[:, None] * D + ds[None, :], mask=col_ok[:, None] & (ds[None, :] < D), other=0.0)
        z = _mm(h, tl.trans(w), z, PRECISION, INTERPRET)
    # dZ = g * (onehot(t) - p), p = exp(z - m) / s. Not exp(z - lse): z - m is exact, while
    # lse = m + log s carries one rounding of |m| (3e-5 at |m| ~ 300) into every p of the row, so
    # sum_j p_j drifts off 1 and dH along a large-weight direction (the "massive activations" of
    # LLM hidden states) picks up weight * drift.
    # Columns past V meet only zero W rows and masked stores, but z = 0 there and exp(0 - m) can
    # overflow (all logits < -88), and inf * 0 = NaN in the dots: they get z = -inf, so p = 0.
    z = tl.where(col_ok[None, :], z, float("-inf"))
    p = tl.exp(z - m[:, None]) * tl.exp(-log_s)[:, None]
    dz = g[:, None] * (tl.where(cols[None, :] == t[:, None], 1.0, 0.0) - p)
    dz = _cast(dz, H.dtype.element_ty, INTERPRET)                  # bf16 in: bf16 tensor-core dots, fp32 acc
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds[None, :] < D
        if NEED_DH:
            # dH[rows, ds] += dZ @ W[cols, ds]                     (BLOCK_N, BLOCK_D)
            w = tl.load(W + cols[:, None] * D + ds[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
            dh = _mm(dz, w, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), PRECISION, INTERPRET)
            tl.atomic_add(dH + rows[:, None] * D + ds[None, :], dh, mask=row_ok[:, None] & d_ok, sem="relaxed")
        if NEED_DW:
            # dW[cols, ds] += dZ.T @ H[rows, ds]                   (BLOCK_V, BLOCK_D)
            h = tl.load(H + rows[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
            dw = _mm(tl.trans(dz), h, tl.zeros((BLOCK_V, BLOCK_D), tl.float32), PRECISION, INTERPRET)
            tl.atomic_add(dW + cols[:, None] * D + ds[None, :], dw, mask=col_ok[:, None] & d_ok, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Launchers. Block sizes, chosen on paper (not autotuned, not yet timed on a GPU; retune there):
#   BLOCK_N=64, BLOCK_V=128: a 64x128 fp32 logits tile is 32 KB of registers over 8 warps
#     (32 per thread), leaving room in the backward for dZ and the two [*, BLOCK_D] products;
#     both are multiples of the 16x16 (bf16) tensor-core shapes that tl.dot needs.
#   BLOCK_D=64: 64 bf16 = 128-byte rows, one full cache line per row per load.
#   splits: enough vocab slices that token tiles x splits is about 4 programs per SM. Under the
#     interpreter (no SMs) we count 4, so small test shapes still exercise the split merge.
# ----------------------------------------------------------------------------------------------
BLOCK_N, BLOCK_V, BLOCK_D, GROUP_N, NUM_WARPS = 64, 128, 64, 8, 8


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _precision(x):
    # fp32 tl.dot defaults to TF32 on GPUs (10-bit mantissa); fp32 inputs ask for fp32 products
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _triton_forward(hidden, weight, targets):
    N, D = hidden.shape
    V = weight.shape[0]
    n_tiles, v_tiles = triton.cdiv(N, BLOCK_N), triton.cdiv(V, BLOCK_V)
    sms = 4 if not hidden.is_cuda else torch.cuda.get_device_properties(hidden.device).multi_processor_count
    tiles_per_split = triton.cdiv(v_tiles, min(v_tiles, triton.cdiv(4 * sms, n_tiles)))
    splits = triton.cdiv(v_tiles, tiles_per_split)                 # every split gets >= 1 tile
    m, s, z = (torch.empty(splits, N, device=hidden.device, dtype=torch.float32) for _ in range(3))
    _forward_kernel[(n_tiles, splits)](hidden, weight, targets, m, s, z, N, V, D, tiles_per_split * BLOCK_V,
                                       BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
                                       PRECISION=_precision(hidden), INTERPRET=_interpreting(), num_warps=NUM_WARPS)
    # merge splits: lse = M + log S, M = max_k m_k, S = sum_k s_k exp(m_k - M).
    # logp = (z_t - M) - log S, not z_t - lse, and (M, log S) kept apart for the backward: with
    # logits far from 0 the rounding of lse itself would be the largest error (see the backward).
    m_all = m.amax(0)
    log_s = (s * (m - m_all).exp()).sum(0).log()
    logp = torch.where(targets == IGNORE, 0.0, (z.sum(0) - m_all) - log_s)
    return logp, m_all, log_s


def _triton_backward(hidden, weight, targets, m, log_s, grad, need_dh, need_dw):
    N, D = hidden.shape
    V = weight.shape[0]
    # atomics accumulate in fp32; for fp32 inputs these buffers are the gradients themselves
    dh = torch.zeros(N, D, device=hidden.device, dtype=torch.float32) if need_dh else None
    dw = torch.zeros(V, D, device=hidden.device, dtype=torch.float32) if need_dw else None
    grid = (triton.cdiv(N, BLOCK_N) * triton.cdiv(V, BLOCK_V),)
    _backward_kernel[grid](hidden, weight, targets, m, log_s, grad, dh, dw, N, V, D,
                           BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, GROUP_N=GROUP_N,
                           PRECISION=_precision(hidden), INTERPRET=_interpreting(), NEED_DH=need_dh, NEED_DW=need_dw,
                           num_warps=NUM_WARPS)
    return (dh.to(hidden.dtype) if need_dh else None), (dw.to(weight.dtype) if need_dw else None)


class _TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        logp, m, log_s = _triton_forward(hidden, weight, targets)
        ctx.save_for_backward(hidden, weight, targets, m, log_s)   # 2N floats, not N x V
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, m, log_s = ctx.saved_tensors
        dh, dw = _triton_backward(hidden, weight, targets, m, log_s, grad.float().contiguous(),
                                  ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dh, dw, None


# ----------------------------------------------------------------------------------------------
# Torch fallback: the same math, chunked over tokens. The chunk is sized so its [C, V] fp32
# logits block stays near CHUNK_BYTES, so extra memory is bounded by a chunk (plus the fp32 dW
# that bf16 weights accumulate into), not by N x V. The backward recomputes each chunk's logits
# from the saved (m, log s), like the kernel, instead of keeping them.
# For bf16 inputs the matmul runs in bf16 (fp32 accumulation inside the GEMM, output rounded to
# bf16) and everything after it -- log-sum-exp, softmax, dZ, dW accumulation -- in fp32.
# ----------------------------------------------------------------------------------------------
CHUNK_BYTES = 64 * 2**20


def _chunk_rows(V):
    return max(1, CHUNK_BYTES // (4 * V))


class _TorchTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        N, C = hidden.shape[0], _chunk_rows(weight.shape[0])
        logp, m, log_s = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(3))
        for i in range(0, N, C):
            t = targets[i:i + C]
            z = (hidden[i:i + C] @ weight.T).float()               # (C, V) the only big temporary
            m[i:i + C] = z.amax(-1)
            z = z.sub_(m[i:i + C, None])                           # z - m, in place: no 2nd block
            z_t = z.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1)
            log_s[i:i + C] = z.exp_().sum(-1).log()
            logp[i:i + C] = torch.where(t == IGNORE, 0.0, z_t - log_s[i:i + C])   # (z_t - m) - log s
        ctx.save_for_backward(hidden, weight, targets, m, log_s)
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, m, log_s = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]
        N, C = hidden.shape[0], _chunk_rows(weight.shape[0])
        g = torch.where(targets == IGNORE, 0.0, grad.float())
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_dw else None
        for i in range(0, N, C):
            h, t, gc = hidden[i:i + C], targets[i:i + C], g[i:i + C, None]
            # dZ = g * (onehot(t) - exp(z - m) / s), in place in the recomputed logits block
            dz = (h @ weight.T).float().sub_(m[i:i + C, None]).exp_().mul_(-gc * log_s[i:i + C, None].neg().exp())
            dz.scatter_add_(-1, t.clamp(min=0)[:, None], gc)       # ignored rows add g = 0
            if need_dh:
                torch.mm(dz.to(weight.dtype), weight, out=dh[i:i + C])   # dH = dZ @ W
            if need_dw:
                dw.addmm_(dz.T, h.float())                         # dW += dZ.T @ H, fp32
        return dh, (dw.to(weight.dtype) if need_dw else None), None


# ----------------------------------------------------------------------------------------------
# From logits the caller already holds (sampler, evaluation): same chunked log-sum-exp, and a
# backward that writes the logits gradient chunk by chunk, so no fp32 [.., V] copy is ever made.
# ----------------------------------------------------------------------------------------------
class _LogitsLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):                             # logits (R, V), targets (R,)
        R, C = logits.shape[0], _chunk_rows(logits.shape[1])
        logp, m, log_s = (torch.empty(R, device=logits.device, dtype=torch.float32) for _ in range(3))
        for i in range(0, R, C):
            t = targets[i:i + C]
            m[i:i + C] = logits[i:i + C].amax(-1)
            z = logits[i:i + C].float().sub(m[i:i + C, None])      # z - m, a new fp32 block
            z_t = z.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1)
            log_s[i:i + C] = z.exp_().sum(-1).log()
            logp[i:i + C] = torch.where(t == IGNORE, 0.0, z_t - log_s[i:i + C])
        ctx.save_for_backward(logits, targets, m, log_s)
        return logp

    @staticmethod
    def backward(ctx, grad):
        logits, targets, m, log_s = ctx.saved_tensors
        R, C = logits.shape[0], _chunk_rows(logits.shape[1])
        g = torch.where(targets == IGNORE, 0.0, grad.float())
        dlogits = torch.empty_like(logits)
        for i in range(0, R, C):
            gc = g[i:i + C, None]
            dz = logits[i:i + C].float().sub(m[i:i + C, None]).exp_().mul_(-gc * log_s[i:i + C, None].neg().exp())  # -g p
            dz.scatter_add_(-1, targets[i:i + C].clamp(min=0)[:, None], gc)         # + g * onehot
            dlogits[i:i + C] = dz
        return dlogits, None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def which_backend(hidden, backend=None):
    """The one place that decides the path: None -> "triton" for CUDA tensors, else "torch"."""
    if backend is None:
        return "triton" if hidden.is_cuda else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and not hidden.is_cuda and not _interpreting():
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    return backend


def _check_targets(targets, V):
    ok = (targets == IGNORE) | ((targets >= 0) & (targets < V))
    if not bool(ok.all()):                                         # one host sync; cheaper than a wrong answer
        raise ValueError(f"targets must be in [0, {V}) or {IGNORE}")


def token_logprobs(hidden, weight, targets, backend=None):
    """log softmax(hidden @ weight.T)[i, targets[i]] as float32 (N,), 0 where targets == -100,
    without materialising the (N, V) logits. hidden (N, D), weight (V, D), targets (N,) int64.
    Differentiable in hidden and weight. backend: see `which_backend`."""
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], (hidden.shape, weight.shape)
    assert targets.shape == hidden.shape[:1] and targets.dtype == torch.int64, (targets.shape, targets.dtype)
    assert hidden.dtype == weight.dtype, (hidden.dtype, weight.dtype)
    _check_targets(targets, weight.shape[0])
    fn = _TritonTokenLogprobs if which_backend(hidden, backend) == "triton" else _TorchTokenLogprobs
    return fn.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous())


def logprobs_from_logits(logits, targets):
    """log softmax(logits)[..., targets] as float32 with targets' shape, 0 where targets == -100.
    Chunked over rows; logits (..., V) in any float dtype. A layout that cannot be viewed as
    (rows, V), e.g. logits[:, :-1], is copied once (in its own dtype)."""
    assert logits.shape[:-1] == targets.shape, (logits.shape, targets.shape)
    _check_targets(targets, logits.shape[-1])
    rows = logits.reshape(-1, logits.shape[-1])
    return _LogitsLogprobs.apply(rows, targets.reshape(-1)).view(targets.shape)
