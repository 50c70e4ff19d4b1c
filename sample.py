"""Sampling for Step-Controlled DPO: a batched, KV-cached sampler with a per-step temperature
ramp (code blocks run in sandbox.Kernel as they are sampled), and the pair pipeline.

    python sample.py pairs --model PATH --data gsm8k:train,math:train --out pairs.jsonl
    python sample.py pairs --model PATH --data math:train --fmt code --k-max 100 --ramp scripts --cut random
    torchrun --standalone --nproc_per_node=8 sample.py pairs --model PATH --data gsm8k:train --out pairs.jsonl

The pipeline (METHOD.md sections 1-2), per question:
  1. The naive pair: sample at temperature 1 until there is a preferred and a
     dispreferred solution, or --k-max samples.
  2. Step-controlled pairs: cut the preferred solution after an eligible step (--cut),
     continue --tries times with the ramp T_j = min(start + j * inc, max), keep the first
     wrong, clean continuation; at most --sc-per-question pairs, and only for questions
     with a naive pair (--sc-from naive, the paper's D_naive).

Progress is kept in <out>.parts/: rerun a killed run's command to go on; other settings
or another model are refused (--restart starts over). <out>.meta.json records the
model's hashes, so scdpo.py refuses to train a different model on these pairs.
"""
import argparse
import itertools
import json
import os
import random
import shutil
import sys
import time
import uuid
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import data
import model as modeling
from sandbox import Kernel

# ----------------------------------------------------------------------------------------------
# Sampling: small pure functions (gpt-fast style) around the model's preallocated KV cache
# ----------------------------------------------------------------------------------------------
# The temperature ramp of METHOD.md section 2: T_j = min(start + j * inc, max) for a row's j-th step.
RAMPS = {"paper": (1.1, 0.05, 1.4), "scripts": (1.1, 0.1, 1.4)}


def parse_ramp(s):
    """'paper' | 'scripts' | 'start,inc,max' -> (start, inc, max); ValueError for anything else."""
    if s in RAMPS:
        return RAMPS[s]
    try:
        ramp = tuple(float(x) for x in s.split(","))
    except ValueError:
        ramp = ()
    if len(ramp) != 3 or ramp[0] <= 0 or ramp[1] < 0 or ramp[2] <= 0:
        raise ValueError(f"ramp {s!r}: expected paper, scripts or start,inc,max (start, max > 0, inc >= 0)")
    return ramp


def logits_to_probs(logits, temperature, top_k=0, top_p=1.0):
    """(B, V) logits, (B,) temperatures > 0 -> float32 probabilities, top-k then top-p, renormalised."""
    logits = logits.float() / temperature[:, None]
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        p, idx = torch.sort(probs, dim=-1, descending=True)
        drop = (p.cumsum(-1) - p) >= top_p          # the mass before this token already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits, temperature, u, top_k=0, top_p=1.0):
    """Next ids (B,): argmax where temperature == 0, else the inverse CDF at the uniform u (B,).
    u comes from each row's own generator: a row's samples do not depend on its batch."""
    greedy = logits.argmax(-1)
    hot = temperature > 0   # no early return when no row is hot: hot.any() would sync with the host
    probs = logits_to_probs(logits, temperature.clamp_min(1e-6), top_k, top_p)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return torch.where(hot, idx.clamp_max(logits.shape[-1] - 1), greedy)


def forward_step(model, cache, state, seqs):
    """Append tokens to the live rows (cache.rows; None: all); return the logits after each row's
    last token, (len(seqs), V). seqs: a token list per row (the ragged prefill, execution output),
    or in the decode step a (rows,) device tensor. Every row writes the same T slots: a shorter
    row is right-aligned, its leading slots holes (state.valid False) that no query attends."""
    dev, c0 = state.valid.device, state.cache_pos
    rows = slice(None) if cache.rows is None else cache.rows
    if torch.is_tensor(seqs):   # the decode step: one real token a row, the mask is the valid slots
        state.valid[rows, c0] = True
        pos = state.npos[rows][:, None]                                 # (B, 1)
        h = model(seqs[:, None], positions=pos, mask=state.valid[:, None, :c0 + 1], cache=cache, cache_pos=c0,
                  return_hidden=True, rope=(state.rope[0][pos], state.rope[1][pos]))   # (B, 1, 1, hd) each
        state.npos[rows] += 1
        state.cache_pos = c0 + 1
        return model.output(h[:, -1])
    T = max(len(s) for s in seqs)
    if c0 + T > cache.max_len:   # execution output made the rows longer than planned: grow the cache
        n = max(c0 + T, 2 * cache.max_len) - cache.max_len
        grow = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], n, t.shape[3])], 2)
        cache.k, cache.v = [grow(k) for k in cache.k], [grow(v) for v in cache.v]
        state.valid = torch.cat([state.valid, state.valid.new_zeros(cache.batch_size, n)], 1)
        state.rope = model.rope_table(cache.max_len)   # a row's position never passes its slot
    ids = torch.tensor([[0] * (T - len(s)) + list(s) for s in seqs], dtype=torch.long, device=dev)
    real = torch.arange(T, device=dev) >= torch.tensor([T - len(s) for s in seqs], device=dev)[:, None]
    pos = state.npos[rows][:, None] + (real.cumsum(1) - 1).clamp_min(0)   # (B, T), on from each row's npos
    state.valid[rows, c0:c0 + T] = real
    slots = torch.arange(c0 + T, device=dev)
    q = c0 + torch.arange(T, device=dev)
    # a query sees the valid slots up to its own; a hole sees only itself, so its output stays finite
    mask = (state.valid[:, None, :c0 + T] & (slots <= q[:, None])) | (slots == q[:, None])   # (Bc, T, S)
    h = model(ids, positions=pos, mask=mask, cache=cache, cache_pos=c0, return_hidden=True,
              rope=tuple(t[pos] for t in state.rope))
    state.npos[rows] += real.sum(1)
    state.cache_pos = c0 + T
    return model.output(h[:, -1])


