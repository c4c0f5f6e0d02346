"""`bam pipeline` under torchrun or SLURM: every rank runs the same command; the stages run in
lockstep.

Rank 0 is the pipeline: it plans, skips finished stages, writes every record, `stage.json` and
the report, exactly as on one process. The other ranks follow: before each stage rank 0
broadcasts the stage's composed config, and every rank runs that stage in its own process
(`run_stage`), as one Lightning job over the process group opened here once. Opening the group
once and keeping it for every stage is the reason for this design: a fresh rendezvous per stage
would reuse the launcher's address and meet the previous stage's stale peers.

A failing rank raises out of its process; torchrun (or `srun --kill-on-bad-exit=1`) then stops
the others, and rank 0 names the stage. A re-run of the same command resumes: rank 0 skips
finished stages and the unfinished one continues from its `last.ckpt` on every rank.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any

# The process group's limit for meeting the other ranks and for every collective after that
# (Lightning's and torch's default): ranks wait this long at a stage's start while rank 0 checks
# the study or prepares data.
TIMEOUT = timedelta(minutes=30)
stage_failed = False  # rank 0: a stage failed, so the other ranks may be inside it, not listening
_opened = False  # this process opened the study's process group (it is one rank of several)


def active() -> bool:
    """This process is one rank of a pipeline started by torchrun or srun."""
    return _opened


def cluster_environment() -> Any | None:
    """Lightning's environment when this process is one rank of several started by torchrun or
    srun, else None (one process; stages then start their own ranks if they need several)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for kind in (TorchElasticEnvironment, SLURMEnvironment):
        if kind.detect():
            environment = kind()
            if environment.world_size() > 1:
                return environment
    return None


def init_process_group(environment: Any) -> None:
    """One process group for the whole study, on CPU (gloo) and CUDA (nccl) tensors alike, so
    each stage's Lightning strategy finds it open and uses it."""
    import torch
    import torch.distributed as dist

    global _opened
    _opened = True
    if dist.is_initialized():
        return
    os.environ["MASTER_ADDR"] = environment.main_address
    os.environ["MASTER_PORT"] = str(environment.main_port)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=environment.global_rank(), world_size=environment.world_size(),
                            timeout=TIMEOUT)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def send(message: tuple[str, str]) -> None:
    """Rank 0: the next thing every rank does, ("stage", config path) or ("done", "")."""
    import torch.distributed as dist

    dist.broadcast_object_list([message], src=0)


def receive() -> tuple[str, str]:
    import torch.distributed as dist

    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow() -> None:
    """Ranks other than 0: run each stage rank 0 announces, until it says the study is done."""
    from pathlib import Path

    from bam_lightning.pipeline import run_stage

    while True:
        kind, config_path = receive()
        if kind == "done":
            return
        try:
            run_stage(config_path)
        except SystemExit:
            raise  # SIGTERM (143) or a refused recipe, said on rank 0 too
        except BaseException as error:
            print(f"bam pipeline (rank {rank()}): stage {Path(config_path).parent.name} failed: "
                  f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
            raise
