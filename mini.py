"""The whole method in miniature, on a CPU: SFT -> pairs -> four preference runs -> Table 1 with intervals.

    python mini.py                                  # one seed, about 5 minutes on 2 cores
    python mini.py --n-sft 2000 --sft-steps 200 --n-pairs 128 --k-max 4 --steps 4 --batch 8 --n-eval 64 \
        --n-dev 32 --n-credit 64 --boot 50 --out runs/smoke   # every stage, ~50 s (numbers meaningless)
    python mini.py --seeds 3                        # mean and 95% interval over 3 seeds (SFT retrained)
    python mini.py --seeds 3 --reuse --lrs 1e-5,2e-5,5e-5   # lr chosen per method on DEV problems
    python mini.py --seeds 3 --reuse --cut-rejected # oracle ablations: --cut-rejected, --clean-chosen
    python mini.py --sweep 0,0.5,1 --seeds 5 --out runs/sweep   # the knob: table + sweep.svg
    torchrun --standalone --nproc_per_node=2 mini.py

The task: word problems in which every step is one computation, checked exactly (check), so the
first wrong step of any solution is known: the credit metrics need it, and real data lacks it.

    Eva has 7 bags of 6 pens. Eva gets 3, uses 8, uses 5. How many now?
    7*6=42            step 0   a*b, operands in either order
    42+3=45           step 1   one line per addition or subtraction (+: operands in either order),
    45-8=37           step 2   in any order whose values stay in 1..99
    37-5=32           step 3
    The answer is 32  step 4   (grade.extract_answer reads it)

A fraction --habit of the SFT demonstrations forget the borrow (45-8=47). The knob, --reorder: the
fraction that take a random valid order of the additions and subtractions instead of the question's.
README: "What the miniature shows".
"""
import argparse
import itertools
import json
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import replace

import numpy as np
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
_QUESTION = re.compile(r"^(\w+) has (\d+) bags of (\d+) \w+\. \1 ((?:(?:gets|uses) \d+(?:, )?)+)\. "
                       r"How many now\?$")
_STEP = re.compile(r"^(\d+)([+\-*])(\d+)=(-?\d+)\n?$")
_ANSWER = re.compile(r"^The answer is (-?\d+)$")


def walk(v, order):
    """The values after each (op, n) of a route, starting from v."""
    out = []
    for op, n in order:
        v = v + n if op == "+" else v - n
        out.append(v)
    return out


def problem(rng, n_ops=3):
    """{"question", "gold"}: a*b, then n_ops additions or subtractions of 2..9, every value in 1..99."""
    while True:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        order = [(rng.choice("+-"), rng.randint(2, 9)) for _ in range(n_ops)]
        vals = [a * b] + walk(a * b, order)
        if all(1 <= x <= 99 for x in vals):
            break
    ops = ", ".join(f"{'gets' if op == '+' else 'uses'} {n}" for op, n in order)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    return {"question": f"{name} has {a} bags of {b} {item}. {name} {ops}. How many now?",
            "gold": str(vals[-1])}


def nodes(question):
    """The computation a right solution performs in the question's order, one (op, x, y, result) per step."""
    m = _QUESTION.match(question)
    if m is None:
        raise ValueError(f"not a miniature question: {question!r}")
    a, b = int(m[2]), int(m[3])
    order = [("+" if o.startswith("gets") else "-", int(o.split()[1])) for o in m[4].split(", ")]
    vals = [a * b] + walk(a * b, order)
    return [("*", a, b, a * b)] + [(op, x, n, r) for (op, n), x, r in zip(order, vals, vals[1:])]


def needs_borrow(x, y):
    return x % 10 < y % 10


def routes(question):
    """The valid routes, tuples of (op, n): every order of the additions and subtractions whose values
    all stay in 1..99 (the question's order is one)."""
    want = nodes(question)
    orders = sorted(set(itertools.permutations([(op, y) for op, _, y, _ in want[1:]])))
    return [o for o in orders if all(1 <= v <= 99 for v in walk(want[0][3], o))]


def solution(question, rng, habit=0.0, overborrow=0.0, reorder=0.0):
    """A worked solution, the operands of + in random order; each step after a mistake is right given
    the mistake. habit: the chance that a subtraction needing a borrow forgets it (10 too big).
    overborrow: the chance that one needing none borrows anyway (10 too small; only from a two-digit
    number). reorder: the chance of a random route (routes) instead of the question's order."""
    want = nodes(question)
    order = [(op, y) for op, _, y, _ in want[1:]]
    if reorder and rng.random() < reorder:   # reorder = 0 draws nothing: the same data as before the knob
        order = list(rng.choice(routes(question)))
    _, a, b, v = want[0]
    steps = [f"{a}*{b}={v}"]
    for op, y in order:
        x = v                                           # carries an earlier mistake forward
        r = x + y if op == "+" else x - y
        if op == "-" and needs_borrow(x, y) and rng.random() < habit:
            r += 10
        elif op == "-" and overborrow and x >= 10 and not needs_borrow(x, y) and rng.random() < overborrow:
            r -= 10
        a, b = (y, x) if op == "+" and rng.random() < 0.5 else (x, y)
        steps.append(f"{a}{op}{b}={r}")
        v = r
    return "\n".join(steps + [f"The answer is {v}"])


def step_kind(x, op, y):
    """What a step computes, for the false alarms by kind: product | add | sub-borrow | sub-plain."""
    return {"*": "product", "+": "add"}.get(op) or ("sub-borrow" if needs_borrow(x, y) else "sub-plain")


