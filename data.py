"""Data for Step-Controlled DPO: loading, step splitting, the pair filters of METHOD.md, pair
records (JSONL and TRL's format), tokenised training rows and batches.

Small functions, pure but for the file readers and writers; `sample.py pairs` strings them together.

Solution formats (`fmt`):
- "cot": chain of thought. A step is text up to and including a run of the delimiter: "\\n\\n"
  (paragraphs), "\\n" (lines), or "auto" (cot_delimiter: paragraphs where the solution has a blank
  line, else lines).
- "code": code-integrated. Blocks of text, code and execution output, fenced in markdown:

      Let me compute the sum.
      ```python
      print(sum(range(10)))
      ```
      ```output
      45
      ```
      The sum is $\\boxed{45}$.

  Each block is one step: text runs up to the next fence; a code block is CODE_START .. CODE_END,
  an execution block OUTPUT_START .. OUTPUT_END, fences and their newline included. Output blocks
  come from running the code, never from the model. The sampler uses these same constants.
"""
import glob
import hashlib
import json
import os
import re

import torch

from grade import extract_answer, hash_answer, is_equiv

CODE_START, CODE_END = "```python\n", "```\n"
OUTPUT_START, OUTPUT_END = "```output\n", "```\n"

# ----------------------------------------------------------------------------------------------
# Loading. A record: {id, source, question, gold}, plus solution / level / subject if present.
# Named sets and any other JSONL go through one reader, which finds fields by name.
# ----------------------------------------------------------------------------------------------
DATASETS = {"gsm8k:train": "gsm8k/train.jsonl", "gsm8k:test": "gsm8k/test.jsonl",
            "math:train": "math/train.jsonl", "math:test": "math/test.jsonl",
            "math:test500": "math/test500.jsonl", "svamp": "extra/svamp.jsonl",
            "asdiv": "extra/asdiv.jsonl", "mawps": "extra/mawps.jsonl"}
ALIASES = {"gsm8k": "gsm8k:test", "math": "math:test", "math500": "math:test500"}   # the test sets
# our field <- the first of these that the row has
FIELDS = {"question": ("question", "problem"), "gold": ("gold", "answer"), "solution": ("solution",),
          "id": ("id", "unique_id"), "level": ("level",), "subject": ("subject", "type")}


def data_root(root=None):
    """The shared data folder: `root`, else $SCDPO_DATA, else ../shared/data beside the repository."""
    here = os.path.dirname(os.path.abspath(__file__))
    return root or os.environ.get("SCDPO_DATA") or os.path.join(here, "..", "shared", "data")


def parse_record(row, where, source):
    """One record of a JSON object, its fields found through FIELDS. A GSM8K worked answer (ending
    '#### N') gives both the solution and the gold N. ValueError names `where` and the field."""
    def get(name):
        key = next((k for k in FIELDS[name] if k in row), None)
        if key is None:
            return None
        if not isinstance(row[key], (str, int, float)) or isinstance(row[key], bool):
            raise ValueError(f"{where}: field {key!r} is {type(row[key]).__name__}, expected text or a "
                             f"number")
        return str(row[key])
    rec = {"id": get("id"), "source": source, "question": get("question")}
    if rec["question"] is None:
        raise ValueError(f"{where}: missing field 'question' (or 'problem')")
    rec.update({k: v for k in ("solution", "level", "subject") if (v := get(k)) is not None})
    gold = get("gold")
    if gold is not None and "####" in gold and "solution" not in rec:   # GSM8K: the answer is worked out
        rec["solution"], gold = gold, None
    if gold is None:
        gold = hash_answer(rec.get("solution") or "")
        if gold is None:
            raise ValueError(f"{where}: missing field 'gold' or 'answer' (or a solution with a '#### N' "
                             f"line)")
        gold = gold.replace(",", "")
    rec["gold"] = gold
    return rec


