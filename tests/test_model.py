# python -m pytest -q tests/test_model.py
# model.Transformer against transformers' own models (the reference), on tiny random checkpoints
# written as the hub writes them: Llama 3 (llama3 RoPE scaling, GQA), Mistral (sliding_window),
# Qwen2 (qkv bias, tied embeddings, sharded, the newer `rope_parameters` config form; once more with the
# classic keys), an explicit head_dim, and InternLM2 (packed wqkv) built from the Llama one.
import copy
import json
import os
import re
import shutil
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data
import sample
import scdpo
from conftest import DATA, HostReads
from model import Transformer, load
from test_tokenizer import CHATML_TEMPLATE, _bpe_dir

import transformers  # the reference (tests/requirements.txt)

V, T = 1000, 20

CONFIGS = {
    # Llama 3.1: theta 500000 and llama3 scaling; with head_dim 16 the frequency bands fall in all three
    # regions of the llama3 ramp (kept, smoothed, slowed).
    "llama3": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=131072,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=4096, rope_theta=10000.0)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
    "head_dim": ("LlamaConfig", dict(num_key_value_heads=4, head_dim=32, rope_theta=10000.0)),
    # the Llama model that the InternLM2 checkpoint is packed from: InternLM2-20B's theta, GQA
    "llama_for_internlm2": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=1000000.0)),
}
CLASSIC = {"llama3", "mistral", "head_dim", "llama_for_internlm2"}   # config.json rewritten with rope_theta/rope_scaling
SHARDED = {"qwen2"}


def _randomize(model, seed):
    # transformers initialises with std 0.02 and unit norms, which leaves attention nearly uniform and
    # the norm gains untested; larger random weights make every part of the network show in the logits.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def _to_classic(path):
    """transformers 5 writes `rope_parameters`; hub checkpoints carry `rope_theta` and `rope_scaling`."""
    file = os.path.join(path, "config.json")
    cfg = json.load(open(file))
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    json.dump(cfg, open(file, "w"), indent=2)


def pack_wqkv(wq, wk, wv, n_kv_heads, head_dim):
    """InternLM2's attention (modeling_internlm2.py) reads its packed projection as
        qkv = self.wqkv(x)                                              # (b, q, n_kv * (n_rep + 2) * hd)
        qkv = rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + n_rep, d=hd)
        q = rearrange(qkv[..., :n_rep, :], "b q h gs d -> b q (h gs) d")  # query head h*n_rep + r
        k = qkv[..., -2, :];  v = qkv[..., -1, :]                        # kv head h
    so wqkv's rows are, kv group by kv group: that group's n_rep query heads, its key head, its value
    head. Query head h*n_rep + r uses kv head h, as in Llama's repeat_kv, so Llama's heads map 1:1."""
    dim = wq.shape[1]
    q = wq.reshape(n_kv_heads, -1, head_dim, dim)    # (n_kv, n_rep, hd, dim)
    k = wk.reshape(n_kv_heads, 1, head_dim, dim)
    v = wv.reshape(n_kv_heads, 1, head_dim, dim)
    return torch.cat([q, k, v], dim=1).reshape(-1, dim)


