"""Data for Step-Controlled DPO: loading, answer grading, step splitting, the pair filters of
METHOD.md, pair records (JSONL and TRL's format), tokenised training rows and batches.

Everything here is a small pure function; `sample.py pairs` strings them together.

Solution formats (`fmt`):
- "cot": chain of thought. A step is a paragraph: text up to and including a run of the delimiter
  (default "\\n\\n"; "\\n" cuts at lines).
- "code": code-integrated. Blocks of text, code and execution output, fenced in markdown:

      Let me compute the sum.
      ```python
      print(sum(range(10)))
      ```
      ```output
      45
      ```
      The sum is $\\boxed{45}$.

  Each block is one step: text runs up to the next fence; a code block is CODE_START .. CODE_END and an
  execution block OUTPUT_START .. OUTPUT_END, fences and their newline included. Output blocks are
  written by running the code, never by the model. The sampler uses these same constants.

Every step list satisfies "".join(steps) == solution.
"""
import contextlib
import functools
import glob
import hashlib
import json
import keyword
import math
import os
import re
import signal
import threading
import time
import warnings

import sympy
import torch
from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                        standard_transformations)

CODE_START, CODE_END = "```python\n", "```\n"
OUTPUT_START, OUTPUT_END = "```output\n", "```\n"

# ----------------------------------------------------------------------------------------------
# Loading. Records: {id, source, question, gold} plus solution / level / subject when the file has them.
# One reader for every set: the named ones are files under the data root, and any JSONL is read the
# same way, its fields found by name.
# ----------------------------------------------------------------------------------------------
DATASETS = {"gsm8k:train": "gsm8k/train.jsonl", "gsm8k:test": "gsm8k/test.jsonl",
            "math:train": "math/train.jsonl", "math:test": "math/test.jsonl",
            "math:test500": "math/test500.jsonl", "svamp": "extra/svamp.jsonl",
            "asdiv": "extra/asdiv.jsonl", "mawps": "extra/mawps.jsonl"}
ALIASES = {"gsm8k": "gsm8k:test", "math": "math:test", "math500": "math:test500"}   # the test sets
# our field <- the first of the file's fields that a row has
FIELDS = {"question": ("question", "problem"), "gold": ("gold", "answer"), "solution": ("solution",),
          "id": ("id", "unique_id"), "level": ("level",), "subject": ("subject", "type")}


def data_root(root=None):
    """The shared data folder: `root`, else $SCDPO_DATA, else ../shared/data beside the repository."""
    here = os.path.dirname(os.path.abspath(__file__))
    return root or os.environ.get("SCDPO_DATA") or os.path.join(here, "..", "shared", "data")


def parse_record(row, where, source):
    """One record from a JSON object: the question (`question` or `problem`), the gold answer (`gold`,
    `answer`, or the '#### N' line of a GSM8K worked answer, which is then also the solution), and
    optional id, solution, level, subject. ValueError names `where` and the field."""
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
        gold = _hash_answer(rec.get("solution") or "")
        if gold is None:
            raise ValueError(f"{where}: missing field 'gold' or 'answer' (or a solution with a '#### N' "
                             f"line)")
        gold = gold.replace(",", "")
    rec["gold"] = gold
    return rec


def load_records(spec, limit=None, root=None):
    """Records of comma-separated sets: names of DATASETS or ALIASES, or paths of JSONL files (source =
    the file's name), each cut to its first `limit` records. Ids are "<source>/<id>" where a row has
    one, else "<set>/<line index>". A record with an empty gold answer cannot be graded (2 MATH
    train problems): it is left out, and said."""
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
            raise FileNotFoundError(f"{path}: not found (data set {part!r})")
        recs = read_jsonl(path, lambda row, where: parse_record(row, where, source))
        if not recs:
            raise ValueError(f"{path}: no records (empty file); expected JSON lines with a question and a "
                             f"gold answer")
        for i, rec in enumerate(recs):
            rec["id"] = f"{source}/{rec['id']}" if rec["id"] else f"{tag.replace(':', '/')}/{i}"
        empty = [r["id"] for r in recs if not r["gold"].strip()]
        if empty:
            print(f"{path}: left out {len(empty)} records with an empty gold answer: {', '.join(empty)}")
        records += [r for r in recs if r["gold"].strip()][:limit]
    return records


def read_jsonl(path, check=None):
    """Rows of a JSONL file (blank lines skipped). A line that is not UTF-8 or not a JSON object is a
    ValueError naming file and line; `check(row, "file:line")` may check fields (see check_pair) and
    return the row."""
    rows = []
    with open(path, "rb") as f:   # bytes, decoded line by line, so that a bad byte's line can be named
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                                 f"{e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(check(row, f"{path}:{lineno}") if check else row)
    return rows


