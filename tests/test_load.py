# python -m pytest -q tests/test_load.py
"""Sharded loading for training (scdpo.load_sharded: the model built on the meta device, fully_shard, then
each rank's rows read from the safetensors files) against a plain Transformer.from_pretrained, in two
processes (torchrun, gloo): every parameter gathered back equal, the log-probs of a packed batch equal, and
each rank reading about half of the checkpoint's bytes. Run as a script, this file is the worker."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
import model as modeling  # noqa: E402
import scdpo  # noqa: E402


def read_bytes():
    """Bytes this process has read with read() so far (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def worker(folders):
    """Per folder, one JSON line per rank: parameters and log-probs equal to a plain load's, bytes read."""
    rank, world, _, device = modeling.compute_init()
    g = torch.Generator().manual_seed(0)
    for path in folders:
        margs = modeling.read_config(path)[1]
        scdpo.load_sharded(path, margs, device)   # once before measuring: its first call imports modules
        before = read_bytes()
        net = scdpo.load_sharded(path, margs, device)
        read = read_bytes() - before
        full = {k: v.full_tensor() for k, v in net.model.state_dict().items()}
        plain = modeling.Transformer.from_pretrained(path, dtype=torch.float32)
        ref = plain.state_dict()
        ids = lambda n: torch.randint(3, margs.vocab_size, (n,), generator=g).tolist()
        rows = [{"prompt": ids(7 + i), "chosen": ids(5), "rejected": ids(4 + i)} for i in range(3)]
        batch = data.collate_pairs(rows, packed=True)
        with torch.no_grad():
            lp = scdpo.run_logprobs(net, batch, device)
            lp_ref = scdpo.run_logprobs(scdpo.SeqLogprobs(plain), batch, device)
        size = sum(os.path.getsize(f) for f in modeling._safetensors_files(path))
        mine = {"path": path, "rank": rank, "world": world, "keys": sorted(full) == sorted(ref),
                "equal": all(torch.equal(full[k], ref[k]) for k in ref),
                "inv_freq": torch.equal(net.model.inv_freq, plain.inv_freq),
                "logprobs": torch.equal(lp, lp_ref), "read": read, "size": size}
        for line in modeling.gather_rows([mine]):   # printed by rank 0 alone: two writers interleave
            modeling.print0(json.dumps(line))


def write_internlm2(path, out):
    """The Llama checkpoint at `path` repacked as InternLM2 (test_model's writer)."""
    from test_model import _write_internlm2
    a = modeling.read_config(path)[1]
    cfg = SimpleNamespace(num_key_value_heads=a.n_kv_heads, hidden_size=a.dim, num_attention_heads=a.n_heads,
                          num_hidden_layers=a.n_layers, vocab_size=a.vocab_size,
                          intermediate_size=a.intermediate_size, rms_norm_eps=a.norm_eps)
    _write_internlm2(path, cfg, out)
    return out


def test_sharded_load_equals_a_plain_load_and_reads_only_its_rows(tmp_path):
    from conftest import tiny_checkpoint
    # Qwen2-shaped (tied, qkv bias; 259 rows: 130 + 129 on two ranks), Llama in several files, InternLM2
    tiny_checkpoint(tmp_path / "qwen2", seed=1, tied=True)
    m, _ = tiny_checkpoint(tmp_path / "llama", seed=2, vocab=301)
    m.save_pretrained(tmp_path / "llama", max_shard_size=20_000)
    tiny_checkpoint(tmp_path / "llama-for-internlm2", seed=3)
    folders = [str(tmp_path / "qwen2"), str(tmp_path / "llama"),
               write_internlm2(str(tmp_path / "llama-for-internlm2"), str(tmp_path / "internlm2"))]
    assert len(modeling._safetensors_files(folders[1])) > 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run(launch + [os.path.abspath(__file__), *folders], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert sorted((x["path"], x["rank"]) for x in lines) == sorted((f, k) for f in folders for k in (0, 1))
    for x in lines:
        assert x["world"] == 2 and x["keys"] and x["equal"] and x["inv_freq"] and x["logprobs"], x
        # half the tensors' bytes, plus the headers; a plain load reads all of them
        assert x["read"] < 0.6 * x["size"], x


if __name__ == "__main__":
    worker(sys.argv[1:])
    modeling.compute_cleanup()   # as the scripts end
