"""Step-Controlled DPO (Lu et al. 2024, arXiv 2407.00782): SFT and DPO / SCDPO training on FSDP2.

    python scdpo.py --model PATH --pairs pairs.jsonl --out runs/scdpo          # 1 CPU or 1 GPU
    torchrun --standalone --nproc_per_node=8 scdpo.py --model PATH --pairs pairs.jsonl --out runs/scdpo
    torchrun --standalone --nproc_per_node=8 scdpo.py --model PATH --data gsm8k:train,math:train
        # no --pairs: sample the pairs with sample.py first (cached in --out), then train
    torchrun --standalone --nproc_per_node=8 scdpo.py --objective sft --model PATH --data gsm8k:train
    python mini.py                                   # the whole method in miniature on a CPU

The paper's Table 1 is three runs on the same pairs: --pairs-kind naive, data-equal and scdpo.
Defaults are the paper's (METHOD.md section 3). Every process, one or many, CPU or GPU, runs one
path: a process group (model.compute_init) and FSDP2.
"""
import argparse
import gc
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import data
import eval as evaluation
import model as modeling
import sample
from kernels import token_logprobs
from model import print0


def warn(msg):
    """What the user must see, even with --quiet: on stderr, from rank 0."""
    print0(msg, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The losses (METHOD.md section 3). Pure functions of summed log-probs.
# A pair is (x, y_w, y_l): x the prompt (step-controlled pair: question + the shared steps
# t_0..t_k), y the continuation only. DPO (Rafailov et al. 2023, eq. 7):
#   h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
#   sigmoid:  L = -(1-eps) log sigma(beta h) - eps log sigma(-beta h)
#             dL/dh = -beta [(1-eps) sigma(-beta h) - eps sigma(beta h)]
# eps: label smoothing, the "conservative DPO" of Mitchell 2023; eps = 0 is plain DPO.
# IPO (Azar et al. 2023, eq. 17) regresses the same margin on a fixed target:
#   ipo:      L = (h - 1/(2 beta))^2,   dL/dh = 2 (h - 1/(2 beta))
# Implicit rewards r = beta (log pi - log pi_ref), summed over the continuation (METHOD.md
# section 5), are returned detached, for logging and reward accuracy (r_w > r_l).
# SCDPO changes nothing here: L_SCDPO = L_naive + L_sc is this loss on a batch of both kinds.
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair loss (P,), not reduced: the loop divides by the global batch size, which keeps
    accumulation over micro-batches and ranks exact. Inputs: log-probs summed per continuation."""
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


# Optional NLL term on the chosen continuation ("RPO", Pang et al. 2024, eq. 3), per pair:
#   L_nll = -log pi(y_w|x) / |y_w|,   L = L_dpo + nll_weight * L_nll
def nll_loss(policy_chosen_logps, chosen_ntokens):
    return -policy_chosen_logps / chosen_ntokens.clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Flags. None means "the objective's default" (resolve_defaults; SFT: METHOD.md sec. 3).
def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to train
    p.add_argument("--objective", choices=["dpo", "sft"], default="dpo",
                   help="dpo: preference pairs; sft: next-token loss on solutions")
    p.add_argument("--model", help="hub-format folder of the initial model (config.json, safetensors, "
                   "tokenizer); for dpo also the reference")
    p.add_argument("--pairs", help="pairs JSONL: ours (data.make_pair) or TRL's prompt/chosen/rejected; "
                   "dpo without it samples pairs from --model over --data first")
    p.add_argument("--data", help="sft: records with solutions ('gsm8k:train' or a JSONL); dpo without "
                   "--pairs: the questions to sample pairs for; comma-separated to mix")
    p.add_argument("--limit", type=sample.positive_int, default=None,
                   help="first N records of each --data set")
    p.add_argument("--out", default="runs/scdpo", help="output folder: log.jsonl, checkpoints/, final/")
    p.add_argument("--pairs-kind", choices=["scdpo", "naive", "data-equal"], default="scdpo",
                   help="scdpo: naive + step-controlled pairs; naive: DPO; data-equal: naive pairs "
                   "up-sampled to scdpo's count")
    # the loss
    p.add_argument("--loss", choices=["sigmoid", "ipo"], default="sigmoid", help="DPO (sigmoid) or IPO")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (paper: 0.1; 0.5 for MetaMath-Mistral)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO's eps (sigmoid)")
    p.add_argument("--nll-weight", type=float, default=0.0, help="weight of the per-token NLL on chosen "
                   "(RPO); 0 = plain DPO")
    p.add_argument("--ref", choices=["precompute", "live"], default="precompute",
                   help="precompute: reference log-probs once, cached beside the pairs; live: a frozen copy")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="shared-prompt packing: one row per pair, the prompt computed once")
    # optimisation
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (dpo 1e-7, sft 1e-5)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (dpo 2, sft 3)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps (0: epochs decide)")
    p.add_argument("--global-batch", type=int, default=64, help="pairs (sft: examples) per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward on one rank")
    p.add_argument("--max-len", type=int, default=None, help="tokens per sequence: prompt + one "
                   "continuation (dpo 1024, sft 2048); without --pairs, the pairs are sampled with a budget "
                   "of --max-len minus --max-prompt new tokens per solution or continuation (default 512), "
                   "and a sample that runs out of it is dropped")
    p.add_argument("--max-prompt", type=int, default=512, help="longest prompt; longer pairs are dropped")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup fraction, then cosine")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    # system
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing per block")
    p.add_argument("--seed", type=int, default=42, help="data order and sampling")
    p.add_argument("--save-every", type=int, default=0, help="sharded checkpoint every N steps (0: none)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest "
                   "checkpoint (a finished run is not retrained)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    p.add_argument("--stop-after", type=int, default=0, help="exit after N steps without the final "
                   "export, as a kill would (for tests)")
    p.add_argument("--eval", default=None, help="after training: greedy accuracy on this set (gsm8k, "
                   "math500, FILE ...)")
    p.add_argument("--eval-limit", type=sample.positive_int, default=None, help="first N problems of --eval")
    p.add_argument("--quiet", action="store_true", help="nothing on stdout but the step lines that "
                   "--log-every asks for (log.jsonl still has every step)")
    p.add_argument("--log-every", type=int, default=None, help="the per-step line on every N-th step and the "
                   "last (default 1; with --quiet 0, none)")
    # pair sampling: the stage run without --pairs (as `sample.py pairs`)
    sample.add_pair_flags(p)
    return p


def settings(**kw):
    """The flags as Python values: the parser's defaults with `kw` over them, e.g.
    settings(model="runs/sft/final", pairs="pairs.jsonl", lr=2e-5). An unknown name is an error."""
    defaults = {a.dest: a.default for a in get_parser()._actions if a.dest != "help"}
    unknown = sorted(set(kw) - set(defaults))
    if unknown:
        raise TypeError(f"unknown training setting(s): {', '.join(unknown)}")
    return argparse.Namespace(**{**defaults, **kw})


def resolve_defaults(args):
    sft = args.objective == "sft"
    args.lr = args.lr if args.lr is not None else (1e-5 if sft else 1e-7)
    args.epochs = args.epochs if args.epochs is not None else (3 if sft else 2)
    args.max_len = args.max_len if args.max_len is not None else (2048 if sft else 1024)
    args.log_every = args.log_every if args.log_every is not None else (0 if args.quiet else 1)
    return args


# ----------------------------------------------------------------------------------------------
# Data. Reference log-probs are indexed by row in the WHOLE file, so the three --pairs-kind runs
# share one reference cache. Each global batch is split between ranks by stride (rank r: items
# r, r + W, ...), so every step is the same for any world size.
def select_kind(rows, kind, seed):
    """Indices of the training rows for --pairs-kind (METHOD.md section 3's baselines)."""
    naive = [i for i, r in enumerate(rows) if r["kind"] == "naive"]
    if kind == "scdpo":
        return list(range(len(rows)))
    if kind == "naive":
        return naive
    # data-equal: each naive pair as often as fits in len(rows), the rest a seeded random subset.
    # The paper's baseline has as many DISTINCT naive pairs: sample naive pairs for more questions
    # into their own file and train it with --pairs-kind naive (as mini.py's "DPO (data-equal)" does).
    if not naive:
        raise ValueError("--pairs-kind data-equal needs naive pairs; the file has none")
    reps, rest = divmod(len(rows), len(naive))
    return naive * reps + sorted(random.Random(seed).sample(naive, rest))


def batch_order(n, epochs, global_batch, seed):
    """Global batches (index lists) over `epochs` seeded shuffles of range(n); the last partial batch
    of an epoch is dropped, so every step sees exactly `global_batch` items."""
    steps = []
    for e in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist()
        steps += [perm[i:i + global_batch] for i in range(0, n - global_batch + 1, global_batch)]
    return steps


def left_out(n, global_batch):
    """For the log: batch_order leaves out n % global_batch items of every epoch (others each epoch)."""
    k = n % global_batch
    return f"; {k} per epoch left out (the last partial global batch of {global_batch})" if k else ""


def micro_batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def check_pairs_match(pairs_path, rows, tok, margs, model_dir):
    """Refuse, up front, pairs that are not this model's: token ids past its vocabulary, or a tokenizer
    / model recorded at sampling time (data.write_pairs_meta) other than --model's."""
    top = max((max(r["prompt"] + r["chosen"] + r["rejected"]) for r in rows), default=-1)
    if top >= margs.vocab_size:
        raise ValueError(f"{pairs_path}: tokenised with {tok.vocab_size} ids (largest {top}) but the model "
                         f"has {margs.vocab_size} embeddings: pairs and model do not match")
    meta_path, meta = data.pairs_meta_path(pairs_path), data.read_pairs_meta(pairs_path)
    if meta is not None:
        have = data.model_fingerprint(model_dir)
        for key in ("tokenizer", "model"):
            if key in meta and meta[key] != have[key]:
                raise ValueError(f"{pairs_path}: sampled with {key} {meta[key]} ({meta_path}) but --model "
                                 f"{model_dir} has {key} {have[key]}; the reference must be the model that "
                                 f"sampled the pairs (delete {meta_path} to train anyway)")


def trained_pairs(args):
    """The pairs file a DPO run trains on: --pairs, else the one its sampling stage writes into --out."""
    return args.pairs or os.path.join(args.out, "pairs.jsonl")


def sample_pairs(args, rank, world, device, log):
    """Without --pairs: sample.make_pairs from --model over --data into --out, skipped when complete; a
    killed run resumes by question. Other settings' or model's pairs are refused (--overwrite: redone)."""
    path = trained_pairs(args)
    dtype = compute_dtype(device)
    s = sample.pair_settings(args, max_new_tokens=args.max_len - args.max_prompt)
    # the questions too: pairs of other --data / --limit are not reused
    provenance = {**data.model_fingerprint(args.model), "dtype": str(dtype), "data": args.data,
                  "limit": args.limit}
    stale = sample.progress_mismatch(path + ".parts", sample.progress_record(s, provenance))
    if stale and not args.overwrite:
        raise ValueError(f"{path}.parts {stale}: pass --overwrite to sample the pairs again, or rerun with "
                         f"the recorded settings")
    if stale:
        log(f"pairs: {path}.parts {stale}; --overwrite: sampling them again")
    elif os.path.exists(data.pairs_meta_path(path)):
        log(f"pairs: reusing {path}")
        return path
    if not args.data:
        raise ValueError("--objective dpo needs --pairs, or --data with the questions to sample pairs for")
    recs = data.load_records(args.data, args.limit)
    sample.check_sources(s, recs)   # before minutes of loading the model
    gen_model, tok = modeling.load(args.model, dtype=dtype, device=device)
    summary = sample.make_pairs(gen_model, tok, recs, path, s, rank=rank, world=world, provenance=provenance,
                                restart=bool(stale))
    del gen_model
    if device.type == "cuda":
        torch.cuda.empty_cache()   # the sampler's caches, as blocks of other sizes than training's
    if rank == 0:
        log(f"pairs: {json.dumps(summary)}")
        for w in sample.pair_warnings(summary, f"--max-len (each sample may have --max-len minus "
                                               f"--max-prompt = {s.max_new_tokens} new tokens)"):
            warn(w)
        data.write_pairs_meta(path, args.model, summary)   # written last: marks the stage complete
    dist.barrier()
    return path


# ----------------------------------------------------------------------------------------------
# Log-probs. kernels.token_logprobs gives each target token's log-prob from the final hidden
# states, never the (tokens, vocab) logits; they are summed per segment (2p: pair p's chosen,
# 2p + 1: its rejected; SFT: row p). Prompt positions are not in `idx`: no loss depends on them.
#
# Why a wrapper: FSDP2 gathers parameters, and hooks their gradients, in the forward of the module
# fully_shard was applied to, and the LM head belongs to the root. Outside that forward
# model.lm_head_weight is the sharded DTensor (or a stale unsharded view). So fully_shard goes on
# each block, then on this wrapper, inside whose forward the head is an ordinary parameter.
class SeqLogprobs(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, mask, idx, tgt, seg, n_seg):
        h = self.model(input_ids, positions=positions, mask=mask, return_hidden=True)      # (B, T, D)
        lp = token_logprobs(h.flatten(0, 1)[idx], self.model.lm_head_weight, tgt)          # (N,) fp32
        return segment_sums(lp, seg, n_seg)                                                 # (n_seg,)


def segment_sums(lp, seg, n_seg, onehot=None):
    """sum_i [seg_i = s] lp_i for s < n_seg. CUDA's index_add adds with atomics, in another order each
    run; there (or with onehot=True) it is a one-hot product in float64, the same bits every run."""
    if onehot is None:
        onehot = lp.is_cuda
    if onehot:
        hot = seg[None] == torch.arange(n_seg, device=seg.device)[:, None]                 # (n_seg, N)
        return (hot.double() @ lp.double()).to(lp.dtype)
    return torch.zeros(n_seg, dtype=lp.dtype, device=lp.device).index_add(0, seg, lp)


def run_logprobs(net, batch, device):
    b = {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in batch.items()}
    return net(b["input_ids"], b["positions"], b["mask"], b["idx"], b["tgt"], b["seg"], len(b["lengths"]))


def load_sharded(path, margs, device, trainable=True, checkpointing=False, dtype=torch.float32):
    """SeqLogprobs of the hub model at `path`, stored in `dtype` (fp32: master weights). Built on the
    meta device, sharded, then each rank reads only its rows (model.load_weights): none holds it all."""
    with torch.device("meta"):
        model = modeling.Transformer(margs).to(dtype)
    model.checkpointing = checkpointing
    net = shard(SeqLogprobs(model.requires_grad_(trainable)), device)
    net.to_empty(device=device)
    modeling.load_weights(model, path)
    return net


def shard(net, device):
    """torchtitan's apply_fsdp: bf16 compute with fp32 master weights and fp32 gradient reduction on a
    GPU, fp32 throughout on a CPU; fully_shard on each block, then on the root."""
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype(device), reduce_dtype=torch.float32)
    for block in net.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(net, mp_policy=mp)
    return net


def compute_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def reference_logprobs(net, rows, collate, args, device, rank, world):
    """(len(rows), 2) chosen / rejected log-probs of the frozen initial model, every rank computing a
    stride and an all-reduce assembling them. All ranks run the same number of forwards (FSDP's
    collectives need it): the index list is padded by wrapping around, and the padding is not stored."""
    n, mb = len(rows), args.micro_batch
    per_rank = math.ceil(n / (world * mb)) * mb
    out = torch.zeros(n, 2, dtype=torch.float64, device=device)
    mine = [(rank + world * j) for j in range(per_rank)]
    net.eval()
    for chunk in tqdm(micro_batches(mine, mb), desc="reference log-probs", disable=rank != 0, unit="batch"):
        lp = run_logprobs(net, collate([i % n for i in chunk]), device).view(-1, 2).double()
        keep = torch.tensor([i < n for i in chunk], device=device)
        out[torch.tensor(chunk, device=device)[keep]] = lp[keep]
    net.train()
    net.reshard()   # FSDP2 reshards the root after a backward only: back to the optimizer's shards
    dist.all_reduce(out)   # one rank wrote each row; the others hold 0
    return out.float().cpu()


# ----------------------------------------------------------------------------------------------
# Checkpoints: sharded (torch.distributed.checkpoint, each rank its own shards) into step-N.tmp,
# renamed when complete, so a kill leaves the last good one. The data order and the lr are pure
# functions of the seed and the step: there is no scheduler state to save.
def save_checkpoint(out, net, opt, step, args, rank):
    """The checkpoint of `step` (its path), or None when the disk is full: then the partial files are
    removed, the last good checkpoint is kept, and training goes on (the weights are still in memory)."""
    ckdir = os.path.join(out, "checkpoints")
    path, tmp = os.path.join(ckdir, f"step-{step:06d}"), os.path.join(ckdir, f"step-{step:06d}.tmp")

    def prepare():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

    def write():
        state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
        dcp.save(state, checkpoint_id=tmp)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save(rng, os.path.join(tmp, f"rng-rank{rank}.pt"))

    def commit():
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world": dist.get_world_size(), "args": vars(args),
                       "inputs": run_inputs(args)}, f, indent=1, default=str)
        os.replace(tmp, path)
        for old in glob.glob(os.path.join(ckdir, "step-*")):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)

    for fn in (prepare if rank == 0 else None, write, commit if rank == 0 else None):
        full = failures_on_ranks(fn)
        if full:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)   # frees what the partial files took
                warn(f"WARNING: disk full at {tmp}: the checkpoint of step {step} is not written ({full}); "
                     f"training goes on; last good checkpoint: {latest_checkpoint(out) or 'none'}")
            dist.barrier()
            return None
    return path


