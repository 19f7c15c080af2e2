#!/usr/bin/env bash
# One GPU check for a machine as it comes: its own python3 with torch, no network, no venv, no pip.
#
#   bash bench/gpu_check.sh OUTDIR        (PYTHON=... to use another interpreter)
#
# Steps, each under its own time limit (about 8 minutes in all), each logged to OUTDIR/<step>.log:
#   env        python, torch, CUDA, GPU, and which optional packages are there
#   build      the kernels (setup.py build_ext --inplace; CUDA for this GPU's arch only)
#   cuda_tests tests/test_attention_cuda.py (every kernel family against a float64 oracle)
#   attention  bench/attention.py --device cuda: ours vs SDPA and FlexAttention
#   train      bench/train.py: a bf16 training step of StarCoder2-3B-shaped layers on one GPU,
#              eager and with --compile, with MFU
# A missing dependency (pybind11, pytest, nvcc, a GPU) is said in the summary and the steps that
# need it are skipped; the others still run. OUTDIR/summary.txt lists every step's outcome.
# Exit status: 0 when every step that could run passed, 1 otherwise, 2 on bad usage.
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
START=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME SECONDS CMD...: one step, its output in OUTDIR/NAME.log, its outcome in the summary.
run() {
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    echo "== $name: $*" > "$OUT/$name.log"
    timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$? dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        note "$name: ok (${dt}s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note "$name: TIMED OUT after ${limit}s (log: $name.log)"; FAILED=1
    else
        note "$name: FAILED, exit $rc (${dt}s; tail of $name.log below)"; FAILED=1
        tail -n 15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
    return $rc
}
skip() { note "$1: skipped ($2)"; }

# ---- env: what this machine has ------------------------------------------------------------------
if ! command -v "$PY" > /dev/null; then
    note "env: no $PY on PATH; nothing can run"; exit 1
fi
"$PY" - > "$OUT/env.log" 2>&1 <<'EOF'
import importlib, platform, shutil, subprocess, sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"gpu{i}", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB")
except Exception as e:
    print("torch MISSING", type(e).__name__, e)
for mod in ("pybind11", "pytest", "numpy", "yaml", "transformers", "triton", "setuptools"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "present"))
    except Exception as e:
        print(mod, "MISSING")
print("nvcc", shutil.which("nvcc") or "not on PATH")
print("cpu", platform.processor() or platform.machine())
EOF
cat "$OUT/env.log" | sed 's/^/    /'
has() { grep -q "^$1 " "$OUT/env.log" && ! grep -q "^$1 MISSING" "$OUT/env.log"; }
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.log" 2>&1
if ! has torch; then
    note "env: torch is not importable by $PY; nothing else can run"; exit 1
fi
GPU=0
grep -q "available True" "$OUT/env.log" && GPU=1
[ $GPU -eq 1 ] || note "env: torch sees no GPU: the GPU steps are skipped (this is not a GPU machine)"

# ---- build ---------------------------------------------------------------------------------------
ARCH=$(grep -m1 "^gpu0" "$OUT/env.log" | sed -n 's/.* sm_\([0-9]*\) .*/\1/p')
if ! has pybind11; then
    skip build "no pybind11 for $PY: the kernels cannot be built; attention uses the PyTorch reference"
elif ! has setuptools; then
    skip build "no setuptools for $PY"
else
    # Only this GPU's architecture, and no CPU emulator of the CUDA kernels (tests only): faster.
    run build 240 env MEGATRON_SC2_CUDA_EMU=0 ${ARCH:+MEGATRON_SC2_CUDA_ARCHS=$ARCH} \
        "$PY" setup.py -q build_ext --inplace
fi
"$PY" - >> "$OUT/env.log" 2>&1 <<'EOF'
from megatron_sc2.ops import kernels
for name in ("_attn_cpu", "_attn_cuda"):
    mod = kernels._load(name)
    print("module", name, "built" if mod is not None else "NOT BUILT: " + kernels.load_error(name))
EOF
grep "^module" "$OUT/env.log" | sed 's/^/    /' | tee -a "$SUMMARY"
CUDA_MOD=0
grep -q "^module _attn_cuda built" "$OUT/env.log" && CUDA_MOD=1

# ---- the CUDA tests ------------------------------------------------------------------------------
if [ $GPU -eq 0 ]; then
    skip cuda_tests "no GPU"
elif ! has pytest; then
    skip cuda_tests "no pytest for $PY"
elif [ $CUDA_MOD -eq 0 ]; then
    skip cuda_tests "the CUDA module was not built (no nvcc / CUDA toolkit, or the build failed)"
else
    run cuda_tests 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_attention_cuda.py
fi

# ---- attention benchmark against FlexAttention ---------------------------------------------------
if [ $GPU -eq 0 ]; then
    skip attention "no GPU"
else
    [ $CUDA_MOD -eq 1 ] || note "attention: the CUDA module is missing: 'ours' is the PyTorch reference"
    run attention 120 "$PY" bench/attention.py --device cuda --seqs 4096,16384 --windows 4096 \
        --repeats 3 --json "$OUT/attention.json"
fi

# ---- a bf16 training step of StarCoder2-3B-shaped layers, eager and compiled ---------------------
if [ $GPU -eq 0 ]; then
    skip train "no GPU"
else
    run train 200 "$PY" bench/train.py --device cuda --bf16 --shape starcoder2-3b --layers 4 \
        --seqs 4096 --batches 2 --windows 4096 --no-hf --compile --repeats 5 --warmup 2 \
        --json "$OUT/train.json"
fi

note "total: $(( $(date +%s) - START ))s; logs in $OUT"
exit $FAILED