def _write_internlm2(llama_dir, hf_cfg, out):
    """The Llama checkpoint, renamed and packed as an InternLM2 checkpoint, with InternLM2's config.json."""
    sd = load_file(os.path.join(llama_dir, "model.safetensors"))
    n_kv, hd = hf_cfg.num_key_value_heads, hf_cfg.hidden_size // hf_cfg.num_attention_heads
    new = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(hf_cfg.num_hidden_layers):
        a, b = f"model.layers.{i}.", f"model.layers.{i}."
        new[b + "attention.wqkv.weight"] = pack_wqkv(sd[a + "self_attn.q_proj.weight"], sd[a + "self_attn.k_proj.weight"],
                                                     sd[a + "self_attn.v_proj.weight"], n_kv, hd)
        new[b + "attention.wo.weight"] = sd[a + "self_attn.o_proj.weight"]
        new[b + "feed_forward.w1.weight"] = sd[a + "mlp.gate_proj.weight"]
        new[b + "feed_forward.w3.weight"] = sd[a + "mlp.up_proj.weight"]
        new[b + "feed_forward.w2.weight"] = sd[a + "mlp.down_proj.weight"]
        new[b + "attention_norm.weight"] = sd[a + "input_layernorm.weight"]
        new[b + "ffn_norm.weight"] = sd[a + "post_attention_layernorm.weight"]
    os.makedirs(out)
    save_file(new, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
           "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
           "vocab_size": hf_cfg.vocab_size, "hidden_size": hf_cfg.hidden_size,
           "intermediate_size": hf_cfg.intermediate_size, "num_hidden_layers": hf_cfg.num_hidden_layers,
           "num_attention_heads": hf_cfg.num_attention_heads, "num_key_value_heads": n_kv, "hidden_act": "silu",
           "max_position_embeddings": 32768, "rms_norm_eps": hf_cfg.rms_norm_eps, "rope_theta": 1000000,
           # InternLM2-20B's scaling; dynamic NTK changes nothing below max_position_embeddings
           "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32", "attn_implementation": "eager"}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{kind: (folder, transformers model in float32)}; "internlm2" pairs with the Llama model it came from."""
    root, out = tmp_path_factory.mktemp("ckpts"), {}
    for seed, (kind, (cls, kw)) in enumerate(CONFIGS.items()):
        cfg = getattr(transformers, cls)(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **kw)
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        _randomize(hf, seed)
        hf.eval()
        path = str(root / kind)
        hf.save_pretrained(path, max_shard_size="100KB" if kind in SHARDED else "5GB")
        if kind in CLASSIC:
            _to_classic(path)
        out[kind] = (path, hf)
    path, hf = out["llama_for_internlm2"]
    _write_internlm2(path, hf.config, str(root / "internlm2"))
    out["internlm2"] = (str(root / "internlm2"), hf)
    return out


def _ids(seed=0, B=2, n=T):
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _hf_logits(hf, ids, **kw):
    with torch.no_grad():
        return hf(ids, **kw).logits


FAMILIES = ["llama3", "mistral", "qwen2", "head_dim", "internlm2"]


def test_checkpoints_are_written_as_the_hub_writes_them(ckpts):
    cfg = json.load(open(os.path.join(ckpts["llama3"][0], "config.json")))
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" not in cfg
    assert "rope_parameters" in json.load(open(os.path.join(ckpts["qwen2"][0], "config.json")))
    assert os.path.isfile(os.path.join(ckpts["qwen2"][0], "model.safetensors.index.json"))
    assert "wqkv" in str(load_file(os.path.join(ckpts["internlm2"][0], "model.safetensors")).keys())


@pytest.mark.parametrize("kind", FAMILIES)
def test_float32_logits_match_transformers(ckpts, kind):
    path, hf = ckpts[kind]
    model = Transformer.from_pretrained(path)
    assert model.tok_embeddings.weight.dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    assert ours.shape == (2, T, V)
    assert _rel(ours, _hf_logits(hf, ids)) < 1e-5
    if kind == "qwen2":
        assert model.output.weight is model.tok_embeddings.weight


def test_qwen2_with_classic_config_keys(ckpts, tmp_path):
    # hub Qwen2 configs carry top-level rope_theta / rope_scaling, not the fixture's rope_parameters
    path = shutil.copytree(ckpts["qwen2"][0], tmp_path / "qwen2")
    _to_classic(path)
    model = Transformer.from_pretrained(path)
    assert model.args.rope_theta == 1000000.0
    ids = _ids()
    with torch.no_grad():
        assert _rel(model(ids), _hf_logits(ckpts["qwen2"][1], ids)) < 1e-5


def test_llama3_rope_scaling_at_large_positions(ckpts):
    # At positions 0..19 the slowed low frequencies barely turn; far out they dominate.
    path, hf = ckpts["llama3"]
    model = Transformer.from_pretrained(path)
    ids = _ids(1)
    pos = torch.arange(T).expand(2, T) + torch.tensor([[3000], [70000]])
    with torch.no_grad():
        assert _rel(model(ids, positions=pos), _hf_logits(hf, ids, position_ids=pos)) < 1e-5


def test_final_hidden_states_match_transformers(ckpts):
    path, hf = ckpts["qwen2"]
    model = Transformer.from_pretrained(path)
    ids = _ids(2)
    with torch.no_grad():
        h = model(ids, return_hidden=True)
        ref = hf.model(ids).last_hidden_state   # after the final norm, before the LM head
    assert h.shape == (2, T, 64) and _rel(h, ref) < 1e-5
    assert _rel(h @ model.lm_head_weight.T, _hf_logits(hf, ids)) < 1e-5


@pytest.mark.parametrize("kind", FAMILIES)
def test_bfloat16_within_transformers_own_bfloat16_error(ckpts, kind):
    # Ground truth: transformers in float32. Ours in bf16 may be no further from it than transformers'
    # bf16 model is (times 1.5, plus a little), the ml-cross-entropy way of setting bf16 tolerances.
    path, hf = ckpts[kind]
    model = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    ids = _ids(3)
    truth = _hf_logits(hf, ids)
    hf_err = _rel(_hf_logits(copy.deepcopy(hf).to(torch.bfloat16), ids), truth)
    with torch.no_grad():
        ours_err = _rel(model(ids), truth)
    assert ours_err <= 1.5 * hf_err + 1e-3, (ours_err, hf_err)


def _ragged_decode(model, prompts, n_new, pad_id=0):
    """Greedy decoding of prompts of different lengths in one left-padded batch with the KV cache."""
    B, L = len(prompts), max(map(len, prompts))
    S = L + n_new
    ids = torch.full((B, L), pad_id)
    valid = torch.ones(B, S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        valid[b, :L - len(p)] = False
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)               # each row counts from its first real token
    allowed = torch.ones(S, S, dtype=torch.bool).tril()[None] & valid[:, None, :]   # (B, S, S)
    allowed |= torch.eye(S, dtype=torch.bool)                     # a pad query sees itself: no empty softmax row
    cache = model.make_cache(B, S)
    with torch.no_grad():
        logits = model(ids, positions=pos[:, :L], mask=allowed[:, :L, :L], cache=cache, cache_pos=0)[:, -1]
        toks, steps = [], []
        for t in range(n_new):
            toks.append(logits.argmax(-1))
            steps.append(logits)
            c = L + t
            if t < n_new - 1:
                logits = model(toks[-1][:, None], positions=pos[:, c:c + 1], mask=allowed[:, c:c + 1, :c + 1],
                               cache=cache, cache_pos=c)[:, -1]
    return torch.stack(toks, 1), torch.stack(steps, 1)


def _recompute(hf, prompt, n_new):
    """The reference: transformers, one row, no padding, the whole sequence recomputed at every step."""
    seq, steps = list(prompt), []
    for _ in range(n_new):
        logits = _hf_logits(hf, torch.tensor([seq]))[0, -1]
        steps.append(logits)
        seq.append(int(logits.argmax()))
    return seq[len(prompt):], torch.stack(steps)


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_kv_cached_ragged_decoding_equals_full_recompute(ckpts, kind):
    path, hf = ckpts[kind]
    model = Transformer.from_pretrained(path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (3, 11, 7)]
    toks, steps = _ragged_decode(model, prompts, n_new=8)
    for b, p in enumerate(prompts):
        ref_toks, ref_steps = _recompute(hf, p, 8)
        assert toks[b].tolist() == ref_toks
        assert _rel(steps[b], ref_steps) < 1e-5


def test_kv_cache_default_mask_equals_full_forward(ckpts):
    # Equal-length rows, no mask given: the cache's own causal mask.
    path, _ = ckpts["mistral"]
    model = Transformer.from_pretrained(path)
    ids = _ids(5, n=12)
    cache = model.make_cache(2, 12)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache, cache_pos=t) for t in range(5, 12)]
    assert _rel(torch.cat(parts, 1), full) < 1e-5


def test_cache_rows_decode_some_rows_in_place_then_compact(ckpts):
    # Three rows prefilled together; then only rows 0 and 2 take 3 tokens (KVCache.rows), only row 2 one
    # more, and after compacting the cache to row 2 alone, one more again. Each step's logits must equal a
    # full forward of that row's whole sequence (transformers-checked above), with row 1 left untouched.
    path, hf = ckpts["qwen2"]
    model = Transformer.from_pretrained(path)
    seqs = [_ids(10 + b, B=1, n=12)[0].tolist() for b in range(3)]
    cache = model.make_cache(3, 16)
    with torch.no_grad():
        model(torch.tensor([s[:6] for s in seqs]), cache=cache)
        cache.rows = torch.tensor([0, 2])
        out = model(torch.tensor([seqs[0][6:9], seqs[2][6:9]]), cache=cache, cache_pos=6)
        for b, o in zip((0, 2), out):
            assert _rel(o, _hf_logits(hf, torch.tensor([seqs[b][:9]]))[0, 6:]) < 1e-5
        cache.rows = torch.tensor([2])
        out = model(torch.tensor([seqs[2][9:10]]), positions=torch.tensor([[9]]), cache=cache, cache_pos=9)
        assert _rel(out[0], _hf_logits(hf, torch.tensor([seqs[2][:10]]))[0, 9:]) < 1e-5
        row2 = [t[2].clone() for t in cache.k + cache.v]
        cache = cache.compact(torch.tensor([2]))
        assert cache.batch_size == 1 and all(torch.equal(t[0], r) for t, r in zip(cache.k + cache.v, row2))
        out = model(torch.tensor([seqs[2][10:11]]), positions=torch.tensor([[10]]), cache=cache, cache_pos=10)
        assert _rel(out[0], _hf_logits(hf, torch.tensor([seqs[2][:11]]))[0, 10:]) < 1e-5


def test_packed_prompt_chosen_rejected_row(ckpts):
    # One row [prompt | chosen | rejected]: rejected sees the prompt but not chosen, its positions restart
    # after the prompt. Each half must equal transformers on [prompt | chosen] and [prompt | rejected].
    path, hf = ckpts["llama3"]
    model = Transformer.from_pretrained(path)
    P, C, R = _ids(6, B=1, n=6)[0], _ids(7, B=1, n=5)[0], _ids(8, B=1, n=4)[0]
    n = len(P) + len(C) + len(R)
    pos = torch.cat([torch.arange(len(P) + len(C)), torch.arange(len(P), len(P) + len(R))])[None]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    mask[len(P) + len(C):, len(P):len(P) + len(C)] = False
    with torch.no_grad():
        packed = model(torch.cat([P, C, R])[None], positions=pos, mask=mask[None])[0]
    ref_c = _hf_logits(hf, torch.cat([P, C])[None])[0]
    ref_r = _hf_logits(hf, torch.cat([P, R])[None])[0]
    assert _rel(packed[:len(P) + len(C)], ref_c) < 1e-5
    assert _rel(packed[len(P) + len(C):], ref_r[len(P):]) < 1e-5


def _packed_row(n_prompt=6, n_chosen=5, n_rejected=4):
    """(ids, positions, mask) of one packed row [prompt | chosen | rejected]; 15 tokens by default, so
    the mask's rows are not a multiple of 8 long."""
    n = n_prompt + n_chosen + n_rejected
    ids = _ids(6, B=1, n=n)
    pos = torch.cat([torch.arange(n_prompt + n_chosen), torch.arange(n_prompt, n_prompt + n_rejected)])[None]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    mask[n_prompt + n_chosen:, n_prompt:n_prompt + n_chosen] = False
    return ids, pos, mask[None]


