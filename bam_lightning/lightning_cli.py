"""Lightning's CLI for `bam fit|validate|test|predict`, shared by `bam` and the pipeline's stages.

Kept apart from `cli.py` (the command dispatcher) so that library code never imports the
dispatcher: the pipeline builds its stages with `run_lightning_cli(..., run=False)` from here.

A failing `bam fit` leaves the run folder as it was: `check_before_fit` runs what can be checked
before Lightning creates a TensorBoard event file or a checkpoint, and the config is written (atomically)
only once training starts, so an old `config.yaml` never describes a run that did not happen."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from bam_lightning.callbacks.preemption import PreemptionCheckpoint
from bam_lightning.checkpoint import read_checkpoint, write_atomically
from bam_lightning.data import BAMDataModule
from bam_lightning.errors import UserError
from bam_lightning.lit import BaseLM, check_seq_len

# Lightning 2.6's own pytree helper trips a torch >= 2.10 deprecation at every fit; nothing a user
# can act on, so it is hidden (the message is matched exactly: other deprecations still show).
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class BAMCLI(LightningCLI):
    """Recipes name the module class (`DenseLM` or `MoELM`); the data module is always ours."""

    def _parse_ckpt_path(self) -> None:
        """Keep the recipe's model. Lightning would replace it with the hyper-parameters stored
        in `--ckpt_path`, so `bam validate --config bam.yaml --ckpt_path btx.ckpt` would quietly
        validate a BTX model; instead `BaseLM.on_load_checkpoint` names each field where the
        checkpoint differs from the recipe."""

    def before_fit(self) -> None:
        check_before_fit(self.trainer, self.model, self.datamodule, self.config_init["fit"].get("ckpt_path"))

    def after_fit(self) -> None:
        validate_final_state(self.trainer, self.model, self.datamodule)


class SaveConfigAtTrainStart(SaveConfigCallback):
    """Lightning's SaveConfigCallback writes `config.yaml` in `setup`, before the model, data and
    upcycling sources are checked, and overwrites the previous run's. A fit writes it when
    training starts instead (after the sanity validation), under a temporary name then renamed."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective call: every rank asks
        if trainer.is_global_zero and log_dir is not None:
            text = self.parser.dump(self.config, skip_none=False)
            write_atomically(Path(log_dir) / self.config_filename, lambda tmp: Path(tmp).write_text(text))
            self.save_config(trainer, pl_module, "fit")
        self.already_saved = True


def check_before_fit(trainer: L.Trainer, model: BaseLM, datamodule: Any, ckpt_path: str | None = None) -> None:
    """Everything a fit can check before it writes anything, each error naming the recipe key:
    the step count, `data.seq_len` against the model's context, writable output folders, and (for
    a fresh fit) `init_from` and the upcycling sources: readable, fitting, and final."""
    if trainer.max_steps == 0:
        raise UserError("trainer.max_steps is 0: there is nothing to train; set a positive step count")
    if trainer.max_steps < 0 and isinstance(datamodule, BAMDataModule):
        raise UserError(f"trainer.max_steps is {trainer.max_steps} (no limit), but the training stream never "
                         "ends: set a positive step count (the learning-rate schedule ends there)")
    check_seq_len(datamodule, model.config)
    for key, folder in output_folders(trainer):
        check_writable(folder, key)
    if ckpt_path is not None:
        return  # a resume: init_from and the upcycling sources are not read again
    tokenizer = getattr(datamodule, "tokenizer_fingerprint", None)
    if model.hparams.get("init_from"):
        source = read_checkpoint(model.hparams.init_from)
        source.check_compatible(model.config, "model.config", tokenizer)
        source.check_final("model.init_from")
    for callback in trainer.callbacks:
        if hasattr(callback, "check_sources") and getattr(callback, "provenance", None) is None:
            callback.check_sources(model.config, tokenizer)


