# python -m pytest -q tests/test_sample.py
"""The sampler against independent references (a full forward per token, float64 probabilities,
chi-square on sampled counts), the temperature ramp and code blocks on a scripted model (the sandbox
itself: tests/test_sandbox.py)."""
import os

import numpy as np
import pytest
import torch

import data
from model import ModelArgs, Tokenizer, Transformer
from conftest import HostReads, byte_tokenizer
from sample import Sampling, generate, logits_to_probs, sample, sample_solutions


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab=64, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, eos_token_id=None)
    return Transformer(ModelArgs(**{**args, **kw})).eval()


def ids(model, prompts, new, n=1, seed=None, eos_id=None, **cfg):
    """generate()'s token ids per row, decoding as `cfg` says (greedy by default)."""
    return [r.ids for r in generate(model, prompts, Sampling(new, **cfg), n=n, seed=seed, eos_id=eos_id)]



def test_no_prompts_sample_nothing():
    # a pair stage can have no questions left (e.g. the miniature's hot-naive control with no
    # step-controlled pairs): nothing to sample, not an error
    assert ids(tiny(), [], 4) == [] and ids(tiny(), [], 4, n=3, temperature=1.0) == []

def full_forward_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
def test_greedy_ragged_equals_full_forward_argmax():
    model = tiny()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13], [14, 15]]
    assert ids(model, prompts, 16) == [full_forward_greedy(model, p, 16) for p in prompts]


def test_rows_stop_at_eos_and_the_rest_go_on():
    model = tiny()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [13]]
    ref = [full_forward_greedy(model, p, 12) for p in prompts]
    eos = ref[1][3]   # row 1 ends after 4 tokens; the others end at their first `eos` or run to the limit
    out = ids(model, prompts, 12, eos_id=eos)
    for o, r in zip(out, ref):
        assert o == (r[:r.index(eos) + 1] if eos in r else r)
    assert len(out[1]) <= 4


def test_shared_prompt_reuse_equals_separate_prefills():
    model = tiny()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    shared = ids(model, prompts, 10, temperature=1.0, top_k=20, seed=7, n=4)
    separate = ids(model, [p for p in prompts for _ in range(4)], 10, temperature=1.0, top_k=20, seed=7)
    assert shared == separate
    assert ids(model, prompts, 10, temperature=1.0, seed=7, n=4) == ids(model, prompts, 10, temperature=1.0, seed=7, n=4)
    assert len({tuple(r) for r in shared}) > 2   # samples differ from one another


@pytest.mark.parametrize("static", [False, True])
def test_rows_ending_at_different_steps_equal_their_full_forward_references(static):
    # 12 rows that end one after another, so that the finished ones are skipped, then compacted away (the
    # live rows fall to half and below while others still run); every row must equal its own reference.
    # static: the finished rows go on decoding instead (Sampling.static), unread.
    model = tiny(seed=3)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 12, (12,), generator=g).tolist()
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in lengths]
    ref = [full_forward_greedy(model, p, 24) for p in prompts]
    eos = sorted({r[k] for r, k in zip(ref, [2, 5, 9, 13, 17, 20])})
    ends = sorted(next((k + 1 for k, t in enumerate(r) if t in eos), 24) for r in ref)
    assert ends[5] < ends[-1] and len(set(ends)) > 4   # half of them end while the longest goes on
    out = ids(model, prompts, 24, eos_id=eos, static=static)
    for o, r in zip(out, ref):
        k = next((k + 1 for k, t in enumerate(r) if t in eos), 24)
        assert o == r[:k]