def test_one_float_mask_for_every_layer_bit_identical_to_sdpa_own_bool_mask(ckpts, monkeypatch):
    # The reference: SDPA itself, handed the bool mask back, makes its own additive mask at every call.
    # Ours is made once: every layer gets the same float tensor, and logits and gradients are equal.
    sdpa, seen, as_bool = F.scaled_dot_product_attention, [], [False]

    def recorded(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        if as_bool[0] and attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask == 0
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    model = Transformer.from_pretrained(ckpts["llama3"][0])
    ids, pos, mask = _packed_row()
    runs = []
    for as_bool[0] in (False, True):
        model.zero_grad()
        logits = model(ids, positions=pos, mask=mask)
        logits.square().mean().backward()
        runs.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    ours = seen[:model.args.n_layers]
    assert all(m is ours[0] for m in ours) and ours[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_packed_backward_saves_one_mask_for_all_layers(ckpts):
    # SDPA's backward keeps the additive mask it was given; made from a bool mask at every call, that
    # was one (T, S) copy per layer (~1 GiB a micro-batch at 7B).
    model = Transformer.from_pretrained(ckpts["llama3"][0]).train()
    ids, pos, mask = _packed_row()
    n, saved = ids.shape[1], {}

    def pack(t):
        if t.dim() == 4 and tuple(t.shape[-2:]) == (n, n):
            saved[t.untyped_storage().data_ptr()] = t.dtype
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, positions=pos, mask=mask).square().mean()
    loss.backward()
    assert list(saved.values()) == [torch.float32], saved


def test_activation_checkpointing_same_gradients(ckpts):
    model = Transformer.from_pretrained(ckpts["head_dim"][0]).train()
    ids = _ids(9)
    grads = []
    for ckpt in (False, True):
        model.checkpointing = ckpt
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))


