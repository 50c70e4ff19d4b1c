"""The whole method in miniature, on a CPU: SFT -> pairs -> DPO / DPO (data-equal) / SCDPO -> Table 1.

    python mini.py                                  # one seed, about six minutes on 2 cores
    python mini.py --seeds 3                        # mean and spread over 3 seeds (SFT retrained per seed)
    python mini.py --seeds 3 --reuse --lrs 1e-5,2e-5,5e-5   # a learning-rate grid on the same SFT and pairs
    python mini.py --seeds 3 --reuse --cut-rejected # the ablation: no loss after a rejected's first error
    torchrun --standalone --nproc_per_node=2 mini.py

The task: synthetic word problems in which every step is one computation that can be checked exactly,
so the first wrong step of ANY solution is known (first_wrong_step), which the credit-assignment
metric needs and real data lacks:

    Eva has 7 bags of 6 pens. Eva gets 3, uses 8, uses 5. How many now?
    7*6=42            step 0   a*b (the checker takes either order; demonstrations keep the question's)
    42+3=45           step 1   one line per operation, in the question's order (+: either order)
    45-8=37           step 2
    37-5=32           step 3
    The answer is 32  step 4   (data.extract_answer reads it)

The SFT demonstrations carry a systematic "bad habit": in a subtraction that needs a borrow (45-8), a
fraction `habit` of them forget it (45-8=47). The SFT model learns the habit as a probability, so
greedy decoding repeats it while sampling sometimes does it right: outcome feedback can fix it.
Each run: (1) a word tokenizer and a tiny Transformer SFT'd from scratch with scdpo.train, (2) naive
and step-controlled pairs with sample.make_pairs, (3) the three preference runs from that same SFT
model with scdpo.train, (4) greedy accuracy (eval.evaluate) and the localisation metric of the
implicit reward (eval.credit_assignment), then the table. README: "What the miniature shows".
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import time
from collections import Counter

import tokenizers
import torch
import torch.distributed as dist

import data
import eval as evaluation
import model as modeling
import sample
import scdpo
from model import print0

# ----------------------------------------------------------------------------------------------
# The task. Steps are lines: data.split_steps(solution, "cot", DELIM).
# ----------------------------------------------------------------------------------------------
DELIM = "\n"
NAMES = ("Ann", "Bob", "Cai", "Dev", "Eva", "Fay", "Gus", "Ida")
ITEMS = ("nuts", "pens", "eggs", "cups", "bows", "jars")
_QUESTION = re.compile(r"^(\w+) has (\d+) bags of (\d+) \w+\. \1 ((?:(?:gets|uses) \d+(?:, )?)+)\. How many now\?$")
_STEP = re.compile(r"^(\d+)([+\-*])(\d+)=(-?\d+)\n?$")
_ANSWER = re.compile(r"^The answer is (-?\d+)$")


def problem(rng, n_ops=3):
    """{"question", "gold"}: a*b, then n_ops additions or subtractions of 2..9, every value in 1..99."""
    while True:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        v, ops = a * b, []
        for _ in range(n_ops):
            op, n = rng.choice("+-"), rng.randint(2, 9)
            v = v + n if op == "+" else v - n
            ops.append(f"{'gets' if op == '+' else 'uses'} {n}")
        if all(1 <= x <= 99 for x in values(a, b, ops)):
            break
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    return {"question": f"{name} has {a} bags of {b} {item}. {name} {', '.join(ops)}. How many now?",
            "gold": str(v)}


def values(a, b, ops):
    v, out = a * b, [a * b]
    for o in ops:
        n = int(o.split()[1])
        v = v + n if o.startswith("gets") else v - n
        out.append(v)
    return out


def nodes(question):
    """The computation a right solution performs, one (op, x, y, result) per step."""
    m = _QUESTION.match(question)
    if m is None:
        raise ValueError(f"not a miniature question: {question!r}")
    a, b, ops = int(m[2]), int(m[3]), m[4].split(", ")
    out, v = [("*", a, b, a * b)], a * b
    for o in ops:
        op, n = ("+" if o.startswith("gets") else "-"), int(o.split()[1])
        r = v + n if op == "+" else v - n
        out.append((op, v, n, r))
        v = r
    return out


def needs_borrow(x, y):
    return x % 10 < y % 10


def solution(question, rng, habit=0.0, vary=True, overborrow=0.0):
    """A worked solution. vary: random operand order for + (the wording); habit: the chance that a
    subtraction needing a borrow forgets it (result 10 too big); overborrow: the chance that one
    needing none borrows anyway (10 too small; only from a two-digit number). Every later step is
    right given the mistake."""
    steps, v = [], None
    for op, x, y, r in nodes(question):
        if v is not None:
            x = v                                       # carries an earlier mistake forward
            r = x + y if op == "+" else x - y
        if op == "-" and needs_borrow(x, y) and rng.random() < habit:
            r += 10
        elif op == "-" and overborrow and x >= 10 and not needs_borrow(x, y) and rng.random() < overborrow:
            r -= 10
        a, b = (y, x) if op == "+" and vary and rng.random() < 0.5 else (x, y)
        steps.append(f"{a}{op}{b}={r}")
        v = r
    return "\n".join(steps + [f"The answer is {v}"])


def first_wrong_step(question, text):
    """Index of the first wrong step of a solution (steps = lines), -1 when every step is right. Step
    i < n must compute node i of the question (operands in either order for + and *); step n must be
    'The answer is <right>'; anything more, or a solution that stops early, is wrong at the first
    missing or extra line."""
    want = nodes(question)
    lines = data.split_steps(text, "cot", DELIM)
    for i, line in enumerate(lines):
        if i < len(want):
            op, x, y, r = want[i]
            m = _STEP.match(line)
            if not m or m[2] != op or int(m[4]) != r:
                return i
            if (int(m[1]), int(m[3])) != (x, y) and not (op in "+*" and (int(m[3]), int(m[1])) == (x, y)):
                return i
        elif i == len(want):
            m = _ANSWER.match(line.rstrip("\n"))
            if not m or int(m[1]) != want[-1][3]:
                return i
        else:
            return i
    return -1 if len(lines) == len(want) + 1 else len(lines)


def error_kind(question, text):
    """(first wrong step, kind): "none" (all right), "habit" (a subtraction that needed a borrow written
    10 too big), "overborrow" (one that needed none written 10 too small), "arith" (the right operation
    on the right numbers, another wrong result), "format" (wrong numbers or operation, a missing,
    extra or garbled line)."""
    i = first_wrong_step(question, text)
    if i == -1:
        return i, "none"
    want, lines = nodes(question), data.split_steps(text, "cot", DELIM)
    m = _STEP.match(lines[i]) if i < min(len(want), len(lines)) else None
    if m is None:
        return i, "format"
    op, x, y, r = want[i]
    a, b, got = int(m[1]), int(m[3]), int(m[4])
    if m[2] != op or not ((a, b) == (x, y) or (op in "+*" and (b, a) == (x, y))):
        return i, "format"
    if op == "-" and needs_borrow(x, y) and got == r + 10:
        return i, "habit"
    return i, "overborrow" if op == "-" and not needs_borrow(x, y) and got == r - 10 else "arith"


def dataset(n, seed, habit=0.0, n_ops=3, offset=0, overborrow=0.0):
    """n records {id, source, question, gold, solution}, reproducible from seed."""
    rng, recs = random.Random(seed), []
    for i in range(n):
        p = problem(rng, n_ops)
        p.update(id=f"mini/{offset + i}", source="mini",
                 solution=solution(p["question"], rng, habit, overborrow=overborrow))
        recs.append(p)
    return recs


def cut_rejected(pair):
    """The pair with its rejected continuation ending right after the first wrong step of prefix +
    rejected (kept whole when that step lies in the prefix or the error is a missing last step)."""
    full = pair["prefix"] + pair["rejected"]
    steps = data.split_steps(full, "cot", DELIM)
    cut = "".join(steps[:first_wrong_step(pair["question"], full) + 1])
    return dict(pair, rejected=cut[len(pair["prefix"]):]) if len(pair["prefix"]) < len(cut) < len(full) else pair


# Words are one token each (" has", " bags", "Eva" ...); digits, operators and punctuation are single
# characters, so arithmetic is done digit by digit, and a training row is half as long as with
# characters alone.
CHARS = "\n ,.?*+-=0123456789"
WORDS = tuple(" " + w for w in NAMES + ITEMS) + (
    " has", " bags", " of", " gets", " uses", " How", " many", " now", " answer", " is") + NAMES + ("The",)
# The chat template: BOS, the question, a newline; the answer, then EOS (render_prompt is a prefix of render).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] + '\\n' }}"
            "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def write_tokenizer(path):
    """A word tokenizer saved as tokenizer.json + tokenizer_config.json, so that
    model.Tokenizer.from_pretrained(path) loads it like any hub tokenizer: BPE over characters whose
    merges build each of WORDS left to right (" " + "h" -> " h", " h" + "a" -> " ha", ...). Chains
    start with a space or a capital; the spaced ones rank first, so " Eva" is not cut into " " + "Eva"."""
    vocab, merges = {"<pad>": 0, "<s>": 1, "</s>": 2}, []
    for c in CHARS + "".join(WORDS):
        vocab.setdefault(c, len(vocab))
    for w in WORDS:
        for i in range(2, len(w) + 1):
            if w[:i] not in vocab:
                vocab[w[:i]] = len(vocab)
                merges.append((w[:i - 1], w[i - 1]))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.decoder = tokenizers.decoders.Fuse()
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": TEMPLATE,
              "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"}
    data.write_json(os.path.join(path, "tokenizer_config.json"), config)
    return path


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/miniature", help="output folder (models, pairs, predictions, credit HTML)")
    p.add_argument("--seeds", type=int, default=1, help="independent repeats (SFT retrained each time)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--reuse", action="store_true", help="keep finished stages found in --out (SFT, pairs, "
                   "DPO runs of the same settings)")
    # the task
    p.add_argument("--habit", type=float, default=0.7, help="fraction of SFT demos whose borrow subtractions "
                   "forget the borrow")
    p.add_argument("--overborrow", type=float, default=0.0, help="fraction of SFT demos whose plain "
                   "subtractions borrow anyway")
    p.add_argument("--n-ops", type=int, default=3, help="additions / subtractions after the product")
    p.add_argument("--n-sft", type=int, default=8000, help="SFT demonstrations")
    p.add_argument("--n-pairs", type=int, default=1500, help="questions to sample pairs for")
    p.add_argument("--n-eval", type=int, default=1000, help="held-out questions for accuracy (greedy)")
    p.add_argument("--n-credit", type=int, default=400, help="held-out SFT samples for the localisation metric")
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
    # preference training (scdpo.train)
    p.add_argument("--lr", type=float, default=2e-5, help="DPO peak learning rate")
    p.add_argument("--lrs", default=None, help="a learning-rate grid, e.g. 1e-5,2e-5,5e-5: a table each, then "
                   "each method at its best (SFT and pairs are made once per seed)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--nll-weight", type=float, default=1.0, help="per-token NLL on chosen (MINIATURE-NOTES.md)")
    p.add_argument("--epochs", type=int, default=2, help="DPO epochs")
    p.add_argument("--batch", type=int, default=32, help="pairs per DPO step")
    p.add_argument("--cut-rejected", action="store_true", help="ablation: end every rejected solution right after "
                   "its first wrong step (by the exact checker, which real data lacks), so no loss falls on the "
                   "steps that carry the error forward")
    return p


# The flags that decide the SFT model and the pairs: --reuse keeps those stages only where they match.
STAGES = ("habit", "overborrow", "n_ops", "n_sft", "n_pairs", "n_eval", "n_credit", "dim", "layers", "heads",
          "sft_steps", "sft_lr", "sft_batch", "k_max", "tries", "ramp", "sc_per_question")


def tag(args):
    """The preference-training settings, in the names of the DPO runs and of each seed's result file."""
    return (f"lr{args.lr:g}-nll{args.nll_weight:g}-b{args.beta:g}-ep{args.epochs}-bs{args.batch}"
            + "-cut" * args.cut_rejected)


