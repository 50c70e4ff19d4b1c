"""A hub folder's tokenizer: tokenizer.json through `tokenizers`, the special tokens of
tokenizer_config.json, and the chat template through jinja2, as apply_chat_template renders it, without
transformers. tests/test_tokenizer.py compares the ids with transformers' on real tokenizers.
"""
import json
import os
import sys
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers


# The template for tokenizers that ship none (base models such as Mistral-7B-v0.1):
#   {bos}Question: {question}\n\nAnswer:\n{answer}{eos}
# A newline ends the prompt, not a space: SentencePiece and byte-level BPE
# glue a space to the next word ("▁The"): "Answer: " would end mid-token.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Answer:\\n' + message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('the plain chat template knows the roles system, user and assistant, "
    "not ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer:\\n' }}{% endif %}"
)

# MetaMath-Mistral-7B's prompt (the paper's chain-of-thought model), which its hub folder does not ship:
# Alpaca's instruction format ending in "Let's think step by step.", as MetaMath's evaluation scripts
# write it. Saved in a model folder as chat_template.jinja (README: "Data files"), every stage uses it.
# The space after BOS: MetaMath tokenised text, to which SentencePiece prepends "▁" ("▁Below"); text
# after a special token gets none, and "<s>Below" would be "Bel", "ow".
METAMATH_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ ' Below is an instruction that describes a task. Write a response "
    "that appropriately completes the request.\\n\\n### Instruction:\\n' + message['content'] + "
    "'\\n\\n### Response:' }}"
    "{% elif message['role'] == 'assistant' %}{{ \" Let's think step by step.\" + message['content'] }}"
    "{{ eos_token }}"
    "{% else %}{{ raise_exception('the MetaMath template knows the roles user and assistant, not ' + "
    "message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ \" Let's think step by step.\" }}{% endif %}"
)

