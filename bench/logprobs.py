"""Benchmark: fused per-token log-probs vs the naive log_softmax(h @ W.T).gather, forward + backward.

    python bench/logprobs.py                    # CPU: torch row step vs naive, N=4096 D=1024 V=151936 fp32
    python bench/logprobs.py --device cuda      # GPU: Triton row step, bf16, one line each:
        accuracy on two irregular shapes against float64 (and plain torch bf16's own error);
        naive, fused and Liger-Kernel (if importable) at N=8192 D=4096 V=131072: peak extra memory,
        time, effective TFLOP/s (8*N*D*V / time); a bf16 torch.mm of the same size (the peak);
        the verdict: fused >= 70% of that peak at <= 1/4 of naive's memory.
Each GPU line catches its own exceptions, so one failure does not hide the others (~1 min in all).

Memory is "peak extra": the highest memory in use during one forward+backward minus what was in
use just before it (inputs already allocated), so it includes the returned dH and dW in both paths.
  CPU: torch's CPU allocator is invisible to tracemalloc and hands large blocks straight back to
       the OS, so the OS's count is the honest one: each path runs in its own fresh subprocess,
       which resets the kernel's peak-RSS mark to the current RSS (writing 5 to
       /proc/self/clear_refs, Linux >= 4.0) once the inputs exist, runs one forward+backward, and
       reads the mark (VmHWM) back. The reset keeps the set-up's own peaks (input creation, the
       warm-up) out of the number; the fresh process keeps one path's pages out of the other's.
  GPU: torch.cuda.max_memory_allocated() minus memory_allocated() before the call.
Time: the best of --iters runs after that first (memory) run.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import token_logprobs                                # noqa: E402
from kernels.logprobs import token_logprobs_reference            # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: torch row step; cuda: Triton")
parser.add_argument("--N", type=int, default=None, help="tokens (default 4096 on cpu, 8192 on cuda)")
parser.add_argument("--D", type=int, default=None, help="hidden size (default 1024 on cpu, 4096 on cuda)")
parser.add_argument("--V", type=int, default=None, help="vocab (default 151936 on cpu, 131072 on cuda)")
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default fp32 on cpu, bf16 on cuda")
parser.add_argument("--iters", type=int, default=None,
                    help="timed runs per path, after the memory run (default 2 on cpu, 3 on cuda)")
parser.add_argument("--child", default=None, help="internal: run one path in this process and print JSON")
args = parser.parse_args()
cuda = args.device == "cuda"
N = args.N or (8192 if cuda else 4096)
D = args.D or (4096 if cuda else 1024)
V = args.V or (131072 if cuda else 151936)
dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
ITERS = args.iters or (3 if cuda else 2)
FLOPS = 8 * N * D * V                      # forward, recomputed logits, dH, dW: four GEMMs of 2NDV


def inputs():
    g = torch.Generator(device=args.device).manual_seed(0)
    hidden = torch.randn(N, D, device=args.device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device=args.device, generator=g) * D ** -0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=args.device, generator=g)
    targets[::7] = -100                                            # prompt / padding positions
    return hidden, weight, targets


def liger(hidden, weight, targets):
    # Liger's fused linear cross-entropy returns a loss, not per-token values: sum of -logp over tokens.
    # Knowing the loss is the end of the graph, it computes the gradients in its forward (6NDV FLOPs,
    # no recomputed logits); the TFLOP/s column still counts 8NDV for every path, so times compare.
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return -LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets)


PATHS = {"naive": token_logprobs_reference, "fused": token_logprobs, "liger": liger}


def step(fn, hidden, weight, targets):
    logp = fn(hidden, weight, targets)
    return torch.autograd.grad(logp.sum(), (hidden, weight))      # dH, dW returned, not accumulated


def sync():
    if cuda:
        torch.cuda.synchronize()


def rss(field):
    with open("/proc/self/status") as f:                           # "VmHWM:   123456 kB"
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(name):
    """One path in this process: peak extra memory (bytes) of one fwd+bwd, then the best time."""
    fn = PATHS[name]
    hidden, weight, targets = inputs()
    step(fn, hidden[:64].detach().requires_grad_(), weight, targets[:64])   # thread pools, kernel compile
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                           # peak RSS := current RSS
        before = rss("VmHWM")
    grads = step(fn, hidden, weight, targets)
    sync()
    peak = torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")
    del grads
    times = []
    for _ in range(ITERS):
        t0 = time.perf_counter()
        step(fn, hidden, weight, targets)
        sync()
        times.append(time.perf_counter() - t0)
    return {"mem": peak - before, "time": min(times)}


def report(name, r):
    print(f"{name:6s} | peak extra memory {r['mem'] / 2**30:7.3f} GiB | time {r['time'] * 1e3:9.2f} ms | "
          f"effective {FLOPS / r['time'] / 1e12:7.2f} TFLOP/s (8*N*D*V / time)", flush=True)


def guarded(name, fn):
    """Run one GPU line; print its exception instead of stopping the benchmark."""
    try:
        return fn()
    except ImportError as e:                                       # Liger-Kernel not installed
        print(f"{name:6s} | skipped: {e}", flush=True)
    except Exception as e:
        print(f"{name:6s} | FAILED: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=3, file=sys.stdout)
        return None
    finally:
        if cuda:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# GPU only: accuracy against float64, and the bf16 GEMM peak
# ----------------------------------------------------------------------------------------------
def plain(hidden, weight, targets):
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    return torch.where(targets == -100, 0.0, logp)


def accuracy(n, d, v):
    """bf16 Triton vs float64 truth; plain torch in bf16 for scale; and bitwise reruns."""
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(v, d, device="cuda", generator=g) * 3 * d ** -0.5).bfloat16()   # logits ~ 3
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::7], targets[1] = -100, v - 1
    grad = torch.randn(n, device="cuda", generator=g)

    def run(fn, dt):
        h, w = (x.detach().to(dt).requires_grad_() for x in (hidden, weight))     # fresh leaves
        logp = fn(h, w, targets)
        return (logp.detach(), *torch.autograd.grad(logp, (h, w), grad.to(logp.dtype)))

    truth = run(plain, torch.float64)
    base = run(plain, torch.bfloat16)
    ours, again = run(token_logprobs, torch.bfloat16), run(token_logprobs, torch.bfloat16)
    cols, ok = [], True
    for name, x, b, ref in zip(("logp", "dH", "dW"), ours, base, truth):
        ex, eb = x.double() - ref, b.double() - ref                        # ours, plain torch bf16
        cols.append(f"{name} {ex.abs().max():.2e} (torch {eb.abs().max():.2e})")
        ok &= bool(ex.norm() <= eb.norm() + 1e-5)                          # the tests' criterion
    same = all(torch.equal(x, y) for x, y in zip(ours, again))
    print(f"accur. | N {n} D {d} V {v} bf16, max |error| vs float64: {' | '.join(cols)} | "
          f"L2 no worse than torch: {'yes' if ok else 'NO'} | rerun bitwise equal: {'yes' if same else 'NO'}",
          flush=True)


def matmul_peak():
    """A bf16 torch.mm of the problem's own size (N x D @ D x V): the TFLOP/s the kernel is held to."""
    a = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(V, D, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        a @ b.T
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b.T
    sync()
    peak = 2 * N * D * V * 5 / (time.perf_counter() - t0)
    print(f"peak   | bf16 torch.mm {N}x{D} @ {D}x{V}: {peak / 1e12:.1f} TFLOP/s", flush=True)
    return peak


if args.child:
    print(json.dumps(measure(args.child)))
    sys.exit()

if cuda:
    # torch-only lines first: an illegal memory access in a kernel would poison the CUDA context for
    # every line after it
    import triton
    print(f"device cuda ({torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}) | N {N} D {D} V {V} {str(dtype).split('.')[1]} | fwd+bwd | "
          f"naive logits alone: {N * V * dtype.itemsize / 2**30:.2f} GiB", flush=True)
    peak = guarded("peak", matmul_peak)
    results = {}
    for name in ("naive", "liger", "fused"):
        if name == "fused":
            for shape in [(4099, 1000, 151936), (3001, 4096, 128256)]:    # irregular; 5 and 3 slices
                guarded("accur.", lambda: accuracy(*shape))
        results[name] = guarded(name, lambda: measure(name))
        if results[name]:
            report(name, results[name])
    naive, fused, lig = results["naive"], results["fused"], results["liger"]
    if naive and fused and peak:
        share, mem = FLOPS / fused["time"] / peak, fused["mem"] / naive["mem"]
        verdict = "PASS" if share >= 0.7 and mem <= 0.25 else "FAIL"
        print(f"fused  | {share:.0%} of the bf16 mm peak (target >= 70%) | memory {mem:.3f} of naive "
              f"(target <= 0.25) | time {fused['time'] / naive['time']:.2f}x naive | {verdict}")
    if fused and lig:
        print(f"fused / liger | time {fused['time'] / lig['time']:.2f}x | "
              f"memory {fused['mem'] / lig['mem']:.2f}x")
else:
    print(f"device cpu ({torch.get_num_threads()} threads) | N {N} D {D} V {V} {str(dtype).split('.')[1]} | "
          f"fwd+bwd | naive logits alone: {N * V * dtype.itemsize / 2**30:.2f} GiB")
    results = {}
    for name in ["naive", "fused"]:                                # fresh process per path, see docstring
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        report(name, results[name])
    naive, fused = results["naive"], results["fused"]
    mem_ratio, time_ratio = fused["mem"] / naive["mem"], fused["time"] / naive["time"]
    verdict = lambda ok: "PASS" if ok else "FAIL"
    print(f"fused / naive | memory {mem_ratio:.3f} (goal <= 0.125) {verdict(mem_ratio <= 0.125)} | "
          f"time {time_ratio:.2f}x (goal <= 1.5x) {verdict(time_ratio <= 1.5)}")
