#!/usr/bin/env bash
# GPU check, for a session that is lent a CUDA GPU (an H200 here); no test or CI ever runs it.
# Written for a short slot on a box without network whose image has its own python3 and torch
# (benchmarks/README.md, "GPU check"). In order, each step under `timeout`:
#   preflight        imports (image + wheel bundle), the paper_590m recipe, the FFN kernel per dtype,
#                    no host sync in the bf16 FFN mixture's forward+backward
#   ffn_profile      where one paper_590m FFN mixture forward+backward spends its GPU time (bf16)
#   bench_ffn        FFN mixture vs dense at paper_590m's layer shapes, bf16 then fp32, with the
#                    share of each layer's time in matmuls
#   bench_attention  Expert-KV and Shared-KV attention vs E x dense, bf16 then fp32
#   bench_train_step Lightning steps of the paper_590m seed and BAM: tokens/s, MFU (BAM/seed), memory,
#                    then the quickest of three profiled steps of each: time in matmuls / attention kernel / the rest
#   bam_fit          `bam fit` of a few paper_590m BAM steps on built-in data (CLI, data, callbacks)
#   bench_train_2b   the same at paper_2b's shapes (batch 1 x 2048: a 6.2B-parameter mixture
#                    with AdamW states takes about 100 of the 141 GB), one segment
# then a one-line summary. The whole run stays within BUDGET_S (default 450 s).
#
#   bash benchmarks/gpu_check.sh                  # on the GPU box
#   bash benchmarks/gpu_check.sh --device cpu     # rehearsal anywhere: the same steps at tiny sizes
#
# Environment: PY (the interpreter; default .venv/bin/python, or python3 where that has no CUDA
# torch), BUDGET_S, GPU_CHECK_LOGS (a folder to keep each step's log; give $OUT on a machine that
# sends $OUT back). When .whl/ holds wheels (benchmarks/gpu_wheels.sh), they are installed first
# with `pip install --no-index --no-deps --target` into a temporary folder put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
while (($#)); do
    case $1 in
        --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--device cuda|cpu]" >&2; exit 2 ;;
    esac
done
[[ $DEVICE == cuda || $DEVICE == cpu ]] || { echo "gpu_check: --device must be cuda or cpu" >&2; exit 2; }

PY_GIVEN=${PY+yes}
PY=${PY:-.venv/bin/python}
BUDGET_S=${BUDGET_S:-450}
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # output in order when piped; never reach for a hub
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG_DIR=${GPU_CHECK_LOGS:-$WORK/logs}
mkdir -p "$LOG_DIR"
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

if [[ $DEVICE == cuda ]]; then
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
elif [[ ! -x $PY ]] && [[ -z $PY_GIVEN ]]; then
    PY=python3
fi
if [[ $PY == */* && $PY != /* ]]; then
    PY=$PWD/$PY  # bam_fit runs from a scratch folder
fi
"$PY" -c 'import platform, torch; print(f"# Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")'

# The wheel bundle: what the image lacks (litdata, omegaconf, jsonargparse...). pip where it
# works; else unpacking: these wheels are plain zip archives of modules and their dist-info.
shopt -s nullglob
WHEELS=(.whl/*.whl)
if ((${#WHEELS[@]})); then
    echo "=== wheel bundle: ${#WHEELS[@]} wheels from .whl/ into $WORK/wheels"
    if ! "$PY" -m pip install --no-index --no-deps --disable-pip-version-check --target "$WORK/wheels" \
        "${WHEELS[@]}" >"$WORK/pip.log" 2>&1; then
        tail -5 "$WORK/pip.log"
        echo "# pip could not install the bundle (above); unpacking the wheels instead"
        rm -rf "$WORK/wheels"
        for wheel in "${WHEELS[@]}"; do "$PY" -m zipfile -e "$wheel" "$WORK/wheels"; done
    fi
    export PYTHONPATH="$WORK/wheels${PYTHONPATH:+:$PYTHONPATH}"
fi

# The package maps bam_lightning.callbacks to callbacks/ (pyproject package-dir): without an
# install, a folder of links gives the same layout. sys.path[0] ('' = this folder) would shadow it.
if ! "$PY" -c 'import sys; sys.path.pop(0); import bam_lightning.callbacks' >/dev/null 2>&1; then
    SHIM=$WORK/shim
    mkdir -p "$SHIM/bam_lightning"
    ln -s "$PWD"/bam_lightning/* "$SHIM/bam_lightning/"
    ln -s "$PWD/callbacks" "$SHIM/bam_lightning/callbacks"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    echo "# bam_lightning is not installed for $PY: importing this checkout through $SHIM"
fi

step preflight 60 "$PY" benchmarks/gpu_preflight.py --device "$DEVICE"

if [[ $DEVICE == cuda ]]; then
    # paper_590m's layers: d_model 1024, d_ff 2048, 8 heads, seq 2048, 8 sequences (16384 tokens).
    # --experts 4 8 --top-k 1 2 covers (E, k) = (8, 2) and (4, 1) and the two between, at little
    # cost. bf16 is the grouped kernel's dtype on CUDA; fp32 there takes the per-expert loop.
    FFN_SIZES=(--experts 4 8 --top-k 1 2 --tokens 16384 --d-model 1024 --d-ff 2048)
    FFN_PROFILE=(--experts 4 --top-k 1 --tokens 16384 --d-model 1024 --d-ff 2048 --rounds 3)
    ATTN_SIZES=(--experts 4 --d-model 1024 --heads 8 --seq 2048 --batch 8)
    # 2 models x 2 segments x (5 warm-up + 30 timed) = 140 steps of 8 x 2048 tokens. The [16384,
    # 256000] logits and their fp32 copies dominate memory (about 75 GB estimated of the 141).
    TRAIN=(--model paper_590m --accelerator gpu --seq 2048 --segments 2 --warmup 5 --steps 30 --threads 8)
    TRAIN_BATCH=8
    # paper_2b: most of the time is building the two models on the CPU; one segment of 3 + 10 steps.
    TRAIN_2B=(--model paper_2b --accelerator gpu --seq 2048 --segments 1 --warmup 3 --steps 10 --threads 16
        --batch 1)
    FIT=(--trainer.accelerator gpu)
else
    FFN_SIZES=(--experts 4 --top-k 1 2 --tokens 256 --d-model 64 --d-ff 128 --rounds 2 --warmup 1 --bf16-rounds 2)
    FFN_PROFILE=(--experts 4 --top-k 1 --tokens 256 --d-model 64 --d-ff 128 --rounds 2 --warmup 1 --bf16-rounds 2)
    ATTN_SIZES=(--experts 4 --d-model 64 --heads 4 --seq 64 --batch 2 --rounds 2 --warmup 1)
    TRAIN=(--model tiny --accelerator cpu --seq 64 --segments 1 --warmup 1 --steps 3)
    TRAIN_BATCH=4
    TRAIN_2B=(--model paper_2b --accelerator cpu --seq 64 --segments 1 --warmup 1 --steps 2 --batch 2
        --override n_layer=1 d_model=64 n_head=2 n_kv_head=2 d_ff=128 vocab_size=512)
    # paper_590m's recipe with its model shrunk: the same CLI, data, strategy and callbacks
    FIT=(--trainer.accelerator cpu --data.seq_len 64 --data.batch_size 4 --model.init_args.config.n_layer 1
        --model.init_args.config.d_model 64 --model.init_args.config.n_head 2 --model.init_args.config.n_kv_head 2
        --model.init_args.config.d_ff 128 --model.init_args.config.vocab_size 512
        --model.init_args.config.max_seq_len 64)
fi

step ffn_profile 40 "$PY" benchmarks/bench_ffn.py --device "$DEVICE" --dtypes bf16 "${FFN_PROFILE[@]}" --no-hf --profile
step bench_ffn 60 "$PY" benchmarks/bench_ffn.py --device "$DEVICE" --dtypes bf16 fp32 "${FFN_SIZES[@]}" --no-hf
step bench_attention 50 "$PY" benchmarks/bench_attention.py --device "$DEVICE" --dtypes bf16 fp32 "${ATTN_SIZES[@]}"

# MFU against the H200's bf16 datasheet peak, dense: 989 TFLOP/s (Lightning's table lists the
# 2:4-sparse 1979); the table also shows MFU against the measured matmul ceiling.
TRAIN=("$PY" benchmarks/bench_train_step.py "${TRAIN[@]}" --precision bf16-mixed --peak-tflops 989)
step bench_train_step 150 "${TRAIN[@]}" --batch "$TRAIN_BATCH" --breakdown
if [[ $DEVICE == cuda && ${RESULTS[-1]} == "bench_train_step FAILED"* ]] &&
    grep -q -E "OutOfMemoryError|CUDA out of memory" "$LOG_DIR/bench_train_step.log"; then
    RESULTS[-1]="bench_train_step out of GPU memory at batch 8"
    step bench_train_step_batch4 120 "${TRAIN[@]}" --batch 4
fi
TRAIN_2B=("$PY" benchmarks/bench_train_step.py "${TRAIN_2B[@]}" --precision bf16-mixed --peak-tflops 989)

# The real CLI from a scratch folder (so sys.path[0] is not this checkout, and nothing is written
# here): paper_590m's BAM recipe with benchmarks/gpu_fit.yaml laid over it, then its checkpoint.
FIT_RUNS=$WORK/fit/runs
mkdir -p "$WORK/fit"
step bam_fit 150 env -C "$WORK/fit" BAM_CACHE_DIR="$WORK/fit/cache" "$PY" -m bam_lightning.cli fit \
    --config "$PWD/recipes/paper_590m/bam.yaml" --config "$PWD/benchmarks/gpu_fit.yaml" \
    --trainer.logger.init_args.save_dir "$FIT_RUNS" "${FIT[@]}"
if [[ ${RESULTS[-1]} == "bam_fit ok"* ]]; then
    if [[ -s $FIT_RUNS/bam/checkpoints/last.ckpt ]]; then
        RESULTS[-1]+=" ($(du -h "$FIT_RUNS/bam/checkpoints/last.ckpt" | cut -f1) last.ckpt)"
    else
        RESULTS[-1]="bam_fit FAILED: no $FIT_RUNS/bam/checkpoints/last.ckpt"
    fi
fi
rm -rf "$WORK/fit"  # the weights of a 776M-parameter mixture: about 3 GB

step bench_train_2b 150 "${TRAIN_2B[@]}"

FAILED=0
for result in "${RESULTS[@]}"; do
    if [[ $result == *" TIMEOUT "* || $result == *" FAILED"* || $result == *" skipped "* ]]; then
        FAILED=1
    fi
done
TRAIN_RESULT=$(sed -n 's/^# result: /paper_590m: /p' "$LOG_DIR"/bench_train_step*.log 2>/dev/null | tail -1)
TRAIN_2B_RESULT=$(sed -n 's/^# result: /paper_2b: /p' "$LOG_DIR"/bench_train_2b.log 2>/dev/null | tail -1)
SUMMARY=$(printf ' | %s' "${RESULTS[@]}")
echo
echo "gpu_check: $( ((FAILED)) && echo FAILED || echo ok ) on $DEVICE in ${SECONDS} s${SUMMARY}${TRAIN_RESULT:+ | $TRAIN_RESULT}${TRAIN_2B_RESULT:+ | $TRAIN_2B_RESULT}"
exit "$FAILED"
