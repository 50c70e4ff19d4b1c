# Run with: python -m pytest -q tests/test_miniature.py
"""The miniature task's exact checker, routes and tokenizer by hand, its dev/test split and selection,
and the miniature itself (`python mini.py`) shortened to a few steps per stage: the same code path
(train() for SFT and DPO, sample.make_pairs, eval.evaluate, eval.credit_assignment), with its table
checked against the files it wrote: distinct data-equal pairs, equal optimizer steps, intervals."""
import os
import random
import subprocess
import sys

import pytest

import data
import grade
import eval as eval_
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
    assert grade.extract_answer(RIGHT) == "32" and mini.nodes(Q)[-1][3] == 32
    # another route: the additions and subtractions in another order that stays in 1..99
    assert mini.first_wrong_step(Q, "6*7=42\n42-8=34\n34-5=29\n3+29=32\nThe answer is 32") == -1
    assert mini.error_kind(Q, "6*7=42\n42-8=44\n44-5=39\n39+3=42\nThe answer is 42") == (1, "habit")
    assert mini.first_wrong_step(Q, "6*7=42\n42-8=34\n34-8=26\n26+3=29\nThe answer is 29") == 2  # -8 twice
    assert mini.check(Q, RIGHT)[2] == ["product", "add", "sub-borrow", "sub-plain", "answer"]


def test_reordered_routes_are_right_and_differ_in_borrows():
    """reorder=1: every demonstration is right by the checker; the routes vary, and for some questions
    they differ in how many subtractions need a borrow (the knob's whole point)."""
    rng, seen, differ = random.Random(1), set(), 0
    for _ in range(200):
        p = mini.problem(rng)
        sol = mini.solution(p["question"], rng, reorder=1.0)
        assert mini.first_wrong_step(p["question"], sol) == -1 and grade.extract_answer(sol) == p["gold"]
        seen.add(tuple(mini.op_of(x)[0] for x in data.split_steps(sol, "cot", mini.DELIM)))
        borrows = set()
        for route in mini.routes(p["question"]):
            v, n = mini.nodes(p["question"])[0][3], 0
            for op, y in route:
                n += op == "-" and mini.needs_borrow(v, y)
                v = v + y if op == "+" else v - y
            borrows.add(n)
        differ += len(borrows) > 1
    assert len(seen) > 3 and differ > 40
    assert mini.routes(Q)[0] != mini.routes(Q)[1] and (("+", 3), ("-", 8), ("-", 5)) in mini.routes(Q)


def test_fewest_borrows_by_hand():
    """Q's routes need 1 borrow (the question's order: 45-8) or 2 (42-8 then 34-5); the route is read off
    the lines as written, a wrong value does not change it, a solution that stops early has none."""
    assert mini.borrows(Q, [("-", 8), ("-", 5), ("+", 3)]) == 2
    assert mini.borrows(Q, [("+", 3), ("-", 8), ("-", 5)]) == 1
    assert mini.fewest_borrows(Q, RIGHT) == 1
    assert mini.fewest_borrows(Q, "7*6=42\n42-8=34\n34-5=29\n3+29=32\nThe answer is 32") == 0
    assert mini.fewest_borrows(Q, "6*7=42\n3+42=45\n45-8=47\n47-5=42\nThe answer is 42") == 1   # habit
    assert mini.fewest_borrows(Q, "6*7=42\n42+3=45\n45-5=40\n40-8=32\nThe answer is 32") == 1   # 40-8 only
    assert mini.fewest_borrows(Q, "6*7=42\n42+3=45") == 0
    adds = "Ann has 2 bags of 3 nuts. Ann gets 3, gets 4, gets 5. How many now?"
    assert mini.fewest_borrows(adds, "2*3=6\n6+3=9\n9+4=13\n13+5=18\nThe answer is 18") == -1


def test_distinct_pairs_have_no_repeat_and_the_size_asked():
    ps = [{"question": f"q{i % 7}", "prefix": "", "chosen": "c", "rejected": f"r{i % 5}"} for i in range(60)]
    out = mini.distinct(ps, 20)
    keys = [(p["question"], p["chosen"], p["rejected"]) for p in out]
    assert len(out) == 20 and len(set(keys)) == 20 and out[0] is ps[0]
    assert len(mini.distinct(ps, 100)) == 35        # 7 x 5 distinct pairs exist


def test_dev_and_test_are_disjoint_and_selection_reads_only_dev():
    args = mini.get_parser().parse_args(QUICK)
    sft, pairs, dev, test, credit = mini.splits(args, 0)
    assert dev and not {r["question"] for r in dev} & {r["question"] for r in test}
    assert len(test) == 64 and len(credit) == 48 and len(dev) <= 32
    # a grid where dev and test disagree: the choice follows dev, whatever test says
    def run(dev_acc, test_acc):
        return ({m: {"dev_acc": dev_acc, "acc": test_acc} for m in mini.METHODS}, {}, {})
    grid = {1e-5: [run(0.5, 0.9), run(0.5, 0.9)], 2e-5: [run(0.6, 0.1), run(0.7, 0.1)]}
    assert mini.select_lr(grid) == {m: 2e-5 for m in mini.METHODS}




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
        assert mini.first_wrong_step(p["question"], right) == -1 and grade.extract_answer(right) == p["gold"]
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
QUICK = ["--n-ops", "1", "--n-sft", "6000", "--sft-steps", "300", "--sft-batch", "32", "--dim", "64",
         "--layers", "2", "--n-pairs", "96", "--n-eval", "64", "--n-dev", "32", "--n-credit", "48",
         "--steps", "6", "--batch", "8", "--k-max", "8", "--tries", "2", "--boot", "200"]


