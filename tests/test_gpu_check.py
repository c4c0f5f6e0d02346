"""The GPU check (benchmarks/gpu_check.sh) rehearsed on CPU, as its `--device cpu` mode runs it.

A session lent a GPU has minutes of device time and runs this script once; nothing else in the
suite runs the benchmarks it calls. A change to a benchmark, a recipe or the CLI that breaks a
step would otherwise be found on the GPU, at the cost of the slot: a recipe change did once (the
paper_590m recipe's `data_parallel_size: 8` made the check's one-device `bam fit` fail at start-up).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
STEPS = ("preflight", "ffn_profile", "bench_ffn", "bench_attention", "bench_train_step", "bam_fit", "bench_train_2b")


def test_gpu_check_rehearsal_passes_every_step_on_cpu(tmp_path):
    logs = tmp_path / "logs"
    env = {**os.environ, "PY": sys.executable, "GPU_CHECK_LOGS": str(logs), "BUDGET_S": "420"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu"], env=env,
                            capture_output=True, text=True, timeout=480)
    lines = result.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    assert result.returncode == 0, f"{summary}\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
    assert summary.startswith("gpu_check: ok on cpu"), summary
    for step in STEPS:
        assert f"| {step} ok " in summary, (step, summary)
        assert (logs / f"{step}.log").stat().st_size > 0, step
    assert "last.ckpt)" in summary  # bam_fit wrote its checkpoint
    assert "paper_590m: dense seed" in summary and "paper_2b: dense seed" in summary  # both step ratios
