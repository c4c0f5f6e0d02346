"""`bam` keeps large CPU blocks on glibc's heap (bam_lightning/malloc.py): measured as page
faults, in fresh interpreters so the policy never leaks into the test process."""

import os
import platform
import subprocess
import sys

import pytest

import bam_lightning.cli as cli

STEPS = r"""
import resource, torch
from bam_lightning.malloc import apply_malloc_policy
policy = apply_malloc_policy()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
w = torch.randn(256, 256)
counts = []
for step in range(16):  # a training step's pattern: two 40 MiB activations, made and freed
    before = faults()
    a = torch.randn(40960, 256)
    b = (a @ w).relu_()
    del a, b
    counts.append(faults() - before)
print(policy, sum(counts[-4:]))
"""
PAGES_PER_BLOCK = (40 << 20) // 4096


def run_steps(choice: str) -> tuple[str, int]:
    env = {**os.environ, "BAM_MALLOC": choice, "OMP_NUM_THREADS": "1"}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, check=True)
    policy, faults = out.stdout.split()
    return policy, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the policy is glibc's mallopt; elsewhere it reports itself unavailable")
def test_heap_policy_stops_refaulting_large_blocks_every_step():
    policy, faults = run_steps("heap")
    default_policy, default_faults = run_steps("default")
    assert (policy, default_policy) == ("heap", "default")
    # glibc's default maps both blocks afresh at each of the last 4 steps
    assert default_faults >= 4 * 2 * PAGES_PER_BLOCK * 0.9
    # The heap reuses its pages once it has grown enough: small allocations landing between the
    # freed blocks made it grow for up to 6 steps in our runs, then it stopped faulting.
    assert faults < PAGES_PER_BLOCK / 10


def test_bad_bam_malloc_value_is_refused_before_any_work():
    env = {**os.environ, "BAM_MALLOC": "jemalloc"}
    out = subprocess.run([sys.executable, "-m", "bam_lightning.cli", "fit", "--help"], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "BAM_MALLOC='jemalloc'" in out.stderr and "usage" not in out.stdout


def test_bam_applies_the_policy_before_parsing(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "apply_malloc_policy", lambda: calls.append("policy"))
    monkeypatch.setattr(cli, "run_lightning_cli", lambda argv: calls.append(("cli", argv)))
    cli.main(["fit", "--config", "x.yaml"])
    assert calls == ["policy", ("cli", ["fit", "--config", "x.yaml"])]
