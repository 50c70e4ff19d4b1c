# python -m pytest -q tests/test_tokenizer.py
# model.Tokenizer against transformers' AutoTokenizer + apply_chat_template (the reference), on the
# real Mistral-7B-v0.1 tokenizer (SentencePiece-style BPE, no chat template: our plain one) and on a
# small byte-level BPE tokenizer trained here with a ChatML (Qwen2.5-style) template.
import json
import os
import shutil

import jinja2
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import data
from conftest import DATA
from model import PLAIN_CHAT_TEMPLATE, Tokenizer

import transformers  # the reference (tests/requirements.txt)

MISTRAL = os.path.join(DATA, "tokenizers", "mistral-7b-v0.1")

# Qwen2.5-Math's template without the tool-calling branch: a default system prompt, ChatML turns.
CHATML_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QUESTION = "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in total?"
STEPS = ["Natalia sold 48/2 = 24 clips in May.\n", "Natalia sold 48+24 = 72 clips altogether.\n", "#### 72"]
CONVERSATIONS = [
    [{"role": "user", "content": QUESTION}],
    [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "".join(STEPS)}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "Héllo <b>wörld</b>, 日本 \"quotes\"\n\n  spaces"}],
]


def _corpus():
    with open(os.path.join(DATA, "gsm8k", "train.jsonl")) as f:
        rows = [json.loads(next(f)) for _ in range(300)]
    return [r["question"] + "\n" + r["answer"] for r in rows] + ["Héllo wörld 日本 <b>"]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A ~1000-token byte-level BPE tokenizer (as Qwen2's) with ChatML special tokens, written as the hub
    would: tokenizer.json + tokenizer_config.json (bos_token null, eos <|im_end|>, pad <|endoftext|>)."""
    d = tmp_path_factory.mktemp("chatml")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=1000, special_tokens=special, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                                           "rstrip": False, "single_word": False, "special": True}
                                 for t in special},
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return str(d)


@pytest.fixture(scope="module")
def mistral():
    return Tokenizer.from_pretrained(MISTRAL), transformers.AutoTokenizer.from_pretrained(MISTRAL)


@pytest.fixture(scope="module")
def chatml(chatml_dir):
    return Tokenizer.from_pretrained(chatml_dir), transformers.AutoTokenizer.from_pretrained(chatml_dir)


def _reference(hf, messages, add_generation_prompt, template=None):
    kw = dict(chat_template=template, add_generation_prompt=add_generation_prompt)
    return (hf.apply_chat_template(messages, tokenize=False, **kw),
            hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_plain_template_matches_transformers(mistral, conv, gen):
    # transformers 5 refuses to render without a template, so it gets ours explicitly.
    ours, hf = mistral
    assert not ours.has_chat_template
    text, ids = _reference(hf, CONVERSATIONS[conv], gen, template=PLAIN_CHAT_TEMPLATE)
    assert ours.apply_chat_template(CONVERSATIONS[conv], add_generation_prompt=gen) == text
    assert ours.encode(text) == ids
    assert ids[0] == ours.bos_id == 1   # the template's "<s>" text is the BOS token, not "<", "s", ">"


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chatml_template_matches_transformers(chatml, conv, gen):
    ours, hf = chatml
    assert ours.has_chat_template and ours.bos_id is None
    text, ids = _reference(hf, CONVERSATIONS[conv], gen)
    assert ours.apply_chat_template(CONVERSATIONS[conv], add_generation_prompt=gen) == text
    assert ours.encode(text) == ids
    assert ours.tok.token_to_id("<|im_start|>") in ids


def test_jinja_environment_matches_transformers(chatml):
    # The features real templates lean on: tojson (no HTML escaping, keeps non-ASCII), loop controls,
    # namespace, trim_blocks / lstrip_blocks, special tokens as variables, raise_exception.
    ours, hf = chatml
    template = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ ns.n }}] {{ m | tojson }} {{ m.content | tojson(indent=2) }}
    {% if ns.n >= 2 %}{% break %}{% endif %}
{% endfor %}
{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}
{% if add_generation_prompt %}{% generation %}GEN{% endgeneration %}{% endif %}"""
    for conv in CONVERSATIONS:
        text, _ = _reference(hf, conv, True, template=template)
        assert compile_render(ours, template, conv) == text
    bad = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be the user') }}{% endif %}"
    with pytest.raises(jinja2.exceptions.TemplateError, match="first turn must be the user"):
        compile_render(ours, bad, CONVERSATIONS[2])


def compile_render(tok, template, messages):
    t = Tokenizer(tok.tok, tok.config, template)
    return t.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.parametrize("which", ["mistral", "chatml"])
def test_partial_assistant_turn_is_a_prefix_of_the_full_one(which, request):
    # render_prompt(q, first k steps) is a prefix of the whole conversation, in text AND in ids: the
    # prompt's tokens inside the full sequence are the tokens the sampler fed the model.
    ours, hf = request.getfixturevalue(which)
    full = ours.render(QUESTION, "".join(STEPS))
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "".join(STEPS)}]
    ref_text, ref_ids = _reference(hf, messages, False, template=None if ours.has_chat_template else PLAIN_CHAT_TEMPLATE)
    assert full == ref_text
    for k in range(len(STEPS) + 1):
        prompt = ours.render_prompt(QUESTION, "".join(STEPS[:k]))
        assert full.startswith(prompt), (k, prompt, full)
        ids, n_prompt = ours.encode_prompt_response(prompt, full[len(prompt):])
        assert ids == ref_ids
        assert ids[:n_prompt] == ours.encode(prompt)
        assert ours.decode(ids[n_prompt:], skip_special_tokens=False).strip() == full[len(prompt):].strip()
    # no prefix: the generation prompt transformers writes
    assert ours.render_prompt(QUESTION) == _reference(hf, messages[:1], True, None if ours.has_chat_template else PLAIN_CHAT_TEMPLATE)[0]


