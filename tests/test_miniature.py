# Run with: python -m pytest -q tests/test_miniature.py
"""The miniature task's exact checker and tokenizer by hand, and the miniature itself (`python mini.py`)
shortened to a few steps per stage: the same code path (train() for SFT and DPO, sample.make_pairs,
eval.evaluate, eval.credit_assignment), with its table checked against the files it wrote."""
import os
import random
import subprocess
import sys

import pytest

import data
import mini
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = "Eva has 7 bags of 6 pens. Eva gets 3, uses 8, uses 5. How many now?"
RIGHT = "6*7=42\n42+3=45\n45-8=37\n37-5=32\nThe answer is 32"


def test_first_wrong_step_by_hand():
    assert mini.first_wrong_step(Q, RIGHT) == -1
    assert mini.first_wrong_step(Q, "7*6=42\n3+42=45\n45-8=37\n37-5=32\nThe answer is 32") == -1   # other wording
    assert mini.first_wrong_step(Q, "6*7=42\n42+3=45\n45-8=47\n47-5=42\nThe answer is 42") == 2     # forgot the borrow
    assert mini.first_wrong_step(Q, "6*7=48\n48+3=51\n51-8=43\n43-5=38\nThe answer is 38") == 0     # wrong product
    assert mini.first_wrong_step(Q, "6*7=42\n42-3=39\n39-8=31\n31-5=26\nThe answer is 26") == 1     # wrong operation
    assert mini.first_wrong_step(Q, "6*7=42\n42+3=45\n8-45=37\n37-5=32\nThe answer is 32") == 2     # operands swapped in -
    assert mini.first_wrong_step(Q, "6*7=42\n42+3=45\n45-8=37\nThe answer is 37") == 3              # a step left out
    assert mini.first_wrong_step(Q, "6*7=42\n42+3=45\n45-8=37\n37-5=32\nThe answer is 31") == 4     # wrong final line
    assert mini.first_wrong_step(Q, RIGHT + "\n1+1=2") == 5                                          # trailing step
    assert mini.first_wrong_step(Q, "6*7=42\n42+3=45") == 2                                          # stops early
    assert data.extract_answer(RIGHT) == "32" and mini.nodes(Q)[-1][3] == 32


def test_cut_rejected_ends_after_the_first_wrong_step():
    pair = {"question": Q, "prefix": "7*6=42\n", "rejected": "42+3=45\n45-8=47\n47-5=42\nThe answer is 42"}
    assert mini.cut_rejected(pair)["rejected"] == "42+3=45\n45-8=47\n"
    late = dict(pair, prefix=RIGHT[:RIGHT.index("The")], rejected="The answer is 31")
    assert mini.cut_rejected(late) == late                     # the error is the last step: nothing to cut


def test_generated_solutions_and_the_habit():
    rng = random.Random(0)
    for _ in range(300):
        p = mini.problem(rng)
        right = mini.solution(p["question"], rng)
        assert mini.first_wrong_step(p["question"], right) == -1 and data.extract_answer(right) == p["gold"]
        nodes = mini.nodes(p["question"])
        habit = mini.solution(p["question"], rng, habit=1.0)
        borrows = [i for i, (op, x, y, _) in enumerate(nodes) if op == "-" and mini.needs_borrow(x, y)]
        assert mini.error_kind(p["question"], habit) == ((borrows[0], "habit") if borrows else (-1, "none"))
        over = mini.solution(p["question"], rng, overborrow=1.0)
        plain = [i for i, (op, x, y, _) in enumerate(nodes) if op == "-" and x >= 10 and not mini.needs_borrow(x, y)]
        assert mini.error_kind(p["question"], over) == ((plain[0], "overborrow") if plain else (-1, "none"))
        assert len(data.split_steps(right, "cot", mini.DELIM)) == len(mini.nodes(p["question"])) + 1


def test_mini_tokenizer_loads_with_model_tokenizer(tmp_path):
    tok = M.Tokenizer.from_pretrained(mini.write_tokenizer(str(tmp_path)))
    prompt = tok.render_prompt(Q)
    assert prompt == "<s>" + Q + "\n" and tok.render(Q, RIGHT) == prompt + RIGHT + "</s>"
    ids, n = tok.encode_prompt_response(prompt, RIGHT)
    assert tok.decode(ids[n:]) == RIGHT and tok.decode(ids[:n]) == Q + "\n"
    pieces = [tok.decode([i]) for i in ids[1:]]
    assert pieces[:7] == ["Eva", " has", " ", "7", " bags", " of", " "]          # a word a token ...
    assert pieces[10:12] == [" Eva", " gets"] and pieces[-4:] == [" is", " ", "3", "2"]
    assert pieces[n - 1:n + 6] == ["6", "*", "7", "=", "4", "2", "\n"]          # ... a digit a token
    assert tok.stop_ids == [tok.eos_id]


