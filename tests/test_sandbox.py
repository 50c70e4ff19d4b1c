# python -m pytest -q tests/test_sandbox.py
"""The code sandbox (sandbox.Kernel, held to sandbox.SANDBOX) against what README "The code sandbox"
promises. Every test runs twice: with the OS layers this machine allows, and with isolate=False, where the
audit hook holds alone. The attacks run through the sampler (generate(..., fmt="code")) with a scripted
model, and what they must not do is checked from outside: the files around the sandbox, a canary
process, a planted secret."""
import os
import secrets
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

import data
from conftest import byte_tokenizer
from sample import Sampling, generate
from sandbox import Kernel
from test_sample import Scripted

S, E, OS, OE = data.CODE_START, data.CODE_END, data.OUTPUT_START, data.OUTPUT_END
PROMPT = "<s>Question: go\n\nAnswer:\n"


@pytest.fixture(params=[True, False], ids=["os-layers", "hook-only"])
def isolate(request):
    return request.param


@pytest.fixture()
def kernel(isolate):
    k = Kernel(timeout=1.0, mem_mb=512, isolate=isolate)
    yield k
    k.close()


@pytest.fixture(scope="module")
def btok(tmp_path_factory):
    return byte_tokenizer(str(tmp_path_factory.mktemp("tok")))


def timed(k, code):
    t = time.time()
    out = k.run(code)
    return out, time.time() - t


def worker(k):
    """The pid (as this process sees it) of the process that runs the code: the kernel process, or with
    namespaces its one child."""
    kids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) == k.proc.pid:
                kids.append(int(p))
        except OSError:
            pass
    assert len(kids) <= 1, kids
    return kids[0] if kids else k.proc.pid


def snapshot(root):
    """Every path below root with its mode, size, mtime and (for files) contents."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns, Path(p).read_bytes() if name in files else None)
    return out


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------
def test_state_persists_and_output_is_bounded(kernel):
    assert kernel.run("x = 6 * 7\nprint('hi')") == "hi\n"
    assert kernel.run("x + 1") == "43\n"   # notebook-like: a trailing expression is shown
    assert kernel.run("1/0").strip().endswith("ZeroDivisionError: division by zero")
    assert kernel.run("import sympy\nsympy.Rational(1, 3) + x") == "127/3\n"
    assert kernel.run("import numpy\nint(numpy.arange(5).sum())") == "10\n"
    out = kernel.run("for i in range(10**6): print(i)")
    assert len(out) < kernel.max_output + 40 and out.endswith("(output truncated)")
    assert kernel.run("print('é' * 5000)").startswith("é" * 1000)   # characters, not bytes
    assert kernel.run("import os\nos.write(1, b'fd 1\\n')\nos.write(2, b'fd 2\\n')") == "fd 1\nfd 2\n5\n"
    cwd = kernel.run("import os\nprint(os.getcwd())").strip()
    assert os.path.realpath(cwd) == os.path.realpath(kernel.dir)


def test_layers_are_reported_as_they_ran(isolate):
    """`layers` against the kernel's own account of the worker (/proc/<pid>/status and ns links)."""
    k = Kernel(isolate=isolate)
    try:
        assert k.run("1") == "1\n"
        w = worker(k)
        status = Path(f"/proc/{w}/status").read_text()
        new_pid_ns = os.readlink(f"/proc/{w}/ns/pid") != os.readlink("/proc/self/ns/pid")
        assert k.layers[-2:] == ["rlimits", "audit hook"]
        assert ("seccomp" in k.layers) == ("Seccomp:\t2" in status) <= ("NoNewPrivs:\t1" in status)
        assert any(layer.startswith("namespaces") for layer in k.layers) == new_pid_ns
        if not isolate:
            assert k.layers == ["rlimits", "audit hook"] and "Seccomp:\t0" in status and not new_pid_ns
        if "namespaces" in k.layers:   # its own root: what SANDBOX["read"] and Python need, and /proc
            root = f"/proc/{w}/root"
            assert {"proc", "usr", "dev", Path(k.dir).parts[1]} <= set(os.listdir(root))
            assert not os.path.exists(root + "/etc") and not os.path.exists(root + os.path.abspath(__file__))
            assert k.run("import os\nos.getpid()") == "1\n"   # the first process of its PID namespace
            assert "CapEff:\t0000000000000000" in status
    finally:
        k.close()


