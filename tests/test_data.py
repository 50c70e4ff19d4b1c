# python -m pytest -q tests/test_data.py
# data.py and grade.py: loaders, answer extraction and equivalence (each rule on a real MATH / GSM8K case), the
# acceptance numbers on the gold solutions, step splitting, the filters, pair records and TRL rows,
# tokenised pairs on the real Mistral tokenizer, and the packed batch against per-sequence forwards.
import json
import os
import time

import pytest
import torch

from conftest import DATA
import data
import grade
from data import split_steps
from grade import extract_answer, is_equiv

MISTRAL = os.path.join(DATA, "tokenizers", "mistral-7b-v0.1")


@pytest.fixture(scope="module")
def math_test():
    return data.load_records("math:test", root=DATA)


@pytest.fixture(scope="module")
def gsm8k_test():
    return data.load_records("gsm8k:test", root=DATA)


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,n,extra", [
    ("gsm8k:train", 7473, {"solution"}), ("gsm8k:test", 1319, {"solution"}),
    ("math:train", 7498, {"level", "subject"}),  # 2 problems have no answer: left out, with a message
    ("math:test", 5000, {"solution", "level", "subject"}),   # every record: the gold-agreement test's base
    ("math:test500", 500, {"solution", "level", "subject"}),
    ("svamp", 1000, set()), ("asdiv", 2215, set()), ("mawps", 2065, set())])
def test_load_named_sets(spec, n, extra):
    recs = data.load_records(spec, root=DATA)
    assert len(recs) == n
    assert all(set(r) == {"id", "source", "question", "gold"} | extra for r in recs)
    assert len({r["id"] for r in recs}) == n
    assert all(r["question"] and r["gold"] for r in recs)
    assert recs[0]["source"] == spec.split(":")[0]


def test_load_details(math_test):
    gsm = data.load_records("gsm8k:train", root=DATA)
    assert gsm[0]["gold"] == "72" and gsm[0]["id"] == "gsm8k/train/0"
    assert any(r["gold"] == "2125" for r in data.load_records("gsm8k:test", root=DATA))  # '#### 2,125'
    assert math_test[0]["id"] == "math/test/algebra/1.json" and math_test[0]["subject"] == "algebra"
    ids = {r["id"] for r in math_test}
    assert {r["id"] for r in data.load_records("math:test500", root=DATA)} <= ids   # MATH500 keeps MATH ids


def test_data_root_from_env(monkeypatch):
    monkeypatch.setenv("SCDPO_DATA", DATA)
    assert data.data_root() == DATA
    assert len(data.load_records("svamp")) == 1000


def test_any_jsonl_is_read_by_field_names(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"problem": "1+1?", "answer": "2", "id": "a"}\n\n{"question": "2+2?", "gold": 4, "id": "b"}\n'
                 '{"question": "3+3?", "answer": "3+3=6\\n#### 6"}\n')
    recs = data.load_records(str(p))
    assert recs == [{"id": "mine/a", "source": "mine", "question": "1+1?", "gold": "2"},
                    {"id": "mine/b", "source": "mine", "question": "2+2?", "gold": "4"},
                    {"id": "mine/2", "source": "mine", "question": "3+3?", "gold": "6", "solution": "3+3=6\n#### 6"}]
    assert data.load_records(f"{p},{p}", limit=1) == recs[:1] * 2                # each set cut to its first N
    assert [r["id"] for r in data.load_records("gsm8k,math500", limit=2, root=DATA)] == [
        "gsm8k/test/0", "gsm8k/test/1", "math/test/precalculus/807.json", "math/test/intermediate_algebra/1994.json"]


@pytest.mark.parametrize("text,message", [
    ('{"problem": "1+1?", "answer": "2"}\n{"problem": "x", "answer": \n',   # the line's end, not the next's
     r"mine.jsonl:2: not valid JSON \(Expecting value at column 28\)"),
    ('{"problem": "a\x01b", "answer": "2"}\n', r"mine.jsonl:1: not valid JSON \(Invalid control character at column 15\)"),
    ('{"problem": "1+1?", "answer": "2"}\n{"problem": "x", "ans',   # a reader of records skips nothing
     "mine.jsonl:2: not valid JSON .*the last line and has no newline: torn by a write killed midway"),
    ('{"problem": "1+1?", "answer": "2"}\n\n{"problem": "x"}\n',
     "mine.jsonl:3: missing field 'gold' or 'answer'"),   # file lines, blank ones counted
    ('{"answer": "2"}\n', "mine.jsonl:1: missing field 'question' \\(or 'problem'\\)"),
    ('{"problem": ["a"], "answer": "2"}\n', "mine.jsonl:1: field 'problem' is list"),
    ('[1, 2]\n', "mine.jsonl:1: expected a JSON object"),
    ('\n', "mine.jsonl: no records")])
