"""The code sandbox of code-integrated solutions: one persistent Python process per solution. It runs
the code blocks as they are sampled, like a notebook kernel (variables persist across blocks), under
the policy SANDBOX. sample.generate(..., fmt="code") starts one Kernel per row.

Layout: the policy; the kernel program (the _kernel_* functions, shipped to the child as their own
source, so the child imports nothing of this project); Kernel, the sampler's side. README "The code
sandbox" says which layer enforces what, and what is not enforced.
"""
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# ----------------------------------------------------------------------------------------------
# The policy, stated once. The kernel gets it as JSON, with "dir" added: the sandbox directory, the
# one place it may write.
# ----------------------------------------------------------------------------------------------
SANDBOX = {
    "timeout": 6.0,   # s per block (SIGALRM in the worker); the sampler kills the kernel at timeout + 2 s
    "mem_mb": 1024, "file_mb": 16, "nofile": 64, "cpu_s": 600,   # RLIMIT_AS, _FSIZE, _NOFILE, _CPU
    "disk_mb": 64,        # all of the sandbox directory
    "max_output": 1000,   # characters kept of a block's output
    "read": ["/usr", "/lib", "/lib64", "/dev/null", "/dev/zero", "/dev/urandom"],   # + Python's own dirs
    # audit events refused ("x." refuses a family)
    "events": ["os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "pty.spawn",
               "subprocess.Popen", "os.killpg", "os.link", "os.symlink", "os.chown", "os.chflags",
               "os.setxattr", "os.removexattr", "shutil.chown", "resource.setrlimit", "resource.prlimit",
               "sys.addaudithook", "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
               "gc.get_referents", "code.__new__", "sqlite3.connect", "ctypes.", "socket.", "syslog.",
               "webbrowser."],
    # imports refused with ImportError, so optional imports fall back. _posixsubprocess is refused
    # only when loaded anew: a fresh copy would bring fork_exec back
    "imports": ["ctypes", "_ctypes", "_sqlite3", "_dbm", "_gdbm", "_multiprocessing", "_posixshmem",
                "readline", "_xxsubinterpreters", "_testcapi", "_testinternalcapi", "_curses",
                "_posixsubprocess"],
    # functions that raise no audit event, replaced by refusals
    "removed": ["os.mkfifo", "os.mknod", "os.pidfd_open", "signal.pidfd_send_signal", "os.setsid",
                "os.setpgid", "os.setpgrp", "_posixsubprocess.fork_exec", "time.clock_settime",
                "time.clock_settime_ns", "_imp.create_builtin"],
    # seccomp rules, syscall numbers as (x86_64, aarch64). "deny": always; "self": unless aimed at the
    # worker itself; "thread": unless it makes a thread; "enosys": answered ENOSYS, so glibc falls back
    # to clone
    "syscalls": {
        "deny": {"fork": (57, None), "vfork": (58, None), "execve": (59, 221), "execveat": (322, 281),
                 "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
                 "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438),
                 "mknod": (133, None), "mknodat": (259, 33), "link": (86, None), "linkat": (265, 37),
                 "symlink": (88, None), "symlinkat": (266, 36), "unshare": (272, 97), "setns": (308, 268),
                 "mount": (165, 40), "chroot": (161, 51), "socket": (41, 198), "socketpair": (53, 199),
                 "io_uring_setup": (425, 425), "bpf": (321, 280), "perf_event_open": (298, 241),
                 "userfaultfd": (323, 282), "keyctl": (250, 219), "add_key": (248, 217)},
        "self": {"kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
                 "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240)},
        "thread": {"clone": (56, 220)}, "enosys": {"clone3": (435, 435)}},
}


# The kernel program, run as `python -I -B -c <source>`. Requests come on fd 0; the code's output goes
# to fds 1 and 2. After each block the kernel writes that block's nonce (sent by the sampler) on
# policy["ctl"], and the sampler takes the output up to it. So whatever the code writes, to any fd,
# is output, never a reply.
def _kernel_main():
    policy, ns = json.loads(sys.argv[1]), False
    if policy["isolate"]:
        import ctypes
        uid, gid = os.getuid(), os.getgid()
        ns = ctypes.CDLL(None).unshare(0x7C000000) == 0   # CLONE_NEWUSER | NEWPID | NEWNET | NEWIPC | NEWUTS
        maps = ("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")
        for f, s in maps if ns else ():
            with open(f"/proc/self/{f}", "w") as fh:
                fh.write(s)
        if ns and os.fork():   # the worker is the new PID namespace's first process; this one holds no fd
            os.closerange(0, 1 << 20)
            os.wait()
            os._exit(0)
    _kernel_worker(policy, ns)


def _kernel_worker(policy, ns):
    """Sets up the OS layers, the limits and the audit hook (last), says which layers ran, then runs one
    block per request in globals kept across blocks, showing a trailing expression's value (a notebook)."""
    import ast
    import resource as R
    import traceback
    requests, ctl = open(os.dup(0), "rb"), policy["ctl"]
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    roots = sys.path + [sys.prefix, sys.base_prefix, sys.exec_prefix]
    policy["read"] += [os.path.realpath(p) for p in roots if os.path.exists(p)]
    layers = _kernel_contain(policy, ns) if policy["isolate"] else []
    os.chdir(policy["dir"])
    for lim, v in ((R.RLIMIT_AS, policy["mem_mb"] << 20), (R.RLIMIT_FSIZE, policy["file_mb"] << 20),
                   (R.RLIMIT_NOFILE, policy["nofile"]), (R.RLIMIT_CPU, policy["cpu_s"]), (R.RLIMIT_CORE, 0),
                   (R.RLIMIT_NPROC, 0)):
        hard = R.getrlimit(lim)[1]
        R.setrlimit(lim, (v, v) if hard == R.RLIM_INFINITY else (min(v, hard),) * 2)
    stdout = open(1, "w", 1 << 16, "utf-8", "backslashreplace", closefd=False)
    _kernel_hook(policy)

    def on_alarm(*a):
        raise TimeoutError(f"code execution exceeded {policy['timeout']:g} s")
    signal.signal(signal.SIGALRM, on_alarm)
    env = {"__name__": "__main__"}
    os.write(ctl, json.dumps({"layers": layers + ["rlimits", "audit hook"]}).encode() + b"\n")
    for line in requests:
        msg = json.loads(line)
        sys.stdout = sys.stderr = stdout
        try:
            signal.setitimer(signal.ITIMER_REAL, policy["timeout"])
            tree = ast.parse(msg["code"])
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<code>", "exec"), env)
            if last is not None:
                v = eval(compile(ast.Expression(last.value), "<code>", "eval"), env)
                if v is not None:
                    print(repr(v))
        except BaseException as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            stdout.write("".join(traceback.format_exception_only(type(e), e)))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            stdout.flush()
        except (OSError, ValueError):   # the code closed fd 1: its output is lost, not the kernel
            pass
        os.write(ctl, msg["nonce"].encode() + b"\n")


def _kernel_contain(policy, ns):
    """The OS layers; returns the names of those that ran. In the namespaces: a mount namespace whose
    root is a tmpfs of disk_mb holding the readable paths (bound read-only at their own paths), the
    sandbox directory (the one writable mount) and a /proc of this PID namespace. Then no capabilities,
    no new privileges, and a seccomp filter (classic BPF over seccomp_data: nr at offset 0, arch at 4,
    args[0] at 16)."""
    import ctypes
    import struct
    libc, layers, d, safe = ctypes.CDLL(None, use_errno=True), [], policy["dir"], 0xE   # nosuid|nodev|noexec

    def mount(src, dst, fs, flags, data=None):
        a = [s if s is None else os.fsencode(s) for s in (src, dst, fs, data)]
        if libc.mount(a[0], a[1], a[2], ctypes.c_ulong(flags), a[3]) != 0:
            raise OSError(ctypes.get_errno(), f"mount {dst}")
    libc.prctl(1, 9)   # PR_SET_PDEATHSIG, SIGKILL: die with the parent, whatever the code does
    try:
        if not ns or libc.unshare(0x20000) != 0:   # CLONE_NEWNS
            raise OSError("no namespaces")
        mount(None, "/", None, 0x44000)   # MS_REC | MS_PRIVATE: nothing propagates back to the host
        mount("tmpfs", d, "tmpfs", safe, f"size={policy['disk_mb']}m,mode=755")
        for p in sorted(set(policy["read"])) + [d]:
            new = d + p
            os.makedirs(os.path.dirname(new), exist_ok=True)
            if os.path.islink(p):
                os.symlink(os.readlink(p), new)
            elif os.path.exists(p):
                os.makedirs(new, exist_ok=True) if os.path.isdir(p) else open(new, "w").close()
                mount(new if p == d else p, new, None, 0x1000)   # MS_BIND (the sandbox directory on itself)
                f = os.statvfs(p).f_flag   # read-only, keeping the flags a user namespace may not drop
                atime = 0x400 if f & 0x400 else 0x200000 if f & 0x1000 else 0x1000000
                if p != d:
                    mount(None, new, None, 0x1021 | (f & 0x80E) | atime)   # MS_BIND | MS_REMOUNT | MS_RDONLY
        os.makedirs(d + "/proc")
        mount("proc", d + "/proc", "proc", safe)
        os.chdir(d)
        mount(d, "/", None, 0x2000)   # MS_MOVE the new root over the old one, then chroot into it
        if libc.chroot(b".") != 0:
            raise OSError(ctypes.get_errno(), "chroot")
        mount(None, "/", None, 0x1021 | safe)
        layers.append("namespaces")
    except OSError:
        if ns:   # the PID, network, IPC and UTS namespaces stay, with the host's files
            libc.umount2(os.fsencode(d), 2)
            layers.append("namespaces without their own root")
    libc.capset(struct.pack("II", 0x20080522, 0), bytes(24))   # empty capability sets (header v3)
    arch = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}.get(os.uname().machine)
    if arch is None or libc.prctl(38, 1, 0, 0, 0) != 0:   # PR_SET_NO_NEW_PRIVS
        return layers
    ret = {"allow": 0x7FFF0000, "deny": 0x50001, "enosys": 0x50026}   # SECCOMP_RET_ERRNO | EPERM, ENOSYS
    prog = [(0x20, 0, 0, 4), (0x15, 1, 0, arch[0]), (6, 0, 0, ret["deny"]), (0x20, 0, 0, 0),
            (0x35, "deny", 0, 0x40000000)] + [   # another ABI (x32) is refused; then the calls by rule
        (0x15, rule, 0, nr[arch[1]]) for rule, calls in policy["syscalls"].items()
        for nr in calls.values() if nr[arch[1]] is not None] + [(6, 0, 0, ret["allow"])]
    at = dict(zip(["thread", "self", "allow", "deny", "enosys"], [len(prog) + i for i in (0, 2, 4, 5, 6)]))
    prog += [(0x20, 0, 0, 16), (0x45, "allow", "deny", 0x10000),   # args[0] & CLONE_THREAD
             (0x20, 0, 0, 16), (0x15, "allow", "deny", os.getpid())] + [(6, 0, 0, r) for r in ret.values()]
    jump = lambda j, i: at[j] - i - 1 if isinstance(j, str) else j
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", op, jump(t, i), jump(f, i), k)
                                               for i, (op, t, f, k) in enumerate(prog)))
    if libc.prctl(22, 2, struct.pack("HL", len(prog), ctypes.addressof(buf))) == 0:   # SECCOMP_MODE_FILTER
        layers.append("seccomp")
    return layers


