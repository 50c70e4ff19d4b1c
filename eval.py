"""Evaluation: greedy accuracy on a test set, and credit assignment (METHOD.md sections 4 and 5).

    python eval.py --model PATH --data gsm8k --limit 200 --out preds.jsonl     # accuracy
    python eval.py --model PATH --data math500                                  # + by subject, level
    torchrun --standalone --nproc_per_node=8 eval.py --model PATH --data math   # questions strided by rank
    python eval.py --model DPO_PATH --ref SFT_PATH --processbench gsm8k --html credit.html

Accuracy: greedy decoding with the training prompt; grade.extract_answer reads the final answer
and grade.is_equiv judges it. --out: one JSON line per question.

Credit assignment: a DPO model is its own process reward model. Token x_i after prefix s_i earns
    r(s_i, x_i) = beta * (log pi_theta(x_i | s_i) - log pi_ref(x_i | s_i))
and a step the sum over its tokens. Does the wrong step get the low reward? From the step rewards
we predict the first wrong step (ProcessBench's `label`; -1: all right) and score it as ProcessBench:
    acc_err = exact first-wrong-step accuracy on solutions with an error
    acc_cor = accuracy on error-free solutions (predicting -1)
    F1      = 2 acc_err acc_cor / (acc_err + acc_cor)
F1 needs a threshold; step_scores' top-1 and AUC only compare rewards with each other.
"""
import argparse
import html
import json
import os
import time
from itertools import accumulate

import numpy as np
import torch
from tqdm import tqdm

import data
import model as modeling
import sample
from grade import extract_answer, is_equiv
from kernels import token_logprobs
from model import gather_rows, print0


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------


def grade(rec, completion, fmt="cot"):
    """One prediction row; 'pred' is None when no answer can be extracted. As in data.judge, a
    code-integrated answer must be boxed or stated (no fallback to the last math expression)."""
    pred = extract_answer(completion, fallback=fmt == "cot")
    row = {"id": rec["id"], "question": rec["question"], "gold": rec["gold"], "completion": completion,
           "pred": pred, "correct": bool(is_equiv(pred, rec["gold"]))}
    row.update({k: rec[k] for k in ("subject", "level") if rec.get(k) is not None})
    return row


def accuracy_report(rows):
    """{'all': (correct, n), 'subject/<s>': .., 'level/<l>': ..} from prediction rows."""
    out = {}
    for r in rows:
        keys = ["all"] + [f"{k}/{r[k]}" for k in ("subject", "level") if r.get(k) is not None]
        for key in keys:
            c, n = out.get(key, (0, 0))
            out[key] = (c + int(r["correct"]), n + 1)
    return out


def format_report(report):
    lines = []
    for key in sorted(report, key=lambda k: (k != "all", k)):
        c, n = report[key]
        lines.append(f"{key:<40s} {100 * c / max(n, 1):6.2f}%  ({c}/{n})")
    return "\n".join(lines)


def generate_greedy(model, tok, questions, max_new_tokens, batch_size, static=False, progress=False,
                    fmt="cot"):
    """Greedy completions of `questions`, with the training prompt; fmt "code" runs each code block as
    it is written, as sampling does (its output is the sandbox's, never the model's)."""
    prompts = [tok.encode(tok.render_prompt(q)) for q in questions]
    cfg, out = sample.Sampling(max_new_tokens=max_new_tokens, static=static, fmt=fmt), []
    bar = tqdm(total=len(prompts), desc="greedy decoding", unit="q", disable=not progress)
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        out += [tok.decode(r.ids) for r in sample.generate(model, batch, cfg, tok=tok)]
        bar.update(len(batch))
    bar.close()
    return out


def evaluate(model, tok, records, max_new_tokens=512, batch_size=64, rank=0, world=1, static=False,
             progress=False, fmt="cot"):
    """Prediction rows for `records`, in their order, on every rank; each rank grades
    records[rank::world]. progress: a bar on rank 0 (its share of the questions)."""
    mine = list(range(rank, len(records), world))
    questions = [records[i]["question"] for i in mine]
    completions = generate_greedy(model, tok, questions, max_new_tokens, batch_size, static,
                                  progress and rank == 0, fmt)
    rows = [dict(grade(records[i], c, fmt), index=i) for i, c in zip(mine, completions)]
    rows = sorted(gather_rows(rows), key=lambda r: r["index"])
    return [{k: v for k, v in r.items() if k != "index"} for r in rows]