def write_text(path, text):
    """The one atomic writer: text written whole into path.tmp, synced, then renamed over path, so that a
    kill mid-write leaves the old file, never half a new one."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_jsonl(path, rows, append=False):
    """One JSON object a line. `append` adds to the end, flushed (resumable runs append question by
    question); otherwise the file is written whole by write_text."""
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
# Final answers. A solution's answer is that of its LAST marker, by position: \boxed{..} / \fbox{..}
# (boxes joined by commas or 'and' are one list), 'Final Answer: The final answer is X. I hope it is
# correct.' (Minerva), 'The answer is: X' (MetaMath), 'Answer: X', '#### N' (GSM8K). A marker's answer
# is the math span right after it, else its sentence (to '. ' or the line end), or that sentence's last
# math expression when it is prose ('The largest $n$ is 34.'). Without a marker: the text's last math
# expression, i.e. the last $..$ / \(..\) / \[..\] span, bare \frac / \sqrt or number, whichever ends
# last (never a piece of a fraction). A $ opens math only if its closing $ is not money's ('$5 and $6').
# ----------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"(?<![\w.{^_\\])[-+]?(?:(?:\d{1,3}(?: \d{3})+|\d+) +\d+/\d+(?![\d/])"     # 4 4/9
                     r"|(?:\d{1,3}(?:,\d{3})+(?!,\d)|\d{1,3}(?: \d{3})+|\d+(?:,\d{1,2}(?![\d,]))?)"
                     r"(?:\.\d+)?(?:/\d+)?(?![\d}]|\.\d)|\.\d+(?![\d}]))(?: ?(?:%|percent(?:age)?\b|pct\b))?")
_OPEN = re.compile(r"\\\[|\\\(|\$\$|(?<!\\)\$")
_DOLLAR = re.compile(r"\$((?:[^$\\]|\\[\s\S])+?)\$")
_PROSE = re.compile(r"(?<![\\\w{])[A-Za-z]{2,} +[A-Za-z]{2,}(?![\w}])")   # two words in a row
_BARE = re.compile(r"-?\d*\\(?:[dtc]?frac|sqrt)(?![a-zA-Z])")
_MARKER = re.compile(r"(?i)\bfinal\s+answer\W{0,3}(?:is\b|:)|\b(?:the|our)\s+(?:\w+\s+)?answer\s+is\b"
                     r"|^\W*answer\s*:|####", re.M)
_JOIN = re.compile(r"(?:\s|[,;$&]|\\[\[\]()]|\\[,;!]|\\q?quad|\\text\{\s*(?:and)?\s*\}|\band\b)*")
_VALUE = re.compile(r"(?:[^\\]|\\(?:[dtc]?frac|sqrt|pi|pm|infty|left|right|text|circ|[%,!])(?![a-z]))*")


def _boxes(text):
    """[(start, end, content)] of every \\boxed{..} / \\fbox{..} (nested and escaped braces allowed) and
    unbraced `\\boxed 5`; content None for a box that never closes (a truncated answer)."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*", text):
        i = m.end()
        if text.startswith("{", i):
            j = _match_brace(text, i, "{}")
            out.append((m.start(), j + 1 if j > 0 else len(text), text[i + 1:j].strip() if j > 0 else None))
        else:
            arg = re.match(r"[^\s$}]*", text[i:]).group(0)
            out.append((m.start(), i + len(arg), arg.rstrip(".") or None))
    return out


def _hash_answer(text):
    found = re.findall(r"####\s*(.+)", text)
    return found[-1].strip() if found else None


def _box_list(between):
    """Two boxes are one list answer when only commas, 'and' and spacing lie between them, or a short text
    with an 'and' ('\\boxed{1} papers and \\boxed{2} bins'); never across 'or' (MATH writes alternatives
    so: '\\boxed{x+11} or \\boxed{11+x}') or a sentence end."""
    return bool(_JOIN.fullmatch(between)) or (len(between) <= 30 and bool(re.search(r"\band\b", between))
                                              and not re.search(r"\bor\b|\.\s|\n\n", between))


def _math_spans(text):
    """[(start, end, content)] of the math spans of a text, in order. A single $ opens a span only when
    its closing $ is not followed by a digit (money: '$5 and $6') and the span is not prose."""
    spans, i = [], 0
    while True:
        m = _OPEN.search(text, i)
        if not m:
            return spans
        tok, i = m.group(0), m.end()
        if tok == "$":
            d = _DOLLAR.match(text, m.start())
            if (not d or not d.group(1).strip() or "\n\n" in d.group(1) or text[d.end():d.end() + 1].isdigit()
                    or _PROSE.search(d.group(1))):
                continue
            spans.append((m.start(), d.end(), d.group(1)))
        else:
            j = text.find({"\\[": "\\]", "\\(": "\\)", "$$": "$$"}[tok], i)
            if j < 0:
                continue
            spans.append((m.start(), j + 2, text[i:j]))
        i = spans[-1][1]


def _last_math(text):
    """The last math expression of a text (a span, or spans joined by commas or 'and', a bare \\frac /
    \\sqrt, a number), or None. A span of one letter ('$S$') names a quantity: it counts only alone."""
    spans = _math_spans(text)
    outside = list(text)
    for s, e, _ in spans:
        outside[s:e] = " " * (e - s)
    outside = "".join(outside)
    best, named = (-1, None), [sp for sp in spans if not re.fullmatch(r"\s*[a-zA-Z]\s*[.,]?\s*", sp[2])]
    if named:
        k = len(named) - 1
        while k and _JOIN.fullmatch(text[named[k - 1][1]:named[k][0]]) and _VALUE.fullmatch(named[k - 1][2]):
            k -= 1
        last = named[-1][2]
        best = (named[-1][1], ", ".join(c for _, _, c in named[k:]) if _VALUE.fullmatch(last) else last)
    run = None
    for m in _NUMBER.finditer(outside, best[0] + 1):   # numbers joined by + - * / are one expression: 4 + 4/9
        run = run if run and re.fullmatch(r"\s*[-+*/]\s*", outside[run[1]:m.start()]) else (m.start(), 0)
        run = (run[0], m.end())
        best = max(best, (m.end(), outside[run[0]:m.end()]))
    for m in _BARE.finditer(outside, best[0] + 1):
        i = m.end()
        for _ in range(1 if m.group(0).endswith("sqrt") else 2):
            i = _take_arg(text, i)[1]
        best = max(best, (i, text[m.start():i]))
    return best[1] if best[1] is not None or not spans else spans[-1][2]


def _marked(text, i):
    """The answer that a marker ending at text[i] introduces, and whether it is math (not a bare word)."""
    rest = text[i:i + 3000].lstrip(" \t\n:*\"")
    spans = _math_spans(rest)
    ends = [m.start() for m in re.finditer(r"\.(?=\s|$)|\n", rest)
            if not any(s < m.start() < e for s, e, _ in spans)]
    sentence = rest[:(ends + [len(rest)])[0]]
    if spans and spans[0][0] == 0 and not _JOIN.fullmatch(sentence[spans[0][1]:]):
        return spans[0][2], True                       # '$16\pi$. I hope', but '$1$ and $2$' is a list
    if _PROSE.search(sentence) or any(e <= len(sentence) for _, e, _ in spans):
        sentence = _last_math(sentence) or ""
    return sentence, bool(re.search(r"[\d\\]|^\(?[A-Za-z]\)?$", sentence.strip(" *$.")))