def _kernel_hook(policy):
    """Takes away what the audit hook (PEP 578; it cannot be removed) would not see, then installs it.
    The hook uses only C functions and immutable values bound here, and keeps no mutable state a frame
    could show: code can neither change its lists nor monkeypatch what it calls. gc, which could reach
    it, is refused."""
    import gc
    import importlib
    import posix
    import struct
    import types
    from builtins import ImportError, OSError, PermissionError, bytes, int, max, range, str, tuple, type
    for name in sys.builtin_module_names + ("subprocess",):   # all builtins, so `_imp.create_builtin` can go;
        importlib.import_module(name)                        # subprocess loads _posixsubprocess
    for spec in policy["removed"]:   # wherever a loaded module holds the function
        mod, _, name = spec.rpartition(".")
        f = getattr(sys.modules[mod], name, None)

        def stand_in(*a, _spec=spec, **k):
            raise PermissionError(f"blocked in the sandbox: {_spec}")
        for m in list(sys.modules.values()):
            if f is not None and getattr(m, name, None) is f:
                setattr(m, name, stand_in)
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]   # set-up's; code gets a stand-in with the one name sympy uses, sizeof(c_long)
    sys.modules["ctypes"] = stub = types.ModuleType("ctypes", "the sandbox refuses ctypes")
    stub.c_long = type("c_long", (), {})
    stub.sizeof = {stub.c_long: struct.calcsize("l")}.__getitem__
    gc.collect()

    lstat, stat, readlink, getcwd, listdir = (posix.lstat, posix.stat, posix.readlink, posix.getcwd,
                                              posix.listdir)
    split, starts, decode, join = str.split, str.startswith, bytes.decode, "/".join
    root, pid, fsize, disk = policy["dir"], posix.getpid(), policy["file_mb"] << 20, policy["disk_mb"] << 20
    code = tuple(sorted({os.path.realpath(p) for p in policy["read"]}))   # extension modules load from here
    read, write, nofile = code + (root,), (root, "/dev/null"), policy["nofile"]
    events = frozenset(e for e in policy["events"] if not e.endswith("."))
    families, imports = tuple(e for e in policy["events"] if e.endswith(".")), frozenset(policy["imports"])
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    # event: (kind, ((path arg, its dir_fd arg), ...)); kind indexes `allowed`: read, write, quota, chdir
    paths = types.MappingProxyType({
        "os.remove": (1, ((0, 1),)), "os.rmdir": (1, ((0, 1),)), "os.mkdir": (2, ((0, 2),)),
        "os.rename": (1, ((0, 2), (1, 3))), "os.chmod": (1, ((0, 2),)), "os.utime": (1, ((0, 3),)),
        "os.truncate": (2, ((0, None),)), "shutil.rmtree": (1, ((0, 1),)), "os.chdir": (3, ((0, None),)),
        "shutil.move": (1, ((0, None), (1, None))), "os.listdir": (0, ((0, None),)),
        "os.scandir": (0, ((0, None),)), "os.getxattr": (0, ((0, None),)), "os.listxattr": (0, ((0, None),))})
    allowed = (read, write, write, (root,))

    def refuse(what):
        raise PermissionError(f"blocked in the sandbox: {what}")

    def under(p, dirs):   # loops, not generators: a generator's iterator is a frame local, so reachable
        for d in dirs:
            if p == d or starts(p, d + "/"):
                return True
        return False

    def real(p, base):   # p resolved as the OS does; os.path.realpath is Python code, so patchable
        p = decode(p, "utf-8", "surrogateescape") if type(p) is bytes else p
        if type(p) is not str or not starts(p, "/") and ".." in split(p, "/"):   # "open" has no dir_fd
            refuse("a path that is not str or bytes, or '..' in a relative path")
        out, todo, hops = (), tuple(split(p if starts(p, "/") else base + "/" + p, "/")), 0
        while todo:
            c, todo = todo[0], todo[1:]
            try:
                link = c not in ("", ".", "..") and lstat("/" + join(out + (c,))).st_mode >> 12 == 10
            except OSError:
                link = False
            if link and hops < 40:   # past 40 the kernel gives ELOOP
                t, hops = readlink("/" + join(out + (c,))), hops + 1
                todo, out = tuple(split(t, "/")) + todo, () if starts(t, "/") else out
            elif c == "..":
                out = out[:-1]
            elif c not in ("", "."):
                out += (c,)
        return "/" + join(out)

    def target(p, dir_fd=None):   # the path an event names, p an fd or relative to dir_fd or the cwd
        if type(p) is int or p is None:
            try:
                return getcwd() if p is None else readlink("/proc/self/fd/" + str(p))
            except OSError:
                return ""
        return real(p, getcwd() if dir_fd is None or dir_fd == -1 else target(dir_fd))

    def quota(what):   # the sandbox's files, and file_mb more for each file open in it (it may still grow)
        used, todo, files = 0, (root,), 1
        while todo:
            d, todo = todo[0], todo[1:]
            for n in tuple(listdir(d)):
                st = lstat(d + "/" + n)
                used, todo = used + max(st.st_size, 4096), todo + (d + "/" + n,) * (st.st_mode >> 12 == 4)
        for fd in range(nofile):
            p = target(fd)
            try:
                files += under(p, (root,)) and lstat(p).st_mode >> 12 == 8
            except OSError:   # deleted while open: it holds its blocks still
                files += 1
        if used + files * fsize > disk:
            refuse(f"{what}: past the disk quota of {disk >> 20} MiB")

    def hook(event, args):
        if event in events or starts(event, families):
            refuse(event)
        if event == "open" and type(args[0]) is not int:   # an int is an fd the code holds already
            w, r = args[2] & wflags, real(args[0], getcwd())
            if not under(r, write if w else read):
                refuse(f"open {args[0]!r} outside the sandbox")
            try:   # no directory fd outside the sandbox, so that relative paths under a dir_fd stay inside
                if not under(r, write) and stat(r).st_mode >> 12 == 4:
                    refuse(f"open {args[0]!r}: a directory outside the sandbox")
            except FileNotFoundError:
                pass
            if w and r != "/dev/null":
                quota(f"open {args[0]!r}")
        elif event in paths:
            kind, where = paths[event]
            for i, j in where:
                if not under(target(args[i], None if j is None else args[j]), allowed[kind]):
                    refuse(f"{event} {args[i]!r} outside the sandbox")
            if kind == 2:
                quota(event)
        elif event == "os.kill" and args[0] != pid:
            refuse("os.kill of another process")
        elif event == "import":   # a refused module, or an extension module from outside Python's dirs
            name = args[0] if type(args[0]) is str else str.__str__(args[0])
            ext = args[1] is not None and not under(real(args[1], getcwd()), code)
            if split(name, ".")[0] in imports or ext:
                raise ImportError(f"blocked in the sandbox: import {name}")
    sys.addaudithook(hook)