def load_records(spec, limit=None, root=None):
    """Records of comma-separated sets: names of DATASETS or ALIASES, or JSONL paths (source = the
    file's name), each cut to its first `limit` records. Ids are "<source>/<id>" where a row has one,
    else "<set>/<record index>". A record with an empty gold answer cannot be graded (2 MATH train
    problems): it is left out, with a printed note."""
    records = []
    for part in spec.split(","):
        name = ALIASES.get(part, part)
        if name in DATASETS:
            path, source, tag = os.path.join(data_root(root), DATASETS[name]), name.split(":")[0], name
        elif part.endswith(".jsonl") or os.path.isfile(part):
            path = part
            source = tag = os.path.splitext(os.path.basename(part))[0]
        else:
            raise ValueError(f"unknown data set {part!r}: use one of {sorted(DATASETS) + sorted(ALIASES)} "
                             f"or a .jsonl path")
        if not os.path.isfile(path):
            where = ("; named sets are read from $SCDPO_DATA, else ../shared/data beside the repository"
                     if name in DATASETS else "")
            raise FileNotFoundError(f"{path}: not found (data set {part!r}){where}")
        recs = read_jsonl(path, lambda row, where: parse_record(row, where, source))
        if not recs:
            raise ValueError(f"{path}: no records (empty file); expected JSON lines with a question and a "
                             f"gold answer")
        for i, rec in enumerate(recs):
            rec["id"] = f"{source}/{rec['id']}" if rec["id"] else f"{tag.replace(':', '/')}/{i}"
        empty = [r["id"] for r in recs if not r["gold"].strip()]
        if empty and int(os.environ.get("RANK", 0)) == 0:   # once, not once a rank (a leaf: no print0)
            print(f"{path}: left out {len(empty)} records with an empty gold answer: {', '.join(empty)}")
        records += [r for r in recs if r["gold"].strip()][:limit]
    return records


def read_jsonl(path, check=None, torn=False):
    """Rows of a JSONL file (blank lines skipped). A line that is not UTF-8 or not a JSON object is a
    ValueError naming file and line. `check(row, "file:line")`, if given, returns the row to keep and
    may raise (see check_pair). A last line that lacks its newline and does not parse is the torn tail
    of a write killed midway: skipped with `torn` (for files a run appends to), else an error that
    says so."""
    rows = []
    with open(path, "rb") as f:   # bytes, so that a bad byte's line can be named
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                row = json.loads(line) if line.strip() else None
            except ValueError as e:   # UnicodeDecodeError or JSONDecodeError
                if torn and not raw.endswith(b"\n"):   # only the last line can lack one
                    break
                if isinstance(e, UnicodeDecodeError):
                    why = f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
                else:   # e.pos, not e.colno, which restarts at 1 past the line's newline
                    col = min(e.pos, len(line.rstrip("\n"))) + 1
                    why = f"not valid JSON ({e.msg.removesuffix(' at')} at column {col})"
                if not raw.endswith(b"\n"):
                    why += "; it is the last line and has no newline: torn by a write killed midway?"
                raise ValueError(f"{path}:{lineno}: {why}") from None
            if row is None:
                continue
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(check(row, f"{path}:{lineno}") if check else row)
    return rows