def _clean(ans):
    """An answer without its math delimiters, markdown bold, quotes and closing punctuation; None if empty."""
    a = ans.strip()
    for _ in range(3):
        m = re.fullmatch(r"\$+([^$]*)\$+|\\\((.*)\\\)|\\\[(.*)\\\]|\*\*(.*)\*\*|\"(.*)\"", a, re.S)
        a = next(g for g in m.groups() if g is not None).strip() if m else a
    a = a.rstrip(" .,;:").strip(" *")
    return a or None


def extract_answer(text, fallback=True):
    """The final answer of a solution as a string (see above), or None: no answer, or the last marker
    is a box cut off by the token limit. `fallback`: the last math expression when no marker exists."""
    if text is None:
        return None
    boxes = _boxes(text)
    at, ans = -1, None
    if boxes:
        k = len(boxes) - 1
        while k and boxes[k][2] and boxes[k - 1][2] and _box_list(text[boxes[k - 1][1]:boxes[k][0]]):
            k -= 1
        at, ans = boxes[k][0], None if boxes[-1][2] is None else ", ".join(b[2] for b in boxes[k:])
    weak = None
    for m in reversed(list(_MARKER.finditer(text))):
        if m.start() < at:
            break
        said, is_math = _marked(text, m.end())
        if is_math:
            at, ans = m.start(), said
            break
        weak = weak or said
    if at < 0:
        ans = weak or (_last_math(text) if fallback else None)
    return _clean(ans) if ans else None


# ----------------------------------------------------------------------------------------------
# Equivalence. Both answers are brought to one canonical string (normalize_answer: \dfrac -> \frac,
# \left/\right, spacing, \text{units}, degrees, dollars, thousands in every spelling (115{,}000, 1\,000,
# 1 000), \frac12 -> \frac{1}{2}, 4 4/9 -> 4\frac{4}{9}, percent -> %, \le -> <=, 'and' / ';' -> ',').
# Equal strings are equal answers. Then the gold decides what '=' means: a gold equation (one '=', a
# digit on its left: x^2+y^2=13) needs an equation with the same solutions; else a chain a = b = c
# states its last side ('\frac{28}{4}=7' is 7, 'k = 1/3' is 1/3, 'x \in [1,2]' is [1,2]). Structures:
# unions, matrices (same shape), tuples and intervals (in order, brackets exact), sets and lists (any
# order; \pm gives both values; named values match by name, bare ones in the gold's order); a < x <= b
# is (a,b]. Single values compare as exact numbers, then through sympy: our own translator turns the
# LaTeX into a plain expression whose every name is checked before sympy parses it, under a timer
# (SIGALRM: main thread only; elsewhere the symbolic step is off, with a one-time message).
# ----------------------------------------------------------------------------------------------
_TEXT = re.compile(r"\\(?:text|textbf|textrm|textit|textnormal|mbox|mathrm)\s*\{([^{}]*)\}(?:\^\{?[23]\}?)?")
_REL = {"leqslant": "<=", "geqslant": ">=", "leq": "<=", "geq": ">=", "le": "<=", "ge": ">=", "lt": "<",
        "gt": ">", "neq": "!=", "ne": "!="}


def normalize_answer(s, comma="thousands"):
    """Canonical string form of an answer (see above). `comma`: how '1,000' and '2,74' read: 'thousands'
    (1000; 2,74 stays a list), 'list' (both lists) or 'decimal' (2.74, and 0,111 = 0.111; 1,000 stays)."""
    s = str(s).strip().replace("\n", " ")
    if re.search(r"\\begin\{(?:aligned|align|gathered|split)", s):              # a derivation: its last row
        s = re.split(r"\\\\", re.sub(r"\\(?:begin|end)\{[a-z]+\*?\}", "", s).strip(" \\"))[-1]
        s = s.replace("&", "")
    if "\\begin" not in s:                                                    # '\\frac' written doubled
        s = re.sub(r"\\\\(?=[a-zA-Z])", r"\\", s)
    s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?|displaystyle|mathbf|boldsymbol)(?![a-zA-Z])", "", s)
    s = re.sub(r"\s*\{\s*,\s*\}\s*|,\s*\\!\s*", ",", s)                # 115{,}000, 11,\! 111
    s = re.sub(r"(?<!\\)\\[!,;:]", "", s)
    s = re.sub(r"(?<!\\)\\(?:[> ]|q?quad(?![a-zA-Z]))|~", " ", s)
    s = s.replace("\\$", "").replace("$", "").replace("°", "^\\circ")
    s = s.replace("≤", "\\le ").replace("≥", "\\ge ")
    s = re.sub(r"\\%|\\text\{\s*(?:percent(?:age)?|pct)\s*\}|(?<![a-zA-Z])(?:percent(?:age)?|pct)(?![a-z])",
               "%", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ", "", s)
    s = re.sub(r"\\(" + "|".join(_REL) + r")(?![a-zA-Z])", lambda m: _REL[m.group(1)], s)
    s = re.sub(r"\\mathrm\s*\{\s*([a-zA-Z])\s*\}", r"\1", s)                  # \mathrm{e}: a letter, no unit
    s = re.sub(r"\\text\{\s*(?:and|or)\s*\}|(?<![a-zA-Z\\])(?:and|or)(?![a-zA-Z])", ",", s)
    bare = _TEXT.sub("", s)
    s = bare if bare.strip(" ,.") else _TEXT.sub(r"\1", s)        # units go; a text-only answer stays
    m = re.fullmatch(r"\s*(-?[\d.,/]*\d)\s+[a-zA-Z][a-zA-Z\s.]*", s)  # '18 ways', '5 dollars'
    s = m.group(1) if m else s
    m = re.fullmatch(r"\s*\(([A-Za-z])\)\s*", s)                            # a choice: (C)
    s = m.group(1) if m else s
    if re.fullmatch(r"[A-Za-z' ]+", s.strip()):
        s = s.lower()
    # thousands: 1,000 and 1 000, not '32, 349' (a list), then 4 4/9 (a mixed number)
    if comma == "decimal":
        s = re.sub(r"^(-?)(?:(0),(\d+)|(\d+),(\d{1,2}|\d{4,}))$",
                   lambda m: m[1] + ".".join(filter(None, m.groups()[1:])), s)
    if comma == "thousands":
        s = re.sub(r"(?<![\d.,])([1-9]\d{0,2})((?:,\d{3})+|(?: \d{3})+)(?!\d)",
                   lambda m: m[1] + re.sub("[ ,]", "", m[2]), s)
    s = re.sub(r"(?<![\d./}])(\d+) +(\d+)/(\d+)(?![\d./])",             # 11 6/6 is no number at all
               lambda m: m.expand(r"\1\\frac{\2}{\3}" if int(m[2]) < int(m[3]) else r"\1\\;\2/\3"), s)
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"(?:[a-z]=[^;,=]+(?:,[a-z]=[^;,=]+)+;?){2,}", s):             # p=5,q=2;p=7,q=2
        s = ",".join("(" + ",".join(x.split("=")[1] for x in g.split(",")) + ")" for g in s.split(";"))
    s = s.replace(";", ",").strip(",")
    s = re.sub(r",+", ",", s)
    s = re.sub(r"(?<![\w}\\])\\(?=\d)", "", s)                                # \15 (a lost \$)
    m = re.fullmatch(r"\{([^{}]*)\}", s)                                      # {1,2,3}: a bare group
    s = _brace_args(m.group(1) if m else s)
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
    return re.sub(r"_\{(\w+)\}", r"_\1", s)