# A few steps per stage; the task is shortened to one operation after the product so that a short SFT
# already solves some problems (pairs need a right and a wrong sample).
QUICK = ["--n-ops", "1", "--n-sft", "6000", "--sft-steps", "300", "--sft-batch", "32", "--dim", "64", "--layers", "2",
         "--n-pairs", "96", "--n-eval", "64", "--n-credit", "48", "--epochs", "1", "--batch", "8", "--k-max", "8",
         "--tries", "2"]


def check_run(out, printed, seed=0):
    assert "Table 1 in miniature" in printed
    folder = os.path.join(out, f"seed{seed}")
    pairs = data.read_pairs(os.path.join(folder, "pairs.jsonl"))
    n_naive, n_sc = sum(p["kind"] == "naive" for p in pairs), sum(p["kind"] == "sc" for p in pairs)
    assert n_naive > 0 and n_sc > 0
    table = {}
    for line in printed.splitlines():
        for name in ("SFT", "DPO (data-equal)", "DPO", "SCDPO"):
            if line.startswith(name + " ") and name not in table:
                table[name] = line[len(name):].split()
                break
    assert table["SCDPO"][:3] == [str(n_naive), "+", str(n_sc)] and table["DPO"][:3] == [str(n_naive), "+", "0"]
    assert table["DPO (data-equal)"][:3] == [str(n_naive + n_sc), "+", "0"]
    for name, tag in (("SFT", "sft"), ("DPO", "dpo"), ("DPO (data-equal)", "dpo-eq"), ("SCDPO", "scdpo")):
        rows = data.read_jsonl(os.path.join(folder, f"preds-{tag}.jsonl"))
        assert len(rows) == 64
        right = sum(data.is_equiv(data.extract_answer(r["completion"]), r["gold"]) for r in rows)
        acc = float(table[name][1 if name == "SFT" else 3]) / 100
        assert abs(acc - right / len(rows)) < 0.0006, (name, acc, right)
        # a solution whose every step is right has the right answer
        assert all(r["correct"] for r in rows if mini.first_wrong_step(r["question"], r["completion"]) == -1)
    for tag in ("dpo", "dpo-eq", "scdpo"):
        page = open(os.path.join(folder, f"credit-{tag}.html")).read()
        assert "rgba(" in page and "<table class=sol>" in page


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mini"))


def test_miniature_shortened(out, capsys):
    mini.main(["--out", out] + QUICK)
    check_run(out, capsys.readouterr().out)


def test_miniature_under_torchrun(out):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "mini.py",
                        "--out", out, "--seed", "1"] + QUICK, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Table 1 in miniature") == 1   # rank 0 prints
    check_run(out, r.stdout, seed=1)


def test_seeds_and_learning_rate_grid(out, capsys):
    """--seeds 2 reads back the two seeds above; --lrs adds a second learning rate on the same SFT models and
    pairs. The printed means, spreads and best-lr differences are recomputed from the result files."""
    import json
    import statistics
    with pytest.raises(ValueError, match="other settings: --dim 64 \\(now 96\\)"):   # --reuse refuses other stages
        mini.main(["--out", out, "--reuse"] + QUICK + ["--dim", "96"])
    capsys.readouterr()
    mini.main(["--out", out, "--seeds", "2", "--reuse", "--lrs", "2e-5,1e-4"] + QUICK)
    printed = capsys.readouterr().out
    assert printed.count("read back from") == 2 and printed.count("Table 1 in miniature") == 2
    acc = {lr: [json.load(open(os.path.join(out, f"seed{s}", f"result-lr{lr}-nll1-b0.1-ep1-bs8.json")))[0]
                for s in (0, 1)] for lr in ("2e-05", "0.0001")}
    first = printed.split("Table 1 in miniature")[1]
    sc = [r["SCDPO"]["acc"] for r in acc["2e-05"]]
    line = next(l for l in first.splitlines() if l.startswith("SCDPO "))
    assert f"{100 * statistics.mean(sc):5.1f} ± {100 * statistics.stdev(sc):3.1f}" in line
    mean = {lr: {n: 100 * statistics.mean(r[n]["acc"] for r in rs) for n in ("DPO", "SCDPO")} for lr, rs in acc.items()}
    best = {n: max(mean, key=lambda lr: mean[lr][n]) for n in ("DPO", "SCDPO")}
    d = [100 * (a["SCDPO"]["acc"] - b["DPO"]["acc"]) for a, b in zip(acc[best["SCDPO"]], acc[best["DPO"]])]
    assert "SCDPO - DPO per seed: " + ", ".join(f"{x:+.1f}" for x in d) in printed.split("Learning-rate grid")[1]