def test_infinite_loop(kernel):
    kernel.run("y = 5")
    out, dt = timed(kernel, "while True:\n    pass")
    assert "TimeoutError" in out and dt < kernel.timeout + 1
    assert kernel.run("y") == "5\n"            # interrupted like a notebook: state kept
    out, dt = timed(kernel, "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True: pass")
    assert "TimeoutError" in out and "restarted" in out and dt < kernel.timeout + 3   # killed by the parent
    assert "NameError" in kernel.run("y") and kernel.run("2 + 2") == "4\n"


def test_fork_bomb(kernel):
    for code in ["import os\nwhile True:\n    os.fork()", "import os\nos.system('echo hi')",
                 "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])",
                 "import multiprocessing as m\nm.Process(target=print).start()",
                 "import _posixsubprocess\n_posixsubprocess.fork_exec()",
                 "import os\nos.execv('/bin/sh', ['sh'])",
                 "import os\nos.posix_spawn('/bin/sh', ['sh'], {})", "import pty\npty.spawn('/bin/sh')"]:
        out, dt = timed(kernel, code)
        assert "PermissionError" in out and "blocked" in out, (code, out)
        assert dt < kernel.timeout + 1
    assert kernel.run("print('alive')") == "alive\n"


def test_memory_bomb(isolate):
    kernel = Kernel(timeout=4.0, mem_mb=512, isolate=isolate)   # filling 512 MB can take a second when busy
    try:
        for code in ["x = 'a' * (8 << 30)", "l = []\nwhile True:\n    l.append(bytearray(50 << 20))"]:
            out, dt = timed(kernel, code)
            assert "MemoryError" in out and dt < kernel.timeout + 1, out
        assert kernel.run("print('alive')") == "alive\n"
    finally:
        kernel.close()


