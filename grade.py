"""Grading a solution's final answer: extract_answer takes it from the text, is_equiv judges it against
the gold answer (LaTeX normalised, then compared as numbers, as structures of several answers, and
symbolically with sympy under a time limit). tests/test_grade.py holds them against Math-Verify and
against human labels of real model-written solutions; README "Grading answers" has the numbers.
"""
import contextlib
import functools
import keyword
import math
import re
import signal
import threading
import time
import warnings

import sympy
from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                        standard_transformations)

# ----------------------------------------------------------------------------------------------
# Final answers. A solution's answer is that of its LAST marker, by position: \boxed{..} / \fbox{..}
# (boxes joined by commas or 'and' are one list), 'Final Answer: The final answer is X. I hope it is
# correct.' (Minerva), 'The answer is: X' (MetaMath), 'Answer: X', '#### N' (GSM8K).
# A marker's answer is the math span right after it, else its sentence (to '. ' or the line end);
# in a prose sentence, its last math expression ('The largest $n$ is 34.').
# No marker: the last math expression, i.e. the $..$ / \(..\) / \[..\] span, bare \frac / \sqrt or
# number that ends last (never a piece of a fraction).
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


def hash_answer(text):
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
# Equivalence, in four steps.
# 1. normalize_answer brings both answers to one canonical string: \dfrac -> \frac, no \left/\right,
#    spacing, \text{units}, degrees or dollars, thousands in every spelling (115{,}000, 1\,000, 1 000),
#    \frac12 -> \frac{1}{2}, 4 4/9 -> 4\frac{4}{9}, percent -> %, \le -> <=, 'and' / ';' -> ','.
#    Equal strings are equal answers.
# 2. The gold decides what '=' means: a gold equation (x^2+y^2=13) needs an equation with the same
#    solutions; else a chain a = b = c states its last side ('\frac{28}{4}=7' is 7).
# 3. Structures: unions, matrices (same shape), tuples and intervals (in order, brackets exact), sets
#    and lists (any order; named values match by name, bare ones in the gold's order).
# 4. Single values compare as exact numbers, then through sympy, under a timer (SIGALRM: main thread
#    only; elsewhere the symbolic step is off). Our own translator turns the LaTeX into a plain
#    expression, and every name in it is checked before sympy parses it.
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
    try:
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
        if not _warned_thread:  # SIGALRM works in the main thread only
            _warned_thread.append(1)
            print("grade.is_equiv: not in the main thread, so no symbolic equivalence (string, number rules)")
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
