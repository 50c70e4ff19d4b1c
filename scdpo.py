"""Step-Controlled DPO (Lu et al. 2024, arXiv 2407.00782): SFT and DPO / SCDPO training on FSDP2.
One file, read top to bottom: losses, flags, distributed init, data, model, optimizer, loop, export.

    python scdpo.py                                                    # the miniature (CPU, ~6 min); --mini --help: its flags
    python scdpo.py --model PATH --pairs pairs.jsonl --out runs/scdpo  # 1 CPU or 1 GPU
    torchrun --standalone --nproc_per_node=8 scdpo.py --model PATH --pairs pairs.jsonl --out runs/scdpo
    torchrun --standalone --nproc_per_node=8 scdpo.py --model PATH --data gsm8k:train,math:train --out runs/scdpo
        # no --pairs: sample the pairs with sample.py first (cached in --out), then train
    torchrun --standalone --nproc_per_node=8 scdpo.py --objective sft --model PATH --data gsm8k:train --out runs/sft

The paper's Table 1 is three runs of this script on the same pairs: --pairs-kind naive (DPO),
data-equal (DPO with naive pairs up-sampled to SCDPO's count) and scdpo (naive + step-controlled).
Defaults are the paper's (METHOD.md section 3). Every process, one or many, CPU or GPU, runs the same
path: a process group (gloo on CPU, nccl on GPU; world size 1 without torchrun) and FSDP2.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import data
import model as modeling
from kernels import token_logprobs


# ----------------------------------------------------------------------------------------------
# The losses (METHOD.md section 3). Pure functions of summed log-probs, importable on their own.
# ----------------------------------------------------------------------------------------------
# For a pair (x, y_w, y_l), with x the prompt (for a step-controlled pair: question + the shared
# steps t_0..t_k) and y the continuation only, DPO (Rafailov et al. 2023, eq. 7) writes
#   h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
#   sigmoid:  L = -(1-eps) log sigma(beta h) - eps log sigma(-beta h)
# (eps = label smoothing, the "conservative DPO" of Mitchell 2023; eps = 0 is plain DPO) and
#   dL/dh = -beta [(1-eps) sigma(-beta h) - eps sigma(beta h)].
# IPO (Azar et al. 2023, eq. 17) regresses the same margin on a fixed target instead:
#   ipo:      L = (h - 1/(2 beta))^2,   dL/dh = 2 (h - 1/(2 beta)).
# Since h is linear in the four log-probs, dL/d log pi(y_w|x) = dL/dh = -dL/d log pi(y_l|x).
# The implicit rewards r = beta (log pi - log pi_ref) (METHOD.md section 5, summed over the
# continuation) are returned detached, for logging and reward accuracy (r_w > r_l).
# SCDPO changes nothing here: L_SCDPO = L_naive + L_sc is this loss on a batch mixing both kinds.
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair loss (shape (P,), NOT reduced: the loop divides by the global batch size itself,
    which keeps gradient accumulation across micro-batches and ranks exact), and the detached
    chosen and rejected rewards, each (P,). Inputs are log-probs summed over each continuation."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected 'sigmoid' or 'ipo'")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return loss, chosen_rewards, rejected_rewards


# The optional NLL term on the chosen continuation ("RPO", Pang et al. 2024, eq. 3; the
# prototypes of ../shared/MINIATURE-NOTES.md needed it at small scale): per pair,
#   L_nll = -log pi(y_w|x) / |y_w|   (per-token mean over the chosen continuation),
# added as L = L_dpo + nll_weight * L_nll; the reference model plays no part in it.
def nll_loss(policy_chosen_logps, chosen_ntokens):
    """Per-pair length-normalised NLL of the chosen continuation, shape (P,)."""
    return -policy_chosen_logps / chosen_ntokens.clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Flags. Defaults are the paper's; None means "the default of the objective" (SFT: METHOD.md sec. 3).
# ----------------------------------------------------------------------------------------------
def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to train
    p.add_argument("--objective", choices=["dpo", "sft"], default="dpo", help="dpo: preference pairs; sft: next-token loss on solutions")
    p.add_argument("--model", help="hub-format folder of the initial model (config.json, safetensors, tokenizer); for dpo also the reference")
    p.add_argument("--pairs", help="pairs JSONL (data.make_pair records); dpo without it samples pairs from --model over --data first")
    p.add_argument("--data", help="sft: records with solutions ('gsm8k:train' or a JSONL of question, solution, gold); "
                                  "dpo without --pairs: the questions to sample pairs for; comma-separated to mix")
    p.add_argument("--out", default="runs/scdpo", help="output folder: log.jsonl, checkpoints/, final/ (hub format), sampled pairs")
    p.add_argument("--pairs-kind", choices=["scdpo", "naive", "data-equal"], default="scdpo",
                   help="scdpo: naive + step-controlled pairs; naive: DPO; data-equal: naive pairs up-sampled to scdpo's count")
    p.add_argument("--fmt", choices=["cot", "code"], default="cot", help="solution format for pair sampling")
    # the loss
    p.add_argument("--loss", choices=["sigmoid", "ipo"], default="sigmoid", help="DPO (sigmoid) or IPO")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (paper: 0.1; 0.5 for MetaMath-Mistral-7B)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO's eps (sigmoid loss only)")
    p.add_argument("--nll-weight", type=float, default=0.0, help="weight of the per-token NLL on chosen (RPO); 0 = plain DPO")
    p.add_argument("--ref", choices=["precompute", "live"], default="precompute",
                   help="precompute: reference log-probs once, cached beside the pairs; live: keep a frozen reference model")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="shared-prompt packing: one row per pair, the prompt computed once")
    # optimisation
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (dpo 1e-7, sft 1e-5)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (dpo 2, sft 3)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps (0: epochs decide); sets the schedule length")
    p.add_argument("--global-batch", type=int, default=64, help="pairs (sft: examples) per optimizer step, over all ranks")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward on one rank; accumulation fills the global batch")
    p.add_argument("--max-len", type=int, default=None, help="tokens per sequence: prompt + one continuation (dpo 1024, sft 2048)")
    p.add_argument("--max-prompt", type=int, default=512, help="longest prompt (question + prefix); longer pairs are dropped")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup over this fraction of the steps, then cosine")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    # system
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False, help="activation checkpointing per block")
    p.add_argument("--seed", type=int, default=42, help="data order and sampling")
    p.add_argument("--save-every", type=int, default=0, help="sharded checkpoint every N steps (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (a finished run is not retrained)")
    p.add_argument("--stop-after", type=int, default=0, help="exit after N steps without the final export, as a kill would (for tests)")
    p.add_argument("--eval", default=None, help="after training: greedy accuracy on this set (eval.py: gsm8k, math500, FILE ...)")
    p.add_argument("--eval-limit", type=int, default=None, help="first N problems of --eval")
    p.add_argument("--quiet", action="store_true", help="no per-step lines on stdout (log.jsonl still written)")
    return p


# ----------------------------------------------------------------------------------------------
# Distributed init. One path: without torchrun this is a process group of one (an in-memory store,
# no port), and the model is fully_shard-ed all the same, so the single-process tests run exactly the
# code of an 8-GPU job: the LM head inside the root forward, the sharded checkpoints, the state-dict
# gathers. The price on one process is FSDP's hooks, ~15% of a step for a tiny model on a CPU.
# ----------------------------------------------------------------------------------------------
def compute_init():
    """(rank, world_size, local_rank, device); idempotent, so in-process callers may train repeatedly."""
    cuda, local = torch.cuda.is_available(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), local, device


def print0(*a, **k):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


# file / model hashes live in data.py, shared with sample.py's CLI, which records them next to its pairs
sha256_file, model_fingerprint = data.sha256_file, data.model_fingerprint


# ----------------------------------------------------------------------------------------------
# Data. Pairs are tokenised once by data.tokenize_pairs; the reference log-probs are indexed by the
# row number of the WHOLE file, so the three --pairs-kind runs share one reference cache.
# Each global batch of the shuffled order is split between ranks by stride (rank r: items r, r + W, ..),
# so the global batch, and hence every step, is the same for any world size.
# ----------------------------------------------------------------------------------------------
def select_kind(rows, kind, seed):
    """Indices of the training rows for --pairs-kind (METHOD.md section 3's baselines)."""
    naive = [i for i, r in enumerate(rows) if r["kind"] == "naive"]
    if kind == "scdpo":
        return list(range(len(rows)))
    if kind == "naive":
        return naive
    # data-equal: every naive pair as often as fits into len(rows), the remainder a seeded random subset
    if not naive:
        raise ValueError("--pairs-kind data-equal needs naive pairs; the file has none")
    reps, rest = divmod(len(rows), len(naive))
    return naive * reps + sorted(random.Random(seed).sample(naive, rest))


def batch_order(n, epochs, global_batch, seed):
    """List of global batches (index lists) over `epochs` seeded shuffles of range(n); the last partial
    batch of an epoch is dropped, so every step sees exactly `global_batch` items."""
    steps = []
    for e in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
        steps += [perm[i:i + global_batch] for i in range(0, n - global_batch + 1, global_batch)]
    return steps


def left_out(n, global_batch):
    """For the log: batch_order leaves out n % global_batch items of every epoch (other ones each epoch)."""
    k = n % global_batch
    return f"; {k} per epoch left out (the last partial global batch of {global_batch})" if k else ""


def n_sft_tokens(ids, rows):
    """Response tokens in a global batch: SFT's loss is the mean over them, whichever rank holds them."""
    return sum(len(rows[i]["response"]) for i in ids)


def micro_batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def load_records(spec):
    """Records of comma-separated sets: names of data.DATASETS or JSONL files with question, gold
    (and solution for SFT)."""
    recs = []
    for s in spec.split(","):
        if s in data.DATASETS:
            recs += data.load_dataset(s)
        else:
            first = next(iter(data.read_jsonl(s)), {})
            recs += data.load_dataset(s, fields={k: k for k in ("question", "gold", "solution", "id") if k in first or k == "question"})
    return recs


def check_pairs_match(pairs_path, rows, tok, margs, model_dir):
    """Refuse, up front, pairs that do not belong to this model: token ids past the model's vocabulary,
    or a tokenizer / model recorded at sampling time (`<pairs>.meta.json`, data.write_pairs_meta: written
    when this script or `sample.py pairs` samples the pairs) that differs from --model's."""
    top = max((max(r["prompt"] + r["chosen"] + r["rejected"]) for r in rows), default=-1)
    if top >= margs.vocab_size:
        raise ValueError(f"{pairs_path}: tokenised with {tok.vocab_size} ids (largest {top}) but the model has "
                         f"{margs.vocab_size} embeddings: pairs and model do not match")
    meta_path, meta = data.pairs_meta_path(pairs_path), data.read_pairs_meta(pairs_path)
    if meta is not None:
        have = model_fingerprint(model_dir)
        for key in ("tokenizer", "model"):
            if key in meta and meta[key] != have[key]:
                raise ValueError(f"{pairs_path}: sampled with {key} {meta[key]} ({meta_path}) but --model {model_dir} has "
                                 f"{key} {have[key]}; the reference must be the model that sampled the pairs "
                                 f"(delete {meta_path} to train anyway)")


# ----------------------------------------------------------------------------------------------
# Log-probs. The continuation tokens' log-probs come from kernels.token_logprobs on the final hidden
# states (never the (tokens, vocab) logits), summed per segment (2p: pair p's chosen, 2p + 1: its
# rejected; SFT: row p) with the index arrays of data.collate_pairs / collate_sft. Prompt positions
# are not in `idx`, so nothing in the loss depends on their predictions.
#
# Why a wrapper module: under FSDP2 a module's own parameters are all-gathered by the pre-forward
# hook of the module that fully_shard was applied to, and their gradients reduce-scattered by the
# hooks that forward registers. The LM head belongs to the root. Reading model.lm_head_weight outside
# a forward gives the sharded DTensor (or, depending on reshard timing, a stale unsharded view);
# doing the head inside the root's forward makes it one more use of an ordinary unsharded parameter,
# exactly like the embedding. So fully_shard goes on each block and then on this wrapper.
# ----------------------------------------------------------------------------------------------
class SeqLogprobs(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, mask, idx, tgt, seg, n_seg):
        h = self.model(input_ids, positions=positions, mask=mask, return_hidden=True)      # (B, T, D)
        lp = token_logprobs(h.flatten(0, 1)[idx], self.model.lm_head_weight, tgt)          # (N,) fp32
        return torch.zeros(n_seg, dtype=lp.dtype, device=lp.device).index_add(0, seg, lp)  # (n_seg,)


def run_logprobs(net, batch, device):
    b = {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in batch.items()}
    return net(b["input_ids"], b["positions"], b["mask"], b["idx"], b["tgt"], b["seg"], len(b["lengths"]))


def pair_losses(net, batch, ref_lps, ref_net, args, device):
    """One micro-batch of pairs: per-pair loss (P,) with the optional NLL term, and the detached chosen
    and rejected rewards. The reference log-probs are `ref_lps` (P, 2) when precomputed, else a forward
    of the frozen `ref_net` on the same batch."""
    lp = run_logprobs(net, batch, device)
    pc, pr = lp[0::2], lp[1::2]
    if ref_net is not None:
        with torch.no_grad():
            ref_lps = run_logprobs(ref_net, batch, device).view(-1, 2)
        ref_net.reshard()   # no backward follows, so free the root's gathered parameters now
    rc, rr = ref_lps.to(device).unbind(1)
    loss, r_w, r_l = dpo_loss(pc, pr, rc, rr, args.beta, args.loss, args.label_smoothing)
    if args.nll_weight:
        loss = loss + args.nll_weight * nll_loss(pc, batch["lengths"][0::2].to(device))
    return loss, r_w, r_l


def shard(net, device, cuda):
    """torchtitan's apply_fsdp: bf16 compute with fp32 master weights and fp32 gradient reduction on a
    GPU, fp32 throughout on a CPU; fully_shard on each block, then on the root."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else torch.float32, reduce_dtype=torch.float32)
    for block in net.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(net, mp_policy=mp)
    return net


@torch.no_grad()
def reference_logprobs(net, rows, args, device, rank, world, pad_id):
    """(len(rows), 2) chosen / rejected log-probs of the frozen initial model, every rank computing a
    stride and an all-reduce assembling them. All ranks run the same number of forwards (FSDP's
    collectives need it): the index list is padded by wrapping around, and the padding is not stored."""
    from tqdm import tqdm
    n, mb = len(rows), args.micro_batch
    per_rank = math.ceil(n / (world * mb)) * mb
    out = torch.zeros(n, 2, dtype=torch.float64, device=device)
    mine = [(rank + world * j) for j in range(per_rank)]
    net.eval()
    for chunk in tqdm(micro_batches(mine, mb), desc="reference log-probs", disable=rank != 0, unit="batch"):
        batch = data.collate_pairs([rows[i % n] for i in chunk], packed=args.packed, pad_id=pad_id)
        lp = run_logprobs(net, batch, device).view(-1, 2).double()
        keep = torch.tensor([i < n for i in chunk], device=device)
        out[torch.tensor([i % n for i in chunk], device=device)[keep]] = lp[keep]
    net.train()
    # a forward without backward leaves the root's parameters unsharded (FSDP2 reshards the root only
    # after backward); put the sharded DTensors back, which the optimizer and checkpoints refer to
    net.reshard()
    dist.all_reduce(out)   # each row is written by exactly one rank, the others hold 0
    return out.float().cpu()


# ----------------------------------------------------------------------------------------------
# Checkpoints. Sharded (torch.distributed.checkpoint: every rank writes its own shards), written into
# step-N.tmp and renamed when complete, so a kill at any moment leaves the last good checkpoint. The
# data position is the step (the order is a pure function of the seed); the lr schedule is a pure
# function of the step too, so no scheduler object needs saving.
# ----------------------------------------------------------------------------------------------
def save_checkpoint(out, net, opt, step, args, rank):
    ckdir = os.path.join(out, "checkpoints")
    path, tmp = os.path.join(ckdir, f"step-{step:06d}"), os.path.join(ckdir, f"step-{step:06d}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=tmp)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, os.path.join(tmp, f"rng-rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world": dist.get_world_size(), "args": vars(args)}, f, indent=1, default=str)
        os.replace(tmp, path)
        for old in glob.glob(os.path.join(ckdir, "step-*")):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


RESUME_MUST_MATCH = ("objective", "model", "pairs", "pairs_kind", "global_batch", "epochs", "max_steps", "seed", "lr", "max_len")


def load_checkpoint(path, net, opt, rank, args):
    """Restore a checkpoint in place; returns its step. Refuses one written with other settings that
    decide the data order or the schedule (RESUME_MUST_MATCH), or by another number of processes (each
    rank's RNG state is its own file)."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    world = dist.get_world_size()
    if meta.get("world", world) != world:
        raise ValueError(f"--resume: {path} was written by {meta['world']} processes, this run has {world}; "
                         f"resume with the same world size (torchrun --nproc_per_node={meta['world']})")
    diff = {k: (meta["args"].get(k), getattr(args, k)) for k in RESUME_MUST_MATCH if meta["args"].get(k) != getattr(args, k)}
    if diff:
        raise ValueError(f"--resume: {path} was written with other settings: " +
                         ", ".join(f"--{k.replace('_', '-')} {a} (now {b})" for k, (a, b) in diff.items()))
    state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, opt, state["optim"])
    rng = torch.load(os.path.join(path, f"rng-rank{rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"]


def latest_checkpoint(out):
    """The newest complete checkpoint; a step-N.tmp folder is a save that was killed midway."""
    done = sorted(d for d in glob.glob(os.path.join(out, "checkpoints", "step-*")) if not d.endswith(".tmp"))
    return done[-1] if done else None


def export(net, margs, tok, path, dtype, rank):
    """The hub-format model (save_pretrained + tokenizer files): the full state dict is gathered to
    rank 0's CPU, loaded into a plain Transformer and written there."""
    sd = get_model_state_dict(net.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        with torch.device("meta"):
            plain = modeling.Transformer(margs)
        plain.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
        if margs.tie_embeddings:
            plain.output.weight = plain.tok_embeddings.weight
        plain.save_pretrained(path)
        tok.save_pretrained(path)
    dist.barrier()


# ----------------------------------------------------------------------------------------------
# Throughput. Training FLOPs per step (Kaplan et al. / nanoGPT's 6N + attention, adapted): every input
# token goes through the blocks (6 * block params) and attends over its row (12 * L * H * hd * T,
# no causal discount); only the target tokens go through the LM head (6 * V * D). Peak bf16 FLOP/s
# of the GPU gives MFU; on a CPU it is not reported.
# ----------------------------------------------------------------------------------------------
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "4090": 165e12}


def step_flops(margs, n_block_params, n_tokens, n_targets, row_len):
    attn = 12 * margs.n_layers * margs.n_heads * margs.head_dim * row_len
    return (6 * n_block_params + attn) * n_tokens + 6 * margs.vocab_size * margs.dim * n_targets


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def get_lr(step, total, args):
    """Linear warmup over warmup_ratio * total steps (from lr/warmup, not 0), then cosine to min_lr."""
    warm = math.ceil(args.warmup_ratio * total)
    if step < warm:
        return args.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def resolve_defaults(args):
    sft = args.objective == "sft"
    args.lr = args.lr if args.lr is not None else (1e-5 if sft else 1e-7)
    args.epochs = args.epochs if args.epochs is not None else (3 if sft else 2)
    args.max_len = args.max_len if args.max_len is not None else (2048 if sft else 1024)
    return args


def sample_pairs(args, rank, world, device, log):
    """Stage 1 when --pairs is not given: sample.make_pairs from --model over --data into --out. The
    stage is skipped when its output is complete; a killed run resumes question by question."""
    import sample
    path = os.path.join(args.out, "pairs.jsonl")
    if os.path.exists(data.pairs_meta_path(path)):
        log(f"pairs: reusing {path}")
        return path
    if not args.data:
        raise ValueError("--objective dpo needs --pairs, or --data with the questions to sample pairs for")
    gen_model, tok = modeling.load(args.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    summary = sample.make_pairs(gen_model, tok, load_records(args.data), path, rank=rank, world=world,
                                fmt=args.fmt, seed=args.seed, max_new_tokens=args.max_len - args.max_prompt)
    del gen_model
    if rank == 0:
        log(f"pairs: {json.dumps(summary)}")
        data.write_pairs_meta(path, args.model, summary)   # written last: marks the stage complete
    dist.barrier()
    return path


def train(args):
    """Train as the flags say; returns the final model as a plain Transformer loaded from the exported
    folder <out>/final on every rank (None after --stop-after). Raises on a non-finite loss or gradient norm."""
    args = resolve_defaults(args)
    rank, world, local, device = compute_init()
    cuda = device.type == "cuda"
    os.makedirs(args.out, exist_ok=True)
    log = print0 if not args.quiet else (lambda *a, **k: None)
    log(json.dumps(vars(args), default=str))
    final = os.path.join(args.out, "final")
    if args.resume and os.path.exists(os.path.join(final, "DONE")):
        log(f"{final} is complete: nothing to train")
        return modeling.Transformer.from_pretrained(final, device=device)
    if not args.model:
        raise ValueError("--model is required (a hub-format folder; see the docstring)")
    if args.global_batch % (world * args.micro_batch):
        raise ValueError(f"--global-batch {args.global_batch} must be a multiple of world size x --micro-batch "
                         f"({world} x {args.micro_batch})")
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)

    # --- data -----------------------------------------------------------------------------------
    tok = modeling.Tokenizer.from_pretrained(args.model)
    with open(os.path.join(args.model, "config.json")) as f:
        margs = modeling.ModelArgs.from_hf_config(json.load(f))
    pad = tok.pad_id if tok.pad_id is not None else 0
    dpo = args.objective == "dpo"
    if dpo:
        if args.pairs is None:
            args.pairs = sample_pairs(args, rank, world, device, log)
        rows = data.tokenize_pairs(data.read_pairs(args.pairs), tok, args.max_len, args.max_prompt, log=log)
        check_pairs_match(args.pairs, rows, tok, margs, args.model)
        train_idx = select_kind(rows, args.pairs_kind, args.seed)
        kinds = {k: sum(rows[i]["kind"] == k for i in train_idx) for k in ("naive", "sc")}
        log(f"training pairs ({args.pairs_kind}): {len(train_idx)} = {kinds['naive']} naive + {kinds['sc']} step-controlled"
            + left_out(len(train_idx), args.global_batch))
        collate = lambda ids: data.collate_pairs([rows[i] for i in ids], packed=args.packed, pad_id=pad)
        seq_len = lambda r: len(r["prompt"]) * (1 if args.packed else 2) + len(r["chosen"]) + len(r["rejected"])
    else:
        if not args.data:
            raise ValueError("--objective sft needs --data (records with a solution)")
        recs = load_records(args.data)
        missing = [r["id"] for r in recs if not r.get("solution")]
        if missing:
            raise ValueError(f"--data {args.data}: {len(missing)} records have no solution to train on (e.g. {missing[0]})")
        rows = [r for r in (data.tokenize_sft(r["question"], r["solution"], tok, args.max_len) for r in recs) if r]
        train_idx = list(range(len(rows)))
        log(f"sft examples: {len(rows)} (of {len(recs)}; {len(recs) - len(rows)} prompts too long)"
            + left_out(len(rows), args.global_batch))
        collate = lambda ids: data.collate_sft([rows[i] for i in ids], pad_id=pad)
        seq_len = lambda r: len(r["prompt"]) + len(r["response"])
    steps = batch_order(len(train_idx), args.epochs, args.global_batch, args.seed)
    steps = [[train_idx[i] for i in b] for b in steps][:args.max_steps or None]
    total = len(steps)
    if total == 0:
        raise ValueError(f"{len(train_idx)} training items is less than one global batch ({args.global_batch})")

    # --- model: the policy, and the reference (precomputed once, or a frozen live copy) ------------
    policy = modeling.Transformer.from_pretrained(args.model, dtype=torch.float32)
    policy.checkpointing = args.checkpointing
    n_block_params = sum(p.numel() for p in policy.layers.parameters()) + policy.norm.weight.numel()
    net = shard(SeqLogprobs(policy), device, cuda)
    # AdamW over the sharded parameters (each rank holds and updates 1/world of every tensor)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=tuple(args.adam_betas), weight_decay=args.weight_decay)
    ref, ref_net = None, None
    if dpo and args.ref == "precompute":
        key = hashlib.sha256(json.dumps([model_fingerprint(args.model), sha256_file(args.pairs), args.max_len,
                                         args.max_prompt, str(cuda)]).encode()).hexdigest()[:16]
        cache = f"{args.pairs}.ref-{key}.pt"
        if os.path.exists(cache):
            ref = torch.load(cache)
            log(f"reference log-probs: {cache}")
        else:
            ref = reference_logprobs(net, rows, args, device, rank, world, pad)
            if rank == 0:
                torch.save(ref, cache + ".tmp")
                os.replace(cache + ".tmp", cache)
                log(f"reference log-probs written to {cache}")
    elif dpo:
        ref_model = modeling.Transformer.from_pretrained(args.model, dtype=torch.float32).requires_grad_(False)
        ref_net = shard(SeqLogprobs(ref_model), device, cuda).eval()

    # --- resume -------------------------------------------------------------------------------------
    start = 0
    if args.resume and latest_checkpoint(args.out):
        start = load_checkpoint(latest_checkpoint(args.out), net, opt, rank, args)
        log(f"resumed from {latest_checkpoint(args.out)} at step {start}")

    # --- loop ----------------------------------------------------------------------------------------
    peak = peak_flops(device)
    log_path = os.path.join(args.out, "log.jsonl")
    if args.resume and rank == 0 and os.path.exists(log_path):
        # the killed run logged steps past its checkpoint, which are redone now: keep steps <= start only
        # (a line without its newline was torn by the kill)
        with open(log_path) as f:
            logged = [json.loads(line) for line in f if line.endswith("\n")]
        data.write_jsonl(log_path, [r for r in logged if r["step"] <= start])
    for step in range(start, total):
        t0 = time.time()
        lr = get_lr(step, total, args)
        for g in opt.param_groups:
            g["lr"] = lr
        mine = steps[step][rank::world]                     # this rank's share of the global batch
        sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, acc, r_w, r_l, tokens, targets
        flops = 0
        for ids in micro_batches(mine, args.micro_batch):
            batch = collate(ids)
            if dpo:
                loss, r_w, r_l = pair_losses(net, batch, None if ref is None else ref[ids], ref_net, args, device)
                # the mean over the global batch; FSDP averages gradients over ranks, hence * world
                (loss.sum() * world / args.global_batch).backward()
                sums[:4] += torch.stack([loss.sum(), (r_w > r_l).sum(), r_w.sum(), r_l.sum()]).detach().double()
            else:
                loss = -run_logprobs(net, batch, device).sum()   # summed NLL of the response tokens
                (loss * world / n_sft_tokens(steps[step], rows)).backward()
                sums[0] += loss.detach().double()
            n_tok = sum(seq_len(rows[i]) for i in ids)
            sums[4] += n_tok
            sums[5] += len(batch["tgt"])
            flops += step_flops(margs, n_block_params, n_tok, len(batch["tgt"]), batch["input_ids"].shape[1])
        dist.all_reduce(sums)
        n_items = args.global_batch if dpo else sums[5].item()
        loss_val = sums[0].item() / n_items
        gnorm = nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        gnorm = (gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm).item()
        # both are the same on every rank (all-reduced), so every rank stops here, before opt.step()
        for what, val in (("loss", loss_val), ("gradient norm", gnorm)):
            if not math.isfinite(val):
                raise FloatingPointError(f"step {step + 1}: {what} is {val}; stopping. Last good checkpoint: "
                                         f"{latest_checkpoint(args.out) or 'none (use --save-every)'}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.time() - t0
        rec = {"step": step + 1, "loss": loss_val, "lr": lr, "gnorm": gnorm, "tok/s": sums[4].item() / dt, "dt": dt}
        if dpo:
            rw, rl = sums[2].item() / n_items, sums[3].item() / n_items
            rec.update({"acc": sums[1].item() / n_items, "r_chosen": rw, "r_rejected": rl, "margin": rw - rl})
        if peak:
            rec["mfu"] = flops / dt / peak   # this rank's FLOPs over its own peak
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            line = f"step {step + 1:05d}/{total:05d} | loss {loss_val:.4f}"
            if dpo:
                line += f" | acc {rec['acc']:.3f} | r_chosen {rw:+.4f} | r_rejected {rl:+.4f} | margin {rw - rl:+.4f}"
            line += f" | lr {lr:.2e} | gnorm {rec['gnorm']:.3f} | tok/s {rec['tok/s']:,.0f}"
            log(line + (f" | mfu {100 * rec['mfu']:.1f}%" if peak else ""))
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            save_checkpoint(args.out, net, opt, step + 1, args, rank)
        if args.stop_after and step + 1 >= args.stop_after and step + 1 < total:
            log(f"stopping after step {step + 1} (--stop-after)")
            return None

    # --- export and cleanup ----------------------------------------------------------------------
    export(net, margs, tok, final, torch.bfloat16 if cuda else torch.float32, rank)
    del net, opt, ref_net
    if rank == 0:
        open(os.path.join(final, "DONE"), "w").close()
    log(f"final model: {final}")
    trained = modeling.Transformer.from_pretrained(final, device=device)
    if args.eval:
        import eval as evaluation   # eval.py, the project's evaluation script
        recs = evaluation.load_eval_set(args.eval, args.eval_limit)
        preds = evaluation.evaluate(trained, tok, recs, max_new_tokens=args.max_len - args.max_prompt, rank=rank, world=world)
        if rank == 0:
            data.write_jsonl(os.path.join(args.out, "eval.jsonl"), preds)
            log(evaluation.format_report(evaluation.accuracy_report(preds)))
    return trained


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # No model, no pairs, no objective: the miniature (end of this file), so `python scdpo.py --out X`
    # or `--seeds 3` configure it. `--help` shows the training flags; `--mini --help` the miniature's.
    named = {a.split("=")[0] for a in argv}
    if "--mini" in named or not named & {"--model", "--pairs", "--objective", "-h", "--help"}:
        return miniature(argv)
    train(get_parser().parse_args(argv))
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The miniature: `python scdpo.py` with no arguments shows the whole method on a CPU in about six
# minutes, on data.py's synthetic word problems whose every step is checkable (data.first_wrong_step):
#   1. a word tokenizer and a tiny Transformer, SFT'd from scratch on demonstrations that carry a
#      systematic error (a fraction `--habit` of borrow subtractions forget the borrow), via train()
#   2. naive and step-controlled pairs from the SFT model with sample.make_pairs (the ramp)
#   3. DPO, DPO (data-equal) and SCDPO from the same SFT model on those pairs, via train()
#   4. greedy accuracy on held-out problems (eval.evaluate), the step-localisation metric of the
#      implicit reward (eval.credit_assignment) on SFT samples labelled by the exact checker, and the
#      credit-assignment HTML; then Table 1 in miniature.
#     python scdpo.py                                  # one seed (342 s on an idle 2-core CPU)
#     python scdpo.py --seeds 3                        # mean and spread over 3 seeds (SFT retrained per seed)
#     python scdpo.py --seeds 3 --reuse --lrs 1e-5,2e-5,5e-5   # a learning-rate grid on the same SFT and pairs
#     python scdpo.py --seeds 3 --reuse --cut-rejected # the ablation: no loss after a rejected's first error
#     torchrun --standalone --nproc_per_node=2 scdpo.py --mini
# Each seed's log prints where each rejected solution goes wrong relative to the cut k and how (habit /
# overborrow / other arithmetic / format), and each model's greedy errors by kind. What they show (README,
# "What the miniature shows"): preference training removes most habit errors, and longer runs over-correct
# (plain subtractions start to "borrow"), mostly through the loss on the rejected solutions' steps after
# their first error, which carry the error forward.
# ----------------------------------------------------------------------------------------------
def miniature_parser():
    p = argparse.ArgumentParser(prog="python scdpo.py", description="the miniature: SFT -> pairs -> DPO / DPO "
                                "(data-equal) / SCDPO -> Table 1, on synthetic step-checkable word problems")
    p.add_argument("--mini", action="store_true", help="run the miniature (implied with no arguments)")
    p.add_argument("--out", default="runs/miniature", help="output folder (models, pairs, predictions, credit HTML)")
    p.add_argument("--seeds", type=int, default=1, help="independent repeats (SFT retrained each time): mean and spread")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--reuse", action="store_true", help="keep finished stages found in --out (SFT, pairs, DPO runs of the same settings)")
    # the task: data.py's miniature section
    p.add_argument("--habit", type=float, default=0.7, help="fraction of SFT demos whose borrow subtractions forget the borrow")
    p.add_argument("--overborrow", type=float, default=0.0, help="fraction of SFT demos whose plain subtractions borrow anyway")
    p.add_argument("--n-ops", type=int, default=3, help="additions / subtractions after the product (steps = n_ops + 2)")
    p.add_argument("--n-sft", type=int, default=8000, help="SFT demonstrations")
    p.add_argument("--n-pairs", type=int, default=1500, help="questions to sample pairs for")
    p.add_argument("--n-eval", type=int, default=1000, help="held-out questions for accuracy (greedy)")
    p.add_argument("--n-credit", type=int, default=400, help="held-out SFT samples for the step-localisation metric")
    # the model
    p.add_argument("--dim", type=int, default=96, help="model width")
    p.add_argument("--layers", type=int, default=3, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    # SFT
    p.add_argument("--sft-steps", type=int, default=800, help="SFT optimizer steps")
    p.add_argument("--sft-lr", type=float, default=3e-3, help="SFT peak learning rate")
    p.add_argument("--sft-batch", type=int, default=64, help="SFT examples per step")
    # pairs (sample.make_pairs)
    p.add_argument("--k-max", type=int, default=8, help="naive: samples at T=1 per question at most")
    p.add_argument("--tries", type=int, default=4, help="step-controlled: continuations per cut")
    p.add_argument("--ramp", default="paper", help="temperature ramp: paper (1.1,+0.05,1.4) | scripts | start,inc,max")
    p.add_argument("--sc-per-question", type=int, default=2, help="step-controlled pairs per question at most")
    # preference training (train())
    p.add_argument("--lr", type=float, default=2e-5, help="DPO peak learning rate")
    p.add_argument("--lrs", default=None, help="a learning-rate grid, e.g. 1e-5,2e-5,5e-5: a table each, then each "
                   "method at its best (SFT and pairs are made once per seed)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--nll-weight", type=float, default=1.0, help="per-token NLL on chosen (MINIATURE-NOTES.md)")
    p.add_argument("--epochs", type=int, default=2, help="DPO epochs")
    p.add_argument("--batch", type=int, default=32, help="pairs per DPO step")
    p.add_argument("--cut-rejected", action="store_true", help="ablation: end every rejected solution right after its "
                   "first wrong step (found by the exact checker, which real data lacks), so no loss falls on the steps "
                   "that carry the error forward")
    return p


# The flags that decide the SFT model and the pairs: --reuse keeps those stages only where they match.
MINI_STAGES = ("habit", "overborrow", "n_ops", "n_sft", "n_pairs", "n_eval", "n_credit", "dim", "layers", "heads",
               "sft_steps", "sft_lr", "sft_batch", "k_max", "tries", "ramp", "sc_per_question")


def mini_tag(args):
    """The preference-training settings, in the names of the DPO runs and of each seed's result file."""
    return f"lr{args.lr:g}-nll{args.nll_weight:g}-b{args.beta:g}-ep{args.epochs}-bs{args.batch}" + "-cut" * args.cut_rejected


def mini_settings(args, out):
    """Check (with --reuse) or record <out>/settings.json, the MINI_STAGES flags the seed folder was made with."""
    path, want = os.path.join(out, "settings.json"), {k: getattr(args, k) for k in MINI_STAGES}
    if args.reuse and os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        diff = [f"--{k.replace('_', '-')} {have.get(k)} (now {v})" for k, v in want.items() if have.get(k) != v]
        if diff:
            raise ValueError(f"--reuse: {out} was made with other settings: {', '.join(diff)}; use another --out")
    elif dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        data.write_json(path, want)


def mini_train(extra, reuse):
    """train() with the flags in `extra` (a list) plus the miniature's shared ones."""
    return train(get_parser().parse_args(extra + ["--quiet", "--max-len", "128", "--max-prompt", "100"] + ["--resume"] * reuse))


def mini_accuracy(model, tok, recs, rank, world):
    """(accuracy, rows): eval.evaluate, then every row's first wrong step by the exact checker."""
    import eval as evaluation
    from collections import Counter
    rows = evaluation.evaluate(model, tok, recs, max_new_tokens=48, batch_size=1024, rank=rank, world=world)
    for r in rows:
        r["first_wrong_step"], r["error"] = data.mini_error(r["question"], r["completion"])
        r["borrow"] = any(op == "-" and data.needs_borrow(x, y) for op, x, y, _ in data.mini_nodes(r["question"]))
    return sum(r["correct"] for r in rows) / len(rows), rows


def miniature_seed(args, seed, rank, world, device):
    """One full run; returns the table's numbers for this seed (on rank 0; {} elsewhere)."""
    import eval as evaluation
    import sample
    from collections import Counter
    out = os.path.join(args.out, f"seed{seed}")
    t0 = time.time()
    times = {}
    log = print0
    mini_settings(args, out)
    # --- the task and the tokenizer --------------------------------------------------------------------
    sft_recs = data.mini_dataset(args.n_sft, seed=1000 * seed + 1, habit=args.habit, n_ops=args.n_ops, overborrow=args.overborrow)
    pair_recs = data.mini_dataset(args.n_pairs, seed=1000 * seed + 2, n_ops=args.n_ops, offset=10**6)
    test_recs = data.mini_dataset(args.n_eval + args.n_credit, seed=1000 * seed + 3, n_ops=args.n_ops, offset=2 * 10**6)
    eval_recs, credit_recs = test_recs[:args.n_eval], test_recs[args.n_eval:]
    init = os.path.join(out, "init")
    if rank == 0:
        data.mini_tokenizer(init)
        tok = modeling.Tokenizer.from_pretrained(init)
        torch.manual_seed(seed)
        margs = modeling.ModelArgs(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                                   intermediate_size=4 * args.dim, max_seq_len=256, bos_token_id=tok.bos_id,
                                   eos_token_id=tok.eos_id, rope_theta=10000.0)
        modeling.Transformer(margs).save_pretrained(init)
        data.write_jsonl(os.path.join(out, "sft.jsonl"), sft_recs)
    dist.barrier()
    tok = modeling.Tokenizer.from_pretrained(init)
    # --- 1. SFT from scratch ------------------------------------------------------------------------------
    sft_dir = os.path.join(out, "sft")
    epochs = math.ceil(args.sft_steps * args.sft_batch / len(sft_recs))
    sft = mini_train(["--objective", "sft", "--model", init, "--data", os.path.join(out, "sft.jsonl"), "--out", sft_dir,
                      "--lr", str(args.sft_lr), "--epochs", str(epochs), "--max-steps", str(args.sft_steps),
                      "--global-batch", str(args.sft_batch), "--micro-batch", str(args.sft_batch // world),
                      "--warmup-ratio", "0.05", "--seed", str(seed)], args.reuse).eval()
    sft_path = os.path.join(sft_dir, "final")
    times["sft"] = time.time() - t0
    # --- 2. pairs: naive and step-controlled, sampled by the SFT model (METHOD.md sections 1-2) ------------
    t1 = time.time()
    pairs = os.path.join(out, "pairs.jsonl")
    if not args.reuse and rank == 0:
        shutil.rmtree(pairs + ".parts", ignore_errors=True)   # make_pairs resumes from these
    dist.barrier()
    summary = sample.make_pairs(sft, tok, pair_recs, pairs, chunk=512, rank=rank, world=world, progress=False,
                                fmt="cot", k_max=args.k_max, naive_batch=args.k_max, cut="all", cut_mode="paper",
                                sc_per_question={"mini": args.sc_per_question}, tries=args.tries,
                                ramp=sample.parse_ramp(args.ramp), max_new_tokens=48, delimiter=data.MINI_DELIM, seed=seed)
    dist.barrier()   # rank 0 writes pairs.jsonl after make_pairs' own barrier
    if args.cut_rejected:   # the ablation: every rejected solution ends right after its first wrong step
        cut = os.path.join(out, "pairs-cut.jsonl")
        if rank == 0:
            data.write_jsonl(cut, [data.mini_cut_rejected(p) for p in data.read_pairs(pairs)])
        dist.barrier()
        pairs = cut
    times["pairs"] = time.time() - t1
    # --- 3. DPO, DPO (data-equal), SCDPO from the same SFT model -----------------------------------------------
    res = {}
    for kind, name in (("naive", "DPO"), ("data-equal", "DPO (data-equal)"), ("scdpo", "SCDPO")):
        t1 = time.time()
        res[name] = {"model": mini_train(["--model", sft_path, "--pairs", pairs, "--pairs-kind", kind,
                                          "--out", os.path.join(out, f"{kind}-{mini_tag(args)}"), "--lr", str(args.lr), "--beta", str(args.beta),
                                          "--nll-weight", str(args.nll_weight), "--epochs", str(args.epochs),
                                          "--global-batch", str(args.batch), "--micro-batch", str(args.batch // world),
                                          "--seed", str(seed)], args.reuse).eval()}
        times[name] = time.time() - t1
    # --- 4. evaluation ----------------------------------------------------------------------------------------
    t1 = time.time()
    table = {"SFT": {"model": sft}, **res}
    for name, row in table.items():
        row["acc"], rows = mini_accuracy(row["model"], tok, eval_recs, rank, world)
        row["acc_borrow"] = sum(r["correct"] for r in rows if r["borrow"]) / max(1, sum(r["borrow"] for r in rows))
        row["acc_plain"] = sum(r["correct"] for r in rows if not r["borrow"]) / max(1, sum(not r["borrow"] for r in rows))
        row["errors"] = dict(Counter(r["error"] for r in rows))
        if rank == 0:
            data.write_jsonl(os.path.join(out, f"preds-{name.split()[0].lower()}{'-eq' if 'equal' in name else ''}.jsonl"), rows)
            recount = sum(data.is_equiv(data.extract_answer(r["completion"]), r["gold"]) for r in rows) / len(rows)
            assert abs(recount - row["acc"]) < 1e-12, (name, recount, row["acc"])
    times["eval"] = time.time() - t1
    # credit assignment: the implicit reward of each preference model against the SFT model on the SAME
    # held-out SFT samples (T=1), labelled by the exact checker; the threshold is cross-fitted (eval.py)
    t1 = time.time()
    if rank == 0:
        sols = sample.sample_solutions(sft, tok, [r["question"] for r in credit_recs], n=1, max_new_tokens=48,
                                       temperature=1.0, seed=seed)
        examples = [{"question": r["question"], "steps": data.split_steps(s[0], "cot", data.MINI_DELIM),
                     "label": data.first_wrong_step(r["question"], s[0])} for r, s in zip(credit_recs, sols)]
        examples = [e for e in examples if e["steps"]]
        for name in ("DPO", "DPO (data-equal)", "SCDPO"):
            tag = name.split()[0].lower() + ("-eq" if "equal" in name else "")
            loc = evaluation.credit_assignment(table[name]["model"], sft, tok, examples, args.beta, threshold="fit",
                                               rule="first", html_path=os.path.join(out, f"credit-{tag}.html"),
                                               title=f"{name} vs SFT: implicit reward per token (seed {seed})")
            table[name]["loc"] = loc
    times["credit"] = time.time() - t1
    times["total"] = time.time() - t0
    # --- what the pairs are: where each rejected solution's first wrong step falls -------------------------------
    stats = {}
    if rank == 0:
        ps = data.read_pairs(pairs)
        stats["naive"] = sum(p["kind"] == "naive" for p in ps)
        stats["sc"] = sum(p["kind"] == "sc" for p in ps)
        # where the rejected solution goes wrong, relative to the cut k (naive: k = -1), and how: a habit
        # error, other arithmetic, or format; and for naive pairs, how many steps before that error already
        # differ in wording between chosen and rejected (step-controlled pairs share them by construction)
        for kind in ("naive", "sc"):
            sel = [p for p in ps if p["kind"] == kind]
            errs = [data.mini_error(p["question"], p["prefix"] + p["rejected"]) for p in sel]
            stats[f"{kind}_first_wrong_minus_k"] = dict(sorted(Counter(e[0] - p["k"] for e, p in zip(errs, sel)).items()))
            stats[f"{kind}_error"] = dict(Counter(e[1] for e in errs))
            differ = [sum(a != b for a, b in zip(data.split_steps(p["prefix"] + p["chosen"], "cot", data.MINI_DELIM)[:max(e[0], 0)],
                                                 data.split_steps(p["prefix"] + p["rejected"], "cot", data.MINI_DELIM)))
                      for e, p in zip(errs, sel)]
            stats[f"{kind}_reworded_steps_before_error"] = round(sum(differ) / max(1, len(differ)), 2)
        stats["summary"] = summary
        log(f"[seed {seed}] pairs: {stats['naive']} naive, {stats['sc']} step-controlled | " +
            " | ".join(f"{k} {v}" for k, v in stats.items() if k.startswith(("naive_", "sc_"))) + f" | {json.dumps(summary)}")
        for name, row in table.items():
            log(f"[seed {seed}] {name}: greedy errors by kind {row['errors']}" +
                (f" | localisation (first below threshold) acc_err {row['loc']['acc_err']:.3f} acc_cor {row['loc']['acc_cor']:.3f} "
                 f"F1 {row['loc']['f1']:.3f} thresholds {[round(t, 3) for t in row['loc']['thresholds']]}" if "loc" in row else ""))
        log(f"[seed {seed}] seconds: " + " | ".join(f"{k} {v:.0f}" for k, v in times.items()))
    result = ({name: {k: ({a: b for a, b in v.items() if a not in ("preds", "step_rewards")} if k == "loc" else v)
                      for k, v in row.items() if k != "model"} for name, row in table.items()}, stats, times)
    if rank == 0:
        data.write_json(os.path.join(out, f"result-{mini_tag(args)}.json"), result)
    return result


def miniature(argv):
    """`python scdpo.py [--seeds N ...]`: the miniature, then Table 1 in miniature (see above)."""
    args = miniature_parser().parse_args(argv)
    rank, world, _, device = compute_init()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print0(json.dumps(vars(args)))
    grid = {}
    for i, lr in enumerate([float(x) for x in args.lrs.split(",")] if args.lrs else [args.lr]):
        t0, args.lr, runs = time.time(), lr, []
        args.reuse = args.reuse or i > 0   # later learning rates keep each seed's SFT model and pairs
        for s in range(args.seed, args.seed + args.seeds):
            done = os.path.join(args.out, f"seed{s}", f"result-{mini_tag(args)}.json")
            if args.reuse and os.path.exists(done):   # a finished seed (e.g. run in another process): read it back
                mini_settings(args, os.path.dirname(done))
                with open(done) as f:
                    runs.append(json.load(f))
                print0(f"[seed {s}] read back from {done}")
            else:
                runs.append(miniature_seed(args, s, rank, world, device))
        if rank == 0:
            print(mini_table(args, runs, time.time() - t0), flush=True)
        grid[lr] = runs
    if rank == 0 and len(grid) > 1:
        print(mini_grid(grid))
    dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return runs


def mini_grid(grid):
    """--lrs: mean accuracy of each preference method at each learning rate, then each method at its best one
    (picked on the same held-out problems, so optimistic for every method alike) and SCDPO's lead per seed."""
    names = ["DPO", "DPO (data-equal)", "SCDPO"]
    acc = {lr: {n: [r[0][n]["acc"] for r in runs] for n in names} for lr, runs in grid.items()}
    mean = lambda v: 100 * sum(v) / len(v)
    lines = [f"Learning-rate grid: mean greedy accuracy over {len(next(iter(grid.values())))} seed(s)",
             f"{'lr':<10}" + "".join(f"{n:>18}" for n in names)]
    lines += [f"{lr:<10g}" + "".join(f"{mean(a[n]):>18.1f}" for n in names) for lr, a in acc.items()]
    best = {n: max(acc, key=lambda lr: mean(acc[lr][n])) for n in names}
    lines.append("best lr: " + ", ".join(f"{n} {best[n]:g} ({mean(acc[best[n]][n]):.1f})" for n in names))
    for other in names[:2]:
        d = [100 * (a - b) for a, b in zip(acc[best["SCDPO"]]["SCDPO"], acc[best[other]][other])]
        lines.append(f"  each at its best lr, SCDPO - {other} per seed: " + ", ".join(f"{x:+.1f}" for x in d))
    return "\n".join(lines)


def mini_table(args, runs, seconds):
    """Table 1 in miniature: accuracy (all / borrow problems / the rest), pairs, and localisation F1."""
    names = ["SFT", "DPO", "DPO (data-equal)", "SCDPO"]
    def ms(vals):
        m = sum(vals) / len(vals)
        sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        return f"{100 * m:5.1f}" + (f" ± {100 * sd:3.1f}" if len(vals) > 1 else "")
    n = len(runs)
    lines = [f"Table 1 in miniature: {args.n_eval} held-out problems, greedy; {n} seed(s) "
             f"{'(mean ± std over seeds)' if n > 1 else ''}; {seconds:.0f} s in all",
             f"{'method':<18} {'pairs naive + sc':>17} {'accuracy':>13} {'borrow probs':>13} {'other probs':>13} "
             f"{'loc. F1':>13} {'acc_err/acc_cor':>16}"]
    for name in names:
        rows = [r[0][name] for r in runs]
        if name == "SFT":
            pairs = "-"
        else:
            nv = sum(r[1]["naive"] for r in runs) / n
            sc = sum(r[1]["sc"] for r in runs) / n
            pairs = {"DPO": f"{nv:.0f} + 0", "DPO (data-equal)": f"{nv + sc:.0f} + 0", "SCDPO": f"{nv:.0f} + {sc:.0f}"}[name]
        loc = [x["loc"] for x in rows if "loc" in x]
        f1 = ms([x["f1"] for x in loc]) if loc else "-"
        ae = f"{100 * sum(x['acc_err'] for x in loc) / n:.1f}/{100 * sum(x['acc_cor'] for x in loc) / n:.1f}" if loc else "-"
        lines.append(f"{name:<18} {pairs:>17} {ms([x['acc'] for x in rows]):>13} {ms([x['acc_borrow'] for x in rows]):>13} "
                     f"{ms([x['acc_plain'] for x in rows]):>13} {f1:>13} {ae:>16}")
    if n > 1:
        for name in names[1:]:
            d = [r[0][name]["acc"] - r[0]["SFT"]["acc"] for r in runs]
            lines.append(f"  {name} - SFT per seed: " + ", ".join(f"{100 * x:+.1f}" for x in d))
        d = [r[0]["SCDPO"]["acc"] - r[0]["DPO"]["acc"] for r in runs]
        lines.append("  SCDPO - DPO per seed: " + ", ".join(f"{100 * x:+.1f}" for x in d))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