def test_every_attention_call_chooses_its_kernels_and_never_cudnn(ckpts, monkeypatch):
    # On H100/H200 SDPA prefers cuDNN for masked calls, whose backward can return NaN (model.MASKED_BACKENDS).
    # Record, for every SDPA call of a packed and an unpacked DPO forward + backward, a sampler prefill and a
    # cached forward, which kernels were enabled: masked calls memory-efficient, unmasked ones flash,
    # cuDNN and math never.
    calls, sdpa = [], F.scaled_dot_product_attention
    cuda = torch.backends.cuda

    def recorded(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is not None, cuda.cudnn_sdp_enabled(), cuda.math_sdp_enabled(),
                      cuda.mem_efficient_sdp_enabled(), cuda.flash_sdp_enabled()))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    model = Transformer.from_pretrained(ckpts["qwen2"][0])
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in
             [([5, 6, 7], [8, 9], [10, 11, 12]), ([5] * 9, [3], [4, 4])]]
    for packed in (True, False):
        batch = data.collate_pairs(pairs, packed=packed)
        scdpo.run_logprobs(scdpo.SeqLogprobs(model), batch, torch.device("cpu")).sum().backward()
    sample.generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], sample.Sampling(3), eos_id=[])
    with torch.no_grad():
        model(_ids(1), cache=model.make_cache(2, T))
    assert sum(m for m, *_ in calls) == 3 * model.args.n_layers     # packed, prefill, cached: masked
    assert sum(not m for m, *_ in calls) == model.args.n_layers     # unpacked: causal, no mask
    for masked, cudnn, math, efficient, flash in calls:
        assert not cudnn and not math and (efficient if masked else flash)
    assert cuda.cudnn_sdp_enabled() and cuda.math_sdp_enabled()     # the choice ends with the call


