"""Answer grading speed: grade.extract_answer + grade.is_equiv against Math-Verify, on the same inputs.

    python bench/grade.py                    # the 5000 MATH test solutions, then ProcessBench's 1400
    python bench/grade.py --sets math        # only MATH

Each set is graded once by each grader, one after the other in this process, from cold caches (ours
are cleared; Math-Verify's are first used here): solutions per second, the ratio ours / Math-Verify
(target >= 1: no slower) and how often the two verdicts agree. Math-Verify is a test-only
dependency (tests/requirements.txt); the library never imports it.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import grade  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument(
    "--sets",
    default="math,processbench",
    help="comma-separated: math (MATH test gold "
    "solutions), processbench (model-written GSM8K and MATH solutions)",
)
parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"), help="data root")
args = parser.parse_args()


def load(name):
    """[(solution, gold answer)] of one set."""
    if name == "math":
        return [(r["solution"], r["gold"]) for r in data.load_records("math:test", root=args.data)]
    gold = {
        r["question"].strip(): r["gold"]
        for s in ("gsm8k:test", "math:test")
        for r in data.load_records(s, root=args.data)
    }
    rows = []
    for part in ("gsm8k", "math"):
        with open(os.path.join(args.data, "processbench", f"{part}.json")) as f:
            rows += [("\n\n".join(x["steps"]), gold[x["problem"].strip()]) for x in json.load(f)]
    return rows


def ours(pairs):
    grade._symbolic_equal.cache_clear()
    return [grade.is_equiv(grade.extract_answer(text), gold) for text, gold in pairs]


def math_verify(pairs):
    from math_verify import parse, verify

    return [bool(verify(parse("$" + gold + "$"), parse(text))) for text, gold in pairs]


for name in args.sets.split(","):
    pairs = load(name)
    verdicts, rates = {}, {}
    for grader in (ours, math_verify):
        t = time.perf_counter()
        verdicts[grader] = grader(pairs)
        rates[grader] = len(pairs) / (time.perf_counter() - t)
    agree = sum(a == b for a, b in zip(verdicts[ours], verdicts[math_verify]))
    print(
        f"{name:13s} {len(pairs)} solutions | ours {rates[ours]:7.0f}/s ({sum(verdicts[ours])} right) | "
        f"Math-Verify {rates[math_verify]:5.0f}/s ({sum(verdicts[math_verify])} right) | "
        f"ratio {rates[ours] / rates[math_verify]:.1f}x | agree {100 * agree / len(pairs):.2f}%"
    )
