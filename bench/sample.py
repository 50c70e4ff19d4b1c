"""Tokens/s of sample.generate against transformers' generate (same random checkpoint, same prompts),
and the sampler's peak cache memory against the size of one cache.

    python bench/sample.py --threads 2       # CPU: a 19M-parameter Llama, vocab 32000, batch 16 (>= 2x)
    python bench/sample.py --size tiny       # CPU: the miniature's size (0.2M parameters)
    python bench/sample.py --device cuda     # GPU: Qwen2.5-0.5B-shaped, batch 64, bf16 (target: 3x)

Both of our decoding modes are timed: the plain one, and Sampling(static=True), whose every step has the
same shapes and is one CUDA graph replay on a GPU (on a CPU it runs as it is, with more work: all rows,
all slots).

Speed: both decode greedily with no EOS (every row makes exactly --new tokens) from ragged prompts
(left-padded for transformers), so both do the same work; one warm-up run each, then --reps timed runs
of each, alternating between the two, and the best of each. tokens/s counts new tokens only: batch * new /
seconds. Without transformers (a test-only dependency) only ours is timed, and the line says so.
On the CPU both run on --threads threads (default 1): for matrices this small more threads mostly wait on
each other, and on a machine shared with other jobs they spin against them.

Floor: the time of the decode steps' weight GEMMs alone (gemm_floor), and transformers' time over it,
the most any sampler could gain over transformers on this shape.

Memory: rows that end at random steps (sampling, n=4 samples of each of 64 short prompts, a few EOS ids),
so that rows finish all along and the sampler skips and compacts them. Peak memory during generate()
above what was in use before it, over the bytes of one KV cache of all rows: a second cache alive at once
would show as 2.
CPU: in a fresh process, the kernel's peak-RSS mark reset before the call (/proc/self/clear_refs);
GPU: torch.cuda.max_memory_allocated().
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer  # noqa: E402
from sample import Sampling, generate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu")
p.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 64 on GPU")
p.add_argument("--new", type=int, default=128, help="new tokens per row")
p.add_argument("--prompt", default="32,96", help="prompt lengths drawn uniformly from lo,hi")
p.add_argument("--reps", type=int, default=10, help="timed runs of each, alternating")
p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU, torch's "
               "on GPU)")
p.add_argument("--size", default="small", choices=["tiny", "small", "qwen2.5-0.5b"],
               help="the model: tiny (0.2M), small (19M), qwen2.5-0.5b (default on a GPU)")
p.add_argument("--memory-child", action="store_true", help="internal: the memory measurement, as JSON")
args = p.parse_args()
gpu = args.device.startswith("cuda")
B = args.batch or (64 if gpu else 16)
if args.threads or not gpu:
    torch.set_num_threads(args.threads or 1)
SHAPES = {   # random weights in real shapes: a decode step costs the same whatever the values
    "qwen2.5-0.5b": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         intermediate_size=4864, norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768,
                         qkv_bias=True, tie_embeddings=True, model_type="qwen2", bos_token_id=None,
                         eos_token_id=151643),
    "tiny": dict(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=192,
                 max_seq_len=2048),
    "small": dict(vocab_size=32000, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, intermediate_size=688,
                  max_seq_len=2048),
}
size = "qwen2.5-0.5b" if gpu and "--size" not in sys.argv else args.size
dtype = torch.bfloat16 if gpu else torch.float32


def sync():
    if gpu:
        torch.cuda.synchronize()


def peak_cache_memory():
    """{"peak": bytes above the start during generate(), "cache": bytes of one cache of all rows}."""
    margs = ModelArgs(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=512)
    torch.manual_seed(0)
    model = Transformer(margs).to(args.device, dtype).eval()
    g = torch.Generator().manual_seed(2)
    # short prompts and long samples, so that the prefill's activations are small beside the cache
    prompts = [torch.randint(8, 512, (n,), generator=g).tolist()
               for n in torch.randint(8, 25, (64,), generator=g).tolist()]
    eos = [1, 2, 3, 4, 5]   # ~1% a step: rows end all along
    cfg, n = Sampling(max_new_tokens=768, temperature=1.0), 4
    generate(model, prompts[:2], Sampling(max_new_tokens=4, temperature=1.0), n=2, seed=0, eos_id=eos)
    max_len = max(map(len, prompts)) + cfg.max_new_tokens + 1
    rows_bytes = len(prompts) * n * margs.n_kv_heads * max_len * margs.head_dim * dtype.itemsize
    cache = 2 * margs.n_layers * rows_bytes                                  # k and v of every layer
    if gpu:
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                          # peak RSS := current RSS
        before = rss("VmHWM")
    rows = generate(model, prompts, cfg, n=n, seed=0, eos_id=eos)
    sync()
    peak = torch.cuda.max_memory_allocated() if gpu else rss("VmHWM")
    lengths = sorted(len(r.ids) for r in rows)
    return {"peak": peak - before, "cache": cache, "rows": len(rows), "median_len": lengths[len(rows) // 2],
            "finished_early": sum(r.finish == "eos" for r in rows)}


def rss(field):
    with open("/proc/self/status") as f:                          # "VmHWM:   123456 kB"
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


if args.memory_child:
    print(json.dumps(peak_cache_memory()))
    sys.exit(0)

margs = ModelArgs(**SHAPES[size])
torch.manual_seed(0)
ckpt = tempfile.mkdtemp(prefix="scdpo-bench-sample-")
Transformer(margs).to(dtype).save_pretrained(ckpt)
ours = Transformer.from_pretrained(ckpt, dtype=dtype, device=args.device).eval()
try:
    from transformers import AutoModelForCausalLM  # the reference (a test-only dependency)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(args.device).eval()
except Exception as e:   # ImportError, or a transformers too old for this torch
    hf, why = None, f"{type(e).__name__}: {e}"

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


def run_ours():
    return [r.ids for r in generate(ours, prompts, Sampling(max_new_tokens=args.new), eos_id=[])]


def run_static():   # every row over every slot: one CUDA graph replay a step on a GPU
    return [r.ids for r in generate(ours, prompts, Sampling(max_new_tokens=args.new, static=True), eos_id=[])]


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
fns = {"ours": run_ours, "static": run_static, **({"hf": run_hf} if hf is not None else {})}
static_failed = None
for k, fn in list(fns.items()):   # warm-up; the static step failing (its CUDA graph) leaves the others timed
    try:
        fn()
    except Exception as e:
        if k != "static":
            raise
        static_failed = f"{type(e).__name__}: {str(e)[:300]}"
        del fns[k]
best, outs = {k: float("inf") for k in fns}, {}
for _ in range(args.reps):
    for k, fn in fns.items():
        t, outs[k] = timed(fn)
        best[k] = min(best[k], t)
n_tok = B * args.new
where = torch.cuda.get_device_name() if gpu else f"{torch.get_num_threads()} threads"
print(f"device {args.device} ({where}) | "
      f"model {size}, {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, {dtype} | batch {B} | "
      f"prompts {lo}-{hi} tokens | {args.new} new tokens/row", flush=True)
print(f"sample.generate          : {n_tok / best['ours']:9.1f} tok/s ({best['ours']:.2f} s)", flush=True)
if static_failed:
    print(f"sample.generate (static) : FAILED ({static_failed})", flush=True)
else:
    print(f"sample.generate (static) : {n_tok / best['static']:9.1f} tok/s ({best['static']:.2f} s)"
          + (" (a CUDA graph a step)" if gpu else " (on a CPU: no graph, all rows and slots)"), flush=True)
if hf is not None:
    same = {k: sum(a == b for a, b in zip(outs[k], outs["hf"])) for k in fns if k != "hf"}
    print(f"transformers             : {n_tok / best['hf']:9.1f} tok/s ({best['hf']:.2f} s)")
    print(f"ratio {best['hf'] / best['ours']:.2f}x"
          + ("" if static_failed else f", static {best['hf'] / best['static']:.2f}x")
          + f" | greedy rows identical to transformers: {same['ours']}/{B}"
          + ("" if static_failed else f", static {same['static']}/{B}"), flush=True)
else:
    print(f"transformers             : not importable ({why}); no ratio", flush=True)


@torch.no_grad()
def gemm_floor():
    """The decode steps' weight GEMMs alone: for every new token, x @ W.T of every nn.Linear (the four per
    layer and the vocabulary projection) with x of shape [B, in_features]; no attention, no sampling, no
    Python. Any implementation of this model does at least this work, so transformers' time over it is
    the most any sampler could gain on this shape."""
    ws = [mod.weight for mod in ours.modules() if isinstance(mod, torch.nn.Linear)]
    xs = [torch.randn(B, w.shape[1], device=args.device, dtype=dtype) for w in ws]
    def steps():
        for _ in range(args.new):
            for x, w in zip(xs, ws):
                torch.mm(x, w.t())
    steps()
    return min(timed(steps)[0] for _ in range(3))


floor = gemm_floor()
print(f"weight GEMMs alone: {floor:.2f} s, {100 * floor / best['ours']:.0f}% of ours"
      + (f"; transformers / GEMMs = {best['hf'] / floor:.2f}x, the ceiling of any ratio on this shape"
         if hf is not None else ""), flush=True)

if gpu:
    m = peak_cache_memory()
else:   # a fresh process: its peak-RSS mark is this measurement's alone
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", "--device", args.device,
                        "--threads", str(torch.get_num_threads())], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"memory measurement failed:\n{r.stderr[-3000:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
print(f"peak memory in generate / one cache: {m['peak'] / m['cache']:.3f} (target <= 1.1) | cache "
      f"{m['cache'] / 2**20:.0f} MiB, {m['rows']} rows, {m['finished_early']} ended early, median "
      f"{m['median_len']} of 768 tokens")