def failures_on_ranks(fn):
    """fn() on this rank (None: nothing to do here), then every rank learns what failed: a failure on one
    rank must stop every rank alike, or the next collective hangs. A full disk anywhere is returned (as
    text; "" when none failed); any other failure is raised on every rank."""
    err = mine = None
    try:
        if fn is not None:
            fn()
    except (Exception, CheckpointException) as e:   # CheckpointException is a BaseException
        err = e
        inner = e.failures.values() if isinstance(e, CheckpointException) else [(e,)]
        mine = (dist.get_rank(), "; ".join(str(f[0]) for f in inner).strip(), modeling.is_disk_full(e))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    every = [f for f in every if f is not None]
    if any(not full for _, _, full in every):
        if err is not None and not modeling.is_disk_full(err):
            raise err
        r, text, _ = next(f for f in every if not f[2])
        raise RuntimeError(f"rank {r} failed: {text}")
    return "; ".join(f"rank {r}: {text}" if len(every) > 1 else text for r, text, _ in every)


# Settings that change the result: a resume must match the checkpoint's. The others
# (e.g. --micro-batch, --packed, --checkpointing) change only rounding or speed.
RESUME_MUST_MATCH = ("objective", "model", "pairs", "data", "limit", "pairs_kind", "global_batch", "epochs",
                     "max_steps", "seed", "lr", "min_lr_ratio", "warmup_ratio", "weight_decay", "adam_betas",
                     "grad_clip", "max_len", "max_prompt", "loss", "beta", "label_smoothing", "nll_weight")


