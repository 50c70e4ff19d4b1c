"""Peak memory of Transformer.from_pretrained on a ~1B-parameter bf16 checkpoint.

    python bench/load.py                 # TinyLlama-1.1B's shape, random weights, in a temp dir
    python bench/load.py --layers 4      # smaller and quicker

Writes a random bf16 checkpoint in the hub's format (config.json, sharded model-*.safetensors and
the index), one shard at a time so the writer never holds more than a shard, then loads it in a fresh
subprocess and prints that process's peak RSS (VmHWM) divided by the checkpoint's size on disk. The
loader reads each tensor straight into its parameter, so the peak should be the model plus the Python
and torch runtime (~0.4 GB): target <= 1.3. The second ratio leaves the runtime out.
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
parser.add_argument("--dir", default=None, help="write the checkpoint here and keep it (default: a temp dir, removed)")
parser.add_argument("--max-ratio", type=float, default=1.3, help="exit 1 if peak RSS / file size is above this")
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


# Runs in a fresh interpreter: its peak RSS (VmHWM) is the loader's and the runtime's, nothing else.
CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
import torch
from model import Transformer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
# The first `with torch.device("meta")` imports torch's lazy modules (sympy and more: ~150 MB of RSS);
# do it before measuring the baseline so that the second ratio is the loader's own.
with torch.device("meta"):
    torch.nn.Embedding(1, 1)
base = status("VmRSS")
t0 = time.time()
model = Transformer.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
dt = time.time() - t0
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"base_rss": base, "peak_rss": status("VmHWM"), "params": n, "seconds": dt}))
"""


def main():
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="scdpo-bench-load-")
    path = args.dir or tmp.name
    os.makedirs(path, exist_ok=True)
    t0 = time.time()
    n_params, size = write_checkpoint(args, path)
    print(f"wrote {n_params / 1e9:.2f}B parameters, {size / 2**30:.2f} GiB bf16 in "
          f"{len(os.listdir(path)) - 2} shards to {path} ({time.time() - t0:.0f}s)")
    out = subprocess.run([sys.executable, "-c", CHILD, path, ROOT], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"loading failed:\n{out.stderr}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["params"] == n_params, (r["params"], n_params)
    ratio = r["peak_rss"] / size
    print(f"load {r['seconds']:.1f}s | peak RSS {r['peak_rss'] / 2**30:.2f} GiB | file size {size / 2**30:.2f} GiB | "
          f"peak RSS / file size {ratio:.3f} (target <= {args.max_ratio}) | "
          f"without the runtime ({r['base_rss'] / 2**30:.2f} GiB before loading): "
          f"{(r['peak_rss'] - r['base_rss']) / size:.3f}")
    if tmp is not None:
        tmp.cleanup()
    sys.exit(0 if ratio <= args.max_ratio else 1)


if __name__ == "__main__":
    main()
