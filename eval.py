"""Evaluation: greedy accuracy on a test set, and credit assignment (METHOD.md sections 4 and 5).

    python eval.py --model PATH --data gsm8k --limit 200 --out preds.jsonl     # accuracy
    python eval.py --model PATH --data math500                                  # + by subject, level
    torchrun --standalone --nproc_per_node=8 eval.py --model PATH --data math   # questions strided by rank
    python eval.py --model DPO_PATH --ref SFT_PATH --processbench gsm8k --html credit.html

Accuracy: greedy decoding through sample.py with the training prompt (tok.render_prompt), the final
answer taken by data.extract_answer and judged by data.is_equiv. One JSON line per question.

Credit assignment: the DPO implicit reward of token x_i after prefix s_i (METHOD.md section 5)
    r(s_i, x_i) = beta * (log pi_theta(x_i | s_i) - log pi_ref(x_i | s_i))
summed over a step's tokens is that step's reward. A DPO-trained model is its own process reward
model this way; the question is whether it puts the low reward on the step that is actually wrong.
Given step labels (ProcessBench's `label`: the index of the earliest wrong step, -1 when every step
is right; or the miniature's exact checker) we predict the first wrong step from the step rewards and
score it as ProcessBench does:
    acc_err = exact first-wrong-step accuracy on solutions with an error
    acc_cor = accuracy on error-free solutions (predicting -1)
    F1      = 2 acc_err acc_cor / (acc_err + acc_cor)
"""
import argparse
import html
import json
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import model as modeling
import sample
from kernels import token_logprobs
from model import gather_rows, print0


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------


def grade(rec, completion):
    """One prediction row: the record's fields, the completion, the extracted answer ('pred', None when the
    completion states none: data.extract_answer) and correctness (data.is_equiv against the gold)."""
    pred = data.extract_answer(completion)
    row = {"id": rec["id"], "question": rec["question"], "gold": rec["gold"], "completion": completion,
           "pred": pred, "correct": bool(data.is_equiv(pred, rec["gold"]))}
    for k in ("subject", "level"):
        if rec.get(k) is not None:
            row[k] = rec[k]
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


def generate_greedy(model, tok, questions, max_new_tokens, batch_size):
    """Greedy completions for `questions`, with the training prompt, through sample.py's sampler."""
    prompts = [tok.encode(tok.render_prompt(q)) for q in questions]
    cfg, out = sample.Sampling(max_new_tokens=max_new_tokens), []
    for b in range(0, len(prompts), batch_size):
        out += [tok.decode(r.ids) for r in sample.generate(model, prompts[b:b + batch_size], cfg, tok=tok)]
    return out


def evaluate(model, tok, records, max_new_tokens=512, batch_size=64, rank=0, world=1):
    """Prediction rows for `records` (this rank grades records[rank::world]; rows gathered on all ranks,
    sorted back into the records' order)."""
    mine = list(range(rank, len(records), world))
    completions = generate_greedy(model, tok, [records[i]["question"] for i in mine], max_new_tokens, batch_size)
    rows = [dict(grade(records[i], c), index=i) for i, c in zip(mine, completions)]
    rows = sorted(gather_rows(rows), key=lambda r: r["index"])
    for r in rows:
        del r["index"]
    return rows


# ----------------------------------------------------------------------------------------------
# Credit assignment (METHOD.md section 5)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def response_logprobs(model, tok, prompts, responses, batch_size=16, progress=None):
    """Per response token: (ids, char offsets into the response, log-probs), one tuple per pair.
    prompt + response is tokenised once (tok.encode_prompt_response), as in training; as in scdpo.SeqLogprobs,
    kernels.token_logprobs takes the final hidden states of the response positions only, never the
    (B, L, V) logits (fp32: 10 GB for a 152k vocabulary at batch 16 and L = 1024)."""
    device = next(model.parameters()).device
    out = []
    for b in tqdm(range(0, len(prompts), batch_size), desc=progress or "", disable=not progress, unit="batch"):
        encs = [tok.encode_with_offsets(p + r) + (len(p),) for p, r in zip(prompts[b:b + batch_size], responses[b:b + batch_size])]
        rows = []
        for ids, offs, n_chars in encs:
            n_prompt = next((i for i, (_, end) in enumerate(offs) if end > n_chars), len(ids))
            rows.append((ids, [(max(s - n_chars, 0), e - n_chars) for s, e in offs], max(n_prompt, 1)))
        L = max(len(ids) for ids, _, _ in rows)
        x = torch.full((len(rows), L), tok.pad_id or 0, dtype=torch.long)
        for i, (ids, _, _) in enumerate(rows):
            x[i, :len(ids)] = torch.tensor(ids)
        x = x.to(device)
        h = model(x, return_hidden=True).flatten(0, 1)                     # (B * L, D)
        # flat positions n_prompt-1 .. len-2 of row i predict its response tokens ids[n_prompt:]
        spans = [(i * L + n_prompt - 1, i * L + len(ids) - 1) for i, (ids, _, n_prompt) in enumerate(rows)]
        idx = torch.cat([torch.arange(a, b) for a, b in spans]).to(device)
        lp = token_logprobs(h[idx], model.lm_head_weight, x.flatten()[idx + 1]).cpu()   # (N,) fp32
        for (ids, offs, n_prompt), part in zip(rows, lp.split([b - a for a, b in spans])):
            out.append((ids[n_prompt:], offs[n_prompt:], part))
    return out