def check_stages(args, out):
    """Check (with --reuse) or record <out>/settings.json, the STAGES flags the seed folder was made with."""
    path, want = os.path.join(out, "settings.json"), {k: getattr(args, k) for k in STAGES}
    if args.reuse and os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        diff = [f"--{k.replace('_', '-')} {have.get(k)} (now {v})" for k, v in want.items() if have.get(k) != v]
        if diff:
            raise ValueError(f"--reuse: {out} was made with other settings: {', '.join(diff)}; use another --out")
    elif dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        data.write_json(path, want)


# ----------------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------------
def train(reuse, **kw):
    """scdpo.train with the miniature's shared settings; --reuse resumes (finished runs are read back)."""
    return scdpo.train(scdpo.settings(quiet=True, max_len=128, max_prompt=100, resume=reuse,
                                      overwrite=not reuse, **kw)).eval()


def accuracy(model, tok, recs, rank, world):
    """(accuracy, rows): eval.evaluate, then every row's first wrong step by the exact checker."""
    rows = evaluation.evaluate(model, tok, recs, max_new_tokens=48, batch_size=1024, rank=rank, world=world)
    for r in rows:
        r["first_wrong_step"], r["error"] = error_kind(r["question"], r["completion"])
        r["borrow"] = any(op == "-" and needs_borrow(x, y) for op, x, y, _ in nodes(r["question"]))
    return sum(r["correct"] for r in rows) / len(rows), rows


