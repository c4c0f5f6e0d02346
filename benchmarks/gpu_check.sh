#!/usr/bin/env bash
# GPU check, for a session that is lent a CUDA GPU (an H200 here); no test or CI ever runs it.
# Prints the GPU, the layer-benchmark ratios on it (FFN mixture vs dense, mixture of attention vs
# E x dense, fp32 and bf16, at paper_590m's layer shapes), then a few hundred Lightning training
# steps of the paper_590m BAM mixture and its dense seed in bf16 with tokens/s and MFU.
# Every command runs under `timeout` inside one overall budget (BUDGET_S, default 285 s), so the
# whole script ends within about 5 minutes; the last line is a one-line summary.
#
#   bash benchmarks/gpu_check.sh
#   PY=python3 bash benchmarks/gpu_check.sh     # choose the interpreter
#
# PY defaults to the checkout's .venv; when PY is not given and that interpreter has no CUDA torch
# (the dev .venv holds the CPU wheel; a GPU image has its own python3), python3 is used instead.
# When bam_lightning is not installed for the interpreter, it is imported from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_GIVEN=${PY+yes}
PY=${PY:-.venv/bin/python}
BUDGET_S=${BUDGET_S:-285}
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1  # output in order when piped
LOG_DIR=$(mktemp -d)
RESULTS=()  # one "NAME ok|TIMEOUT|FAILED|skipped ..." entry per step, for the summary

has_cuda_torch() {
    timeout 60 "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

# step NAME LIMIT_S COMMAND...: run COMMAND under timeout (its limit cut to the budget left),
# tee its output to $LOG_DIR/NAME.log, and record the outcome in RESULTS.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS - 5))
    if ((left < 15)); then
        RESULTS+=("$name skipped (budget spent)")
        return 0
    fi
    if ((limit > left)); then
        limit=$left
    fi
    echo
    echo "=== $name (timeout ${limit} s): $*"
    local start=$SECONDS rc=0
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log" || rc=$?
    local took=$((SECONDS - start))
    if ((rc == 0)); then
        RESULTS+=("$name ok ${took}s")
    elif ((rc == 124 || rc == 137)); then
        RESULTS+=("$name TIMEOUT after ${took}s")
    else
        RESULTS+=("$name FAILED rc=$rc after ${took}s")
    fi
    return 0
}

echo "=== GPU"
timeout 20 nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version,temperature.gpu,utilization.gpu \
    --format=csv || echo "nvidia-smi unavailable"

if ! has_cuda_torch "$PY"; then
    if [[ -z $PY_GIVEN ]] && has_cuda_torch python3; then
        echo "# $PY has no torch that sees a CUDA GPU; using python3 ($(command -v python3))"
        PY=python3
    else
        echo "gpu_check: FAILED: no torch that sees a CUDA GPU in $PY${PY_GIVEN:+ (PY was given)}${PY_GIVEN:- nor in python3}"
        exit 1
    fi
fi
"$PY" -c 'import platform, torch; print(f"# Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")'

# The package maps bam_lightning.callbacks to callbacks/ (pyproject package-dir): without an
# install, a folder of links gives the same layout. sys.path[0] ('' = this folder) would shadow it.
if ! "$PY" -c 'import sys; sys.path.pop(0); import bam_lightning.callbacks' >/dev/null 2>&1; then
    SHIM=$(mktemp -d)
    mkdir "$SHIM/bam_lightning"
    ln -s "$PWD"/bam_lightning/* "$SHIM/bam_lightning/"
    ln -s "$PWD/callbacks" "$SHIM/bam_lightning/callbacks"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    echo "# bam_lightning is not installed for $PY: importing this checkout through $SHIM"
    if ! "$PY" -c 'import sys; sys.path.pop(0); import bam_lightning.callbacks'; then
        echo "gpu_check: FAILED: bam_lightning cannot be imported with $PY"
        exit 1
    fi
fi

# Layer shapes of paper_590m: d_model 1024, d_ff 2048, 8 heads, seq 2048, 8 sequences (16384 tokens).
# --experts 4 8 --top-k 1 2 covers (E, k) = (8, 2) and (4, 1) and the two between, at little cost.
# bf16 first: torch documents grouped_mm for bf16 on CUDA, so the fp32 case is the one that may fail.
step bench_ffn 75 "$PY" benchmarks/bench_ffn.py --device cuda --dtypes bf16 fp32 --experts 4 8 --top-k 1 2 \
    --tokens 16384 --d-model 1024 --d-ff 2048 --no-hf
step bench_attention 60 "$PY" benchmarks/bench_attention.py --device cuda --dtypes bf16 fp32 --experts 4 \
    --d-model 1024 --heads 8 --seq 2048 --batch 8

# 2 models x 2 segments x (10 warm-up + 60 timed) = 280 steps of 8 x 2048 tokens. The [16384, 256000]
# logits and their fp32 copies dominate memory (estimated peak about 75 GB of the 141); on an
# out-of-memory error the step is retried once with batch 4.
TRAIN=("$PY" benchmarks/bench_train_step.py --model paper_590m --accelerator gpu --precision bf16-mixed
    --seq 2048 --segments 2 --warmup 10 --steps 60 --threads 8)
step bench_train_step 200 "${TRAIN[@]}" --batch 8
if [[ ${RESULTS[-1]} == "bench_train_step FAILED"* ]] &&
    grep -q -E "OutOfMemoryError|CUDA out of memory" "$LOG_DIR/bench_train_step.log"; then
    RESULTS[-1]="bench_train_step out of GPU memory at batch 8"
    step bench_train_step_batch4 200 "${TRAIN[@]}" --batch 4
fi

FAILED=0
for result in "${RESULTS[@]}"; do
    if [[ $result == *" TIMEOUT "* || $result == *" FAILED "* || $result == *" skipped "* ]]; then
        FAILED=1
    fi
done
SUMMARY=$(printf ' | %s' "${RESULTS[@]}")
echo
echo "gpu_check: $( ((FAILED)) && echo FAILED || echo ok ) in ${SECONDS} s${SUMMARY}"
exit "$FAILED"