@pytest.mark.parametrize("kind", FAMILIES)
def test_save_pretrained_then_transformers_loads_the_same_model(ckpts, kind, tmp_path):
    model = Transformer.from_pretrained(ckpts[kind][0])
    model.save_pretrained(tmp_path / "out", max_shard_size=200_000)   # several shards + index
    assert os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = _ids(10)
    with torch.no_grad():
        assert _rel(_hf_logits(hf, ids), model(ids)) < 1e-5
    again = Transformer.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def _chatml_base(ckpts, tmp_path):
    """The Qwen2 checkpoint with a ChatML tokenizer as Qwen2.5-Math-7B's: EOS <|endoftext|> (in
    config.json too), the turns closed by <|im_end|>."""
    path = _copy(ckpts, "qwen2", tmp_path)
    _bpe_dir(path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos_token=None, eos_token="<|endoftext|>",
             chat_template=CHATML_TEMPLATE)
    _edit_config(path, bos_token_id=0, eos_token_id=0)
    return path


def test_export_keeps_the_generation_config_and_stops_at_the_end_of_turn(ckpts, tmp_path):
    path = _chatml_base(ckpts, tmp_path)
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "pad_token_id": 0, "eos_token_id": [7, 0], **sampling}))
    model, tok = load(path)
    end = tok.tok.token_to_id("<|im_end|>")
    assert tok.end_id == end and end not in (0, 7)   # what training puts after every answer
    out = tmp_path / "export"
    model.save_pretrained(out, stop_ids=tok.stop_ids)
    tok.save_pretrained(out)
    g = transformers.GenerationConfig.from_pretrained(str(out))
    assert g.eos_token_id == [7, 0, end] and (g.bos_token_id, g.pad_token_id) == (0, 0)
    assert {k: getattr(g, k) for k in sampling} == sampling
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.generation_config.eos_token_id == [7, 0, end]
    again, tok2 = load(out)   # exported once more: the same list
    again.save_pretrained(tmp_path / "again", stop_ids=tok2.stop_ids)
    assert transformers.GenerationConfig.from_pretrained(str(tmp_path / "again")).eos_token_id == [7, 0, end]


