"""Streaming upcycling: memory-mapped sources, pages given back chunk by chunk, the mixture
written in place; peak memory about one mixture, not N dense models plus the mixture."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import moe_config, random_dense_state_dict, save_lightning_checkpoint, tiny_config
from safetensors.torch import load_file

from bam_lightning.checkpoint import read_checkpoint, save_safetensors
from bam_lightning.model import GPT
from bam_lightning.upcycle import upcycle, upcycle_from_checkpoints

N = 3
DENSE = tiny_config()


def rss_file_bytes() -> int:
    """Resident pages this process has mapped from files (/proc/self/status RssFile)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise KeyError("RssFile")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safetensors_sources_are_file_views_equal_to_the_library_reader(tmp_path, dtype):
    state = {k: v.to(dtype) for k, v in random_dense_state_dict(DENSE, 0).items()}
    path = tmp_path / "dense.safetensors"
    save_safetensors(state, DENSE, path, tokenizer="byte")
    source = read_checkpoint(path)
    reference = load_file(path)  # the safetensors library's own reader
    assert source.config == DENSE and source.tokenizer == "byte"
    assert source.state_dict.keys() == reference.keys()
    for key, tensor in source.state_dict.items():
        assert tensor.dtype == dtype and torch.equal(tensor, reference[key]), key
        start = tensor.data_ptr()
        assert any(low <= start < high for low, high in source.mappings), f"{key} is not a view of the file"


def test_released_pages_leave_memory_and_read_back_from_the_file(tmp_path):
    values = torch.randn(16 * 2**20)  # 64 MiB
    path = tmp_path / "big.safetensors"
    save_safetensors({"w": values}, DENSE, path)
    source = read_checkpoint(path)
    mapped = source.state_dict["w"]
    before = rss_file_bytes()
    assert torch.equal(mapped, values)  # reads every page of the mapping
    touched = rss_file_bytes()
    source.release(mapped)
    released = rss_file_bytes()
    assert touched - before > 48 * 2**20, "reading the mapped tensor should fault its pages in"
    assert touched - released > 48 * 2**20, "release() should give the pages back"
    assert torch.equal(mapped, values)  # still readable: the pages come back from the file
    # memory that is not a view of the checkpoint file is never dropped (it would read as zeros)
    copy = mapped.clone()
    source.release(copy)
    assert torch.equal(copy, values)


@pytest.mark.parametrize("method", ["bam", "btx"])
def test_upcycle_into_existing_tensors_writes_in_place(method):
    states = [random_dense_state_dict(DENSE, j) for j in range(N)]
    config = moe_config(DENSE, n_experts=N, attn_experts=N if method == "bam" else 0)
    target = GPT(config).state_dict()
    pointers = {key: tensor.data_ptr() for key, tensor in target.items()}
    result = upcycle(states, config, method, out=target, chunk_bytes=100, router_seed=5)
    expected = upcycle(states, config, method, router_seed=5)
    for key, tensor in result.items():
        assert tensor.data_ptr() == pointers[key], f"{key} was not written in place"
        assert torch.equal(tensor, expected[key]), key


def test_upcycle_from_checkpoint_files_leaves_the_sources_untouched(tmp_path):
    states = [random_dense_state_dict(DENSE, j) for j in range(N)]
    paths = [save_lightning_checkpoint(tmp_path / f"d{j}.ckpt", DENSE, states[j]) for j in range(N)]
    config = moe_config(DENSE, n_experts=N, attn_experts=N)
    streamed, _ = upcycle_from_checkpoints(paths, config, "bam", chunk_bytes=64)
    assert all(torch.equal(streamed[k], v) for k, v in upcycle(states, config, "bam").items())
    for path, state in zip(paths, states, strict=True):  # the files still hold the dense weights
        reread = read_checkpoint(path).state_dict
        assert all(torch.equal(reread[k], v) for k, v in state.items())


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from bam_lightning import ModelConfig
    from bam_lightning.upcycle import upcycle_from_checkpoints

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    config = ModelConfig.from_dict(json.loads(sys.argv[1]))
    before = status("VmRSS")
    state, _ = upcycle_from_checkpoints(sys.argv[2:], config, "bam", chunk_bytes=2**20)
    print(json.dumps({"before": before, "peak": status("VmHWM"),
                      "mixture": sum(t.numel() * t.element_size() for t in state.values())}))
""")


def test_peak_memory_of_upcycling_four_checkpoints_stays_near_one_mixture(tmp_path):
    """Four ~110 MB sources (big vocabulary, like the paper's 256k) into a ~130 MB mixture: loading
    the sources whole would add 440 MB; streaming adds the mixture and a fixed allowance.
    (`benchmarks/bench_upcycle.py` measures the paper_590m case.)"""
    dense = tiny_config(vocab_size=50_000, d_model=256, n_head=4, d_ff=768, n_layer=2, tie_embeddings=False)
    paths = [save_lightning_checkpoint(tmp_path / f"dense{j}.ckpt", dense, random_dense_state_dict(dense, j))
             for j in range(4)]
    moe = moe_config(dense, n_experts=4, attn_experts=4)
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    run = subprocess.run([sys.executable, str(script), json.dumps(moe.to_dict()), *map(str, paths)],
                         capture_output=True, text=True, check=True)
    report = json.loads(run.stdout.splitlines()[-1])
    sources = sum(path.stat().st_size for path in paths)
    assert sources > 3 * report["mixture"]
    # the mixture itself plus a fixed allowance (interpreter, allocator, 1 MiB chunks), far below
    # the 440 MB that loading the sources whole would add on top of the mixture
    assert report["peak"] - report["before"] < report["mixture"] + 48 * 2**20, report