def table_rows(printed):
    table = {}
    for line in printed.splitlines():
        for name in ("SFT", "DPO (data-equal)", "DPO", "Hot naive", "SCDPO"):
            if line.startswith(name + " ") and name not in table:
                table[name] = line[len(name):].split()
                break
    return table


def check_run(out, printed, seed=0, steps=6):
    assert "Table 1 in miniature" in printed
    folder = os.path.join(out, f"seed{seed}")
    read = lambda tag: data.read_pairs(os.path.join(folder, f"pairs-{tag}.jsonl"))
    sets = {tag: read(tag) for tag in ("dpo", "dpo-eq", "hot", "scdpo")}
    n_naive, n_sc = len(sets["dpo"]), sum(p["kind"] == "sc" for p in sets["scdpo"])
    assert n_naive > 0 and n_sc > 0 and len(sets["scdpo"]) == n_naive + n_sc
    # data-equal: as many DISTINCT naive pairs as SCDPO has pairs
    eq = sets["dpo-eq"]
    assert len(eq) == n_naive + n_sc and all(p["kind"] == "naive" for p in eq)
    assert len({(p["question"], p["chosen"], p["rejected"]) for p in eq}) == len(eq)
    # hot naive: no shared prefix, at most one per step-controlled pair, each of a question that has one
    hot = sets["hot"][n_naive:]
    assert all(p["prefix"] == "" for p in hot) and 0 < len(hot) <= n_sc
    assert {p["question"] for p in hot} <= {p["question"] for p in sets["scdpo"] if p["kind"] == "sc"}
    # step-controlled pairs come only from questions with a naive pair (the paper's D_naive)
    assert {p["question"] for p in sets["scdpo"]} == {p["question"] for p in sets["dpo"]}
    table = table_rows(printed)
    for name, tag in (("SFT", "sft"), ("DPO", "dpo"), ("DPO (data-equal)", "dpo-eq"), ("Hot naive", "hot"),
                      ("SCDPO", "scdpo")):
        rows = data.read_jsonl(os.path.join(folder, f"preds-{tag}.jsonl"))
        assert len(rows) == 64
        right = sum(grade.is_equiv(grade.extract_answer(r["completion"]), r["gold"]) for r in rows)
        acc = float(table[name][2]) / 100
        assert abs(acc - right / len(rows)) < 0.0006, (name, acc, right)
        assert all(r["correct"] for r in rows if mini.first_wrong_step(r["question"], r["completion"]) == -1)
        if name != "SFT":   # equal training: every preference run took exactly --steps optimizer steps
            assert table[name][:2] == [str(len(sets[tag])), str(steps)]
            run = next(d for d in os.listdir(folder) if d.startswith(tag + "-lr"))
            logged = data.read_jsonl(os.path.join(folder, run, "log.jsonl"))
            assert [r["step"] for r in logged] == list(range(1, steps + 1))
    page = open(os.path.join(folder, "credit.html")).read()
    assert page.index("<table class=summary>") < page.index("<table class=sol>") and "rgba(" in page
    assert all(f"<th>{m}</th>" in page for m in mini.METHODS)
    assert "SCDPO minus each control" in printed and printed.count(" [") >= 9   # the intervals


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mini"))


def test_miniature_shortened(out, capsys):
    mini.main(["--out", out] + QUICK)
    check_run(out, capsys.readouterr().out)


def test_miniature_under_torchrun(out):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "mini.py", "--out", out, "--seed", "1"] + QUICK, cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Table 1 in miniature") == 1   # rank 0 prints
    check_run(out, r.stdout, seed=1)


def test_seeds_and_learning_rate_grid(out, capsys):
    """--seeds 2 reads back the two seeds above; --lrs adds a second learning rate on the same SFT models and
    pairs. The printed means, the lr chosen on dev and the seed-level interval are recomputed from the
    result files."""
    import json
    with pytest.raises(ValueError, match="other settings: --dim 64 \\(now 96\\)"):   # --reuse refuses other stages
        mini.main(["--out", out, "--reuse"] + QUICK + ["--dim", "96"])
    capsys.readouterr()
    mini.main(["--out", out, "--seeds", "2", "--reuse", "--lrs", "2e-5,1e-4"] + QUICK)
    printed = capsys.readouterr().out
    assert printed.count("read back from") == 2 and printed.count("Table 1 in miniature") == 2
    res = {lr: [json.load(open(os.path.join(out, f"seed{s}", f"result-lr{lr}-nll1-b0.1-st6-bs8.json")))
                for s in (0, 1)] for lr in ("2e-05", "0.0001")}
    first = printed.split("Table 1 in miniature")[1]
    sc = [r[0]["SCDPO"]["acc"] for r in res["2e-05"]]
    assert table_rows(first)["SCDPO"][2] == f"{100 * sum(sc) / 2:.1f}"
    d = [r[0]["SCDPO"]["acc"] - r[0]["DPO"]["acc"] for r in res["2e-05"]]
    m, lo, hi = eval_.seed_interval(d)
    assert "  - DPO " in first and f"accuracy {mini.fmt_ci((m, lo, hi))}" in first
    dev = {lr: {m: sum(r[0][m]["dev_acc"] for r in rs) / 2 for m in mini.METHODS} for lr, rs in res.items()}
    best = {m: max(dev, key=lambda lr: dev[lr][m]) for m in mini.METHODS}
    grid = printed.split("Learning-rate grid")[1]
    assert "chosen on dev: " + ", ".join(f"{m} {float(best[m]):g}" for m in mini.METHODS) in grid