def _kernel_source():
    global _KERNEL_SOURCE
    if _KERNEL_SOURCE is None:   # built once (~10 ms): the _kernel_* functions and a call of _kernel_main
        import inspect
        fns = (_kernel_main, _kernel_worker, _kernel_contain, _kernel_hook)
        _KERNEL_SOURCE = "\n\n".join(["import json, os, signal, sys"] + [inspect.getsource(f) for f in fns]
                                     + ["_kernel_main()\n"])
    return _KERNEL_SOURCE


_KERNEL_SOURCE = None


class Kernel:
    """One solution's interpreter: a separate process whose globals persist across run() calls, held to
    SANDBOX. After the first result, `layers` names the layers that ran. isolate=False (or
    SCDPO_SANDBOX_ISOLATE=0) leaves out the OS layers (namespaces, seccomp), so that the audit hook can
    be tested alone; other keywords override SANDBOX."""

    def __init__(self, timeout=SANDBOX["timeout"], mem_mb=SANDBOX["mem_mb"], max_output=SANDBOX["max_output"],
                 isolate=None, **policy):
        isolate = os.environ.get("SCDPO_SANDBOX_ISOLATE", "1") != "0" if isolate is None else bool(isolate)
        self.policy = {**SANDBOX, **policy, "timeout": timeout, "mem_mb": mem_mb, "max_output": max_output,
                       "isolate": isolate}
        self.timeout, self.mem_mb, self.max_output = timeout, mem_mb, max_output
        self.proc = self.dir = self.layers = None

    def start(self):
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="scdpo-kernel-"))
        self._ctl, ctl = os.pipe()
        env = {"PATH": "/usr/bin:/bin", "HOME": self.dir, "TMPDIR": self.dir, "OPENBLAS_NUM_THREADS": "1",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        policy = json.dumps({**self.policy, "dir": self.dir, "ctl": ctl})
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _kernel_source(), policy], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(ctl,), env=env, cwd=self.dir,
            start_new_session=True)
        os.close(ctl)
        self._ready, self._tail = False, b""   # the kernel's hello is read with the first result

    def _alive(self):   # without reaping it: until then its pid, its process group's id, is nobody else's
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    def _collect(self, end, deadline, output=True):
        """The kernel's output (its first 4 * max_output + 4 bytes) and what its end-of-block pipe held before
        `end`, once `end` shows there (what follows waits for the next call); None if it died or timed out."""
        out, cap, got = self.proc.stdout.fileno(), 4 * self.max_output + 4, b""
        while end not in self._tail:
            left = deadline - time.monotonic()
            for fd in select.select([out, self._ctl][not output:], [], [], left)[0] if left > 0 else [None]:
                b = os.read(fd, 1 << 16) if fd is not None else b""
                if not b:
                    return None
                if fd == out:
                    got += b[:cap - len(got)]
                else:
                    self._tail = (self._tail + b)[-8192:]
        while output and select.select([out], [], [], 0)[0] and (b := os.read(out, 1 << 16)):   # before `end`
            got += b[:cap - len(got)]
        before, _, self._tail = self._tail.partition(end)
        return got, before

    def submit(self, code):
        """Send one block; collect its output with result(). Lets many kernels run at once."""
        if self.proc is None or not self._alive():
            self.close()
            self.start()
        self._nonce, self._deadline = os.urandom(16).hex(), time.monotonic() + self.timeout + 2
        try:
            self.proc.stdin.write(json.dumps({"code": code, "nonce": self._nonce}).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # died since the check above; result() reports it
            self._deadline = 0

    def result(self):
        if not self._ready:   # started by submit() without waiting, so that many kernels start at once
            hello = self._collect(b"\n", time.monotonic() + 60, output=False)
            if hello is None:
                self.close()
                return "RuntimeError: the sandbox kernel failed to start"
            self._ready, self.layers = True, json.loads(hello[1])["layers"]
            self._deadline = time.monotonic() + self.timeout + 2
        got = self._collect(self._nonce.encode() + b"\n", self._deadline)
        if got is None:  # hard timeout or crash (segfault, OOM kill): restart on next submit
            died = time.monotonic() < self._deadline
            self.close()
            return ("RuntimeError: the kernel died; it was restarted and its state is lost" if died else
                    f"TimeoutError: code execution exceeded {self.timeout:g} s; the kernel was restarted "
                    "and its state is lost")
        text = got[0].decode("utf-8", "replace")
        if len(text) > self.max_output or len(got[0]) == 4 * self.max_output + 4:
            text = text[:self.max_output] + "\n...(output truncated)"
        return text

    def run(self, code):
        self.submit(code)
        return self.result()

    def close(self):
        if self.proc is not None:
            if self.proc.returncode is None:   # not reaped yet, so the process group is still its own
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self.proc.wait()
            for close in (self.proc.stdin.close, self.proc.stdout.close, lambda: os.close(self._ctl)):
                try:
                    close()
                except OSError:
                    pass
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