def test_export_without_a_source_generation_config_makes_one_from_the_config(ckpts, tmp_path):
    path = _chatml_base(ckpts, tmp_path)
    if os.path.exists(path / "generation_config.json"):   # transformers wrote one
        os.remove(path / "generation_config.json")
    model, tok = load(path)
    model.save_pretrained(tmp_path / "export", stop_ids=tok.stop_ids)
    g = transformers.GenerationConfig.from_pretrained(str(tmp_path / "export"))
    assert g.bos_token_id == 0 and g.eos_token_id == [0, tok.tok.token_to_id("<|im_end|>")]


def test_internlm2_export_drops_how_to_load_it(ckpts, tmp_path):
    # InternLM2's config.json says "attn_implementation": "eager"; kept, transformers would run the
    # exported Llama model with eager attention. Remote-code and quantization keys go too.
    path = _copy(ckpts, "internlm2", tmp_path)
    _edit_config(path, use_flash_attention_2=True, quantization_config={"quant_method": "fp8"})
    Transformer.from_pretrained(path).save_pretrained(tmp_path / "out")
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    gone = {"attn_implementation", "auto_map", "use_flash_attention_2", "quantization_config"}
    assert not gone & set(cfg) and cfg["pad_token_id"] == 2   # other keys are kept
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert hf.config._attn_implementation == "sdpa"