def check(question, text):
    """(first wrong step, error kind, step kinds) of a solution whose steps are lines (-1: all right).
    Right: the product (operands in either order); then per line, applied to the value so far, one of
    the question's additions or subtractions not used yet (+: operands in either order), with the
    right result; then 'The answer is <right>'. Too long or too short: wrong at the first extra or
    missing line.
    Error kinds: "none"; "habit" (a borrow forgotten, 10 too big); "overborrow" (a borrow where none
    is needed, 10 too small); "arith" (the right operation on the right numbers, another result);
    "format" (other numbers or operation; a missing, extra or garbled line).
    Step kinds: step_kind of each line's own numbers, "answer", or "other"."""
    want = nodes(question)
    lines = data.split_steps(text, "cot", DELIM)
    kinds = []
    for line in lines:
        m = _STEP.match(line)
        kinds.append(step_kind(int(m[1]), m[2], int(m[3])) if m else
                     "answer" if _ANSWER.match(line.rstrip("\n")) else "other")
    left, v = [(op, y) for op, _, y, _ in want[1:]], None
    for i, line in enumerate(lines):
        m = _STEP.match(line)
        if i > len(want) - 1:
            m2 = _ANSWER.match(line.rstrip("\n"))
            ok = i == len(want) and m2 is not None and int(m2[1]) == v
            if not ok:
                return i, "format" if i > len(want) or m2 is None else "arith", kinds
            continue
        if m is None:
            return i, "format", kinds
        a, op, b, got = int(m[1]), m[2], int(m[3]), int(m[4])
        if i == 0:
            x, y = want[0][1], want[0][2]
            if op != "*" or sorted((a, b)) != sorted((x, y)):
                return i, "format", kinds
            r = x * y
        else:
            match = [(x, y) for x, y in ((a, b), (b, a))
                     if x == v and (op, y) in left and (op == "+" or x == a)]
            if not match:
                return i, "format", kinds
            x, y = match[0]
            left.remove((op, y))
            r = x + y if op == "+" else x - y
        if got != r:
            kind = ("habit" if op == "-" and needs_borrow(x, y) and got == r + 10 else
                    "overborrow" if op == "-" and not needs_borrow(x, y) and got == r - 10 else "arith")
            return i, kind, kinds
        v = r
    return (-1, "none", kinds) if len(lines) == len(want) + 1 else (len(lines), "format", kinds)


def borrows(question, order):
    """How many subtractions of a route (a list of (op, n)) need a borrow, computed with right values."""
    v0 = nodes(question)[0][3]
    return sum(op == "-" and needs_borrow(v, n) for (op, n), v in zip(order, [v0] + walk(v0, order)))


def fewest_borrows(question, text):
    """1 if a solution's route (the order in which its lines apply the question's operations) needs
    the fewest borrows of the question's routes, 0 if not or if the lines are no valid route; -1 when
    all routes need as many. A model that learned to avoid its error by its route would raise this."""
    valid = routes(question)
    counts = [borrows(question, o) for o in valid]
    if min(counts) == max(counts):
        return -1
    left, order = [(op, y) for op, _, y, _ in nodes(question)[1:]], []
    for line in data.split_steps(text, "cot", DELIM)[1:len(left) + 1]:
        m = _STEP.match(line)
        ops = [] if m is None else [(m[2], int(m[3]))] + ([(m[2], int(m[1]))] if m[2] == "+" else [])
        hit = [o for o in ops if o in left]
        if not hit:
            return 0
        left.remove(hit[0])
        order.append(hit[0])
    return int(tuple(order) in valid and borrows(question, order) == min(counts))


def first_wrong_step(question, text):
    """Index of the first wrong step of a solution (check), -1 when every step is right."""
    return check(question, text)[0]


def error_kind(question, text):
    """(first wrong step, kind) of a solution (check)."""
    return check(question, text)[:2]


def dataset(n, seed, habit=0.0, n_ops=3, offset=0, overborrow=0.0, reorder=0.0):
    """n records {id, source, question, gold, solution}, reproducible from seed."""
    rng, recs = random.Random(seed), []
    for i in range(n):
        p = problem(rng, n_ops)
        p.update(id=f"mini/{offset + i}", source="mini",
                 solution=solution(p["question"], rng, habit, overborrow=overborrow, reorder=reorder))
        recs.append(p)
    return recs


def cut_rejected(pair):
    """The pair with its rejected continuation ending right after the first wrong step of prefix +
    rejected (kept whole when that step lies in the prefix or the error is a missing last step)."""
    full = pair["prefix"] + pair["rejected"]
    steps = data.split_steps(full, "cot", DELIM)
    cut = "".join(steps[:first_wrong_step(pair["question"], full) + 1])
    if len(pair["prefix"]) < len(cut) < len(full):
        return dict(pair, rejected=cut[len(pair["prefix"]):])
    return pair


# One token a word (" has", " bags", "Eva" ...) and one a digit, operator or punctuation mark: so
# arithmetic goes digit by digit, and a training row is half as long as with characters alone.
CHARS = "\n ,.?*+-=0123456789"
WORDS = tuple(" " + w for w in NAMES + ITEMS) + (
    " has", " bags", " of", " gets", " uses", " How", " many", " now", " answer", " is") + NAMES + ("The",)
