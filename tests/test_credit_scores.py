# python -m pytest -q tests/test_credit_scores.py
# Threshold-free credit scores, intervals and the comparison page of eval.py, against brute force, closed
# forms and hand-worked cases.
import math
import os
import re

import numpy as np
import pytest

from conftest import tiny_checkpoint

import eval as E


# ----------------------------------------------------------------------------------------------
# auc
# ----------------------------------------------------------------------------------------------


def brute_auc(low, high):
    """P(x < y) + P(x = y) / 2 by a double loop over every pair."""
    s = sum((x < y) + 0.5 * (x == y) for x in low for y in high)
    return s / (len(low) * len(high))


def test_auc_matches_a_double_loop_on_tied_integers():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n, m = rng.integers(1, 40, size=2)
        low = rng.integers(0, 6, size=n).tolist()              # few values: many ties, within and across
        high = (rng.integers(0, 6, size=m) + trial % 3).tolist()
        assert E.auc(low, high) == pytest.approx(brute_auc(low, high), abs=1e-12)
    low, high = rng.normal(size=50).tolist(), rng.normal(0.5, 1, size=70).tolist()
    assert E.auc(low, high) == pytest.approx(brute_auc(low, high), abs=1e-12)


def test_auc_hand_made_cases():
    assert E.auc([1, 2, 3], [4, 5]) == 1.0          # every low below every high
    assert E.auc([4, 5], [1, 2, 3]) == 0.0          # reversed
    assert E.auc([2, 2, 2], [2, 2]) == 0.5          # all tied
    assert E.auc([1, 3], [2]) == 0.5                # one pair below, one above
    assert math.isnan(E.auc([], [1.0])) and math.isnan(E.auc([1.0], []))


# ----------------------------------------------------------------------------------------------
# step_scores
# ----------------------------------------------------------------------------------------------


def test_step_scores_hand_worked():
    sums = [[1.0, 0.5, -1.0, 2.0],    # A: label 2; wrong -1.0 < min(1.0, 0.5): a top-1 hit
            [0.2, 0.8, 0.3],          # B: label 1; wrong 0.8 is not < 0.2: a miss
            [-0.5, 3.0],              # C: label 0; in auc (wrong -0.5, no right step), not in top-1
            [0.0, 0.8, -0.2],         # D: error-free; all three steps are right
            [5.0, -5.0]]              # E: label 2 = len(steps): a missing step, skipped
    labels = [2, 1, 0, -1, 2]
    kinds = [["add", "product", "sub", "add"], ["product", "add", "add"], ["add", "add"],
             ["product", "add", "sub"], ["add", "add"]]
    got = E.step_scores(sums, labels, kinds)
    # top-1 over A and B: 1 hit of 2; chance = (1/(2+1) + 1/(1+1)) / 2 = (1/3 + 1/2) / 2 = 5/12
    assert got["top1"] == 0.5 and got["top1_n"] == 2 and got["top1_chance"] == pytest.approx(5 / 12)
    # wrong = [-1.0 (A), 0.8 (B), -0.5 (C)]; right = A: 1.0, 0.5; B: 0.2; D: 0.0, 0.8, -0.2 (A's 2.0 and
    # C's 3.0 come after an error, E is skipped). Pairs with wrong < right (tie 1/2), 3 x 6 = 18 in all:
    #   -1.0: all 6;  0.8: 1.0 above, 0.8 tied -> 1.5;  -0.5: all 6.  auc = 13.5 / 18 = 0.75
    assert got["auc"] == pytest.approx(0.75)
    assert got["n_wrong"] == 3 and got["n_skipped"] == 1
    # right steps by kind: add {1.0 (A), 0.8 (D)}, product {0.5 (A), 0.2 (B), 0.0 (D)}, sub {-0.2 (D)}
    assert got["n_right"] == {"add": 2, "product": 3, "sub": 1}
    # false alarm = P(right of that kind < wrong) + ties / 2:
    #   add:     only 0.8 vs wrong 0.8, a tie -> 0.5 / (3 * 2) = 1/12
    #   product: 0.5, 0.2, 0.0 all below wrong 0.8, none below -1.0 or -0.5 -> 3 / (3 * 3) = 1/3
    #   sub:     -0.2 below 0.8 only -> 1 / 3
    fa = got["false_alarm"]
    assert fa["add"] == pytest.approx(1 / 12) and fa["product"] == pytest.approx(1 / 3)
    assert fa["sub"] == pytest.approx(1 / 3)
    # the kinds partition the right steps: the pair counts add up to 1 - auc = 4.5 / 18
    assert (0.5 + 3 + 1) / 18 == pytest.approx(1 - got["auc"])
    plain = E.step_scores(sums, labels)
    assert "false_alarm" not in plain and plain["auc"] == got["auc"] and plain["top1"] == got["top1"]


