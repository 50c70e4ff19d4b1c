# Shared test set-up and stand-ins. Run the suite with: python -m pytest -q tests
import json
import os
import random
import shutil
import sys

import pytest

# Triton kernels run on the CPU through Triton's interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers  # noqa: E402

import data  # noqa: E402
from model import ModelArgs, Tokenizer, Transformer  # noqa: E402

SHARED = os.environ.get("SCDPO_SHARED", os.path.join(ROOT, "..", "shared"))
DATA = os.path.join(SHARED, "data")
MISTRAL = os.path.join(DATA, "tokenizers", "mistral-7b-v0.1")   # the real Mistral-7B tokenizer


@pytest.fixture
def one_thread():
    """Tiny models decode fastest on one thread; on a shared 2-core machine extra threads spin and wait.
    A test file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor's values on the host, or make a tensor from host values: each
    is a host-device synchronisation on a GPU (a CPU run calls the same functions)."""
    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero",
             "tensor", "as_tensor", "masked_select", "unique", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def byte_tokenizer(path):
    """A byte-level tokenizer without merges, saved in the hub's format: one token per byte, plus <s>
    and </s> (the plain chat template)."""
    alpha = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(alpha)}}
    t = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<s>", "</s>"])
    os.makedirs(path, exist_ok=True)
    t.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    return Tokenizer.from_pretrained(path)


def tiny_checkpoint(path, seed=0, tied=False, vocab=None, tokenizer="bytes"):
    """A tiny random hub checkpoint (2 layers of width 32) with a tokenizer: the byte tokenizer, or
    "mistral" (the real one, vocab 32000). Qwen2-shaped (qkv bias, tied embeddings) with tied=True,
    Llama-shaped otherwise. Returns (model, tokenizer)."""
    path = str(path)
    if tokenizer == "mistral":
        os.makedirs(path, exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(MISTRAL, f), os.path.join(path, f))
        tok = Tokenizer.from_pretrained(path)
    else:
        tok = byte_tokenizer(path)
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=vocab or tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate_size=64, max_seq_len=2048, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     model_type="qwen2" if tied else "llama", qkv_bias=tied, tie_embeddings=tied)
    m = Transformer(args)
    if tokenizer == "bytes":   # a wider init, so that 2 layers already make distinct predictions
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.2)
    m.save_pretrained(path)
    return m, tok


def toy_pairs(path, n=16, seed=0):
    """n toy arithmetic pairs written as JSONL, alternately naive and step-controlled (prefix: step 0)."""
    rng, pairs = random.Random(seed), []
    for i in range(n):
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        rec = {"id": f"q{i}", "source": "toy", "question": f"Ann has {a} bags of {b} nuts and {c} more. How many?",
               "gold": str(a * b + c)}
        s1 = f"{a}*{b}={a * b}\n\n"
        good = f"{a * b}+{c}={a * b + c}\n\nThe answer is {a * b + c}."
        bad = f"{a * b}+{c}={a * b + c + 1}\n\nThe answer is {a * b + c + 1}."
        if i % 2:
            pairs.append(data.make_pair(rec, good, bad, prefix=s1, k=0))
        else:
            pairs.append(data.make_pair(rec, s1 + good, f"{a}*{b}={a * b - 1}\n\n" + bad))
    data.write_jsonl(str(path), pairs)
    return str(path)