# The chat template: BOS, the question, a newline; the answer, then EOS (render_prompt is a prefix of render).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] + '\\n' }}"
            "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def write_tokenizer(path):
    """A word tokenizer in path (returned), which tokenizer.Tokenizer.from_pretrained loads like a hub
    one: BPE over characters, with merges that build each of WORDS left to right (" " + "h" -> " h",
    " h" + "a" -> " ha", ...); the spaced ones rank first, so " Eva" is not cut into " " + "Eva"."""
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
METHODS = ("DPO", "DPO (data-equal)", "Hot naive", "SCDPO")   # the preference runs, each from the SFT model
CONTROLS = METHODS[:3]
FILE_TAG = {"SFT": "sft", "DPO": "dpo", "DPO (data-equal)": "dpo-eq", "Hot naive": "hot", "SCDPO": "scdpo"}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/miniature", help="output folder (models, pairs, predictions, HTML)")
    p.add_argument("--seeds", type=int, default=1, help="independent repeats (SFT retrained each time)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--reuse", action="store_true", help="keep finished stages found in --out (SFT, pairs, "
                   "preference runs of the same settings)")
    p.add_argument("--sweep", default=None, help="e.g. 0,0.5,1: run every --reorder value (--seeds each) and "
                   "write <out>/sweep.{json,txt,svg}")
    # the task
    p.add_argument("--reorder", type=float, default=0.0, help="the task's knob: fraction of SFT demos that "
                   "apply the additions and subtractions in a random valid order (0: the question's order)")
    p.add_argument("--habit", type=float, default=0.7, help="fraction of SFT demos that forget the borrow")
    p.add_argument("--overborrow", type=float, default=0.0, help="fraction of SFT demos whose plain "
                   "subtractions borrow anyway")
    p.add_argument("--n-ops", type=int, default=3, help="additions / subtractions after the product")
    p.add_argument("--n-sft", type=int, default=8000, help="SFT demonstrations")
    p.add_argument("--n-pairs", type=int, default=1500, help="questions to sample pairs for")
    p.add_argument("--n-dev", type=int, default=500, help="held-out dev questions: --lrs selects on these")
    p.add_argument("--n-eval", type=int, default=1000, help="held-out test questions for accuracy (greedy)")
    p.add_argument("--n-credit", type=int, default=2000, help="held-out SFT samples for credit assignment")
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
    p.add_argument("--ramp", default="paper", type=sample.checked(sample.parse_ramp),
                   help="temperature ramp: paper (1.1,+0.05,1.4) | scripts | start,inc,max")
    p.add_argument("--sc-per-question", type=int, default=2, help="step-controlled pairs per question, "
                   "at most")
    p.add_argument("--cut", default="random", choices=["random", "all"], help="cut points in a random order "
                   "(the paper) or ascending")
    p.add_argument("--sc-from", default="naive", choices=["naive", "any"], help="cut the preferred solutions "
                   "of questions with a naive pair (the paper) or of any question")
    # preference training (scdpo.train)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of EVERY preference run (equal "
                   "training; smaller pair sets take more epochs)")
    p.add_argument("--lr", type=float, default=2e-5, help="DPO peak learning rate")
    p.add_argument("--lrs", default=None, help="a learning-rate grid, e.g. 1e-5,2e-5,5e-5: each method's lr "
                   "is chosen on the dev questions, the test questions only report")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--nll-weight", type=float, default=1.0, help="weight of the per-token NLL of chosen "
                   "added to the DPO loss (RPO's term)")
    p.add_argument("--batch", type=int, default=32, help="pairs per DPO step")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of each interval")
    # oracle ablations (the exact checker, which real data lacks)
    p.add_argument("--cut-rejected", action="store_true", help="end every rejected solution right after its "
                   "first wrong step, so no loss falls on the steps that carry the error forward")
    p.add_argument("--clean-chosen", action="store_true", help="drop every pair whose chosen solution has a "
                   "wrong step (right answer by luck), so the NLL term never reinforces a wrong step")
    return p


# The flags that decide the SFT model and the pairs: --reuse keeps those stages only where they match.
STAGES = ("reorder", "habit", "overborrow", "n_ops", "n_sft", "n_pairs", "n_dev", "n_eval", "n_credit", "dim",
          "layers", "heads", "sft_steps", "sft_lr", "sft_batch", "k_max", "tries", "ramp", "sc_per_question",
          "cut", "sc_from")


def tag(args):
    """The preference-training settings, in the names of the runs and of each seed's result file."""
    return (f"lr{args.lr:g}-nll{args.nll_weight:g}-b{args.beta:g}-st{args.steps}-bs{args.batch}"
            + "-cut" * args.cut_rejected + "-clean" * args.clean_chosen)


def check_stages(args, out):
    """Check (with --reuse) or record <out>/settings.json, the STAGES flags the seed folder was made with."""
    path, want = os.path.join(out, "settings.json"), {k: getattr(args, k) for k in STAGES}
    if args.reuse and os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        diff = [f"--{k.replace('_', '-')} {have.get(k)} (now {v})" for k, v in want.items()
                if have.get(k) != v]
        if diff:
            raise ValueError(f"--reuse: {out} was made with other settings: {', '.join(diff)}; "
                             f"use another --out")
    elif dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        data.write_json(path, want)


# ----------------------------------------------------------------------------------------------
# The pair sets of the four preference runs
# ----------------------------------------------------------------------------------------------
def distinct(pairs, n):
    """The first n pairs of `pairs` with no (question, prefix, chosen, rejected) repeated."""
    seen, out = set(), []
    for p in pairs:
        key = (p["question"], p["prefix"], p["chosen"], p["rejected"])
        if key not in seen and len(out) < n:
            seen.add(key)
            out.append(p)
    return out