def token_rewards(policy, ref, tok, prompts, responses, beta, batch_size=16, progress=False):
    """METHOD.md section 5: r_i = beta * (log pi(x_i|s_i) - log pi_ref(x_i|s_i)) for every response
    token. Returns one dict {ids, offsets, rewards (list of floats)} per response."""
    pol = response_logprobs(policy, tok, prompts, responses, batch_size, progress and "policy log-probs")
    rf = response_logprobs(ref, tok, prompts, responses, batch_size, progress and "reference log-probs")
    return [{"ids": ids, "offsets": offs, "rewards": (beta * (lp - lq)).tolist()}
            for (ids, offs, lp), (_, _, lq) in zip(pol, rf)]


def step_bounds(steps):
    """[(start, end)] character spans of the steps of "".join(steps)."""
    bounds, pos = [], 0
    for s in steps:
        bounds.append((pos, pos + len(s)))
        pos += len(s)
    return bounds


def step_rewards(offsets, rewards, steps):
    """Sum of the token rewards per step; a token belongs to the step that holds its first character."""
    bounds = step_bounds(steps)
    sums, j = [0.0] * len(steps), 0
    for (start, _), r in zip(offsets, rewards):
        while j + 1 < len(bounds) and start >= bounds[j][1]:
            j += 1
        sums[j] += r
    return sums


def predict_first_wrong(step_sums, threshold=0.0, rule="first"):
    """The predicted index of the first wrong step, -1 for "all steps right".
    rule "first": the first step whose reward is below `threshold` (ProcessBench's rule for PRMs).
    rule "min": the lowest-reward step, if its reward is below `threshold`."""
    if not step_sums:
        return -1
    if rule == "min":
        j = min(range(len(step_sums)), key=step_sums.__getitem__)
        return j if step_sums[j] < threshold else -1
    return next((j for j, s in enumerate(step_sums) if s < threshold), -1)


def processbench_metric(preds, labels):
    """ProcessBench (Zheng et al. 2024): exact-match accuracy of the first wrong step on erroneous
    solutions (label >= 0), accuracy on correct ones (label -1), and their harmonic mean.
    Returns (acc_err, acc_cor, f1) as fractions; an empty class counts as accuracy 0."""
    err = [p == l for p, l in zip(preds, labels) if l != -1]
    cor = [p == -1 for p, l in zip(preds, labels) if l == -1]
    a_err = sum(err) / len(err) if err else 0.0
    a_cor = sum(cor) / len(cor) if cor else 0.0
    f1 = 2 * a_err * a_cor / (a_err + a_cor) if a_err + a_cor > 0 else 0.0
    return a_err, a_cor, f1


def fit_threshold(all_step_sums, labels, rule="first"):
    """The threshold (among 0 and the midpoints of the observed step rewards) with the best F1."""
    vals = sorted({round(s, 6) for sums in all_step_sums for s in sums})
    cands = [0.0] + [(a + b) / 2 for a, b in zip(vals, vals[1:])] + ([vals[0] - 1, vals[-1] + 1] if vals else [])
    if len(cands) > 400:   # quantiles are enough
        cands = [0.0] + [vals[int(q * (len(vals) - 1) / 399)] + 1e-9 for q in range(400)]
    score = lambda t: processbench_metric([predict_first_wrong(s, t, rule) for s in all_step_sums], labels)[2]
    return max(cands, key=lambda t: (score(t), -abs(t)))