def test_step_scores_without_errors_or_without_right_steps():
    none_wrong = E.step_scores([[0.1, 0.2]], [-1])
    assert math.isnan(none_wrong["auc"]) and math.isnan(none_wrong["top1"]) and none_wrong["top1_n"] == 0
    only_first = E.step_scores([[-1.0, 2.0]], [0])     # a wrong step, but nothing right before it
    assert math.isnan(only_first["auc"]) and only_first["n_wrong"] == 1


# ----------------------------------------------------------------------------------------------
# bootstrap and seed_interval
# ----------------------------------------------------------------------------------------------


def test_bootstrap_of_a_paired_difference_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    n = 4000
    a = rng.random(n) < 0.6                          # method A right on 60% of items
    b = np.where(rng.random(n) < 0.1, ~a, a)          # method B: A's verdict flipped on 10% of them
    d = a.astype(float) - b.astype(float)
    stat = lambda ix: a[ix].mean() - b[ix].mean()    # paired: both methods on the same resampled items
    point, lo, hi = E.bootstrap(stat, n, B=1000, seed=3)
    assert point == pytest.approx(d.mean(), abs=1e-12)
    assert lo < d.mean() < hi
    normal_half = 1.96 * d.std(ddof=1) / math.sqrt(n)
    assert abs((hi - lo) / 2 - normal_half) < 0.1 * normal_half
    assert E.bootstrap(stat, n, B=1000, seed=3) == (point, lo, hi)
    assert E.bootstrap(stat, n, B=1000, seed=4) != (point, lo, hi)


def test_seed_interval_against_the_t_closed_form():
    mean, lo, hi = E.seed_interval([1, 2, 3])         # sd 1, t_{0.975, 2} = 4.303
    assert mean == pytest.approx(2) and lo == pytest.approx(2 - 4.303 / math.sqrt(3), abs=1e-3)
    assert hi == pytest.approx(2 + 4.303 / math.sqrt(3), abs=1e-3)
    v, lo1, hi1 = E.seed_interval([0.7])
    assert v == 0.7 and math.isnan(lo1) and math.isnan(hi1)
    many = np.arange(40.0)                            # df 39 > 30: the normal 1.96
    m, lo40, _ = E.seed_interval(many)
    assert m - lo40 == pytest.approx(1.96 * many.std(ddof=1) / math.sqrt(40))
    with pytest.raises(ValueError):
        E.seed_interval([1, 2, 3], level=0.9)


# ----------------------------------------------------------------------------------------------
# html_compare
# ----------------------------------------------------------------------------------------------


def char_tokens(steps, reward):
    """One token per 2 characters of "".join(steps), each with reward(token index)."""
    text = "".join(steps)
    offs = [(s, min(s + 2, len(text))) for s in range(0, len(text), 2)]
    return {"offsets": offs, "rewards": [reward(i) for i in range(len(offs))]}


