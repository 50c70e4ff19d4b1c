"""Benchmark: fused per-token log-probs vs the naive log_softmax(h @ W.T).gather, forward + backward.

    python bench/logprobs.py                    # CPU: torch fallback vs naive, N=4096 D=1024 V=151936 fp32
    python bench/logprobs.py --device cuda      # GPU: Triton vs naive (vs Liger-Kernel if importable),
                                                #      bf16 N=8192 D=4096 V=131072, plus a bf16 matmul peak

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

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import token_logprobs                                # noqa: E402
from kernels.logprobs import token_logprobs_reference            # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: torch fallback; cuda: Triton")
parser.add_argument("--N", type=int, default=None, help="tokens (default 4096 on cpu, 8192 on cuda)")
parser.add_argument("--D", type=int, default=None, help="hidden size (default 1024 on cpu, 4096 on cuda)")
parser.add_argument("--V", type=int, default=None, help="vocab (default 151936 on cpu, 131072 on cuda)")
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default fp32 on cpu, bf16 on cuda")
parser.add_argument("--iters", type=int, default=2, help="timed runs per path, after the memory run")
parser.add_argument("--child", default=None, help="internal: run one path in this process and print JSON")
args = parser.parse_args()
cuda = args.device == "cuda"
N = args.N or (8192 if cuda else 4096)
D = args.D or (4096 if cuda else 1024)
V = args.V or (131072 if cuda else 151936)
dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))


def inputs():
    g = torch.Generator(device=args.device).manual_seed(0)
    hidden = torch.randn(N, D, device=args.device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, device=args.device, generator=g) * D ** -0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device=args.device, generator=g)
    targets[::7] = -100                                            # prompt / padding positions
    return hidden, weight, targets


def liger(hidden, weight, targets):
    # Liger's fused linear cross-entropy returns a loss, not per-token values: sum of -logp over tokens
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
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step(fn, hidden, weight, targets)
        sync()
        times.append(time.perf_counter() - t0)
    return {"mem": peak - before, "time": min(times)}


def matmul_peak():
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    sync()
    return 2 * 8192 ** 3 * 20 / (time.perf_counter() - t0)


if args.child:
    print(json.dumps(measure(args.child)))
    sys.exit()

print(f"device {args.device} ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} threads'}) | "
      f"N {N} D {D} V {V} {str(dtype).split('.')[1]} | fwd+bwd | naive logits alone: {N * V * dtype.itemsize / 2**30:.2f} GiB")
results = {}
for name in ["naive", "fused"] + (["liger"] if cuda else []):
    if cuda:                                                       # one process; peak stats are per call
        try:
            results[name] = measure(name)
        except ImportError as e:
            print(f"{name:6s} | skipped: {e}")
            continue
        torch.cuda.empty_cache()
    else:                                                          # fresh process per path, see docstring
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    r = results[name]
    print(f"{name:6s} | peak extra memory {r['mem'] / 2**30:7.3f} GiB | time {r['time']:7.2f} s | "
          f"effective {8 * N * D * V / r['time'] / 1e12:6.2f} TFLOP/s (8*N*D*V / time)")

naive, fused = results["naive"], results["fused"]
mem_ratio, time_ratio = fused["mem"] / naive["mem"], fused["time"] / naive["time"]
mem_goal, time_goal = (0.25, 1.0) if cuda else (0.125, 1.5)
print(f"fused / naive | memory {mem_ratio:.3f} (goal <= {mem_goal}) {'PASS' if mem_ratio <= mem_goal else 'FAIL'} | "
      f"time {time_ratio:.2f}x (goal <= {time_goal}x) {'PASS' if time_ratio <= time_goal else 'FAIL'}")
if cuda:
    peak = matmul_peak()
    eff = 8 * N * D * V / fused["time"]
    print(f"bf16 matmul peak (8192^3, this run) {peak / 1e12:.1f} TFLOP/s | fused at {eff / peak:.0%} of it (aim 70%)")