def localisation(all_step_sums, labels, threshold="fit", rule="first"):
    """The ProcessBench metric of reward-based first-wrong-step prediction. threshold "fit": two-fold
    cross-fitting (the threshold that maximises F1 on one half scores the other half, and back), so that
    the reported number never sees its own labels; a float: that threshold for all. Returns dict."""
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
# The HTML report: every token coloured by its reward (the paper's Figures 2-3), step sums in the margin
# ----------------------------------------------------------------------------------------------
_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto}
table.sol{border-collapse:collapse;margin:0.5em 0 2em 0;width:100%}
td{vertical-align:top;padding:2px 6px;border-bottom:1px solid #eee}
td.tok{font-family:monospace;white-space:pre-wrap;word-break:break-word}
td.sum{font-family:monospace;text-align:right;width:7em}
tr.wrong td{outline:2px solid #c00}
span{border-radius:2px}
.q{background:#f4f4f4;padding:0.5em;white-space:pre-wrap}"""


def _colour(r, scale):
    a = min(abs(r) / scale, 1.0) if scale > 0 else 0.0
    return f"rgba(220,0,0,{a:.2f})" if r < 0 else f"rgba(0,160,0,{a:.2f})"


def html_report(items, path, title="Credit assignment"):
    """items: dicts {title, question, steps, offsets, rewards, [label], [pred]}; writes one HTML page.
    Red tokens got negative reward, green positive (opacity |r| / the page's 98th percentile of |r|); the margin
    shows the per-step sums; a framed row is the true first wrong step, '<' marks the predicted one."""
    mags = sorted(abs(r) for it in items for r in it["rewards"])
    scale = (mags[int(0.98 * (len(mags) - 1))] if mags else 1.0) or 1.0   # 98th percentile: one outlier does not wash out the page
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{_CSS}</style>",
             f"<h1>{html.escape(title)}</h1><p>token colour: beta*(log pi - log pi_ref), red &lt; 0 &lt; green, "
             f"full colour at |r| = {scale:.3g}. Right column: the step's sum. Framed: true first wrong step; "
             f"&lt;: predicted.</p>"]
    for it in items:
        parts.append(f"<h3>{html.escape(str(it.get('title', '')))}</h3><div class=q>{html.escape(it['question'])}</div>")
        parts.append("<table class=sol>")
        bounds = step_bounds(it["steps"])
        sums = step_rewards(it["offsets"], it["rewards"], it["steps"])
        toks = list(zip(it["offsets"], it["rewards"]))
        k = 0
        for j, (lo, hi) in enumerate(bounds):
            spans = []
            text = "".join(it["steps"])
            while k < len(toks) and (toks[k][0][0] < hi or j == len(bounds) - 1):
                (s, e), r = toks[k]
                spans.append(f'<span style="background:{_colour(r, scale)}" title="{r:+.4f}">{html.escape(text[s:e])}</span>')
                k += 1
            cls = ' class="wrong"' if it.get("label") == j else ""
            mark = " &lt;" if it.get("pred") == j else ""
            parts.append(f"<tr{cls}><td class=tok>{''.join(spans)}</td><td class=sum>{sums[j]:+.3f}{mark}</td></tr>")
        parts.append("</table>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path


def credit_assignment(policy, ref, tok, examples, beta, threshold="fit", rule="first", html_path=None,
                      n_html=8, batch_size=16, title="Credit assignment", rank=0, world=1, progress=False):
    """examples: dicts {question, steps (list, "".join = the solution), label}. Per-step rewards (each
    rank scores examples[rank::world]; gathered on every rank), the localisation metric and, on rank 0,
    the HTML page of the first n_html erroneous examples."""
    mine = list(range(rank, len(examples), world))
    tr = token_rewards(policy, ref, tok, [tok.render_prompt(examples[i]["question"]) for i in mine],
                       ["".join(examples[i]["steps"]) for i in mine], beta, batch_size, progress and rank == 0)
    if world > 1:
        tr = [t for _, t in sorted(gather_rows(list(zip(mine, tr))), key=lambda x: x[0])]
    sums = [step_rewards(t["offsets"], t["rewards"], e["steps"]) for t, e in zip(tr, examples)]
    labels = [e["label"] for e in examples]
    res = localisation(sums, labels, threshold, rule)
    if html_path and rank == 0:
        shown = [i for i, l in enumerate(labels) if l != -1][:n_html]
        items = [dict(title=f"{examples[i].get('id', f'example {i}')}: first wrong step {labels[i]}, "
                      f"predicted {res['preds'][i]}", question=examples[i]["question"],
                      steps=examples[i]["steps"], offsets=tr[i]["offsets"], rewards=tr[i]["rewards"],
                      label=labels[i], pred=res["preds"][i]) for i in shown]
        html_report(items, html_path, title)
    res["step_rewards"] = sums
    return res


def load_processbench(subset, limit=None, root=None):
    """ProcessBench examples {question, steps, label}. Steps are joined with a blank line."""
    path = os.path.join(data.data_root(root), "processbench", f"{subset}.json")
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)[:limit] if limit else json.load(f)
    for i, r in enumerate(rows):
        missing = [k for k in ("id", "problem", "label", "steps") if k not in r]
        if missing:
            raise ValueError(f"{path}: record {i} (id {r.get('id')}) has no field {missing[0]!r}; "
                             f"ProcessBench records have id, problem, label and steps")
    return [{"id": r["id"], "question": r["problem"], "label": int(r["label"]),
             "steps": [s.strip() + ("\n\n" if i + 1 < len(r["steps"]) else "") for i, s in enumerate(r["steps"])]}
            for r in rows]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to evaluate
    p.add_argument("--model", required=True, help="checkpoint folder (hub format: config, safetensors, tokenizer)")
    p.add_argument("--data", default=None, help="gsm8k | math | math500 | svamp | asdiv | mawps | a .jsonl file")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--out", default=None, help="predictions JSONL (default: none)")
    # decoding
    p.add_argument("--max-new-tokens", type=int, default=512, help="per completion")
    p.add_argument("--batch-size", type=int, default=64, help="questions per generation batch (per rank)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    # credit assignment
    p.add_argument("--ref", default=None, help="reference model (the SFT model) for implicit rewards")
    p.add_argument("--beta", type=float, default=0.1, help="beta of r = beta (log pi - log pi_ref)")
    p.add_argument("--processbench", default=None, help="gsm8k | math | olympiadbench | omnimath: localisation")
    p.add_argument("--threshold", default="fit", help="step reward below which a step counts as wrong; "
                   "'fit': chosen by two-fold cross-fitting on the labels")
    p.add_argument("--rule", default="first", choices=["first", "min"], help="first step below threshold | lowest")
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
    tok = modeling.Tokenizer.from_pretrained(args.model)
    policy = modeling.Transformer.from_pretrained(args.model, dtype=dtype, device=device).eval()
    t0 = time.time()
    if args.data is not None:
        records = data.load_records(args.data, args.limit)
        rows = evaluate(policy, tok, records, args.max_new_tokens, args.batch_size, rank, world)
        if rank == 0:
            if args.out:
                data.write_jsonl(args.out, rows)
            print(format_report(accuracy_report(rows)))
            c, n = accuracy_report(rows)["all"]
            print(f"accuracy {100 * c / max(n, 1):.2f}% ({c}/{n}) on {args.data} | {time.time() - t0:.0f}s")
            missing = sum(r["pred"] is None for r in rows)   # counted wrong; 'pred' in --out shows every answer read
            print(f"no extractable answer: {missing}/{n} predictions")
    else:
        ref = modeling.Transformer.from_pretrained(args.ref, dtype=dtype, device=device).eval()
        ex = load_processbench(args.processbench, args.limit)
        res = credit_assignment(policy, ref, tok, ex, args.beta, args.threshold, args.rule, html_path=args.html,
                                title=f"ProcessBench {args.processbench}", rank=rank, world=world, progress=True)
        if rank == 0:
            print(f"ProcessBench {args.processbench}: n={len(ex)} ({res['n_err']} erroneous, {res['n_cor']} "
                  f"correct) | acc_err {100 * res['acc_err']:.1f} | acc_cor {100 * res['acc_cor']:.1f} | F1 "
                  f"{100 * res['f1']:.1f} | threshold {', '.join(f'{t:+.4f}' for t in res['thresholds'])} "
                  f"({args.rule}) | {time.time() - t0:.0f}s")
            if args.out:
                data.write_jsonl(args.out, [{"id": e["id"], "label": e["label"], "pred": pr, "step_rewards": s}
                                            for e, pr, s in zip(ex, res["preds"], res["step_rewards"])])
            if args.html:
                print(f"wrote {args.html}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    modeling.run_main(main)