def output_folders(trainer: L.Trainer) -> list[tuple[str, str]]:
    """(recipe key, folder) for every place a fit writes to."""
    folders = [("trainer.default_root_dir", trainer.default_root_dir)]
    for logger in trainer.loggers:
        if getattr(logger, "save_dir", None):
            folders.append(("trainer.logger.init_args.save_dir", logger.save_dir))
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.append(("ModelCheckpoint init_args.dirpath", callback.dirpath))
        elif type(callback).__name__ == "MetricsFile":
            folders.append(("MetricsFile init_args.path", str(Path(callback.path).parent)))
    return folders


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """The folder exists and is writable, or can be created: its nearest existing ancestor is a
    writable directory. (Remote URLs are left to their filesystem.)"""
    if "://" in str(folder):
        return
    path = Path(folder).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}: cannot write to {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}: cannot write to {path}: {existing} is not writable")


def validate_final_state(trainer: L.Trainer, model: BaseLM, datamodule: Any) -> None:
    """Score the final weights when the fit's last validation came before its last step (the step
    count is not a multiple of `val_check_interval`, or a run killed between its last checkpoint
    and that step's validation was resumed)."""
    if (trainer.global_step > 0 and model.validated_step != trainer.global_step
            and trainer.limit_val_batches != 0 and not trainer.interrupted):
        trainer.validate(model, datamodule=datamodule, verbose=False)


# Checkpoints are renamed into place, so a killed run keeps its last one. A recipe that sets
# `trainer.plugins` replaces this list: list AtomicCheckpointIO there too to keep it.
TRAINER_DEFAULTS = {"plugins": [{"class_path": "bam_lightning.checkpoint.AtomicCheckpointIO"}]}


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> BAMCLI:
    """`run=False` builds model, data and trainer without running a subcommand (pipeline stages).

    The arguments come explicitly (`args`; for `bam fit ...` they are `sys.argv[1:]`). `sys.argv`
    stays as it is, because Lightning's subprocess launcher starts the
    other ranks of `--trainer.devices N` by running `sys.argv` again; only LightningCLI's warning
    that both `args` and `sys.argv` were given is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ARGS_AND_ARGV_WARNING)
        return _build_cli(args, run)


# LightningCLI warns whenever `args` is given while `sys.argv` holds arguments: always true of `bam`.
ARGS_AND_ARGV_WARNING = r"LightningCLI's args parameter is intended to run from within Python"


class ParseOnlyCLI(BAMCLI):
    """Parses and type-checks a recipe as `bam fit` would, building nothing (the pipeline's pre-run check)."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse_only(recipe: dict[str, Any] | str) -> Any:
    """The parsed config (a recipe dict, or a file path) as `bam fit` reads it; SystemExit with the
    parser's error on stderr for a recipe `bam fit` would refuse."""
    args = ["--config", str(recipe)] if isinstance(recipe, (str, os.PathLike)) else recipe
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ARGS_AND_ARGV_WARNING)
        return ParseOnlyCLI(BaseLM, BAMDataModule, subclass_mode_model=True,
                            parser_kwargs={"parser_mode": "omegaconf", "allow_abbrev": False},
                            save_config_callback=None, trainer_defaults=TRAINER_DEFAULTS, args=args, run=False).config


def _build_cli(args: list[str] | None, run: bool) -> BAMCLI:
    return BAMCLI(
        BaseLM,
        BAMDataModule,
        subclass_mode_model=True,
        # ${...} interpolation inside recipes; no prefix matching, so `--trainer.max_step` is an error
        parser_kwargs={"parser_mode": "omegaconf", "allow_abbrev": False},
        save_config_callback=SaveConfigAtTrainStart,
        save_config_kwargs={"overwrite": True},
        # a fresh instance per CLI: persistent callbacks are added to whatever the recipe lists
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [PreemptionCheckpoint()]},
        args=args,
        run=run,
    )