def test_boundary_token_straddling_prompt_and_response_counts_as_response(mistral):
    # SentencePiece glues a space to the next word: "Answer: " + "The" tokenizes as ... ":", "▁The",
    # and "▁The" starts inside the prompt. It is a response token (its characters are not all prompt).
    ours, _ = mistral
    prompt, response = "Question: 2+2?\n\nAnswer: ", "The answer is 4."
    ids, offsets = ours.encode_with_offsets(prompt + response)
    ids2, n_prompt = ours.encode_prompt_response(prompt, response)
    assert ids2 == ids
    straddler = next(i for i, (s, e) in enumerate(offsets) if s < len(prompt) < e)
    assert ours.tok.id_to_token(ids[straddler]) == "▁The"
    assert n_prompt == straddler
    assert all(e <= len(prompt) for _, e in offsets[:n_prompt])
    # and without a straddler the boundary is where the texts meet
    ids, n_prompt = ours.encode_prompt_response("Answer:\n", "The answer is 4.")
    assert ours.decode(ids[:n_prompt]) == "Answer:\n" and ours.decode(ids[n_prompt:]) == "The answer is 4."


def test_offsets_and_decode(mistral, chatml):
    for ours, _ in (mistral, chatml):
        text = "Question: Héllo 日本?\n\nAnswer:\n12 + 30 = 42"
        ids, offsets = ours.encode_with_offsets(text)
        assert len(ids) == len(offsets) and offsets[-1][1] == len(text)
        assert all(a[0] <= b[0] for a, b in zip(offsets, offsets[1:]))
        assert ours.decode(ids) == text
    ours, _ = mistral
    assert ours.decode(ours.encode("<s>Hi there</s>")) == "Hi there"
    assert ours.decode(ours.encode("<s>Hi there</s>"), skip_special_tokens=False) == "<s>Hi there</s>"


def test_special_tokens_and_stop_ids(mistral, chatml, chatml_dir, tmp_path):
    ours, _ = mistral
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 2, 32000)   # pad: EOS when unset
    assert ours.stop_ids == [2]
    ours, _ = chatml
    end, pad = ours.tok.token_to_id("<|im_end|>"), ours.tok.token_to_id("<|endoftext|>")
    assert (ours.eos_id, ours.pad_id, ours.stop_ids) == (end, pad, [end])
    # A base model's config (eos <|endoftext|>) still stops at the end of the assistant turn.
    d = tmp_path / "base"
    shutil.copytree(chatml_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|endoftext|>"}))
    base = Tokenizer.from_pretrained(d)
    assert base.stop_ids == [pad, end] and base.end_id == end == ours.end_id
    # and training closes a complete answer the way the template does, with <|im_end|>, not <|endoftext|>
    pair = {"id": "q", "question": "What is 1+1?", "prefix": "", "chosen": "2", "rejected": "3", "kind": "naive"}
    row = data.tokenize_pair(pair, base, max_len=256, max_prompt_len=200)
    assert row["chosen"][-1] == row["rejected"][-1] == end and data.tokenize_sft("Hi?", "2", base)["response"][-1] == end


def test_special_tokens_as_dicts_and_special_tokens_map(tmp_path):
    # Older checkpoints: tokens written as {"content": ...}, some only in special_tokens_map.json.
    shutil.copy(os.path.join(MISTRAL, "tokenizer.json"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<unk>", "eos_token": {"content": "</s>", "lstrip": False}}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token, tok.bos_id, tok.eos_token, tok.eos_id) == ("<s>", 1, "</s>", 2)
    assert tok.encode(tok.render_prompt("hi"))[0] == 1


def test_added_tokens_from_config_become_tokens(tmp_path, chatml_dir):
    # A tokenizer.json that holds "<|im_end|>" only as ordinary vocabulary would split it into bytes;
    # tokenizer_config.json's added_tokens_decoder makes it one token again, at its declared id.
    data = json.loads(open(os.path.join(chatml_dir, "tokenizer.json")).read())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|im_end|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    shutil.copy(os.path.join(chatml_dir, "tokenizer_config.json"), tmp_path)
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("<|im_end|>").ids != [2]
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode("a<|im_end|>b")[1] == tok.tok.token_to_id("<|im_end|>") == 2


@pytest.mark.parametrize("which", ["mistral", "chatml"])
def test_save_pretrained_round_trip(which, request, tmp_path):
    ours, _ = request.getfixturevalue(which)
    ours.save_pretrained(tmp_path)
    again, hf = Tokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    template = None if ours.has_chat_template else PLAIN_CHAT_TEMPLATE
    for conv in CONVERSATIONS:
        text, ids = _reference(hf, conv, True, template=template)
        assert again.apply_chat_template(conv, add_generation_prompt=True) == ours.apply_chat_template(conv, True) == text
        assert again.encode(text) == ours.encode(text) == ids
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(os.path.join(MISTRAL, "tokenizer.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer_config.json")):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_sentencepiece_only_checkpoint_says_how_to_convert(tmp_path):
    # InternLM2 ships a SentencePiece tokenizer.model and no tokenizer.json.
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x00")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "tokenizer.model" in msg and str(tmp_path / "tokenizer.json") in msg
    assert f"AutoTokenizer.from_pretrained('{tmp_path}', trust_remote_code=True" in msg
    assert f"save_pretrained('{tmp_path}')" in msg and "sentencepiece" in msg