# ----------------------------------------------------------------------------------------------
# Credit assignment (METHOD.md section 5)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def response_logprobs(model, tok, prompts, responses, batch_size=16, progress=None):
    """Per pair, (ids, char offsets into the response, log-probs) of its response tokens; prompt +
    response is tokenised once and split as tok.encode_prompt_response splits it. Only the response
    positions' hidden states reach kernels.token_logprobs: the (B, L, V) fp32 logits would take 10 GB
    for a 152k vocabulary at batch 16 and L = 1024."""
    device = next(model.parameters()).device
    out = []
    batches = range(0, len(prompts), batch_size)
    for b in tqdm(batches, desc=progress or "", disable=not progress, unit="batch"):
        rows = []
        for p, r in zip(prompts[b:b + batch_size], responses[b:b + batch_size]):
            (ids, offs), n_chars = tok.encode_with_offsets(p + r), len(p)
            n_prompt = next((i for i, (_, end) in enumerate(offs) if end > n_chars), len(ids))
            rows.append((ids, [(max(s - n_chars, 0), e - n_chars) for s, e in offs], max(n_prompt, 1)))
        seqs = [torch.tensor(ids, dtype=torch.long) for ids, _, _ in rows]
        x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=tok.pad_id or 0).to(device)
        L = x.shape[1]
        h = model(x, return_hidden=True).flatten(0, 1)                     # (B * L, D)
        # flat positions n_prompt-1 .. len-2 of row i predict its response tokens ids[n_prompt:]
        spans = [(i * L + n_prompt - 1, i * L + len(ids) - 1) for i, (ids, _, n_prompt) in enumerate(rows)]
        idx = torch.cat([torch.arange(a, b) for a, b in spans]).to(device)
        lp = token_logprobs(h[idx], model.lm_head_weight, x.flatten()[idx + 1]).cpu()   # (N,) fp32
        for (ids, offs, n_prompt), part in zip(rows, lp.split([b - a for a, b in spans])):
            out.append((ids[n_prompt:], offs[n_prompt:], part))
    return out


def token_rewards(policy, ref, tok, prompts, responses, beta, batch_size=16, progress=False):
    """r_i = beta * (log pi(x_i|s_i) - log pi_ref(x_i|s_i)) for every response token, as one dict
    {ids, offsets, rewards (list of floats)} per response."""
    pol = response_logprobs(policy, tok, prompts, responses, batch_size, progress and "policy log-probs")
    rf = response_logprobs(ref, tok, prompts, responses, batch_size, progress and "reference log-probs")
    return [{"ids": ids, "offsets": offs, "rewards": (beta * (lp - lq)).tolist()}
            for (ids, offs, lp), (_, _, lq) in zip(pol, rf)]


def step_of_tokens(offsets, steps):
    """The step of each token: the one that holds its first character (tokens past the end: the last)."""
    ends, out, j = list(accumulate(len(s) for s in steps)), [], 0   # step j ends at character ends[j]
    for start, _ in offsets:
        while j + 1 < len(ends) and start >= ends[j]:
            j += 1
        out.append(j)
    return out


def step_rewards(offsets, rewards, steps):
    """Sum of the token rewards per step (step_of_tokens assigns each token to one step)."""
    sums = [0.0] * len(steps)
    for j, r in zip(step_of_tokens(offsets, steps), rewards):
        sums[j] += r
    return sums


def predict_first_wrong(step_sums, threshold=0.0, rule="first"):
    """The predicted first wrong step (-1: all right): the first step whose reward is below `threshold`
    (rule "first", ProcessBench's rule for PRMs), or the lowest step if it is below (rule "min")."""
    if not step_sums:
        return -1
    if rule == "min":
        j = min(range(len(step_sums)), key=step_sums.__getitem__)
        return j if step_sums[j] < threshold else -1
    return next((j for j, s in enumerate(step_sums) if s < threshold), -1)


