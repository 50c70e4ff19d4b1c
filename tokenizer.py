"""The tokenizer of a hub folder: tokenizer.json through `tokenizers`, tokenizer_config.json's special
tokens, and the chat template through jinja2: transformers' apply_chat_template in a few lines, so that
neither transformers nor its tokenizer classes are needed. tests/test_tokenizer.py compares the ids with
transformers' on real tokenizers.
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
# The generation prompt ends in a newline, not in a space: SentencePiece and byte-level BPE glue a
# space to the word after it ("▁The"), so "Answer: " would end the prompt in the middle of the first
# response token. A system message, if any, comes first, then a blank line.
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


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant
    mask; some templates use it. Rendering only needs the body."""
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
    """The jinja environment of transformers' apply_chat_template: sandboxed, trim_blocks and
    lstrip_blocks, loop controls, a `tojson` that does not escape HTML, raise_exception, strftime_now."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


_WARNED = set()   # the chat templates check_prompt_prefix has warned about


def _remote_tokenizer_classes(config):
    """Names, without "Fast", of tokenizer classes that only remote code defines: those that config's
    auto_map names, and InternLM2's, which a folder saved without its auto_map (by older versions of
    this file) still names. transformers is no dependency of ours, so its list of classes is not at hand;
    InternLM2 is the one supported family whose tokenizer is remote code."""
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
    """tokenizer.json (through `tokenizers`) plus tokenizer_config.json's special tokens and chat
    template. Nothing adds special tokens silently: BOS/EOS appear exactly where the template writes
    them, as text ("<s>") that tokenizer.json maps to their ids."""

    def __init__(self, tokenizer, config, chat_template=None):
        self.tok = tokenizer          # a tokenizers.Tokenizer
        self.config = config          # tokenizer_config.json as read (plus special_tokens_map.json)
        self.has_chat_template = chat_template is not None
        self.chat_template = chat_template if chat_template is not None else PLAIN_CHAT_TEMPLATE
        self._template = compile_chat_template(self.chat_template)
        # The template's variables: every "*_token" string the config sets, as transformers 5 does.
        self.special_tokens = {k: _token_content(v) for k, v in config.items()
                               if k.endswith("_token") and isinstance(_token_content(v), str)}
        if isinstance(config.get("extra_special_tokens"), dict):  # transformers 5's named extra tokens
            extra = config["extra_special_tokens"]
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
        """A hub-format tokenizer folder: tokenizer.json and tokenizer_config.json, optionally
        special_tokens_map.json and chat_template.jinja."""
        path = os.fspath(path)
        tok_file, cfg_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
        if not os.path.isfile(tok_file):
            if os.path.isfile(os.path.join(path, "tokenizer.model")):
                # InternLM2 ships this way. Converting it needs `sentencepiece` and `protobuf`, which
                # we do not depend on; the message gives the one-line conversion.
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
        # Added tokens the config declares but tokenizer.json lacks (or holds only as ordinary vocab,
        # so that "<s>" in a rendered template would split into "<", "s", ">").
        have = tok.get_added_tokens_decoder()
        for idx, spec in config.get("added_tokens_decoder", {}).items():
            idx = int(idx)
            if idx in have and have[idx].content == spec["content"]:
                continue
            added = tokenizers.AddedToken(spec["content"], single_word=spec.get("single_word", False),
                                          lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                                          normalized=spec.get("normalized", not spec.get("special", False)),
                                          special=spec.get("special", False))
            (tok.add_special_tokens if spec.get("special", False) else tok.add_tokens)([added])
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

    # --- the chat template ---------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt=False, **kwargs):
        """The text of a conversation, exactly as transformers' apply_chat_template(tokenize=False)."""
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     **{**self.special_tokens, **kwargs})

    def render_prompt(self, question, prefix=""):
        """The question as the user turn, the generation prompt, then `prefix` (for a step-controlled
        pair: the first k solution steps) as the start of the assistant turn, left open. For the
        templates we support this is a prefix of the whole conversation's text (tests/test_tokenizer.py
        checks it), so prompt + continuation is what the model saw in sampling."""
        user = [{"role": "user", "content": question}]
        return self.apply_chat_template(user, add_generation_prompt=True) + prefix

    def check_prompt_prefix(self, where):
        """Warn (stderr, once per template) when the template's rendering of a finished conversation is
        not render_prompt(q) + answer + its closing: DeepSeek-Math-Instruct's writes "Assistant: " + answer
        after a generation prompt that ends in "Assistant:", Mistral-Instruct-v0.3's " " + answer|trim.
        Sampling and training both use the generation prompt followed by the solution as written, so
        they agree with each other; only the template's own text of the conversation differs."""
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
        """The whole conversation: question and the complete assistant answer, closed by the template
        (EOS or an end-of-turn token)."""
        return self.apply_chat_template([{"role": "user", "content": question},
                                         {"role": "assistant", "content": answer}])

    @property
    def stop_ids(self):
        """Ids that end an assistant turn: EOS, and the special token the template writes right after
        the assistant's text when that is another one (ChatML's <|im_end|>, Llama 3's <|eot_id|>)."""
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
        """The id that closes a complete answer, which training appends after it: the template's end-of-turn
        token where it has one (ChatML's <|im_end|> even when EOS is <|endoftext|>, as in base models'
        configs), else EOS."""
        return self.stop_ids[-1] if self.stop_ids else None

    # --- text <-> ids --------------------------------------------------------------------------
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
        """(ids, n_prompt) for prompt_text + response_text, tokenized ONCE (halves tokenized apart and
        glued give ids the model never sees when generating); ids[:n_prompt] is the prompt. A token
        that straddles the boundary (SentencePiece's "▁The" after a prompt ending in a space) counts
        as response: a prompt token lies wholly in prompt_text, so the response loss never loses its
        first token. Prompts that end in a newline, as all our templates' generation prompts do, have
        no straddling token."""
        ids, offsets = self.encode_with_offsets(prompt_text + response_text)
        n = len(prompt_text)
        n_prompt = next((i for i, (_, end) in enumerate(offsets) if end > n), len(ids))
        return ids, n_prompt

    def save_pretrained(self, path):
        """tokenizer.json and tokenizer_config.json (with the special tokens resolved), loadable here
        and by transformers. The chat template in use is written, the plain one too, so that the saved
        tokenizer renders what training saw. "auto_map" is dropped: it names remote-code files that are
        not copied; so a remote-code tokenizer class (InternLM2's) becomes PreTrainedTokenizerFast,
        which reads tokenizer.json as it is."""
        os.makedirs(path, exist_ok=True)
        self.tok.save(os.path.join(path, "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k != "auto_map"}
        config.update(self.special_tokens)
        config["chat_template"] = self.chat_template
        if str(config.get("tokenizer_class")).removesuffix("Fast") in _remote_tokenizer_classes(self.config):
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
