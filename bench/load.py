"""Peak host memory of loading a ~1B-parameter bf16 checkpoint: one process (Transformer.from_pretrained,
bf16, as the sampler loads), and the two processes of a training run (scdpo.load_sharded, fp32 shards).

    python bench/load.py                 # TinyLlama-1.1B's shape, random weights, in a temp dir
    python bench/load.py --layers 4      # smaller and quicker
    python bench/load.py --old           # also the old training load: the whole fp32 model on every rank

Writes a random bf16 checkpoint in the hub's format (config.json, sharded model-*.safetensors and
the index), one shard at a time so the writer never holds more than a shard, then loads it in fresh
processes, each reporting its peak RSS (VmHWM; "without the runtime": minus the RSS of the imported
runtime before loading) and the bytes it read (/proc/self/io).
  one process: the loader reads each tensor straight into its parameter, so the peak is the model plus
      the runtime (~0.4 GB): peak RSS / file size, target <= 1.3.
  training, 2 processes (torchrun, gloo): the model built on the meta device, sharded, and each rank
      reading only its rows; peak RSS per rank / the whole fp32 model's size, target <= 0.75 (the old
      way, the whole fp32 model on every rank before sharding, is ~1.1).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
# model shape (defaults: TinyLlama-1.1B, 1.10B parameters, 2.2 GB in bf16)
parser.add_argument("--dim", type=int, default=2048, help="hidden size")
parser.add_argument("--layers", type=int, default=22, help="number of blocks")
parser.add_argument("--heads", type=int, default=32, help="attention heads")
parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA)")
parser.add_argument("--intermediate", type=int, default=5632, help="MLP hidden size")
parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
# files
parser.add_argument("--shard-mb", type=int, default=500, help="shard size in MB, as the hub's max_shard_size")
parser.add_argument("--dir", default=None,
                    help="write the checkpoint here and keep it (default: a temp dir, removed)")
parser.add_argument("--max-ratio", type=float, default=1.3,
                    help="exit 1 if peak RSS / file size is above this")
parser.add_argument("--max-rank-ratio", type=float, default=0.75,
                    help="exit 1 if a training rank's peak RSS / fp32 model size is above this")
parser.add_argument("--old", action="store_true", help="also time the old training load (needs ~2.2x the "
                    "fp32 model's size of host memory)")
parser.add_argument("--child", choices=["plain", "sharded", "old"], help="internal: one measured load")
args = parser.parse_args()


def tensors(a):
    """(hub name, shape) of every tensor of a Llama checkpoint, in file order."""
    hd = a.dim // a.heads
    yield "model.embed_tokens.weight", (a.vocab, a.dim)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (a.heads * hd, a.dim)
        yield p + "self_attn.k_proj.weight", (a.kv_heads * hd, a.dim)
        yield p + "self_attn.v_proj.weight", (a.kv_heads * hd, a.dim)
        yield p + "self_attn.o_proj.weight", (a.dim, a.heads * hd)
        yield p + "mlp.gate_proj.weight", (a.intermediate, a.dim)
        yield p + "mlp.up_proj.weight", (a.intermediate, a.dim)
        yield p + "mlp.down_proj.weight", (a.dim, a.intermediate)
        yield p + "input_layernorm.weight", (a.dim,)
        yield p + "post_attention_layernorm.weight", (a.dim,)
    yield "model.norm.weight", (a.dim,)
    yield "lm_head.weight", (a.vocab, a.dim)


def write_checkpoint(a, path):
    """Random bf16 weights, one shard in memory at a time. Returns (parameters, bytes on disk)."""
    shapes = list(tensors(a))
    limit = a.shard_mb * 2**20
    groups, cur, size = [], [], 0        # plan the shards first: their names carry the total count
    for name, shape in shapes:
        n = 2 * torch.Size(shape).numel()
        if cur and size + n > limit:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    groups.append(cur)
    g = torch.Generator().manual_seed(0)
    weight_map, n_params = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for name, shape in group}
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        n_params += sum(t.numel() for t in shard.values())
        weight_map.update({name: fname for name in shard})
        del shard
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 2 * n_params}, "weight_map": weight_map}, f, indent=2)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": a.vocab,
              "hidden_size": a.dim, "intermediate_size": a.intermediate, "num_hidden_layers": a.layers,
              "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 2048,
              "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    return n_params, size


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def bytes_read():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def child():
    """One measured load in this fresh process (under torchrun for sharded / old): prints JSON."""
    sys.path.insert(0, ROOT)
    import torch.distributed as dist
    import model as modeling
    import scdpo
    if args.child != "plain":
        rank, world, _, device = modeling.compute_init()
    # The first `with torch.device("meta")` imports torch's lazy modules (sympy and more: ~150 MB of RSS);
    # do it before measuring the baseline so that "without the runtime" is the loader's own.
    with torch.device("meta"):
        torch.nn.Embedding(1, 1)
    base, read, t0 = status("VmRSS"), bytes_read(), time.time()
    if args.child == "plain":
        model = modeling.Transformer.from_pretrained(args.dir, dtype=torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
    else:
        margs = modeling.read_config(args.dir)[1]
        if args.child == "sharded":
            net = scdpo.load_sharded(args.dir, margs, device)
        else:   # what train() did before: every rank loads the whole fp32 model, then shards it
            policy = modeling.Transformer.from_pretrained(args.dir, dtype=torch.float32)
            net = scdpo.shard(scdpo.SeqLogprobs(policy), device)
        n = sum(p.numel() for p in net.parameters())   # DTensors: the whole model's count
    r = {"base_rss": base, "peak_rss": status("VmHWM"), "read": bytes_read() - read, "params": n,
         "seconds": time.time() - t0}
    if args.child != "plain":
        rows = [None] * world
        dist.all_gather_object(rows, r)
        r = rows if rank == 0 else None
        modeling.compute_cleanup()
    if r is not None:
        print(json.dumps(r))


def run_child(kind, path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] if kind == "plain" else [sys.executable, "-m", "torch.distributed.run",
                                                       "--standalone", "--nproc_per_node=2"]
    cmd = launch + [os.path.abspath(__file__), "--child", kind, "--dir", path]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"loading ({kind}) failed:\n{out.stderr[-5000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="scdpo-bench-load-")
    path = args.dir or tmp.name
    os.makedirs(path, exist_ok=True)
    t0 = time.time()
    n_params, size = write_checkpoint(args, path)
    fp32 = 4 * n_params
    print(f"wrote {n_params / 1e9:.2f}B parameters, {size / 2**30:.2f} GiB bf16 in "
          f"{len(os.listdir(path)) - 2} shards to {path} ({time.time() - t0:.0f}s); in fp32 "
          f"{fp32 / 2**30:.2f} GiB", flush=True)
    r = run_child("plain", path)
    assert r["params"] == n_params, (r["params"], n_params)
    ratio = r["peak_rss"] / size
    print(f"one process, bf16     | load {r['seconds']:.1f}s | peak RSS {r['peak_rss'] / 2**30:.2f} GiB | "
          f"peak RSS / file size {ratio:.3f} (target <= {args.max_ratio}) | without the runtime "
          f"({r['base_rss'] / 2**30:.2f} GiB before loading): {(r['peak_rss'] - r['base_rss']) / size:.3f}",
          flush=True)
    worst = 0.0
    for kind in ["sharded"] + (["old"] if args.old else []):
        for rank, x in enumerate(run_child(kind, path)):
            assert x["params"] == n_params, (x["params"], n_params)
            rr = x["peak_rss"] / fp32
            worst = max(worst, rr) if kind == "sharded" else worst
            what = "training" if kind == "sharded" else "old training"
            target = f" (target <= {args.max_rank_ratio})" if kind == "sharded" else ""
            print(f"{what} rank {rank}/2 | load {x['seconds']:.1f}s | peak RSS "
                  f"{x['peak_rss'] / 2**30:.2f} GiB | peak RSS / fp32 model {rr:.3f}{target} | without the "
                  f"runtime {(x['peak_rss'] - x['base_rss']) / fp32:.3f} | read {x['read'] / size:.2f} of "
                  f"the files",
                  flush=True)
    if tmp is not None:
        tmp.cleanup()
    sys.exit(0 if ratio <= args.max_ratio and worst <= args.max_rank_ratio else 1)


if __name__ == "__main__":
    child() if args.child else main()