def processbench_metric(preds, labels):
    """ProcessBench's (acc_err, acc_cor, f1) as fractions (Zheng et al. 2024); acc_err is over labels
    >= 0, acc_cor over labels -1, and an empty class counts as accuracy 0."""
    err = [p == l for p, l in zip(preds, labels) if l != -1]
    cor = [p == -1 for p, l in zip(preds, labels) if l == -1]
    a_err = sum(err) / len(err) if err else 0.0
    a_cor = sum(cor) / len(cor) if cor else 0.0
    f1 = 2 * a_err * a_cor / (a_err + a_cor) if a_err + a_cor > 0 else 0.0
    return a_err, a_cor, f1


def fit_threshold(all_step_sums, labels, rule="first"):
    """The threshold (among 0 and the midpoints of the observed step rewards) with the best F1; on a
    tie, the one nearest 0."""
    vals = sorted({round(s, 6) for sums in all_step_sums for s in sums})
    outside = [vals[0] - 1, vals[-1] + 1] if vals else []   # "every step wrong" and "none wrong"
    cands = [0.0] + [(a + b) / 2 for a, b in zip(vals, vals[1:])] + outside
    if len(cands) > 400:   # quantiles are enough
        cands = [0.0] + [vals[int(q * (len(vals) - 1) / 399)] + 1e-9 for q in range(400)]
    score = lambda t: processbench_metric([predict_first_wrong(s, t, rule) for s in all_step_sums], labels)[2]
    return max(cands, key=lambda t: (score(t), -abs(t)))


def localisation(all_step_sums, labels, threshold="fit", rule="first"):
    """{acc_err, acc_cor, f1, thresholds, preds, n_err, n_cor} of the steps' predictions. threshold
    "fit": two-fold cross-fitting, so no label scores its own threshold (each half's best-F1 threshold
    scores the other half; under 4 examples, 0). A float: that threshold for all."""
    n = len(labels)
    if threshold == "fit" and n >= 4:
        halves = [list(range(0, n, 2)), list(range(1, n, 2))]
        preds, ts = [None] * n, []
        for fit_i, score_i in (halves, halves[::-1]):
            t = fit_threshold([all_step_sums[i] for i in fit_i], [labels[i] for i in fit_i], rule)
            ts.append(t)
            for i in score_i:
                preds[i] = predict_first_wrong(all_step_sums[i], t, rule)
    else:
        t = 0.0 if threshold == "fit" else float(threshold)
        ts, preds = [t], [predict_first_wrong(s, t, rule) for s in all_step_sums]
    a_err, a_cor, f1 = processbench_metric(preds, labels)
    return {"acc_err": a_err, "acc_cor": a_cor, "f1": f1, "thresholds": ts, "preds": preds,
            "n_err": sum(l != -1 for l in labels), "n_cor": sum(l == -1 for l in labels)}


# ----------------------------------------------------------------------------------------------
# Threshold-free scores of the step rewards, and their intervals
# ----------------------------------------------------------------------------------------------
# The ProcessBench metric needs a threshold, so a shift of all rewards (a longer run, another beta)
# moves it. These scores only compare rewards with one another; such a shift cannot change them.

# 0.975 quantiles of Student's t for 1..30 degrees of freedom (no scipy); 1.96 (the normal) beyond
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def auc(low, high):
    """P(x < y) + P(x = y) / 2 for x drawn from `low` and y from `high` (Mann-Whitney): with the ranks
    R of the pooled values (ties get their mean rank), U = sum_{y in high} R(y) - m (m + 1) / 2 and
    auc = U / (n m), n = |low|, m = |high|. O((n + m) log(n + m)); nan when either is empty."""
    low, high = np.asarray(low, dtype=np.float64).ravel(), np.asarray(high, dtype=np.float64).ravel()
    n, m = len(low), len(high)
    if n == 0 or m == 0:
        return float("nan")
    _, inv, counts = np.unique(np.concatenate([low, high]), return_inverse=True, return_counts=True)
    # a value with c copies after k smaller ones holds ranks k+1 .. k+c, whose mean is k + (c + 1) / 2
    mean_rank = np.cumsum(counts) - counts + (counts + 1) / 2
    u = mean_rank[inv.ravel()[n:]].sum() - m * (m + 1) / 2
    return float(u / (n * m))