def test_html_compare_page(tmp_path):
    examples = [{"question": "What is 2+3*4?", "steps": ["3*4 = 12. ", "2+12 =15. ", "The answer is 15."],
                 "label": 1, "title": "first", "kinds": ["product", "add", "answer"]},
                {"question": "What is 1+1?", "steps": ["1+1 = 2. ", "The answer is 2."], "label": -1}]
    # DPO: small rewards (|r| = 0.1); SCDPO: |r| = 1.0. One page scale (the 98th percentile, 1.0) makes
    # DPO's tokens pale (opacity 0.10); a scale per column would make both full colour.
    dpo = [char_tokens(e["steps"], lambda i: 0.1 if i % 2 else -0.1) for e in examples]
    scdpo = [char_tokens(e["steps"], lambda i: -1.0 if i % 3 else 1.0) for e in examples]
    path = str(tmp_path / "page.html")
    summary = (["method", "AUC"], [["DPO", "0.61"], ["SCDPO", "0.83"]])
    assert E.html_compare(examples, [("DPO", dpo), ("SCDPO", scdpo)], path, summary=summary) == path
    assert os.listdir(tmp_path) == ["page.html"]                       # no .tmp left behind
    page = open(path, encoding="utf-8").read()
    marks = ("<table class=summary>", "2+3*4?", "<table class=sol>")   # summary, question, its steps
    top, question, solution = (page.index(m) for m in marks)
    assert top < question < solution
    assert page.index("SCDPO</td><td>0.83") < page.index("<h3>")
    assert "<th>DPO</th>" in page and "<th>SCDPO</th>" in page and "<th class=kind>kind</th>" in page
    first, second = page.split("<table class=sol>")[1:]
    rows = re.findall(r"<tr( class=\"wrong\")?>(.*?)</tr>", first, re.S)[1:]    # [0]: the header row
    assert [bool(w) for w, _ in rows] == [False, True, False]                   # framed: step 1
    for (_, row), step in zip(rows, examples[0]["steps"]):
        texts = re.findall(r"<span[^>]*>(.*?)</span>", row)
        assert "".join(texts) == step * 2                                       # DPO's tokens, then SCDPO's
    assert 'class="wrong"' not in second                                        # error-free: nothing framed
    assert "rgba(0,160,0,0.10)" in page and "rgba(220,0,0,0.10)" in page and "rgba(220,0,0,1.00)" in page
    assert "rgba(0,160,0,1.00)" in page and "rgba(0,160,0,0.20)" not in page
    # the sums column: DPO's step 0 has 5 tokens "3*", "4 ", "= ", "12", ". " -> -0.1 + 0.1 - 0.1 + 0.1 - 0.1
    assert "<td class=sum>-0.100</td>" in first
    E.html_compare(examples, [("DPO", dpo)], path, n=1)                          # n: only the first example
    page = open(path, encoding="utf-8").read()
    assert page.count("<table class=sol>") == 1 and "What is 1+1?" not in page


# ----------------------------------------------------------------------------------------------
# credit_assignment carries the scores and the token rewards (tiny random models, byte tokenizer)
# ----------------------------------------------------------------------------------------------


def test_credit_assignment_returns_scores_tokens_and_page(tmp_path):
    policy, tok = tiny_checkpoint(tmp_path / "a", seed=0)
    ref, _ = tiny_checkpoint(tmp_path / "b", seed=1)
    examples = [{"question": "1+1?", "steps": ["1+1=2. ", "So 2."], "label": -1, "kinds": ["add", "answer"]},
                {"question": "2*3?", "steps": ["2*3=5. ", "So 5."], "label": 0,
                 "kinds": ["product", "answer"]},
                {"question": "4+4?", "steps": ["4+4=8. ", "8*2=17. ", "So 17."], "label": 1,
                 "kinds": ["add", "product", "answer"]}]
    html_path = str(tmp_path / "credit.html")
    res = E.credit_assignment(policy.eval(), ref.eval(), tok, examples, 0.5, html_path=html_path)
    labels = [e["label"] for e in examples]
    for ex, t, sums in zip(examples, res["tokens"], res["step_rewards"]):   # tokens in examples' order
        prompt, response = tok.render_prompt(ex["question"]), "".join(ex["steps"])
        alone = E.token_rewards(policy, ref, tok, [prompt], [response], 0.5)[0]
        assert t["offsets"] == alone["offsets"] and np.allclose(t["rewards"], alone["rewards"], atol=1e-5)
        assert np.allclose(E.step_rewards(t["offsets"], t["rewards"], ex["steps"]), sums)
    want = E.step_scores(res["step_rewards"], labels, [e["kinds"] for e in examples])
    assert res["scores"].keys() == want.keys() and res["scores"]["auc"] == want["auc"]
    assert res["scores"]["n_right"] == {"add": 2, "answer": 1}   # example 0's two steps and example 2's first
    page = open(html_path, encoding="utf-8").read()
    assert page.index("<table class=summary>") < page.index("2*3?") < page.index("4+4?") < page.index("1+1?")
    assert page.count("<th>implicit reward</th>") == 3 and not os.path.exists(html_path + ".tmp")
