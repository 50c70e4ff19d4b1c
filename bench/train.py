"""Benchmark: one DPO training step of scdpo.py (FSDP2, fused log-probs, AdamW), with and without
shared-prompt packing and with precomputed vs live reference log-probs.

    python bench/train.py                                   # CPU: a small shape, step-controlled pairs
    python bench/train.py --device cuda                     # GPU: Qwen2.5-0.5B and -1.5B shapes, length 1024
    torchrun --standalone --nproc_per_node=8 bench/train.py --device cuda --shapes qwen2.5-1.5b

The models are random (no weights can be downloaded), in the real shapes: the cost of a step does not
depend on the values. The pairs are synthetic step-controlled pairs: a long shared prompt (question +
the first k steps) and two short continuations, the case packing is for. Unpacked, every pair is two
rows that both carry the prompt; packed, one row [prompt | chosen | rejected] carries it once.

Reported per configuration, for the fastest of --steps steps (the least disturbed one; the four
configurations' steps are interleaved): pairs/s (over all ranks: what decides training time), tokens/s per GPU
(tokens actually run through the model, so packing LOWERS it for the same pairs), and MFU on a GPU
(scdpo.step_flops over the GPU's bf16 peak; the live reference's extra forward is overhead, not counted).
"""
import argparse
import json
import os
import random
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data                                     # noqa: E402
import model as modeling                        # noqa: E402
import scdpo                                    # noqa: E402
from model import ModelArgs, Transformer, compute_init, print0   # noqa: E402

SHAPES = {   # the hub configs' sizes (Qwen2.5: tied embeddings, qkv bias, GQA)
    "qwen2.5-0.5b": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         intermediate_size=4864, qkv_bias=True, tie_embeddings=True, model_type="qwen2",
                         rope_theta=1e6, max_seq_len=32768),
    "qwen2.5-1.5b": dict(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                         intermediate_size=8960, qkv_bias=True, tie_embeddings=True, model_type="qwen2",
                         rope_theta=1e6, max_seq_len=32768),
    "cpu-small": dict(vocab_size=4096, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=1024,
                      model_type="llama", max_seq_len=2048),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
parser.add_argument("--shapes", default=None,
                    help="comma-separated SHAPES (default: cpu-small on cpu, both Qwen2.5 on cuda)")
parser.add_argument("--prompt-len", type=int, default=None,
                    help="shared prompt tokens (default 384 cpu, 768 cuda)")
parser.add_argument("--cont-len", type=int, default=None, help="mean continuation tokens (default 48 cpu, "
                    "256 cuda; length 1024 = prompt + continuation)")
parser.add_argument("--micro-batch", type=int, default=4, help="pairs per forward")
parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after one warm-up "
                    "step); the fastest counts")
parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
args = parser.parse_args()
cuda = args.device == "cuda"
shapes = (args.shapes or ("qwen2.5-0.5b,qwen2.5-1.5b" if cuda else "cpu-small")).split(",")
P = args.prompt_len or (768 if cuda else 384)
C = args.cont_len or (256 if cuda else 48)
MB = args.micro_batch
rank, world, _, device = compute_init()
train_args = scdpo.settings()                     # the script's loss defaults: sigmoid, beta 0.1