def step_scores(step_sums, labels, kinds=None):
    """Threshold-free scores of step rewards against first-wrong-step labels (-1: all right):
    top1:        P(the first wrong step scores strictly below every earlier step), over the top1_n
                 labels >= 1; top1_chance = mean 1 / (label + 1), what a random ranking scores
    auc:         auc(wrong, right) (1 perfect, 0.5 chance) over the n_wrong first wrong steps and
                 the right steps before them; n_skipped: solutions whose label is past their last step
    with kinds (a kind per step, e.g. "product"), per kind:
    false_alarm: 1 - auc(wrong, right steps of that kind), the chance that one scores below a first
                 wrong step; n_right: how many right steps."""
    wrong, right, hits, chance, skipped = [], [], [], [], 0
    for i, (sums, label) in enumerate(zip(step_sums, labels)):
        if label >= len(sums):   # the error is a missing step: nothing to score
            skipped += 1
            continue
        # steps after the first wrong one are left out: they are conditioned on an error
        upto = len(sums) if label == -1 else label
        right += [(sums[j], kinds[i][j] if kinds is not None else None) for j in range(upto)]
        if label != -1:
            wrong.append(sums[label])
        if label >= 1:
            hits.append(sums[label] < min(sums[:label]))
            chance.append(1 / (label + 1))
    top1, chance = (float(np.mean(hits)), float(np.mean(chance))) if hits else (float("nan"), float("nan"))
    out = {"top1": top1, "top1_n": len(hits), "top1_chance": chance, "auc": auc(wrong, [r for r, _ in right]),
           "n_wrong": len(wrong), "n_skipped": skipped}
    if kinds is not None:
        by_kind = {}
        for r, k in right:
            by_kind.setdefault(k, []).append(r)
        out["false_alarm"] = {k: 1 - auc(wrong, rs) for k, rs in sorted(by_kind.items())}
        out["n_right"] = {k: len(rs) for k, rs in sorted(by_kind.items())}
    return out


def bootstrap(stat, n, B=1000, seed=0, level=0.95):
    """Percentile bootstrap over n items: (stat(all indices), lo, hi), lo and hi the quantiles of stat
    on B lists of n indices drawn with replacement (numpy Generator, `seed`). A paired difference
    scores both methods on the same indices, so that what the items share cancels:
        lambda ix: np.mean([a[i] for i in ix]) - np.mean([b[i] for i in ix])
    Resamples where stat is nan (an empty class) are dropped; (point, nan, nan) when all are."""
    rng = np.random.default_rng(seed)
    point = float(stat(list(range(n))))
    vals = np.array([stat(rng.integers(0, n, size=n).tolist()) for _ in range(B)], dtype=np.float64)
    vals = vals[~np.isnan(vals)]
    if len(vals) == 0:
        return point, float("nan"), float("nan")
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


def seed_interval(values, level=0.95):
    """Student-t interval over seeds: (mean, mean -+ t_{0.975, n - 1} * sd / sqrt(n)), sd with ddof 1.
    One value gives (v, nan, nan): one seed says nothing about the spread."""
    if level != 0.95:
        raise ValueError(f"seed_interval: only level 0.95 is tabulated, got {level}")
    v = np.asarray(values, dtype=np.float64).ravel()
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if len(v) == 1:
        return mean, float("nan"), float("nan")
    t = _T975[len(v) - 2] if len(v) - 1 <= len(_T975) else 1.96
    half = t * float(v.std(ddof=1)) / np.sqrt(len(v))
    return mean, mean - half, mean + half


# ----------------------------------------------------------------------------------------------
# The HTML page: every token coloured by its reward, one column per method (the paper's Figures 2-3)
# ----------------------------------------------------------------------------------------------
_CSS = """body{font-family:sans-serif;max-width:1600px;margin:2em auto}
table.sol{border-collapse:collapse;margin:0.5em 0 2em 0;width:100%;table-layout:fixed}
table.summary{border-collapse:collapse;margin:1em 0}
table.summary td,table.summary th{border:1px solid #ccc;padding:2px 8px;text-align:right}
td{vertical-align:top;padding:2px 6px;border-bottom:1px solid #eee}
td.tok{font-family:monospace;white-space:pre-wrap;word-break:break-word}
td.sum{font-family:monospace;text-align:right}
th.sum{width:6em}
td.kind,th.kind{font-size:small;color:#555;width:7em}
tr.wrong td{outline:2px solid #c00}
span{border-radius:2px}
.q{background:#f4f4f4;padding:0.5em;white-space:pre-wrap}"""


