# Run with: python -m pytest -q tests/test_eval.py
"""eval.py end to end on tiny random checkpoints and real GSM8K / MATH / ProcessBench records; the
implicit reward against a float64 log-softmax; the localisation metric against hand-computed cases."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import DATA, byte_tokenizer, tiny_checkpoint

import data
import grade
import eval as E
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISTRAL_TOK = os.path.join(DATA, "tokenizers", "mistral-7b-v0.1")


def mistral_checkpoint(path, seed=0):
    """A 2-layer random Llama with the real Mistral tokenizer, in the hub's format."""
    tiny_checkpoint(path, seed=seed, tokenizer="mistral")
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return mistral_checkpoint(d / "a", 0), mistral_checkpoint(d / "b", 1)


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    """20 real test problems, 10 GSM8K + 10 MATH500, as one JSONL file."""
    rows = [{"question": r["question"], "answer": r["gold"]} for r in data.load_records("gsm8k:test")[:10]]
    rows += [{"problem": r["question"], "answer": r["gold"], "subject": r["subject"], "level": r["level"]}
             for r in data.load_records("math:test500")[:10]]
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    with open(path, "w") as f:
        for r in rows[:10]:
            f.write(json.dumps(r) + "\n")
    path2 = path.parent / "math10.jsonl"
    with open(path2, "w") as f:
        for r in rows[10:]:
            f.write(json.dumps(r) + "\n")
    return str(path), str(path2)


def recount(path):
    rows = data.read_jsonl(path)
    return sum(grade.is_equiv(grade.extract_answer(r["completion"]), r["gold"]) for r in rows), len(rows)


def printed_accuracy(out):
    line = [l for l in out.splitlines() if l.startswith("accuracy ")][-1]
    c, n = line.split("(")[1].split(")")[0].split("/")
    return int(c), int(n)


def test_eval_end_to_end_on_gsm8k_and_math(ckpts, problems, tmp_path, capsys):
    for name, src in (("gsm8k", problems[0]), ("math", problems[1])):
        out = tmp_path / f"{name}.jsonl"
        E.main(["--model", ckpts[0], "--data", src, "--max-new-tokens", "24", "--batch-size", "8", "--out", str(out)])
        printed = printed_accuracy(capsys.readouterr().out)
        assert printed == recount(out) and printed[1] == 10
        rows = data.read_jsonl(out)
        assert all(r["completion"] is not None and "correct" in r for r in rows)
    assert all("subject" in r and "level" in r for r in data.read_jsonl(tmp_path / "math.jsonl"))


def test_static_flag_reaches_the_sampler(ckpts, problems, tmp_path, monkeypatch):
    """eval.py --static decodes with Sampling(static=True) (its decoding: tests/test_sample.py -k static)."""
    seen, generate = [], E.sample.generate
    monkeypatch.setattr(E.sample, "generate", lambda m, p, cfg, **kw: seen.append(cfg.static) or generate(m, p, cfg, **kw))
    for extra in ([], ["--static"]):
        E.main(["--model", ckpts[0], "--data", problems[0], "--limit", "2", "--max-new-tokens", "4", *extra])
    assert seen == [False, True]


def test_named_sets_and_breakdown(ckpts, tmp_path, capsys):
    E.main(["--model", ckpts[0], "--data", "math500", "--limit", "6", "--max-new-tokens", "8", "--out", str(tmp_path / "p.jsonl")])
    out = capsys.readouterr().out
    assert "subject/" in out and "level/" in out and printed_accuracy(out) == recount(tmp_path / "p.jsonl")


def test_printed_accuracy_equals_recount_when_some_are_right(ckpts, problems, tmp_path, capsys, monkeypatch):
    """A random model scores 0; here every other question gets its gold worked answer, so the count is not trivial."""
    def fake(model, tok, questions, max_new_tokens, batch_size, static=False, progress=False, fmt="cot"):
        recs = {r["question"]: r for r in data.load_records(problems[1])}
        return [f"So the answer is $\\boxed{{{recs[q]['gold']}}}$." if i % 2 == 0 else "I think it is 12345." for i, q in enumerate(questions)]
    monkeypatch.setattr(E, "generate_greedy", fake)
    out = tmp_path / "p.jsonl"
    E.main(["--model", ckpts[0], "--data", problems[1], "--out", str(out)])
    assert printed_accuracy(capsys.readouterr().out) == recount(out) == (5, 10)
    rep = E.accuracy_report(data.read_jsonl(out))
    assert rep["all"] == (5, 10) and sum(n for k, (c, n) in rep.items() if k.startswith("level/")) == 10