def test_static_steps_have_one_shape_and_sample_as_the_plain_sampler():
    """Sampling(static=True), the step a GPU captures as one CUDA graph: every decode step's forward gets
    the same shapes (all rows, all slots, the slot a tensor) while rows finish, and it samples what the
    plain sampler samples for the same seed (n=3 samples of ragged prompts, top-p, a row ending at EOS)."""
    model = tiny(seed=1)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [13]]
    cfg = dict(temperature=1.0, top_p=0.9, seed=3, n=3)
    plain = ids(model, prompts, 16, **cfg)
    eos = plain[4][5]   # row 4 ends at its 6th token, and the others wherever they meet it
    plain = ids(model, prompts, 16, eos_id=eos, **cfg)
    assert len(set(map(len, plain))) > 2
    shapes, forward = [], model.forward

    def record(input_ids, positions=None, mask=None, cache=None, cache_pos=0, **kw):
        if torch.is_tensor(cache_pos):
            shapes.append((input_ids.shape, positions.shape, mask.shape, cache_pos.shape))
        return forward(input_ids, positions, mask, cache, cache_pos, **kw)
    model.forward = record
    assert ids(model, prompts, 16, eos_id=eos, static=True, **cfg) == plain
    assert len(shapes) == 15 and len(set(shapes)) == 1, set(shapes)   # 15 decode steps after the prefill
    (tok, pos, mask, slot), = set(shapes)
    assert tok == pos == (9, 1) and mask[:2] == (9, 1) and slot == (1,)
    with pytest.raises(ValueError, match="static decoding does not run code"):
        ids(model, prompts, 4, static=True, fmt="code")


@pytest.mark.parametrize("cfg", [dict(), dict(temperature=0.9, top_k=20, top_p=0.9), dict(static=True)])
def test_a_plain_decode_step_reads_the_device_once(cfg):
    # Llama 3's RoPE scaling too: the forward's length check must not read positions back
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model = tiny(rope_scaling=scaling)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [13]]
    counts = []
    for new in (8, 40):
        with HostReads() as reads:
            ids(model, prompts, new, eos_id=[], seed=0, **cfg)
        counts.append(reads.n)
    assert counts[1] - counts[0] == 40 - 8, counts   # one per decode step