def _colour(r, scale):
    a = min(abs(r) / scale, 1.0) if scale > 0 else 0.0
    return f"rgba(220,0,0,{a:.2f})" if r < 0 else f"rgba(0,160,0,{a:.2f})"


def _page_scale(token_lists):
    """The 98th percentile of |r| over every token on the page: the full-colour level, shared by all
    columns so that colours compare across methods, and a percentile so one outlier cannot wash it out."""
    mags = sorted(abs(r) for t in token_lists for r in t["rewards"])
    return (mags[int(0.98 * (len(mags) - 1))] if mags else 1.0) or 1.0


def _step_cells(tr, steps, scale):
    """Per step: (its tokens as coloured <span>s, its reward sum), tokens assigned as in step_rewards."""
    text, cells = "".join(steps), [[] for _ in steps]
    for j, (s, e), r in zip(step_of_tokens(tr["offsets"], steps), tr["offsets"], tr["rewards"]):
        cells[j].append(f'<span style="background:{_colour(r, scale)}" title="{r:+.4f}">'
                        f'{html.escape(text[s:e])}</span>')
    sums = step_rewards(tr["offsets"], tr["rewards"], steps)
    return [("".join(c), x) for c, x in zip(cells, sums)]


def _solution_table(ex, trs, names, scale):
    """One solution: a row per step, a (tokens, sum) column pair per method, the wrong step framed."""
    kinds = ex.get("kinds")
    head = ("<th class=kind>kind</th>" if kinds else "") + "".join(
        f"<th>{html.escape(name)}</th><th class=sum>sum</th>" for name in names)
    parts = ["<table class=sol>", f"<tr>{head}</tr>"]
    cols = [_step_cells(tr, ex["steps"], scale) for tr in trs]
    for j in range(len(ex["steps"])):
        cls = ' class="wrong"' if ex.get("label") == j else ""
        kind = f"<td class=kind>{html.escape(str(kinds[j]))}</td>" if kinds else ""
        cells = "".join(f"<td class=tok>{col[j][0]}</td><td class=sum>{col[j][1]:+.3f}</td>" for col in cols)
        parts.append(f"<tr{cls}>{kind}{cells}</tr>")
    return "\n".join(parts + ["</table>"])