def run_inputs(args):
    """Hashes of the files a run trains from: a resume notices a model or pairs file changed in place."""
    pairs = None
    if args.objective == "dpo" and args.pairs:
        pairs = data.sha256_file(args.pairs) if os.path.isfile(args.pairs) else "missing"
    return {"model": data.model_fingerprint(args.model)["model"], "pairs": pairs}


def run_record(args):
    """What a checkpoint's meta.json and a finished run's final/DONE record for a resume to compare."""
    return {"args": json.loads(json.dumps({k: getattr(args, k) for k in RESUME_MUST_MATCH}, default=str)),
            "inputs": run_inputs(args)}


def settings_diff(recorded, args):
    """'--lr 1e-07 (now 0.0005), ...': where `args` differ from a recorded run_record; '' if nowhere."""
    now = run_record(args)
    diff = {f"--{k.replace('_', '-')}": (recorded["args"].get(k), v) for k, v in now["args"].items()
            if recorded["args"].get(k) != v}
    diff.update({f"{k} hash": (v, now["inputs"].get(k)) for k, v in recorded.get("inputs", {}).items()
                 if v != now["inputs"].get(k)})
    return ", ".join(f"{k} {a} (now {b})" for k, (a, b) in diff.items())


def load_checkpoint(path, net, opt, rank, args):
    """Restore a checkpoint in place; returns its step. Refuses one of other settings that change the
    result (RESUME_MUST_MATCH, the model and pairs hashes) or world size (RNG states are per rank)."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    world = dist.get_world_size()
    if meta.get("world", world) != world:
        raise ValueError(f"--resume: {path} was written by {meta['world']} processes, this run has {world}; "
                         f"resume with the same world size (torchrun --nproc_per_node={meta['world']})")
    diff = settings_diff(meta, args)
    if diff:
        raise ValueError(f"--resume: {path} was written with other settings: {diff}")
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


def export(net, margs, tok, path, dtype, rank, record):
    """The hub-format model: the full state dict gathered to rank 0's CPU, loaded into a plain
    Transformer and written there; on a full disk into a fresh folder under $TMPDIR instead, and a
    DiskFull on every rank names both paths."""
    sd = get_model_state_dict(net.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    err = [None]
    if rank == 0:
        with torch.device("meta"):
            plain = modeling.Transformer(margs)
        # Converted while popped, so each fp32 tensor is freed once its copy exists: rank 0 peaks at the
        # fp32 state dict plus one tensor, not at 1.5 times it (42 GB for a 7B model)
        converted = {}
        while sd:
            k, v = sd.popitem()
            converted[k] = v.to(dtype)
        plain.load_state_dict(converted, assign=True)
        if margs.tie_embeddings:
            plain.output.weight = plain.tok_embeddings.weight
        err = [save_model(plain, tok, path, record)]
    dist.broadcast_object_list(err, src=0)
    if err[0]:
        raise modeling.DiskFull(err[0])


def save_model(plain, tok, path, record):
    """Write model and tokenizer to `path`, or on a full disk to a spare folder (marked DONE, holding
    `record`, the run's run_record): None, or what happened."""
    def save(where):
        try:
            plain.save_pretrained(where, stop_ids=tok.stop_ids)
            tok.save_pretrained(where)
            return None
        except Exception as e:
            if not modeling.is_disk_full(e):
                raise
            shutil.rmtree(where, ignore_errors=True)
            return str(e) if isinstance(e, modeling.DiskFull) else f"disk full at {where}: {e}"
    first = save(path)
    if first is None:
        return None
    try:
        spare = os.path.join(tempfile.mkdtemp(prefix="scdpo-final-"), os.path.basename(path))
    except OSError as e:
        return f"{first}; and no spare folder for it ({e}): the trained weights are lost"
    warn(f"WARNING: {first}; writing the trained model to {spare} instead")
    second = save(spare)
    if second:
        shutil.rmtree(os.path.dirname(spare), ignore_errors=True)
        return f"{first}; and {second}: the trained weights are lost"
    data.write_json(os.path.join(spare, "DONE"), record)   # once moved to `path`, a --resume sees it done
    return f"{first}. The trained model is in {spare} instead: free space and move it to {path}"


# ----------------------------------------------------------------------------------------------
# Throughput. Training FLOPs per step (Kaplan et al. / nanoGPT's 6N + attention, adapted):
# every input token goes through the blocks (6 * block params) and attends over its row
# (12 * L * H * hd * T, no causal discount); only target tokens go through the LM head (6 * V * D).
# MFU divides by the GPU's dense bf16 peak: the first entry whose name the device's name contains
# (so PCIe and NVL cards come before the SXM ones). On a CPU it is not reported.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "4090": 165e12}


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
# The two objectives differ only in their rows and their micro-batch loss. A micro-batch's loss
# is its share of the mean over the global batch (pairs for DPO, response tokens for SFT), so the
# sum over micro-batches and ranks is the step's loss.
def dpo_rows(args, tok, margs, rank, world, device, log):
    """Tokenised pairs, the indices to train on (--pairs-kind), and their collate function."""
    if args.pairs is None:
        args.pairs = sample_pairs(args, rank, world, device, log)
    pairs, fmt = data.read_pairs(args.pairs, with_format=True)
    log(f"pairs: {len(pairs)} in {fmt} format from {args.pairs}")
    rows = data.tokenize_pairs(pairs, tok, args.max_len, args.max_prompt, log=log, warn=warn)
    check_pairs_match(args.pairs, rows, tok, margs, args.model)
    items = select_kind(rows, args.pairs_kind, args.seed)
    kinds = {k: sum(rows[i]["kind"] == k for i in items) for k in ("naive", "sc")}
    log(f"training pairs ({args.pairs_kind}): {len(items)} = {kinds['naive']} naive + {kinds['sc']} "
        f"step-controlled" + left_out(len(items), args.global_batch))
    pad = tok.pad_id if tok.pad_id is not None else 0
    return rows, items, lambda ids: data.collate_pairs([rows[i] for i in ids], packed=args.packed, pad_id=pad)


def sft_rows(args, tok, margs, rank, world, device, log):
    """Tokenised solutions (prompt + response), all of them trained on, and their collate function."""
    if not args.data:
        raise ValueError("--objective sft needs --data (records with a solution)")
    recs = data.load_records(args.data, args.limit)
    missing = [r["id"] for r in recs if not r.get("solution")]
    if missing:
        raise ValueError(f"--data {args.data}: {len(missing)} records have no solution to train on "
                         f"(e.g. {missing[0]})")
    rows = [data.tokenize_sft(r["question"], r["solution"], tok, args.max_len) for r in recs]
    rows = [r for r in rows if r]
    top = max((max(r["prompt"] + r["response"]) for r in rows), default=-1)
    if top >= margs.vocab_size:   # an embedding lookup past the table: on a GPU a bare device assert
        raise ValueError(f"--data {args.data}: tokenised with {tok.vocab_size} ids (largest {top}) but "
                         f"--model {args.model} has {margs.vocab_size} embeddings: tokenizer and model "
                         f"do not match")
    log(f"sft examples: {len(rows)} (of {len(recs)}; {len(recs) - len(rows)} prompts too long)"
        + left_out(len(rows), args.global_batch))
    pad = tok.pad_id if tok.pad_id is not None else 0
    return rows, list(range(len(rows))), lambda ids: data.collate_sft([rows[i] for i in ids], pad_id=pad)


def dpo_objective(args, net, rows, collate, rank, world, device, log):
    """The micro-batch loss of DPO / SCDPO (+ NLL) against the reference (--ref: cached or a live copy)."""
    ref, ref_net = None, None
    if args.ref == "precompute":
        # The key holds all that changes the numbers: model, pairs, cuts, dtype (bf16 on a GPU) and
        # --packed (in bf16 other kernels and GEMM shapes: the other layout's cache makes policy !=
        # reference at step 0). --micro-batch and world size only regroup rows: they share the cache.
        key = hashlib.sha256(json.dumps([data.model_fingerprint(args.model), data.sha256_file(args.pairs),
                                         args.max_len, args.max_prompt, str(device.type == "cuda"),
                                         args.packed]).encode()).hexdigest()[:16]
        keys = [None] * world
        dist.all_gather_object(keys, key)   # rank 0's cache below must be for every rank's files
        if any(k != keys[0] for k in keys):
            raise ValueError(f"the ranks see different --model or --pairs files (reference cache keys "
                             f"{keys}): every rank must read the same ones")
        cache = f"{args.pairs}.ref-{key}.pt"
        # in --out where the pairs' folder is not writable (checked first, so no work is lost)
        spare = os.path.join(args.out, os.path.basename(cache))

        # Rank 0 alone looks and reads, and sends the (pairs, 2) floats: no shared file system needed.
        def look():
            found = next((c for c in (cache, spare) if os.path.exists(c)), None)
            return found, (torch.load(found) if found else None)
        found, ref = on_rank0(look)
        if found:
            log(f"reference log-probs: {found}")
        else:
            if rank == 0 and (why := not_writable(os.path.dirname(cache))):
                warn(f"reference log-probs: cannot write beside the pairs ({os.path.dirname(cache) or '.'}: "
                     f"{why}); caching them in {spare}")
                cache = spare
            ref = reference_logprobs(net, rows, collate, args, device, rank, world)
            if rank == 0:
                save_reference(ref, cache, log)
    else:
        margs = modeling.read_config(args.model)[1]
        # frozen: kept in the compute dtype, half fp32's memory and the same numbers (FSDP computes in it)
        ref_net = load_sharded(args.model, margs, device, trainable=False, dtype=compute_dtype(device)).eval()

    def loss(batch, ids, step_ids):
        lp = run_logprobs(net, batch, device)
        pc, pr = lp[0::2], lp[1::2]
        if ref_net is not None:
            with torch.no_grad():
                ref_lps = run_logprobs(ref_net, batch, device).view(-1, 2)
            ref_net.reshard()   # no backward follows, so free the root's gathered parameters now
        else:
            ref_lps = ref[ids].to(device)
        per_pair, r_w, r_l = dpo_loss(pc, pr, *ref_lps.unbind(1), args.beta, args.loss, args.label_smoothing)
        if args.nll_weight:
            per_pair = per_pair + args.nll_weight * nll_loss(pc, batch["lengths"][0::2].to(device))
        part = per_pair.sum() / args.global_batch
        stats = torch.stack([per_pair.sum(), (r_w > r_l).sum(), r_w.sum(), r_l.sum()]) / args.global_batch
        return part, stats.detach()
    return loss


def not_writable(folder):
    """None when a file can be created in `folder`, else why not, in the OS's words."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder or ".", prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
        return None
    except OSError as e:
        return e.strerror or str(e)


def save_reference(ref, cache, log):
    """Write the reference cache atomically; a failed write (a full disk) costs the cache, not the run."""
    tmp = f"{cache}.tmp-{uuid.uuid4().hex[:8]}"   # its own: concurrent runs may write the same cache
    try:
        torch.save(ref, tmp)
        os.replace(tmp, cache)
        log(f"reference log-probs written to {cache}")
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = "disk full: " if modeling.is_disk_full(e) else ""
        warn(f"WARNING: reference log-probs not cached at {cache} ({full}{e}); training goes on with them in "
             f"memory, and a rerun computes them again")


def sft_objective(args, net, rows, collate, rank, world, device, log):
    """The micro-batch loss of SFT: the summed NLL of the response tokens over the global batch's count."""
    def loss(batch, ids, step_ids):
        n_tokens = sum(len(rows[i]["response"]) for i in step_ids)   # the whole step, on whichever rank
        part = -run_logprobs(net, batch, device).sum() / n_tokens
        return part, torch.stack([part.detach(), *[torch.zeros((), device=device)] * 3])
    return loss


# ----------------------------------------------------------------------------------------------
# Training
def check_settings(args, world):
    if not args.model:
        raise ValueError("--model is required (a hub-format folder; for the demo on a CPU: python mini.py)")
    modeling.check_folder(args.model)
    if args.global_batch < 1 or args.micro_batch < 1 or args.global_batch % (world * args.micro_batch):
        raise ValueError(f"--global-batch {args.global_batch} must be a positive multiple of world size x "
                         f"--micro-batch ({world} x {args.micro_batch})")
    if args.log_every < 0:
        raise ValueError(f"--log-every {args.log_every} must be 0 (no step lines) or positive")
    if args.objective == "dpo" and not 0 < args.max_prompt < args.max_len:
        raise ValueError(f"--max-prompt {args.max_prompt} must be positive and less than --max-len "
                         f"{args.max_len} (each continuation gets --max-len minus --max-prompt tokens)")


def on_rank0(fn):
    """fn() run on rank 0, its value sent to every rank: for what is decided from files. Ranks that
    looked for themselves could disagree (a file on node-local disk, or written between two ranks'
    looks) and run collectives the others never join: a hang until SCDPO_TIMEOUT. An error of fn
    is raised on every rank, not on rank 0 alone while the others wait."""
    out = [None]
    if dist.get_rank() == 0:
        try:
            out = [(fn(), None)]
        except modeling.EXPECTED_ERRORS as e:
            out = [(None, e)]
    dist.broadcast_object_list(out, src=0)
    value, error = out[0]
    if error is not None:
        raise error
    return value


def prepare_out(args, rank):
    """A new run never mixes with an old one in --out: refused without --resume or --overwrite;
    --overwrite first removes the old run, so that no stale final/DONE marks a later run complete."""
    old = [f for f in ("log.jsonl", "checkpoints", "final") if os.path.exists(os.path.join(args.out, f))]
    if old and not args.resume and not args.overwrite:
        raise FileExistsError(f"--out {args.out} holds an earlier run ({', '.join(old)}): pass --resume to "
                              f"continue it or --overwrite to start over")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if args.overwrite and not args.resume:
            for f in old + ["final.tmp"]:
                path = os.path.join(args.out, f)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
    dist.barrier()


def train(args, return_model=True):
    """Train as the flags say (get_parser().parse_args(...) or settings(...)). Returns the final model, a
    plain Transformer from <out>/final on every rank; None after --stop-after or without return_model
    (the command line, which loads it for --eval only). Raises on a non-finite loss or gradient norm."""
    args = resolve_defaults(args)
    rank, world, _, device = modeling.compute_init()
    cuda = device.type == "cuda"
    check_settings(args, world)
    log = print0 if not args.quiet else (lambda *a, **k: None)
    final = os.path.join(args.out, "final")
    done = os.path.join(final, "DONE")   # holds the finished run's run_record (empty: an older run's)

    def finished():   # None: no finished run in --out; else where its settings differ ("": nowhere)
        if not os.path.exists(done):
            return None
        if not os.path.getsize(done):
            return ""
        # compared as the run recorded it: dpo_rows sets args.pairs to the file it trains on
        pairs = trained_pairs(args) if args.objective == "dpo" else args.pairs
        return settings_diff(modeling.read_json(done), argparse.Namespace(**{**vars(args), "pairs": pairs}))
    diff = on_rank0(finished) if args.resume else None
    if diff:
        raise ValueError(f"--resume: {final} was trained with other settings: {diff}; --overwrite trains "
                         f"anew")
    if diff == "":
        log(f"{final} is complete: nothing to train")
        return modeling.Transformer.from_pretrained(final, device=device) if return_model else None
    prepare_out(args, rank)
    log(json.dumps(vars(args), default=str))
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)

    # --- data -----------------------------------------------------------------------------------
    tok = modeling.Tokenizer.from_pretrained(args.model)
    margs = modeling.read_config(args.model)[1]
    dpo = args.objective == "dpo"
    rows, items, collate = (dpo_rows if dpo else sft_rows)(args, tok, margs, rank, world, device, log)
    order = batch_order(len(items), args.epochs, args.global_batch, args.seed)
    steps = [[items[i] for i in b] for b in order][:args.max_steps or None]
    total = len(steps)
    if total == 0:
        raise ValueError(f"{len(items)} training items is less than one global batch ({args.global_batch})")

    # --- model, optimizer, the objective's loss --------------------------------------------------
    net = load_sharded(args.model, margs, device, checkpointing=args.checkpointing)   # fp32 master weights
    n_block_params = sum(p.numel() for p in net.model.layers.parameters()) + net.model.norm.weight.numel()
    # each rank holds and updates 1/world of every tensor
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=tuple(args.adam_betas),
                            weight_decay=args.weight_decay)
    loss_fn = (dpo_objective if dpo else sft_objective)(args, net, rows, collate, rank, world, device, log)

    # --- resume ------------------------------------------------------------------------------------
    start, log_path = 0, os.path.join(args.out, "log.jsonl")
    ckpt = on_rank0(lambda: latest_checkpoint(args.out)) if args.resume else None
    if ckpt:
        start = load_checkpoint(ckpt, net, opt, rank, args)
        log(f"resumed from {ckpt} at step {start}")
    if args.resume and rank == 0 and os.path.exists(log_path):
        # steps past the checkpoint are redone: keep those <= start, and no line torn by the kill
        logged = data.read_jsonl(log_path, torn=True)
        data.write_jsonl(log_path, [r for r in logged if r["step"] <= start])

    # --- loop ----------------------------------------------------------------------------------------
    peak = peak_flops(device)
    for step in range(start, total):
        t0 = time.time()
        lr = get_lr(step, total, args)
        for g in opt.param_groups:
            g["lr"] = lr
        sums = torch.zeros(5, dtype=torch.float64, device=device)   # loss, acc, r_w, r_l, tokens
        flops = 0
        for ids in micro_batches(steps[step][rank::world], args.micro_batch):   # this rank's share
            batch = collate(ids)
            part, stats = loss_fn(batch, ids, steps[step])
            (part * world).backward()   # FSDP averages gradients over ranks, hence * world
            n_tok = sum(row_tokens(rows[i], args) for i in ids)
            sums[:4] += stats.double()
            sums[4] += n_tok
            flops += step_flops(margs, n_block_params, n_tok, len(batch["tgt"]), batch["input_ids"].shape[1])
        dist.all_reduce(sums)
        loss_val = sums[0].item()
        clip = args.grad_clip if args.grad_clip > 0 else float("inf")
        gnorm = nn.utils.clip_grad_norm_(net.parameters(), clip)
        gnorm = (gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm).item()
        # loss and gnorm are the same on every rank: all ranks stop here together, before opt.step()
        for what, val in (("loss", loss_val), ("gradient norm", gnorm)):
            if not math.isfinite(val):
                raise FloatingPointError(f"step {step + 1}: {what} is {val}; stopping. Last good checkpoint: "
                                         f"{latest_checkpoint(args.out) or 'none (use --save-every)'}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.time() - t0
        rec = {"step": step + 1, "loss": loss_val, "lr": lr, "gnorm": gnorm, "tok/s": sums[4].item() / dt,
               "dt": dt}
        if dpo:
            rw, rl = sums[2].item(), sums[3].item()
            rec.update({"acc": sums[1].item(), "r_chosen": rw, "r_rejected": rl, "margin": rw - rl})
        if peak:
            rec["mfu"] = flops / dt / peak   # this rank's FLOPs over its own peak
        if rank == 0:
            append_log(log_path, rec)
            if args.log_every and ((step + 1) % args.log_every == 0 or step + 1 == total):
                print0(log_line(rec, total))
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            save_checkpoint(args.out, net, opt, step + 1, args, rank)
        if args.stop_after and step + 1 >= args.stop_after and step + 1 < total:
            log(f"stopping after step {step + 1} (--stop-after)")
            return None

    # --- export, and the optional evaluation --------------------------------------------------------
    record = run_record(args)
    export(net, margs, tok, final, compute_dtype(device), rank, record)
    # Free the trained shards (and a live reference) before --eval loads the full model. The last loss's
    # graph (FSDP hooks) and `g` refer to them too, and FSDP2's modules and state form cycles: gc frees them.
    net = opt = loss_fn = part = g = None   # not `del`: part and g exist only if a step ran
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if rank == 0:
        data.write_json(done, record)
    log(f"final model: {final}")
    if not (return_model or args.eval):
        return None
    trained = modeling.Transformer.from_pretrained(final, device=device)
    if args.eval:
        recs = data.load_records(args.eval, args.eval_limit)
        preds = evaluation.evaluate(trained, tok, recs, max_new_tokens=args.max_len - args.max_prompt,
                                    rank=rank, world=world, static=args.static, progress=not args.quiet,
                                    fmt=args.fmt)
        if rank == 0:
            data.write_jsonl(os.path.join(args.out, "eval.jsonl"), preds)
            log(evaluation.format_report(evaluation.accuracy_report(preds)))
    return trained if return_model else None


def append_log(path, rec):
    """One line of log.jsonl. On a full disk the line is lost (and said), not the run; the file is cut
    back to whole lines, so that the next line does not continue a torn one."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:
        if not modeling.is_disk_full(e):
            raise
        if os.path.exists(path):
            os.truncate(path, size)
        warn(f"WARNING: disk full at {path}: step {rec['step']} is not logged ({e})")


def row_tokens(row, args):
    """Tokens one item puts through the model (a packed pair's prompt once, unpacked twice)."""
    if "response" in row:
        return len(row["prompt"]) + len(row["response"])
    return len(row["prompt"]) * (1 if args.packed else 2) + len(row["chosen"]) + len(row["rejected"])


def log_line(rec, total):
    """nanochat's one pipe-separated line per step."""
    line = f"step {rec['step']:05d}/{total:05d} | loss {rec['loss']:.4f}"
    if "acc" in rec:
        line += (f" | acc {rec['acc']:.3f} | r_chosen {rec['r_chosen']:+.4f} | r_rejected "
                 f"{rec['r_rejected']:+.4f} | margin {rec['margin']:+.4f}")
    line += f" | lr {rec['lr']:.2e} | gnorm {rec['gnorm']:.3f} | tok/s {rec['tok/s']:,.0f}"
    return line + (f" | mfu {100 * rec['mfu']:.1f}%" if "mfu" in rec else "")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.model:
        parser.error("--model is required (a hub-format folder); to run the whole method in miniature on "
                     "a CPU: python mini.py")
    train(args, return_model=False)
    modeling.compute_cleanup()


if __name__ == "__main__":
    modeling.run_main(main, oom="out of memory: lower --micro-batch (the global batch stays, and with it the "
                                "run, up to rounding) or add --checkpointing; for the sampling stage (no "
                                "--pairs), sample first with sample.py pairs and a smaller --chunk")
