# python -m pytest -q tests/test_train.py
"""The training loop of scdpo.py on tiny stand-ins (byte tokenizer, 2-layer models of width 32):
which tokens the loss sees, packing, overfitting, 1 vs 2 processes, kill + resume, the hub export
against transformers, the reference's cache and dtype, the sharded models freed after training, files
only rank 0 sees, and the refusals (malformed pairs, foreign pairs, a non-finite loss or gradient
norm, a resume by another number of processes)."""
import gc
import glob
import json
import os
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import scdpo
from model import Transformer
from conftest import tiny_checkpoint, toy_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(path, seed=0, tied=False, vocab=None):
    return tiny_checkpoint(path, seed=seed, tied=tied, vocab=vocab)


make_pairs = toy_pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model, tok = make_model(str(root / "model"))
    pairs = make_pairs(str(root / "pairs.jsonl"))
    rows = data.tokenize_pairs(data.read_pairs(pairs), tok, log=lambda *a: None)
    return root, model, tok, pairs, rows


def args_for(model_dir, pairs, out, *extra):
    return scdpo.get_parser().parse_args(["--model", model_dir, "--pairs", pairs, "--out", out, "--quiet", *extra])


# ----------------------------------------------------------------------------------------------
# Which tokens the loss sees
# ----------------------------------------------------------------------------------------------
def reference_seq_logprob(model, ids, n_prompt):
    """float64 log pi(continuation | prompt) of one unpadded sequence, through the full logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).double()[0]                      # (T, V)
    lp = F.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return lp[n_prompt - 1:].sum().item()                                   # targets ids[n_prompt:] only


@pytest.mark.parametrize("packed", [True, False])
def test_logprobs_cover_exactly_the_continuations(tiny, packed):
    _, model, tok, _, rows = tiny
    batch = data.collate_pairs(rows[:4], packed=packed, pad_id=tok.pad_id)
    lp = scdpo.run_logprobs(scdpo.SeqLogprobs(model), batch, "cpu")
    for p, r in enumerate(rows[:4]):
        for s, side in enumerate(("chosen", "rejected")):
            want = reference_seq_logprob(model, r["prompt"] + r[side], len(r["prompt"]))
            assert lp[2 * p + s].item() == pytest.approx(want, rel=1e-5)


def test_packed_and_unpacked_give_the_same_logprobs(tiny):
    _, model, tok, _, rows = tiny
    net = scdpo.SeqLogprobs(model)
    a = scdpo.run_logprobs(net, data.collate_pairs(rows, packed=True, pad_id=tok.pad_id), "cpu")
    b = scdpo.run_logprobs(net, data.collate_pairs(rows, packed=False, pad_id=tok.pad_id), "cpu")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("onehot", [False, True])   # True: the path CUDA takes (index_add: atomics)
def test_segment_sums_equal_float64_sums(onehot):
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 7, (5000,), generator=g)
    lp = (-3 * torch.rand(5000, generator=g)).requires_grad_()
    got = scdpo.segment_sums(lp, seg, 8, onehot=onehot)             # segment 7 is empty
    want = [sum(x for x, s in zip(lp.tolist(), seg.tolist()) if s == k) for k in range(8)]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=2e-6, atol=0)
    w = torch.randn(8, generator=g)
    (got * w).sum().backward()
    assert torch.equal(lp.grad, w[seg])                              # each token's weight, exactly

@pytest.mark.parametrize("packed", [True, False])
def test_prompt_predictions_get_exactly_zero_gradient(tiny, packed):
    """The loss must not depend on how well the model predicts prompt tokens (question and, for a
    step-controlled pair, the shared steps): the final hidden states at positions 0..P-2, which predict
    prompt tokens 1..P-1, receive exactly zero gradient; P-1 (predicting the first continuation
    token) receives some. The index arrays hold no prompt position at all (the first indexed position
    of every row is P-1) and their targets are exactly the continuation tokens."""
    _, model, tok, _, rows = tiny
    batch = data.collate_pairs(rows[:4], packed=packed, pad_id=tok.pad_id)
    seen = {}

    def keep(mod, inp, out):   # the final hidden states (the final norm's output), kept for their gradient
        out.retain_grad()
        seen["h"] = out
    hook = model.norm.register_forward_hook(keep)
    lp = scdpo.run_logprobs(scdpo.SeqLogprobs(model), batch, "cpu")
    hook.remove()
    h = seen["h"]
    loss, _, _ = scdpo.dpo_loss(lp[0::2], lp[1::2], lp[0::2].detach() + 1, lp[1::2].detach() - 1, beta=0.1)
    loss = loss + scdpo.nll_loss(lp[0::2], batch["lengths"][0::2])
    loss.sum().backward()
    g = h.grad.abs().sum(-1)                                                # (B, L)
    L = batch["input_ids"].shape[1]
    for p, r in enumerate(rows[:4]):
        P = len(r["prompt"])
        for b in ([p] if packed else [2 * p, 2 * p + 1]):
            assert torch.all(g[b, :P - 1] == 0), "a prompt prediction received gradient"
            assert g[b, P - 1] > 0
        # every indexed position predicts a continuation token: its flat index lies at or after P-1
        for side_rows in ([p] if packed else [2 * p, 2 * p + 1]):
            pos = batch["idx"][(batch["idx"] // L) == side_rows] % L
            assert pos.min() == P - 1
    assert batch["tgt"].tolist() == [t for r in rows[:4] for side in ("chosen", "rejected") for t in r[side]]


# ----------------------------------------------------------------------------------------------
# Training behaviour
# ----------------------------------------------------------------------------------------------
def test_select_kind_and_batch_order():
    rows = [{"kind": k} for k in ["naive", "sc", "sc", "naive", "sc"]]
    assert scdpo.select_kind(rows, "naive", 0) == [0, 3]
    assert scdpo.select_kind(rows, "scdpo", 0) == [0, 1, 2, 3, 4]
    eq = scdpo.select_kind(rows, "data-equal", 0)
    assert len(eq) == 5 and set(eq) == {0, 3} and eq.count(0) >= 2 and eq.count(3) >= 2
    steps = scdpo.batch_order(10, 2, 4, seed=1)
    assert len(steps) == 4 and all(len(s) == 4 and len(set(s)) == 4 for s in steps)


def test_tiny_model_overfits_a_handful_of_pairs(tiny, tmp_path):
    root, _, _, pairs, _ = tiny
    small = make_pairs(str(tmp_path / "pairs8.jsonl"), n=8, seed=3)
    recs = [{"id": "e0", "question": "Ann has 2 bags of 3 nuts and 1 more. How many?", "gold": "7"}]
    data.write_jsonl(str(tmp_path / "test.jsonl"), recs)
    args = args_for(str(root / "model"), small, str(tmp_path / "run"), "--global-batch", "8", "--micro-batch", "4",
                    "--lr", "3e-3", "--epochs", "30", "--beta", "0.5", "--warmup-ratio", "0", "--max-len", "160",
                    "--max-prompt", "128", "--eval", str(tmp_path / "test.jsonl"))
    scdpo.train(args)
    log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)    # policy == reference at step 1
    assert log[-1]["acc"] == 1.0 and log[-1]["loss"] < 0.3
    preds = data.read_jsonl(str(tmp_path / "run" / "eval.jsonl"))   # --eval: eval.py on the final model
    assert len(preds) == 1 and preds[0]["gold"] == "7" and isinstance(preds[0]["correct"], bool)


def test_sft_lowers_the_loss(tiny, tmp_path):
    root = tiny[0]
    recs = [{"id": str(i), "question": f"What is {i}+{i}?", "solution": f"{i}+{i}={2 * i}\n\nThe answer is {2 * i}.", "gold": str(2 * i)}
            for i in range(8)]
    data.write_jsonl(str(tmp_path / "sft.jsonl"), recs)
    args = scdpo.get_parser().parse_args(["--objective", "sft", "--model", str(root / "model"), "--data", str(tmp_path / "sft.jsonl"),
                                          "--out", str(tmp_path / "sft"), "--global-batch", "8", "--lr", "1e-2", "--epochs", "30",
                                          "--quiet"])
    model = scdpo.train(args)
    log = [json.loads(l) for l in open(tmp_path / "sft" / "log.jsonl")]
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert isinstance(model, Transformer)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    root, _, _, pairs, _ = tiny
    calls = {"n": 0}
    real = scdpo.dpo_loss

    def poisoned(*a, **k):   # steps 1-2 are fine (2 micro-batches each), step 3 gives NaN
        calls["n"] += 1
        loss, w, l = real(*a, **k)
        return (loss * float("nan") if calls["n"] > 4 else loss), w, l
    monkeypatch.setattr(scdpo, "dpo_loss", poisoned)
    args = args_for(str(root / "model"), pairs, str(tmp_path / "run"), "--global-batch", "8", "--micro-batch", "4",
                    "--save-every", "1", "--lr", "1e-3")
    with pytest.raises(FloatingPointError, match=r"step 3: loss is nan.*step-000002"):
        scdpo.train(args)
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "step-000002" / "meta.json")
    assert not os.path.exists(tmp_path / "run" / "final")
    # resuming that checkpoint with another schedule is refused
    args = args_for(str(root / "model"), pairs, str(tmp_path / "run"), "--global-batch", "8", "--micro-batch", "4",
                    "--lr", "2e-3", "--resume")
    with pytest.raises(ValueError, match=r"other settings: --lr 0.001 \(now 0.002\)"):
        scdpo.train(args)


def test_non_finite_gradient_norm_stops_before_the_step(tiny, tmp_path, monkeypatch):
    root, _, _, pairs, _ = tiny
    calls = {"n": 0}
    real = scdpo.dpo_loss

    def poisoned(pc, *a, **k):   # step 3: the same finite loss, plus sqrt(0), whose derivative is infinite
        calls["n"] += 1
        loss, w, l = real(pc, *a, **k)
        return (loss + (pc - pc.detach()).sqrt() if calls["n"] > 4 else loss), w, l
    monkeypatch.setattr(scdpo, "dpo_loss", poisoned)
    args = args_for(str(root / "model"), pairs, str(tmp_path / "run"), "--global-batch", "8", "--micro-batch", "4",
                    "--save-every", "1", "--lr", "1e-3")
    with pytest.raises(FloatingPointError, match=r"step 3: gradient norm is (inf|nan).*step-000002"):
        scdpo.train(args)
    assert [json.loads(l)["step"] for l in open(tmp_path / "run" / "log.jsonl")] == [1, 2]


def test_the_log_says_how_many_items_each_epoch_leaves_out(tiny, tmp_path, capsys):
    root, _, _, pairs, _ = tiny
    args = scdpo.get_parser().parse_args(["--model", str(root / "model"), "--pairs", pairs, "--out", str(tmp_path / "run"),
                                          "--global-batch", "6", "--micro-batch", "3", "--max-steps", "1"])
    scdpo.train(args)
    assert "training pairs (scdpo): 16 = 8 naive + 8 step-controlled; 4 per epoch left out" in capsys.readouterr().out
    assert len(scdpo.batch_order(16, 2, 6, seed=0)) == 2 * (16 // 6)


def test_quiet_prints_only_the_step_lines_log_every_asks_for(tiny, tmp_path, capsys):
    """--quiet alone: nothing on stdout; --log-every 2 over 5 steps: the lines of steps 2, 4 and the last;
    log.jsonl has every step either way."""
    root, _, _, pairs, _ = tiny
    common = ["--global-batch", "4", "--micro-batch", "4", "--max-steps", "5"]
    for extra, want in (([], []), (["--log-every", "2"], [2, 4, 5])):
        out = str(tmp_path / f"run{len(want)}")
        scdpo.train(args_for(str(root / "model"), pairs, out, *common, *extra))
        printed = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
        assert [int(l.split()[1].split("/")[0]) for l in printed] == want and all(
            l.startswith("step ") for l in printed)
        assert [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="--log-every -1"):
        scdpo.train(args_for(str(root / "model"), pairs, str(tmp_path / "bad"), *common, "--log-every", "-1"))


def test_bad_pairs_are_refused_up_front(tiny, tmp_path):
    root, _, _, pairs, _ = tiny
    lines = open(pairs).read().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"id": "x", "question": "no answers"'] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:3"):
        scdpo.train(args_for(str(root / "model"), str(bad), str(tmp_path / "a")))
    # a model whose vocabulary is smaller than the tokenizer that encoded the pairs
    make_model(str(tmp_path / "small"), vocab=100)
    with pytest.raises(ValueError, match="embeddings: pairs and model do not match"):
        scdpo.train(args_for(str(tmp_path / "small"), pairs, str(tmp_path / "b")))
    # pairs recorded as sampled by another model
    shutil.copy(pairs, tmp_path / "p.jsonl")
    fp = data.model_fingerprint(str(root / "model"))
    json.dump({**fp, "model": "0" * 16}, open(tmp_path / "p.jsonl.meta.json", "w"))
    with pytest.raises(ValueError, match="sampled with model 0000000000000000"):
        scdpo.train(args_for(str(root / "model"), str(tmp_path / "p.jsonl"), str(tmp_path / "c")))
    # SFT solutions whose tokens lie past that model's embeddings
    data.write_jsonl(str(tmp_path / "sft.jsonl"), [{"id": "0", "question": "What is 7*8?", "gold": "56",
                                                     "solution": "7*8=56\n\nThe answer is 56."}])
    with pytest.raises(ValueError, match=r"sft.jsonl: tokenised with \d+ ids \(largest \d+\) but --model "
                                         r".*small has 100 embeddings"):
        scdpo.train(scdpo.settings(objective="sft", model=str(tmp_path / "small"), data=str(tmp_path / "sft.jsonl"),
                                   global_batch=1, micro_batch=1, out=str(tmp_path / "d"), quiet=True))


# ----------------------------------------------------------------------------------------------
# 1 vs 2 processes, kill + resume, export (each a real `python` / `torchrun` process)
# ----------------------------------------------------------------------------------------------
def run(*argv, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    r = subprocess.run(launch + [os.path.join(ROOT, "scdpo.py"), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny Qwen2-shaped (tied) SCDPO run: 1 process; 2 processes; 2 processes killed after
    step 3 (checkpoint at step 2, and a torn step-4 save and log line left behind) and resumed."""
    root = tmp_path_factory.mktemp("dist")
    make_model(str(root / "model"), seed=1, tied=True)
    pairs = make_pairs(str(root / "pairs.jsonl"), n=16, seed=1)
    common = ["--model", str(root / "model"), "--pairs", pairs, "--global-batch", "8", "--micro-batch", "2",
              "--lr", "1e-3", "--epochs", "3", "--nll-weight", "0.5", "--save-every", "2"]
    out = {}
    out["one"] = run(*common, "--out", str(root / "one"))
    # with activation checkpointing, which must not change the result either
    out["two"] = run(*common, "--out", str(root / "two"), "--checkpointing", nproc=2)
    out["killed"] = run(*common, "--out", str(root / "resumed"), "--checkpointing", "--stop-after", "3", nproc=2)
    os.makedirs(root / "resumed" / "checkpoints" / "step-000004.tmp")   # a save killed midway: half a shard
    (root / "resumed" / "checkpoints" / "step-000004.tmp" / "__0_0.distcp").write_bytes(b"\0" * 100)
    with open(root / "resumed" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.6')                        # and the step-4 line, killed mid-write
    out["resumed"] = run(*common, "--out", str(root / "resumed"), "--checkpointing", "--resume", nproc=2)
    # SFT: the loss is the mean over the global batch's response tokens, however they fall on ranks
    recs = [{"id": str(i), "question": f"What is {i}+{i}?" + " Think." * (i % 3), "gold": str(2 * i),
             "solution": f"{i}+{i}={2 * i}" + "\n\nSo" * (i % 4) + f" the answer is {2 * i}."} for i in range(16)]
    data.write_jsonl(str(root / "sft.jsonl"), recs)
    sft = ["--objective", "sft", "--model", str(root / "model"), "--data", str(root / "sft.jsonl"), "--global-batch", "8",
           "--micro-batch", "2", "--lr", "1e-3", "--epochs", "1"]
    out["sft-one"] = run(*sft, "--out", str(root / "sft-one"))
    out["sft-two"] = run(*sft, "--out", str(root / "sft-two"), nproc=2)
    return root, out


def weights(folder):
    return load_file(os.path.join(folder, "final", "model.safetensors"))


def test_one_and_two_processes_end_with_the_same_parameters(runs):
    root, out = runs
    assert "step 00006/00006" in out["one"] and "step 00006/00006" in out["two"]
    a, b = weights(root / "one"), weights(root / "two")
    assert a.keys() == b.keys()
    start = load_file(os.path.join(root, "model", "model.safetensors"))
    for k in a:
        assert not torch.equal(a[k], start[k]), f"{k} did not train"
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_sft_one_and_two_processes_end_with_the_same_parameters(runs):
    root, out = runs
    a, b = weights(root / "sft-one"), weights(root / "sft-two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_kill_and_resume_gives_the_uninterrupted_result(runs):
    root, out = runs
    assert "stopping after step 3" in out["killed"] and "resumed from" in out["resumed"]
    assert "step-000002" in out["resumed"] and "step 00003/00006" in out["resumed"]   # step 3 is redone
    a, b = weights(root / "two"), weights(root / "resumed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    # the killed run's step 3 is not logged twice, and the redone steps log what the uninterrupted run did
    log = [json.loads(l) for l in open(root / "resumed" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log] == pytest.approx([json.loads(l)["loss"] for l in open(root / "two" / "log.jsonl")], rel=1e-5)


def test_resume_with_another_world_size_is_refused(runs, tmp_path):
    root, _ = runs
    shutil.copytree(root / "two" / "checkpoints", tmp_path / "run" / "checkpoints")   # written by 2 processes
    args = args_for(str(root / "model"), str(root / "pairs.jsonl"), str(tmp_path / "run"), "--global-batch", "8",
                    "--micro-batch", "2", "--lr", "1e-3", "--epochs", "3", "--nll-weight", "0.5", "--resume")
    with pytest.raises(ValueError, match=r"step-000004 was written by 2 processes, this run has 1"):
        scdpo.train(args)


# export converts the state dict while popping it, to bound rank 0's peak host memory; a CPU test of
# that peak would measure the allocator more than the code, so these tests check only its result.
def test_export_loads_in_transformers_with_identical_logits(runs):
    import transformers
    root, _ = runs
    final = str(root / "one" / "final")
    ours = Transformer.from_pretrained(final).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    assert os.path.exists(os.path.join(final, "tokenizer.json")) and os.path.exists(os.path.join(final, "tokenizer_config.json"))


def test_live_reference_equals_precomputed(tiny, tmp_path):
    root, _, _, pairs, _ = tiny
    common = ["--global-batch", "8", "--micro-batch", "4", "--lr", "1e-3", "--max-steps", "2"]
    a = scdpo.train(args_for(str(root / "model"), pairs, str(tmp_path / "pre"), *common))
    b = scdpo.train(args_for(str(root / "model"), pairs, str(tmp_path / "live"), "--ref", "live", *common))
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)


def test_packed_and_unpacked_runs_have_their_own_reference_cache(tiny, tmp_path):
    """On a GPU the two layouts run other bf16 kernels and shapes: a cache computed in one layout is not
    the other's reference (policy != reference at step 0)."""
    root = tiny[0]
    pairs = shutil.copy(tiny[3], tmp_path / "pairs.jsonl")
    for layout in ("packed", "no-packed"):
        scdpo.train(args_for(str(root / "model"), str(pairs), str(tmp_path / layout), f"--{layout}",
                             "--global-batch", "8", "--max-steps", "1"), return_model=False)
    assert len(glob.glob(str(tmp_path / "pairs.jsonl.ref-*.pt"))) == 2


def test_a_frozen_reference_loads_into_bf16_shards(tiny):
    """--ref live on a GPU stores the reference in bf16: the shards must hold the bf16 rounding of the
    checkpoint's weights (the model that wrote it; here on the CPU, the dtype forced), and RoPE's
    frequencies stay fp32."""
    root, model = tiny[0], tiny[1]
    net = scdpo.load_sharded(str(root / "model"), model.args, torch.device("cpu"), trainable=False,
                             dtype=torch.bfloat16)
    want = dict(model.named_parameters())
    got = dict(net.model.named_parameters())
    assert got.keys() == want.keys()
    for k, p in got.items():
        assert p.dtype == torch.bfloat16 and torch.equal(p.full_tensor(), want[k].detach().bfloat16()), k
    assert net.model.inv_freq.dtype == torch.float32 and torch.equal(net.model.inv_freq, model.inv_freq)


def test_without_pairs_the_pairs_are_sampled_once(tiny, tmp_path, monkeypatch):
    """No --pairs: sample.make_pairs runs into --out first; a rerun finds the stage complete. (A random
    model solves next to nothing: too few pairs for one global batch, so training itself is refused.)"""
    import sample
    root = tiny[0]
    recs = [{"id": str(i), "question": f"What is {i}+1?", "gold": str(i + 1)} for i in range(3)]
    data.write_jsonl(str(tmp_path / "q.jsonl"), recs)
    argv = ["--model", str(root / "model"), "--data", str(tmp_path / "q.jsonl"), "--limit", "2",
            "--out", str(tmp_path / "run"), "--max-len", "72", "--max-prompt", "64", "--quiet"]
    with pytest.raises(ValueError, match="training items is less than one global batch"):
        scdpo.train(scdpo.get_parser().parse_args(argv))
    meta = json.load(open(tmp_path / "run" / "pairs.jsonl.meta.json"))
    assert meta["summary"]["questions"] == 2 and meta["model"] == data.model_fingerprint(str(root / "model"))["model"]
    monkeypatch.setattr(sample, "make_pairs", lambda *a, **k: pytest.fail("the finished stage ran again"))
    with pytest.raises(ValueError, match="training items is less than one global batch"):
        scdpo.train(scdpo.get_parser().parse_args(argv))
    # other questions (here one more) are not the finished stage's: refused until --overwrite samples anew
    with pytest.raises(ValueError, match=r"pairs.jsonl.parts .*limit.*pass --overwrite to sample the pairs again"):
        scdpo.train(scdpo.get_parser().parse_args([a if a != "2" else "3" for a in argv]))


def test_a_finished_run_that_sampled_its_own_pairs_resumes_as_complete(tiny, tmp_path, monkeypatch):
    """Without --pairs the run trains on <out>/pairs.jsonl, and final/DONE records that file: --resume
    compares against it (not against --pairs, which was not given), and names it once it is gone."""
    root, _, _, pairs, _ = tiny
    out = tmp_path / "run"

    def sampled(args, *a):   # the sampling stage's output, without sampling (a random model finds no pairs)
        shutil.copy(pairs, out / "pairs.jsonl")
        return str(out / "pairs.jsonl")
    monkeypatch.setattr(scdpo, "sample_pairs", sampled)
    argv = ["--model", str(root / "model"), "--data", "gsm8k:test", "--out", str(out), "--quiet",
            "--global-batch", "8", "--micro-batch", "4", "--lr", "1e-3", "--max-steps", "2"]
    scdpo.train(scdpo.get_parser().parse_args(argv))
    assert scdpo.train(scdpo.get_parser().parse_args(argv + ["--resume"])) is not None   # complete
    os.remove(out / "pairs.jsonl")
    with pytest.raises(ValueError, match=r"final was trained with other settings: pairs hash \w+ \(now missing\)"):
        scdpo.train(scdpo.get_parser().parse_args(argv + ["--resume"]))


def test_the_command_line_does_not_read_the_final_model_back(tiny, tmp_path, monkeypatch):
    """scdpo.py's main exports the model and stops: no rank loads <out>/final again (8 x 14 GB of reads for
    a 7B model) unless --eval needs it; train() called from Python still returns it."""
    root, _, _, pairs, _ = tiny
    common = ["--model", str(root / "model"), "--pairs", pairs, "--quiet", "--global-batch", "8",
              "--micro-batch", "4", "--max-steps", "1"]
    load = Transformer.from_pretrained
    loads = []
    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(
        lambda cls, path, **k: loads.append(str(path)) or load(path, **k)))
    scdpo.main(common + ["--out", str(tmp_path / "a")])
    assert loads == [] and os.path.exists(tmp_path / "a" / "final" / "DONE")
    assert scdpo.train(args_for(str(root / "model"), pairs, str(tmp_path / "a"), *common[4:], "--resume")) \
        is not None
    assert loads == [str(tmp_path / "a" / "final")]
    data.write_jsonl(str(tmp_path / "q.jsonl"), [{"question": "What is 2+5?", "answer": "7"}])
    scdpo.main(common + ["--out", str(tmp_path / "b"), "--eval", str(tmp_path / "q.jsonl"), "--max-len", "160",
                         "--max-prompt", "128"])
    assert loads[1:] == [str(tmp_path / "b" / "final")] and os.path.exists(tmp_path / "b" / "eval.jsonl")


def test_the_sharded_models_are_freed_before_the_final_model_is_loaded(tiny, tmp_path, monkeypatch):
    """FSDP2's modules and their state refer to each other, so `del net` alone frees nothing: the trained
    shards and a --ref live reference would stay while --eval loads the full model. Automatic collection
    is off here, so that only train()'s own collection can free them."""
    root, _, _, pairs, _ = tiny
    load, from_pretrained, nets, alive = scdpo.load_sharded, Transformer.from_pretrained, [], []

    def load_sharded(*a, **k):
        net = load(*a, **k)
        nets.append(weakref.ref(next(net.parameters())))
        return net
    monkeypatch.setattr(scdpo, "load_sharded", load_sharded)
    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(
        lambda cls, path, **k: alive.append([w() is not None for w in nets]) or from_pretrained(path, **k)))
    gc.disable()
    try:
        scdpo.train(args_for(str(root / "model"), pairs, str(tmp_path / "run"), "--ref", "live",
                             "--global-batch", "8", "--max-steps", "1"))
    finally:
        gc.enable()
    assert alive == [[False, False]]   # the policy and the reference, when <out>/final is loaded


def test_a_rerun_into_an_earlier_runs_folder_refuses_or_starts_clean(tiny, tmp_path):
    """Without --resume an --out that holds a run is refused; --overwrite removes its log, checkpoints and
    final model first, so that a crash of the new run followed by --resume cannot report the old model
    as complete, and the log holds each step once."""
    root, _, _, pairs, _ = tiny
    common = ["--global-batch", "8", "--micro-batch", "4", "--lr", "1e-3", "--max-steps", "2"]
    out = str(tmp_path / "run")
    scdpo.train(args_for(str(root / "model"), pairs, out, *common))
    assert os.path.exists(os.path.join(out, "final", "DONE"))
    with pytest.raises(FileExistsError, match="holds an earlier run .*--resume .*--overwrite"):
        scdpo.train(args_for(str(root / "model"), pairs, out, *common, "--lr", "2e-3"))
    assert scdpo.train(args_for(str(root / "model"), pairs, out, *common, "--lr", "2e-3", "--overwrite",
                                "--stop-after", "1")) is None                       # the new run "crashes"
    assert not os.path.exists(os.path.join(out, "final"))
    assert [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))] == [1]
    model = scdpo.train(args_for(str(root / "model"), pairs, out, *common, "--lr", "2e-3", "--resume"))
    assert [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))] == [1, 2]
    assert json.loads(open(os.path.join(out, "log.jsonl")).readlines()[0])["lr"] > 0 and model is not None
    # the run is complete: --resume with its settings has nothing to do; with others it is refused
    done = os.path.getmtime(os.path.join(out, "final", "model.safetensors"))
    scdpo.train(args_for(str(root / "model"), pairs, out, *common, "--lr", "2e-3", "--resume"))
    with pytest.raises(ValueError, match=r"--resume: .*final was trained with other settings: --max-steps 2 "
                                         r"\(now 3\), --lr 0.002 \(now 0.005\); --overwrite"):
        scdpo.train(args_for(str(root / "model"), pairs, out, *common, "--lr", "5e-3", "--max-steps", "3",
                             "--resume"))
    assert os.path.getmtime(os.path.join(out, "final", "model.safetensors")) == done


