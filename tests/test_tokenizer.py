# python -m pytest -q tests/test_tokenizer.py
# tokenizer.Tokenizer against transformers' AutoTokenizer + apply_chat_template (the reference), on the
# real Mistral-7B-v0.1 tokenizer (SentencePiece-style BPE; no chat template, so our plain one, or the
# instruct model's [INST] template) and on small byte-level BPE tokenizers trained here with ChatML
# (Qwen2.5's) and Llama-3-Instruct's special tokens and templates.
import json
import os
import shutil

import jinja2
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import data
from conftest import DATA
import tokenizer as tokenizing
from tokenizer import PLAIN_CHAT_TEMPLATE, Tokenizer

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

# Llama-3-Instruct's template (the 3.0 one: 3.1's adds tools and a dated system prompt around the same turns).
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Mistral-7B-Instruct-v0.2's: [INST] turns, no generation-prompt branch, roles must alternate.
MISTRAL_INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# DeepSeek-Math-Instruct's: the generation prompt ends in "Assistant:", an answer is "Assistant: " + answer.
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# InternLM2-Chat's: ChatML turns after BOS.
INTERNLM2_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + "
                      "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                      "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

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


def _bpe_dir(d, special, **config):
    """A ~1000-token byte-level BPE tokenizer (as Qwen2's and Llama 3's) with `special` tokens, written as
    the hub would: tokenizer.json + tokenizer_config.json (`config` over the usual keys)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=1000, special_tokens=special, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **config,
        "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                                           "rstrip": False, "single_word": False, "special": True}
                                 for t in special},
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return str(d)


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """ChatML special tokens as Qwen2.5's: bos_token null, eos <|im_end|>, pad <|endoftext|>."""
    return _bpe_dir(tmp_path_factory.mktemp("chatml"), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """Llama 3's special tokens, with the base model's eos <|end_of_text|> (the instruct turns end in <|eot_id|>)."""
    d = _bpe_dir(tmp_path_factory.mktemp("llama3"), ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                     "<|end_header_id|>", "<|eot_id|>"],
                 bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE)
    return Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def mistral_instruct(tmp_path_factory):
    """The real Mistral-7B tokenizer with the instruct model's template."""
    d = tmp_path_factory.mktemp("mistral-instruct")
    shutil.copy(os.path.join(MISTRAL, "tokenizer.json"), d)
    cfg = json.load(open(os.path.join(MISTRAL, "tokenizer_config.json")))
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": MISTRAL_INSTRUCT_TEMPLATE}))
    return Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d)


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


# MetaMath's evaluation prompt, as its eval_gsm8k.py and eval_math.py write it (meta-math/MetaMath).
METAMATH_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response: Let's think step by step.")


def test_metamath_template_renders_metamaths_prompt(mistral, tmp_path, capsys):
    """tokenizer.METAMATH_CHAT_TEMPLATE, saved as chat_template.jinja beside MetaMath-Mistral-7B's tokenizer
    (Mistral's): the prompt is MetaMath's text, its ids those transformers' tokenizer gives that text (BOS
    first and "▁Below", as MetaMath trained and vLLM feeds it), the whole conversation is the prompt + answer + EOS, as transformers renders it."""
    _, hf = mistral
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(MISTRAL, f), tmp_path / f)
    (tmp_path / "chat_template.jinja").write_text(tokenizing.METAMATH_CHAT_TEMPLATE)
    ours = Tokenizer.from_pretrained(str(tmp_path))
    question, answer = "Janet has 3 ducks. How many legs do they have?", "\n3 * 2 = 6\nThe answer is: 6"
    prompt = ours.render_prompt(question)
    assert prompt == "<s> " + METAMATH_PROMPT.format(instruction=question)
    assert ours.encode(prompt) == hf(METAMATH_PROMPT.format(instruction=question))["input_ids"]
    for conv, gen in (([{"role": "user", "content": question}], True),
                      ([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], False)):
        text, ids = _reference(hf, conv, gen, template=tokenizing.METAMATH_CHAT_TEMPLATE)
        assert ours.apply_chat_template(conv, add_generation_prompt=gen) == text and ours.encode(text) == ids
    assert ours.render(question, answer) == prompt + answer + "</s>" and ours.stop_ids == [2]
    ours.check_prompt_prefix("test")
    assert capsys.readouterr().err == ""   # training rows are prompt + solution: no warning


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chatml_template_matches_transformers(chatml, conv, gen):
    ours, hf = chatml
    assert ours.has_chat_template and ours.bos_id is None
    text, ids = _reference(hf, CONVERSATIONS[conv], gen)
    assert ours.apply_chat_template(CONVERSATIONS[conv], add_generation_prompt=gen) == text
    assert ours.encode(text) == ids
    assert ours.tok.token_to_id("<|im_start|>") in ids


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("conv", range(2))   # the third has a system turn, which Mistral's template refuses
@pytest.mark.parametrize("which", ["llama3", "mistral_instruct"])
def test_llama3_and_mistral_instruct_templates_match_transformers(which, conv, gen, request):
    ours, hf = request.getfixturevalue(which)
    text, ids = _reference(hf, CONVERSATIONS[conv], gen)
    assert ours.apply_chat_template(CONVERSATIONS[conv], add_generation_prompt=gen) == text
    assert ours.encode(text) == ids and ids[0] == ours.bos_id


