"""Bad input through the `bam` CLI fails before training starts, naming the culprit.

Covered elsewhere, not repeated here: mismatched upcycling sources (shape, vocabulary, layer
count, missing key, corrupt file: test_upcycle.py, test_upcycling_callback.py), a dense checkpoint
validated as a mixture by a bare Trainer (test_lit.py), invalid `ModelConfig` values (test_model.py), empty and
non-UTF-8 files (test_data_sources.py), a torn checkpoint read by `AtomicCheckpointIO`
(test_resume.py). This file drives the same checks from recipes, as a user meets them.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from helpers import write_word_documents

from bam_lightning.data import BAMDataModule
from bam_lightning.lightning_cli import run_lightning_cli
from bam_lightning.lit import BaseLM

MODEL = {"vocab_size": 320, "n_layer": 1, "d_model": 16, "n_head": 2, "d_ff": 32, "max_seq_len": 16}


def recipe(root: Path, mixture: bool = False, tokenizer: str = "byte") -> dict:
    """A one-domain recipe; vocab_size 320 fits the byte tokenizer and the BPE one alike."""
    return {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "default_root_dir": str(root / "run")},
        "model": {"class_path": f"bam_lightning.lit.{'MoELM' if mixture else 'DenseLM'}",
                  "init_args": {"config": {**MODEL, "n_experts": 2 if mixture else 0}}},
        "data": {"domains": {"words": str(root / "words" / "*.txt")}, "tokenizer": tokenizer,
                 "bpe_vocab_size": 300, "seq_len": 16, "batch_size": 4, "val_fraction": 0.25,
                 "val_tokens_per_domain": 64},
    }


def write(root: Path, name: str, content: dict) -> str:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Text files, and a checkpoint of each kind trained one step: dense and mixture with the
    byte tokenizer, dense with BPE."""
    root = tmp_path_factory.mktemp("bad_input")
    write_word_documents(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BAM_CACHE_DIR", str(root / "cache"))
        for name, kwargs in {"dense": {}, "moe": {"mixture": True}, "dense_bpe": {"tokenizer": "bpe"}}.items():
            cli = run_lightning_cli(["--config", write(root, name, recipe(root, **kwargs))], run=False)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            cli.trainer.save_checkpoint(root / f"{name}.ckpt")
        yield root


@pytest.fixture
def no_training(monkeypatch):
    """Any training step fails the test: each error below must come before the first one."""

    def training_step(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(BaseLM, "training_step", training_step)


def edited(content: dict, keys: tuple[str, ...], value) -> dict:
    content = copy.deepcopy(content)
    node = content
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return content


@pytest.mark.parametrize("keys, value, message", [
    (("trainer", "max_step"), 5, r"Group 'trainer' does not accept option 'max_step'"),
    (("trainer", "max_steps"), "ten", r'Parser key "trainer\.max_steps":\s+Expected a <class \'int\'>\. Got value: ten'),
    (("data", "batchsize"), 4, r"Group 'data' does not accept option 'batchsize'"),
    (("model", "init_args", "config", "n_expert"), 2,
     r"Parser key \"model\".*Group 'config' does not accept option 'n_expert'"),
    (("model", "init_args", "config", "d_model"), "big",
     r"Parser key \"config\.d_model\":\s+Expected a <class 'int'>\. Got value: big"),
    (("model", "init_args", "learning_rate"), 0.1, r"Parser key \"model\".*Option 'learning_rate' is not accepted"),
])
def test_recipe_typos_and_wrong_types_name_the_key(tmp_path, capsys, keys, value, message):
    path = write(tmp_path, "recipe", edited(recipe(tmp_path), keys, value))
    with pytest.raises(SystemExit):
        run_lightning_cli(["--config", path], run=False)
    assert re.search(message, capsys.readouterr().err, re.DOTALL)


def test_command_line_keys_must_be_spelled_out(tmp_path, capsys):
    """argparse would read `--trainer.max_step` as `--trainer.max_steps` (prefix matching)."""
    path = write(tmp_path, "recipe", recipe(tmp_path))
    with pytest.raises(SystemExit):
        run_lightning_cli(["--config", path, "--trainer.max_step=5"], run=False)
    assert "unrecognized arguments: --trainer.max_step=5" in capsys.readouterr().err


@pytest.mark.parametrize("mixture, config, message", [
    (False, {"n_head": 3}, "d_model (16) must be divisible by n_head (3)"),
    (True, {"ffn_top_k": 3}, "ffn_top_k (3) must be between 1 and n_experts (2)"),
    (False, {"n_experts": 2}, "model.config: DenseLM got a mixture config (n_experts=2"),
])
def test_impossible_model_configs_in_a_recipe_name_the_field(tmp_path, mixture, config, message):
    content = recipe(tmp_path, mixture=mixture)
    content["model"]["init_args"]["config"].update(config)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_lightning_cli(["--config", write(tmp_path, "recipe", content)], run=False)


@pytest.mark.parametrize("recipe_name, checkpoint, message", [
    ("dense", "moe", "the checkpoint is a mixture model, expected a dense one; n_experts: checkpoint 2 vs expected 0"),
    ("moe", "dense", "the checkpoint is a dense model, expected a mixture one; n_experts: checkpoint 0 vs expected 2"),
])
def test_validating_a_checkpoint_of_the_other_kind_is_refused(study, recipe_name, checkpoint, message):
    """The recipe's model stands: the CLI does not swap in the checkpoint's hyper-parameters."""
    with pytest.raises(ValueError, match=re.escape(message)):
        run_lightning_cli(["validate", "--config", str(study / f"{recipe_name}.yaml"),
                           "--ckpt_path", str(study / f"{checkpoint}.ckpt")])


def test_init_from_a_mixture_checkpoint_fails_naming_the_file(study, tmp_path, no_training):
    content = recipe(study)
    content["model"]["init_args"]["init_from"] = str(study / "moe.ckpt")
    with pytest.raises(ValueError, match=re.escape(f"{study / 'moe.ckpt'}: checkpoint does not match model.config: "
                                                   "the checkpoint is a mixture model, expected a dense one")):
        run_lightning_cli(["fit", "--config", write(tmp_path, "branch", content)])


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_torn_checkpoint_is_named(study, tmp_path, subcommand, no_training):
    torn = tmp_path / "last.ckpt"
    torn.write_bytes((study / "dense.ckpt").read_bytes()[:2000])  # a run killed mid-write, before atomic saves
    with pytest.raises(ValueError, match=re.escape(f"{torn}: not a readable checkpoint, the file is truncated")):
        run_lightning_cli([subcommand, "--config", str(study / "dense.yaml"), "--ckpt_path", str(torn)])


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_checkpoint_trained_with_another_tokenizer_is_refused(study, subcommand, no_training):
    """The module takes the data's tokenizer fingerprint in `setup()`, which Lightning runs
    before it restores the checkpoint, so the comparison sees both sides."""
    with pytest.raises(ValueError, match=r"checkpoint was trained with tokenizer 'byte' but the data uses 'bpe-"):
        run_lightning_cli([subcommand, "--config", str(study / "dense_bpe.yaml"),
                           "--ckpt_path", str(study / "dense.ckpt")])
    with pytest.raises(ValueError, match=r"checkpoint was trained with tokenizer 'bpe-[\w-]+' but the data uses 'byte'"):
        run_lightning_cli([subcommand, "--config", str(study / "dense.yaml"),
                           "--ckpt_path", str(study / "dense_bpe.ckpt")])


def test_a_domain_too_small_for_one_window_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    for name, size in (("big", 3000), ("tiny", 60)):
        (tmp_path / name).mkdir()
        for i in range(4):
            (tmp_path / name / f"{i}.txt").write_text(f"{i}" + "x" * (size - 1))  # distinct: no near-duplicates
    data = BAMDataModule(domains={d: str(tmp_path / d / "*.txt") for d in ("big", "tiny")}, seq_len=64,
                         val_fraction=0.25)
    data.prepare_data()
    with pytest.raises(ValueError, match=r"domain 'tiny': the val split has 61 tokens, fewer than one window of "
                                         r"seq_len \+ 1 = 65"):  # one 60-byte document + EOS
        data.setup("fit")