def hot_pairs(sft, tok, recs, sc, s, seed):
    """The "hot naive" control, which separates the prefix from the ramp: for each step-controlled
    pair, a pair of the same question whose rejected solution is sampled with the same ramp but from
    the question alone (no shared prefix), beside the naive pair's chosen solution."""
    want = Counter(p["question"] for p in sc)
    chosen = {p["question"]: p["prefix"] + p["chosen"] for p in sc}
    by_q = {r["question"]: r for r in recs}
    qs, out = sorted(want), []
    sols = sample.sample_solutions(sft, tok, qs, s.sampling(ramp=s.ramp), n=2 * s.tries, seed=seed)
    for q, texts in zip(qs, sols):
        wrong = [t for t, fin in texts if fin != "length" and data.judge(t, by_q[q]["gold"], "cot")[0] ==
                 "dispreferred" and not data.is_noisy(t, "cot", delim=DELIM)]
        for t in list(dict.fromkeys(wrong))[:want[q]]:
            out.append(data.make_pair(by_q[q], chosen[q], t, fmt="cot",
                                      sampling={"ramp": list(s.ramp), "from": "question", "seed": seed}))
    return out


def naive_pool(sft, tok, args, seed, out, s, need, rate, rank, world):
    """(pool, questions drawn): naive pairs on new questions for the data-equal control, in rounds
    sized by `rate` (naive pairs per question so far) until there are `need`, at most 4 rounds."""
    pool, n_q = [], 0
    for rnd in range(4):
        if len(pool) >= need:
            break
        n = max(64, math.ceil(1.2 * (need - len(pool)) / max(rate, 0.05)))
        recs = dataset(n, seed=1000 * seed + 10 + rnd, n_ops=args.n_ops, offset=(5 + rnd) * 10**6)
        path = os.path.join(out, f"pairs-extra{rnd}.jsonl")
        sample.make_pairs(sft, tok, recs, path, replace(s, sc_per_question={"mini": 0}), chunk=512, rank=rank,
                          world=world, progress=False, restart=not args.reuse)
        dist.barrier()
        pool += [p for p in data.read_pairs(path) if p["kind"] == "naive"]
        n_q += n
    return pool, n_q


def noisy_chosen(pair):
    """Whether the chosen solution (prefix + chosen) has a wrong step, by the exact checker."""
    return first_wrong_step(pair["question"], pair["prefix"] + pair["chosen"]) != -1


def pair_sets(sft, tok, args, seed, out, pair_recs, rank, world):
    """{method: pairs file} and the pairs' statistics. DPO: the naive pairs; DPO (data-equal): as many
    DISTINCT naive pairs as SCDPO has pairs (naive, then naive_pool's); Hot naive: naive + hot_pairs;
    SCDPO: naive + step-controlled."""
    s = sample.PairSettings(fmt="cot", delimiter=DELIM, max_new_tokens=48, k_max=args.k_max,
                            naive_batch=args.k_max, cut=args.cut, cut_mode="paper", sc_from=args.sc_from,
                            sc_per_question={"mini": args.sc_per_question}, tries=args.tries,
                            ramp=sample.parse_ramp(args.ramp), seed=seed)
    path = os.path.join(out, "pairs.jsonl")
    summary = sample.make_pairs(sft, tok, pair_recs, path, s, chunk=512, rank=rank, world=world,
                                progress=False, restart=not args.reuse)
    dist.barrier()   # rank 0 writes pairs.jsonl once every rank is done
    ps = data.read_pairs(path)
    naive, sc = [p for p in ps if p["kind"] == "naive"], [p for p in ps if p["kind"] == "sc"]
    pool, n_extra = naive_pool(sft, tok, args, seed, out, s, len(sc), len(naive) / len(pair_recs),
                                rank, world)
    sets = {"DPO": naive, "DPO (data-equal)": distinct(naive + pool, len(naive) + len(sc)),
            "Hot naive": naive + (hot_pairs(sft, tok, pair_recs, sc, s, seed) if rank == 0 else []),
            "SCDPO": naive + sc}
    stats = {"naive": len(naive), "sc": len(sc), "extra_questions": n_extra, "summary": summary,
             **describe(naive, "naive"), **describe(sc, "sc")}
    if args.clean_chosen:
        sets = {m: [p for p in v if not noisy_chosen(p)] for m, v in sets.items()}
    if args.cut_rejected:
        sets = {m: [cut_rejected(p) for p in v] for m, v in sets.items()}
    files = {}
    for m, v in sets.items():
        files[m] = os.path.join(out, f"pairs-{FILE_TAG[m]}.jsonl")
        if rank == 0:
            data.write_jsonl(files[m], v)
            stats[f"pairs {m}"] = len(v)
    dist.barrier()
    return files, stats


def describe(pairs, kind):
    """The pairs' statistics, keys prefixed by `kind`: where the rejected's first wrong step falls from
    the cut k (naive: k = -1) and its kind; the fraction whose two solutions differ before it, in text
    and in route (the knob's effect); the fraction with a noisy chosen (right answer, a wrong step)."""
    errs = [error_kind(p["question"], p["prefix"] + p["rejected"]) for p in pairs]
    text = route = 0
    for (e, _), p in zip(errs, pairs):
        a = data.split_steps(p["prefix"] + p["chosen"], "cot", DELIM)[:max(e, 0)]
        b = data.split_steps(p["prefix"] + p["rejected"], "cot", DELIM)[:max(e, 0)]
        text += a != b
        route += [op_of(x) for x in a] != [op_of(x) for x in b]
    n = max(1, len(pairs))
    where = Counter(e - p["k"] for (e, _), p in zip(errs, pairs))
    return {f"{kind}_first_wrong_minus_k": dict(sorted(where.items())),
            f"{kind}_error": dict(Counter(k for _, k in errs)), f"{kind}_differ_text": text / n,
            f"{kind}_differ_route": route / n,
            f"{kind}_noisy_chosen": sum(map(noisy_chosen, pairs)) / n}


