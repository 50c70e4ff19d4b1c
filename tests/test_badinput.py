# python -m pytest -q tests/test_badinput.py
"""Bad input and reruns (one test group per item of issue 16): a pairs rerun with other settings or
another model, pairs in a read-only folder, a full disk while saving, config and pairs files with wrong
types or bytes, flags that change a resumed run, pairs that train on nothing, file modes and error
messages, and the help and progress output.

Read-only folders and full disks are made the way the OS makes them: as root (where `mount` works) a
read-only bind mount and a small tmpfs; elsewhere mode 0555 and a file size limit (RLIMIT_FSIZE, under
which a write fails with EFBIG: Python ignores SIGXFSZ)."""
import contextlib
import functools
import json
import os
import resource
import runpy
import shutil
import subprocess
import sys
import uuid

import pytest
import torch
from safetensors.torch import load_file

import data
import eval as evaluation
import model as modeling
import sample
import scdpo
from conftest import byte_tokenizer, tiny_checkpoint, toy_pairs
from test_pairs import CLI, tilted_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# How the OS is made to refuse writes
# ----------------------------------------------------------------------------------------------
@functools.cache
def mount_works():
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = f"/tmp/scdpo-mount-probe-{uuid.uuid4().hex[:8]}"
    os.makedirs(probe)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", probe], check=True)
    os.rmdir(probe)
    return ok