def test_load_reads_the_tokenizer_before_any_weights(ckpts, tmp_path):
    # A SentencePiece-only folder gets its tokenizer error at once, even with unreadable weights.
    path = _copy(ckpts, "llama3", tmp_path)
    (path / "model.safetensors").write_bytes(b"not safetensors")
    (path / "tokenizer.model").write_bytes(b"\x0a\x00")
    (path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has only a SentencePiece tokenizer.model"):
        load(path)


def test_mistral_longer_than_its_sliding_window_is_refused(ckpts, tmp_path):
    path = shutil.copytree(ckpts["mistral"][0], tmp_path / "m")
    cfg = json.load(open(path / "config.json"))
    json.dump({**cfg, "sliding_window": 8}, open(path / "config.json", "w"))
    model = Transformer.from_pretrained(path)
    with pytest.raises(ValueError, match="sliding window"):
        model(_ids(n=12))



@pytest.mark.parametrize("kind", ["mistral", "llama3"])
def test_a_packed_forward_reads_nothing_back_from_the_device(ckpts, kind):
    # Mistral v0.1's sliding window and Llama 3.1's RoPE scaling are checked against the length with
    # no host sync: a GPU would otherwise wait once per micro-batch of training
    model = Transformer.from_pretrained(ckpts[kind][0])
    pos = torch.cat([torch.arange(8), torch.arange(12)]).expand(2, T)      # two documents a row
    doc = (torch.arange(T) >= 8)
    mask = (doc[:, None] == doc[None, :]) & (pos[0][None, :] <= pos[0][:, None])
    with HostReads() as reads:
        model(_ids(), positions=pos, mask=mask.expand(2, T, T))
    assert reads.n == 0

# ---- bad input: each error says what is wrong and where --------------------------------------------
def _copy(ckpts, kind, tmp_path):
    return shutil.copytree(ckpts[kind][0], tmp_path / kind)


def _edit_config(path, **changes):
    cfg = json.load(open(path / "config.json"))
    json.dump({**cfg, **changes}, open(path / "config.json", "w"))


def test_missing_files(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        Transformer.from_pretrained(tmp_path)
    path = _copy(ckpts, "llama3", tmp_path)
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=f"{path}.*model.safetensors"):
        Transformer.from_pretrained(path)
    path = _copy(ckpts, "qwen2", tmp_path)
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
    os.remove(path / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        Transformer.from_pretrained(path)


def test_unknown_model_type_lists_the_supported_ones(ckpts, tmp_path):
    path = _copy(ckpts, "llama3", tmp_path)
    _edit_config(path, model_type="gpt2")
    with pytest.raises(ValueError, match="gpt2") as e:
        Transformer.from_pretrained(path)
    assert all(t in str(e.value) for t in ("llama", "mistral", "qwen2", "internlm2"))


def test_missing_and_unexpected_tensors_are_listed(ckpts, tmp_path):
    path = _copy(ckpts, "llama3", tmp_path)
    sd = load_file(path / "model.safetensors")
    del sd["model.norm.weight"], sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(path)
    msg = str(e.value)
    assert "missing" in msg and "norm.weight" in msg
    assert "layers.1.mlp.up_proj.weight" in msg or "layers.1.feed_forward.w3.weight" in msg
    assert "unexpected" in msg and "model.layers.0.mlp.extra_proj.weight" in msg


def test_shape_mismatch_names_the_tensor_and_both_shapes(ckpts, tmp_path):
    path = _copy(ckpts, "mistral", tmp_path)
    _edit_config(path, intermediate_size=96)
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(path)
    msg = str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and "(128, 64)" in msg and "(96, 64)" in msg


def test_tokenizer_larger_than_the_embedding(ckpts, tmp_path):
    path = _copy(ckpts, "llama3", tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):   # Mistral's tokenizer: 32000 tokens > 1000 rows
        shutil.copy(os.path.join(DATA, "tokenizers", "mistral-7b-v0.1", f), path)
    with pytest.raises(ValueError, match="32000.*1000"):
        load(path)


def test_internlm2_packed_shape_mismatch_names_the_tensor(ckpts, tmp_path):
    path = _copy(ckpts, "internlm2", tmp_path)
    _edit_config(path, num_key_value_heads=1)   # wqkv rows: (4 + 2*2) * 16 = 128 in the file, (4 + 2*1) * 16 = 96 expected
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(path)
    msg = str(e.value)
    assert "model.layers.0.attention.wqkv.weight" in msg and "(128, 64)" in msg and "(96, 64)" in msg


def test_bad_config_json_names_the_file_and_what_is_wrong(ckpts, tmp_path):
    path = _copy(ckpts, "llama3", tmp_path)
    cfg_path = re.escape(str(path / "config.json"))
    good = (path / "config.json").read_text()
    (path / "config.json").write_text(good[:-10])
    with pytest.raises(ValueError, match=f"{cfg_path}: not valid JSON.*line .* column"):
        Transformer.from_pretrained(path)
    cfg = json.loads(good)
    del cfg["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{cfg_path}: missing required field.*hidden_size"):
        Transformer.from_pretrained(path)
    (path / "config.json").write_text(good)
    _edit_config(path, num_key_value_heads=3)
    with pytest.raises(ValueError, match=rf"{cfg_path}: n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        Transformer.from_pretrained(path)
    _edit_config(path, num_key_value_heads=2, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=f"{cfg_path}: unsupported rope_scaling type 'yarn'.*llama3"):
        Transformer.from_pretrained(path)


def _rewrite_safetensors(file, edit):
    """Apply edit(header dict) to a safetensors file's JSON header, keeping its data bytes."""
    raw = open(file, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    open(file, "wb").write(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_truncated_or_corrupt_safetensors_names_the_file_and_tensor(ckpts, tmp_path):
    path = _copy(ckpts, "llama3", tmp_path)
    file = path / "model.safetensors"
    good, name = file.read_bytes(), re.escape(str(file))
    file.write_bytes(good[:-100])   # a download cut short
    with pytest.raises(ValueError, match=rf"{name}: tensor \S+ needs bytes \d+\.\.{len(good)} but the file "
                                         rf"has only {len(good) - 100} bytes"):
        Transformer.from_pretrained(path)
    file.write_bytes(good)
    _rewrite_safetensors(file, lambda h: h["model.norm.weight"].update(shape=[32]))
    with pytest.raises(ValueError, match=rf"{name}: tensor model.norm.weight .* 256 bytes.* needs 128 bytes"):
        Transformer.from_pretrained(path)
    file.write_bytes(good[:8] + b"X" + good[9:])   # the header's opening brace
    with pytest.raises(ValueError, match=f"{name}: safetensors header is not valid JSON.*line 1 column 1"):
        Transformer.from_pretrained(path)