def html_compare(examples, columns, path, title="Credit assignment", summary=None, n=8):
    """One HTML page of several methods' token rewards (e.g. DPO beside SCDPO) on the first n examples;
    returns path. examples: {question, steps, label, [title], [kinds]}. columns: (name, token_rewards'
    dicts, one per example). summary: (header, rows), a table on top. Written by data.write_text, so a
    reader never sees half a page."""
    shown = list(range(min(n, len(examples))))
    names = [name for name, _ in columns]
    scale = _page_scale([trs[i] for _, trs in columns for i in shown])
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{_CSS}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    if summary is not None:
        header, rows = summary
        parts.append("<table class=summary><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
                     + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append(f"<p>token colour: beta*(log pi - log pi_ref), red &lt; 0 &lt; green, full colour at |r| = "
                 f"{scale:.3g} (one scale for every column). sum: the step's reward. Framed: the true first "
                 f"wrong step.</p>")
    for i in shown:
        ex = examples[i]
        head = ex.get("title", f"example {i}: first wrong step {ex.get('label')}")
        parts.append(f"<h3>{html.escape(str(head))}</h3><div class=q>{html.escape(ex['question'])}</div>")
        parts.append(_solution_table(ex, [trs[i] for _, trs in columns], names, scale))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data.write_text(path, "\n".join(parts))
    return path


def credit_summary(res):
    """(header, rows) of a credit_assignment result for html_compare's summary table."""
    s = res["scores"]
    header = ["acc_err", "acc_cor", "F1", "top-1", "top-1 n", "top-1 chance", "AUC"]
    row = [f"{100 * res['acc_err']:.1f}", f"{100 * res['acc_cor']:.1f}", f"{100 * res['f1']:.1f}",
           f"{100 * s['top1']:.1f}", str(s["top1_n"]), f"{100 * s['top1_chance']:.1f}", f"{s['auc']:.3f}"]
    return header, [row]


def credit_assignment(policy, ref, tok, examples, beta, threshold="fit", rule="first", html_path=None,
                      n_html=8, batch_size=16, title="Credit assignment", rank=0, world=1, progress=False):
    """examples: {question, steps ("".join is the solution), label, [kinds]}; rank r scores
    examples[r::world]. Returns, on every rank, localisation's dict plus "scores" (step_scores; by kind
    when every example has kinds), "step_rewards" and "tokens" (token_rewards'), in examples' order.
    html_path: rank 0 writes the first n_html examples' page, erroneous ones first."""
    mine = list(range(rank, len(examples), world))
    prompts = [tok.render_prompt(examples[i]["question"]) for i in mine]
    responses = ["".join(examples[i]["steps"]) for i in mine]
    tr = token_rewards(policy, ref, tok, prompts, responses, beta, batch_size, progress and rank == 0)
    if world > 1:
        tr = [t for _, t in sorted(gather_rows(list(zip(mine, tr))), key=lambda x: x[0])]
    sums = [step_rewards(t["offsets"], t["rewards"], e["steps"]) for t, e in zip(tr, examples)]
    labels = [e["label"] for e in examples]
    res = localisation(sums, labels, threshold, rule)
    kinds = [e["kinds"] for e in examples] if examples and all("kinds" in e for e in examples) else None
    res["scores"] = step_scores(sums, labels, kinds)
    if html_path and rank == 0:
        order = [i for i, l in enumerate(labels) if l != -1] + [i for i, l in enumerate(labels) if l == -1]
        shown = [dict(examples[i], title=f"{examples[i].get('id', f'example {i}')}: first wrong step "
                      f"{labels[i]}, predicted {res['preds'][i]}") for i in order]
        html_compare(shown, [("implicit reward", [tr[i] for i in order])], html_path, title,
                     summary=credit_summary(res), n=n_html)
    res["step_rewards"], res["tokens"] = sums, tr
    return res


PROCESSBENCH = ("gsm8k", "math", "olympiadbench", "omnimath")


def load_processbench(subset, limit=None, root=None):
    """ProcessBench examples {id, question, steps, label} from <data root>/processbench/<subset>.json;
    the steps stripped, each but the last followed by a blank line. `limit`: the first erroneous
    (label >= 0) and the first correct (-1) examples, in proportion to the file's counts, in file order
    (the file's first half is all erroneous: its first N alone would leave F1 undefined)."""
    folder = os.path.join(data.data_root(root), "processbench")
    path = os.path.join(folder, f"{subset}.json")
    if not os.path.isfile(path):
        have = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) \
            else []
        raise FileNotFoundError(f"{path}: not found (ProcessBench subset {subset!r}; {folder} holds "
                                f"{', '.join(have) or 'none'})")
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    for i, r in enumerate(rows):
        missing = [k for k in ("id", "problem", "label", "steps") if k not in r]
        if missing:
            raise ValueError(f"{path}: record {i} (id {r.get('id')}) has no field {missing[0]!r}; "
                             f"ProcessBench records have id, problem, label and steps")
    if limit and limit < len(rows):
        wrong = [i for i, r in enumerate(rows) if int(r["label"]) >= 0]
        right = [i for i, r in enumerate(rows) if int(r["label"]) < 0]
        n_wrong = round(limit * len(wrong) / len(rows))
        rows = [rows[i] for i in sorted(wrong[:n_wrong] + right[:limit - n_wrong])]
    return [{"id": r["id"], "question": r["problem"], "label": int(r["label"]),
             "steps": [s.strip() + ("\n\n" if j + 1 < len(r["steps"]) else "")
                       for j, s in enumerate(r["steps"])]} for r in rows]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to evaluate
    p.add_argument("--model", required=True,
                   help="checkpoint folder (hub format: config, safetensors, tokenizer)")
    p.add_argument("--data", default=None,
                   help="gsm8k | math | math500 | svamp | asdiv | mawps | a .jsonl file")
    p.add_argument("--limit", type=sample.positive_int, default=None,
                   help="only the first N questions (or examples)")
    p.add_argument("--out", default=None, help="predictions JSONL (default: none)")
    # decoding
    p.add_argument("--max-new-tokens", type=int, default=512, help="per completion")
    p.add_argument("--batch-size", type=int, default=None, help="questions per batch, per rank (default: 64 "
                   "for greedy decoding, 16 for scoring ProcessBench solutions)")
    p.add_argument("--fmt", default="cot", choices=["cot", "code"], help="solution format; code: each code "
                   "block runs in the sandbox as it is written (as in sampling), answers must be boxed")
    p.add_argument("--static", action="store_true", help=sample.STATIC_HELP)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on a GPU, float32 on a CPU")
    # credit assignment
    p.add_argument("--ref", default=None, help="reference model (the SFT model) for implicit rewards")
    p.add_argument("--beta", type=float, default=0.1, help="beta of r = beta (log pi - log pi_ref)")
    p.add_argument("--processbench", default=None, help=f"error localisation on this ProcessBench subset: "
                   f"{' | '.join(PROCESSBENCH)} (--limit N: erroneous and correct in the file's proportion)")
    p.add_argument("--threshold", default="fit", help="step reward below which a step counts as wrong; "
                   "'fit': chosen by two-fold cross-fitting on the labels")
    p.add_argument("--rule", default="first", choices=["first", "min"],
                   help="first step below threshold | lowest")
    p.add_argument("--html", default=None, help="write the token-reward HTML report here")
    args = p.parse_args(argv)
    if (args.data is None) == (args.processbench is None):
        p.error("give exactly one of --data and --processbench")
    if args.processbench is not None and args.ref is None:
        p.error("--processbench needs --ref (the reference model of the implicit reward)")
    rank, world, _, device = modeling.compute_init()
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    print0(json.dumps(vars(args)))
    policy, tok = modeling.load(args.model, dtype=dtype, device=device)   # checked against each other
    policy.eval()
    t0 = time.time()
    if args.data is not None:
        records = data.load_records(args.data, args.limit)
        rows = evaluate(policy, tok, records, args.max_new_tokens, args.batch_size or 64, rank, world,
                        args.static, progress=True, fmt=args.fmt)
        if rank == 0:
            if args.out:
                data.write_jsonl(args.out, rows)
            report = accuracy_report(rows)
            print(format_report(report))
            c, n = report["all"]
            print(f"accuracy {100 * c / max(n, 1):.2f}% ({c}/{n}) on {args.data} | {time.time() - t0:.0f}s")
            # counted wrong; 'pred' in --out shows every answer read
            missing = sum(r["pred"] is None for r in rows)
            print(f"no extractable answer: {missing}/{n} predictions")
    else:
        ref = modeling.Transformer.from_pretrained(args.ref, dtype=dtype, device=device).eval()
        if ref.args.vocab_size != policy.args.vocab_size:   # the rewards compare one token's two log-probs
            raise ValueError(f"--ref {args.ref} has {ref.args.vocab_size} embeddings but --model "
                             f"{args.model} has {policy.args.vocab_size}: the two must share a vocabulary")
        ex = load_processbench(args.processbench, args.limit)
        res = credit_assignment(policy, ref, tok, ex, args.beta, args.threshold, args.rule,
                                html_path=args.html, batch_size=args.batch_size or 16,
                                title=f"ProcessBench {args.processbench}", rank=rank, world=world,
                                progress=True)
        if rank == 0:
            sc = res["scores"]
            print(f"ProcessBench {args.processbench}: n={len(ex)} ({res['n_err']} erroneous, {res['n_cor']} "
                  f"correct) | acc_err {100 * res['acc_err']:.1f} | acc_cor {100 * res['acc_cor']:.1f} | F1 "
                  f"{100 * res['f1']:.1f} | threshold {', '.join(f'{t:+.4f}' for t in res['thresholds'])} "
                  f"({args.rule}) | top-1 {100 * sc['top1']:.1f} (n={sc['top1_n']}, chance "
                  f"{100 * sc['top1_chance']:.1f}) | AUC {sc['auc']:.3f} | {time.time() - t0:.0f}s")
            if args.out:
                data.write_jsonl(args.out, [
                    {"id": e["id"], "label": e["label"], "pred": pr, "step_rewards": s}
                    for e, pr, s in zip(ex, res["preds"], res["step_rewards"])])
            if args.html:
                print(f"wrote {args.html}")
    modeling.compute_cleanup()


if __name__ == "__main__":
    modeling.run_main(main, oom="out of memory: lower --batch-size")
