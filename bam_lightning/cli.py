"""The `bam` command: Lightning's CLI (`fit`, `validate`, `test`) plus `bam pipeline`."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from bam_lightning.data import BAMDataModule
from bam_lightning.lit import BaseLM


class BAMCLI(LightningCLI):
    """Recipes name the module class (`DenseLM` or `MoELM`); the data module is always ours."""


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> BAMCLI:
    """`run=False` builds model, data and trainer without running a subcommand (pipeline stages)."""
    return BAMCLI(
        BaseLM,
        BAMDataModule,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf"},  # ${...} interpolation inside recipes
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "pipeline":
        from bam_lightning.pipeline import main as pipeline_main

        pipeline_main(argv[1:])
        return
    run_lightning_cli(argv)


if __name__ == "__main__":
    main()