_NAME = r"(?:[a-zA-Z]+|\\[a-zA-Z]+)(?:_\w+)?(?:\([a-z]\))?|\([a-z](?:,[a-z])+\)"
_LHS = re.compile(rf"({_NAME})(?:=|\\in)(.+)")


def _drop_lhs(s):
    """'x=5' -> '5', 'f(x)=2x+3' -> '2x+3', 'x\\in[1,2]' -> '[1,2]': a lone name goes."""
    m = _LHS.fullmatch(s)
    return m.group(2) if m and "=" not in m.group(2) else s


def _drop_common_lhs(items):
    """'x=1,x=2' -> ['1', '2'], but 'x=1,y=2' keeps its names (which value is which matters)."""
    names = {m.group(1) for m in map(_LHS.fullmatch, items) if m}
    return [_drop_lhs(x) for x in items] if len(names) <= 1 else items


def _is_equation(s):
    """One '=' (outside brackets) with a digit in its left side, subscripts aside: x^2+y^2=13, 4x-5y=-50."""
    sides = _split_top(s, "=")
    return (len(sides) == 2 and not re.search(r"[<>,]|!=", s)
            and bool(re.search(r"\d", re.sub(r"_\w+", "", sides[0]))))


def _value(s):
    """What a non-equation answer states: the last side of 'a = b \\approx c' (a lone name's value), the
    interval of a < x <= b, and 5 < x for x > 5."""
    if len(_split_top(s, ",")) > 1:
        return s                                       # a list: its items keep their names
    sides = [s] if re.search(r"[<>]|!=", s) else _split_top(s, "=")
    sides = [_split_top(x, "\\approx")[0] for x in sides] if len(sides) > 1 else _split_top(s, "\\approx")
    s = _drop_lhs(sides[-1] if len(sides) > 1 else s)
    m = re.fullmatch(r"(.+?)(<=?|>=?)[a-zA-Z](?:\([a-z]\))?(<=?|>=?)(.+)", s)
    if m and m.group(2)[0] == m.group(3)[0]:
        lo, op1, op2, hi = m.groups() if m.group(2)[0] == "<" else m.groups()[::-1]
        return ("(" if len(op1) == 1 else "[") + lo + "," + hi + (")" if len(op2) == 1 else "]")
    m = re.fullmatch(r"([^<>]+)(>=?)([^<>]+)", s)
    return m.group(3) + "<" + m.group(2)[1:] + m.group(1) if m else s


def _match_brace(s, i, pairs="{}()[]"):
    """Index of the bracket closing s[i] (one of `pairs`' openers); -1 if unbalanced. \\{ \\} are text."""
    depth, j = 0, i
    while j < len(s):
        if s[j] == "\\" and j + 1 < len(s) and s[j + 1] in "{}":
            j += 2
            continue
        depth += (s[j] in pairs[0::2]) - (s[j] in pairs[1::2])
        if depth == 0:
            return j
        j += 1
    return -1


_COMMAND, _BRACED = re.compile(r"\\[a-zA-Z]+"), re.compile(r"\\(frac|binom|sqrt)(?![a-zA-Z])")


def _take_arg(s, i):
    """One TeX argument at s[i]: a {group}, a \\command or one character. -> (text, next index)."""
    if i >= len(s):
        return None, i
    if s[i] == "{":
        j = _match_brace(s, i)
        return (s[i + 1:j], j + 1) if j > 0 else (None, i)
    m = _COMMAND.match(s, i)
    return (m.group(0), m.end()) if m else (s[i], i + 1)


def _brace_args(s):
    """\\frac12 -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}, \\frac\\pi4 -> \\frac{\\pi}{4} (no spaces left)."""
    out, i = [], 0
    while i < len(s):
        m = _BRACED.match(s, i)
        if not m:
            out.append(s[i])
            i += 1
            continue
        out.append(m.group(0))
        i = m.end()
        if m.group(1) == "sqrt" and s.startswith("[", i):
            j = s.find("]", i)
            out.append(s[i:j + 1] if j > 0 else s[i:])
            i = j + 1 if j > 0 else len(s)
        for _ in range(1 if m.group(1) == "sqrt" else 2):
            arg, i = _take_arg(s, i)
            if arg is None:
                break
            out.append("{" + _brace_args(arg) + "}")
    return "".join(out)


