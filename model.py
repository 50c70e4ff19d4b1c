"""One transformer for the Llama / Mistral / Qwen2 / InternLM2 family, HF safetensors in and out,
and the runtime every script shares.

Every supported family is the same pre-norm decoder:

    h = x + Attention(RMSNorm(x))          attention: RoPE on q, k; grouped-query (n_kv_heads <= n_heads)
    y = h + W2(silu(W1 RMSNorm(h)) * W3 RMSNorm(h))

and the families differ only in fields of `ModelArgs`: qkv bias (Qwen2), tied embeddings (small Qwen2
models), RoPE scaling (Llama 3.1+), head_dim, a sliding window (Mistral v0.1), tensor names (InternLM2).
Here q, k, v are one projection (`wqkv`) and W1, W3 another (`w13`): four GEMMs a layer, not seven.
"""
import errno
import gc
import json
import math
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import checkpoint

from tokenizer import Tokenizer, read_json

SUPPORTED = ("llama", "mistral", "qwen2", "internlm2")


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 0          # 0 -> n_heads
    head_dim: int = 0            # 0 -> dim // n_heads
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "llama3" | "linear" | "dynamic", ...} as in HF configs
    max_seq_len: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False         # Llama's attention_bias=True biases o_proj too
    tie_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    extra: dict = field(default_factory=dict)   # HF config keys we do not use, written back on save
    generation: dict | None = None   # the folder's generation_config.json (read_config), written back on save

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.model_type not in SUPPORTED:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED)}")

    @classmethod
    def from_hf_config(cls, c: dict) -> "ModelArgs":
        """From a hub config.json dict; RoPE as `rope_theta` and `rope_scaling`, or `rope_parameters`."""
        _check_config_types(c)
        mt = c.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"unsupported model_type {mt!r} in config.json; supported: "
                             f"{', '.join(SUPPORTED)}")
        if mt == "internlm2" and c.get("bias", False):
            raise ValueError("InternLM2 with bias=true is not supported (released InternLM2 models have no "
                             "bias)")
        missing = [k for k in REQUIRED if k not in c]
        if missing:
            raise ValueError(f"missing required field(s) {', '.join(missing)}")
        rope = dict(c.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or c.get("rope_theta", 10000.0)
        scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        window = c.get("sliding_window")   # Qwen2 configs set a window size but switch it off
        if mt in ("llama", "internlm2") or mt == "qwen2" and not c.get("use_sliding_window", False):
            window = None
        used = {*CONFIG_TYPES, "architectures", "torch_dtype", "dtype", "transformers_version", *LOADER_KEYS}
        return cls(
            vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads") or 0,
            head_dim=c.get("head_dim") or 0, intermediate_size=c["intermediate_size"],
            norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=c.get("max_position_embeddings", 4096),
            qkv_bias=(mt == "qwen2") or bool(c.get("attention_bias", False)),
            o_bias=bool(c.get("attention_bias", False)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            sliding_window=window, model_type=mt,
            bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
            extra={k: v for k, v in c.items() if k not in used})

    def to_hf_config(self, dtype: torch.dtype = torch.float32) -> dict:
        """A classic-keys hub config; InternLM2 as Llama, which transformers loads without remote code."""
        mt = "llama" if self.model_type == "internlm2" else self.model_type
        c = {**{k: v for k, v in self.extra.items() if not k.startswith("_")},
             "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                "qwen2": "Qwen2ForCausalLM"}[mt]],
             "model_type": mt, "vocab_size": self.vocab_size, "hidden_size": self.dim,
             "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
             "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
             "intermediate_size": self.intermediate_size, "rms_norm_eps": self.norm_eps,
             "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
             "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
             "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "hidden_act": "silu",
             "torch_dtype": str(dtype).removeprefix("torch.")}
        c.update({"llama": {"attention_bias": self.qkv_bias or self.o_bias},
                  "mistral": {"sliding_window": self.sliding_window},
                  "qwen2": {"use_sliding_window": False}}[mt])
        return c

    def to_generation_config(self, stop_ids=()) -> dict:
        """The source folder's generation_config.json (its sampling defaults kept), else one from BOS and
        EOS, as transformers makes it; eos_token_id gains `stop_ids`. Given tok.stop_ids (with tok.end_id,
        which training appends), HF generate and vLLM stop where the model learned to."""
        g = dict(self.generation or {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id})
        eos = g.get("eos_token_id", self.eos_token_id)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        g["eos_token_id"] = eos + [i for i in dict.fromkeys(stop_ids) if i not in eos]
        return g


# config.json keys that say how to load the model, not what it is: dropped on load. InternLM2's
# "attn_implementation": "eager" (or use_flash_attention_2) would pin the export's attention; auto_map
# names remote code the export (as Llama) does not need; quantization_config describes no weights of ours.
LOADER_KEYS = ("auto_map", "attn_implementation", "use_flash_attention_2", "quantization_config")


# The JSON type of each config.json field we read (null: the default; not for required fields).
# Checked up front: a string where a number belongs would fail far from the file (n_heads % n_kv_heads).
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
CONFIG_TYPES = {**dict.fromkeys(REQUIRED, "a positive integer"),
                **dict.fromkeys(("num_key_value_heads", "head_dim", "max_position_embeddings",
                                 "sliding_window", "bos_token_id"), "an integer"),
                **dict.fromkeys(("rms_norm_eps", "rope_theta"), "a number"),
                **dict.fromkeys(("attention_bias", "bias", "tie_word_embeddings", "use_sliding_window"),
                                "true or false"),
                **dict.fromkeys(("rope_scaling", "rope_parameters"), "an object"),
                "model_type": "a string", "eos_token_id": "an integer or a list of integers"}
ROPE_TYPES = {**dict.fromkeys(("factor", "low_freq_factor", "high_freq_factor", "rope_theta"), "a number"),
              "original_max_position_embeddings": "an integer", "rope_type": "a string", "type": "a string"}


def _has_type(v, want):
    if v is None:
        return want not in ("a positive integer", "a string")
    is_int = isinstance(v, int) and not isinstance(v, bool)
    return {"a positive integer": is_int and v > 0, "an integer": is_int,
            "a number": is_int or isinstance(v, float), "true or false": isinstance(v, bool),
            "an object": isinstance(v, dict), "a string": isinstance(v, str),
            "an integer or a list of integers": is_int or (isinstance(v, list) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in v))}[want]


def _check_config_types(c):
    """ValueError naming the first field of config dict `c` whose value has the wrong JSON type."""
    if not isinstance(c, dict):
        raise ValueError(f"expected a JSON object, got {type(c).__name__}")
    fields = [(k, c[k], want) for k, want in CONFIG_TYPES.items() if k in c]
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(c.get(key), dict):
            fields += [(f"{key}.{k}", c[key][k], want) for k, want in ROPE_TYPES.items() if k in c[key]]
    for name, v, want in fields:
        if not _has_type(v, want):
            raise ValueError(f"field {name!r} is {json.dumps(v)}, expected {want}")


# RoPE: inv_freq_i = theta^(-2i/d); position p rotates the pair (x_i, x_{i+d/2}) by p * inv_freq_i,
# the "rotate half" layout of HF checkpoints, so q/k weights load without a permutation.
def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if s is None or s["rope_type"] == "dynamic":
        # dynamic NTK only changes frequencies past max_position_embeddings, which forward() refuses
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    if s["rope_type"] == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {s['rope_type']!r}; supported: default, linear, llama3, "
                     f"dynamic")


