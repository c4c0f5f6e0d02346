#!/usr/bin/env bash
# Every CPU benchmark in one run, in the order of issue 5's targets; each prints its own table,
# header (machine, threads, malloc) and how busy other processes kept the CPUs. Run it on a quiet
# machine: on 2 cores a co-tenant on one core distorts the small-GEMM ratios (see README.md).
#
#   bash benchmarks/run_all.sh 2>/dev/null | tee bench.txt      # about 20 minutes on 2 cores
#   PY=python3 bash benchmarks/run_all.sh                        # another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" benchmarks/bench_ffn.py
"$PY" benchmarks/bench_attention.py
"$PY" benchmarks/bench_attention.py --malloc default   # glibc's own allocator, for comparison
"$PY" benchmarks/bench_attention_kernel.py
"$PY" benchmarks/bench_rope.py
"$PY" benchmarks/bench_train_step.py
"$PY" benchmarks/bench_upcycle.py --format ckpt
