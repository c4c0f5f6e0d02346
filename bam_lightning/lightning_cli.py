"""Lightning's CLI for `bam fit|validate|test|predict`, shared by `bam` and the pipeline's stages.

Kept apart from `cli.py` (the command dispatcher) so that library code never imports the
dispatcher: the pipeline builds its stages with `run_lightning_cli(..., run=False)` from here."""

from __future__ import annotations

import sys


from lightning.pytorch.cli import LightningCLI

from bam_lightning.data import BAMDataModule
from bam_lightning.lit import BaseLM


class BAMCLI(LightningCLI):
    """Recipes name the module class (`DenseLM` or `MoELM`); the data module is always ours."""

    def _parse_ckpt_path(self) -> None:
        """Keep the recipe's model. Lightning would replace it with the hyper-parameters stored
        in `--ckpt_path`, so `bam validate --config bam.yaml --ckpt_path btx.ckpt` would quietly
        validate a BTX model; instead `BaseLM.on_load_checkpoint` names each field where the
        checkpoint differs from the recipe."""


# Checkpoints are renamed into place, so a killed run keeps its last one. A recipe that sets
# `trainer.plugins` replaces this list: list AtomicCheckpointIO there too to keep it.
TRAINER_DEFAULTS = {"plugins": [{"class_path": "bam_lightning.checkpoint.AtomicCheckpointIO"}]}


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> BAMCLI:
    """`run=False` builds model, data and trainer without running a subcommand (pipeline stages).

    The arguments always come explicitly (`args`), never from `sys.argv`: `bam` has already
    removed the command words, and a forked pipeline stage inherits the parent's argv. Hiding
    `sys.argv` keeps LightningCLI from warning that both were given."""
    saved_argv = sys.argv
    sys.argv = sys.argv[:1]
    try:
        return _build_cli(args, run)
    finally:
        sys.argv = saved_argv


def _build_cli(args: list[str] | None, run: bool) -> BAMCLI:
    return BAMCLI(
        BaseLM,
        BAMDataModule,
        subclass_mode_model=True,
        # ${...} interpolation inside recipes; no prefix matching, so `--trainer.max_step` is an error
        parser_kwargs={"parser_mode": "omegaconf", "allow_abbrev": False},
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
        run=run,
    )
