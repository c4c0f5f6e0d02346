"""The `bam` command: Lightning's CLI (`fit`, `validate`, `test`) plus `bam pipeline`."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from bam_lightning.data import BAMDataModule
from bam_lightning.lit import BaseLM
from bam_lightning.malloc import apply_malloc_policy


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
    """`run=False` builds model, data and trainer without running a subcommand (pipeline stages)."""
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    apply_malloc_policy()  # before the first large tensor: see bam_lightning/malloc.py
    if argv and argv[0] == "pipeline":
        from bam_lightning.pipeline import main as pipeline_main

        pipeline_main(argv[1:])
        return
    run_lightning_cli(argv)


if __name__ == "__main__":
    main()