@contextlib.contextmanager
def read_only(folder):
    """`folder` as a place where files cannot be created: a read-only bind mount as root (chmod does
    not stop root), else mode 0555. Root without `mount` gets /proc/self/fd, which refuses new files
    even to root, holding an open descriptor per file of `folder`. Yields the folder to use."""
    folder = str(folder)
    if mount_works():
        subprocess.run(["mount", "--bind", folder, folder], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", folder], check=True)
        try:
            yield folder
        finally:
            subprocess.run(["umount", folder], check=True)
    elif os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield folder
        finally:
            os.chmod(folder, 0o755)
    else:
        fds = {name: os.open(os.path.join(folder, name), os.O_RDONLY) for name in os.listdir(folder)}
        try:
            yield "/proc/self/fd", {name: str(fd) for name, fd in fds.items()}
        finally:
            for fd in fds.values():
                os.close(fd)


@contextlib.contextmanager
def full_disk(folder, size, mode):
    """`folder` on a disk with `size` bytes of room. mode "tmpfs" (where mounting works): a tmpfs of that
    size, yields None; "fsize" (or tmpfs impossible): yields a preexec_fn for a subprocess that limits
    every file it writes to `size` bytes."""
    os.makedirs(folder)
    if mode == "tmpfs" and mount_works():
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        try:
            yield None
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        yield lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


@contextlib.contextmanager
def file_size_limit(size):
    """This process's files limited to `size` bytes (writes past it fail with EFBIG), then the old limit."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)


def script(name, *argv, env=None, preexec_fn=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *argv], env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=preexec_fn)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    tiny_checkpoint(str(root / "model"))
    return root, str(root / "model"), toy_pairs(str(root / "pairs.jsonl"))


def train_argv(model, pairs, out, *extra):
    return ["--model", model, "--pairs", pairs, "--out", out, "--global-batch", "8", "--micro-batch", "4",
            "--lr", "1e-3", *extra]


# ----------------------------------------------------------------------------------------------
# 1. A pairs rerun with another model or other settings into the same --out
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampler")
    tok = byte_tokenizer(str(d / "a"))
    tilted_model(tok).save_pretrained(str(d / "a"))
    shutil.copytree(d / "a", d / "b")
    m = modeling.Transformer.from_pretrained(str(d / "b"))
    with torch.no_grad():
        m.output.weight[:, 1:] *= 1.5   # the same tokenizer, other weights
    m.save_pretrained(str(d / "b"))
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(3) for b in range(2)]
    data.write_jsonl(str(d / "q.jsonl"), rows)
    return d


def pairs_cli(d, out, *extra, model="a"):
    sample.main(["pairs", "--model", str(d / model), "--data", str(d / "q.jsonl"), "--out", str(out), *CLI,
                 *extra])


def test_pairs_rerun_with_another_model_or_settings_is_refused(sampler, tmp_path):
    d = sampler
    out = tmp_path / "p.jsonl"
    pairs_cli(d, out, "--limit", "3")
    before = {n: open(out.parent / "p.jsonl.parts" / n).read() for n in os.listdir(out.parent / "p.jsonl.parts")}
    for extra, model, says in [(["--seed", "1"], "a", r"seed 0 \(now 1\)"),
                               (["--k-max", "8"], "a", r"k_max 16 \(now 8\)"),
                               (["--static"], "a", r"static false \(now true\)"),
                               ([], "b", r"model \"[0-9a-f]{16}\" \(now \"[0-9a-f]{16}\"\)")]:
        with pytest.raises(ValueError, match=rf"p.jsonl.parts was sampled with other settings: {says}.*--restart"):
            pairs_cli(d, out, *extra, model=model)
    after = {n: open(out.parent / "p.jsonl.parts" / n).read() for n in os.listdir(out.parent / "p.jsonl.parts")}
    assert after == before                      # nothing of the old progress was touched
    # a record written before a setting existed (here: static) is read with that setting's default
    record = json.load(open(out.parent / "p.jsonl.parts" / "settings.json"))
    del record["settings"]["static"]
    (out.parent / "p.jsonl.parts" / "settings.json").write_text(json.dumps(record))
    pairs_cli(d, out, "--limit", "6")          # the same settings: more questions continue the old progress
    # --restart: the file and its meta are those of a fresh run of model b
    pairs_cli(d, out, "--restart", model="b")
    pairs_cli(d, tmp_path / "fresh.jsonl", model="b")
    assert open(out).read() == open(tmp_path / "fresh.jsonl").read()
    assert data.read_pairs_meta(str(out))["model"] == data.model_fingerprint(str(d / "b"))["model"]


def test_progress_without_a_record_of_its_settings_is_refused(sampler, tmp_path):
    d = sampler
    folder = tmp_path / "p.jsonl.parts"
    folder.mkdir()
    (folder / "rank0.jsonl").write_text(json.dumps({"id": "q/0", "pairs": [], "stats": {}, "rank": 0}) + "\n")
    with pytest.raises(ValueError, match=r"holds progress \(rank0.jsonl\) but no record of its settings"):
        pairs_cli(d, tmp_path / "p.jsonl")


def test_stage_one_of_scdpo_refuses_other_sampling_settings_unless_overwrite(tiny, tmp_path, capsys):
    """scdpo.py without --pairs samples into --out; a rerun with another --k-max is refused, --overwrite
    samples again. The budget of 8 new tokens (--max-len 72 minus --max-prompt 64) cuts off nearly every
    sample of the random model, which is warned about."""
    _, model, _ = tiny
    recs = [{"id": str(i), "question": f"What is {i}+1?", "gold": str(i + 1)} for i in range(2)]
    data.write_jsonl(str(tmp_path / "q.jsonl"), recs)
    argv = ["--model", model, "--data", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "run"),
            "--max-len", "72", "--max-prompt", "64", "--naive-batch", "4", "--tries", "2"]
    with pytest.raises(ValueError, match="less than one global batch"):   # next to no pairs: expected
        scdpo.train(scdpo.get_parser().parse_args(argv + ["--k-max", "4"]))
    err = capsys.readouterr().err
    assert "WARNING: " in err and "samples hit max_new_tokens" in err and "raise --max-len" in err
    assert "--max-len minus --max-prompt = 8 new tokens" in err
    with pytest.raises(ValueError, match=r"pairs.jsonl.parts was sampled with other settings: k_max 4 \(now 8\)"
                                         r".*--overwrite"):
        scdpo.train(scdpo.get_parser().parse_args(argv + ["--k-max", "8"]))
    with pytest.raises(ValueError, match="less than one global batch"):
        scdpo.train(scdpo.get_parser().parse_args(argv + ["--k-max", "8", "--overwrite"]))
    assert "--overwrite: sampling them again" in capsys.readouterr().out
    record = json.load(open(tmp_path / "run" / "pairs.jsonl.parts" / "settings.json"))
    assert record["settings"]["k_max"] == 8 and record["model"] == data.model_fingerprint(model)["model"]
    assert data.read_pairs_meta(str(tmp_path / "run" / "pairs.jsonl"))["summary"]["samples"] == 2 * 8


# ----------------------------------------------------------------------------------------------
# 2. Pairs in a read-only folder: the reference cache goes to --out, and says so
# ----------------------------------------------------------------------------------------------
def test_reference_cache_beside_read_only_pairs_goes_to_out(tiny, tmp_path, capsys):
    _, model, pairs = tiny
    common = ["--max-steps", "1"]
    shutil.copy(pairs, tmp_path / "writable.jsonl")
    scdpo.train(scdpo.get_parser().parse_args(train_argv(model, str(tmp_path / "writable.jsonl"),
                                                         str(tmp_path / "w"), *common)))
    want = torch.load(next(str(p) for p in tmp_path.glob("writable.jsonl.ref-*.pt")))
    os.makedirs(tmp_path / "ro")
    shutil.copy(pairs, tmp_path / "ro" / "pairs.jsonl")
    capsys.readouterr()
    with read_only(tmp_path / "ro") as where:
        folder, names = (where, {}) if isinstance(where, str) else where
        path = os.path.join(folder, names.get("pairs.jsonl", "pairs.jsonl"))
        out = str(tmp_path / "run")
        scdpo.train(scdpo.get_parser().parse_args(train_argv(model, path, out, *common)))
        err = capsys.readouterr().err
        assert f"cannot write beside the pairs ({folder}: " in err and f"caching them in {out}/" in err
        cached = [n for n in os.listdir(out) if ".ref-" in n]
        assert len(cached) == 1 and not any(".ref-" in n for n in os.listdir(tmp_path / "ro"))
        torch.testing.assert_close(torch.load(os.path.join(out, cached[0])), want, rtol=0, atol=0)
        # a rerun finds it there
        scdpo.train(scdpo.get_parser().parse_args(train_argv(model, path, out, "--overwrite", *common)))
        assert f"reference log-probs: {out}/{cached[0]}" in capsys.readouterr().out


OTHER_PAIRS_ON_RANK1 = """
import os, sys
sys.path.insert(0, {root!r})
import model, scdpo
argv = sys.argv[1:]
if os.environ["RANK"] == "1":   # rank 1's copy of the pairs is another file
    argv[argv.index("--pairs") + 1] = {other!r}
model.run_main(scdpo.main, argv)
"""


def test_ranks_that_read_other_pairs_are_refused(tiny, tmp_path):
    """Rank 0 reads the reference cache for every rank, so the ranks must read the same model and pairs:
    ranks whose copies differ (on node-local disks) all stop with the error, not train on other data."""
    _, model, pairs = tiny
    launcher, other = tmp_path / "other.py", toy_pairs(str(tmp_path / "other.jsonl"), seed=5)
    launcher.write_text(OTHER_PAIRS_ON_RANK1.format(root=ROOT, other=other))
    argv = train_argv(model, pairs, str(tmp_path / "run"), "--micro-batch", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCDPO_TIMEOUT": "20"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(launcher), *argv], env=env, capture_output=True, text=True, timeout=300)
    want = "error: the ranks see different --model or --pairs files"
    assert r.returncode != 0 and r.stderr.count(want) == 2, r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# 3. A full disk while saving: "disk full at PATH", and the trained weights kept
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["tmpfs", "fsize"])
def test_save_pretrained_on_a_full_disk_names_the_path(tiny, tmp_path, mode):
    m = modeling.Transformer.from_pretrained(tiny[1])   # 140 KB of float32 weights
    dest = tmp_path / "disk" / "final"
    with full_disk(tmp_path / "disk", 64 * 1024, mode) as limit:
        with contextlib.ExitStack() as stack:
            if limit is not None:
                stack.enter_context(file_size_limit(64 * 1024))
            with pytest.raises(modeling.DiskFull, match=rf"^disk full at {dest}: .*"
                                                        r"(No space left on device|File too large)"):
                m.save_pretrained(str(dest))
        assert os.listdir(tmp_path / "disk") == []   # the partial files are gone, their room is free again


@pytest.mark.parametrize("mode", ["tmpfs", "fsize"])
def test_training_on_a_full_disk_keeps_the_trained_weights(tiny, tmp_path, mode):
    """--out on a 64 KB disk: the log fits, the checkpoint at step 2 does not (it is skipped, training
    goes on), nor does the final model: it is written under $TMPDIR instead, and the error says where.
    Under a file size limit every folder is as full, so there the weights cannot be kept, and it says so."""
    _, model, pairs = tiny
    common = ["--max-steps", "4", "--quiet"]
    ref = scdpo.train(scdpo.get_parser().parse_args(train_argv(model, pairs, str(tmp_path / "ref"), *common)))
    spare = tmp_path / "spare"
    spare.mkdir()
    out = tmp_path / "disk" / "run"
    with full_disk(tmp_path / "disk", 64 * 1024, mode) as limit:
        r = script("scdpo.py", *train_argv(model, pairs, str(out), "--save-every", "2", *common),
                   env={"TMPDIR": str(spare)}, preexec_fn=limit)
        assert r.returncode == 1, r.stderr[-3000:]
        assert f"WARNING: disk full at {out}/checkpoints/step-000002.tmp: the checkpoint of step 2" in r.stderr
        assert "Traceback" not in r.stderr and "inline_container" not in r.stderr.split("error: ")[-1]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: disk full at {out}/final: "), r.stderr[-3000:]
        assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3, 4]
        assert os.listdir(out / "checkpoints") == [] and not os.path.exists(out / "final.tmp")
        kept = list(spare.glob("scdpo-final-*/final"))
        if limit is None:
            assert f"The trained model is in {kept[0]} instead: free space and move it to {out}/final" in last
            assert os.path.exists(kept[0] / "DONE") and os.path.exists(kept[0] / "tokenizer.json")
            assert load_file(str(kept[0] / "model.safetensors")).keys() == load_file(
                str(tmp_path / "ref" / "final" / "model.safetensors")).keys()
            for k, v in modeling.Transformer.from_pretrained(str(kept[0])).state_dict().items():
                torch.testing.assert_close(v, ref.state_dict()[k], rtol=1e-5, atol=1e-7, msg=k)
        else:
            assert kept == [] and "the trained weights are lost" in last


# ----------------------------------------------------------------------------------------------
# 4. Errors that name file, line and field
# ----------------------------------------------------------------------------------------------
def broken_model(tiny, tmp_path, edit):
    path = tmp_path / "m"
    shutil.copytree(tiny[1], path)
    cfg = json.load(open(path / "config.json"))
    text = edit(cfg)
    (path / "config.json").write_text(text if isinstance(text, str) else json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("field, value, want", [
    ("num_attention_heads", "4", r"field 'num_attention_heads' is \"4\", expected a positive integer"),
    ("rms_norm_eps", "1e-5", r"field 'rms_norm_eps' is \"1e-5\", expected a number"),
    ("tie_word_embeddings", "false", r"field 'tie_word_embeddings' is \"false\", expected true or false"),
    ("rope_scaling", {"rope_type": "linear", "factor": "2"}, r"field 'rope_scaling.factor' is \"2\""),
    ("eos_token_id", [1, "2"], r"field 'eos_token_id' is \[1, \"2\"\], expected an integer or a list"),
])
def test_config_fields_of_the_wrong_type_are_named_by_every_script(tiny, tmp_path, field, value, want):
    m = broken_model(tiny, tmp_path, lambda c: c.update({field: value}))
    where = rf"{m}/config.json: {want}"
    with pytest.raises(ValueError, match=where):
        modeling.read_config(m)
    with pytest.raises(ValueError, match=where):
        scdpo.main(train_argv(m, tiny[2], str(tmp_path / "run")))
    with pytest.raises(ValueError, match=where):
        sample.main(["pairs", "--model", m, "--data", "gsm8k:test", "--out", str(tmp_path / "p.jsonl")])
    with pytest.raises(ValueError, match=where):
        evaluation.main(["--model", m, "--data", "gsm8k", "--limit", "1"])


def test_config_that_is_missing_or_not_json_is_named(tiny, tmp_path):
    m = broken_model(tiny, tmp_path, lambda c: '{"model_type": "llama",\n "vocab_size": 258,,}')
    with pytest.raises(ValueError, match=rf"{m}/config.json: not valid JSON: .*line 2"):
        scdpo.main(train_argv(m, tiny[2], str(tmp_path / "a")))
    (tmp_path / "m" / "config.json").write_bytes(b'{"model_type": "llama",\n "x": "\xff"}')
    with pytest.raises(ValueError, match=rf"{m}/config.json:2: not UTF-8 text \(byte 0xff\)"):
        scdpo.main(train_argv(m, tiny[2], str(tmp_path / "b")))
    os.remove(tmp_path / "m" / "config.json")
    with pytest.raises(FileNotFoundError, match=rf"{m}/config.json: not found"):
        scdpo.main(train_argv(m, tiny[2], str(tmp_path / "c")))


def test_a_missing_model_folder_or_pairs_file_is_named(tiny, tmp_path):
    nope = str(tmp_path / "nope")
    runs = [lambda: scdpo.main(train_argv(nope, tiny[2], str(tmp_path / "a"))),
            lambda: sample.main(["pairs", "--model", nope, "--data", "gsm8k:test", "--out", str(tmp_path / "p.jsonl")]),
            lambda: evaluation.main(["--model", nope, "--data", "gsm8k", "--limit", "1"])]
    for run in runs:
        with pytest.raises(FileNotFoundError, match=rf"{nope}: no such folder \(a model is a hub-format folder"):
            run()
    assert not os.path.exists(tmp_path / "a")   # refused before --out is made
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/none.jsonl: not found \(a pairs JSONL"):
        scdpo.main(train_argv(tiny[1], str(tmp_path / "none.jsonl"), str(tmp_path / "b")))


def test_pairs_file_with_bytes_that_are_not_utf8_names_the_line(tiny, tmp_path):
    lines = open(tiny[2], "rb").read().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(lines[:2]) + lines[2].replace(b"Ann", b"Ann\xe9") + b"".join(lines[3:]))
    with pytest.raises(ValueError, match=rf"{bad}:3: not UTF-8 text \(byte 0xe9 at byte \d+ of the line\)"):
        data.read_pairs(str(bad))
    with pytest.raises(ValueError, match=rf"{bad}:3: not UTF-8"):
        scdpo.main(train_argv(tiny[1], str(bad), str(tmp_path / "run")))


# ----------------------------------------------------------------------------------------------
# 5. Flags: a zero batch, a resume with settings that change the result, the sampling budget
# ----------------------------------------------------------------------------------------------
def test_zero_global_batch_and_prompt_budget_are_refused(tiny, tmp_path):
    _, model, pairs = tiny
    with pytest.raises(ValueError, match="--global-batch 0 must be a positive multiple"):
        scdpo.train(scdpo.get_parser().parse_args(train_argv(model, pairs, str(tmp_path / "a"))
                                                  + ["--global-batch", "0"]))
    with pytest.raises(ValueError, match="--max-prompt 600 must be positive and less than --max-len 512"):
        scdpo.train(scdpo.get_parser().parse_args(train_argv(model, pairs, str(tmp_path / "b"), "--max-len",
                                                             "512", "--max-prompt", "600")))


def test_resume_refuses_settings_that_change_the_result(tiny, tmp_path):
    _, model, pairs = tiny
    shutil.copy(pairs, tmp_path / "p.jsonl")
    out = str(tmp_path / "run")
    base = train_argv(model, str(tmp_path / "p.jsonl"), out, "--save-every", "1", "--quiet")
    scdpo.train(scdpo.get_parser().parse_args(base + ["--stop-after", "1"]))
    with pytest.raises(ValueError, match=r"other settings: --loss sigmoid \(now ipo\), --beta 0.1 \(now 0.5\), "
                                         r"--nll-weight 0.0 \(now 1.0\)"):
        scdpo.train(scdpo.get_parser().parse_args(base + ["--resume", "--beta", "0.5", "--nll-weight", "1",
                                                          "--loss", "ipo"]))
    with pytest.raises(ValueError, match=r"other settings: --adam-betas \[0.9, 0.999\] \(now \[0.9, 0.95\]\), "
                                         r"--label-smoothing 0.0 \(now 0.1\)"):
        scdpo.train(scdpo.get_parser().parse_args(base + ["--resume", "--label-smoothing", "0.1", "--adam-betas",
                                                          "0.9", "0.95"]))
    pairs_rows = open(tmp_path / "p.jsonl").read().splitlines()
    (tmp_path / "p.jsonl").write_text("\n".join(pairs_rows[1:] + pairs_rows[:1]) + "\n")   # changed in place
    with pytest.raises(ValueError, match=r"other settings: pairs hash [0-9a-f]{64} \(now [0-9a-f]{64}\)"):
        scdpo.train(scdpo.get_parser().parse_args(base + ["--resume"]))
    (tmp_path / "p.jsonl").write_text("\n".join(pairs_rows) + "\n")
    scdpo.train(scdpo.get_parser().parse_args(base + ["--resume", "--adam-betas", "0.9", "0.999"]))   # as saved


def test_stage_one_has_the_sampling_flags_and_documents_its_budget():
    args = scdpo.get_parser().parse_args(["--delimiter", "\\n", "--k-max", "7", "--tries", "3"])
    s = sample.pair_settings(args, max_new_tokens=5)
    assert (s.delimiter, s.k_max, s.tries) == ("\n", 7, 3)
    text = " ".join(scdpo.get_parser().format_help().split())
    assert "a budget of --max-len minus --max-prompt new tokens per solution or continuation" in text


def test_most_pairs_truncated_or_dropped_is_warned_with_the_flag_to_raise(tiny):
    tok = modeling.Tokenizer.from_pretrained(tiny[1])
    pairs = data.read_pairs(tiny[2])
    warned = []
    rows = data.tokenize_pairs(pairs, tok, 60, 50, log=lambda m: None, warn=warned.append)
    prompts = [len(tok.encode(tok.render_prompt(p["question"], p["prefix"]))) for p in pairs]
    assert len(rows) == sum(n <= 50 for n in prompts) and 2 * (len(pairs) - len(rows)) > len(pairs)
    assert warned[0] == (f"WARNING: {len(pairs) - len(rows)} of {len(pairs)} pairs have a prompt over 50 tokens "
                         f"and were dropped; raise --max-prompt")
    warned.clear()
    rows = data.tokenize_pairs(pairs, tok, 100, 90, log=lambda m: None, warn=warned.append)
    cut = sum(r["chosen_truncated"] or r["rejected_truncated"] for r in rows)
    assert len(rows) == 16 and cut > 8
    assert warned == [f"WARNING: {cut} of 16 kept pairs have a continuation cut at 100 tokens (prompt included); "
                      f"raise --max-len"]
    warned.clear()
    data.tokenize_pairs(pairs, tok, 1024, 512, log=lambda m: None, warn=warned.append)
    assert warned == []


def test_pairs_cli_warns_when_most_samples_run_out_of_tokens(sampler, tmp_path, capsys):
    sample.main(["pairs", "--model", str(sampler / "a"), "--data", str(sampler / "q.jsonl"), "--out",
                 str(tmp_path / "p.jsonl"), *CLI, "--limit", "2", "--max-new-tokens", "3"])
    summary = data.read_pairs_meta(str(tmp_path / "p.jsonl"))["summary"]
    assert 2 * summary["samples_truncated"] > summary["samples"]
    assert (f"WARNING: {summary['samples_truncated']} of {summary['samples']} samples hit max_new_tokens and were "
            f"dropped ungraded; raise --max-new-tokens") in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# 6. Pairs that would train on nothing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, want", [
    (lambda p: p.update(prefix=""), r"field 'prefix' is empty in a sc pair \(k=0\)"),
    (lambda p: p.update(rejected=p["chosen"]), r"fields 'chosen' and 'rejected' are the same text"),
    (lambda p: p.update(chosen=""), r"field 'chosen' is empty"),
    (lambda p: p.update(chosen=" \n\n"), r"field 'chosen' is empty"),
])
def test_pairs_that_train_on_nothing_are_refused_with_their_line(tiny, tmp_path, edit, want):
    pairs = data.read_pairs(tiny[2])
    assert pairs[3]["kind"] == "sc"
    edit(pairs[3])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with pytest.raises(ValueError, match=rf"{bad}:4: {want}"):
        data.read_pairs(str(bad))


def test_a_naive_pair_with_a_prefix_and_an_empty_rejected():
    rec = {"id": "q", "source": "toy", "question": "1+1?", "gold": "2"}
    naive = data.make_pair(rec, "1+1=2. The answer is 2.", "1+1=3. The answer is 3.")
    with pytest.raises(ValueError, match=r"line 7: field 'prefix' is not empty in a naive pair \(k=-1\)"):
        data.check_pair({**naive, "prefix": "1+1"}, "line 7")
    assert data.check_pair({**naive, "rejected": ""}, "line 7")   # a continuation that stops at once: kept


# ----------------------------------------------------------------------------------------------
# 8. File modes of an exported model; an error printed once
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_have_the_mode_of_the_umask(tiny, tmp_path, umask):
    m = modeling.Transformer.from_pretrained(tiny[1])
    tok = modeling.Tokenizer.from_pretrained(tiny[1])
    old = os.umask(umask)
    try:
        m.save_pretrained(str(tmp_path / "final"), max_shard_size=50_000)   # shards and an index too
        tok.save_pretrained(str(tmp_path / "final"))
        with open(tmp_path / "plain", "w"):   # what open() gives under this umask: the reference
            pass
    finally:
        os.umask(old)
    want = os.stat(tmp_path / "plain").st_mode & 0o777
    assert want == 0o666 & ~umask
    names = os.listdir(tmp_path / "final")
    assert "model-00002-of-" in " ".join(names) and "tokenizer.json" in names
    assert {n: os.stat(tmp_path / "final" / n).st_mode & 0o777 for n in names} == dict.fromkeys(names, want)


def test_a_single_process_error_is_printed_once_without_traceback(tiny, tmp_path):
    m = broken_model(tiny, tmp_path, lambda c: c.update(num_attention_heads="4"))
    want = f"error: {m}/config.json: field 'num_attention_heads' is \"4\", expected a positive integer"
    for name, argv in [("scdpo.py", train_argv(m, tiny[2], str(tmp_path / "run"))),
                       ("sample.py", ["pairs", "--model", m, "--data", "gsm8k:test", "--out", str(tmp_path / "p")]),
                       ("eval.py", ["--model", m, "--data", "gsm8k"])]:
        r = script(name, *argv)
        assert r.returncode == 1 and r.stderr == want + "\n", (name, r.stderr[-2000:])
    r = script("scdpo.py", *train_argv(m, tiny[2], str(tmp_path / "run")), env={"SCDPO_TRACEBACK": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and want.removeprefix("error: ") in r.stderr
    (tmp_path / "afile").write_text("")   # the miniature too: an --out that is a file
    r = script("mini.py", "--out", str(tmp_path / "afile"))
    assert r.returncode == 1 and r.stderr == f"error: [Errno 20] Not a directory: '{tmp_path}/afile/seed0'\n"


def test_flag_values_are_checked_when_parsed(tiny, tmp_path, capsys):
    m, out = tiny[1], str(tmp_path / "p.jsonl")
    for argv, want in [(["--ramp", "1.1,0.05"], "argument --ramp: ramp '1.1,0.05': expected paper, scripts or "
                                                "start,inc,max"),
                       (["--ramp", "hot"], "argument --ramp: ramp 'hot'"),
                       (["--sc-per-question", "gsm8k2"], "argument --sc-per-question: 'gsm8k2': expected source=N"),
                       (["--dtype", "bf16"], "argument --dtype: invalid choice: 'bf16'"),
                       (["--limit", "0"], "argument --limit: 0 is not a positive integer")]:
        with pytest.raises(SystemExit):
            sample.main(["pairs", "--model", m, "--out", out, *argv])
        assert want in capsys.readouterr().err
    assert not os.path.exists(out + ".parts")   # refused before any settings were recorded
    with pytest.raises(FileNotFoundError, match=r"processbench/gsm8.json: not found \(ProcessBench subset 'gsm8'; "
                                                r".* holds gsm8k, math, olympiadbench, omnimath\)"):
        evaluation.main(["--model", m, "--ref", m, "--processbench", "gsm8"])
    # a source no question has would leave its questions at the default, unnoticed
    recs = data.load_records("gsm8k:test", limit=2)
    with pytest.raises(ValueError, match=r"--sc-per-question names gsm, the source of no question here "
                                         r"\(sources: gsm8k\)"):
        sample.make_pairs(None, None, recs, out, sample.PairSettings(sc_per_question={"gsm": 2}))
    with pytest.raises(ValueError, match="--sc-per-question names gsm, "):   # before the model loads
        sample.main(["pairs", "--model", str(tmp_path / "no-model"), "--data", "gsm8k:test", "--out", out,
                     "--sc-per-question", "gsm8k=2, gsm=3"])


def test_out_of_memory_says_which_flag_to_lower(tiny, tmp_path, monkeypatch, capsys):
    """Each script, run as a script (its __main__ block), turns a GPU out-of-memory error into one message:
    torch's, then the flags that lower that script's memory. Loading the weights raises it here."""
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(modeling, "load_weights", oom)
    for name, argv, flag in [
            ("scdpo.py", train_argv(tiny[1], tiny[2], str(tmp_path / "run")), "lower --micro-batch"),
            ("sample.py", ["pairs", "--model", tiny[1], "--data", "gsm8k:test", "--out", str(tmp_path / "p")],
             "lower --chunk"),
            ("eval.py", ["--model", tiny[1], "--data", "gsm8k"], "lower --batch-size")]:
        monkeypatch.setattr(sys, "argv", [name, *argv])
        with pytest.raises(SystemExit) as exit:
            runpy.run_path(os.path.join(ROOT, name), run_name="__main__")
        err = capsys.readouterr().err
        assert exit.value.code == 1 and err.startswith("error: CUDA out of memory. Tried to allocate 2.00 GiB\n"
                                                       f"out of memory: {flag}"), (name, err)


def test_an_unexpected_error_keeps_its_traceback():
    def main(argv):
        return {}["no such key"]
    with pytest.raises(KeyError):
        modeling.run_main(main)


# ----------------------------------------------------------------------------------------------
# 9. Help and progress output
# ----------------------------------------------------------------------------------------------
def test_pairs_help_describes_the_command(capsys):
    with pytest.raises(SystemExit):
        sample.main(["pairs", "--help"])
    text = capsys.readouterr().out
    assert "The pipeline (METHOD.md sections 1-2), per question" in text and "--restart" in text


def test_processbench_evaluation_shows_progress(tiny, capsys):
    evaluation.main(["--model", tiny[1], "--ref", tiny[1], "--processbench", "gsm8k", "--limit", "2"])
    captured = capsys.readouterr()
    assert "ProcessBench gsm8k: n=2" in captured.out
    assert "policy log-probs: 100%" in captured.err and "reference log-probs: 100%" in captured.err


def test_accuracy_evaluation_shows_progress(tiny, capsys):
    evaluation.main(["--model", tiny[1], "--data", "gsm8k", "--limit", "3", "--max-new-tokens", "4",
                     "--batch-size", "2"])
    captured = capsys.readouterr()
    assert "accuracy" in captured.out and "on gsm8k" in captured.out
    assert "greedy decoding: 100%" in captured.err and "3/3" in captured.err