MAX_ANSWER_CHARS = 1000


def is_equiv(pred, gold, timeout=2.0):
    """True when the answer `pred` equals `gold` (see the rules above). None is never equal.
    Decisions for the ambiguous cases:
    - decimal vs exact: equal to relative 1e-6 (against a fraction, also to half a unit of the last
      digit written): 0.5 = 1/2, 0.3333333 = 1/3, but 0.333 != 1/3, 1.414 != \\sqrt{2}. MATH asks for
      exact answers; rounding is the question's to ask for.
    - unreduced vs reduced fraction: equal (\\frac{411}{333} = \\frac{137}{111}): the value is the answer.
    - percentage: 50\\% equals 50 (answer fields drop the sign of a whole or decimal number) and 0.5;
      without a % sign, 50 and 0.5 differ.
    - C = (C) = \\text{(C)}; a point is not a set: (1,2) != 1,2; a value listed twice is one value.
    - commas: 45,135 is 45135 or the list 45, 135, and 2,74 the list or 2.74 (equal under any reading
      is equal); '32, 349', with a space, is a list. A base subscript is part of the number: 204_5 != 54.
    """
    if pred is None or gold is None:
        return False
    if max(len(str(pred)), len(str(gold))) > MAX_ANSWER_CHARS:  # no real answer is this long: exact text only
        return str(pred).strip() == str(gold).strip()
    commas = re.search(r"\d,\d", str(pred) + str(gold))
    readings = ("thousands", "list", "decimal") if commas else ("thousands",)
    try:  # '45,135' is 45135 or the list 45, 135: equal under any reading of its commas is equal
        for comma in readings:
            a, b = normalize_answer(pred, comma), normalize_answer(gold, comma)
            if _is_equation(b) and "=" in a and _equiv(a, b, timeout):
                return True
            if a == b or (not _is_equation(b) and _equiv(_value(a), _value(b), timeout)):
                return True
        return False
    except RecursionError:  # braces nested hundreds deep: not an answer
        return False