def synthetic_pairs(n, vocab, seed=0):
    """Tokenised step-controlled pairs: prompt P tokens, continuations of C +- C/4 tokens (<= 1024 - P)."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]
    cont = lambda: ids(min(rng.randint(C - C // 4, C + C // 4), 1024 - P))
    return [{"prompt": ids(P), "chosen": cont(), "rejected": cont(), "kind": "sc"} for _ in range(n)]


def random_sharded(margs, trainable=True, dtype=torch.float32):
    """SeqLogprobs of a random model, sharded, built as scdpo.load_sharded builds it (meta device, shard,
    materialise each rank's shards) with random values in place of the files'."""
    with torch.device("meta"):
        model = Transformer(margs).to(dtype)
    model.checkpointing = args.checkpointing
    net = scdpo.shard(scdpo.SeqLogprobs(model.requires_grad_(trainable)), device)
    net.to_empty(device=device)
    with torch.no_grad():
        for p in net.parameters():
            p.to_local().normal_(0, 0.02)
        model.inv_freq = modeling.rope_inv_freq(margs).to(device)
    return net


def one_step(net, opt, ref_net, margs, n_block, rows, ref_lps, packed, step):
    """One optimizer step over args.accum micro-batches with train()'s DPO loss; (seconds, FLOPs, tokens)
    of this rank."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, flops, tokens = time.time(), 0, 0
    for a in range(args.accum):
        first = ((step * args.accum + a) * world + rank) * MB
        ids = list(range(first, first + MB))
        batch = data.collate_pairs([rows[i] for i in ids], packed=packed, pad_id=0)
        lp = scdpo.run_logprobs(net, batch, device)
        if ref_net is not None:
            with torch.no_grad():
                ref = scdpo.run_logprobs(ref_net, batch, device).view(-1, 2)
            ref_net.reshard()
        else:
            ref = ref_lps[ids].to(device)
        loss, _, _ = scdpo.dpo_loss(lp[0::2], lp[1::2], *ref.unbind(1), train_args.beta)
        (loss.sum() / (MB * args.accum)).backward()
        n = sum(scdpo.row_tokens(rows[i], argparse.Namespace(packed=packed)) for i in ids)
        tokens += n
        flops += scdpo.step_flops(margs, n_block, n, len(batch["tgt"]), batch["input_ids"].shape[1])
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.time() - t0, flops, tokens


def reference_gap(net, rows, packed):
    """Step 0 of a run with --ref precompute: the policy's summed log-probs (train mode, with grad, the
    first step's micro-batches) minus the cache's (scdpo.reference_logprobs: eval, no grad), on the same
    weights, with the cache made in the same layout and in the other one (why --packed is in the
    cache's key). {layout: (max |gap| of a sequence, max |h|)}, h the DPO margin, over all ranks."""
    n = MB * args.accum * world
    collate = lambda p: lambda ids: data.collate_pairs([rows[i] for i in ids], packed=p, pad_id=0)
    out = {}
    for layout in (packed, not packed):
        ref = scdpo.reference_logprobs(net, rows[:n], collate(layout), argparse.Namespace(micro_batch=MB),
                                       device, rank, world)
        worst = torch.zeros(2, dtype=torch.float64, device=device)
        for a in range(args.accum):
            ids = list(range((a * world + rank) * MB, (a * world + rank + 1) * MB))
            gap = scdpo.run_logprobs(net, collate(packed)(ids), device).view(-1, 2).detach().cpu() - ref[ids]
            worst = torch.maximum(worst, torch.stack([gap.abs().max(), (gap[:, 0] - gap[:, 1]).abs().max()])
                                  .double().to(device))
        net.reshard()   # no backward followed the forwards
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        out["same layout" if layout == packed else "other layout"] = worst.tolist()
    return out


def bench(shape):
    """The four configurations on one policy and optimizer (a step costs the same whatever the values),
    their steps interleaved so that a slow spell of a shared machine hits all of them alike; per
    configuration the fastest step after a warm-up counts."""
    torch.manual_seed(0)
    margs = ModelArgs(**SHAPES[shape])
    net = random_sharded(margs)
    n_block = sum(p.numel() for p in net.model.layers.parameters()) + net.model.norm.weight.numel()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-7)
    live = random_sharded(margs, trainable=False, dtype=scdpo.compute_dtype(device)).eval()   # as scdpo.py
    rows = synthetic_pairs(MB * world * args.accum * (args.steps + 1), margs.vocab_size)
    for packed in (True, False):   # before any step: the policy is the reference
        gaps = reference_gap(net, rows, packed)
        print0(f"{shape}: step 0, {'packed' if packed else 'unpacked'}: policy - precomputed reference, "
               f"max |gap| of a sequence / max |h|: " + " | ".join(f"cache in the {k} {g:.2e} / {h:.2e}"
                                                          for k, (g, h) in gaps.items()))
    ref_lps = torch.randn(len(rows), 2) - 50.0      # what the precomputed cache would hold
    configs = [(packed, ref) for packed in (True, False) for ref in ("precompute", "live")]
    best, peak_mem = {}, {}
    for step in range(args.steps + 1):
        for packed, ref in configs:
            ref_net = live if ref == "live" else None
            r = one_step(net, opt, ref_net, margs, n_block, rows, ref_lps, packed, step)
            if cuda:
                peak_mem[(packed, ref)] = torch.cuda.max_memory_allocated() / 2**30
            if step > 0 and ((packed, ref) not in best or r[0] < best[(packed, ref)][0]):   # step 0: warm-up
                best[(packed, ref)] = r
    peak = scdpo.peak_flops(device)
    res = {}
    for cfg, (dt, flops, tokens) in best.items():
        res[cfg] = {"shape": shape, "packed": cfg[0], "ref": cfg[1], "pairs/s": MB * world * args.accum / dt,
                    "tok/s/gpu": tokens / dt, "s/step": dt}
        if peak:
            res[cfg].update(mfu=flops / dt / peak, peak_mem_gb=peak_mem[cfg])
    del net, live, opt
    if cuda:
        torch.cuda.empty_cache()
    return res


print0(f"device {device} x {world} | prompt {P} tokens, continuations ~{C} | micro-batch {MB} pairs x "
       f"{args.accum} accumulation | fastest of {args.steps} steps | torch threads {torch.get_num_threads()}")
for shape in shapes:
    res = bench(shape)
    for (packed, ref_mode), r in res.items():
        line = (f"{shape:<14} {'packed  ' if packed else 'unpacked'} ref {ref_mode:<10} | "
                f"{r['pairs/s']:8.2f} pairs/s | "
                f"{r['tok/s/gpu']:10,.0f} tok/s/{'gpu' if cuda else 'proc'} | {r['s/step']:7.3f} s/step")
        if "mfu" in r:
            line += f" | mfu {100 * r['mfu']:5.1f}% | peak {r['peak_mem_gb']:.1f} GiB"
        print0(line)
    for ref_mode in ("precompute", "live"):
        print0(f"{shape}: packing speed-up (pairs/s packed / unpacked), ref {ref_mode}: "
                     f"{res[(True, ref_mode)]['pairs/s'] / res[(False, ref_mode)]['pairs/s']:.2f}x")
    for packed in (True, False):
        print0(f"{shape}: precomputed reference speed-up over live, {'packed' if packed else 'unpacked'}: "
                     f"{res[(packed, 'precompute')]['pairs/s'] / res[(packed, 'live')]['pairs/s']:.2f}x")
    if rank == 0:
        print(json.dumps({f"{'packed' if k[0] else 'unpacked'}/{k[1]}": v for k, v in res.items()}))