def test_malformed_lines_name_file_line_field(tmp_path, text, message):
    p = tmp_path / "mine.jsonl"
    p.write_text(text)
    with pytest.raises(ValueError, match=message):
        data.load_records(str(p))


def test_unknown_set(tmp_path):
    with pytest.raises(ValueError, match="unknown data set"):
        data.load_records("gsm9k:test")
    with pytest.raises(FileNotFoundError, match="missing.jsonl: not found"):
        data.load_records("missing.jsonl")
    with pytest.raises(FileNotFoundError, match=r"train.jsonl: not found .* read from \$SCDPO_DATA"):
        data.load_records("gsm8k:train", root=str(tmp_path))   # a named set outside its folder


# ----------------------------------------------------------------------------------------------
# Answer extraction
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,answer", [
    # MATH test/precalculus: nested braces inside the box
    ("so the polar coordinates are $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    # the LAST box counts (MATH solutions box intermediate values too)
    ("First $\\boxed{2}$ then, correcting, $\\boxed{\\frac{1}{3}}$.", "\\frac{1}{3}"),
    # \fbox (MATH test/number_theory problem statement)
    ("Find $\\fbox{12}$.", "12"),
    # unbraced box, as models write it
    ("The total is $\\boxed 5$.", "5"),
    # escaped braces inside the box (set answers)
    ("The set is $\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),
    # a box cut off by the token limit: no answer
    ("so the answer is $\\boxed{\\frac{1}{", None),
    # GSM8K test #0
    ("She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18", "18"),
    # MetaMath's ending
    ("Janet makes 9 * $2 = $18.\nThe answer is: 18", "18"),
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    # word problems without a marker: the last number (a lone $ is money, not math)
    ("She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.", "18"),
    ("The total cost is $1,250.50 in all.", "1,250.50"),
    ("It drops to -5 degrees.", "-5"),
    ("No numbers here.", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_fallback_off():
    assert extract_answer("I got 18 in the end.", fallback=False) is None


# ----------------------------------------------------------------------------------------------
# Equivalence: one real case (MATH test solution's box vs its answer field, unless noted) per rule
# ----------------------------------------------------------------------------------------------
EQUAL = [
    ("18.00", "18"),                                    # trailing zeros (GSM8K-style)
    ("\\$15,\\!000", "15,000"),                         # dollars, \!, thousands commas
    ("2125", "2,125"),                                  # GSM8K test gold '#### 2,125'
    ("\\$18.90", "18.90"), ("\\$0.50", "0.5"),          # currency, trailing zero
    ("44\\%", "44"),                                    # percent
    ("575\\text{ students}", "575"), ("440\\text{ cm}^2", "440"), ("864 \\mbox{ inches}^2", "864\\mbox{inches}^2"),
    ("18 ways", "18"),                                  # a plain unit word after a number
    (".5", "\\frac{1}{2}"), ("0.5", "1/2"), ("1/2", "\\frac12"),  # 0.5 vs 1/2 vs \frac{1}{2}
    (".35625", "0.35625"),
    ("\\dfrac{9}{7}", "\\frac{9}{7}"), ("\\tfrac{10}{3}", "\\frac{10}{3}"),
    ("\\frac 54", "\\frac{5}{4}"), ("\\frac9{5}", "\\frac{9}{5}"), ("\\frac \\pi4 + 2 - \\sqrt2", "\\frac{\\pi}{4}+2-\\sqrt{2}"),
    ("\\sqrt5", "\\sqrt{5}"), ("-\\frac1{2x}", "-\\frac{1}{2x}"),
    ("\\left(1,\\frac{9}{2}\\right)", "(1,\\frac{9}{2})"),  # \left / \right
    ("60^\\circ", "60"), ("80^{\\circ}", "80"), ("69\\text{ degrees}", "69"),  # degrees
    ("5 \\sqrt{2}", "5\\sqrt{2}"), ("-12 + 15i", "-12+15i"),  # spacing
    ("371,\\!043,\\!400", "371,043,400"), ("\\!\\sqrt{33}", "\\sqrt{33}"),
    ("x = 4", "4"), ("y = 2x + 3", "2x+3"), ("x \\in [-2,7]", "x\\in[-2,7]"),  # a variable's name goes
    ("6\\frac15", "\\frac{31}{5}"), ("137 \\frac{1}{2}", "137.5"),   # mixed numbers
    ("x^2\\frac{1}{2}", "\\frac{x^2}{2}"), ("f(x) = x^2", "x^2"),
    ("7, -2, \\text{ and } -5", "-5, 7, -2"),           # lists: any order, 'and' as a comma
    ("\\frac{1}{5},\\frac{1}{4},\\frac{2}{5},\\frac{1}{2}", "\\frac12, \\frac25, \\frac14, \\frac15"),
    ("2 + \\sqrt{6}, 2 - \\sqrt{6}", "2-\\sqrt{6},2+\\sqrt{6}"),
    ("\\{1,2\\}", "2, 1"), ("x = 1, x = 2", "2, 1"), ("x=1, y=2", "y=2, x=1"),
    ("3 \\pm 2 \\sqrt{2}", "3-2\\sqrt{2},3+2\\sqrt{2}"),  # \pm as the two values
    ("\\left[ \\frac{3}{2}, 2 \\right)", "[\\frac{3}{2},2)"),  # intervals keep their brackets
    ("(-\\infty, \\tfrac37] \\cup [\\tfrac35, \\infty) ", "(-\\infty,\\frac{3}{7}]\\cup[\\frac{3}{5},\\infty)"),
    ("\\begin{pmatrix} 1/5 \\\\ -3/5 \\end{pmatrix}", "\\begin{pmatrix}1/5\\-3/5\\end{pmatrix}"),  # answer field's '\'
    ("\\begin{pmatrix} 0.2 \\\\ -0.6 \\end{pmatrix}", "\\begin{pmatrix}1/5\\\\-3/5\\end{pmatrix}"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),    # symbolic: sympy
    ("\\frac{2}{3} \\sqrt{3}", "\\frac{2\\sqrt{3}}{3}"),
    ("(x+5)^2", "x^2+10x+25"), ("3R^2", "3 R^2"), ("32R^2 - 3(a^2 + b^2 + c^2)", "32R^2-3a^2-3b^2-3c^2"),
    ("15i - 12", "-12+15i"), ("2\\sqrt[3]{2}", "\\sqrt[3]{16}"), ("\\binom{5}{2}", "10"),
    ("4x-5y=-50", "-4x+5y=50"),                         # equations: same solution set
    ("\\cot x", "\\cotx"), ("\\cos 58^\\circ", "\\cos58"),  # the answer field lost the space
    ("2\\tan x", "\\frac{2\\sin x}{\\cos x}"),
    ("Yes", "yes"), ("\\text{(C)}", "(C)"),             # ASDiv words; multiple choice
]

NOT_EQUAL = [
    ("16", "18"), ("0.333", "\\frac{1}{3}"), ("0.0000673", "0.0000672"),
    ("(4,5)", "(5,4)"),                                  # tuples are ordered
    ("(-\\infty,0]", "(-\\infty,0)"), ("[1,2]", "(1,2)"),  # open vs closed
    ("(1,2)", "1,2"),                                    # a point is not a set of two numbers
    ("1,2", "1,2,3"), ("2,2", "2"), ("x=1,y=2", "x=2,y=1"), ("x=1,y=2", "2,1"),  # named values keep names
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1&2\\end{pmatrix}"),  # shape matters
    ("x^2+1", "x^2-1"), ("2x+3", "2y+3"), ("4x-5y=-50", "4x-5y=50"),
    ("\\sqrt{2}", "1.414"), ("10", "10\\sqrt{2}"), ("3\\sqrt{3}", "\\sqrt{3}"),
    (None, "5"), ("5", None), ("", "0"),
]


@pytest.mark.parametrize("pred,gold", EQUAL)
def test_equal(pred, gold):
    assert is_equiv(pred, gold) and is_equiv(gold, pred)


@pytest.mark.parametrize("pred,gold", NOT_EQUAL)
def test_not_equal(pred, gold):
    assert not is_equiv(pred, gold) and not is_equiv(gold, pred)


def test_shuffled_math_answers_are_not_equal(math_test):
    """No false positives among 5000 mismatched MATH answers (neighbours in the file), unless the
    two golds really are the same value."""
    golds = [r["gold"] for r in math_test]
    wrong = [(a, b) for a, b in zip(golds, golds[1:] + golds[:1])
             if is_equiv(a, b) and grade.normalize_answer(a) != grade.normalize_answer(b)]
    assert wrong == []


@pytest.mark.parametrize("text", [
    "__import__('os').system('echo pwned')", "().__class__.__bases__", "lambda: 1", "x.y", "a_b", "[1][0]",
    "\\x\\y", "\\text{lambda}", "9!!", "(10^{6})!", "1001!"])
def test_model_text_is_never_evaluated(text):
    expr = grade.latex_to_expr(grade.normalize_answer(text))
    if expr is not None:
        with pytest.raises(ValueError, match="refused"):
            grade._parse(expr)
    assert not is_equiv(text, "1")


def test_python_syntax_is_refused():
    for expr in ("x if y else z", "lambda", "not x", "x.real", "x_1", "f'{x}'", "x[0]", "x = 1"):
        with pytest.raises(ValueError, match="refused"):
            grade._parse(expr)


@pytest.mark.parametrize("text", ["open(1)", "exec", "eval(x)", "print"])
def test_names_are_only_symbols(text):
    """Names outside the whitelist of sympy functions become symbols, never Python builtins."""
    e = grade._parse(grade.latex_to_expr(text))
    assert isinstance(e, grade.sympy.Basic) and e.free_symbols


def test_sympy_work_is_bounded():
    t = time.time()
    assert not is_equiv("9^{9^{9^{9}}}", "1")          # refused before evaluating
    assert not is_equiv("100000!", "1")
    assert not is_equiv("\\frac{" * 90 + "1}{2}" * 90, "1")      # deep nesting
    assert not is_equiv("\\frac{" * 2000 + "1}{2}" * 2000, "1")  # past MAX_ANSWER_CHARS: exact text only
    assert is_equiv("1" * 2000, "1" * 2000)
    assert time.time() - t < 2
    t = time.time()
    with pytest.raises(grade._Timeout):
        with grade._time_limit(0.2):
            while True:
                pass
    assert time.time() - t < 1
    import signal                                        # a timer of the caller's survives the grader's own
    old = signal.signal(signal.SIGALRM, lambda *a: None)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        assert is_equiv("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}")
        assert 25 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------------------------
# Acceptance: the gold solutions grade as correct
# ----------------------------------------------------------------------------------------------
def test_gsm8k_gold_solutions(gsm8k_test):
    assert all(is_equiv(extract_answer(r["solution"]), r["gold"]) for r in gsm8k_test)            # 1319/1319
    # without the '#### N' line the last number of the text decides: this is what fails, and why
    # (the last number written is not the answer); the full solution is what counts above
    stripped = [r for r in gsm8k_test if not is_equiv(extract_answer(r["solution"].split("####")[0]), r["gold"])]
    assert len(stripped) < 50
    assert all(is_equiv(extract_answer(r["solution"].replace("#### ", "")), r["gold"]) for r in gsm8k_test)


# MATH test: the last box of the solution vs the `answer` field. Every disagreement is the answer
# field's fault (it was made by an older normaliser):
MATH_DISAGREEMENTS = {
    "math/test/algebra/1861.json": "box '10\\sqrt 2'; the field's normaliser braced the space: '10\\sqrt{}2'",
    "math/test/intermediate_algebra/2169.json": "box '\\sqrt 5'; field '\\sqrt{}5', the same bug",
    "math/test/intermediate_algebra/78.json": "box '1+\\sqrt 2,\\ 1-\\sqrt 2,..'; field '1+\\sqrt{}2,\\1-..', same bug",
    "math/test/geometry/1107.json": "box '\\frac \\pi4 + 2 - \\sqrt2'; field '\\frac{\\}{p}i4+2-\\sqrt{2}' (\\frac split '\\pi')",
    "math/test/algebra/2329.json": "box '19 \\text{ and }43' (two answers); field kept only '19'",
    "math/test/prealgebra/1124.json": "box '12\\text{ and }13'; field kept only '12'",
    "math/test/precalculus/870.json": "box '7, -2, \\text{ and } -5'; field '7,-2,' lost the -5",
    "math/test/prealgebra/177.json": "box '12'; field is a sentence of the solution ('thecorrectansweraswenormallydo,...')",
    # two boxes joined by 'and' are one list answer (a model's '\boxed{-2} and \boxed{1}'); the field kept one
    "math/test/algebra/1878.json": "'the answers are $\\boxed{-2}$ and $\\boxed{1}$'; field '1'",
    "math/test/precalculus/679.json": "'\\boxed{\\frac{\\pi}{4}}$ and $\\boxed{\\frac{5\\pi}{4}}'",
    "math/test/precalculus/1227.json": "'$a = \\boxed{-1}$ and $a = \\boxed{2}$'; field '2'",
    "math/test/intermediate_algebra/1855.json": "'\\boxed{ -\\tfrac32}$ and $x = \\boxed{-\\tfrac34}'",
    "math/test/intermediate_algebra/25.json": "'\\boxed{(10, 0)}$ and $\\boxed{(0,0)}' (either); field: one",
    "math/test/intermediate_algebra/702.json": "'\\boxed{..} \\text{ and } \\boxed{..}' (either); field: one",
}


def test_math_gold_solutions(math_test):
    t = time.time()
    assert len(math_test) == 5000   # a loader that drops records must not make the rate look better
    disagree = {r["id"] for r in math_test if not is_equiv(extract_answer(r["solution"]), r["gold"])}
    assert disagree == set(MATH_DISAGREEMENTS)
    assert 1 - len(disagree) / len(math_test) >= 0.995      # 4986 / 5000 = 99.72%
    assert time.time() - t < 60


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------
def test_split_invariant_on_all_gold_solutions(math_test, gsm8k_test):
    for r in math_test + gsm8k_test:
        s = r["solution"]
        for fmt, delim in (("cot", "\n\n"), ("cot", "\n"), ("code", "\n\n")):
            steps = split_steps(s, fmt, delim)
            assert "".join(steps) == s
            assert all(step.strip() for step in steps)
    gsm = split_steps(gsm8k_test[0]["solution"], "cot", "\n")
    assert gsm == ["Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n",
                   "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.\n", "#### 18"]


def test_auto_delimiter_finds_the_steps_of_line_and_paragraph_solutions(gsm8k_test):
    """GSM8K's solutions (and MetaMath's) are a step a line; ProcessBench's model-written solutions, as
    the models wrote them, a step a paragraph. "auto" recovers both; either fixed delimiter fails one."""
    lines = [r["solution"] for r in gsm8k_test if "\n\n" not in r["solution"]]   # all but a stray one or two
    assert len(lines) >= len(gsm8k_test) - 2
    for s in lines:
        assert split_steps(s, "cot", "auto") == s.splitlines(keepends=True) and len(split_steps(s, "cot")) == 1
    for name in ("gsm8k", "math"):
        with open(os.path.join(DATA, "processbench", f"{name}.json")) as f:
            solutions = [p["steps"] for p in json.load(f) if len(p["steps"]) > 1]
        for steps in solutions:
            text = "\n\n".join(s.strip() for s in steps)
            assert [s.strip() for s in split_steps(text, "cot", "auto")] == [s.strip() for s in steps]
        assert sum(any("\n" in s.strip() for s in steps) for steps in solutions) > 50   # lines inside steps


@pytest.mark.parametrize("text,delim,steps", [
    ("", "\n\n", []),
    ("one", "\n\n", ["one"]),
    ("a\n\nb\n\nc", "\n\n", ["a\n\n", "b\n\n", "c"]),
    ("a\n\n\n\nb\n\n", "\n\n", ["a\n\n\n\n", "b\n\n"]),        # runs of the delimiter stay in one step
    ("\n\n  a\n\nb", "\n\n", ["\n\n  a\n\n", "b"]),             # leading whitespace joins the first step
    ("a\nb\n\nc \n", "\n", ["a\n", "b\n\n", "c \n"]),
    ("a;b;c", ";", ["a;", "b;", "c"]),
])
def test_split_cot_edges(text, delim, steps):
    assert split_steps(text, "cot", delim) == steps


CODE = ("Let me add them.\n```python\nprint(sum(range(10)))\n```\n```output\n45\n```\n"
        "The sum is 45. Then double it.\n```python\nprint(2 * 45)\n```\n```output\n90\n```\nSo the answer is $\\boxed{90}$.")


def test_split_code():
    steps = split_steps(CODE, "code")
    assert "".join(steps) == CODE
    assert [data.step_kind(s) for s in steps] == ["text", "code", "output", "text", "code", "output", "text"]
    assert steps[1] == data.CODE_START + "print(sum(range(10)))\n" + data.CODE_END
    assert steps[2] == data.OUTPUT_START + "45\n" + data.OUTPUT_END
    unclosed = "Compute.\n```python\nprint(1"                      # a generation cut inside a code block
    assert split_steps(unclosed, "code") == ["Compute.\n", "```python\nprint(1"]
    assert split_steps("```python\nx=1\n```\n\n```output\n\n```\n", "code") == ["```python\nx=1\n```\n\n", "```output\n\n```\n"]
    lead = split_steps("\n```python\nx=1\n```\n", "code")                # leading whitespace stays on the block
    assert lead == ["\n```python\nx=1\n```\n"] and data.step_kind(lead[0]) == "code"


def test_cut_points():
    steps = split_steps(CODE, "code")
    assert data.cut_points(steps, "paper") == [0, 2, 3, 5]        # never right after a code block
    assert data.cut_points(steps, "scripts") == [2, 3]            # second block .. third-to-last
    cot = ["a\n\n", "b\n\n", "c\n\n", "d"]
    assert data.cut_points(cot) == [0, 1, 2] and data.cut_points(cot, "scripts") == [1]


# ----------------------------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------------------------
GSM0 = "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n\nShe makes 9 * 2 = $18 every day.\n\nThe answer is: 18"


@pytest.mark.parametrize("solution,fmt,label", [
    (GSM0, "cot", "preferred"),
    (GSM0.replace("18 every", "20 every").replace(": 18", ": 20"), "cot", "dispreferred"),  # wrong
    ("Janet sells eggs.", "cot", "dispreferred"),                                           # no answer
    (GSM0.replace("She makes", "Sorry, I made an Error. She makes"), "cot", "flawed"),    # 'error' marker
    (GSM0.replace("She makes", "I apologize. She makes"), "cot", "flawed"),               # 'apolog' marker
    (CODE, "code", "preferred"),
    (CODE.replace("\\boxed{90}", "\\boxed{91}"), "code", "dispreferred"),
    (CODE.replace("So the answer is $\\boxed{90}$", "Done: 90"), "code", "dispreferred"),  # code: no last-number fallback
    (CODE.replace("45\n```\nThe", "Traceback (most recent call last):\nZeroDivisionError: division by zero\n```\nThe"),
     "code", "flawed"),                                                  # an execution error
    (CODE.replace("45\n```\nThe", "Timed out\n```\nThe"), "code", "flawed"),
    (CODE.replace("45\n```\nThe", "PermissionError: blocked in the sandbox: open\n```\nThe"), "code", "flawed"),
    (CODE.replace("45\n```\nThe", "SystemExit: 1\n```\nThe"), "code", "flawed"),        # sys.exit(1)
    (CODE.replace("45\n```\nThe", "StopIteration\n```\nThe"), "code", "flawed"),
    (CODE.replace("```python\nprint(2", "```py\nprint(2"), "code", "flawed"),   # its output the model wrote
    ("So:\n```output\n90\n```\nThe answer is $\\boxed{90}$.", "code", "flawed"),
])
def test_judge(solution, fmt, label):
    assert data.judge(solution, "18" if fmt == "cot" else "90", fmt)[0] == label


def test_noisy():
    assert data.is_noisy(CODE, "code") is None and data.is_noisy(GSM0, "cot") is None
    assert data.is_noisy("a\n\n" * 25, "cot") == "too_many_blocks"
    assert data.is_noisy("a\n\n" * 24, "cot") is None
    assert data.is_noisy("x" * 3001, "cot") == "long_block"
    assert data.is_noisy("x" * 3000, "cot") is None
    assert data.is_noisy("So\n```python\nprint(1)\n```output\n1\n```\n", "code") == "delimiter_in_block"
    assert data.is_noisy("So ``` here\n", "code") == "delimiter_in_block"
    assert data.is_noisy("```output\n1\n```python\n```\n", "code") == "delimiter_in_block"
    assert data.is_noisy("So\n```python\nprint(1)", "code") == "unclosed_block"
    assert data.is_noisy("ab\n" * 30, "cot", delim="\n", max_blocks=24) == "too_many_blocks"


# ----------------------------------------------------------------------------------------------
# Pair records and TRL rows
# ----------------------------------------------------------------------------------------------
REC = {"id": "gsm8k/train/0", "source": "gsm8k", "question": "Natalia sold clips to 48 friends in April, half as many in May. Total?", "gold": "72"}
STEPS = ["Natalia sold 48/2 = 24 clips in May.\n\n", "Natalia sold 48+24 = 72 clips altogether.\n\n", "The answer is: 72"]


def _pairs():
    naive = data.make_pair(REC, "".join(STEPS), "She sold 48 clips.\n\nThe answer is: 48", sampling={"temperature": 1.0})
    sc = data.make_pair(REC, "".join(STEPS[1:]), "Natalia sold 48+24 = 70 clips.\n\nThe answer is: 70",
                        prefix=STEPS[0], k=0, sampling={"t_start": 1.1, "t_inc": 0.05, "t_max": 1.4, "tries": 3})
    return naive, sc


def test_make_pair():
    naive, sc = _pairs()
    assert naive["kind"] == "naive" and naive["k"] == -1 and naive["prefix"] == ""
    assert (naive["chosen_answer"], naive["rejected_answer"], naive["gold"]) == ("72", "48", "72")
    assert sc["kind"] == "sc" and sc["k"] == 0 and sc["prefix"] + sc["chosen"] == "".join(STEPS)
    assert (sc["chosen_answer"], sc["rejected_answer"]) == ("72", "70")
    assert set(sc) == set(data.PAIR_FIELDS)
    with pytest.raises(ValueError):
        data.make_pair(REC, "a", "b", prefix="x", k=-1)


def test_pair_jsonl_round_trip(tmp_path):
    pairs = list(_pairs())
    path = str(tmp_path / "pairs.jsonl")
    data.write_jsonl(path, pairs[:1])
    data.write_jsonl(path, pairs[1:], append=True)
    assert data.read_pairs(path) == pairs
    bad = dict(pairs[1])
    del bad["rejected"]
    with open(path, "a") as f:
        f.write(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: missing field 'rejected'"):
        data.read_pairs(path)
    with open(path, "w") as f:
        f.write(json.dumps({**pairs[0], "k": "0"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: field 'k' is str"):
        data.read_pairs(path)


# ----------------------------------------------------------------------------------------------
# Tokenised pairs and batches (the real Mistral tokenizer; a tiny random model from model.py)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from model import Tokenizer
    return Tokenizer.from_pretrained(MISTRAL)


def test_tokenize_pair_loss_mask_is_the_continuation(tok):
    for pair in _pairs():
        row = data.tokenize_pair(pair, tok)
        prompt_text = tok.render_prompt(pair["question"], pair["prefix"])
        assert row["prompt"] == tok.encode(prompt_text)                         # the prompt, whole
        for side in ("chosen", "rejected"):
            whole = tok.encode(prompt_text + pair[side])                        # tokenised once
            assert row["prompt"] + row[side] == whole + [tok.eos_id]           # EOS after a complete solution
            assert tok.decode(row[side][:-1]) == pair[side]
            assert not row[side + "_truncated"]
        batch = data.collate_pairs([row], packed=False)
        for s, side in enumerate(("chosen", "rejected")):                      # targets: exactly the continuation
            sel = batch["seg"] == s
            assert batch["tgt"][sel].tolist() == row[side]
            flat = batch["input_ids"].view(-1)
            assert flat[batch["idx"][sel] + 1].tolist() == row[side]           # each target is the next token


def test_tokenize_pairs_truncation_and_drops(tok):
    naive, sc = _pairs()
    long_q = dict(naive, question="How many? " * 300)
    msgs = []
    rows = data.tokenize_pairs([naive, sc, long_q], tok, max_len=70, max_prompt_len=55, log=msgs.append,
                               warn=lambda m: None)
    assert len(rows) == 2 and len(msgs) == 1
    assert "kept 2/3" in msgs[0] and "dropped 1 (prompt > 55 tokens)" in msgs[0]
    n_trunc = {side: sum(r[side + "_truncated"] for r in rows) for side in ("chosen", "rejected")}
    assert f"chosen {n_trunc['chosen']}, rejected {n_trunc['rejected']}" in msgs[0]
    for r, pair in zip(rows, (naive, sc)):
        full = data.tokenize_pair(pair, tok, max_len=4096, max_prompt_len=2048)
        for side in ("chosen", "rejected"):
            assert len(r["prompt"]) + len(r[side]) <= 70
            assert r[side + "_truncated"] == (len(full["prompt"]) + len(full[side]) > 70)
            if r[side + "_truncated"]:                                          # cut: no EOS, a prefix of the full one
                assert len(r["prompt"]) + len(r[side]) == 70 and r[side] == full[side][:len(r[side])]
            else:
                assert r[side] == full[side] and r[side][-1] == tok.eos_id
    assert n_trunc == {"chosen": 2, "rejected": 1}
    assert data.tokenize_pair(long_q, tok) is None


def test_tokenize_sft(tok):
    row = data.tokenize_sft(REC["question"], "".join(STEPS), tok)
    assert row["prompt"] + row["response"] == tok.encode(tok.render_prompt(REC["question"]) + "".join(STEPS)) + [tok.eos_id]
    batch = data.collate_sft([row, data.tokenize_sft("1+1?", "2", tok)])
    assert batch["mask"] is None and batch["lengths"].tolist() == [len(row["response"]), 2]
    flat = batch["input_ids"].view(-1)
    assert torch.equal(flat[batch["idx"] + 1], batch["tgt"])


def _rows(tok):
    naive, sc = _pairs()
    other = data.make_pair({**REC, "question": "What is 3 + 4?"}, "3 + 4 = 7.\n\nThe answer is: 7", "The answer is: 8")
    return [data.tokenize_pair(p, tok) for p in (naive, sc, other)]


def test_packed_layout(tok):
    rows = _rows(tok)
    b = data.collate_pairs(rows, packed=True, pad_id=tok.pad_id)
    B, L = b["input_ids"].shape
    assert B == 3 and L == max(len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) for r in rows)
    assert b["mask"].any(-1).all()                                   # every query (padding too) sees a key
    for p, r in enumerate(rows):
        P, C, R = len(r["prompt"]), len(r["chosen"]), len(r["rejected"])
        assert b["input_ids"][p, :P + C + R].tolist() == r["prompt"] + r["chosen"] + r["rejected"]
        assert b["positions"][p, P + C:P + C + R].tolist() == list(range(P, P + R))
        m = b["mask"][p]
        assert not m[P + C:P + C + R, P:P + C].any()                   # rejected never sees chosen
        assert m[P + C:P + C + R, :P].all()                            # but sees the whole prompt
        assert m[P + C, P + C] and not m[P + C, P + C + 1:].any()     # and itself, causally
        first_r = (b["seg"] == 2 * p + 1).nonzero()[0].item()
        assert b["idx"][first_r].item() == p * L + P - 1               # r_0 comes from the last prompt token
    assert b["lengths"].tolist() == [len(r[s]) for r in rows for s in ("chosen", "rejected")]


def _seg_logps(h, w, batch):
    """Summed log-probs per segment from flat hidden states (what the trainer does)."""
    logits = h.reshape(-1, h.shape[-1])[batch["idx"]] @ w.T
    lp = torch.log_softmax(logits, -1).gather(-1, batch["tgt"][:, None])[:, 0]
    return torch.zeros(len(batch["lengths"]), dtype=lp.dtype).index_add_(0, batch["seg"], lp)


def test_packed_equals_unpacked_equals_one_sequence_at_a_time(tok):
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    m = Transformer(ModelArgs(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              intermediate_size=128, max_seq_len=512)).double().eval()
    rows = _rows(tok)
    # reference: each prompt + continuation alone, plain causal, log-probs summed by hand
    ref = []
    with torch.no_grad():
        for r in rows:
            for side in ("chosen", "rejected"):
                ids = torch.tensor([r["prompt"] + r[side]])
                logp = torch.log_softmax(m(ids)[0], -1)
                P = len(r["prompt"])
                ref.append(sum(logp[P - 1 + i, t].item() for i, t in enumerate(r[side])))
        got = {}
        for packed in (True, False):
            batch = data.collate_pairs(rows, packed=packed, pad_id=tok.pad_id)
            h = m(batch["input_ids"], positions=batch["positions"], mask=batch["mask"], return_hidden=True)
            assert torch.isfinite(h).all()
            got[packed] = _seg_logps(h, m.lm_head_weight, batch)
    assert torch.allclose(got[True], torch.tensor(ref, dtype=torch.float64), atol=1e-9, rtol=0)
    assert torch.allclose(got[False], torch.tensor(ref, dtype=torch.float64), atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------------------------
# TRL's preference format
# ----------------------------------------------------------------------------------------------
def test_trl_rows_train_on_the_same_tokens_as_ours(tok, tmp_path):
    """Our pairs written as TRL rows (to_trl: the prompt rendered with the chat template, as TRL feeds a
    string prompt verbatim) read back as the same records and tokenise to the same ids."""
    pairs = list(_pairs())
    ours, trl = str(tmp_path / "ours.jsonl"), str(tmp_path / "trl.jsonl")
    data.write_jsonl(ours, pairs)
    data.write_jsonl(trl, [data.to_trl(p, tok) for p in pairs])
    rows = data.read_jsonl(trl)
    assert rows[1]["prompt"] == tok.render_prompt(REC["question"], STEPS[0])
    assert rows[0]["prompt"].startswith("<s>Question: ") and rows[0]["prompt"].endswith("Answer:\n")
    (a, fa), (b, fb) = data.read_pairs(ours, with_format=True), data.read_pairs(trl, with_format=True)
    assert (fa, fb) == ("scdpo", "TRL") and [{k: v for k, v in p.items() if k != "prompt"} for p in b] == a
    assert [data.tokenize_pair(p, tok) for p in a] == [data.tokenize_pair(p, tok) for p in b]


def test_foreign_trl_rows(tok):
    """A string prompt is fed verbatim (as TRL does); a conversational row is rendered with the chat
    template, its user message the question and an open assistant message the prefix."""
    foreign = {"prompt": "Q: What is 2+2?\nA:", "chosen": " 2+2 = 4.\nThe answer is: 4", "rejected": " 5"}
    back = data.from_trl(foreign, "f.jsonl:1")
    assert (back["question"], back["prefix"], back["kind"], back["chosen_answer"]) == (foreign["prompt"], "",
                                                                                        "naive", "4")
    row = data.tokenize_pair(back, tok)
    assert tok.decode(row["prompt"]) == "Q: What is 2+2?\nA:"                      # no template around it
    user, assistant = {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 = 4.\n\n"}
    chat = {"prompt": [user, assistant], "chosen": [{"role": "assistant", "content": "The answer is: 4"}],
            "rejected": [{"role": "assistant", "content": "So 5.\n\nThe answer is: 5"}], "gold": "4"}
    back = data.from_trl(chat)
    assert (back["question"], back["prefix"], back["kind"], back["k"]) == ("What is 2+2?", "2+2 = 4.\n\n", "sc", 0)
    assert (back["chosen"], back["rejected"], back["chosen_answer"], back["rejected_answer"]) == (
        "The answer is: 4", "So 5.\n\nThe answer is: 5", "4", "5")
    assert "prompt" not in back and tok.decode(data.tokenize_pair(back, tok)["prompt"]).startswith("Question: ")
    back = data.from_trl({**chat, "prompt": [user]})
    assert (back["question"], back["prefix"], back["kind"], back["k"]) == ("What is 2+2?", "", "naive", -1)
    with pytest.raises(ValueError, match=r"messages with roles \['system', 'user'\], expected one of"):
        data.from_trl({**chat, "prompt": [{"role": "system", "content": "Be brief."}, user]})
    with pytest.raises(ValueError, match=r"x.jsonl:3: field 'rejected': messages with roles \['user'\]"):
        data.from_trl({**chat, "rejected": [user]}, "x.jsonl:3")
    with pytest.raises(ValueError, match=r"x.jsonl:3: field 'chosen' is int, expected text or a list of messages"):
        data.from_trl({**chat, "chosen": 5}, "x.jsonl:3")
    with pytest.raises(ValueError, match=r"x.jsonl:3: field 'prompt' holds 'hi', expected messages"):
        data.from_trl({**chat, "prompt": ["hi"]}, "x.jsonl:3")
    with pytest.raises(ValueError, match=r"x.jsonl:4: missing field 'rejected'"):
        data.from_trl({"prompt": "a", "chosen": "b"}, "x.jsonl:4")