def _split_top(s, sep):
    """s split at `sep` outside any brackets."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1:i + 2] in ("{", "}"):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        depth += (s[i] in "{([") - (s[i] in "})]")
        if depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i = i + len(sep)
            continue
        i += 1
    return parts + [s[start:]]


def _pm(items):
    """Each item with one \\pm (or \\mp) is the two values it stands for."""
    return [x.replace(pm, sign, 1) for x in items for pm in ("\\pm", "\\mp") if x.count(pm) == 1
            for sign in "+-"] + [x for x in items if x.count("\\pm") + x.count("\\mp") != 1]


def _structure(s):
    """(kind, brackets, items): 'union' of intervals, 'matrix', 'seq' (tuple or interval), 'set', 'scalar'."""
    parts = _split_top(s, "\\cup")
    if len(parts) > 1:
        return "union", "", parts
    s = re.sub(r"^[(\[](\\begin\{.*\})[)\]]$", r"\1", s)
    m = re.fullmatch(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[lcr|]*\})?(.*)\\end\{\1\}", s)
    if m:
        rows = [r for r in re.split(r"\\\\|\\(?![a-zA-Z])", m.group(2)) if r]  # '\\' rows (MATH's field: '\')
        return "matrix", str([len(r.split("&")) for r in rows]), [c for r in rows for c in r.split("&")]
    if s.startswith("\\{") and s.endswith("\\}"):
        return "set", "", _pm(_drop_common_lhs(_split_top(s[2:-2], ",")))
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and _match_brace(s, 0) == len(s) - 1:
        items = _split_top(s[1:-1], ",")
        if len(items) > 1:
            return "seq", s[0] + s[-1], items
    items = _split_top(s, ",")
    if len(items) > 1:
        return "set", "", _pm(_drop_common_lhs([x for x in items if x]))
    if s.count("\\pm") + s.count("\\mp") == 1:
        return "set", "", _pm([s])
    return "scalar", "", [s]


def _equiv(a, b, timeout):
    if a == b:
        return True
    (ka, ba, xs), (kb, bb, ys) = _structure(a), _structure(b)
    if ka in ("set", "union"):  # a value listed twice is one value
        xs, ys = list(dict.fromkeys(xs)), list(dict.fromkeys(ys))
    if ka != kb or ba != bb or len(xs) != len(ys):
        return False
    if ka == "scalar":
        return _scalar_equiv(a, b, timeout)
    named = [{m.group(1) for m in map(_LHS.fullmatch, z) if m} for z in (xs, ys)]
    if ka in ("seq", "matrix") or (ka == "set" and bool(named[0]) != bool(named[1])):
        xs, ys = [_drop_lhs(x) for x in xs], [_drop_lhs(y) for y in ys]  # bare values: in the named order
        return all(_equiv(x, y, timeout) for x, y in zip(xs, ys))
    left = list(ys)  # sets and unions: match each item once, in any order
    for x in xs:
        hit = next((j for j, y in enumerate(left) if _equiv(x, y, timeout)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def _to_number(s):
    """Plain numbers, exactly, with the count of decimals written: '-3', '2.50', '7/2', '\\frac{7}{2}',
    '-\\frac{7}{2}', '3\\frac{1}{2}' (mixed) -> (Rational, decimals); None for anything else."""
    m = re.fullmatch(r"([-+]?)(\d*)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m:
        sign, whole, num, den = m.groups()
        value = int(whole or 0) + sympy.Rational(int(num), int(den)) if int(den) else None
        return None if value is None else ((-value if sign == "-" else value), 0)
    m = re.fullmatch(r"([-+]?\d+(?:\.(\d+))?)(?:/(\d+(?:\.\d+)?))?", s)
    if not m or (m.group(3) is not None and float(m.group(3)) == 0):
        return None
    return sympy.Rational(m.group(1).lstrip("+")) / sympy.Rational(m.group(3) or 1), len(m.group(2) or "")


def _close(x, y):
    """Exact numbers are equal when equal; a written decimal also within relative 1e-6 and half a unit of
    its last digit (0.3333333 = 1/3, but 0.333 != 1/3 and 2039192.0 != 2039191)."""
    (x, dx), (y, dy) = x, y
    d = max(dx, dy)
    return x == y or (d > 0 and abs(x - y) <= min(
        max(abs(x), abs(y)) / 10 ** 6, sympy.Rational(1, 2 * 10**d)))


def _scalar_equiv(a, b, timeout):
    if a.endswith("%") or b.endswith("%"):  # a percentage is its number, or that number / 100
        x, y = _to_number(a.rstrip("%")), _to_number(b.rstrip("%"))
        hundredth = x is not None and y is not None and _close(*[(v / 100, d + 2) if z[-1] == "%" else (v, d)
                                                                 for (v, d), z in ((x, a), (y, b))])
        bare = all(re.fullmatch(r"-?\d+(?:\.\d+)?%?", z) for z in (a, b) if z[-1] == "%")
        return hundredth or (bare and _scalar_equiv(a.rstrip("%"), b.rstrip("%"), timeout))
    x, y = _to_number(a), _to_number(b)
    if x is not None and y is not None:
        return _close(x, y)
    return _symbolic_equal(a, b, timeout)


_FUNCS = ("arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "sin", "cos", "tan", "cot", "sec", "csc",
          "ln", "log", "exp")
_SYMBOLS = {"pi": "pi", "infty": "oo", "cdot": "*", "times": "*", "div": "/", "theta": "theta",
            "alpha": "alpha", "beta": "beta", "gamma": "gamma", "phi": "phi", "omega": "omega",
            "lambda": "lamda"}
_SYMPY = {name: getattr(sympy, name) for name in (
    "Integer", "Float", "Rational", "Symbol", "Function", "Add", "Mul", "Pow", "sqrt", "pi", "oo", "E", "I",
    "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh", "tanh", "log", "exp",
    "binomial", "factorial")}
_SYMPY.update(arcsin=sympy.asin, arccos=sympy.acos, arctan=sympy.atan, ln=sympy.log, __builtins__={})


def latex_to_expr(s):
    """Translate a normalised LaTeX answer into a plain expression string for sympy ('2\\sqrt{3}' ->
    '2sqrt((3))'); None for anything outside the small supported subset (the answer then only counts
    as equal by string)."""
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            m = _COMMAND.match(s, i)
            if not m:
                return None
            name, i = m.group(0)[1:], m.end()
            if name in ("frac", "binom"):
                a, i = _take_arg(s, i)
                b, i = _take_arg(s, i)
                a, b = latex_to_expr(a or ""), latex_to_expr(b or "")
                if not a or not b:
                    return None
                # a whole number before \frac: a mixed number, 3\frac{1}{2} = 7/2 (x^2\frac{1}{2}: a product)
                whole = re.search(r"(?:^|(?<=[+\-(, ]))\d+$", "".join(out)) if name == "frac" else None
                if whole:
                    out = ["".join(out)[:whole.start()], f"({whole.group(0)}+({a})/({b}))"]
                else:
                    out.append(f"(({a})/({b}))" if name == "frac" else f"binomial({a},{b})")
            elif name == "sqrt":
                root = None
                if s.startswith("[", i):
                    j = s.find("]", i)
                    root, i = latex_to_expr(s[i + 1:j]) if j > 0 else None, j + 1
                    if not root:
                        return None
                a, i = _take_arg(s, i)
                a = latex_to_expr(a or "")
                if not a:
                    return None
                out.append(f"(({a})**(1/({root})))" if root else f"sqrt({a})")
            elif name in _SYMBOLS:
                out.append(f" {_SYMBOLS[name]} ")
            else:  # a function: \cos 58, \cotx (MATH's answer field lost the space), \sin(x), \log{x}
                fn = next((f for f in _FUNCS if name.startswith(f)), None)
                if fn is None:
                    return None
                arg, power = name[len(fn):], None
                if not arg and s.startswith("^", i):  # \sin^2 x = (sin x)^2
                    power, i = _take_arg(s, i + 1)
                    power = latex_to_expr(power or "")
                    if not power:
                        return None
                if not arg:
                    if s.startswith("(", i) and not power:
                        out.append(fn)
                        continue
                    if s.startswith("(", i):
                        j = _match_brace(s, i)
                        arg, i = (s[i + 1:j], j + 1) if j > 0 else (None, i)
                    else:
                        m = None if s.startswith("{", i) else re.compile(r"\d+(\.\d+)?|[a-zA-Z]").match(s, i)
                        arg, i = (m.group(0), m.end()) if m else _take_arg(s, i)
                arg = latex_to_expr(arg or "")
                if not arg:
                    return None
                out.append(f"({fn}({arg}))**({power})" if power else f"{fn}({arg})")
        elif c == "{":
            j = _match_brace(s, i)
            inner = latex_to_expr(s[i + 1:j]) if j > 0 else None
            if not inner:
                return None
            out.append(f"({inner})")
            i = j + 1
        elif c == "^":
            out.append("**")
            i += 1
        elif c.isalnum() or c in "+-*/().!":
            out.append(c)
            i += 1
        else:
            return None
    return "".join(out).strip() or None


def _parse(expr):
    """sympy expression of a latex_to_expr string. The string is checked first (letters, digits,
    operators and brackets; no keyword, no underscore, no attribute access) and names resolve only to
    the functions in _SYMPY or to new symbols, so the text cannot reach anything else. Powers with
    exponents of 10^4 or more and factorials other than n! (n < 1000, or a symbol) are refused: big
    integer arithmetic runs in C, where the timer cannot stop it."""
    if (len(expr) > 300 or not re.fullmatch(r"[A-Za-z0-9+\-*/().,! ]+", expr)
            or re.search(r"\.\s*[A-Za-z]", expr)
            or any(keyword.iskeyword(w) for w in re.findall(r"[A-Za-z]+", expr))
            or any(not re.search(r"(?:(?<!\d)\d{1,3}|[A-Za-z])\s*$", expr[:m.start()])
                   for m in re.finditer("!", expr))):
        raise ValueError(f"refused: {expr!r}")
    lazy = parse_expr(expr, local_dict={}, global_dict=_SYMPY, transformations=_TRANSFORMS, evaluate=False)
    for node in sympy.preorder_traversal(lazy):
        if isinstance(node, sympy.Pow) and not node.exp.free_symbols:
            size = abs(complex(node.exp.evalf(8)))
            if not size < 1e4:
                raise ValueError(f"refused: exponent {node.exp} too large")
    full = parse_expr(expr, local_dict={}, global_dict=_SYMPY, transformations=_TRANSFORMS)
    return full.subs(sympy.Symbol("i"), sympy.I)


_TRANSFORMS = standard_transformations + (implicit_multiplication_application,)


class _Timeout(BaseException):
    pass


@contextlib.contextmanager
def _time_limit(seconds):
    """Raise _Timeout in the main thread after `seconds`; a timer the caller had set is put back after."""
    def expire(signum, frame):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    pending, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - start), 1e-3), interval)


_warned_thread = []


@functools.lru_cache(maxsize=65536)
def _symbolic_equal(a, b, timeout):
    """a == b through sympy (expressions: simplify(x - y) == 0; numbers: relative 1e-6; equations and
    inequalities: the sides' differences proportional) within `timeout` seconds; False when undecided."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        if not _warned_thread:  # the timer needs the main thread; outside it only string equality counts
            _warned_thread.append(1)
            print("data.is_equiv: not in the main thread, symbolic equivalence is off (string, number rules)")
        return False
    rel = [re.fullmatch(r"([^<>=!]+)(<=|<|!=|=)([^<>=!]+)", s) for s in (a, b)]
    if bool(rel[0]) != bool(rel[1]) or (rel[0] and rel[0].group(2) != rel[1].group(2)):
        return False
    ea, eb = (latex_to_expr("{%s}-{%s}" % (m.group(1), m.group(3)) if m else s) for m, s in zip(rel, (a, b)))
    if ea is None or eb is None:
        return False
    try:
        with _time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sympy's deprecation notes on odd input (a tuple times x)
            x, y = _parse(ea), _parse(eb)
            if rel[0]:  # the same solutions: one side-difference is a constant times the other (> 0 for <)
                ratio = sympy.simplify(x / y)
                return bool(ratio.is_number and ratio.is_finite and ratio != 0
                            and (rel[0].group(2)[0] in "=!" or ratio > 0))
            if x == y:
                return True
            if not (x.free_symbols or y.free_symbols):
                vx, vy = complex(x.evalf(30)), complex(y.evalf(30))
                finite = all(map(math.isfinite, (vx.real, vx.imag, vy.real, vy.imag)))
                return finite and abs(vx - vy) <= 1e-6 * max(abs(vx), abs(vy)) + 1e-12
            if sympy.expand(x - y) == 0:
                return True
            return x.free_symbols == y.free_symbols and sympy.simplify(x - y) == 0
    except _Timeout:
        return False
    except Exception:  # anything sympy cannot parse or decide is not equal
        return False


# ----------------------------------------------------------------------------------------------
# Steps. "".join(split_steps(s, fmt)) == s for every string s.
# ----------------------------------------------------------------------------------------------
_FENCE_CLOSE = re.compile(r"^```[ \t]*(?:\n|$)", re.M)


def split_steps(solution, fmt="cot", delim="\n\n"):
    """The steps of a solution. "cot": a step ends after a run of `delim` (plus any further newlines);
    "code": text, code and execution blocks (see the module docstring). Whitespace-only pieces join
    the step before them (the first step keeps leading whitespace), so no step is blank."""
    if fmt == "cot":
        cuts = [m.end() for m in re.finditer(f"(?:{re.escape(delim)})+\n*", solution)]
    elif fmt == "code":
        cuts, i = [], 0
        while i < len(solution):
            fence = solution.startswith(CODE_START, i) or solution.startswith(OUTPUT_START, i)
            if fence:  # a block runs to its closing fence line (to the end when unclosed)
                m = _FENCE_CLOSE.search(solution, solution.index("\n", i) + 1)
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
# Filters (METHOD.md sections 1 and 2). A solution is preferred when its answer is right and it shows
# no error or correction (the authors' scripts: no "error" / "apolog" anywhere, any case) and, for
# code, no execution error; dispreferred when its answer is wrong or missing; else neither.
# ----------------------------------------------------------------------------------------------
ERROR_MARKERS = ("error", "apolog")
_EXEC_ERROR = re.compile(r"Traceback \(most recent call last\)|\b\w*(?:Error|Exception)\b|[Tt]imed? ?out")


def has_exec_error(solution):
    """An execution block of a code-integrated solution reports an exception or a timeout."""
    return any(step_kind(s) == "output" and _EXEC_ERROR.search(s) for s in split_steps(solution, "code"))


def judge(solution, gold, fmt="cot"):
    """(label, answer): label is 'preferred', 'dispreferred', or 'flawed' (right answer but an
    error/apology marker or an execution error: neither side of a pair). Chain-of-thought answers may
    fall back to the last number; code-integrated ones must be \\boxed or stated."""
    pred = extract_answer(solution, fallback=fmt == "cot")
    if not is_equiv(pred, gold):
        return "dispreferred", pred
    lower = solution.lower()
    if any(mark in lower for mark in ERROR_MARKERS) or (fmt == "code" and has_exec_error(solution)):
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
            if kind != "text" and not _FENCE_CLOSE.search(inner):
                return "unclosed_block"
            if "```" in (inner if kind == "text" else inner[:_FENCE_CLOSE.search(inner).start()]):
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
    """The pair record of a question `record` (from load_records). The answers are extracted from the
    whole solutions (prefix + continuation); `sampling`: the settings that produced it (temperature,
    ramp, tries, seed ...)."""
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
    """The pair itself, after checking every field of PAIR_FIELDS (and the optional `prompt`: the exact
    text before the continuations, for pairs read from TRL's format) and that the pair can be trained
    on; else ValueError naming `where` and the field."""
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
    # pairs that would train on nothing, or on the wrong thing: a step-controlled pair without its shared
    # steps, a naive one with some, nothing to prefer, or the same text on both sides (margin always 0).
    # An empty rejected is allowed: a continuation that stops at once is a real wrong answer.
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
    kinds = set()

    def parse(row, where):
        kinds.add("TRL" if "prompt" in row else "scdpo")
        return from_trl(row, where) if "prompt" in row else check_pair(row, where)
    pairs = read_jsonl(path, parse)
    return (pairs, " + ".join(sorted(kinds, reverse=True)) or "scdpo") if with_format else pairs


# Provenance of a pairs file: `<pairs>.meta.json` records hashes of the model and tokenizer that sampled it
# (written last, so its presence also marks the file complete); scdpo.check_pairs_match refuses to train a
# model whose hashes differ. sample.py's CLI and scdpo.py's sampling stage both write it.
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
    """{'model': .., 'tokenizer': ..}: hashes of a hub folder's config + weights and of its tokenizer
    files."""
    def digest(files, sample=None):
        joined = "".join(sha256_file(f, sample) for f in sorted(files))
        return hashlib.sha256(joined.encode()).hexdigest()[:16]
    weights = glob.glob(os.path.join(path, "*.safetensors")) + [os.path.join(path, "config.json")]
    toks = [f for f in (os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json"))
            if os.path.exists(f)]
    return {"model": digest(weights, sample=1 << 20), "tokenizer": digest(toks)}


def pairs_meta_path(pairs_path):
    return pairs_path + ".meta.json"


def write_pairs_meta(pairs_path, model_dir, summary=None):
    """Write `<pairs>.meta.json` ({model, tokenizer} hashes of model_dir, plus the summary counts) atomically:
    a temporary file renamed into place. Call it once the pairs file is complete, on one process."""
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


# TRL's preference format: prompt, chosen, rejected. to_trl writes the prompt as the text the model
# sees (the chat template rendered around the question, then the prefix), since TRL feeds a string
# prompt verbatim; our other fields ride along, so that from_trl gives our record back. A foreign
# string row keeps its prompt verbatim too (field `prompt`, which tokenize_pair then uses as is); a
# conversational row (message lists) is rendered with the model's chat template, as TRL does.
def to_trl(pair, tok):
    """A TRL preference row of a pair record, the prompt rendered with `tok`'s chat template."""
    prompt = pair.get("prompt", tok.render_prompt(pair["question"], pair["prefix"]))
    return {**pair, "prompt": prompt}


def from_trl(row, where="TRL row"):
    """A pair record of a TRL row (see above): ours back exactly (with the prompt kept), a foreign
    string row as a naive pair with its prompt verbatim, a conversational one with the question from
    the user message and the prefix from an open assistant message after it (k: the prefix's last
    step). Other message lists, or a missing field, are a ValueError naming `where`."""
    for side in ("prompt", "chosen", "rejected"):
        if side not in row:
            raise ValueError(f"{where}: missing field {side!r} (TRL rows have prompt, chosen, rejected)")
    if isinstance(row["prompt"], str) and all(k in row for k in PAIR_FIELDS):
        return check_pair(dict(row), where)

    def texts(x, roles):   # [x] for a string; the contents of messages whose roles are one of `roles`
        if isinstance(x, str):
            return [x]
        if not isinstance(x, list) or [m.get("role") for m in x] not in roles:
            got = [m.get("role") for m in x] if isinstance(x, list) else type(x).__name__
            raise ValueError(f"{where}: messages with roles {got}, expected one of {list(roles)}")
        return [m["content"] for m in x]

    question, prefix = (texts(row["prompt"], (["user"], ["user", "assistant"])) + [""])[:2]
    (chosen,), (rejected,) = (texts(row[side], (["assistant"],)) for side in ("chosen", "rejected"))
    record = {"id": str(row.get("id", where)), "source": row.get("source", "trl"), "question": question,
              "gold": str(row.get("gold", ""))}
    k = len(split_steps(prefix)) - 1 if prefix else -1
    pair = make_pair(record, chosen, rejected, prefix=prefix, k=k)
    if isinstance(row["prompt"], str):
        pair["prompt"] = row["prompt"]
    return check_pair(pair, where)


# ----------------------------------------------------------------------------------------------
# Tokenised rows and batches. The prompt is tok.render_prompt(question, prefix): the question as the
# user turn, then the prefix as the start of the assistant turn, left open. Prompt + continuation is
# tokenised once and split at the character boundary (tok.encode_prompt_response). Every chosen and
# rejected of this project is a complete solution (sample.py drops samples cut off at max_new_tokens),
# so the end-of-turn token (tok.end_id: EOS, or the template's own, e.g. ChatML's <|im_end|>) follows it,
# unless max_len cut it short.
# A pair whose prompt is longer than max_prompt_len is dropped (never cut), and counted.
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
    n = 0  # both encodings share the prompt's ids; a token straddling the boundary is the continuation's
    while n < min(n_c, n_r) and ids_c[n] == ids_r[n]:
        n += 1
    if n == 0:  # the first continuation token is predicted by the last prompt token: there must be one
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
# (mask None); every real query only sees keys before it, padding included.
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
