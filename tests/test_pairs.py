# python -m pytest -q tests/test_pairs.py
"""The pair pipeline end to end: a tiny random checkpoint on a 20-question slice produces both pair
kinds, graded by grade.py for real; a run killed with SIGKILL and restarted writes the same file as an
uninterrupted one.

For right answers to happen by chance, the random model is tilted toward short digit strings: its
blocks write nothing into the residual stream, so its next-token distribution is a fixed bias (digits,
spaces, newlines, EOS) plus a little dependence on the last token. The questions ask for one digit, and
data.judge grades the last number of a solution (the chain-of-thought fallback), so about one sample in
twenty is right, most step-controlled continuations are wrong, and steps are lines (--delimiter '\\n').
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
from conftest import byte_tokenizer
from model import ModelArgs, Transformer
from sample import PairSettings, make_pairs, pairs_for_chunk, progress_record

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = PairSettings(k_max=16, naive_batch=8, tries=4, max_new_tokens=40, delimiter="\n", seed=0)
CLI = ["--k-max", "16", "--naive-batch", "8", "--tries", "4", "--max-new-tokens", "40", "--delimiter", "\\n",
       "--chunk", "2", "--seed", "0"]


def tilted_model(tok):
    torch.manual_seed(0)
    m = Transformer(ModelArgs(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, intermediate_size=64,
                              bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)).eval()
    with torch.no_grad():
        for layer in m.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        m.tok_embeddings.weight.normal_(0, 0.1)
        m.tok_embeddings.weight[:, 0] = 10.0         # the normed hidden state is ~5.6 in dimension 0 always
        m.output.weight.normal_(0, 0.3)
        p = torch.full((tok.vocab_size,), 1e-9)
        for ch, q in [*((d, 0.045) for d in "0123456789"), (" ", 0.15), ("\n", 0.15), ("+", 0.05), ("=", 0.05),
                      ("a", 0.03), ("b", 0.03)]:
            p[tok.encode(ch)[0]] = q
        p[tok.eos_id] = 0.04
        m.output.weight[:, 0] = p.log() / 5.6
    return m


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    tok = byte_tokenizer(str(d / "ckpt"))
    model = tilted_model(tok)
    model.save_pretrained(str(d / "ckpt"))
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(5) for b in range(4)]
    data.write_jsonl(str(d / "gsm8k.jsonl"), rows)   # the source is the file's name: gsm8k (2 sc pairs each)
    return d, model, tok, data.load_records(str(d / "gsm8k.jsonl"))


def test_both_pair_kinds_end_to_end(setup):
    d, model, tok, records = setup
    assert len(records) == 20
    summary = make_pairs(model, tok, records, str(d / "inproc.jsonl"), SETTINGS, chunk=2, progress=False)
    pairs = data.read_pairs(str(d / "inproc.jsonl"))
    kinds = [p["kind"] for p in pairs]
    assert kinds.count("naive") >= 3 and kinds.count("sc") >= 3, summary
    assert summary["pairs_naive"] == kinds.count("naive") and summary["pairs_sc"] == kinds.count("sc")
    assert summary["questions"] == 20
    gold = {r["id"]: r["gold"] for r in records}
    for p in pairs:
        assert data.judge(p["prefix"] + p["chosen"], gold[p["id"]])[0] == "preferred"
        assert data.judge(p["prefix"] + p["rejected"], gold[p["id"]])[0] == "dispreferred"
        if p["kind"] == "sc":   # the prefix is whole steps of the preferred solution
            steps = data.split_steps(p["prefix"] + p["chosen"], "cot", "\n")
            assert p["prefix"] == "".join(steps[:p["k"] + 1])
    for qid in gold:
        assert sum(p["kind"] == "sc" and p["id"] == qid for p in pairs) <= 2
        assert sum(p["kind"] == "naive" and p["id"] == qid for p in pairs) <= 1
    naive_q = summary["pairs_naive"] + summary.get("drop_naive_no_preferred", 0) + summary.get("drop_naive_no_dispreferred", 0)
    assert naive_q == 20
    # one byte is one token and EOS is 1 in 25, so a fifth of the samples run into max_new_tokens (40):
    # none of them is in a pair, where every sampled text ended at EOS, within 39 tokens
    assert summary["samples_truncated"] > 0 and summary["samples_sc_truncated"] > 0
    labels = sum(summary.get(f"samples_{k}", 0) for k in ("preferred", "dispreferred", "neither", "truncated"))
    assert labels == summary["samples"]
    for p in pairs:
        sampled = [p["prefix"] + p["chosen"], p["rejected"]] if p["kind"] == "sc" else [p["chosen"], p["rejected"]]
        assert all(len(tok.encode(t)) < 40 for t in sampled), p
        assert (p["sampling"]["max_new_tokens"], p["sampling"]["top_p"]) == (40, 1.0)


def test_a_sample_cut_off_at_max_new_tokens_is_never_graded(tmp_path):
    """A scripted model whose solution is right early ('... 43 ...') and only ends later: cut off at
    max_new_tokens, the chain-of-thought fallback (the last number) would grade it preferred."""
    from test_sample import Scripted
    tok = byte_tokenizer(str(tmp_path / "tok"))
    rec = {"id": "t/0", "source": "gsm8k", "question": "What is 6 * 7 + 1?", "gold": "43"}
    script = "6 * 7 = 42, plus 1 is 43\nso the total is forty-three.\nThe answer is 43."
    model = Scripted(tok.encode(tok.render_prompt(rec["question"]) + script) + [tok.eos_id], tok.vocab_size)
    cut = script[:30]
    assert data.judge(cut, "43")[0] == "preferred"   # what the old pipeline did with it
    res = pairs_for_chunk(model, tok, [rec], PairSettings(k_max=4, naive_batch=2, tries=2, max_new_tokens=30,
                                                         delimiter="\n"))[0]
    assert res["pairs"] == [] and res["stats"] == {"samples": 4, "samples_truncated": 4, "drop_naive_no_preferred": 1}
    res = pairs_for_chunk(model, tok, [rec], PairSettings(k_max=4, naive_batch=2, tries=2, max_new_tokens=200,
                                                         delimiter="\n"))[0]
    assert res["stats"]["samples_preferred"] == 4 and "samples_truncated" not in res["stats"]


@pytest.mark.parametrize("script,delim,cuts", [
    ("6 * 7 = 42\nplus 1 is 43\nThe answer is 43.", "\n", 2),                 # a step a line (MetaMath)
    ("6 * 7 = 42\nso 42\n\nplus 1 is 43\n\nThe answer is 43.", "\n\n", 2),   # a step a paragraph (Qwen)
])
def test_default_delimiter_cuts_line_and_paragraph_solutions(tmp_path, monkeypatch, script, delim, cuts):
    """With the default --delimiter auto, each preferred solution is cut at its own steps and its
    continuations ramp at those; a fixed "\n\n" leaves a line-style solution uncut, and says so."""
    import sample
    from test_sample import Scripted
    tok = byte_tokenizer(str(tmp_path / "tok"))
    rec = {"id": "t/0", "source": "gsm8k", "question": "What is 6 * 7 + 1?", "gold": "43"}
    model = Scripted(tok.encode(tok.render_prompt(rec["question"]) + script) + [tok.eos_id], tok.vocab_size)
    seen, real = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda m, p, cfg, **kw: seen.append(cfg) or real(m, p, cfg, **kw))
    s = PairSettings(k_max=2, naive_batch=2, tries=1, max_new_tokens=200, sc_from="any")
    stats = pairs_for_chunk(model, tok, [rec], s)[0]["stats"]
    # the scripted continuation is always right: every cut is tried and yields no pair
    assert stats["drop_sc_no_wrong_continuation"] == cuts and stats["samples_sc"] == cuts
    assert [c.delimiter for c in seen if c.ramp] == [delim] * cuts
    if delim == "\n":
        stats = pairs_for_chunk(model, tok, [rec], dataclasses.replace(s, delimiter="\n\n"))[0]["stats"]
        assert stats["drop_sc_no_cut_point"] == stats["sc_solutions"] == 1
        assert "1 of 1 preferred solutions are a single step" in " ".join(sample.pair_warnings(stats, "--x"))


def _part_line(qid, rank=0):
    return json.dumps({"id": qid, "pairs": [], "stats": {"samples": 1}, "rank": rank}) + "\n"


def test_progress_files_skip_only_a_torn_last_line(tmp_path):
    from sample import _read_parts
    folder = tmp_path / "out.jsonl.parts"
    folder.mkdir()
    part = folder / "rank0.jsonl"
    part.write_text(_part_line("q/0") + _part_line("q/1") + '{"id": "q/2", "pai')   # killed mid-write
    (folder / "rank0.jsonl.tmp").write_text("not a progress file")                  # a rewrite killed before its rename
    assert sorted(_read_parts(str(folder))) == ["q/0", "q/1"]
    part.write_bytes((_part_line("q/0") + '{"id": "q/1", "question": "é').encode()[:-1])   # cut inside a character
    assert sorted(_read_parts(str(folder))) == ["q/0"]
    for text, error in [
        (_part_line("q/0") + '{"id": "q/1", "pai\n' + _part_line("q/2"), r"rank0.jsonl:2: not valid JSON"),
        (_part_line("q/0") + '{"id": "q/1", "pai\n', r"rank0.jsonl:2: not valid JSON"),   # whole, with its newline
        (_part_line("q/0") + json.dumps({"pairs": [], "stats": {}, "rank": 0}) + "\n", r"rank0.jsonl:2: missing field 'id'"),
        ('["q/0"]\n', r"rank0.jsonl:1: expected a JSON object, got list"),
        (_part_line("q/0").replace('"rank": 0', '"rank": "0"'), r"rank0.jsonl:1: field 'rank' is str"),
        (json.dumps({"id": "q/0", "pairs": [{"id": "q/0"}], "stats": {}, "rank": 0}) + "\n", r"rank0.jsonl:1: missing field 'source'"),
    ]:
        part.write_text(text)
        with pytest.raises(ValueError, match=error):
            _read_parts(str(folder))


def test_a_kill_while_rewriting_a_progress_file_loses_nothing(setup, tmp_path, monkeypatch):
    """make_pairs rewrites its rank's file (without the torn tail) before resuming: killed in the middle of
    that rewrite (here: json.dumps raising after the first question), the old file is still whole."""
    d, model, tok, records = setup
    out = str(tmp_path / "out.jsonl")
    os.makedirs(out + ".parts")
    data.write_json(out + ".parts/settings.json", progress_record(SETTINGS))   # what make_pairs records first
    part = out + ".parts/rank0.jsonl"
    before = "".join(_part_line(r["id"]) for r in records[:6]) + '{"id": "gsm8k/6", "pai'
    with open(part, "w") as f:
        f.write(before)
    dumps, calls = json.dumps, []

    class Killed(BaseException):
        pass

    def killed(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise Killed
        return dumps(*a, **k)
    monkeypatch.setattr(json, "dumps", killed)
    with pytest.raises(Killed):
        make_pairs(model, tok, records, out, SETTINGS, chunk=2, progress=False)
    monkeypatch.undo()
    assert calls and open(part).read() == before
    summary = make_pairs(model, tok, records[:6], out, SETTINGS, chunk=2, progress=False)   # resumes: all 6 done
    assert summary == {"questions": 6, "samples": 6}
    assert open(part).read() == before[:before.rindex("\n") + 1]


def test_killed_and_restarted_run_writes_the_same_file(setup):
    d, model, tok, records = setup
    ref = str(d / "ref.jsonl")
    make_pairs(model, tok, records, ref, SETTINGS, chunk=2, progress=False)
    out = str(d / "cli.jsonl")
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "pairs", "--model", str(d / "ckpt"),
           "--data", str(d / "gsm8k.jsonl"), "--out", out, *CLI]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = out + ".parts/rank0.jsonl"
    t0 = time.time()
    while not (os.path.exists(part) and open(part).read().count("\n") >= 2) and time.time() - t0 < 120:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = open(part).read().count("\n")
    assert 2 <= n_done < 20, "the run finished before it was killed"
    with open(part, "a") as f:
        f.write('{"id": "gsm8k/19", "pai')        # as if killed in the middle of a write
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert open(out).read() == open(ref).read()
    ids = [row["id"] for row in data.read_jsonl(part)]
    assert sorted(ids) == sorted(r["id"] for r in records)   # every question once


LATE_RANK = """
import os, sys, time
sys.path.insert(0, {root!r})
import sample
first = sample.pairs_for_chunk
def late(*a):   # rank 1 starts its first chunk 8 s late
    if os.environ["RANK"] == "1" and not late.waited:
        late.waited = True
        time.sleep(8)
    return first(*a)