def run_seed(args, seed, rank, world):
    """One full run; returns the table's numbers for this seed (on rank 0; {} elsewhere)."""
    out = os.path.join(args.out, f"seed{seed}")
    t0 = time.time()
    times = {}
    check_stages(args, out)
    # --- the task and the tokenizer ------------------------------------------------------------------
    sft_recs = dataset(args.n_sft, seed=1000 * seed + 1, habit=args.habit, n_ops=args.n_ops,
                       overborrow=args.overborrow)
    pair_recs = dataset(args.n_pairs, seed=1000 * seed + 2, n_ops=args.n_ops, offset=10**6)
    test_recs = dataset(args.n_eval + args.n_credit, seed=1000 * seed + 3, n_ops=args.n_ops, offset=2 * 10**6)
    eval_recs, credit_recs = test_recs[:args.n_eval], test_recs[args.n_eval:]
    init = os.path.join(out, "init")
    if rank == 0:
        write_tokenizer(init)
        tok = modeling.Tokenizer.from_pretrained(init)
        torch.manual_seed(seed)
        margs = modeling.ModelArgs(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.layers,
                                   n_heads=args.heads, intermediate_size=4 * args.dim, max_seq_len=256,
                                   bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, rope_theta=10000.0)
        modeling.Transformer(margs).save_pretrained(init)
        data.write_jsonl(os.path.join(out, "sft.jsonl"), sft_recs)
    dist.barrier()
    tok = modeling.Tokenizer.from_pretrained(init)
    # --- 1. SFT from scratch ------------------------------------------------------------------------------
    sft_dir = os.path.join(out, "sft")
    epochs = math.ceil(args.sft_steps * args.sft_batch / len(sft_recs))
    sft = train(args.reuse, objective="sft", model=init, data=os.path.join(out, "sft.jsonl"), out=sft_dir,
                lr=args.sft_lr, epochs=epochs, max_steps=args.sft_steps, global_batch=args.sft_batch,
                micro_batch=args.sft_batch // world, warmup_ratio=0.05, seed=seed)
    sft_path = os.path.join(sft_dir, "final")
    times["sft"] = time.time() - t0
    # --- 2. pairs: naive and step-controlled, sampled by the SFT model (METHOD.md sections 1-2) ------------
    t1 = time.time()
    pairs = os.path.join(out, "pairs.jsonl")
    if not args.reuse and rank == 0:
        shutil.rmtree(pairs + ".parts", ignore_errors=True)   # make_pairs resumes from these
    dist.barrier()
    s = sample.PairSettings(fmt="cot", delimiter=DELIM, max_new_tokens=48, k_max=args.k_max,
                            naive_batch=args.k_max, cut="all", cut_mode="paper",
                            sc_per_question={"mini": args.sc_per_question}, tries=args.tries,
                            ramp=sample.parse_ramp(args.ramp), seed=seed)
    summary = sample.make_pairs(sft, tok, pair_recs, pairs, s, chunk=512, rank=rank, world=world, progress=False)
    dist.barrier()   # rank 0 writes pairs.jsonl after make_pairs' own barrier
    if args.cut_rejected:   # the ablation: every rejected solution ends right after its first wrong step
        cut = os.path.join(out, "pairs-cut.jsonl")
        if rank == 0:
            data.write_jsonl(cut, [cut_rejected(p) for p in data.read_pairs(pairs)])
        dist.barrier()
        pairs = cut
    times["pairs"] = time.time() - t1
    # --- 3. DPO, DPO (data-equal), SCDPO from the same SFT model -----------------------------------------------
    res = {}
    for kind, name in (("naive", "DPO"), ("data-equal", "DPO (data-equal)"), ("scdpo", "SCDPO")):
        t1 = time.time()
        res[name] = {"model": train(args.reuse, model=sft_path, pairs=pairs, pairs_kind=kind,
                                    out=os.path.join(out, f"{kind}-{tag(args)}"), lr=args.lr, beta=args.beta,
                                    nll_weight=args.nll_weight, epochs=args.epochs, global_batch=args.batch,
                                    micro_batch=args.batch // world, seed=seed)}
        times[name] = time.time() - t1
    # --- 4. evaluation ----------------------------------------------------------------------------------------
    t1 = time.time()
    table = {"SFT": {"model": sft}, **res}
    for name, row in table.items():
        row["acc"], rows = accuracy(row["model"], tok, eval_recs, rank, world)
        row["acc_borrow"] = sum(r["correct"] for r in rows if r["borrow"]) / max(1, sum(r["borrow"] for r in rows))
        row["acc_plain"] = (sum(r["correct"] for r in rows if not r["borrow"])
                            / max(1, sum(not r["borrow"] for r in rows)))
        row["errors"] = dict(Counter(r["error"] for r in rows))
        if rank == 0:
            data.write_jsonl(os.path.join(out, f"preds-{file_tag(name)}.jsonl"), rows)
            recount = sum(data.is_equiv(data.extract_answer(r["completion"]), r["gold"]) for r in rows) / len(rows)
            assert abs(recount - row["acc"]) < 1e-12, (name, recount, row["acc"])
    times["eval"] = time.time() - t1
    # credit assignment: the implicit reward of each preference model against the SFT model on the SAME
    # held-out SFT samples (T=1), labelled by the exact checker; the threshold is cross-fitted (eval.py)
    t1 = time.time()
    if rank == 0:
        sols = sample.sample_solutions(sft, tok, [r["question"] for r in credit_recs],
                                       sample.Sampling(max_new_tokens=48, temperature=1.0), n=1, seed=seed)
        examples = [{"question": r["question"], "steps": data.split_steps(s[0][0], "cot", DELIM),
                     "label": first_wrong_step(r["question"], s[0][0])} for r, s in zip(credit_recs, sols)]
        examples = [e for e in examples if e["steps"]]
        for name in ("DPO", "DPO (data-equal)", "SCDPO"):
            table[name]["loc"] = evaluation.credit_assignment(
                table[name]["model"], sft, tok, examples, args.beta, threshold="fit", rule="first",
                html_path=os.path.join(out, f"credit-{file_tag(name)}.html"),
                title=f"{name} vs SFT: implicit reward per token (seed {seed})")
    times["credit"] = time.time() - t1
    times["total"] = time.time() - t0
    stats = pair_stats(pairs, summary, seed, table, times) if rank == 0 else {}
    result = ({name: {k: ({a: b for a, b in v.items() if a not in ("preds", "step_rewards")} if k == "loc" else v)
                      for k, v in row.items() if k != "model"} for name, row in table.items()}, stats, times)
    if rank == 0:
        data.write_json(os.path.join(out, f"result-{tag(args)}.json"), result)
    return result


def file_tag(name):
    """'DPO (data-equal)' -> 'dpo-eq', 'SCDPO' -> 'scdpo': the names of each method's files."""
    return name.split()[0].lower() + ("-eq" if "equal" in name else "")


def pair_stats(pairs, summary, seed, table, times):
    """What the pairs are (where each rejected solution's first wrong step falls relative to the cut k,
    naive: k = -1, and how: habit, other arithmetic, format; for naive pairs, how many steps before the
    error already differ in wording), logged with each model's greedy errors by kind."""
    ps = data.read_pairs(pairs)
    stats = {"naive": sum(p["kind"] == "naive" for p in ps), "sc": sum(p["kind"] == "sc" for p in ps)}
    for kind in ("naive", "sc"):
        sel = [p for p in ps if p["kind"] == kind]
        errs = [error_kind(p["question"], p["prefix"] + p["rejected"]) for p in sel]
        stats[f"{kind}_first_wrong_minus_k"] = dict(sorted(Counter(e[0] - p["k"] for e, p in zip(errs, sel)).items()))
        stats[f"{kind}_error"] = dict(Counter(e[1] for e in errs))
        differ = [sum(a != b for a, b in zip(data.split_steps(p["prefix"] + p["chosen"], "cot", DELIM)[:max(e[0], 0)],
                                             data.split_steps(p["prefix"] + p["rejected"], "cot", DELIM)))
                  for e, p in zip(errs, sel)]
        stats[f"{kind}_reworded_steps_before_error"] = round(sum(differ) / max(1, len(differ)), 2)
    stats["summary"] = summary
    print0(f"[seed {seed}] pairs: {stats['naive']} naive, {stats['sc']} step-controlled | " +
           " | ".join(f"{k} {v}" for k, v in stats.items() if k.startswith(("naive_", "sc_"))) +
           f" | {json.dumps(summary)}")
    for name, row in table.items():
        loc = row.get("loc")
        print0(f"[seed {seed}] {name}: greedy errors by kind {row['errors']}" +
               (f" | localisation (first below threshold) acc_err {loc['acc_err']:.3f} acc_cor {loc['acc_cor']:.3f} "
                f"F1 {loc['f1']:.3f} thresholds {[round(t, 3) for t in loc['thresholds']]}" if loc else ""))
    print0(f"[seed {seed}] seconds: " + " | ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return stats


# ----------------------------------------------------------------------------------------------
# The tables
# ----------------------------------------------------------------------------------------------
def grid_table(grid):
    """--lrs: mean accuracy of each preference method at each learning rate, then each method at its best
    one (picked on the same held-out problems, so optimistic for every method alike) and SCDPO's lead."""
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


def table1(args, runs, seconds):
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


def main(argv=None):
    args = get_parser().parse_args(argv)
    rank, world, _, _ = modeling.compute_init()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print0(json.dumps(vars(args)))
    grid = {}
    for i, lr in enumerate([float(x) for x in args.lrs.split(",")] if args.lrs else [args.lr]):
        t0, args.lr, runs = time.time(), lr, []
        args.reuse = args.reuse or i > 0   # later learning rates keep each seed's SFT model and pairs
        for s in range(args.seed, args.seed + args.seeds):
            done = os.path.join(args.out, f"seed{s}", f"result-{tag(args)}.json")
            if args.reuse and os.path.exists(done):   # a finished seed (e.g. run in another process): read it back
                check_stages(args, os.path.dirname(done))
                with open(done) as f:
                    runs.append(json.load(f))
                print0(f"[seed {s}] read back from {done}")
            else:
                runs.append(run_seed(args, s, rank, world))
        if rank == 0:   # the results are rank 0's
            print(table1(args, runs, time.time() - t0), flush=True)
        grid[lr] = runs
    if rank == 0 and len(grid) > 1:
        print(grid_table(grid), flush=True)
    dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return runs


if __name__ == "__main__":
    main()