def op_of(step):
    """The operation a step applies, (op, the number added or taken away), whatever its wording."""
    m = _STEP.match(step)
    if m is None:
        return step
    return (m[2], tuple(sorted((m[1], m[3])))) if m[2] in "+*" else (m[2], m[3])


# ----------------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------------
def train(reuse, **kw):
    """scdpo.train with the miniature's shared settings; --reuse resumes (finished runs are read back).
    Quiet but for the step lines every log_every steps, so that a long stage shows it is moving."""
    return scdpo.train(scdpo.settings(quiet=True, max_len=128, max_prompt=100, resume=reuse,
                                      overwrite=not reuse, **kw)).eval()


def accuracy(model, tok, recs, rank, world):
    """(accuracy, rows): eval.evaluate, then every row's first wrong step by the exact checker."""
    rows = evaluation.evaluate(model, tok, recs, max_new_tokens=48, batch_size=1024, rank=rank, world=world)
    for r in rows:
        r["first_wrong_step"], r["error"] = error_kind(r["question"], r["completion"])
        r["borrow"] = any(op == "-" and needs_borrow(x, y) for op, x, y, _ in nodes(r["question"]))
        r["fewest_borrows"] = fewest_borrows(r["question"], r["completion"])
    return sum(r["correct"] for r in rows) / len(rows), rows


def stage(seed, what, t0):
    print0(f"[seed {seed}] {what} | {time.time() - t0:.0f}s")


def splits(args, seed):
    """The seed's SFT demonstrations and its pair, dev (selection only), test and credit questions.
    A dev question that is also a test question is dropped: selection never sees a test problem."""
    sft = dataset(args.n_sft, seed=1000 * seed + 1, habit=args.habit, n_ops=args.n_ops,
                  overborrow=args.overborrow, reorder=args.reorder)
    pairs = dataset(args.n_pairs, seed=1000 * seed + 2, n_ops=args.n_ops, offset=10**6)
    test = dataset(args.n_eval + args.n_credit, seed=1000 * seed + 3, n_ops=args.n_ops, offset=2 * 10**6)
    seen = {r["question"] for r in test[:args.n_eval]}
    dev = [r for r in dataset(args.n_dev, seed=1000 * seed + 4, n_ops=args.n_ops, offset=3 * 10**6)
           if r["question"] not in seen]
    return sft, pairs, dev, test[:args.n_eval], test[args.n_eval:]


