# python -m pytest -q tests/test_layout.py
"""The layout the README promises, read from the sources with `ast`: the project's modules import one
another in a chain (tokenizer, grade, kernels, sandbox <- model, data <- sample <- eval <- scdpo <- mini),
never in a circle and never inside a function; and no line of non-test Python runs past 110 columns."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# each module imports only modules before it
CHAIN = ["tokenizer", "grade", "kernels", "sandbox", "model", "data", "sample", "eval", "scdpo", "mini"]
LEAVES = {"tokenizer", "grade", "kernels", "sandbox"}


def sources():
    files = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "kernels", "*.py")))
    return {os.path.relpath(f, ROOT): ast.parse(open(f, encoding="utf-8").read(), f) for f in files}


def module_of(path):
    return path.split(os.sep)[0].removesuffix(".py")


def project_imports(tree):
    """(line, imported project module, at top level?) for every import of a project module."""
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        out += [(node.lineno, n, id(node) in top) for n in names if n in CHAIN]
    return out


def test_imports_form_a_chain_without_function_level_imports():
    problems = []
    for path, tree in sources().items():
        me = module_of(path)
        for line, other, at_top in project_imports(tree):
            if other == me:
                continue
            if not at_top:
                problems.append(f"{path}:{line}: imports {other} inside a function")
            if me in LEAVES and other in LEAVES:
                problems.append(f"{path}:{line}: {me} is a leaf but imports {other}")
            elif CHAIN.index(other) > CHAIN.index(me):
                problems.append(f"{path}:{line}: {me} imports {other}, which comes after it in the chain")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_cycle_and_a_function_level_import():
    """The checker itself on sources that break each rule, so that it cannot pass by reading nothing."""
    bad = ast.parse("import data\nimport mini\ndef f():\n    import sample\n")
    got = project_imports(bad)
    assert got == [(1, "data", True), (2, "mini", True), (4, "sample", False)]
    assert CHAIN.index("mini") > CHAIN.index("sample")
    assert set(module_of(p) for p in sources()) == set(CHAIN)   # every project module is in the chain


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(
    ROOT, "kernels", "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))))
def test_no_line_over_110_columns(path):
    long = [f"{os.path.relpath(path, ROOT)}:{i}: {len(line)} columns"
            for i, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1) if len(line) > 110]
    assert not long, "\n".join(long)