def test_files_outside_the_sandbox_survive(kernel, tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    c = repr(str(canary))
    attempts = [f"import os\nos.remove({c})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                f"open({c}, 'w').write('x')", f"import os\nos.rename({c}, 'stolen')",
                f"import pathlib\npathlib.Path({c}).unlink()", f"import os\nos.chmod({c}, 0)",
                f"import os\nos.symlink({c}, 'link')\nopen('link', 'w').write('x')",
                f"import os\nos.truncate({c}, 0)", f"print(open({c}).read())",
                f"import os\nos.utime({c}, (0, 0))",
                f"import os\nos.link({c}, 'hard')", f"import shutil\nshutil.copy({c}, 'copy')",
                "import _ctypes"]
    for code in attempts:
        out = kernel.run(code)
        assert "blocked in the sandbox" in out, (code, out)
    assert kernel.run("import ctypes\nctypes.CDLL(None)").startswith("AttributeError")   # a stand-in ctypes
    st = canary.stat()
    assert snapshot(tmp_path) == {str(canary): (st.st_mode, 5, st.st_mtime_ns, b"alive")}
    assert kernel.run("open('mine', 'w').write('ok')\nimport os\nos.remove('mine')\nprint('ok')") == "ok\n"


def test_disk_quota_holds(isolate):
    """Files of 3 MiB until refused, against a 20 MiB quota: the total, measured from outside (through the
    worker's own root, which with namespaces is a tmpfs this process does not otherwise see), stays in it."""
    k = Kernel(isolate=isolate, disk_mb=20, file_mb=4)
    try:
        out = k.run("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (3 << 20))\n    i += 1")
        assert "quota" in out or "No space" in out, out
        files = snapshot(f"/proc/{worker(k)}/root{k.dir}").values()
        assert 8 << 20 <= sum(size for mode, size, *_ in files) <= 20 << 20
        out = k.run("open('big', 'wb').write(b'x' * (5 << 20))")   # past file_mb: RLIMIT_FSIZE
        assert "File too large" in out or "quota" in out, out
    finally:
        k.close()


def test_no_network(kernel):
    for code in ["import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
                 "import socket\ns = socket.socket()",
                 "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)"]:
        out, dt = timed(kernel, code)
        assert ("PermissionError" in out or "URLError" in out) and "blocked" in out, (code, out)
        assert dt < kernel.timeout + 1


def test_parent_environment_is_not_visible(kernel, monkeypatch):
    monkeypatch.setenv("SCDPO_TEST_SECRET", "hunter2")
    kernel.close()   # the next run starts a fresh kernel, after the secret was set
    assert "hunter2" not in kernel.run("import os\nprint(dict(os.environ))")
    for code in ["import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
                 f"print(open('/proc/{os.getpid()}/environ').read())",
                 "print(open('/proc/1/environ').read())"]:
        out = kernel.run(code)
        assert "hunter2" not in out and "PermissionError" in out, out


def test_kernel_crash_is_reported_and_restarted(kernel):
    for code in ["import os\nos.abort()", "import os\nos._exit(3)"]:
        out = kernel.run(code)
        assert "died" in out and "restarted" in out, out
        assert kernel.run("print(1)") == "1\n"
    kernel.submit("import time\ntime.sleep(30)")   # killed from outside, as the OOM killer would
    os.kill(worker(kernel), signal.SIGKILL)
    assert "died" in kernel.result()
    assert kernel.run("print(2)") == "2\n"


# ---------------------------------------------------------------------------------------------
# Attacks through the sampler
# ---------------------------------------------------------------------------------------------
class PerRow(Scripted):
    """Scripted with a script per row: row b's next token is scripts[b][position + 1]. A row keeps its
    batch index while no row ends before the others, so all rows sample one number of tokens."""

    def __init__(self, scripts, vocab):
        super().__init__(scripts[0], vocab)
        self.scripts, self.output = scripts, PerRow.Head(self)

    class Head(Scripted.Head):
        def forward(self, h):
            o = self.outer[0]
            nxt = torch.tensor([s[min(int(p) + 1, len(s) - 1)] for s, p in zip(o.scripts, h[:, 0])])
            return torch.full((len(nxt), o.vocab), -30.0).scatter_(1, nxt[:, None], 30.0)


def scripted_rows(btok, rows, sandbox):
    """Runs rows (each a list of (code, output) blocks) through generate with a PerRow model. Code is
    padded to one width, so that all rows' first blocks close at one step and run side by side, and each
    text to one number of sampled tokens (outputs are appended, not sampled). Returns the expected texts
    and each row's (text, finish)."""
    width = max(len(code) for row in rows for code, _ in row)
    texts = ["".join(f"Try.\n{S}{code}\n{'#' * (width - len(code))}\n{E}{OS}{o}{OE}" for code, o in row)
             + "Done." for row in rows]
    steps = [len(t) - sum(len(OS + o + OE) for _, o in row) for t, row in zip(texts, rows)]
    texts = [t + " " * (max(steps) - n) for t, n in zip(texts, steps)]
    model = PerRow([btok.encode(PROMPT + t) + [btok.eos_id] for t in texts], btok.vocab_size)
    got = generate(model, [btok.encode(PROMPT)] * len(rows), Sampling(max(map(len, texts)) + 10, fmt="code"),
                   tok=btok, sandbox=sandbox)
    return texts, [(btok.decode(r.ids), r.finish) for r in got]


def contained(attack):
    """The attack's code, printing "blocked" when it raised and "ESCAPED" when it ran to its end (an attack
    that cannot raise sets r itself)."""
    return ("r = 'ESCAPED'\ntry:\n" + textwrap.indent(attack, "    ")
            + "\nexcept BaseException:\n    r = 'blocked'\nprint(r)")


def attacks(out, secret, canary, home, made):
    """The issue's table (first), then the cases contained before; out holds canary.txt and secret.txt,
    made is a path in Python's own (readable) directory that must not appear."""
    ok, sec, me, (lib, new) = f"{out}/canary.txt", f"{out}/secret.txt", os.getpid(), os.path.split(made)
    steal, wr = f"open({sec!r}).read()", "os.O_CREAT | os.O_WRONLY"
    deep = "'/'.join('abcdefghijklmnop'[:k])"
    grab = ("import signal\ndef grab(sig, fr):\n    while fr:\n        for v in list(fr.f_locals.values()):\n"
            "            if isinstance(v, (list, dict, set)) and fr.f_code.co_name in ('hook', 'real'):\n"
            "                v.clear()\n        fr = fr.f_back\nsignal.signal(signal.SIGPROF, grab)\n"
            f"signal.setitimer(signal.ITIMER_PROF, 1e-4, 1e-4)\nfor i in range(2000):\n    try:\n"
            f"        {steal}\n        break\n    except PermissionError:\n        pass\nelse:\n"
            "    r = 'blocked'\nsignal.setitimer(signal.ITIMER_PROF, 0)")
    frames = ("import __main__, sys\nf = sys._getframe()\nwhile f:\n    for v in list(f.f_locals.values()):\n"
              "        if isinstance(v, dict) and 'read' in v:\n            v['read'].append('/')\n"
              "            v['events'].clear()\n            v['imports'].clear()\n    f = f.f_back\n"
              "for v in vars(__main__).values():\n    v.__defaults__ = None if callable(v) else 0\n" + steal)
    return [
        # os.open with a dir_fd outside (after chdir, or a directory fd); reads by dir_fd
        f"import os\nfd = os.open({out!r}, os.O_RDONLY)\nos.open('made', {wr}, dir_fd=fd)",
        f"import os\nfd = os.open({lib!r}, os.O_RDONLY)\nos.open({new!r}, {wr}, dir_fd=fd)",
        f"import os\nfd = os.open({out!r}, os.O_DIRECTORY)\n"
        "print(os.read(os.open('secret.txt', 0, dir_fd=fd), 99))",
        f"import os\nos.chdir({out!r})\nopen('made', 'w')", f"import os\nos.chdir({lib!r})",
        f"import os\nos.chdir(os.open({out!r}, os.O_PATH))\nopen('made', 'w')",
        f"import os\nfd = os.open('.', os.O_RDONLY)\nos.open('../made', {wr}, dir_fd=fd)",
        # '..' inside the sandbox from a deep cwd, but past its top from the sandbox's own fd
        f"import os\nk = os.getcwd().count('/')\nos.makedirs({deep})\nfd = os.open('.', 0)\n"
        f"os.chdir({deep})\n"
        f"os.open('../' * k + {out[1:] + '/made'!r}, os.O_CREAT, dir_fd=fd)",
        f"import os\nprint(os.listdir({out!r}))", f"import os\nprint(list(os.scandir(os.open({out!r}, 0))))",
        f"open('/proc/self/cwd/{'../' * 12}{sec[1:]}').read()",
        # the parent's environment, by /proc
        "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
        f"print(open('/proc/{me}/environ').read())",
        f"print(open('/proc/self/root/proc/{me}/environ').read())",
        f"import os\nfd = os.open('/proc', os.O_RDONLY)\n"
        f"print(open('{me}/environ', opener=lambda p, f: os.open(p, f, dir_fd=fd)).read())",
        f"import os\nr = 'ESCAPED' if {secret!r} in str(dict(os.environ)) else 'blocked'",
        # the hook's settings through __main__, frames, builtins, os.path, gc
        frames,
        f"import os, posixpath\nos.path.realpath = posixpath.realpath = lambda p, **k: os.getcwd()\n{steal}",
        f"import builtins\nt = builtins.tuple\nbuiltins.tuple = lambda *a: ('tmp',)\ntry:\n    {steal}\n"
        "finally:\n    builtins.tuple = t",
        "import gc\nhook = [o for o in gc.get_objects() if getattr(o, '__name__', '') == 'hook']", grab,
        # a FIFO, a device node, sqlite, through fresh modules too
        f"import os\nos.mkfifo({out + '/fifo'!r})", f"import os\nos.mknod({out + '/node'!r})",
        f"import posix\nposix.mkfifo({out + '/fifo'!r})",
        "import _imp, importlib.machinery as m\n"
        f"_imp.create_builtin(m.ModuleSpec('posix', None)).mkfifo({out + '/fifo'!r})",
        f"import sqlite3\nsqlite3.connect({out + '/x.db'!r})",
        "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess as p\n"   # a fresh copy
        "r = 'ESCAPED' if type(p.fork_exec).__name__ == 'builtin_function_or_method' else 'blocked'",
        # many files under the per-file limit
        "n = 0\nfor i in range(8):\n    try:\n        open(f'f{i}', 'wb').write(b'x' * (15 << 20))\n"
        "        n += 15\n    except OSError:\n        pass\nr = 'ESCAPED' if n > 64 else 'blocked'",
        # other processes
        f"import os\nos.kill({canary}, 9)",
        f"import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({canary}), 9)",
        f"import os\nos.killpg(os.getpgid({canary}), 9)", "import os\nos.kill(-1, 0)",
        f"import os\nos.kill({me}, 0)",
        "import os\nos.setsid()\nos.kill(0, 0)",
        # contained before: reads and writes by path
        "open('/etc/shadow').read()", f"import os\nprint(os.listdir({home!r}))", steal,
        f"open({ok!r}, 'w').write('x')", f"import os\nos.remove({ok!r})",
        f"import os\nos.rename({ok!r}, 'stolen')",
        f"import shutil\nshutil.rmtree({out!r})", f"import pathlib\npathlib.Path({ok!r}).unlink()",
        f"import os\nos.chmod({ok!r}, 0)", f"import os\nos.utime({ok!r}, (0, 0))",
        f"import os\nos.link({sec!r}, 'h')",
        f"import os\nos.symlink({out!r}, 'l')", f"import shutil\nshutil.copy({sec!r}, 'c')",
        f"open('mine', 'w').write('x')\nimport shutil\nshutil.move('mine', {out!r})",
        # processes, memory, time, files, threads, modules, network, native code
        f"import os\nos.system('touch {out}/made')",
        f"import subprocess\nsubprocess.run(['touch', '{out}/made'])",
        "import os\nwhile True:\n    os.fork()",
        "import multiprocessing as m\nm.Process(target=print).start()",
        "import os\nos.execv('/bin/sh', ['sh'])", "import _posixsubprocess\n_posixsubprocess.fork_exec()",
        "x = 'a' * (8 << 30)", "l = []\nwhile True:\n    l.append(bytearray(50 << 20))",
        "while True:\n    pass",
        "open('huge', 'wb').write(b'x' * (20 << 20))",
        "import os\nopen('t', 'w').close()\nos.truncate('t', 1 << 30)",
        "import threading, time\nwhile True:\n"
        "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()",
        "import no_such_module_anywhere",
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
        "import ctypes\nctypes.CDLL(None)", "import _ctypes",
        "import shutil, _bisect, _imp, importlib.machinery as m\nshutil.copy(_bisect.__file__, 'e.so')\n"
        "_imp.create_dynamic(m.ModuleSpec('_bisect', None, origin='e.so'))",
    ]


def test_attacks_through_the_sampler(btok, tmp_path, monkeypatch, isolate):
    """Each attack in its own row, through generate(..., fmt="code"): every row gets exactly its expected
    output and ends; nothing around the sandbox changed; the secret and the forged replies do not appear;
    the canary process lives. A forging row also prints a reply's framing and writes it into every fd; its
    next block's output must still be its own."""
    secret = "s3cret-" + secrets.token_hex(8)
    monkeypatch.setenv("SCDPO_TEST_SECRET", secret)
    out = tmp_path / "outside"
    out.mkdir()
    (out / "canary.txt").write_text("alive")
    (out / "secret.txt").write_text(secret)
    before = snapshot(tmp_path)
    canary = subprocess.Popen(["sleep", "300"])
    try:
        made = os.path.join(os.path.dirname(os.__file__), f"scdpo-made-{secrets.token_hex(4)}")
        found = attacks(str(out), secret, canary.pid, str(Path.home()), made)
        rows = [[(contained(a), "blocked\n")] for a in found]
        forge = ("import os, time\nfake = b'{\"out\": \"FORGED\"}\\n{\"ready\": true}\\n'"
                 " + b'0' * 32 + b'\\n'\n"
                 "for fd in [0] + list(range(3, 1024)):\n    try:\n        os.write(fd, fake)\n"
                 "    except OSError:\n        pass\n"
                 "time.sleep(0.3)\nprint('{\"out\": \"FORGED\"}')")   # the fake lines arrive first, alone
        killed = "TimeoutError: code execution exceeded 2 s; the kernel was restarted and its state is lost\n"
        rows += [[(forge, '{"out": "FORGED"}\n'), ("print('next')", "next\n")],
                 [("import signal as s\ns.signal(s.SIGALRM, s.SIG_IGN)\nwhile True:\n    pass", killed)],
                 [("print(6 * 7)", "42\n")]]
        expected, got = scripted_rows(btok, rows, lambda: Kernel(timeout=2.0, mem_mb=512, isolate=isolate))
        for want, (text, finish) in zip(expected, got):
            assert text == want and finish == "eos", (want, text)
            outputs = "".join(t.split(OE)[0] for t in text.split(OS)[1:])
            assert secret not in outputs and "ESCAPED" not in outputs and "FORGED\"}\n{" not in outputs
        assert canary.poll() is None
        assert snapshot(tmp_path) == before and not os.path.exists(made)
    finally:
        canary.kill()
        canary.wait()


def test_hostile_code_inside_generate_leaves_the_sampler_running(btok, tmp_path, isolate):
    """The sandbox through the sampler: a solution whose code blocks loop forever, fork, exhaust memory and
    delete a file outside the sandbox gets an error text for each, its later blocks still run, the other
    rows go on, and the file survives."""
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    blocks = ["while True:\n    pass", "import os\nwhile True:\n    os.fork()", "x = 'a' * (8 << 30)",
              f"import os\nos.remove({str(canary)!r})", "print('still here')"]
    sandbox = lambda: Kernel(timeout=1.0, mem_mb=512, isolate=isolate)
    k = sandbox()   # the outputs, run once beforehand, so that the script can hold them where they go
    outs = [k.run(b) for b in blocks]
    k.close()
    assert [o.split("\n")[-2].split(":")[0] for o in outs[:4]] == ["TimeoutError", "PermissionError",
                                                                    "MemoryError", "PermissionError"]
    assert outs[4] == "still here\n"
    text = "".join(f"Try.\n{S}{b}\n{E}{OS}{o}{OE}" for b, o in zip(blocks, outs)) + "The answer is 1."
    model = Scripted(btok.encode(PROMPT + text) + [btok.eos_id], btok.vocab_size)
    t = time.time()
    rows = generate(model, [btok.encode(PROMPT)] * 2, Sampling(2000, fmt="code"), tok=btok, sandbox=sandbox)
    assert time.time() - t < 2 * len(blocks) + 10                  # the rows' blocks run side by side
    for r in rows:
        assert btok.decode(r.ids) == text and r.finish == "eos"
    assert canary.read_text() == "alive"