class _State:
    """The sampler's side of the cache, per cache row: which slots hold real tokens, the next position."""

    def __init__(self, B, max_len, device, rope):
        self.valid = torch.zeros(B, max_len, dtype=torch.bool, device=device)
        self.npos = torch.zeros(B, dtype=torch.long, device=device)
        self.cache_pos = 0
        self.rope = rope   # model.rope_table(max_len): positions never exceed slots

    def compact(self, keep):
        self.valid, self.npos = self.valid[keep], self.npos[keep]

    def spread(self, n):   # as KVCache.spread
        valid, npos = self.valid.view(-1, n, self.valid.shape[1]), self.npos.view(-1, n)
        valid[:, 1:], npos[:, 1:] = valid[:, :1], npos[:, :1]


class _StaticStep:
    """The decode step in shapes that never change: every cache row over every slot (state.valid
    masks the unwritten ones), the slot index a device tensor; finished rows decode tokens nobody
    reads. On a GPU it is captured once as a CUDA graph and replayed: one launch for ~50 kernel
    launches per layer, as a small model's decode step is launch-bound (gpt-fast's idea, without
    torch.compile)."""

    def __init__(self, model, cache, state):
        self.model, self.cache, self.state = model, cache, state
        self.tok = torch.zeros(cache.batch_size, dtype=torch.long, device=state.valid.device)
        self.slot = torch.tensor([state.cache_pos], device=state.valid.device)
        self.graph = self.out = None

    def _run(self):
        s, pos = self.state, self.state.npos[:, None]   # a view: the replays see npos as it is then
        h = self.model(self.tok[:, None], positions=pos, mask=s.valid[:, None], cache=self.cache,
                       cache_pos=self.slot, return_hidden=True, rope=(s.rope[0][pos], s.rope[1][pos]))
        return self.model.output(h[:, -1])

    def __call__(self, rid, nxt):
        """Feed the new ids `nxt` of the live rows `rid`; returns their logits (len(rid), V)."""
        s = self.state
        self.tok[rid] = nxt
        s.valid[:, s.cache_pos] = True
        if not self.tok.is_cuda:
            out = self._run()
        else:
            if self.graph is None:
                side = torch.cuda.Stream()   # warm up off the capture (kernels chosen, workspaces allocated)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._run()              # writes this step's slot, which the replay writes again
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.out = self._run()
            self.graph.replay()
            out = self.out
        s.npos += 1
        s.cache_pos += 1
        self.slot += 1
        return out if len(rid) == len(self.tok) else out[rid]


# Finished rows stay in the cache, skipped, until the live rows are at most this fraction of it;
# then the live rows move together. So attention over dead rows costs at most 1 / COMPACT_BELOW
# times the live rows', and the cache is copied ~log2(batch) times, not once a row.
COMPACT_BELOW = 0.5


def _rows_tensor(keep, dev):
    """A host list of row indices on the device with no host sync (pinned memory, an asynchronous copy)."""
    t = torch.tensor(keep, dtype=torch.long)
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t