def run_seed(args, seed, rank, world):
    """One full run; returns {method: numbers}, the pairs' statistics and the stage times (rank 0)."""
    out, t0, times = os.path.join(args.out, f"seed{seed}"), time.time(), {}
    check_stages(args, out)
    # --- the task and the tokenizer ------------------------------------------------------------------
    sft_recs, pair_recs, dev_recs, eval_recs, credit_recs = splits(args, seed)
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
    stage(seed, f"SFT: {args.sft_steps} steps on {len(sft_recs)} demonstrations", t0)
    sft_dir = os.path.join(out, "sft")
    epochs = math.ceil(args.sft_steps * args.sft_batch / len(sft_recs))
    sft = train(args.reuse, objective="sft", model=init, data=os.path.join(out, "sft.jsonl"), out=sft_dir,
                lr=args.sft_lr, epochs=epochs, max_steps=args.sft_steps, global_batch=args.sft_batch,
                micro_batch=args.sft_batch // world, warmup_ratio=0.05, seed=seed, log_every=100)
    sft_path = os.path.join(sft_dir, "final")
    times["sft"] = time.time() - t0
    # --- 2. the four pair sets, sampled by the SFT model (METHOD.md sections 1-2) ----------------------
    stage(seed, f"pairs: {args.n_pairs} questions, naive then step-controlled, then the controls' pairs", t0)
    t1 = time.time()
    files, stats = pair_sets(sft, tok, args, seed, out, pair_recs, rank, world)
    times["pairs"] = time.time() - t1
    # --- 3. the preference runs, all from the same SFT model, all for --steps optimizer steps -----------
    res = {}
    for name in METHODS:
        t1 = time.time()
        n = len(data.read_pairs(files[name]))
        stage(seed, f"{name}: {args.steps} steps on {n} pairs", t0)
        res[name] = {"model": train(args.reuse, model=sft_path, pairs=files[name], out=os.path.join(
            out, f"{FILE_TAG[name]}-{tag(args)}"), lr=args.lr, beta=args.beta, nll_weight=args.nll_weight,
            epochs=math.ceil(args.steps * args.batch / n), max_steps=args.steps, global_batch=args.batch,
            micro_batch=args.batch // world, seed=seed, log_every=60), "pairs": n}
        times[name] = time.time() - t1
    # --- 4. evaluation: greedy accuracy on test (and dev, for selection), credit on held-out samples ----
    stage(seed, f"greedy accuracy: {args.n_eval} test + {args.n_dev} dev questions, 5 models", t0)
    t1 = time.time()
    table = {"SFT": {"model": sft}, **res}
    for name, row in table.items():
        row["acc"], rows = accuracy(row["model"], tok, eval_recs, rank, world)
        row["dev_acc"] = accuracy(row["model"], tok, dev_recs, rank, world)[0] if dev_recs else float("nan")
        row["correct"] = [int(r["correct"]) for r in rows]
        row["borrow"] = [int(r["borrow"]) for r in rows]
        row["fewest_borrows"] = [r["fewest_borrows"] for r in rows]
        row["errors"] = dict(Counter(r["error"] for r in rows))
        if rank == 0:
            data.write_jsonl(os.path.join(out, f"preds-{FILE_TAG[name]}.jsonl"), rows)
    times["eval"] = time.time() - t1
    # credit: each run's implicit reward against the SFT model on the SAME held-out SFT samples (T=1)
    stage(seed, f"credit assignment: {args.n_credit} SFT samples, 4 models", t0)
    t1 = time.time()
    if rank == 0:
        sols = sample.sample_solutions(sft, tok, [r["question"] for r in credit_recs],
                                       sample.Sampling(max_new_tokens=48, temperature=1.0), n=1, seed=seed)
        examples = []
        for r, sol in zip(credit_recs, sols):
            steps = data.split_steps(sol[0][0], "cot", DELIM)
            label, _, kinds = check(r["question"], sol[0][0])
            if steps:
                examples.append({"id": r["id"], "question": r["question"], "steps": steps, "label": label,
                                 "kinds": kinds})
        for name in METHODS:
            loc = evaluation.credit_assignment(table[name]["model"], sft, tok, examples, args.beta)
            table[name]["loc"] = {k: loc[k] for k in ("acc_err", "acc_cor", "f1", "thresholds", "scores")}
            table[name]["step_rewards"], table[name]["tokens"] = loc["step_rewards"], loc["tokens"]
        labels = [e["label"] for e in examples]
        stats["credit_labels"], stats["credit_kinds"] = labels, [e["kinds"] for e in examples]
        shown = [i for i, e in enumerate(examples) if e["label"] >= 1][:12]
        evaluation.html_compare([examples[i] for i in shown],
                                [(m, [table[m]["tokens"][i] for i in shown]) for m in METHODS],
                                os.path.join(out, "credit.html"),
                                f"Implicit reward per token vs SFT (seed {seed})",
                                summary=credit_header(table), n=len(shown))
    times["credit"] = time.time() - t1
    times["total"] = time.time() - t0
    keep = ("acc", "dev_acc", "correct", "borrow", "fewest_borrows", "errors", "loc", "step_rewards", "pairs")
    result = ({m: {k: v for k, v in row.items() if k in keep} for m, row in table.items()}, stats, times)
    if rank == 0:
        log_seed(seed, result)
        data.write_json(os.path.join(out, f"result-{tag(args)}.json"), result)
    return result


KINDS = ("product", "add", "sub-plain", "sub-borrow", "answer")   # the step kinds of the false alarms


def credit_header(table):
    """The summary table at the top of credit.html: every method's scores on the same solutions."""
    header = ["method", "top-1", "AUC", "loc. F1"] + [f"false alarms {k}" for k in KINDS]
    rows = []
    for m in METHODS:
        sc = table[m]["loc"]["scores"]
        rows.append([m, f"{100 * sc['top1']:.1f} (chance {100 * sc['top1_chance']:.1f})", f"{sc['auc']:.3f}",
                     f"{100 * table[m]['loc']['f1']:.1f}"] +
                    [f"{sc['false_alarm'].get(k, float('nan')):.3f}" for k in KINDS])
    return header, rows


def log_seed(seed, result):
    table, stats, times = result
    print0(f"[seed {seed}] pairs: " + " | ".join(f"{k} {v}" for k, v in stats.items()
                                                 if not k.startswith(("credit_", "summary"))))
    for name, row in table.items():
        print0(f"[seed {seed}] {name}: test {100 * row['acc']:.1f} dev {100 * row['dev_acc']:.1f} | "
               f"greedy errors {row['errors']}")
    print0(f"[seed {seed}] seconds: " + " | ".join(f"{k} {v:.0f}" for k, v in times.items()))


# ----------------------------------------------------------------------------------------------
# Statistics and tables. Within a seed, intervals come from a paired bootstrap over the test problems
# (accuracy) or the credit solutions (top-1, AUC): both methods are scored on the same resampled
# items, so what the items share cancels. Over seeds: a t interval of the per-seed differences.
# ----------------------------------------------------------------------------------------------
def accuracy_diff(a, b, B, seed=0):
    """(point, lo, hi) of mean(a) - mean(b), a and b 0/1 per test problem (the same problems)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return evaluation.bootstrap(lambda ix: a[ix].mean() - b[ix].mean(), len(a), B, seed)


def credit_diff(sums_a, sums_b, labels, key, B, seed=0):
    """(point, lo, hi) of step_scores(a)[key] - step_scores(b)[key] on the same credit solutions."""
    def stat(ix):
        ls = [labels[i] for i in ix]
        return (evaluation.step_scores([sums_a[i] for i in ix], ls)[key]
                - evaluation.step_scores([sums_b[i] for i in ix], ls)[key])
    return evaluation.bootstrap(stat, len(labels), B, seed)


def differences(runs, B):
    """{control: {metric: (point, lo, hi)}} for SCDPO minus each control: one seed, the paired bootstrap;
    several, the mean of the per-seed differences and its t interval."""
    out = {}
    for c in CONTROLS:
        per = {"accuracy": [], "top-1": [], "AUC": []}
        for t, st, _ in runs:
            per["accuracy"].append(accuracy_diff(t["SCDPO"]["correct"], t[c]["correct"], B))
            for name, key in (("top-1", "top1"), ("AUC", "auc")):
                per[name].append(credit_diff(t["SCDPO"]["step_rewards"], t[c]["step_rewards"],
                                             st["credit_labels"], key, max(100, B // 5)))
        out[c] = {m: v[0] if len(v) == 1 else evaluation.seed_interval([x[0] for x in v])
                  for m, v in per.items()}
    return out


def fmt_ci(x):
    """(point, lo, hi) in points: '+1.2 [-0.3, +2.7]', the point alone when there is no interval."""
    p, lo, hi = (100 * v for v in x)
    return f"{p:+.1f}" if math.isnan(lo) else f"{p:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def subset_acc(row, borrow=None):
    """Test accuracy over all problems (None), those with a borrow subtraction (1) or the rest (0)."""
    sel = [c for c, b in zip(row["correct"], row["borrow"]) if borrow is None or b == borrow]
    return sum(sel) / max(1, len(sel))


def fewest(row):
    """The fraction of greedy test solutions whose route needs the fewest borrows, over the questions
    whose routes differ in borrows (fewest_borrows)."""
    sel = [f for f in row["fewest_borrows"] if f >= 0]
    return sum(sel) / max(1, len(sel))


def table1(args, runs, seconds):
    """Table 1 in miniature (the columns: README), means over seeds, then SCDPO minus each control."""
    n = len(runs)
    mean = lambda vals: sum(vals) / len(vals)
    lines = [f"Table 1 in miniature: reorder {args.reorder:g}, {args.n_eval} test problems (greedy), "
             f"{args.n_credit} credit samples; {n} seed(s) (means); {seconds:.0f} s in all",
             f"{'method':<18} {'pairs':>6} {'steps':>6} {'accuracy':>9} {'borrow':>7} {'other':>7} "
             f"{'fewest':>7} {'top-1':>7} {'chance':>7} {'AUC':>6} {'loc.F1':>7}"]
    for name in ("SFT",) + METHODS:
        rows = [r[0][name] for r in runs]
        acc, bor, oth = (mean([subset_acc(x, w) for x in rows]) for w in (None, 1, 0))
        trained = "-" if name == "SFT" else round(mean([x["pairs"] for x in rows]))
        line = (f"{name:<18} {trained:>6} {'-' if name == 'SFT' else args.steps:>6} {100 * acc:>9.1f} "
                f"{100 * bor:>7.1f} {100 * oth:>7.1f} {100 * mean([fewest(x) for x in rows]):>7.1f}")
        if "loc" in rows[0]:
            sc = [x["loc"]["scores"] for x in rows]
            avg = lambda key: mean([s[key] for s in sc])
            line += (f" {100 * avg('top1'):>7.1f} {100 * avg('top1_chance'):>7.1f} {avg('auc'):>6.3f} "
                     f"{100 * mean([x['loc']['f1'] for x in rows]):>7.1f}")
        lines.append(line)
    what = ("paired bootstrap, 95%" if n == 1 else f"mean over {n} seeds, t 95%")
    lines.append(f"SCDPO minus each control ({what}): accuracy and top-1 in points, AUC x100")
    for c, d in differences(runs, args.boot).items():
        lines.append(f"  - {c:<17} accuracy {fmt_ci(d['accuracy'])} | top-1 {fmt_ci(d['top-1'])} | "
                     f"AUC {fmt_ci(d['AUC'])}")
    def pct(key):   # a pair statistic's mean over seeds
        return f"{100 * mean([r[1][key] for r in runs]):.1f}%"
    lines.append(f"naive pairs that differ before the rejected's first error: in text "
                 f"{pct('naive_differ_text')}, in route {pct('naive_differ_route')} | chosen with a wrong "
                 f"step (noisy): naive {pct('naive_noisy_chosen')}, step-controlled {pct('sc_noisy_chosen')}")
    return "\n".join(lines)


def select_lr(grid):
    """Each method's learning rate: the one with the best mean DEV accuracy over seeds. grid: {lr: runs}.
    The test numbers are never read here."""
    dev = lambda lr, m: sum(r[0][m]["dev_acc"] for r in grid[lr]) / len(grid[lr])
    return {m: max(grid, key=lambda lr: dev(lr, m)) for m in METHODS}


def grid_table(args, grid):
    """--lrs: dev accuracy of each method at each learning rate, the lr chosen on dev, and the TEST
    numbers of the chosen runs with SCDPO's differences."""
    best = select_lr(grid)
    mean = lambda v: 100 * sum(v) / len(v)
    lines = ["Learning-rate grid: mean DEV accuracy (selection only)", f"{'lr':<10}" +
             "".join(f"{m:>18}" for m in METHODS)]
    lines += [f"{lr:<10g}" + "".join(f"{mean([r[0][m]['dev_acc'] for r in runs]):>18.1f}" for m in METHODS)
              for lr, runs in grid.items()]
    lines.append("chosen on dev: " + ", ".join(f"{m} {best[m]:g}" for m in METHODS))
    sc = grid[best["SCDPO"]]   # SFT's row and the pair statistics come from SCDPO's lr
    runs = [({m: grid[best.get(m, best["SCDPO"])][i][0][m] for m in ("SFT",) + METHODS}, sc[i][1], None)
            for i in range(len(sc))]
    lines.append("TEST accuracy at the chosen lr: " + ", ".join(
        f"{m} {mean([t[m]['acc'] for t, _, _ in runs]):.1f}" for m in METHODS))
    for c, d in differences(runs, args.boot).items():
        lines.append(f"  SCDPO - {c}: accuracy {fmt_ci(d['accuracy'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The sweep: the knob against SCDPO's lead over data-equal DPO
# ----------------------------------------------------------------------------------------------
def sweep_svg(points, path):
    """A small plot written by hand: x = naive pairs differing in route before the error, y = SCDPO minus
    DPO (data-equal), accuracy points with their intervals; one dot per --reorder value."""
    W, H, L, Bm = 480, 320, 60, 40
    ys = [v for p in points for v in p["diff"] if not math.isnan(v)] + [0.0]
    y0, y1 = min(ys) - 1, max(ys) + 1
    X = lambda x: L + (W - L - 20) * x
    Y = lambda y: H - Bm - (H - Bm - 20) * (y - y0) / (y1 - y0)
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
          f'font-size="11">', f'<line x1="{L}" y1="{Y(0)}" x2="{W - 20}" y2="{Y(0)}" stroke="#999"/>',
          f'<line x1="{L}" y1="20" x2="{L}" y2="{H - Bm}" stroke="#000"/>',
          f'<line x1="{L}" y1="{H - Bm}" x2="{W - 20}" y2="{H - Bm}" stroke="#000"/>',
          f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">naive pairs that differ in route before '
          f'the error (fraction)</text>',
          f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">SCDPO - DPO '
          f'(data-equal), accuracy points</text>']
    for t in (0, 0.25, 0.5, 0.75, 1):
        el.append(f'<text x="{X(t)}" y="{H - Bm + 14}" text-anchor="middle">{t:g}</text>')
    for t in (y0, 0, y1):
        el.append(f'<text x="{L - 4}" y="{Y(t) + 4}" text-anchor="end">{t:+.1f}</text>')
    for p in points:
        x, (m, lo, hi) = p["differ_route"], p["diff"]
        if not math.isnan(lo):
            el.append(f'<line x1="{X(x)}" y1="{Y(lo)}" x2="{X(x)}" y2="{Y(hi)}" stroke="#c00"/>')
        el.append(f'<circle cx="{X(x)}" cy="{Y(m)}" r="4" fill="#c00"><title>reorder {p["reorder"]:g}'
                  f'</title></circle>')
    el.append("</svg>")
    data.write_text(path, "\n".join(el))
    return path


def run_sweep(args, rank, world):
    """Every --sweep value of --reorder, --seeds seeds each, into <out>/reorder<r>; then the table and
    the plot of SCDPO minus DPO (data-equal) against the measured route difference of naive pairs."""
    root, points = args.out, []
    for r in [float(x) for x in args.sweep.split(",")]:
        args.reorder, args.out = r, os.path.join(root, f"reorder{r:g}")
        t0 = time.time()
        runs = run_seeds(args, rank, world)
        if rank == 0:
            print(table1(args, runs, time.time() - t0), flush=True)
            d = differences(runs, args.boot)["DPO (data-equal)"]
            mean = lambda f: sum(f(x) for x in runs) / len(runs)
            points.append({"reorder": r, "seeds": len(runs), "diff": [100 * v for v in d["accuracy"]],
                           "diff_top1": [100 * v for v in d["top-1"]],
                           "differ_route": mean(lambda x: x[1]["naive_differ_route"]),
                           "differ_text": mean(lambda x: x[1]["naive_differ_text"]),
                           "fewest": {m: mean(lambda x: fewest(x[0][m])) for m in ("SFT",) + METHODS}})
    args.out = root
    if rank == 0:
        lines = [f"Sweep: SCDPO minus DPO (data-equal) in points, {args.seeds} seed(s) each; naive pairs "
                 f"that differ before the error; greedy routes with the fewest borrows",
                 f"{'reorder':>7} {'route':>6} {'text':>6} {'fewest SFT/eq/SC':>17}  "
                 f"{'accuracy [95%]':<21} top-1 [95%]"]
        for p in points:
            few = "/".join(f"{100 * p['fewest'][m]:.0f}" for m in ("SFT", "DPO (data-equal)", "SCDPO"))
            acc, top1 = (fmt_ci([v / 100 for v in p[k]]) for k in ("diff", "diff_top1"))
            lines.append(f"{p['reorder']:>7g} {100 * p['differ_route']:>5.1f}% "
                         f"{100 * p['differ_text']:>5.1f}% {few:>17}  {acc:<21} {top1}")
        text = "\n".join(lines)
        print(text, flush=True)
        data.write_json(os.path.join(root, "sweep.json"), points)
        data.write_text(os.path.join(root, "sweep.txt"), text + "\n")
        sweep_svg(points, os.path.join(root, "sweep.svg"))
        print(f"wrote {os.path.join(root, 'sweep.svg')}")
    return points


def run_seeds(args, rank, world):
    runs = []
    for s in range(args.seed, args.seed + args.seeds):
        done = os.path.join(args.out, f"seed{s}", f"result-{tag(args)}.json")
        if args.reuse and os.path.exists(done):   # a finished seed (e.g. from another process): read back
            check_stages(args, os.path.dirname(done))
            with open(done) as f:
                runs.append(json.load(f))
            print0(f"[seed {s}] read back from {done}")
        else:
            runs.append(run_seed(args, s, rank, world))
    return runs


def main(argv=None):
    args = get_parser().parse_args(argv)
    rank, world, _, _ = modeling.compute_init()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print0(json.dumps(vars(args)))
    if args.sweep:
        out = run_sweep(args, rank, world)
    else:
        grid = {}
        for i, lr in enumerate([float(x) for x in args.lrs.split(",")] if args.lrs else [args.lr]):
            t0, args.lr = time.time(), lr
            args.reuse = args.reuse or i > 0   # later learning rates keep each seed's SFT model and pairs
            grid[lr] = run_seeds(args, rank, world)
            if rank == 0:   # the results are rank 0's
                print(table1(args, grid[lr], time.time() - t0), flush=True)
        if rank == 0 and len(grid) > 1:
            print(grid_table(args, grid), flush=True)
        out = grid[args.lr]
    modeling.compute_cleanup()
    return out


if __name__ == "__main__":
    modeling.run_main(main)