_WARNED = set()   # the chat templates check_prompt_prefix has warned about


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' assistant mask: renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def compile_chat_template(template):
    """The jinja environment of transformers' apply_chat_template (its tojson escapes no HTML)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _remote_tokenizer_classes(config):
    """Tokenizer classes (less "Fast") only remote code defines: those auto_map names, and InternLM2's,
    which folders that older versions of this file saved without auto_map still name."""
    auto = config.get("auto_map")
    auto = auto.get("AutoTokenizer") if isinstance(auto, dict) else auto
    names = [auto] if isinstance(auto, str) else auto if isinstance(auto, (list, tuple)) else []
    remote = {n.rsplit(".", 1)[-1].removesuffix("Fast") for n in names if isinstance(n, str)}
    return remote | {"InternLM2Tokenizer"}


def _token_content(value):
    # tokenizer_config.json writes a special token as a string or as {"content": ..., "lstrip": ...}
    return value.get("content") if isinstance(value, dict) else value


def read_json(file):
    """A hub folder's JSON file; a decoding error names the file (and line)."""
    with open(file, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{file}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    except json.JSONDecodeError as e:   # says line and column
        raise ValueError(f"{file}: not valid JSON: {e}") from None


class Tokenizer:
    """Nothing adds special tokens silently: BOS/EOS appear exactly where the template writes them,
    as text ("<s>") that tokenizer.json maps to their ids."""

    def __init__(self, tokenizer, config, chat_template=None):
        self.tok = tokenizer          # a tokenizers.Tokenizer
        self.config = config          # tokenizer_config.json as read (plus special_tokens_map.json)
        self.has_chat_template = chat_template is not None
        self.chat_template = chat_template if chat_template is not None else PLAIN_CHAT_TEMPLATE
        self._template = compile_chat_template(self.chat_template)
        # The template's variables: every "*_token" string the config sets, as transformers 5 does.
        self.special_tokens = {k: _token_content(v) for k, v in config.items()
                               if k.endswith("_token") and isinstance(_token_content(v), str)}
        extra = config.get("extra_special_tokens")   # transformers 5's named extra tokens
        if isinstance(extra, dict):
            self.special_tokens.update({k: _token_content(v) for k, v in extra.items()})
        for name in ("bos_token", "eos_token", "pad_token"):
            if name in self.special_tokens and tokenizer.token_to_id(self.special_tokens[name]) is None:
                raise ValueError(f"tokenizer_config.json sets {name}={self.special_tokens[name]!r}, "
                                 f"which is not a token of tokenizer.json")
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        # Padding is masked out, so any id serves; EOS when no pad token is named.
        pad = self.special_tokens.get("pad_token")
        self.pad_id = tokenizer.token_to_id(pad) if pad else self.eos_id
        # Ids can have holes (added tokens past the base vocabulary), so count up to the largest id.
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_pretrained(cls, path):
        """A hub folder's tokenizer (special_tokens_map.json and chat_template.jinja are optional)."""
        path = os.fspath(path)
        tok_file, cfg_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
        if not os.path.isfile(tok_file):
            if os.path.isfile(os.path.join(path, "tokenizer.model")):
                # InternLM2 ships this way; converting needs sentencepiece and protobuf (not our deps)
                raise FileNotFoundError(
                    f"{tok_file} not found: {path} has only a SentencePiece tokenizer.model. Write "
                    f"tokenizer.json once with transformers (pip install transformers sentencepiece "
                    f"protobuf):\n"
                    f"  python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained("
                    f"'{path}', trust_remote_code=True, use_fast=True).save_pretrained('{path}')\"")
            raise FileNotFoundError(f"{tok_file} not found: a tokenizer folder needs tokenizer.json and "
                                    f"tokenizer_config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{cfg_file} not found: it names the special tokens (BOS, EOS) and the "
                                    f"chat template")
        tok, config = tokenizers.Tokenizer.from_file(tok_file), read_json(cfg_file)
        # special_tokens_map.json (older checkpoints) fills in special tokens the config leaves unset.
        map_file = os.path.join(path, "special_tokens_map.json")
        if os.path.isfile(map_file):
            for k, v in read_json(map_file).items():
                if k.endswith("_token") and config.get(k) is None:
                    config[k] = v
        # Added tokens tokenizer.json lacks, or holds as plain vocab ("<s>" would split into "<", "s", ">")
        have = tok.get_added_tokens_decoder()
        for idx, spec in config.get("added_tokens_decoder", {}).items():
            idx = int(idx)
            if idx in have and have[idx].content == spec["content"]:
                continue
            special = spec.get("special", False)
            added = tokenizers.AddedToken(spec["content"], single_word=spec.get("single_word", False),
                                          lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                                          normalized=spec.get("normalized", not special), special=special)
            (tok.add_special_tokens if special else tok.add_tokens)([added])
            if tok.token_to_id(spec["content"]) != idx:
                raise ValueError(f"{cfg_file} declares token {spec['content']!r} with id {idx}, but "
                                 f"tokenizer.json gives it id {tok.token_to_id(spec['content'])}")
        # The chat template: chat_template.jinja (what transformers >= 4.50 writes) wins over the
        # config's "chat_template", which is a string or a list of named templates.
        template = config.get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        tokenizer = cls(tok, config, template)
        tokenizer.check_prompt_prefix(path)
        return tokenizer

    def apply_chat_template(self, messages, add_generation_prompt=False, **kwargs):
        """The text of a conversation, exactly as transformers' apply_chat_template(tokenize=False)."""
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     **{**self.special_tokens, **kwargs})

    def render_prompt(self, question, prefix=""):
        """The user turn, the generation prompt, then `prefix` (a step-controlled pair's first k steps)
        opening the assistant turn: for our templates a prefix of render()'s text (test_tokenizer.py)."""
        user = [{"role": "user", "content": question}]
        return self.apply_chat_template(user, add_generation_prompt=True) + prefix

    def check_prompt_prefix(self, where):
        """Warn once for a template whose finished conversation is not render_prompt(q) + answer + close:
        DeepSeek-Math-Instruct's puts "Assistant: " after a prompt ending in "Assistant:", Mistral v0.3's
        " " + answer|trim. Sampling and training agree anyway: both use prompt + solution as written."""
        question, answer = "What is 1+1?", "1+1 = 2.\nThe answer is 2."
        try:
            prompt, full = self.render_prompt(question), self.render(question, answer)
        except jinja2.exceptions.TemplateError:
            return   # a template that refuses this conversation fails, loudly, where it is used
        if full.startswith(prompt + answer) or self.chat_template in _WARNED:
            return
        _WARNED.add(self.chat_template)
        at = full.find(answer, len(prompt)) if full.startswith(prompt) else -1
        what = (f"writes {full[len(prompt):at]!r} between the generation prompt and the answer" if at >= 0
                else "renders a finished conversation that does not start with its generation prompt")
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"warning: {where}: the chat template {what}, so its text of a whole conversation is not "
                  f"what training sees: training rows are the generation prompt followed by the solution "
                  f"as written", file=sys.stderr, flush=True)

    def render(self, question, answer):
        """The whole conversation, the answer closed by the template (EOS or an end-of-turn token)."""
        return self.apply_chat_template([{"role": "user", "content": question},
                                         {"role": "assistant", "content": answer}])

    @property
    def stop_ids(self):
        """Ids that end a turn: EOS, and a special token the template puts after the answer (<|im_end|>)."""
        marker = "\x00ANSWER\x00"
        full = self.render("?", marker)
        after = self.encode(full[full.index(marker) + len(marker):])
        added = self.tok.get_added_tokens_decoder().values()
        special = {self.tok.token_to_id(t.content) for t in added if t.special}
        ids = [] if self.eos_id is None else [self.eos_id]
        if after and after[0] in special and after[0] not in ids:
            ids.append(after[0])
        return ids

    @property
    def end_id(self):
        """The id training appends after an answer: the template's end-of-turn token where it has one
        (ChatML's <|im_end|> even where EOS is <|endoftext|>, as in base models' configs), else EOS."""
        return self.stop_ids[-1] if self.stop_ids else None

    def encode(self, text):
        """Ids of `text`, adding no special tokens (special tokens written in the text are found)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text):
        """(ids, offsets): offsets[i] = (start, end), the characters of `text` that token i covers."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_prompt_response(self, prompt_text, response_text):
        """(ids, n_prompt): prompt_text + response_text tokenized ONCE (halves tokenized apart give
        ids generation never makes). A token straddling the boundary ("▁The" after a trailing space)
        is response, so the loss keeps its first token; our prompts end in a newline, never straddled."""
        ids, offsets = self.encode_with_offsets(prompt_text + response_text)
        n_prompt = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt_text)), len(ids))
        return ids, n_prompt

    def save_pretrained(self, path):
        """Files loadable here and by transformers, with the chat template in use (the plain one too), so
        it renders what training saw. "auto_map" names remote code not copied: it is dropped, and a
        remote-code class (InternLM2's) becomes PreTrainedTokenizerFast, which reads tokenizer.json."""
        os.makedirs(path, exist_ok=True)
        self.tok.save(os.path.join(path, "tokenizer.json"))
        config = {**{k: v for k, v in self.config.items() if k != "auto_map"}, **self.special_tokens,
                  "chat_template": self.chat_template}
        if str(config.get("tokenizer_class")).removesuffix("Fast") in _remote_tokenizer_classes(self.config):
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