def test_mistral_instruct_refuses_what_its_template_refuses(mistral_instruct):
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        mistral_instruct[0].apply_chat_template(CONVERSATIONS[2])


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


@pytest.mark.parametrize("which", ["mistral", "chatml", "llama3", "mistral_instruct"])
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


def test_llama3_and_mistral_instruct_stop_at_the_end_of_the_assistant_turn(llama3, mistral_instruct):
    ours, _ = llama3
    eot, end = ours.tok.token_to_id("<|eot_id|>"), ours.tok.token_to_id("<|end_of_text|>")
    assert (ours.bos_id, ours.eos_id) == (ours.tok.token_to_id("<|begin_of_text|>"), end)
    assert ours.stop_ids == [end, eot] and ours.end_id == eot
    pair = {"id": "q", "question": "What is 1+1?", "prefix": "", "chosen": "2", "rejected": "3", "kind": "naive"}
    assert data.tokenize_pair(pair, ours, max_len=256, max_prompt_len=200)["chosen"][-1] == eot
    ours, _ = mistral_instruct
    assert ours.stop_ids == [2] and ours.end_id == 2


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


def test_saved_plain_template_renders_in_transformers_what_training_saw(mistral, tmp_path):
    # A base model trains with the plain template; the export must carry it, or transformers'
    # apply_chat_template on the exported tokenizer has no template at all.
    ours, _ = mistral
    assert not ours.has_chat_template
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for conv in CONVERSATIONS:
        for gen in (False, True):
            text, ids = _reference(hf, conv, gen)
            assert text == ours.apply_chat_template(conv, add_generation_prompt=gen)
            assert ids == ours.encode(text)


@pytest.mark.parametrize("auto_map", [True, False])   # False: a folder saved by older versions of ours
def test_saved_remote_code_tokenizer_loads_in_transformers(auto_map, tmp_path):
    # InternLM2's tokenizer_config names its own class, defined by remote code that the export does not
    # carry: the export must name a class transformers has.
    remote = {"auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                             "tokenization_internlm2_fast.InternLM2TokenizerFast"]}}
    d = tmp_path / "internlm2"
    d.mkdir()
    _bpe_dir(d, ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"], bos_token="<s>", eos_token="</s>",
             unk_token="<unk>", pad_token="</s>", tokenizer_class="InternLM2Tokenizer",
             chat_template=INTERNLM2_TEMPLATE, **(remote if auto_map else {}))
    ours = Tokenizer.from_pretrained(d)
    ours.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "auto_map" not in cfg and hasattr(transformers, cfg["tokenizer_class"])
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for conv in CONVERSATIONS:
        text, ids = _reference(hf, conv, True)
        assert text == ours.apply_chat_template(conv, add_generation_prompt=True) and ids == ours.encode(text)
    # and a class transformers has is kept (DeepSeek-Math's)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "LlamaTokenizerFast"}))
    Tokenizer.from_pretrained(d).save_pretrained(tmp_path / "kept")
    assert json.loads((tmp_path / "kept" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "LlamaTokenizerFast"


def test_template_that_writes_text_before_the_answer_warns_once(chatml_dir, tmp_path, capsys, monkeypatch):
    # DeepSeek-Math-Instruct's template renders "Assistant: " + answer after a generation prompt that
    # ends in "Assistant:": its whole conversation is not render_prompt + answer + its closing.
    monkeypatch.setattr(tokenizing, "_WARNED", set())   # the template has not been seen
    d = tmp_path / "deepseek"
    d.mkdir()
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    _bpe_dir(d, [bos, eos], bos_token=bos, eos_token=eos, chat_template=DEEPSEEK_TEMPLATE)
    capsys.readouterr()
    ours = Tokenizer.from_pretrained(d)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and str(d) in err and "writes ' ' between the generation prompt" in err
    assert ours.render_prompt("q").endswith("Assistant:")
    assert ours.render("q", "a").endswith("Assistant: a" + eos)
    Tokenizer.from_pretrained(d)
    assert capsys.readouterr().err == ""   # once
    for folder in (chatml_dir, MISTRAL):   # ChatML and the plain template: nothing to say
        Tokenizer.from_pretrained(folder)
        assert capsys.readouterr().err == ""


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
