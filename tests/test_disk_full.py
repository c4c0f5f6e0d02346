"""A full disk is reported as one (not as a recipe error or torch's `unexpected pos ...`), names
the path, says the run resumes once space is freed, and keeps the previous `last.ckpt` (issue 22,
item 13). The disk fills up at the third checkpoint write, in `bam fit` and in `bam pipeline`,
through a wrapper that patches `torch.save` (and, for torch's errno-less error, `os.statvfs`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from bam_lightning.checkpoint import DISK_FULL_MARGIN_BYTES
from bam_lightning.pipeline import Stage, failure_message

WRAPPER = '''"""`bam` on a file system that fills up at the third checkpoint write."""
import errno
import os
import sys

import torch

from bam_lightning.cli import main

MODE = os.environ["DISK_FULL_MODE"]  # "errno": an OSError(ENOSPC); "torch": what torch.save raises
real_save, real_statvfs = torch.save, os.statvfs
state = {"saves": 0, "full": False}


def save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and str(f).endswith(".tmp"):
        state["saves"] += 1
        if state["saves"] >= 3:
            state["full"] = True
            with open(f, "wb") as handle:
                handle.write(b"PK\\x03\\x04 the part that fitted")
            if MODE == "errno":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1152 vs 1034")
    return real_save(obj, f, *args, **kwargs)


def statvfs(path):
    s = real_statvfs(path)
    if not state["full"]:
        return s
    return os.statvfs_result((s.f_bsize, s.f_frsize, s.f_blocks, 0, 0, s.f_files, s.f_ffree, s.f_favail,
                              s.f_flag, s.f_namemax))


torch.save, os.statvfs = save, statvfs
main(sys.argv[1:])
'''


def write_recipe(root: Path) -> Path:
    for domain, words in (("animals", "cat dog owl fox hen"), ("numbers", "one two three four five")):
        (root / domain).mkdir()
        for i in range(4):
            (root / domain / f"{i}.txt").write_text(" ".join(words.split()[(i * j) % 5] for j in range(300)))
    recipe = {
        "seed_everything": 7,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 6, "logger": False, "val_check_interval": 4,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1}}]},
        "model": {"class_path": "bam_lightning.lit.DenseLM", "init_args": {
            "lr": 0.01, "warmup_steps": 2, "config": {"n_layer": 1, "d_model": 16, "n_head": 2, "d_ff": 32,
                                                      "max_seq_len": 16}}},
        "data": {"domains": {d: str(root / d / "*.txt") for d in ("animals", "numbers")},
                 "seq_len": 16, "batch_size": 4, "val_fraction": 0.25, "val_tokens_per_domain": 64},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_a_full_disk_says_so_and_keeps_the_last_checkpoint(tmp_path):
    recipe = write_recipe(tmp_path)
    (tmp_path / "disk_full_bam.py").write_text(WRAPPER)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "seed": str(recipe), "experts": {},
                                        "mixtures": {}, "checkpoint_every_n_steps": 1}))
    runs = {  # name -> (argv, mode of failure, the last.ckpt that must survive)
        "fit": (["fit", "--config", str(recipe)], "torch", tmp_path / "fit" / "checkpoints" / "last.ckpt"),
        "pipeline": (["pipeline", str(pipeline)], "errno", tmp_path / "run" / "stages" / "seed" / "checkpoints"
                     / "last.ckpt"),
    }
    running = {}
    for name, (argv, mode, _) in runs.items():
        (tmp_path / name).mkdir(exist_ok=True)
        env = dict(os.environ, DISK_FULL_MODE=mode, BAM_CACHE_DIR=str(tmp_path / name / "cache"))
        running[name] = subprocess.Popen([sys.executable, str(tmp_path / "disk_full_bam.py"), *argv], cwd=tmp_path / name,
                                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        outputs = {name: (*process.communicate(timeout=300), process.returncode) for name, process in running.items()}
    finally:
        for process in running.values():
            process.kill()

    for name, (_, _, last) in runs.items():
        stdout, stderr, returncode = outputs[name]
        assert returncode != 0 and "Traceback" not in stdout + stderr, (name, stdout[-2000:], stderr[-3000:])
        assert "no space left on device" in stderr and str(last) in stderr, (name, stderr[-2000:])
        assert "unexpected pos" not in stderr and "Fix the stage's recipe" not in stderr
        assert torch.load(last, weights_only=True)["global_step"] == 2  # the write before the full one
        assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no partial file left
    fit_line = outputs["fit"][1].strip().splitlines()[-1]
    assert fit_line.startswith(f"bam fit: error: no space left on device: cannot write {runs['fit'][2]} (0.0 MB free")
    assert "The previous last.ckpt is intact: free some space, then resume from it (bam fit: --ckpt_path" in fit_line
    assert "[1/1] seed stopped: no space left on device" in outputs["pipeline"][1]
    assert "re-run the same command to resume the stage from its last checkpoint" in outputs["pipeline"][1]


def test_a_stage_without_a_message_on_a_full_disk_is_not_called_a_recipe_error(tmp_path, monkeypatch):
    """The reported case: the stage's error.txt is empty (the disk had no room for it either)."""
    stage = Stage("seed", "seed", "seed", "recipes/seed.yaml")
    (tmp_path / "error.txt").write_text("")
    import bam_lightning.pipeline as pipeline

    monkeypatch.setattr(pipeline, "free_bytes", lambda folder: DISK_FULL_MARGIN_BYTES - 1)
    message = failure_message("[1/3] seed", 1, stage, tmp_path / "config.yaml")
    assert message.startswith(f"[1/3] seed stopped: no space left on device under {tmp_path}\n")
    assert "Fix the stage's recipe" not in message and "resume" in message
    monkeypatch.setattr(pipeline, "free_bytes", lambda folder: 10 * DISK_FULL_MARGIN_BYTES)
    assert "without a message" in failure_message("[1/3] seed", 1, stage, tmp_path / "config.yaml")
