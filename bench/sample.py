"""Tokens/s of sample.generate against transformers' generate, same random checkpoint, same prompts.

    python bench/sample.py                         # CPU: a tiny Llama (0.2M params), batch 16 (target: >= 2x)
    python bench/sample.py --size small            # CPU: a 19M-parameter Llama, vocab 32000
    python bench/sample.py --device cuda           # GPU: Qwen2.5-0.5B-shaped, batch 64, bf16 (target: 3x)

Both decode greedily with no EOS (every row makes exactly --new tokens) from ragged prompts (left-padded
for transformers), so both do the same work; one warm-up run each, then --reps timed runs of each,
alternating between the two, and the best of each.
tokens/s counts new tokens only: batch * new / seconds. On the CPU both run on one thread unless --threads
says otherwise: for matrices this small more threads only wait on each other, and on a machine shared with
other jobs they spin against them (the same 2-thread run took anywhere from 1.3 s to 8.9 s here).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer  # noqa: E402
from sample import generate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu")
p.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 64 on GPU")
p.add_argument("--new", type=int, default=128, help="new tokens per row")
p.add_argument("--prompt", default="32,96", help="prompt lengths drawn uniformly from lo,hi")
p.add_argument("--reps", type=int, default=10, help="timed runs of each, alternating")
p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU, torch's on GPU)")
p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="CPU model: tiny (0.2M) or small (19M)")
args = p.parse_args()
gpu = args.device.startswith("cuda")
B = args.batch or (64 if gpu else 16)
if args.threads or not gpu:
    torch.set_num_threads(args.threads or 1)
if gpu:   # Qwen2.5-0.5B's shape (random weights)
    margs = ModelArgs(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, intermediate_size=4864,
                      norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768, qkv_bias=True, tie_embeddings=True,
                      model_type="qwen2", bos_token_id=None, eos_token_id=151643)
    dtype = torch.bfloat16
elif args.size == "tiny":   # the size of the miniature's models and of the tests' checkpoints
    margs = ModelArgs(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=192,
                      max_seq_len=2048)
    dtype = torch.float32
else:
    margs = ModelArgs(vocab_size=32000, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, intermediate_size=688,
                      max_seq_len=2048)
    dtype = torch.float32

torch.manual_seed(0)
ckpt = tempfile.mkdtemp(prefix="scdpo-bench-sample-")
Transformer(margs).to(dtype).save_pretrained(ckpt)
ours = Transformer.from_pretrained(ckpt, dtype=dtype, device=args.device).eval()

from transformers import AutoModelForCausalLM  # noqa: E402  (the reference; a test-only dependency)
hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(args.device).eval()

lo, hi = map(int, args.prompt.split(","))
g = torch.Generator().manual_seed(1)
lens = torch.randint(lo, hi + 1, (B,), generator=g).tolist()
prompts = [torch.randint(3, margs.vocab_size, (n,), generator=g).tolist() for n in lens]
L = max(lens)
ids = torch.zeros(B, L, dtype=torch.long)
att = torch.zeros(B, L, dtype=torch.long)
for b, pr in enumerate(prompts):   # left padding, as transformers wants for decoder-only generation
    ids[b, L - len(pr):] = torch.tensor(pr)
    att[b, L - len(pr):] = 1
ids, att = ids.to(args.device), att.to(args.device)


def sync():
    if gpu:
        torch.cuda.synchronize()


def run_ours():
    return generate(ours, prompts, args.new, eos_id=[])


@torch.no_grad()
def run_hf():
    out = hf.generate(input_ids=ids, attention_mask=att, max_new_tokens=args.new, min_new_tokens=args.new,
                      do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    return out[:, L:].tolist()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


# Alternate the two, so that both see the same machine load (CPUs shared with other jobs drift by 2x
# within seconds); each keeps its best run.
fns = {"ours": run_ours, "hf": run_hf}
for fn in fns.values():   # warm-up
    fn()
best, outs = {k: float("inf") for k in fns}, {}
for _ in range(args.reps):
    for k, fn in fns.items():
        t, outs[k] = timed(fn)
        best[k] = min(best[k], t)
(t_ours, out_ours), (t_hf, out_hf) = (best["ours"], outs["ours"]), (best["hf"], outs["hf"])
same = sum(a == b for a, b in zip(out_ours, out_hf))
n_tok = B * args.new
print(f"device {args.device} ({torch.cuda.get_device_name() if gpu else f'{torch.get_num_threads()} threads'}) | "
      f"model {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, {dtype} | batch {B} | "
      f"prompts {lo}-{hi} tokens | {args.new} new tokens/row")
print(f"sample.generate : {n_tok / t_ours:9.1f} tok/s ({t_ours:.2f} s)")
print(f"transformers    : {n_tok / t_hf:9.1f} tok/s ({t_hf:.2f} s)")
print(f"ratio {t_hf / t_ours:.2f}x | greedy rows identical to transformers: {same}/{B}")