late.waited = False
sample.pairs_for_chunk = late
sample.main(sys.argv[1:])
"""


def test_two_ranks_write_the_file_of_one_even_when_one_finishes_late(setup, tmp_path):
    """`sample.py pairs` on 2 processes (torchrun, gloo) writes what one process writes. Rank 1 finishes
    its questions 8 s after rank 0, past SCDPO_TIMEOUT=3 s, at which a collective barrier would abort the
    job; the ranks wait for each other through files, where an earlier run's marker does not count."""
    d, model, tok, records = setup
    one = str(tmp_path / "one.jsonl")
    make_pairs(model, tok, records[:6], one, SETTINGS, chunk=1, progress=False)
    two = str(tmp_path / "two.jsonl")
    os.makedirs(two + ".parts")
    with open(two + ".parts/done-rank1", "w") as f:
        f.write("an earlier run")
    script = tmp_path / "late.py"
    script.write_text(LATE_RANK.format(root=ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), "pairs", "--model", str(d / "ckpt"), "--data", str(d / "gsm8k.jsonl"),
                        "--limit", "6", "--out", two, *CLI, "--chunk", "1"],
                       env={**os.environ, "OMP_NUM_THREADS": "1", "SCDPO_TIMEOUT": "3"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert open(two).read() == open(one).read() and len(data.read_pairs(one)) >= 3
    assert sorted(json.loads(l)["rank"] for f in ("rank0", "rank1")
                  for l in open(f"{two}.parts/{f}.jsonl")) == [0, 0, 0, 1, 1, 1]


def test_cli_pairs_record_their_model_and_scdpo_refuses_another(setup, tmp_path):
    """`sample.py pairs` writes <out>.meta.json last (data.write_pairs_meta); scdpo.check_pairs_match then
    accepts the pairs for the model that sampled them and refuses a model whose tokenizer differs, even
    with the same vocabulary (which the vocabulary check alone would let through)."""
    import json
    import shutil
    import sample
    import scdpo
    d, _, tok, _ = setup
    model_a, model_b = str(d / "ckpt"), str(tmp_path / "b")
    shutil.copytree(model_a, model_b)
    with open(os.path.join(model_b, "tokenizer_config.json"), "w") as f:   # same ids, other tokenizer files
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 64}, f)
    out = str(tmp_path / "cli.jsonl")
    sample.main(["pairs", "--model", model_a, "--data", str(d / "gsm8k.jsonl"), "--out", out, "--limit", "4", *CLI])
    meta = data.read_pairs_meta(out)
    assert meta == {**data.model_fingerprint(model_a), "summary": meta["summary"]} and meta["summary"]["questions"] == 4
    assert not os.path.exists(out + ".meta.json.tmp")
    rows = data.tokenize_pairs(data.read_pairs(out), tok, log=lambda *a: None)
    assert rows   # (seed 0: one naive and one step-controlled pair)
    margs = ModelArgs.from_hf_config(json.load(open(os.path.join(model_a, "config.json"))))
    scdpo.check_pairs_match(out, rows, tok, margs, model_a)                # the sampling model: accepted
    with pytest.raises(ValueError, match=r"sampled with tokenizer [0-9a-f]{16} .* but --model .*/b has tokenizer"):
        scdpo.check_pairs_match(out, rows, tok, margs, model_b)
    # the sampling model's folder given a chat_template.jinja afterwards: its prompts are no longer those
    # the pairs were sampled under (the file overrides tokenizer_config.json's template)
    with open(os.path.join(model_a, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    try:
        with pytest.raises(ValueError, match=r"sampled with tokenizer [0-9a-f]{16} .* but --model .*/ckpt has tokenizer"):
            scdpo.check_pairs_match(out, rows, tok, margs, model_a)
    finally:
        os.remove(os.path.join(model_a, "chat_template.jinja"))   # `setup` is shared by the module's tests


def test_code_format_runs_the_code_of_every_sample(tmp_path):
    """fmt="code" through the pipeline with a scripted model (test_sample.Scripted) that always writes the
    same right solution, its outputs left for the sandbox to fill in: every sample is preferred, so no
    pair comes out, and the counts say why."""
    from test_sample import Scripted
    tok = byte_tokenizer(str(tmp_path / "tok"))
    S, E, OS, OE = data.CODE_START, data.CODE_END, data.OUTPUT_START, data.OUTPUT_END
    prompt = tok.render_prompt("What is 6 * 7 + 1?")
    script = f"Compute.\n{S}x = 6*7\nprint(x)\n{E}{OS}XX\n{OE}Then.\n{S}x + 1\n{E}{OS}XX\n{OE}The answer is 43."
    model = Scripted(tok.encode(prompt + script) + [tok.eos_id], tok.vocab_size)
    rec = {"id": "t/0", "source": "math", "question": "What is 6 * 7 + 1?", "gold": "43"}
    res = pairs_for_chunk(model, tok, [rec], PairSettings(fmt="code", k_max=4, naive_batch=2, tries=2,
                                                         max_new_tokens=200, sc_from="any"))[0]
    # continuing after a prefix that defines x works only because the prefix's code re-runs in each
    # continuation's kernel first (else `x + 1` fails, the output differs, the script derails, a pair appears)
    assert res["pairs"] == []
    assert res["stats"]["samples_preferred"] == 4 and res["stats"]["drop_naive_no_dispreferred"] == 1
    # cuts after text and output blocks only (never after a code block): k = 0, 2, 3, 5, 2 tries each
    assert res["stats"]["drop_sc_no_wrong_continuation"] == 4 and res["stats"]["samples_sc"] == 8
    # with the paper's sc_from="naive", a question without a naive pair is never cut
    res = pairs_for_chunk(model, tok, [rec], PairSettings(fmt="code", k_max=4, naive_batch=2, tries=2,
                                                         max_new_tokens=200))[0]
    assert res["stats"]["drop_sc_no_naive_pair"] == 1 and "samples_sc" not in res["stats"]


def test_one_question_answer_file_loads_the_same_through_every_command(setup, tmp_path):
    """The same {question, answer} JSONL through eval.py --data, sample.py pairs --data and scdpo.py --data
    (its pair-sampling stage): all three read the same records (data.load_records)."""
    import eval as E
    import scdpo
    d, _, _, records = setup
    src, want = str(d / "gsm8k.jsonl"), [r["id"] for r in records[:4]]
    E.main(["--model", str(d / "ckpt"), "--data", src, "--limit", "4", "--max-new-tokens", "4",
            "--out", str(tmp_path / "preds.jsonl")])
    assert [r["id"] for r in data.read_jsonl(str(tmp_path / "preds.jsonl"))] == want
    import sample
    sample.main(["pairs", "--model", str(d / "ckpt"), "--data", src, "--limit", "4", "--out",
                 str(tmp_path / "p.jsonl"), *CLI])
    assert sorted(r["id"] for r in data.read_jsonl(str(tmp_path / "p.jsonl.parts" / "rank0.jsonl"))) == sorted(want)
    four = tmp_path / "four.jsonl"
    data.write_jsonl(str(four), data.read_jsonl(src)[:4])
    args = scdpo.settings(model=str(d / "ckpt"), data=str(four), out=str(tmp_path / "run"), max_len=72,
                          max_prompt=32, k_max=2, naive_batch=2, tries=1, quiet=True)
    with pytest.raises(ValueError, match="less than one global batch"):   # 4 questions make too few pairs
        scdpo.train(args)
    parts = data.read_jsonl(str(tmp_path / "run" / "pairs.jsonl.parts" / "rank0.jsonl"))
    assert [r["id"].replace("four/", "gsm8k/") for r in parts] == want


def test_cli_writes_trl_rows_that_train_on_the_same_tokens(setup, tmp_path):
    """`sample.py pairs --format trl`: the same pairs as our format, as TRL rows whose prompt is the rendered
    chat template; read back by scdpo.py's reader, they tokenise to the same training rows."""
    import sample
    d, _, tok, _ = setup
    outs = {fmt: str(tmp_path / f"{fmt}.jsonl") for fmt in ("scdpo", "trl")}
    for fmt, out in outs.items():
        sample.main(["pairs", "--model", str(d / "ckpt"), "--data", str(d / "gsm8k.jsonl"), "--out", out,
                     "--limit", "6", "--format", fmt, *CLI])
    (ours, fa), (trl, fb) = (data.read_pairs(outs[f], with_format=True) for f in ("scdpo", "trl"))
    assert (fa, fb) == ("scdpo", "TRL") and len(ours) == len(trl) > 0
    assert all(r["prompt"] == tok.render_prompt(p["question"], p["prefix"]) for r, p in zip(trl, ours))
    assert data.tokenize_pairs(ours, tok, log=print) == data.tokenize_pairs(trl, tok, log=print)
