#!/usr/bin/env bash
# Every GPU measurement of the project in one unattended run, on one H100/H200 with the machine's own
# torch (2.11+) and triton; nothing is installed. transformers and Liger-Kernel are used when importable.
#
#     bash bench/gpu.sh 2>&1 | tee gpu.log       # ~5 minutes, never more than 8 (a time limit per part)
#     bash bench/gpu.sh --dry-run                # the same scripts on the CPU with small shapes
#     PYTHON=/path/to/python bash bench/gpu.sh   # another interpreter than python3 (python if none)
#
# Parts, each guarded so that one failure or timeout does not hide the others:
#   1. environment: GPU, torch, triton, whether transformers / liger_kernel import
#   2. kernels: Triton log-prob kernels vs float64 in bf16 on irregular shapes; fwd+bwd time, TFLOP/s and
#      memory at N=8192 D=4096 V=131072 against naive torch, a bf16 torch.mm of the same size (the peak)
#      and Liger-Kernel (bench/logprobs.py --device cuda); target >= 70% of peak at <= 1/4 naive memory
#   3. attention: the cuDNN NaN repro (row length % 128 == 64, log-sum-exp < -88.7, masked) through
#      model.attend, finite gradients; the memory of bool, unaligned and 8-aligned additive masks
#      (bench/attention.py)
#   4. sampler: tokens/s against transformers' generate at batch 64, Qwen2.5-0.5B shape, and peak cache
#      memory (bench/sample.py); target >= 3x
#   5. training: DPO tokens/s and MFU at Qwen2.5-0.5B and -1.5B shapes, length 1024 (bench/train.py);
#      target MFU >= 40%; and at step 0, bf16, the policy's log-probs minus its precomputed reference's
#   6. pipeline: the code only a GPU runs (bf16 compute, pinned copies, the CUDA graph, CUDA RNG states in
#      checkpoints), end to end on the miniature's task at a small size: mini.py (SFT, pair sampling,
#      four DPO runs, greedy accuracy, credit assignment), then scdpo.py killed after 2 of 4 steps,
#      resumed, exported and evaluated with --static
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}   # GPU images often have python3 alone
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
START=$(date +%s)

part() {   # part NAME SECONDS COMMAND...: run it with a time limit, say how it ended
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then echo "=== $name: ok (${dt}s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "=== $name: TIMEOUT after ${dt}s (output is partial)"
    else echo "=== $name: FAILED with exit code $rc (${dt}s)"; fi
}

part environment 25 "$PY" - <<'EOF'
import importlib, platform
import torch
print(f"python {platform.python_version()} | torch {torch.__version__} | cuda {torch.version.cuda} | "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for name in ("triton", "transformers", "liger_kernel"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'importable')}")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__}: {e}); the lines that need it say so")
EOF

# The pipeline part: on a GPU, every stage on the device that compute_init picks (cuda:0).
pipeline() {
    local out
    out=$(mktemp -d "${TMPDIR:-/tmp}/scdpo-gpu-pipeline-XXXXXX")
    local seed="$out/mini/seed0"
    local run=("$PY" scdpo.py --model "$seed/sft/final" --pairs "$seed/pairs-scdpo.jsonl" --out "$out/dpo"
               --global-batch 8 --micro-batch 4 --max-len 128 --max-prompt 100 --max-steps 4 --lr 2e-5
               --save-every 2 --log-every 1)
    "$PY" mini.py --out "$out/mini" --n-sft 2000 --sft-steps 200 --n-pairs 128 --k-max 4 --steps 4 \
        --batch 8 --n-eval 64 --n-dev 32 --n-credit 64 --boot 50 &&
    "${run[@]}" --stop-after 2 &&
    "${run[@]}" --resume --eval "$seed/sft.jsonl" --eval-limit 32 --static &&
    "$PY" -c "import json, sys; steps = [json.loads(l)['step'] for l in open(sys.argv[1])]
assert steps == [1, 2, 3, 4], steps; print('pipeline: resumed run logged steps', steps)" "$out/dpo/log.jsonl"
    local rc=$?
    rm -rf "$out"
    return $rc
}
export -f pipeline   # timeout runs commands, not functions: it runs `bash -c pipeline`
export PY

if [ $DRY -eq 0 ]; then
    part kernels 105 "$PY" bench/logprobs.py --device cuda
    part attention 40 "$PY" bench/attention.py --device cuda
    part sampler 90 "$PY" bench/sample.py --device cuda --reps 3
    part training 100 "$PY" bench/train.py --device cuda --steps 3
    part pipeline 120 bash -c pipeline   # mini.py and two scdpo.py, each starting CUDA
else   # the CPU paths of the same scripts, small
    part kernels 120 "$PY" bench/logprobs.py --N 256 --D 64 --V 1000 --iters 1
    part attention 120 "$PY" bench/attention.py --device cpu --T 192
    part sampler 300 "$PY" bench/sample.py --size tiny --batch 4 --new 8 --reps 1
    part training 300 "$PY" bench/train.py --steps 1 --prompt-len 32 --cont-len 8
    part pipeline 300 bash -c pipeline
fi
echo "=== all parts done in $(( $(date +%s) - START ))s"