class _Row:
    """Host-side bookkeeping of one sample: its tokens, its decoded text, its step count j, its kernel."""

    def __init__(self, rid, context):
        self.rid, self.ids = rid, []
        self.ctx, self.off, self.read = list(context), 0, len(context)   # incremental detokenization
        self.text, self.scan, self.steps, self.in_code, self.kernel = "", 0, 0, False, None
        self.temps, self.finish = [], None

    def detok(self, tok):
        """Text of the tokens added since the last call (held back while it ends in a partial character).
        Decoding a window that starts a few tokens back keeps SentencePiece's leading spaces right."""
        ids = self.ctx + self.ids
        before = tok.decode(ids[self.off:self.read])
        now = tok.decode(ids[self.off:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.off, self.read = self.read, len(ids)
        return now[len(before):]


def _scan_steps(row, fmt, delimiter):
    """Count in row.steps the step boundaries written since the last scan: each `delimiter` (cot), or
    each CODE_START and closing fence (code: data.FENCE_CLOSE, as split_steps reads them, once the
    fence's line is whole). Returns the code of a code block just closed, else None."""
    code = None
    while True:
        if fmt == "code" and row.in_code:
            m = data.FENCE_CLOSE.search(row.text, row.scan)
            if m is None or not m.group().endswith("\n"):   # none yet, or its line goes on
                row.scan = max(row.scan, row.text.rfind("\n") + 1)
                return code
            i, end = m.span()
            code = row.text[row.text.rfind(data.CODE_START, 0, i) + len(data.CODE_START):i]
        else:
            d = delimiter if fmt == "cot" else data.CODE_START
            i = row.text.find(d, row.scan)
            if i < 0:
                row.scan = max(row.scan, len(row.text) - len(d) + 1)
                return code
            end = i + len(d)
        if fmt == "code":
            row.in_code = not row.in_code
        row.steps, row.scan = row.steps + 1, end


@dataclass(frozen=True)
class Sampling:
    """How generate() decodes. temperature 0 is greedy. `ramp` (start, inc, max) replaces it: a row's
    j-th step is sampled at min(start + j * inc, max), j counting the step boundaries in its own text.
    A row ends at an end-of-turn id, a `stop` string, or max_new_tokens new tokens (execution output
    included). fmt "code": each closed code block runs in the row's kernel, its output appended.
    `static` (_StaticStep): the plain step's logits up to float rounding."""
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    ramp: tuple | None = None
    stop: tuple = ()
    fmt: str = "cot"
    delimiter: str = "\n\n"
    static: bool = False

    def __post_init__(self):
        if self.static and self.fmt == "code":   # execution output makes the rows' steps uneven
            raise ValueError("static decoding does not run code (--static needs --fmt cot)")


# inference_mode, not no_grad: no version counters or view tracking, ~10% off a small model's
# decode step (~200 tiny ops). Safe, as no tensor made here leaves (rows come back as lists).
@torch.inference_mode()
def generate(model, prompts, cfg=Sampling(), n=1, seed=None, tok=None, eos_id=None, setup=None, sandbox=None):
    """n continuations of each of `prompts` (token-id lists, any lengths), sampled as `cfg` says.
    Returns len(prompts) * n _Rows, prompt-major: ids, text (when read), per-token `temps`, `steps`,
    `finish` (eos | stop | length). eos_id: an id or a list (default tok.stop_ids). `tok` is needed
    for stop strings, the ramp and code. `sandbox()` makes a row's kernel; `setup` (per prompt, the
    code blocks of a step-controlled prefix) runs in it before the row's first block.
    Row r draws its noise from its own generator, seeded (seed, r), or (seed[p], i) with per-prompt
    seeds: n=3 gives the rows of the prompt given three times."""
    if not prompts:
        return []
    max_new_tokens, ramp, stop = cfg.max_new_tokens, cfg.ramp, list(cfg.stop)
    dev = model.output.weight.device
    if seed is None:
        seed = int(torch.randint(2**31, ()))
    per_prompt = isinstance(seed, (list, tuple))
    seeds = list(seed) if per_prompt else [seed] * len(prompts)
    if eos_id is None:
        eos_id = tok.stop_ids if tok is not None else model.args.eos_token_id
    eos = set([eos_id] if isinstance(eos_id, int) else eos_id or [])
    if tok is None and (stop or ramp or cfg.fmt == "code"):
        raise ValueError("stop strings, the ramp and code execution need tok")
    B = len(prompts) * n
    max_len = max(len(p) for p in prompts) + max_new_tokens + 1
    cache = model.make_cache(B, max_len)   # the one cache of all B rows: never a second alive beside it
    state = _State(B, max_len, dev, model.rope_table(max_len))
    if n > 1:   # prefill only the first of each prompt's n rows
        cache.rows = torch.arange(0, B, n, device=dev)
    logits = forward_step(model, cache, state, [list(p) for p in prompts])
    if n > 1:
        cache.spread(n, state.cache_pos)
        state.spread(n)
        cache.rows, logits = None, logits.repeat_interleave(n, 0)
    greedy = ramp is None and cfg.temperature == 0
    static = _StaticStep(model, cache, state) if cfg.static else None
    rows = [_Row(r, prompts[r // n][-6:]) for r in range(B)]
    if not greedy:   # greedy decoding draws no noise
        noise = torch.empty(B, max_new_tokens)
        for r in range(B):
            g = torch.Generator().manual_seed(seeds[r // n] * 1_000_003 + (r % n if per_prompt else r))
            noise[r] = torch.rand(max_new_tokens, generator=g)
        noise = noise.to(dev)
    rid = torch.arange(B, device=dev)           # the row id of each live row
    temperature = torch.full((B,), float(cfg.temperature), device=dev)   # each row's, when no ramp
    active = list(rows)
    step = 0   # each live row's draws so far: it samples one token an iteration
    # detokenize only for what reads the text: stop strings, the ramp's steps, code blocks
    watch_text = tok is not None and bool(stop or ramp or cfg.fmt == "code")
    while active:
        if ramp is not None:
            temps = [min(ramp[0] + r.steps * ramp[1], ramp[2]) for r in active]
        else:
            temps = [float(cfg.temperature)] * len(active)
        if greedy:   # max().indices is argmax (the first maximum on ties), ~1.5x faster on the CPU
            nxt_t = logits.max(-1).indices
        else:
            u = noise[rid, min(step, max_new_tokens - 1)]
            t = torch.tensor(temps, device=dev) if ramp is not None else temperature[:len(active)]
            nxt_t = sample(logits, t, u, cfg.top_k, cfg.top_p)
        nxt = nxt_t.tolist()   # a plain decode step's one host sync
        step += 1
        feed, todo = [], []
        for r, t, i in zip(active, temps, nxt):
            r.ids.append(i)
            r.temps.append(t)
            add, code = [i], None
            if watch_text:
                old = len(r.text)
                r.text += r.detok(tok)
                code = _scan_steps(r, cfg.fmt, cfg.delimiter)
            if i in eos:
                r.finish = "eos"
            elif stop and any(s in r.text[max(0, old - len(s) + 1):] for s in stop):   # where it can be new
                r.finish = "stop"
            elif len(r.ids) >= max_new_tokens:
                r.finish = "length"
            elif code is not None:
                if r.kernel is None:
                    r.kernel = (sandbox or Kernel)()
                    for c in setup[r.rid // n] if setup else []:
                        r.kernel.run(c)   # the prefix's code, so that its variables exist
                r.kernel.submit(code)     # all rows' code runs at once; collected below
                todo.append((r, add))
            feed.append(add)
        for r, add in todo:
            out = r.kernel.result()
            body = out if out.endswith("\n") or not out else out + "\n"
            block = data.OUTPUT_START + body + data.OUTPUT_END
            ids = tok.encode(block)[: max(0, max_new_tokens - len(r.ids) - 1)]
            add += ids
            r.ids += ids
            r.text += tok.decode(ids)
            L = len(r.ctx) + len(r.ids)
            r.off, r.read = max(0, L - 6), L   # the detokenizer goes on after the output block
            r.scan = len(r.text)
        finished = [k for k, r in enumerate(active) if r.finish]
        for k in finished:
            if active[k].kernel is not None:
                active[k].kernel.close()
        if finished:
            keep = [k for k, r in enumerate(active) if not r.finish]
            if not keep:
                break
            sel = _rows_tensor(keep, dev)   # finished rows are skipped, not moved (COMPACT_BELOW)
            rid, nxt_t = rid[sel], nxt_t[sel]
            active, feed = [active[k] for k in keep], [feed[k] for k in keep]
            if static is None:
                cache.rows = sel if cache.rows is None else cache.rows[sel]
                if len(keep) <= COMPACT_BELOW * cache.batch_size:   # few are left: move them together
                    state.compact(cache.rows)
                    cache = cache.compact(cache.rows)
        if static is not None:
            logits = static(rid, nxt_t)
        else:   # ids stay on the device; all rows go as lists when one has execution output
            logits = forward_step(model, cache, state, feed if todo else nxt_t)
    return rows


def sample_solutions(model, tok, questions, cfg=Sampling(), n=1, prefixes=None, seed=None):
    """Text in, text out: n continuations of each question in the chat template (plus its prefix, the
    open start of the assistant turn). Per question n (text, finish): the text without the end-of-turn
    token, cut before its first stop string; finish as generate's ("length": not a whole solution)."""
    prefixes = prefixes or [""] * len(questions)
    prompts = [tok.encode(tok.render_prompt(q, p)) for q, p in zip(questions, prefixes)]
    setup = None
    if cfg.fmt == "code":   # a prefix's code blocks re-run in each sample's kernel first
        setup = [[s[len(data.CODE_START):s.rstrip().rfind("```")] for s in data.split_steps(p, "code")
                  if data.step_kind(s) == "code"] for p in prefixes]
    rows = generate(model, prompts, cfg, n=n, seed=seed, tok=tok, setup=setup)
    texts = []
    for r in rows:   # decoded after a few prompt tokens, so that a leading SentencePiece space survives
        t = tok.decode(r.ctx + r.ids)[len(tok.decode(r.ctx)):]
        for s in cfg.stop:
            t = t.split(s)[0]
        texts.append((t, r.finish))
    return [texts[i * n:(i + 1) * n] for i in range(len(questions))]


# ----------------------------------------------------------------------------------------------
# The pair pipeline (METHOD.md sections 1-2): naive pairs, then step-controlled pairs, per question
# ----------------------------------------------------------------------------------------------
SC_PER_QUESTION = {"gsm8k": 2, "math": 3}   # the authors' scripts; other sources default to 2


@dataclass(frozen=True)
class PairSettings:
    """The settings of the two procedures; defaults are the paper's (METHOD.md sections 1-2)."""
    fmt: str = "cot"             # solution format: cot | code
    delimiter: str = "auto"      # cot step boundary: data.split_steps; "auto" decides per solution
    max_new_tokens: int = 512
    top_p: float = 1.0
    k_max: int = 100             # naive: most samples per question
    naive_batch: int = 8         # naive: samples per question per round
    cut: str = "random"          # step-controlled: cuts in random order (the paper) or ascending ("all")
    cut_mode: str = "paper"      # which steps are eligible (data.cut_points)
    sc_from: str = "naive"       # whose preferred solutions are cut: questions with a naive pair | "any"
    sc_per_question: dict = field(default_factory=dict)   # most step-controlled pairs, by source
    tries: int = 8               # continuations per cut before giving up
    ramp: tuple = RAMPS["paper"]
    seed: int = 0
    static: bool = False         # Sampling.static

    def __post_init__(self):
        self.sampling()   # refuses what Sampling refuses (--static with --fmt code) before a model loads

    def sampling(self, **kw):
        """Sampling for these settings; sc_pairs names each solution's delimiter for the ramp."""
        kw = {"delimiter": "\n\n" if self.delimiter == "auto" else self.delimiter, **kw}
        return Sampling(max_new_tokens=self.max_new_tokens, top_p=self.top_p, fmt=self.fmt,
                        static=self.static, **kw)

    def recorded(self, first, **rest):
        """What a pair's `sampling` field records of how it was made."""
        return {**first, "max_new_tokens": self.max_new_tokens, "top_p": self.top_p, **rest,
                "seed": self.seed}


# Every random choice is seeded by (seed, question id, round): a question's pairs do not depend on the
# rank or on resuming (given the same chunking).
def _seed(*parts):
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


# A sample cut off at max_new_tokens is not a whole solution (tokenize_pair would end it with the
# end-of-turn token): it is counted (samples_truncated, samples_sc_truncated), never graded.
def naive_pairs(model, tok, recs, s):
    """METHOD.md section 1 for a few questions sampled together. Per question a dict: pref (its first
    preferred solution, or None), stats (its counts) and pairs (its naive pair, if any)."""
    st = [dict(pref=None, disp=None, n=0, stats=Counter(), pairs=[]) for _ in recs]
    for rnd in itertools.count():
        act = [i for i, q in enumerate(st) if (q["pref"] is None or q["disp"] is None) and q["n"] < s.k_max]
        if not act:
            break
        nb = min(s.naive_batch, s.k_max - st[act[0]]["n"])   # all active questions have drawn equally many
        out = sample_solutions(model, tok, [recs[i]["question"] for i in act], s.sampling(temperature=1.0),
                               n=nb, seed=[_seed(s.seed, recs[i]["id"], "naive", rnd) for i in act])
        for i, texts in zip(act, out):
            q = st[i]
            q["n"] += nb
            for t, finish in texts:
                if finish == "length":
                    q["stats"]["samples_truncated"] += 1
                    continue
                label, _ = data.judge(t, recs[i]["gold"], s.fmt)
                q["stats"][f"samples_{label}"] += 1
                if label == "preferred" and q["pref"] is None:
                    q["pref"] = t
                elif label == "dispreferred" and q["disp"] is None:
                    q["disp"] = t
    for rec, q in zip(recs, st):
        q["stats"]["samples"] += q["n"]
        if q["pref"] is not None and q["disp"] is not None:
            q["pairs"].append(data.make_pair(rec, q["pref"], q["disp"], fmt=s.fmt, sampling=s.recorded(
                {"temperature": 1.0}, samples=q["n"])))
        else:
            q["stats"]["drop_naive_no_" + ("preferred" if q["pref"] is None else "dispreferred")] += 1
    return st


def sc_pairs(model, tok, recs, st, s):
    """METHOD.md section 2: adds step-controlled pairs to st[i]["pairs"], in waves (the w-th cut of each
    question short of its quota) so that cutting stops at the quota. A failed cut counts why (drop_sc_*)."""
    limit = {**SC_PER_QUESTION, **s.sc_per_question}
    cuts, delims = [], []
    for rec, q in zip(recs, st):
        ks = []
        # the preferred solution's own delimiter splits it, ramps its continuations and splits those
        delims.append(data.cot_delimiter(q["pref"] or "") if s.delimiter == "auto" else s.delimiter)
        if q["pref"] is not None and s.sc_from == "naive" and not q["pairs"]:
            q["stats"]["drop_sc_no_naive_pair"] += 1
        elif q["pref"] is not None:
            q["stats"]["sc_solutions"] += 1
            steps = data.split_steps(q["pref"], s.fmt, delims[-1])
            ks = data.cut_points(steps, s.cut_mode)
            if not ks:
                q["stats"]["drop_sc_no_cut_point"] += 1
            if s.cut == "random":
                random.Random(_seed(s.seed, rec["id"], "cut")).shuffle(ks)
        cuts.append([(k, "".join(steps[:k + 1])) for k in ks])
    for wave in itertools.count():
        jobs = [(i, *cuts[i][wave]) for i in range(len(recs)) if wave < len(cuts[i]) and
                sum(p["kind"] == "sc" for p in st[i]["pairs"]) < limit.get(recs[i]["source"], 2)]
        if not jobs:
            break
        out = []   # one generate call per delimiter in the wave (one, for most models)
        for d in sorted({delims[i] for i, _, _ in jobs}):
            group = [j for j in jobs if delims[j[0]] == d]
            texts = sample_solutions(model, tok, [recs[i]["question"] for i, _, _ in group],
                                     s.sampling(ramp=s.ramp, delimiter=d), n=s.tries,
                                     prefixes=[p for _, _, p in group],
                                     seed=[_seed(s.seed, recs[i]["id"], "sc", k) for i, k, _ in group])
            out += zip(group, texts)
        for (i, k, prefix), texts in out:
            stats = st[i]["stats"]
            stats["samples_sc"] += len(texts)
            why = "no_wrong_continuation"
            for t, finish in texts:
                if finish == "length":
                    stats["samples_sc_truncated"] += 1
                    why = "truncated"
                    continue
                if data.judge(prefix + t, recs[i]["gold"], s.fmt)[0] != "dispreferred":
                    continue
                noise = data.is_noisy(t, s.fmt, delim=delims[i])
                if noise:
                    why = "noisy_" + noise
                    continue
                made = s.recorded({"ramp": list(s.ramp)}, tries=s.tries)
                st[i]["pairs"].append(data.make_pair(recs[i], st[i]["pref"][len(prefix):], t, prefix=prefix,
                                                     k=k, fmt=s.fmt, sampling=made))
                why = None
                break
            if why:
                stats["drop_sc_" + why] += 1
    return st


def pairs_for_chunk(model, tok, recs, s):
    """Both procedures for a few questions sampled together: one {id, pairs, stats} per record."""
    st = sc_pairs(model, tok, recs, naive_pairs(model, tok, recs, s), s)
    return [dict(id=rec["id"], pairs=q["pairs"], stats=dict(q["stats"])) for rec, q in zip(recs, st)]


PART_FIELDS = {"id": str, "pairs": list, "stats": dict, "rank": int}   # one line of rank<r>.jsonl


def _read_parts(folder):
    """Finished questions of every rank<r>.jsonl, by id. Only a torn last line (a kill mid-write) is
    skipped; any other bad line is a ValueError naming file, line and field."""
    def check(row, where):
        for name, kind in PART_FIELDS.items():
            if name not in row:
                raise ValueError(f"{where}: missing field {name!r}")
            if not isinstance(row[name], kind):
                raise ValueError(f"{where}: field {name!r} is {type(row[name]).__name__}, expected "
                                 f"{kind.__name__}")
        for p in row["pairs"]:
            data.check_pair(p, where)
        return row
    names = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if n.startswith("rank") and n.endswith(".jsonl"))
    return {row["id"]: row for n in names
            for row in data.read_jsonl(os.path.join(folder, n), check, torn=True)}


# <out>.parts/settings.json records the PairSettings and the caller's `provenance` (the model's
# hashes). A rerun with others is refused: it would mix its pairs with the old ones.
def progress_record(s, provenance=None):
    """settings.json's record of a run, as JSON values (tuples become lists)."""
    return json.loads(json.dumps({"settings": asdict(s), **(provenance or {})}))


def progress_mismatch(folder, record):
    """Why `folder`'s progress cannot go on with `record`; None when it can (or there is none)."""
    path = os.path.join(folder, "settings.json")
    if not os.path.exists(path):
        parts = [n for n in os.listdir(folder) if n.startswith("rank")] if os.path.isdir(folder) else []
        return f"holds progress ({', '.join(sorted(parts))}) but no record of its settings" if parts else None
    with open(path, encoding="utf-8") as f:
        try:
            old = json.load(f)
        except ValueError as e:
            return f"has an unreadable {path} ({e})"
    def flat(r):
        return {**r.get("settings", {}), **{k: v for k, v in r.items() if k != "settings"}}
    # a setting missing from an older record had its default (new settings default to the old behaviour)
    was, now = {**progress_record(PairSettings())["settings"], **flat(old)}, flat(record)
    diff = [f"{k} {json.dumps(was.get(k))} (now {json.dumps(now.get(k))})"
            for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    return f"was sampled with other settings: {', '.join(diff)}" if diff else None


def check_sources(s, records):
    """A --sc-per-question source that no record has (a misspelling) would leave its questions at the
    default, unnoticed: a ValueError."""
    unknown = set(s.sc_per_question) - set(SC_PER_QUESTION) - {r["source"] for r in records}
    if unknown:
        raise ValueError(f"--sc-per-question names {', '.join(sorted(unknown))}, the source of no question "
                         f"here (sources: {', '.join(sorted({r['source'] for r in records}))})")


def make_pairs(model, tok, records, out_path, s=PairSettings(), chunk=16, rank=0, world=1, progress=True,
               provenance=None, restart=False):
    """The whole pipeline, resumable; call it on every rank. Record i goes to rank i % world; each
    finished chunk is appended in one write to <out>.parts/rank<r>.jsonl, which a rerun skips. Other
    settings or provenance are a ValueError, unless `restart` (which first removes the progress,
    out_path and its meta file). Rank 0 writes out_path in record order, returns the counts (others None)."""
    check_sources(s, records)
    folder = out_path + ".parts"
    record = progress_record(s, provenance)
    if restart:
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            for old in (out_path, data.pairs_meta_path(out_path)):
                if os.path.exists(old):
                    os.remove(old)
        if world > 1:
            torch.distributed.barrier()
    why = progress_mismatch(folder, record)
    if why:
        raise ValueError(f"{folder} {why}: these pairs cannot be continued; start over with `sample.py pairs "
                         f"--restart` (scdpo.py: --overwrite), or rerun with the recorded settings")
    os.makedirs(folder, exist_ok=True)
    if rank == 0 and not os.path.exists(os.path.join(folder, "settings.json")):
        data.write_json(os.path.join(folder, "settings.json"), record)
    run = [uuid.uuid4().hex]   # this call's id, for _wait_for_ranks
    if world > 1:   # and no rank writes progress before settings.json exists
        torch.distributed.broadcast_object_list(run, src=0)
    part = os.path.join(folder, f"rank{rank}.jsonl")
    done = _read_parts(folder)
    # drop a torn last line from our file before appending (renamed over it: a kill loses nothing)
    if os.path.exists(part):
        data.write_jsonl(part, [r for r in done.values() if r["rank"] == rank])
    shard = records[rank::world]
    bar = tqdm(total=len(shard), disable=not progress or rank != 0, desc=f"pairs (rank {rank})", unit="q")
    bar.update(sum(r["id"] in done for r in shard))
    for i in range(0, len(shard), chunk):
        todo = [r for r in shard[i:i + chunk] if r["id"] not in done]
        if not todo:
            continue
        res = pairs_for_chunk(model, tok, todo, s)
        # one write: a kill leaves whole questions, or a torn tail
        with open(part, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({**r, "rank": rank}, ensure_ascii=False) + "\n" for r in res))
            f.flush()
            os.fsync(f.fileno())
        bar.update(len(todo))
    bar.close()
    if world > 1:
        _wait_for_ranks(folder, rank, world, run[0])
    summary = None
    if rank == 0:
        done = _read_parts(folder)
        rows = [done[r["id"]] for r in records if r["id"] in done]
        data.write_jsonl(out_path, [p for row in rows for p in row["pairs"]])
        stats = Counter()
        for row in rows:
            stats.update(row["stats"])
            stats.update(f"pairs_{p['kind']}" for p in row["pairs"])
        summary = {"questions": len(rows), **dict(sorted(stats.items()))}
        print(" | ".join(f"{k} {v}" for k, v in summary.items()))
    return summary


def _wait_for_ranks(folder, rank, world, run):
    """A barrier through the files: write this rank's marker, then wait until every rank's holds `run`.
    Ranks finish their shares of the questions up to hours apart, longer than a collective should wait
    (model.TIMEOUT_S); polling files keeps none open. `run` keeps an earlier run's marker from counting."""
    data.write_text(os.path.join(folder, f"done-rank{rank}"), run)
    def marker(r):
        try:
            with open(os.path.join(folder, f"done-rank{r}")) as f:
                return f.read()
        except FileNotFoundError:
            return None
    while any(marker(r) != run for r in range(world)):
        time.sleep(2.0)


def pair_warnings(summary, flag):
    """Warnings for when most samples or continuations hit max_new_tokens and went ungraded (`flag`
    raises it), and for when most preferred solutions had no step to cut after."""
    n = summary.get
    what = "hit max_new_tokens and were dropped ungraded"
    found = [data.most_lost(n("samples_truncated", 0), n("samples", 0), f"samples {what}", flag),
             data.most_lost(n("samples_sc_truncated", 0), n("samples_sc", 0),
                            f"step-controlled continuations {what}", flag)]
    if 2 * n("drop_sc_no_cut_point", 0) > n("sc_solutions", 0) > 0:
        found.append(f"WARNING: {n('drop_sc_no_cut_point')} of {n('sc_solutions')} preferred solutions are "
                     f"a single step, with nowhere to cut (step-controlled pairs: {n('pairs_sc', 0)}); "
                     f"check that --delimiter splits this model's solutions into steps")
    return [m for m in found if m]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
STATIC_HELP = ("decode steps of one shape, one CUDA graph replay each on a GPU (bench/sample.py times it); "
               "the same tokens up to float rounding")


def checked(parse):
    """An argparse type: the flag's text, once `parse` accepts it (argparse names the flag if not)."""
    def check(text):
        try:
            parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return check


def parse_per_question(text):
    """'gsm8k=2,math=3' -> {"gsm8k": 2, "math": 3}; ValueError for anything else."""
    out = {}
    for item in filter(None, text.split(",")):
        source, _, n = (x.strip() for x in item.partition("="))
        if not source or not n.isdigit():
            raise ValueError(f"{item!r}: expected source=N, e.g. gsm8k=2,math=3")
        out[source] = int(n)
    return out


def positive_int(text):
    """An argparse type: an integer of at least 1 (a --limit of 0 or -1 is a mistake, not a choice)."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return n


def add_pair_flags(p):
    """The flags of the two procedures, shared by `sample.py pairs` and scdpo.py's sampling stage."""
    p.add_argument("--fmt", default="cot", choices=["cot", "code"], help="solution format")
    p.add_argument("--delimiter", default="auto", help="chain-of-thought step delimiter (escapes allowed), "
                   "or auto: a blank line where the solution has one, else a line break")
    # naive pairs
    p.add_argument("--k-max", type=int, default=100, help="most samples per question for a naive pair")
    p.add_argument("--naive-batch", type=int, default=8, help="samples per question per round")
    # step-controlled pairs
    p.add_argument("--cut", default="random", choices=["all", "random"],
                   help="the order in which eligible cuts are tried: random (the paper), or ascending")
    p.add_argument("--sc-from", default="naive", choices=["naive", "any"], help="cut the preferred "
                   "solutions of questions with a naive pair (the paper), or of any question")
    p.add_argument("--cut-points", default="paper", choices=["paper", "scripts"],
                   help="eligible steps: data.cut_points")
    p.add_argument("--sc-per-question", default="gsm8k=2,math=3", type=checked(parse_per_question),
                   help="most step-controlled pairs per question, by source (others: 2)")
    p.add_argument("--tries", type=int, default=8, help="continuations per cut before giving up")
    p.add_argument("--ramp", default="paper", type=checked(parse_ramp),
                   help="paper (1.1,+0.05,1.4) | scripts (1.1,+0.1,1.4) | start,inc,max")
    p.add_argument("--static", action="store_true", help=STATIC_HELP)


def pair_settings(args, max_new_tokens):
    """PairSettings from the flags of add_pair_flags."""
    per_q = parse_per_question(args.sc_per_question)
    return PairSettings(fmt=args.fmt, delimiter=args.delimiter.encode().decode("unicode_escape"),
                        max_new_tokens=max_new_tokens, k_max=args.k_max, naive_batch=args.naive_batch,
                        cut=args.cut, cut_mode=args.cut_points, sc_from=args.sc_from, sc_per_question=per_q,
                        tries=args.tries, ramp=parse_ramp(args.ramp), seed=args.seed, static=args.static)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pairs", help="sample naive and step-controlled pairs", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--model", required=True, help="hub-format folder: the SFT model and its tokenizer")
    a.add_argument("--data", default="gsm8k:train,math:train", help="comma-separated sets or .jsonl files "
                   "(default: %(default)s)")
    a.add_argument("--out", default="pairs.jsonl", help="pairs JSONL; progress in <out>.parts/ (default: "
                   "%(default)s)")
    a.add_argument("--format", default="scdpo", choices=["scdpo", "trl"], help="the file's rows: our pair "
                   "records, or TRL's prompt/chosen/rejected with the chat template rendered into the prompt")
    a.add_argument("--limit", type=positive_int, default=None, help="first N questions of each set")
    a.add_argument("--max-new-tokens", type=int, default=512, help="longest solution or continuation")
    a.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the checkpoint's")
    a.add_argument("--seed", type=int, default=0, help="every sample's noise derives from it")
    a.add_argument("--chunk", type=int, default=16, help="questions sampled (and committed) together")
    a.add_argument("--restart", action="store_true", help="discard the progress in <out>.parts/ (and <out>) "
                   "and start over; without it a rerun with other settings or another model is refused")
    add_pair_flags(a)
    args = p.parse_args(argv)
    rank, world, _, device = modeling.compute_init()
    modeling.print0(json.dumps(vars(args)))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    records, settings = data.load_records(args.data, args.limit), pair_settings(args, args.max_new_tokens)
    check_sources(settings, records)   # before minutes of loading the model
    model, tok = modeling.load(args.model, dtype=dtype, device=device)
    model.eval()
    provenance = {**data.model_fingerprint(args.model), "dtype": str(model.tok_embeddings.weight.dtype)}
    summary = make_pairs(model, tok, records, args.out, settings, chunk=args.chunk, rank=rank, world=world,
                         provenance=provenance, restart=args.restart)
    if rank == 0:
        for warning in pair_warnings(summary, "--max-new-tokens"):
            print(warning, file=sys.stderr, flush=True)
        if args.format == "trl":
            data.write_jsonl(args.out, [data.to_trl(p, tok) for p in data.read_pairs(args.out)])
        data.write_pairs_meta(args.out, args.model, summary)   # last, atomically: scdpo.check_pairs_match
    modeling.compute_cleanup()


if __name__ == "__main__":
    modeling.run_main(main, oom="out of memory: lower --chunk (questions sampled at once, each with "
                                "--naive-batch rows, or --tries rows a cut)")