def reference_probs(logits, T, top_k=0, top_p=1.0):
    """float64, one row at a time, written from the definitions."""
    out = []
    for row in logits.double().numpy():
        z = row / T
        if top_k:
            z = np.where(z >= np.sort(z)[::-1][top_k - 1], z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p < 1:
            order, keep, mass = np.argsort(-p, kind="stable"), np.zeros_like(p, dtype=bool), 0.0
            for i in order:   # smallest set of most likely tokens whose mass reaches top_p
                keep[i], mass = True, mass + p[i]
                if mass >= top_p:
                    break
            p = np.where(keep, p, 0.0)
            p /= p.sum()
        out.append(p)
    return np.array(out)


@pytest.mark.parametrize("T,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.9, 8, 0.6)])
def test_logits_to_probs_matches_float64_reference(T, top_k, top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    got = logits_to_probs(logits, torch.full((6,), T), top_k, top_p).double().numpy()
    np.testing.assert_allclose(got, reference_probs(logits, T, top_k, top_p), atol=1e-6)


def test_sample_is_the_inverse_cdf_and_greedy_at_zero():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    T = torch.tensor([1.0, 0.0, 0.5])
    for u in (0.0, 0.3, 0.999999):
        got = sample(logits, T, torch.full((3,), u))
        cdf = reference_probs(logits, 1.0).cumsum(1)
        assert got[0] == np.searchsorted(cdf[0], u * cdf[0, -1], side="right")
        assert got[1] == logits[1].argmax()


def chi2_critical(df, z=3.09):
    """The chi-square value exceeded with probability 0.001 (z = 3.09), Wilson-Hilferty approximation
    (df 15: 37.7, exact 37.70; df 4: 18.4, exact 18.47)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@pytest.mark.parametrize("T,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 4, 1.0), (1.0, 0, 0.7)])
def test_sampled_counts_match_softmax(T, top_k, top_p):
    """End to end: 6000 one-token samples of one prompt against softmax(logits / T) (after top-k/top-p)
    computed in float64 from a full forward."""
    model = tiny(vocab=16, seed=3)
    prompt = [1, 5, 9, 2]
    p = reference_probs(model(torch.tensor([prompt]))[0, -1:].detach(), T, top_k, top_p)[0]
    N = 6000
    out = ids(model, [prompt], 1, temperature=T, top_k=top_k, top_p=top_p, seed=11, n=N)
    counts = np.bincount([o[0] for o in out], minlength=16)
    support = p > 0
    assert counts[~support].sum() == 0, "a token outside top-k/top-p was sampled"
    exp = N * p[support]
    chi2 = ((counts[support] - exp) ** 2 / exp).sum()
    assert chi2 < chi2_critical(int(support.sum()) - 1), (chi2, counts, exp)


# ---------------------------------------------------------------------------------------------
# A scripted model: its next token is script[position + 1], so its text is known in advance and
# the ramp's temperatures and the execution blocks can be checked exactly.
# ---------------------------------------------------------------------------------------------
class Scripted(torch.nn.Module):
    def __init__(self, script, vocab):
        super().__init__()
        self.inner, self.script, self.vocab = tiny(vocab=vocab), script, vocab
        self.output = self.Head(self)
        self.args = self.inner.args

    class Head(torch.nn.Module):
        def __init__(self, outer):
            super().__init__()
            self.weight, self.outer = torch.zeros(1), [outer]

        def forward(self, h):    # h: the position of each row's last token
            o = self.outer[0]
            nxt = torch.tensor([o.script[min(int(p) + 1, len(o.script) - 1)] for p in h[:, 0]])
            return torch.full((len(nxt), o.vocab), -30.0).scatter_(1, nxt[:, None], 30.0)

    def make_cache(self, *a, **k):
        return self.inner.make_cache(*a, **k)

    def rope_table(self, *a, **k):
        return self.inner.rope_table(*a, **k)

    def forward(self, ids, positions=None, mask=None, cache=None, cache_pos=0, return_hidden=False, rope=None):
        return positions[..., None].float()


@pytest.fixture(scope="module")
def btok(tmp_path_factory):
    return byte_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_ramp_changes_temperature_exactly_at_step_boundaries(btok):
    prompt_text = "<s>Question: go\n\nAnswer:\n"
    body = "One.\n\nTwo two.\n\nThree\n\n\n\nFour.\n\nFive.\n\nSix.\n\nSeven.\n\nEight."
    script = btok.encode(prompt_text + body) + [btok.eos_id]
    model = Scripted(script, btok.vocab_size)
    prompts = [btok.encode(prompt_text), btok.encode(prompt_text + "One.\n\nTw")]   # the second starts mid-solution
    for ramp in [(1.1, 0.05, 1.4), (1.1, 0.1, 1.4)]:
        rows = generate(model, prompts, Sampling(max_new_tokens=200, ramp=ramp), tok=btok, seed=0)
        for r, start in zip(rows, [0, len("One.\n\nTw")]):
            text = body[start:]
            assert btok.decode(r.ids) == text and r.finish == "eos"
            # expected: the temperature of the token at character i is ramp(j), j = delimiters completed before i
            j, expect = 0, []
            for i in range(len(text)):
                expect.append(round(min(ramp[0] + j * ramp[1], ramp[2]), 6))
                j += text[:i + 1].count("\n\n") - text[:i].count("\n\n")
            expect.append(round(min(ramp[0] + j * ramp[1], ramp[2]), 6))   # the EOS
            assert [round(t, 6) for t in r.temps] == expect
            assert r.steps == text.count("\n\n")


def test_ramp_with_line_delimiter_and_constant_temperature_without_ramp(btok):
    prompt_text = "<s>Question: go\n\nAnswer:\n"
    body = "a\nb\nc\nd"
    model = Scripted(btok.encode(prompt_text + body) + [btok.eos_id], btok.vocab_size)
    r = generate(model, [btok.encode(prompt_text)], Sampling(50, ramp=(1.0, 0.25, 1.5), delimiter="\n"), tok=btok)[0]
    assert [round(t, 6) for t in r.temps] == [1.0, 1.0, 1.25, 1.25, 1.5, 1.5, 1.5, 1.5]
    r = generate(model, [btok.encode(prompt_text)], Sampling(50, temperature=0.8), tok=btok)[0]
    assert set(r.temps) == {0.8}


def test_stop_string(btok):
    prompt_text = "<s>Question: go\n\nAnswer:\n"
    model = Scripted(btok.encode(prompt_text + "One.\n\nTwo.\n\nThree.") + [btok.eos_id], btok.vocab_size)
    texts = sample_solutions(model, btok, ["go"], Sampling(stop=("Two",), temperature=1.0), n=2)
    assert texts == [[("One.\n\n", "stop"), ("One.\n\n", "stop")]]
    rows = sample_solutions(model, btok, ["go"] * 3, Sampling(max_new_tokens=4, stop=("Two",)),
                            prefixes=["", "", "One.\n\nTwo.\n\n"])
    assert rows == [[("One.", "length")], [("One.", "length")], [("Thre", "length")]]
    assert sample_solutions(model, btok, ["go"], Sampling(stop=("Two",))) == [[("One.\n\n", "stop")]]
    assert sample_solutions(model, btok, ["go"]) == [[("One.\n\nTwo.\n\nThree.", "eos")]]


def test_code_blocks_run_in_one_kernel_per_row_and_outputs_are_appended(btok):
    prompt_text = "<s>Question: go\n\nAnswer:\n"
    S, E, OS, OE = data.CODE_START, data.CODE_END, data.OUTPUT_START, data.OUTPUT_END
    # the model never writes the outputs: where they go the script holds X's (same length)
    script_text = (f"Compute.\n{S}x = 6*7\nprint(x)\n{E}{OS}XX\n{OE}Then.\n{S}x + 1\n{E}{OS}XX\n{OE}"
                   "The answer is 43.")
    want = script_text.replace("XX", "42", 1).replace("XX", "43", 1)
    model = Scripted(btok.encode(prompt_text + script_text) + [btok.eos_id], btok.vocab_size)
    rows = generate(model, [btok.encode(prompt_text)] * 2, Sampling(300, ramp=(1.1, 0.1, 1.4), fmt="code"), tok=btok)
    for r in rows:
        assert btok.decode(r.ids) == want
        # steps completed: text->code, code end, (output), text->code, code end
        assert r.steps == 4
    assert data.split_steps(want, "code")[2] == f"{OS}42\n{OE}"



def test_code_blocks_close_where_split_steps_closes_them(btok):
    # a closing fence with trailing blanks closes (and runs) a block; "```" at the end of a code line does
    # not: the sampler and data.split_steps read the same blocks
    prompt_text = "<s>Question: go\n\nAnswer:\n"
    S, OS, OE = data.CODE_START, data.OUTPUT_START, data.OUTPUT_END
    script_text = f"A.\n{S}print(6*7)\n```  \n{OS}XX\n{OE}B.\n{S}print(1)```\n"
    model = Scripted(btok.encode(prompt_text + script_text) + [btok.eos_id], btok.vocab_size)
    r, = generate(model, [btok.encode(prompt_text)], Sampling(300, fmt="code"), tok=btok)
    text = btok.decode(r.ids)
    assert text == script_text.replace("XX", "42")   # the second block never closed: nothing ran
    assert [data.step_kind(s) for s in data.split_steps(text, "code")] == ["text", "code", "output", "text", "code"]

def test_incremental_detokenization_matches_decoding_in_context():
    """SentencePiece (Mistral's real tokenizer): leading spaces, byte-fallback pieces of multi-byte
    characters. The text the sampler sees (for boundaries and stop strings) must be the text in context."""
    from conftest import DATA
    from sample import _Row
    tok = Tokenizer.from_pretrained(os.path.join(DATA, "tokenizers", "mistral-7b-v0.1"))
    text = "Question: what is 3 × 4?\n\nAnswer:\nThe product is 12 — easy. 日本語 ok\n\n```python\nprint(3*4)\n```\n"
    ids = tok.encode(text)
    g = torch.Generator().manual_seed(0)
    for cut in [5, 9, 14]:
        ctx, gen = ids[:cut], ids[cut:] + torch.randint(3, 32000, (40,), generator=g).tolist()
        row = _Row(0, ctx[-6:])
        got = ""
        for i in gen:
            row.ids.append(i)
            got += row.detok(tok)
        want = tok.decode(ctx[-6:] + gen)[len(tok.decode(ctx[-6:])):]
        assert want.startswith(got) and len(want) - len(got) <= 4   # at most a held-back partial character
