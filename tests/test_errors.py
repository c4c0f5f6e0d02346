"""A user's mistake ends every `bam` command with one line, `bam <command>: error: ...`, a
non-zero exit and no traceback (issue 22, item 10)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bam_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "recipes" / "tiny" / "study.yaml"
BAM = str(Path(sys.executable).with_name("bam"))


def test_user_errors_end_with_one_line_and_no_traceback(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    gelu = tmp_path / "gelu_model"
    gelu.mkdir()
    (gelu / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 100, "hidden_act": "gelu"}))
    cases = {  # argv -> what the error line must say
        ("pipeline", str(STUDY), "--check", "--set", "trainer.max_epoch=3"):
            ("bam pipeline: error: stage seed (", "does not accept option 'max_epoch'"),
        ("pipeline", str(STUDY), "--check", "--set", "seeds=[0, 0]"):
            ("bam pipeline: error: ", "seeds must be a list of distinct non-negative integers, got [0, 0]"),
        ("pipeline", str(STUDY), "--check", "--set", f"run_dir={a_file}"):
            ("bam pipeline: error: ", f"run_dir: cannot write to {a_file}: {a_file} is a file, not a folder"),
        ("fit", "--config", str(REPO / "recipes" / "tiny" / "seed.yaml"), "--trainer.max_steps", "2",
         "--trainer.default_root_dir", str(a_file / "run")):
            ("bam fit: error: ", f"trainer.default_root_dir: cannot write to {a_file / 'run'}: {a_file} is a file"),
        ("export", str(tmp_path / "missing.ckpt"), "--out", str(a_file)):
            ("bam export: error: ", f"--out {a_file}: is a file"),
        ("import-hf", str(gelu), "--out", str(tmp_path / "seed.safetensors")):
            ("bam import-hf: error: ", "hidden_act = 'gelu': the Llama-family FFN here is SwiGLU (silu)"),
        ("import-hf", str(gelu), "--out", str(tmp_path / "seed.bin")):
            ("bam import-hf: error: ", "the imported seed is written as a .safetensors file"),
        # the data module's arguments and paths, refused under `bam fit` before any training
        ("fit", "--config", str(REPO / "recipes" / "tiny" / "seed.yaml"), "--data.domains",
         json.dumps({"a": str(tmp_path / "nowhere" / "*.txt")})):
            ("bam fit: error: ", "train_weights names unknown domain 'literature'; known domains: a"),
        ("fit", "--config", str(REPO / "recipes" / "tiny" / "seed.yaml"), "--data.domains",
         json.dumps({"a": str(tmp_path / "nowhere" / "*.txt")}), "--data.train_weights", "null"):
            ("bam fit: error: ", f"domain 'a': '{tmp_path / 'nowhere' / '*.txt'}' matches no files"),
    }
    # Two run as the real command, side by side (each spends its time importing torch and
    # Lightning); the rest call the same entry point, `bam_lightning.cli.main`, in this process.
    in_process = list(cases)[1:3] + list(cases)[4:]
    env = {**os.environ, "BAM_CACHE_DIR": str(tmp_path / "cache")}
    running = {argv: subprocess.Popen([BAM, *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for argv in cases if argv not in in_process}
    results = {}
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(tmp_path)
            patch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
            patch.setenv("BAM_MALLOC", "default")  # leave this process's allocator alone
            for argv in in_process:
                with pytest.raises(SystemExit) as stopped:
                    main(list(argv))
                results[argv] = (capsys.readouterr().err, stopped.value.code)
        results.update({argv: (process.communicate(timeout=240)[1], process.returncode)
                        for argv, process in running.items()})
    finally:
        for process in running.values():
            process.kill()
    assert results.keys() == cases.keys()
    for argv, (stderr, returncode) in results.items():
        start, message = cases[argv]
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        assert returncode == 2 and "Traceback" not in stderr, (argv, stderr[-3000:])
        assert last.startswith(start) and message in last, (argv, last)
    assert not (tmp_path / "seed.safetensors").exists() and a_file.read_text() == "not a folder\n"