def test_eval_under_torchrun_matches_one_process(ckpts, problems, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    # Each record decoded alone, on one thread, with MKL's run-to-run reproducible kernels: the greedy
    # argmax of a random model meets near-ties, which the GEMMs' low bits decide, and those bits depend on
    # the batch's shape and, in MKL, on the memory's alignment. So the rows must come out the same here.
    common = ["--model", ckpts[0], "--data", problems[0], "--max-new-tokens", "16", "--batch-size", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_CBWR="AUTO,STRICT")
    subprocess.run([sys.executable, "eval.py", *common, "--out", str(one)], cwd=ROOT, check=True, env=env, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval.py",
                        *common, "--out", str(two)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = data.read_jsonl(one), data.read_jsonl(two)
    assert [x["id"] for x in a] == [x["id"] for x in b] and [x["completion"] for x in a] == [x["completion"] for x in b]
    assert r.stdout.count("accuracy ") == 1   # rank 0 prints


def test_a_code_model_is_graded_on_what_its_code_prints(tmp_path):
    # a scripted model (test_sample.Scripted) that writes the output of its own code, wrongly (57)
    from test_sample import Scripted
    tok = byte_tokenizer(str(tmp_path / "tok"))
    S, C, OS, OE = data.CODE_START, data.CODE_END, data.OUTPUT_START, data.OUTPUT_END
    q = "What is 7 * 8?"
    script = f"Compute.\n{S}print(7 * 8)\n{C}{OS}57\n{OE}So it is 56."
    model = Scripted(tok.encode(tok.render_prompt(q) + script) + [tok.eos_id], tok.vocab_size)
    rec = {"id": "t/0", "source": "t", "question": q, "gold": "56"}
    code, = E.evaluate(model, tok, [rec], max_new_tokens=200, fmt="code")
    assert f"{OS}56\n{OE}" in code["completion"] and "57" not in code["completion"]   # the sandbox's output
    assert code["pred"] is None and not code["correct"]   # as data.judge: no boxed or stated answer, no fallback
    cot, = E.evaluate(model, tok, [rec], max_new_tokens=200)
    assert f"{OS}57\n{OE}" in cot["completion"] and cot["pred"] == "56" and cot["correct"]

# ----------------------------------------------------------------------------------------------
# Credit assignment
# ----------------------------------------------------------------------------------------------


def test_policy_equal_to_reference_gives_zero_reward(ckpts):
    tok = M.Tokenizer.from_pretrained(ckpts[0])
    pol = M.Transformer.from_pretrained(ckpts[0]).eval()
    ref = M.Transformer.from_pretrained(ckpts[0]).eval()   # a second copy: equal weights, not the same object
    ex = E.load_processbench("gsm8k", limit=3)
    prompts = [tok.render_prompt(e["question"]) for e in ex]
    for r in E.token_rewards(pol, ref, tok, prompts, ["".join(e["steps"]) for e in ex], beta=0.1):
        assert len(r["rewards"]) > 10 and all(x == 0.0 for x in r["rewards"])


def test_token_rewards_against_float64(ckpts):
    """r_i = beta (log pi - log pi_ref) per response token, against a float64 log-softmax of each model's logits."""
    tok = M.Tokenizer.from_pretrained(ckpts[0])
    pol, ref = (M.Transformer.from_pretrained(c).eval() for c in ckpts)
    q, sol = "What is 2 + 3?", "2 + 3 = 5.\n\nThe answer is 5."
    prompt = tok.render_prompt(q)
    (r,) = E.token_rewards(pol, ref, tok, [prompt], [sol], beta=0.5)
    ids, n = tok.encode_prompt_response(prompt, sol)
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = [torch.log_softmax(m(x)[0, :-1].double(), -1).gather(1, x[0, 1:, None])[:, 0] for m in (pol, ref)]
    want = 0.5 * (lp[0] - lp[1])[n - 1:]
    assert r["ids"] == ids[n:]
    torch.testing.assert_close(torch.tensor(r["rewards"], dtype=torch.float64), want, atol=1e-5, rtol=1e-4)
    assert "".join(sol[s:e] for s, e in r["offsets"]).replace(" ", "") == sol.replace(" ", "")


def test_step_rewards_assign_tokens_by_first_character():
    steps = ["ab\n", "cde\n", "f"]
    offsets = [(0, 1), (1, 3), (3, 4), (4, 6), (6, 7), (7, 8)]
    assert E.step_rewards(offsets, [1, 2, 3, 4, 5, 6], steps) == [3.0, 12.0, 6.0]


def test_predict_first_wrong_and_processbench_metric_by_hand():
    assert E.predict_first_wrong([0.2, -0.1, -0.5], 0.0, "first") == 1
    assert E.predict_first_wrong([0.2, -0.1, -0.5], 0.0, "min") == 2
    assert E.predict_first_wrong([0.2, 0.1], 0.0, "min") == -1
    assert E.predict_first_wrong([0.2, 0.1], 0.15, "first") == 1
    assert E.predict_first_wrong([], 0.0) == -1
    # 4 erroneous (2 exact), 2 correct (1 predicted -1): acc_err 1/2, acc_cor 1/2, F1 1/2
    preds, labels = [1, 2, 0, -1, -1, 3], [1, 2, 1, 0, -1, -1]
    a, b, f = E.processbench_metric(preds, labels)
    assert (a, b, f) == (0.5, 0.5, 0.5)
    # 3 erroneous all exact, 1 correct missed: F1 = 0
    assert E.processbench_metric([0, 1, 2, 0], [0, 1, 2, -1]) == (1.0, 0.0, 0.0)
    # acc_err 2/3, acc_cor 1: F1 = 2 * (2/3) / (5/3) = 0.8
    assert E.processbench_metric([0, 1, 0, -1], [0, 1, 2, -1])[2] == pytest.approx(0.8)


def test_localisation_threshold_is_cross_fitted():
    # the step rewards separate perfectly at -1: a fitted threshold finds it on either half
    sums = [[0.5, -2.0, -3.0], [0.4, 0.3], [-2.5, 0.1], [0.2, 0.2, 0.2], [0.1, -2.2], [0.3, 0.6]] * 2
    labels = [1, -1, 0, -1, 1, -1] * 2
    res = E.localisation(sums, labels, "fit")
    assert res["f1"] == 1.0 and all(-2.0 < t < 0.1 for t in res["thresholds"])
    fixed = E.localisation(sums, labels, 0.15)   # 0.1 < 0.15 marks example 4's step 0 and example 2's step 1
    assert fixed["preds"][:6] == [1, -1, 0, -1, 0, -1]


def test_processbench_slice_end_to_end(ckpts, tmp_path, capsys):
    html_path, out = tmp_path / "credit.html", tmp_path / "pb.jsonl"
    E.main(["--model", ckpts[0], "--ref", ckpts[1], "--processbench", "gsm8k", "--limit", "12",
            "--html", str(html_path), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "ProcessBench gsm8k: n=12" in printed and "F1" in printed
    page = html_path.read_text()
    assert page.count("<table class=sol>") >= 1 and "rgba(" in page
    rows = data.read_jsonl(out)
    pb = E.load_processbench("gsm8k", limit=12)
    assert [r["label"] for r in rows] == [e["label"] for e in pb]
    assert all(len(r["step_rewards"]) == len(e["steps"]) for r, e in zip(rows, pb))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_eval_files_are_refused_naming_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=rf"{empty}: no records"):
        data.load_records(str(empty))
    # a ProcessBench file whose second record lost its label
    real = json.load(open(os.path.join(DATA, "processbench", "gsm8k.json"), encoding="utf-8"))[:3]
    del real[1]["label"]
    os.makedirs(tmp_path / "processbench")
    json.dump(real, open(tmp_path / "processbench" / "gsm8k.json", "w"))
    with pytest.raises(ValueError, match=rf"processbench/gsm8k.json: record 1 \(id {real[1]['id']}\) has no field 'label'"):
        E.load_processbench("gsm8k", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"processbench/gsm9k.json: not found .* holds gsm8k\)"):
        E.load_processbench("gsm9k", root=str(tmp_path))


def test_a_processbench_limit_keeps_the_files_share_of_correct_solutions():
    # 207 erroneous solutions (label >= 0), its first 200 among them, and 193 correct ones (-1)
    raw = json.load(open(os.path.join(DATA, "processbench", "gsm8k.json"), encoding="utf-8"))
    wrong, right = [r["id"] for r in raw if r["label"] >= 0], [r["id"] for r in raw if r["label"] == -1]
    assert (len(wrong), len(right)) == (207, 193) and all(r["label"] >= 0 for r in raw[:200])
    for n, n_wrong in [(20, 10), (1, 1), (399, 206)]:   # round(n * 207 / 400)
        got = E.load_processbench("gsm8k", limit=n)
        assert [e["id"] for e in got] == [r["id"] for r in raw if r["id"] in wrong[:n_wrong] + right[:n - n_wrong]]
    assert [e["id"] for e in E.load_processbench("gsm8k")] == [r["id"] for r in raw]


def test_eval_refuses_a_model_without_rows_for_its_tokenizer_or_a_reference_of_another_vocabulary(
        ckpts, problems, tmp_path):
    """A model with fewer embedding rows than its tokenizer has ids (it would index past them), and a
    --ref whose vocabulary differs from --model's (the rewards compare the same token id's log-probs)."""
    small, other = tmp_path / "small", tmp_path / "other"
    tiny_checkpoint(small, vocab=1000, tokenizer="mistral")   # Mistral's tokenizer: 32000 ids
    with pytest.raises(ValueError, match=r"tokenizer has 32000 tokens but the model's embedding has only 1000"):
        E.main(["--model", str(small), "--data", problems[0], "--limit", "1", "--max-new-tokens", "2"])
    tiny_checkpoint(other, vocab=32064, tokenizer="mistral")
    with pytest.raises(ValueError, match=r"--ref .*other has 32064 embeddings but --model .* has 32000"):
        E.main(["--model", ckpts[0], "--ref", str(other), "--processbench", "gsm8k", "--limit", "2"])