LATE_RANK = """
import sys, time
sys.path.insert(0, {root!r})
import torch.distributed as dist
import model
rank, world, _, device = model.compute_init()
model.print0("timeout", dist.group.WORLD._get_backend(device).options._timeout.total_seconds())
if rank == 1:
    time.sleep(6)
dist.barrier()
model.print0("through")
model.compute_cleanup()
"""


def test_a_late_rank_is_waited_for_as_long_as_the_timeout_says(tmp_path):
    """compute_init's timeout (model.TIMEOUT_S): rank 1 reaches a barrier 6 s after rank 0. Under the default
    (2 hours, where NCCL's own would abort after 10 minutes) both go through; SCDPO_TIMEOUT=2 aborts."""
    script = tmp_path / "late.py"
    script.write_text(LATE_RANK.format(root=ROOT))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SCDPO_TIMEOUT", None)
    r = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.split() == ["timeout", str(float(2 * 3600)), "through"]
    r = subprocess.run(launch, env={**env, "SCDPO_TIMEOUT": "2"}, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stdout.split() == ["timeout", "2.0"] and "Timed out waiting 2000ms" in r.stderr
    r = subprocess.run(launch, env={**env, "SCDPO_TIMEOUT": "2h"}, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "SCDPO_TIMEOUT='2h': expected a number of seconds" in r.stdout + r.stderr


HIDDEN_FROM_RANK1 = """
import glob, os, sys
sys.path.insert(0, {root!r})
if os.environ["RANK"] == "1":   # rank 1 does not see these files
    hidden = lambda p: any(h in str(p) for h in {hide!r})
    exists, find = os.path.exists, glob.glob
    os.path.exists = lambda p: exists(p) and not hidden(p)
    glob.glob = lambda *a, **k: [p for p in find(*a, **k) if not hidden(p)]
import model, scdpo
model.run_main(scdpo.main, sys.argv[1:])
"""


def test_rank_0_decides_what_exists_for_every_rank(tiny, tmp_path):
    """Rank 1 never sees the reference cache, the checkpoints or final/DONE (pairs or --out on node-local
    disk, or a cache that a concurrent --pairs-kind run writes between two ranks' looks). Had it decided
    for itself, it would run other collectives than rank 0: a hang, here cut to SCDPO_TIMEOUT=20 s."""
    root, _, _, pairs, _ = tiny
    script, out = tmp_path / "hidden.py", str(tmp_path / "run")
    script.write_text(HIDDEN_FROM_RANK1.format(root=ROOT, hide=[".ref-", "checkpoints/step-", "DONE"]))
    common = ["--model", str(root / "model"), "--pairs", pairs, "--global-batch", "8", "--micro-batch", "2",
              "--lr", "1e-3", "--max-steps", "2", "--save-every", "1"]

    def launch(*argv, rc=0):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SCDPO_TIMEOUT": "20"}
        r = subprocess.run(torchrun + [str(script), *common, "--out", out, *argv], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == rc, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout + r.stderr
    scdpo.train(args_for(str(root / "model"), pairs, str(tmp_path / "whole"), *common))   # the cache, too
    launch("--stop-after", "1")                                     # a checkpoint of step 1
    said = launch("--resume")
    assert f"reference log-probs: {pairs}.ref-" in said and "resumed from" in said and "step-000001" in said
    assert "is complete: nothing to train" in launch("--resume")
    # what rank 0 finds in DONE decides for both; an error in reading it is raised on both ranks
    assert "trained with other settings: --lr 0.001 (now 0.002)" in launch("--resume", "--lr", "2e-3", rc=1)
    done = os.path.join(out, "final", "DONE")
    record = open(done).read()
    open(done, "w").write("{not json")
    said = launch("--resume", rc=1)
    assert all(f"[rank {r}] error: {done}: not valid JSON" in said for r in (0, 1)), said[-3000:]
    open(done, "w").write(record)
    # rank 1 trained step 2 with rank 0's reference and step-1 weights: the loss of the uninterrupted run
    losses = [[json.loads(l)["loss"] for l in open(os.path.join(o, "log.jsonl"))]
              for o in (out, tmp_path / "whole")]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