def rope_tables(positions, inv_freq, dtype):
    """cos, sin (B, T, 1, hd) for apply_rope at positions (B, T). The angles p * inv_freq are computed
    in fp32, as in the reference implementations, then cast. `sin` has its first half negated."""
    ang = positions[..., None].float() * inv_freq.float()             # (B, T, hd/2)
    emb = torch.cat((ang, ang), dim=-1)[:, :, None]                   # (B, T, 1, hd)
    sin1, sin2 = emb.sin().to(dtype).chunk(2, dim=-1)
    return emb.cos().to(dtype), torch.cat((-sin1, sin2), dim=-1)


def apply_rope(x, cos, sin):
    """x (B, T, heads, hd) * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1). As rope_tables
    negates sin's first half, that is roll(x, hd/2) * sin: 4 ops, not 6, which the decode step notices."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in fp32, cast back before the gain, as the reference
        # implementations do (on a CPU faster than F.rms_norm; fp32 skips two casts for decode).
        if x.dtype == torch.float32:
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache:
    """Keys and values, (B, n_kv_heads, max_len, head_dim) a layer; a row's t-th new token goes to slot
    `cache_pos + t` (the caller left-pads ragged rows and masks the padding). `rows`: the cache rows the
    input is (ascending; None: all), so rows go on in place as others finish, until compact()."""

    def __init__(self, k: list, v: list, rows: torch.Tensor | None = None):
        self.k, self.v, self.rows = k, v, rows

    @property
    def batch_size(self):
        return self.k[0].shape[0]

    @property
    def max_len(self):
        return self.k[0].shape[2]

    def update(self, layer, pos, k, v):
        """Write k, v (len(rows), nkv, T, hd) into slots pos..pos+T of `rows`; return every row's, (B, nkv,
        pos + T, hd). A (1,) tensor `pos` (the static step) returns every slot: no shape depends on it."""
        if torch.is_tensor(pos):
            self.k[layer].index_copy_(2, pos, k)
            self.v[layer].index_copy_(2, pos, v)
            return self.k[layer], self.v[layer]
        rows, T = slice(None) if self.rows is None else self.rows, k.shape[2]
        self.k[layer][rows, :, pos:pos + T] = k
        self.v[layer][rows, :, pos:pos + T] = v
        return self.k[layer][:, :, :pos + T], self.v[layer][:, :, :pos + T]

    def compact(self, keep: torch.Tensor) -> "KVCache":
        """The rows `keep` (ascending) moved to the front in place, a sixteenth of the batch at a time (no
        second cache in flight). Safe: keep[i] >= i, so no chunk reads a row an earlier chunk wrote."""
        n, step = len(keep), max(1, self.batch_size // 16)
        for t in self.k + self.v:
            for i in range(0, n, step):
                chunk = keep[i:i + step]
                t[i:i + len(chunk)] = t[chunk]
        return KVCache([k[:n] for k in self.k], [v[:n] for v in self.v])

    def spread(self, n: int, length: int):
        """Rows g*n hold a prefill of `length` slots; copy it into rows g*n+1 .. g*n+n-1 (one prompt's n
        samples), in place."""
        for t in self.k + self.v:
            groups = t.view(-1, n, *t.shape[1:])                   # (B/n, n, nkv, max_len, hd)
            groups[:, 1:, :, :length] = groups[:, :1, :, :length]


# SDPA's kernels for every call of ours. With a mask, recent torch on H100/H200 picks cuDNN, whose
# backward gives NaN in dQ when row length % 128 == 64 and a row's log-sum-exp is below -88.7 (pytorch
# issue 196678): Qwen2.5's "massive activation" heads make such rows, and packed DPO rows are masked.
# So masked calls run memory-efficient, causal ones flash (else memory-efficient: fp32, odd head sizes);
# FLASH is in the masked list for CPUs, whose flash takes a mask. Never cuDNN, nor math (a (T, S)
# matrix per head): a call that fits neither kernel fails loudly.
MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]
CAUSAL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def additive_mask(allowed, dtype):
    """(B, 1, T, S): 0 where `allowed` (B, T, S) is True, -inf elsewhere. SDPA makes this from a bool
    mask at every call, and its memory-efficient backward keeps a copy per layer (~1 GiB a micro-batch
    at 7B, 4 x 2048 tokens); made once, the layers share it. Rows are 8-aligned, else CUDA pads a copy
    at every call (preprocess_mask in torch's attention.cpp)."""
    B, T, S = allowed.shape
    bias = torch.empty(B, 1, T, -(-S // 8) * 8, dtype=dtype, device=allowed.device)[..., :S]
    return bias.fill_(float("-inf")).masked_fill_(allowed[:, None], 0.0)


def attend(q, k, v, mask=None, causal=False):
    """softmax(q k^T / sqrt(hd) + mask) v on the kernels above. q (B, nh, T, hd); k, v (B, nkv, S, hd);
    mask (B, 1, T, S): additive (additive_mask), bool (True: may attend), or None."""
    g = q.shape[1] // k.shape[1]
    if q.is_cuda and g > 1 and (mask is not None or q.dtype == torch.float32):
        # CUDA's memory-efficient kernel takes grouped-query heads only in recent torch (pytorch
        # PR 191085): repeat each kv head for its g query heads (Llama's repeat_kv)
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    with sdpa_kernel(MASKED_BACKENDS if mask is not None else CAUSAL_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.nh, self.nkv, self.hd = a.n_heads, a.n_kv_heads, a.head_dim
        # Rows [q heads | k heads | v heads], the hub's three stacked (hub_names; InternLM2: unpack_wqkv)
        self.wqkv = nn.Linear(a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=a.qkv_bias)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=a.o_bias)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, cache_pos=0):
        B, T, _ = x.shape
        # F.linear, not self.wqkv(x): nn.Module's call overhead is a tenth of a tiny model's
        # one-token decode step (the other projections do the same)
        qkv = F.linear(x, self.wqkv.weight, self.wqkv.bias).view(B, T, self.nh + 2 * self.nkv, self.hd)
        qk = apply_rope(qkv[:, :, :self.nh + self.nkv], cos, sin)      # q and k heads rotated together
        q = qk[:, :, :self.nh].transpose(1, 2)                          # (B, nh, T, hd)
        k = qk[:, :, self.nh:].transpose(1, 2)                          # (B, nkv, T, hd)
        v = qkv[:, :, self.nh + self.nkv:].transpose(1, 2)
        rows = cache.rows if cache is not None else None
        if cache is not None:
            k, v = cache.update(layer, cache_pos, k, v)                 # (Bc, nkv, S, hd): every cache row
        if rows is not None:   # the input is some cache rows: put its queries in those rows
            q = q.new_zeros(cache.batch_size, *q.shape[1:]).index_copy_(0, rows, q)
        if cache is not None and T == 1:
            y = self.decode_attention(q, k, v, mask)                    # (Bc, nkv, g, hd)
            y = (y if rows is None else y[rows]).view(B, 1, self.nh * self.hd)
        else:   # no mask: causal over the T new tokens
            y = attend(q, k, v, mask, causal=mask is None and T > 1)   # (Bc, nh, T, hd)
            y = (y if rows is None else y[rows]).transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return F.linear(y, self.wo.weight, self.wo.bias)

    def decode_attention(self, q, k, v, bias):
        """softmax(q k^T / sqrt(hd) + bias) v for one query a row, as transformers' eager attention (scores
        in the model's dtype, an fp32 softmax). Not SDPA: its CPU kernels cost more to set up for one query
        (~75 us against ~55 us at batch 16); a GPU reads the cache once either way. A kv head's g = nh / nkv
        query heads are its g queries (no repeat). bias (B, 1, 1, S) or None. Returns (B, nkv, g, hd)."""
        B, g = q.shape[0], self.nh // self.nkv
        s = (q.view(B, self.nkv, g, self.hd) * self.hd ** -0.5) @ k.transpose(-1, -2)   # (B, nkv, g, S)
        if bias is not None:
            s += bias
        p = torch.softmax(s, -1, dtype=torch.float32)
        return (p.to(v.dtype) if v.dtype != p.dtype else p) @ v     # (B, nkv, g, hd)


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(a.dim, 2 * a.intermediate_size, bias=False)   # rows [gate (w1) | up (w3)]
        self.w2 = nn.Linear(a.intermediate_size, a.dim, bias=False)        # down

    def forward(self, x):
        gate, up = F.linear(x, self.w13.weight).chunk(2, -1)          # F.linear: see Attention.forward
        return F.linear(F.silu(gate) * up, self.w2.weight)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.feed_forward = FeedForward(a)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, cache_pos=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, cache_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.checkpointing = False   # activation checkpointing per block (training only)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The (V, D) LM-head matrix (the embedding when tied): what the fused log-prob kernel takes."""
        return self.output.weight

    def rope_table(self, n, dtype=None):
        """cos, sin (n, 1, hd) for positions 0..n-1. A caller that keeps it passes table[positions] as
        forward's `rope`: one lookup instead of ~10 small ops each step."""
        pos = torch.arange(n, device=self.inv_freq.device)[None]
        return tuple(t[0] for t in rope_tables(pos, self.inv_freq, dtype or self.tok_embeddings.weight.dtype))

    def make_cache(self, batch_size, max_len, dtype=None, device=None) -> KVCache:
        a, p = self.args, self.tok_embeddings.weight
        shape = (batch_size, a.n_kv_heads, max_len, a.head_dim)
        mk = lambda: torch.zeros(shape, dtype=dtype or p.dtype, device=device or p.device)
        return KVCache([mk() for _ in self.layers], [mk() for _ in self.layers])

    def forward(self, input_ids, positions=None, mask=None, cache=None, cache_pos=0, return_hidden=False,
                rope=None):
        """input_ids (B, T); positions (B, T), default arange(T) + cache_pos. mask (B, T, S) bool, True
        where a query may attend a key; S = T without a cache, cache_pos + T with one; default causal.
        With cache.rows set, the input is those rows and the mask covers every cache row. A (1,) tensor
        cache_pos (the sampler's static step, one token a row): the mask covers every slot. rope: (cos,
        sin) for `positions`. Returns logits (B, T, V), or the normed hidden states (return_hidden)."""
        B, T = input_ids.shape
        dev = input_ids.device
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + T, device=dev).expand(B, T)
        a = self.args
        # Length checks with no host sync (a training forward of Mistral v0.1 or Llama 3.1 would wait on
        # one per micro-batch): keys are slots, so the slot count bounds how far back a query looks.
        slots = T if cache is None else cache.max_len if torch.is_tensor(cache_pos) else cache_pos + T
        if a.sliding_window is not None and slots > a.sliding_window:
            raise ValueError(f"a row of {slots} tokens is longer than this model's sliding window "
                             f"({a.sliding_window}); sliding-window attention is not implemented, so rows "
                             f"must fit in the window (scdpo.py: a packed row is prompt + chosen + "
                             f"rejected; --no-packed or a lower --max-len shortens it)")
        if a.rope_scaling is not None and a.rope_scaling["rope_type"] == "dynamic":
            # its scale depends on the largest position; with a cache a position never passes its slot
            longest = slots if cache is not None else max(T, int(positions.max()) + 1)
            if longest > a.max_seq_len:
                raise ValueError(f"dynamic RoPE scaling past max_position_embeddings ({a.max_seq_len}) is "
                                 f"not supported")
        if mask is None and cache is not None and T > 1:
            # causal in slot space: the query in slot cache_pos + i sees slots <= cache_pos + i
            # (a single new token sees every slot, so the decode step needs no mask)
            slots = torch.arange(cache_pos + T, device=dev)
            mask = (slots[None, :] <= (cache_pos + torch.arange(T, device=dev))[:, None]).expand(
                cache.batch_size, T, -1)
        x = self.tok_embeddings(input_ids)
        if mask is not None:
            mask = additive_mask(mask, x.dtype)                          # (B, 1, T, S), once for all layers
        cos, sin = rope if rope is not None else rope_tables(positions, self.inv_freq, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, cache_pos)
        x = self.norm(x)
        return x if return_hidden else self.output(x)

    # Checkpoints in the hub's format: hub names to ours ({} is the layer index), with the rows a hub
    # tensor fills in our fused wqkv / w13 ("q", "k", "v", "gate", "up").
    HF_NAMES = {
        "model.embed_tokens.weight": ("tok_embeddings.weight", None),
        "model.layers.{}.self_attn.q_proj.weight": ("layers.{}.attention.wqkv.weight", "q"),
        "model.layers.{}.self_attn.k_proj.weight": ("layers.{}.attention.wqkv.weight", "k"),
        "model.layers.{}.self_attn.v_proj.weight": ("layers.{}.attention.wqkv.weight", "v"),
        "model.layers.{}.self_attn.q_proj.bias": ("layers.{}.attention.wqkv.bias", "q"),
        "model.layers.{}.self_attn.k_proj.bias": ("layers.{}.attention.wqkv.bias", "k"),
        "model.layers.{}.self_attn.v_proj.bias": ("layers.{}.attention.wqkv.bias", "v"),
        "model.layers.{}.self_attn.o_proj.weight": ("layers.{}.attention.wo.weight", None),
        "model.layers.{}.self_attn.o_proj.bias": ("layers.{}.attention.wo.bias", None),
        "model.layers.{}.mlp.gate_proj.weight": ("layers.{}.feed_forward.w13.weight", "gate"),
        "model.layers.{}.mlp.up_proj.weight": ("layers.{}.feed_forward.w13.weight", "up"),
        "model.layers.{}.mlp.down_proj.weight": ("layers.{}.feed_forward.w2.weight", None),
        "model.layers.{}.input_layernorm.weight": ("layers.{}.attention_norm.weight", None),
        "model.layers.{}.post_attention_layernorm.weight": ("layers.{}.ffn_norm.weight", None),
        "model.norm.weight": ("norm.weight", None),
        "lm_head.weight": ("output.weight", None),
    }
    # InternLM2 names its tensors after the Llama paper.
    INTERNLM2_NAMES = {
        "model.tok_embeddings.weight": ("tok_embeddings.weight", None),
        # q, k, v packed its own way: unpack_wqkv
        "model.layers.{}.attention.wqkv.weight": ("layers.{}.attention.wqkv.weight", "internlm2"),
        "model.layers.{}.attention.wo.weight": ("layers.{}.attention.wo.weight", None),
        "model.layers.{}.feed_forward.w1.weight": ("layers.{}.feed_forward.w13.weight", "gate"),
        "model.layers.{}.feed_forward.w3.weight": ("layers.{}.feed_forward.w13.weight", "up"),
        "model.layers.{}.feed_forward.w2.weight": ("layers.{}.feed_forward.w2.weight", None),
        "model.layers.{}.attention_norm.weight": ("layers.{}.attention_norm.weight", None),
        "model.layers.{}.ffn_norm.weight": ("layers.{}.ffn_norm.weight", None),
        "model.norm.weight": ("norm.weight", None),
        "output.weight": ("output.weight", None),
    }

    def hub_names(self, internlm2=False) -> dict:
        """{hub tensor name: (our parameter, part)} for every tensor of this model's checkpoint (biases only
        where the model has them; no lm_head when it is tied to the embedding)."""
        params = dict(self.named_parameters())   # a tied head appears once, as tok_embeddings.weight
        every = {hub.format(i): (ours.format(i), part)
                 for hub, (ours, part) in (self.INTERNLM2_NAMES if internlm2 else self.HF_NAMES).items()
                 for i in (range(self.args.n_layers) if "{}" in hub else [0])}
        return {hub: v for hub, v in every.items() if v[0] in params}

    def rows(self, part):
        """The rows of a fused parameter that a hub tensor `part` fills (None: the whole parameter)."""
        a = self.args
        q, kv, ff = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.intermediate_size
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv),
                "gate": slice(0, ff), "up": slice(ff, 2 * ff)}.get(part, slice(None))

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Transformer":
        """A hub folder's model: built on the meta device, allocated in `dtype` on `device`, then filled
        tensor by tensor (load_weights), so peak memory is the model plus its largest tensor."""
        cfg, args = read_config(path)
        if dtype is None:
            dtype = getattr(torch, cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
        with torch.device("meta"):
            model = cls(args)
        model = model.to(dtype).to_empty(device=torch.device(device or "cpu"))
        if args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight   # to_empty unties shared parameters
        load_weights(model, path)
        return model

    def save_pretrained(self, path, max_shard_size: int = 5 * 2**30, stop_ids=()):
        """config.json, generation_config.json (pass tok.stop_ids) and safetensors shards that transformers
        loads, written to `path`.tmp, then renamed: a crash never leaves half a checkpoint. A full disk
        raises DiskFull naming `path`, the partial files removed."""
        params = dict(self.named_parameters())
        state = {hub: params[ours].detach()[self.rows(part)]
                 for hub, (ours, part) in self.hub_names().items()}
        dtype = self.tok_embeddings.weight.dtype
        tmp = str(path).rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._write_pretrained(tmp, state, dtype, max_shard_size, stop_ids)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e):
                raise DiskFull(f"disk full at {path}: {e}") from e
            raise
        if os.path.isdir(path):   # keep files others put there (tokenizer), replace ours
            for fname in os.listdir(path):
                if fname.endswith(".safetensors") or fname in ("config.json", "generation_config.json",
                                                               "model.safetensors.index.json"):
                    os.remove(os.path.join(path, fname))
            for fname in os.listdir(tmp):
                os.replace(os.path.join(tmp, fname), os.path.join(path, fname))
            os.rmdir(tmp)
        else:
            os.replace(tmp, path)

    def _write_pretrained(self, tmp, state, dtype, max_shard_size, stop_ids):
        from safetensors.torch import save_file
        os.makedirs(tmp)
        shards, cur, size = [], {}, 0
        for hf, t in state.items():
            n = t.numel() * t.element_size()
            if cur and size + n > max_shard_size:
                shards.append(cur)
                cur, size = {}, 0
            cur[hf], size = t.to("cpu").contiguous(), size + n
        shards.append(cur)
        meta = {"config.json": self.args.to_hf_config(dtype),
                "generation_config.json": self.args.to_generation_config(stop_ids)}
        weight_map, many = {}, len(shards) > 1
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if many else "model.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        if many:
            total = sum(t.numel() * t.element_size() for t in state.values())
            meta["model.safetensors.index.json"] = {"metadata": {"total_size": total},
                                                    "weight_map": weight_map}
        for fname, obj in meta.items():
            with open(os.path.join(tmp, fname), "w") as f:
                json.dump(obj, f, indent=2)
        # safetensors makes its files 0600 whatever the umask; give them open()'s mode (0644 under
        # the usual umask), so that others on a shared cluster can read the model
        mask = os.umask(0)
        os.umask(mask)
        for fname in os.listdir(tmp):
            os.chmod(os.path.join(tmp, fname), 0o666 & ~mask)