def write_text(path, text):
    """The one atomic writer: path.tmp written whole, synced, then renamed over path. A kill mid-write
    leaves the old file, never half a new one."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_jsonl(path, rows, append=False):
    """One JSON object a line. `append` adds to the end (resumable runs append question by question);
    otherwise write_text writes the file whole."""
    lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if append:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(lines)
        return
    write_text(path, "".join(lines))


def write_json(path, obj):
    """One JSON document, written by write_text."""
    write_text(path, json.dumps(obj, indent=1))


# ----------------------------------------------------------------------------------------------
# Steps. "".join(split_steps(s, fmt)) == s for every string s.
# ----------------------------------------------------------------------------------------------
# a block's closing fence: its own line, trailing blanks allowed (the sampler closes blocks by it too)
FENCE_CLOSE = re.compile(r"^```[ \t]*(?:\n|$)", re.M)


def cot_delimiter(solution):
    """The step delimiter a chain-of-thought solution uses: "\\n\\n" if it has a blank line inside,
    else "\\n". Models differ: Qwen2.5-Math writes a paragraph a step, MetaMath and GSM8K's solutions a
    line a step, which "\\n\\n" would leave as one step, with nowhere to cut."""
    return "\n\n" if "\n\n" in solution.strip() else "\n"


def split_steps(solution, fmt="cot", delim="\n\n"):
    """The steps of a solution. "cot": a step ends after a run of `delim` ("auto": cot_delimiter's)
    plus any further newlines; "code": text, code and execution blocks (see the module docstring).
    Whitespace-only pieces join the step before them (the first step keeps leading whitespace), so no
    step is blank."""
    if fmt == "cot":
        delim = cot_delimiter(solution) if delim == "auto" else delim
        cuts = [m.end() for m in re.finditer(f"(?:{re.escape(delim)})+\n*", solution)]
    elif fmt == "code":
        cuts, i = [], 0
        while i < len(solution):
            fence = solution.startswith(CODE_START, i) or solution.startswith(OUTPUT_START, i)
            if fence:  # a block runs to its closing fence line (to the end when unclosed)
                m = FENCE_CLOSE.search(solution, solution.index("\n", i) + 1)
                i = m.end() if m else len(solution)
            else:  # text runs to the next opening fence
                nxt = [j for j in (solution.find(CODE_START, i), solution.find(OUTPUT_START, i)) if j >= 0]
                i = min(nxt or [len(solution)])
            cuts.append(i)
    else:
        raise ValueError(f"unknown solution format {fmt!r}: expected 'cot' or 'code'")
    steps, start = [], 0
    for end in cuts + [len(solution)]:
        piece = solution[start:end]
        if not piece:
            continue
        if steps and not piece.strip():
            steps[-1] += piece
        elif steps and not steps[-1].strip():
            steps[-1] += piece
        else:
            steps.append(piece)
        start = end
    return steps


def step_kind(step):
    """'code', 'output' or 'text' (a code-integrated block; every chain-of-thought step is 'text')."""
    step = step.lstrip()  # a solution's leading whitespace stays with its first step
    return "code" if step.startswith(CODE_START) else "output" if step.startswith(OUTPUT_START) else "text"


def cut_points(steps, mode="paper"):
    """Steps k after which a step-controlled continuation may start: the prefix is steps[:k + 1].
    "paper": k in [0, m-1] (m = last step index); "scripts" (the authors' code): k in [1, m-2].
    Never after a code block: what follows it is its execution output, not the model's choice."""
    m = len(steps) - 1
    ks = range(0, m) if mode == "paper" else range(1, m - 1) if mode == "scripts" else None
    if ks is None:
        raise ValueError(f"unknown cut mode {mode!r}: expected 'paper' or 'scripts'")
    return [k for k in ks if step_kind(steps[k]) != "code"]


# ----------------------------------------------------------------------------------------------
# Filters (METHOD.md sections 1 and 2). As in the authors' scripts, a solution whose text holds
# "error" or "apolog" (any case) is never preferred: it shows a mistake, even a corrected one.
# ----------------------------------------------------------------------------------------------
ERROR_MARKERS = ("error", "apolog")
# exceptions by name: *Error, *Exception, and the few that are named otherwise (sys.exit() included)
_OTHER_EXCEPTIONS = "SystemExit|KeyboardInterrupt|GeneratorExit|StopIteration|StopAsyncIteration"
_EXEC_ERROR = re.compile(rf"Traceback \(most recent call last\)|\b\w*(?:Error|Exception)\b|[Tt]imed? ?out"
                         rf"|\b(?:{_OTHER_EXCEPTIONS})\b")


def has_exec_error(solution):
    """An execution block of a code-integrated solution reports an exception or a timeout."""
    return any(step_kind(s) == "output" and _EXEC_ERROR.search(s) for s in split_steps(solution, "code"))


def has_written_output(solution):
    """An execution block of a code-integrated solution that follows no code block: the model wrote it
    (only a CODE_START block runs, so not one fenced "```py"), and it shows nothing the code printed."""
    steps = split_steps(solution, "code")
    return any(step_kind(s) == "output" and (i == 0 or step_kind(steps[i - 1]) != "code")
               for i, s in enumerate(steps))


def judge(solution, gold, fmt="cot"):
    """(label, answer). label: 'preferred' (right answer, no marker, no execution error or written
    output),
    'dispreferred' (answer wrong or missing) or 'flawed' (right, but marked: on neither side of a
    pair). Chain-of-thought answers may fall back to the last math expression; code-integrated ones
    must be \\boxed or stated."""
    pred = extract_answer(solution, fallback=fmt == "cot")
    if not is_equiv(pred, gold):
        return "dispreferred", pred
    lower = solution.lower()
    if any(mark in lower for mark in ERROR_MARKERS) or (
            fmt == "code" and (has_exec_error(solution) or has_written_output(solution))):
        return "flawed", pred
    return "preferred", pred


def is_noisy(continuation, fmt="cot", max_blocks=24, max_block_chars=3000, delim="\n\n"):
    """None for a clean continuation, else why it is noise (a short key for the sampler's drop counts):
    'too_many_blocks', 'long_block', 'delimiter_in_block' (a fence inside a text, code or output
    block) or 'unclosed_block'."""
    blocks = split_steps(continuation, fmt, delim)
    if len(blocks) > max_blocks:
        return "too_many_blocks"
    if any(len(b) > max_block_chars for b in blocks):
        return "long_block"
    if fmt == "code":
        for b in blocks:
            kind = step_kind(b)
            inner = b if kind == "text" else b.lstrip()[len(CODE_START if kind == "code" else OUTPUT_START):]
            if kind != "text" and not FENCE_CLOSE.search(inner):
                return "unclosed_block"
            if "```" in (inner if kind == "text" else inner[:FENCE_CLOSE.search(inner).start()]):
                return "delimiter_in_block"
    return None


# ----------------------------------------------------------------------------------------------
# Pair records, one JSON object a line. A naive pair has prefix "" and k = -1; a step-controlled
# pair's prefix is the shared steps t_0..t_k of the preferred solution, and chosen / rejected are the
# two continuations after it (so prefix + chosen is the whole preferred solution).
# ----------------------------------------------------------------------------------------------
PAIR_FIELDS = {"id": str, "source": str, "question": str, "prefix": str, "chosen": str, "rejected": str,
               "kind": str, "k": int, "gold": str, "chosen_answer": (str, type(None)),
               "rejected_answer": (str, type(None)), "fmt": str, "sampling": dict}


def make_pair(record, chosen, rejected, prefix="", k=-1, fmt="cot", sampling=None):
    """The pair record of a question `record` (from load_records). Answers are extracted from the
    whole solutions (prefix + continuation). `sampling`: the settings that produced the pair
    (temperature, ramp, tries, seed ...)."""
    if bool(prefix) != (k >= 0):
        raise ValueError(f"a step-controlled pair has a prefix and k >= 0, a naive one neither (k={k}, "
                         f"prefix={prefix[:40]!r})")
    fallback = fmt == "cot"
    return {"id": record["id"], "source": record["source"], "question": record["question"], "prefix": prefix,
            "chosen": chosen, "rejected": rejected, "kind": "sc" if k >= 0 else "naive", "k": k,
            "gold": record["gold"], "chosen_answer": extract_answer(prefix + chosen, fallback),
            "rejected_answer": extract_answer(prefix + rejected, fallback), "fmt": fmt,
            "sampling": dict(sampling or {})}


def check_pair(pair, where="pair"):
    """The pair itself, once every field of PAIR_FIELDS is checked, and the optional `prompt` (the
    exact text before the continuations, in pairs read from TRL's format), and the pair can be
    trained on; else ValueError naming `where` and the field."""
    for name, kind in PAIR_FIELDS.items():
        if name not in pair:
            raise ValueError(f"{where}: missing field {name!r}")
        if not isinstance(pair[name], kind) or (kind is int and isinstance(pair[name], bool)):
            raise ValueError(f"{where}: field {name!r} is {type(pair[name]).__name__}, expected "
                             f"{getattr(kind, '__name__', kind)}")
    if pair["kind"] not in ("naive", "sc") or (pair["kind"] == "sc") != (pair["k"] >= 0):
        raise ValueError(f"{where}: field 'kind' is {pair['kind']!r} with k={pair['k']}: expected 'naive' "
                         f"(k=-1) or 'sc' (k>=0)")
    if not isinstance(pair.get("prompt", ""), str):
        raise ValueError(f"{where}: field 'prompt' is {type(pair['prompt']).__name__}, expected str")
    # Pairs that would train on nothing or on the wrong thing. The same text on both sides: the
    # margin is always 0. An empty rejected is allowed: stopping at once is a real wrong answer.
    if (pair["kind"] == "sc") != bool(pair["prefix"]):
        raise ValueError(f"{where}: field 'prefix' is {'empty' if not pair['prefix'] else 'not empty'} in a "
                         f"{pair['kind']} pair (k={pair['k']}): a step-controlled pair's prefix is the "
                         f"shared steps t_0..t_k, a naive pair has none")
    if not pair["chosen"].strip():
        raise ValueError(f"{where}: field 'chosen' is empty")
    if pair["chosen"] == pair["rejected"]:
        raise ValueError(f"{where}: fields 'chosen' and 'rejected' are the same text")
    return pair


def read_pairs(path, with_format=False):
    """The pair records of a JSONL file, every line checked: our records (make_pair), or rows of TRL's
    preference format (prompt / chosen / rejected, as strings or message lists: from_trl), told apart
    by the `prompt` field. with_format: (pairs, "scdpo" | "TRL" | "scdpo + TRL")."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (a pairs JSONL: sample.py pairs writes one; TRL's "
                                f"prompt / chosen / rejected rows are read too)")
    kinds = set()

    def parse(row, where):
        kinds.add("TRL" if "prompt" in row else "scdpo")
        return from_trl(row, where) if "prompt" in row else check_pair(row, where)
    pairs = read_jsonl(path, parse)
    return (pairs, " + ".join(sorted(kinds, reverse=True)) or "scdpo") if with_format else pairs


# Provenance: `<pairs>.meta.json` holds hashes of the model and tokenizer that sampled a pairs file.
# Written last, it also marks the file complete. scdpo.check_pairs_match refuses to train a model
# whose hashes differ.
def sha256_file(path, sample=None):
    """sha256 of a file; with `sample` bytes, of its size and 16 evenly spaced slices (a fingerprint of
    multi-GB weights that changes whenever training changes the weights, without reading them all)."""
    h, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f:
        if sample is None or size <= 16 * sample:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            for i in range(16):
                f.seek(i * (size - sample) // 15)
                h.update(f.read(sample))
    return h.hexdigest()


def model_fingerprint(path):
    """{'model': .., 'tokenizer': ..}: hashes of a hub folder's config + weights and of the files its
    prompts come from: the tokenizer's, and chat_template.jinja, which overrides tokenizer_config.json's
    template (a template added after sampling would train on other prompts than it sampled)."""
    def digest(files, sample=None):
        joined = "".join(sha256_file(f, sample) for f in sorted(files))
        return hashlib.sha256(joined.encode()).hexdigest()[:16]
    weights = glob.glob(os.path.join(path, "*.safetensors")) + [os.path.join(path, "config.json")]
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
    toks = [os.path.join(path, f) for f in names if os.path.exists(os.path.join(path, f))]
    return {"model": digest(weights, sample=1 << 20), "tokenizer": digest(toks)}


def pairs_meta_path(pairs_path):
    return pairs_path + ".meta.json"


def write_pairs_meta(pairs_path, model_dir, summary=None):
    """Write `<pairs>.meta.json` ({model, tokenizer} hashes of model_dir, plus the summary counts) with
    write_text; returns its path. Call it once the pairs file is complete, on one process."""
    path = pairs_meta_path(pairs_path)
    write_json(path, {**model_fingerprint(model_dir), "summary": summary})
    return path


def read_pairs_meta(pairs_path):
    """The recorded provenance of a pairs file, or None when it has no `<pairs>.meta.json`."""
    path = pairs_meta_path(pairs_path)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# TRL's preference format: prompt, chosen, rejected. TRL feeds a string prompt verbatim, so to_trl
# writes the text the model sees (the chat template around the question, then the prefix), and
# tokenize_pair uses a string prompt read back as is. Our other fields ride along, so from_trl gives
# our record back. A conversational row (message lists) is rendered with the chat template, as TRL does
# (but its prefix kept as written: README, "TRL's preference format").
def to_trl(pair, tok):
    """A TRL row of a pair record; `prompt` rendered with `tok`'s chat template unless the pair has one."""
    prompt = pair.get("prompt", tok.render_prompt(pair["question"], pair["prefix"]))
    return {**pair, "prompt": prompt}


def from_trl(row, where="TRL row"):
    """A pair record of a TRL row: ours back exactly; a foreign string row as a naive pair; a
    conversational one with the question from the user message and the prefix from an open assistant
    message after it (k: the prefix's last step). Other message lists, or a missing field, are a
    ValueError naming `where`."""
    for side in ("prompt", "chosen", "rejected"):
        if side not in row:
            raise ValueError(f"{where}: missing field {side!r} (TRL rows have prompt, chosen, rejected)")
    if isinstance(row["prompt"], str) and all(k in row for k in PAIR_FIELDS):
        return check_pair(dict(row), where)

    def texts(side, roles):   # [text] of a string, else the contents of messages with roles in `roles`
        x = row[side]
        if isinstance(x, str):
            return [x]
        if not isinstance(x, list):
            raise ValueError(f"{where}: field {side!r} is {type(x).__name__}, expected text or a list of "
                             f"messages")
        bad = next((m for m in x if not isinstance(m, dict) or not isinstance(m.get("content"), str)), None)
        if bad is not None:
            raise ValueError(f"{where}: field {side!r} holds {str(bad)[:60]!r}, expected messages "
                             f"{{\"role\": ..., \"content\": text}}")
        if [m.get("role") for m in x] not in roles:
            raise ValueError(f"{where}: field {side!r}: messages with roles {[m.get('role') for m in x]}, "
                             f"expected one of {list(roles)}")
        return [m["content"] for m in x]

    question, prefix = (texts("prompt", (["user"], ["user", "assistant"])) + [""])[:2]
    (chosen,), (rejected,) = (texts(side, (["assistant"],)) for side in ("chosen", "rejected"))
    record = {"id": str(row.get("id", where)), "source": row.get("source", "trl"), "question": question,
              "gold": str(row.get("gold", ""))}
    k = len(split_steps(prefix)) - 1 if prefix else -1
    pair = make_pair(record, chosen, rejected, prefix=prefix, k=k)
    if isinstance(row["prompt"], str):
        pair["prompt"] = row["prompt"]
    return check_pair(pair, where)


# ----------------------------------------------------------------------------------------------
# Tokenised rows and batches. The prompt is tok.render_prompt(question, prefix): the question as the
# user turn, the prefix as the start of the assistant turn, left open. Prompt + continuation is
# tokenised once and split at the character boundary (tok.encode_prompt_response).
# Every chosen and rejected is a complete solution (sample.py drops samples cut at max_new_tokens),
# so the end-of-turn token tok.end_id (EOS, or the template's own, e.g. ChatML's <|im_end|>) follows
# it, unless max_len cuts it. A pair whose prompt is over max_prompt_len is dropped (never cut).
# ----------------------------------------------------------------------------------------------
def _cap(ids, room, end_id):
    """ids + [end of turn] cut to `room` tokens; (ids, truncated)."""
    full = list(ids) + [end_id]
    return full[:room], len(full) > room


def tokenize_pair(pair, tok, max_len=1024, max_prompt_len=512):
    """{"prompt", "chosen", "rejected": token ids, "chosen_truncated", "rejected_truncated": bool, "id",
    "kind"}, with len(prompt) + len(each continuation) <= max_len; None when the prompt has more than
    max_prompt_len tokens."""
    if not 0 < max_prompt_len < max_len:
        raise ValueError(f"need 0 < max_prompt_len ({max_prompt_len}) < max_len ({max_len})")
    text = pair["prompt"] if "prompt" in pair else tok.render_prompt(pair["question"], pair["prefix"])
    (ids_c, n_c), (ids_r, n_r) = (tok.encode_prompt_response(text, pair[s]) for s in ("chosen", "rejected"))
    n = 0  # the shared ids are the prompt; a token across the boundary is the continuation's
    while n < min(n_c, n_r) and ids_c[n] == ids_r[n]:
        n += 1
    if n == 0:  # the last prompt token predicts c_0: there must be one
        raise ValueError(f"pair {pair['id']}: the rendered prompt has no tokens")
    if n > max_prompt_len:
        return None
    chosen, cut_c = _cap(ids_c[n:], max_len - n, tok.end_id)
    rejected, cut_r = _cap(ids_r[n:], max_len - n, tok.end_id)
    return {"prompt": ids_c[:n], "chosen": chosen, "rejected": rejected, "chosen_truncated": cut_c,
            "rejected_truncated": cut_r, "id": pair["id"], "kind": pair["kind"]}


def tokenize_pairs(pairs, tok, max_len=1024, max_prompt_len=512, log=print, warn=None):
    """tokenize_pair over a list, with a one-line summary of what was kept, dropped and truncated, and a
    warning (through `warn`, default `log`) when most pairs were dropped or truncated."""
    rows = [tokenize_pair(p, tok, max_len, max_prompt_len) for p in pairs]
    kept = [r for r in rows if r is not None]
    log(f"tokenize_pairs: kept {len(kept)}/{len(pairs)} pairs | dropped {len(pairs) - len(kept)} (prompt > "
        f"{max_prompt_len} tokens) | truncated to {max_len} tokens: chosen "
        f"{sum(r['chosen_truncated'] for r in kept)}, "
        f"rejected {sum(r['rejected_truncated'] for r in kept)}")
    cut = sum(r["chosen_truncated"] or r["rejected_truncated"] for r in kept)
    for msg in (most_lost(len(pairs) - len(kept), len(pairs), f"pairs have a prompt over {max_prompt_len} "
                          f"tokens and were dropped", "--max-prompt"),
                most_lost(cut, len(kept), f"kept pairs have a continuation cut at {max_len} tokens (prompt "
                          f"included)", "--max-len")):
        if msg:
            (warn or log)(msg)
    return kept


def most_lost(n, total, what, flag):
    """A loud warning when more than half of `total` items were cut short or dropped (else None): a budget
    too small for the data ends a run with next to nothing to train on."""
    return f"WARNING: {n} of {total} {what}; raise {flag}" if total and 2 * n > total else None


def tokenize_sft(question, solution, tok, max_len=2048):
    """{"prompt", "response": ids, "truncated"} of a complete solution (tok.end_id appended) for SFT;
    the prompt is never cut (None when it alone fills max_len)."""
    ids, n = tok.encode_prompt_response(tok.render_prompt(question), solution)
    if n >= max_len:
        return None
    response, cut = _cap(ids[n:], max_len - n, tok.end_id)
    return {"prompt": ids[:n], "response": response, "truncated": cut}


# Batches. The model returns hidden states h (B, L, D); the loss needs, for each continuation token,
# the hidden state that predicts it. A batch names them with flat indices into h.view(B * L, D):
#   idx (N,) rows of the flattened h, tgt (N,) the token each predicts, seg (N,) its segment:
#   2p for pair p's chosen, 2p + 1 for its rejected (collate_sft: p for row p's response);
#   lengths (n_seg,) tokens per segment.
# Then logp = log_softmax(h[idx] @ W.T).gather(tgt) summed by seg (index_add) is (2P,) and
# chosen = logp[0::2], rejected = logp[1::2]. Prompt positions never reach the LM head.
#
# Packed layout (one row per pair, prompt P, chosen C, rejected R tokens):
#   ids        p_0 .. p_P-1 | c_0 .. c_C-1   | r_0 .. r_R-1
#   positions  0 .. P-1     | P .. P+C-1     | P .. P+R-1        (rejected restarts after the prompt)
#   mask       causal, except that rejected queries never see chosen keys; padding sees itself
#   c_i is predicted by h[P-1+i]; r_0 by h[P-1] (the last prompt token, as c_0), r_i by h[P+C-1+i].
# The prompt (for a step-controlled pair: question and the shared prefix) is computed once, and both
# continuations see exactly what they would in a row of their own.
# Unpacked layout: rows 2p = prompt + chosen and 2p + 1 = prompt + rejected, right-padded, plain causal
# (mask None): padding comes after every real token, so no real query sees it.
def collate_pairs(rows, packed=True, pad_id=0):
    """dict(input_ids, positions (B, L) long, mask (B, L, L) bool or None, idx, tgt, seg, lengths) of
    tokenised pairs; B = len(rows) packed, 2 * len(rows) unpacked."""
    if packed:
        seqs = [r["prompt"] + r["chosen"] + r["rejected"] for r in rows]
    else:
        seqs = [r["prompt"] + r[side] for r in rows for side in ("chosen", "rejected")]
    B, L = len(seqs), max(map(len, seqs))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    positions = torch.zeros((B, L), dtype=torch.long)
    mask = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1) if packed else None
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    idx, tgt, seg = [], [], []
    for b, seq in enumerate(seqs):
        input_ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        positions[b] = torch.arange(L)
    for p, r in enumerate(rows):
        P, C, R = len(r["prompt"]), len(r["chosen"]), len(r["rejected"])
        if packed:
            b, T = p, P + C + R
            positions[b, P + C:T] = torch.arange(P, P + R)
            mask[p, :T, :T] = causal[:T, :T]
            mask[p, P + C:T, P:P + C] = False
            starts = {"chosen": (b, P, P - 1), "rejected": (b, P + C, P - 1)}
        else:
            starts = {"chosen": (2 * p, P, P - 1), "rejected": (2 * p + 1, P, P - 1)}
        for s, side in enumerate(("chosen", "rejected")):
            b, first, h0 = starts[side]  # tokens at first.., predicted by h0, then by the token before each
            n = len(r[side])
            idx += [b * L + (h0 if i == 0 else first + i - 1) for i in range(n)]
            tgt += r[side]
            seg += [2 * p + s] * n
    lengths = torch.tensor([len(r[side]) for r in rows for side in ("chosen", "rejected")], dtype=torch.long)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)
    return {"input_ids": input_ids, "positions": positions, "mask": mask, "idx": as_long(idx),
            "tgt": as_long(tgt), "seg": as_long(seg), "lengths": lengths}


def collate_sft(rows, pad_id=0):
    """The same dict for SFT rows (tokenize_sft): one row per example, right-padded, plain causal
    (mask None), the loss on the response tokens only (seg = the row)."""
    seqs = [r["prompt"] + r["response"] for r in rows]
    B, L = len(seqs), max(map(len, seqs))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    idx, tgt, seg = [], [], []
    for b, (r, seq) in enumerate(zip(rows, seqs)):
        input_ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        P, n = len(r["prompt"]), len(r["response"])
        idx += [b * L + P - 1 + i for i in range(n)]
        tgt += r["response"]
        seg += [b] * n
    return {"input_ids": input_ids, "positions": torch.arange(L).expand(B, L).clone(), "mask": None,
            "idx": torch.tensor(idx, dtype=torch.long), "tgt": torch.tensor(tgt, dtype=torch.long),
            "seg": torch.tensor(seg, dtype=torch.long),
            "lengths": torch.tensor([len(r["response"]) for r in rows], dtype=torch.long)}