# Each writer reports a write out of room its own way: OSError ENOSPC or EDQUOT; EFBIG past a file
# size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ); "(os error 28)" (or 27, 122) from safetensors;
# "unexpected pos" from torch's zip writer (torch.save, torch.distributed.checkpoint), errno lost.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
FULL_TEXTS = ("No space left", "Disk quota", "File too large", "unexpected pos", "os error 28", "os error 27",
              "os error 122")


class DiskFull(OSError):
    """A save ran out of room (a full disk, a quota, a file size limit); the message names the path."""


def is_disk_full(e):
    """Whether exception `e` (or one it was raised from) is a write that ran out of room."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS or any(t in str(e) for t in FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def read_config(path):
    """(config.json as a dict, its ModelArgs) of a hub folder; every error names the file."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: not found (a hub checkpoint folder has config.json)")
    cfg = read_json(cfg_path)
    try:
        args = ModelArgs.from_hf_config(cfg)
        rope_inv_freq(args)   # an unsupported rope_scaling fails here, not at the first forward
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        args.generation = read_json(gen_path)
        try:
            _check_config_types(args.generation)   # its bos / eos ids, as config.json's
        except ValueError as e:
            raise ValueError(f"{gen_path}: {e}") from None
    return cfg, args


def _held_rows(p):
    """(the part of parameter p held here, its first row's index). FSDP2 cuts dim 0 into chunks of
    ceil(rows / world), as torch.chunk does; checked on the local shard, so other layouts fail here."""
    if not isinstance(p, DTensor):
        return p.data, 0
    local, mesh = p.to_local().detach(), p.device_mesh   # detached: written in place
    chunk = -(-p.shape[0] // mesh.size())
    first = min(mesh.get_local_rank() * chunk, p.shape[0])
    if p.placements != (Shard(0),) or local.shape[0] != min(chunk, p.shape[0] - first):
        raise ValueError(f"parameter sharded as {p.placements} with local shape {tuple(local.shape)}: "
                         f"load_weights expects FSDP2's Shard(0) chunks")
    return local, first


@torch.no_grad()
def load_weights(model, path):
    """Fill `model`'s parameters in place from hub folder `path`, and set its RoPE buffer. A DTensor
    parameter sharded by fully_shard (scdpo.load_sharded) reads only the rows it holds, straight into
    its shard: a process holds its shards plus one tensor's rows in flight. Errors name the file and
    every mismatched, missing and unexpected tensor."""
    args = model.args
    model.inv_freq = rope_inv_freq(args).to(model.inv_freq.device)   # non-persistent: not in the files
    params = dict(model.named_parameters())
    held = {name: _held_rows(p) for name, p in params.items()}
    names = model.hub_names(internlm2=args.model_type == "internlm2")
    seen, unexpected, mismatched = set(), [], []
    for file in _safetensors_files(path):
        for name, (file_dtype, shape, start, end) in _safetensors_header(file).items():
            tied_copy = name in ("lm_head.weight", "output.weight") and args.tie_embeddings
            if name.endswith("rotary_emb.inv_freq") or tied_copy:
                continue   # a buffer some old conversions saved (recomputed), a tied head's copy
            if name not in names:
                unexpected.append(name)
                continue
            ours, part = names[name]
            whole = params[ours].shape
            r0, r1, _ = model.rows(part).indices(whole[0])               # this tensor's rows of ours
            if tuple(shape) != (r1 - r0, *whole[1:]):
                mismatched.append(f"{name}: checkpoint {tuple(shape)} vs model {(r1 - r0, *whole[1:])}")
                continue
            seen.add(name)
            dst, first = held[ours]
            a, b = max(r0, first), min(r1, first + dst.shape[0])          # the rows of it held here
            if a >= b:
                continue
            if part == "internlm2":   # q, k, v interleaved per kv group: unpacked whole, then cut
                t = torch.cat(unpack_wqkv(_read_tensor(file, file_dtype, shape, start, end), args))
                dst[a - first:b - first].copy_(t[a - r0:b - r0])
            else:   # rows of a row-major tensor are contiguous bytes
                row = (end - start) // shape[0]
                _read_tensor(file, file_dtype, (b - a, *shape[1:]), start + (a - r0) * row,
                             start + (b - r0) * row, out=dst[a - first:b - first])
    found = (("shape mismatch", "; ", mismatched), ("missing tensors", ", ", sorted(set(names) - seen)),
             ("unexpected tensors", ", ", unexpected))
    problems = [f"{what}: {sep.join(items)}" for what, sep, items in found if items]
    if problems:
        raise ValueError(f"{path}: checkpoint does not match the config ({args.model_type}): "
                         + " | ".join(problems))


def unpack_wqkv(w: torch.Tensor, a: ModelArgs):
    """(wq, wk, wv) from InternLM2's `wqkv`, whose rows group as its modelling code views the output,
    (..., n_kv_heads, n_rep + 2, head_dim): per kv group, n_rep query heads, a key head, a value head."""
    n_rep = a.n_heads // a.n_kv_heads
    g = w.view(a.n_kv_heads, n_rep + 2, a.head_dim, a.dim)
    return tuple(part.reshape(-1, a.dim) for part in (g[:, :n_rep], g[:, n_rep], g[:, n_rep + 1]))


# safetensors: 8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
# then the raw bytes. Reading it ourselves lets each tensor go straight into its parameter's memory.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_files(path) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, n) for n in names]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f}: shard named in model.safetensors.index.json is missing")
        return files
    if os.path.isfile(single):
        return [single]
    hint = " (PyTorch .bin weights: convert them to safetensors first)" if any(
        n.endswith(".bin") for n in os.listdir(path)) else ""
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def _safetensors_header(file) -> dict:
    """{name: (dtype, shape, start, end)}, byte offsets from the file's start, checked against the file's
    size, so that a truncated or corrupt file fails here, naming the tensor, instead of loading garbage."""
    size = os.path.getsize(file)
    with open(file, "rb", buffering=0) as f:   # unbuffered: exactly the bytes asked for
        n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else None
        if n is None or n > size - 8:
            raise ValueError(f"{file}: truncated or not safetensors: {size} bytes, header length {n}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{file}: safetensors header is not valid JSON: {e}") from None
    base = 8 + n
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        if h["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {name} has unsupported dtype {h['dtype']}")
        s, e = h["data_offsets"]
        need = math.prod(h["shape"]) * _ST_DTYPES[h["dtype"]].itemsize
        if e - s != need:
            raise ValueError(f"{file}: tensor {name} has data_offsets spanning {e - s} bytes, but its shape "
                             f"{h['shape']} in {h['dtype']} needs {need} bytes")
        if s < 0 or base + e > size:
            raise ValueError(f"{file}: tensor {name} needs bytes {base + s}..{base + e} but the file has "
                             f"only {size} bytes (truncated?)")
        out[name] = (_ST_DTYPES[h["dtype"]], h["shape"], base + s, base + e)
    return out


def _read_tensor(file, dtype, shape, start, end, out=None) -> torch.Tensor:
    """One tensor, in `out` if given (read straight into it if a contiguous CPU tensor of `dtype`)."""
    direct = out is not None and out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
    buf = out if direct else torch.empty(shape, dtype=dtype)
    view, got = memoryview(buf.view(-1).view(torch.uint8).numpy()) if buf.numel() else b"", 0
    with open(file, "rb", buffering=0) as f:
        f.seek(start)
        while got < end - start:   # one read() returns at most ~2 GiB
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{file}: could not read bytes {start}..{end} (file truncated?)")
            got += n
    if out is not None and not direct:
        out.copy_(buf)
        return out
    return buf


def check_folder(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder (a model is a hub-format folder: config.json, "
                                f"*.safetensors, tokenizer.json)")


def load(path, dtype=None, device=None):
    """The model and its tokenizer from one hub folder, checked against each other. The tokenizer first:
    a folder without a usable one fails in a second, not after minutes of reading weights."""
    check_folder(path)
    tok = Tokenizer.from_pretrained(path)
    model = Transformer.from_pretrained(path, dtype=dtype, device=device)
    if tok.vocab_size > model.args.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model's embedding has only "
                         f"{model.args.vocab_size} rows")
    return model, tok


# Runtime: every script's distributed set-up (nanochat's compute_init / print0). Without torchrun, a
# process group of one (an in-memory store, no port): one process runs an 8-GPU job's code.

# How long a rank waits in a collective before the job is aborted. NCCL's 10 minutes suit training
# steps; here ranks also wait while rank 0 writes a 7B-20B checkpoint, and at the end of evaluation
# (sampling, whose ranks end hours apart, waits through files: sample._wait_for_ranks). It only bounds
# a hang: a failing rank ends the job at once. SCDPO_TIMEOUT (seconds) overrides it.
TIMEOUT_S = 2 * 3600


def compute_init():
    """(rank, world_size, local_rank, device); gloo on the CPU, nccl on GPUs. Idempotent, so in-process
    callers (the miniature, the tests) may train repeatedly."""
    cuda, local = torch.cuda.is_available(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        raw = os.environ.get("SCDPO_TIMEOUT", str(TIMEOUT_S))
        try:
            timeout = timedelta(seconds=float(raw))
        except ValueError:
            raise ValueError(f"SCDPO_TIMEOUT={raw!r}: expected a number of seconds, e.g. 7200") from None
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if cuda else None, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), local, device


def compute_cleanup():
    """Every script's end: the ranks meet, then leave the group. Without it a rank sometimes aborted at
    exit after a 2-process gloo run ("terminate called without an active exception"), likely on gloo work
    objects FSDP holds freed at shutdown (pytorch PR 179291): so unreferenced models are collected first."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def print0(*a, **k):
    """print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


# Errors a user can fix (bad input, a missing path, a full disk, GPU memory) print one "error: ..."
# line, not torch's traceback with each line prefixed "[rank0]:" (SCDPO_TRACEBACK=1 keeps it).
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, torch.OutOfMemoryError)


def run_main(main, argv=None, oom=None):
    """A script's entry point: main(argv), an expected error printed on stderr with exit status 1.
    `oom`: the flags that lower the script's memory, said after torch's out-of-memory message."""
    try:
        main(argv)
    except EXPECTED_ERRORS as e:
        if os.environ.get("SCDPO_TRACEBACK") == "1":
            raise
        many = dist.is_initialized() and dist.get_world_size() > 1
        hint = f"\n{oom}" if oom and isinstance(e, torch.OutOfMemoryError) else ""
        print(f"{f'[rank {dist.get_rank()}] ' if many else ''}error: {e}{hint}", file=sys.stderr, flush=True)
        sys.exit(1)


def gather_rows(rows):
    """Every rank's list of rows, concatenated on every rank (order: by rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return rows
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]
