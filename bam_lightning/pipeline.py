"""`bam pipeline RECIPE`: the whole BAM study, stage by stage, then the report.

seed -> one continued-pre-training branch per domain -> the mixtures (upcycled from the seed
plus the branches) and a dense baseline -> report. Each stage is an ordinary `bam fit` recipe,
composed with the stage's paths (checkpoints, TensorBoard, sources) and written to
`<run_dir>/stages/<name>/config.yaml`; it runs in its own process, so a killed pipeline loses at
most the steps since a stage's last checkpoint. A stage counts as done only when its `last.ckpt`
holds its final step, so the next stage never starts from an older one.

Compute-matched (CM) stages cut the steps to the reference's training FLOPs and scale the
warm-up with them: warm-up is the same fraction of every run, DM or CM.

Stages are idempotent: a stage whose fingerprint matches a finished `stage.json` is skipped; an
unfinished one resumes from its `last.ckpt`; a changed one is rerun, and so is every stage after
it. The fingerprint is what decides a stage's numbers: its composed config, its upstream stages'
fingerprints (sparse upcycling: the seed's only, the one source it reads) and the identity of the
prepared data (sources with each file's size and modification time, tokenizer, split). Speed-only
fields are left out (SPEED_ONLY_*: `data.num_workers`, `data.prepare_workers`, `data.data_dir`, `checkpoint_every_n_steps`,
the progress bar, model summary, logging, logger and monitoring callbacks), and paths inside
`run_dir` count relative to it, so a moved run folder keeps its stages.

Finished work is never lost to a change that cannot run: the data module arguments, every user
path and an existing seed's tokenizer are checked before the first stage. A changed stage's old
outputs move aside to `<name>.stale` (then `.stale.1`, ...: never over an earlier one); if the new
run stops before its first checkpoint they move back (the attempt is kept as `<name>.failed`),
and a configuration that comes back finds its `.stale` outputs and reuses them.

The recipe is a study file (`bam_lightning/study.py`: every fact said once, stage recipes
derived) or an older pipeline file that names one recipe file per stage. Either way every stage's
recipe is composed and checked before the first stage runs (`check_stages`). A study's `sweep`
(or `--sweep`) adds the compute-matched reference and methods, DM and CM, at further mixture
lengths (stages `<method>_L<steps>`, report rows `<method>@<steps>`), on the same seed and experts.
"""

from __future__ import annotations

import argparse
import copy
import errno
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bam_lightning.callbacks.metrics_file import read_metrics
from bam_lightning.checkpoint import DISK_FULL_MARGIN_BYTES, free_bytes
from bam_lightning.config import ModelConfig
from bam_lightning.errors import DiskFullError, UserError
from bam_lightning.flops import (
    parameter_counts,
    recipe_tokens_per_step,
    trainer_tokens_per_step,
    training_flops_per_token,
)
from bam_lightning.study import (
    DEFAULT_WARMUP_STEPS,
    StudyError,
    is_study,
    load_study,
    load_yaml,
    recipe_path_or_dict,
    resolve_interpolations,
)

PIPELINE_KEYS = {"run_dir", "seeds", "seed", "experts", "mixtures", "compute_matched", "dense_baseline",
                 "checkpoint_every_n_steps"}
SEED_CHECKPOINT = "checkpoint"  # study: `seed: {checkpoint: PATH}` upcycles an existing dense model as the seed
MIXTURE_METHODS = {"bam", "bam_shared_kv", "btx", "sparse", "btx_param_matched"}
ERROR_FILE = "error.txt"  # a stage's exception, for the pipeline's failure line
RANK_LOST = "another process of the stage stopped"
# what gloo says (as a plain RuntimeError) when a peer process died; NCCL raises DistBackendError
PEER_LOST_MARKERS = ("Connection reset by peer", "Connection closed by peer", "remote worker")


@dataclass
class Stage:
    name: str  # directory name and TensorBoard run name
    row: str  # the report's row key
    role: str  # seed | expert | mixture | dense_baseline
    recipe: str | dict[str, Any]  # a recipe file (pipeline file) or a composed recipe (study file)
    depends: list[str] = field(default_factory=list)
    seed: int = 0  # mixture-phase seed (data order + router init)
    max_steps: int | None = None  # set for compute-matched rows
    budget: str = ""  # "DM" or "CM" for mixtures
    mixture_steps: int | None = None  # mixtures: the data-matched length this row belongs to (the sweep's x)
    source: str = ""  # where the stage's recipe comes from, for error messages

    def __post_init__(self) -> None:
        if not self.source and isinstance(self.recipe, str):
            self.source = self.recipe


# ----- loading and planning -----
def load_pipeline_config(path: str, sweep: list[int] | None = None,
                         overrides: list[str] | None = None) -> dict[str, Any]:
    """Read and check a pipeline recipe before any stage runs; errors name the key or file.
    `overrides` are `--set KEY=VALUE` items laid over a study file before it is checked."""
    if not Path(path).is_file():
        raise UserError(f"{path}: pipeline recipe not found")
    config = load_yaml(path, resolve=False)  # --set changes the file's values, then ${...} is resolved
    if not isinstance(config, dict):
        raise UserError(f"{path}: a pipeline recipe is a mapping of {sorted(PIPELINE_KEYS)}")
    if overrides:
        if not is_study(config):
            raise StudyError(f"{path}: --set needs a study file (a pipeline file's stages are separate recipes)")
        apply_overrides(config, overrides)
    config = resolve_interpolations(path, config)
    seeds = config.setdefault("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and x >= 0 for x in seeds)
            or len(set(seeds)) != len(seeds)):
        raise UserError(f"{path}: seeds must be a list of distinct non-negative integers, got {seeds!r}")
    if is_study(config):
        if sweep is not None:
            config.setdefault("mixtures", {})["sweep"] = list(sweep)
        config = load_study(path, config)
    elif sweep is not None:
        raise UserError(f"{path}: --sweep needs a study file (a pipeline file names its mixture lengths in recipes)")
    else:
        config = _load_recipe_files(path, config)
    config["seeds"] = seeds
    config.setdefault("compute_matched", {})
    config.setdefault("checkpoint_every_n_steps", 50)
    config["path"] = path
    return config


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> None:
    """`--set mixtures.router.ffn_gate_scale=4.0`: set a dotted key of the study file, the value
    read as YAML (numbers, booleans, lists). The study's own checks then judge the result, so a
    misspelt key fails like one written in the file."""
    import yaml

    for item in overrides:
        key, equals, text = item.partition("=")
        parts = key.strip().split(".")
        if not equals or not all(parts):
            raise StudyError(f"--set {item!r}: give KEY=VALUE with a dotted key, "
                             "e.g. --set mixtures.router.ffn_gate_scale=4.0")
        node = config
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise StudyError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is not a mapping")
        node[parts[-1]] = yaml.safe_load(text)


def _load_recipe_files(path: str, config: dict[str, Any]) -> dict[str, Any]:
    """The older pipeline format: one `bam fit` recipe file per stage."""
    unknown = sorted(set(config) - PIPELINE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown keys {unknown}; known: {sorted(PIPELINE_KEYS)}")
    for key in ("run_dir", "seed", "experts", "mixtures"):
        if key not in config:
            raise UserError(f"{path}: missing key {key!r}")
    unknown_methods = sorted(set(config["mixtures"]) - MIXTURE_METHODS)
    if unknown_methods:
        raise UserError(f"{path}: mixtures: unknown {unknown_methods}; known: {sorted(MIXTURE_METHODS)}")
    config.setdefault("compute_matched", {})
    recipes = [config["seed"], *config["experts"].values(), *config["mixtures"].values()]
    if config.get("dense_baseline"):
        recipes.append(config["dense_baseline"])
    for recipe in recipes:
        if not Path(recipe).is_file():
            raise UserError(f"{path}: recipe {recipe} not found")
        steps = (read_recipe(recipe).get("trainer") or {}).get("max_steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise UserError(f"{recipe}: trainer.max_steps must be a positive number of steps, got {steps!r} "
                             "(every stage of a pipeline trains a fixed number of steps)")
    matched = config["compute_matched"]
    if matched:
        if matched.get("reference") not in config["mixtures"]:
            raise UserError(f"{path}: compute_matched.reference must be one of mixtures {sorted(config['mixtures'])}")
        for method in matched.get("methods", []):
            if method not in config["mixtures"]:
                raise UserError(f"{path}: compute_matched.methods: {method!r} is not in mixtures")
    return config


def read_recipe(recipe: str | dict[str, Any]) -> dict[str, Any]:
    return recipe_path_or_dict(recipe)


def seed_checkpoint(config: dict[str, Any]) -> str | None:
    """The existing dense checkpoint a study names as its seed (no seed stage), else None."""
    seed = config.get("seed")
    return str(Path(seed[SEED_CHECKPOINT]).resolve()) if isinstance(seed, dict) and SEED_CHECKPOINT in seed else None


def source_of(recipe: str | dict[str, Any], config: dict[str, Any], name: str) -> str:
    return recipe if isinstance(recipe, str) else f"{config.get('path', 'study')} (stage {name})"


def recipe_model_config(recipe: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**recipe["model"]["init_args"]["config"])


def plan(config: dict[str, Any]) -> list[Stage]:
    """Stages in run order. Sweep lengths (study `mixtures.sweep`) add the compute-matched
    reference and methods, DM and CM, at each further length, on the same seed and experts."""
    stages = [] if seed_checkpoint(config) else [Stage("seed", "seed", "seed", config["seed"])]
    for domain, recipe in config["experts"].items():
        stages.append(Stage(f"expert_{domain}", f"expert_{domain}", "expert", recipe, depends=["seed"]))
    experts = ["seed", *(f"expert_{domain}" for domain in config["experts"])]
    matched = config["compute_matched"]
    lengths = [(None, config["mixtures"])] + sorted((config.get("sweep") or {}).items())
    for seed in config["seeds"]:
        suffix = f"_s{seed}" if seed != 0 else ""  # seed 0's stages are shared by 1- and 3-seed runs
        for length, mixtures in lengths:
            at = f"_L{length}" if length else ""  # the study's own length keeps the plain names
            row_at = f"@{length}" if length else ""
            for method, recipe in mixtures.items():
                stages.append(Stage(f"{method}{at}{suffix}", f"{method}{row_at}", "mixture", recipe, experts, seed,
                                    budget="DM", mixture_steps=read_recipe(recipe)["trainer"]["max_steps"]))
            for method in matched.get("methods", []):
                steps = compute_matched_steps(mixtures[matched["reference"]], mixtures[method])
                stages.append(Stage(f"{method}_cm{at}{suffix}", f"{method}_cm{row_at}", "mixture", mixtures[method],
                                    experts, seed, max_steps=steps, budget="CM",
                                    mixture_steps=read_recipe(mixtures[method])["trainer"]["max_steps"]))
    if config.get("dense_baseline"):
        stages.append(Stage("dense_baseline", "dense_baseline", "dense_baseline", config["dense_baseline"], ["seed"]))
    for stage in stages:
        stage.source = source_of(stage.recipe, config, stage.name)
    return stages


def compute_matched_steps(reference_recipe: str | dict[str, Any], recipe: str | dict[str, Any]) -> int:
    """Steps that give `recipe` the training FLOPs `reference_recipe` spends (fewer tokens).
    Tokens per step count accumulation, devices and nodes on both sides."""
    ref, this = read_recipe(reference_recipe), read_recipe(recipe)
    ref_name = reference_recipe if isinstance(reference_recipe, str) else "compute_matched.reference"
    this_name = recipe if isinstance(recipe, str) else "compute_matched.methods"
    ref_flops = training_flops_per_token(recipe_model_config(ref), ref["data"].get("seq_len", 128))
    this_flops = training_flops_per_token(recipe_model_config(this), this["data"].get("seq_len", 128))
    ref_total = ref_flops * recipe_tokens_per_step(ref, ref_name) * ref["trainer"]["max_steps"]
    return max(1, math.floor(ref_total / (this_flops * recipe_tokens_per_step(this, this_name))))


# ----- composing one stage's config -----
def compose_stage(stage: Stage, config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The stage's recipe with this run's paths, sources and seed filled in."""
    recipe = read_recipe(stage.recipe)
    stage_dir = run_dir / "stages" / stage.name
    existing_seed = seed_checkpoint(config)

    def ckpt(name: str) -> str:
        if name == "seed" and existing_seed:
            return existing_seed
        return str(run_dir / "stages" / name / "checkpoints" / "last.ckpt")

    trainer = recipe.setdefault("trainer", {})
    if stage.max_steps is not None:
        # CM: fewer steps; the warm-up keeps its share of the run, as the cosine after it does
        data_matched_steps, trainer["max_steps"] = trainer["max_steps"], stage.max_steps
        init_args = recipe["model"].setdefault("init_args", {})
        warmup = int(init_args.get("warmup_steps", DEFAULT_WARMUP_STEPS))
        init_args["warmup_steps"] = round(warmup * stage.max_steps / data_matched_steps)
    trainer["default_root_dir"] = str(stage_dir)
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": str(run_dir / "tensorboard"), "name": stage.name,
                                       "version": "", "default_hp_metric": False}}
    callbacks = [c for c in trainer.get("callbacks") or []
                 if not c["class_path"].endswith(("ModelCheckpoint", "MetricsFile", "ProgressLog"))]
    callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": str(stage_dir / "checkpoints"), "save_last": True,
                                    "save_top_k": 0, "every_n_train_steps": config["checkpoint_every_n_steps"]}})
    callbacks.append({"class_path": "bam_lightning.callbacks.MetricsFile",
                      "init_args": {"path": str(stage_dir / "metrics.jsonl")}})
    # a line per validation: the only progress a log file gets (the bar needs a terminal)
    callbacks.append({"class_path": "bam_lightning.callbacks.ProgressLog", "init_args": {"name": stage.name}})
    for callback in callbacks:
        if callback["class_path"].endswith("UpcyclingCallback"):
            callback.setdefault("init_args", {})["sources"] = [ckpt(name) for name in stage.depends]
            callback["init_args"]["router_seed"] = stage.seed
    trainer["callbacks"] = callbacks
    if stage.role in ("expert", "dense_baseline"):
        recipe["model"].setdefault("init_args", {})["init_from"] = ckpt("seed")
    if stage.role == "mixture" and stage.seed:
        # a repeat: another data order and router initialisation; the same documents, split and
        # validation set (data.seed), so every seed's numbers are comparable
        recipe["seed_everything"] = int(recipe.get("seed_everything", 0)) + stage.seed
        recipe["data"]["order_seed"] = int(recipe["data"].get("seed", 1234)) + stage.seed
    return recipe


# ----- checking every stage before the first one runs -----
DATA_FIELDS_SHARED = ("domains", "val_domains", "tokenizer", "bpe_vocab_size", "seq_len", "val_fraction",
                      "val_tokens_per_domain", "max_bytes_per_domain", "seed")


def check_stages(stages: list[Stage], config: dict[str, Any], run_dir: Path) -> dict[str, dict[str, Any]]:
    """Compose every stage and check it, before any stage trains: each recipe parses as `bam fit`
    would parse it (no model or data is built), trains a positive number of steps, validates on
    the same domains with the same tokenizer and split as every other stage, and each mixture's
    expert counts fit its upcycling method and sources. Errors name the stage and the field.
    Returns the composed recipes by stage name."""
    from bam_lightning.upcycle import ARCHITECTURE_FIELDS, check_method

    composed = {s.name: compose_stage(s, config, run_dir) for s in stages}
    first = stages[0]
    reference = composed[first.name]["data"]
    dense_shape = None
    existing_seed = seed_checkpoint(config)
    if existing_seed:  # its shape is what every stage's must be (read memory-mapped: no weights loaded)
        from bam_lightning.checkpoint import read_checkpoint

        seed = read_checkpoint(existing_seed).config
        if seed.is_moe:
            raise UserError(f"{config.get('path', 'study')}: seed.checkpoint: {existing_seed} is a mixture "
                             f"(n_experts={seed.n_experts}, attn_experts={seed.attn_experts}); the seed is dense")
        dense_shape = {k: getattr(seed, k) for k in ARCHITECTURE_FIELDS}
    for stage in stages:
        recipe = composed[stage.name]

        def fail(field: str, message: str, stage: Stage = stage) -> UserError:
            return UserError(f"stage {stage.name} ({stage.source}): {field}: {message}")

        parse_recipe(recipe, fail)
        steps = recipe["trainer"].get("max_steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise fail("trainer.max_steps", f"a positive number of steps, got {steps!r}")
        data = recipe.get("data") or {}
        for key in DATA_FIELDS_SHARED:
            if data.get(key) != reference.get(key):
                raise fail(f"data.{key}", f"{data.get(key)!r}, but stage {first.name} has {reference.get(key)!r}: "
                                          "every stage must read and validate on the same data")
        unknown = sorted(set(data.get("train_weights") or {}) - set(data.get("domains") or {}))
        if unknown:
            raise fail("data.train_weights", f"{unknown} are not in data.domains {sorted(data.get('domains') or {})}")
        try:
            model_config = recipe_model_config(recipe)
        except (TypeError, ValueError) as error:
            raise fail("model.init_args.config", str(error)) from None
        seq_len = data.get("seq_len", 128)
        if isinstance(seq_len, int) and seq_len > model_config.max_seq_len:
            raise fail("data.seq_len", f"{seq_len} is longer than model.init_args.config.max_seq_len "
                                       f"{model_config.max_seq_len}; shorten the first or raise the second")
        tokenizer = data.get("tokenizer", "byte")
        if tokenizer == "bpe" and model_config.vocab_size != data.get("bpe_vocab_size", 4096):
            raise fail("model.init_args.config.vocab_size", f"{model_config.vocab_size}, but the BPE tokenizer has "
                                                            f"data.bpe_vocab_size {data.get('bpe_vocab_size', 4096)}")
        if tokenizer == "byte" and model_config.vocab_size < 257:
            raise fail("model.init_args.config.vocab_size", f"{model_config.vocab_size} < 257 byte-tokenizer ids")
        shape = {k: getattr(model_config, k) for k in ARCHITECTURE_FIELDS}
        dense_shape = dense_shape or shape
        if shape != dense_shape:
            changed = sorted(k for k in shape if shape[k] != dense_shape[k])
            origin = f"the seed checkpoint {existing_seed}" if existing_seed else f"stage {stages[0].name}"
            raise fail("model.init_args.config", f"{changed} differ from {origin}'s: the experts "
                                                 "are upcycled from the same dense shape")
        if stage.role == "mixture":
            upcycling = [c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("UpcyclingCallback")]
            if len(upcycling) != 1:
                raise fail("trainer.callbacks", "a mixture stage needs one UpcyclingCallback")
            args = upcycling[0]["init_args"]
            try:
                check_method(args.get("method", "bam"), len(args["sources"]), model_config, args.get("seed_index", 0))
            except ValueError as error:
                raise fail("model.init_args.config", str(error)) from None
    return composed


def parse_recipe(recipe: dict[str, Any], fail) -> None:
    """Parse a composed recipe with `bam fit`'s parser (types, unknown keys, class paths),
    instantiating nothing."""
    import contextlib
    import io

    from bam_lightning.lightning_cli import parse_only

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parse_only(copy.deepcopy(recipe))  # the parser puts Namespaces into what it is given
    except SystemExit:
        lines = [line for line in errors.getvalue().splitlines() if line.startswith("error:")]
        raise fail("recipe", (lines[-1].removeprefix("error: ") if lines else errors.getvalue()[-500:])) from None


def upcycling_method(recipe: dict[str, Any]) -> str | None:
    """The mixture's upcycling method (bam, bam_shared_kv, btx, sparse), None for a dense stage."""
    for callback in (recipe.get("trainer") or {}).get("callbacks") or []:
        if callback["class_path"].endswith("UpcyclingCallback"):
            return (callback.get("init_args") or {}).get("method", "bam")
    return None


# Fields that change how fast a stage runs, how it reports, or where it writes, never its numbers:
# the fingerprint leaves them out, so changing them reuses finished stages.
SPEED_ONLY_TRAINER = ("default_root_dir", "logger", "enable_progress_bar", "enable_model_summary",
                      "log_every_n_steps")
SPEED_ONLY_CALLBACKS = ("ModelCheckpoint", "MetricsFile", "ProgressLog", "LearningRateMonitor", "TokenThroughput")
SPEED_ONLY_DATA = ("num_workers", "prepare_workers", "data_dir")  # data_dir: where the data is; its identity is fingerprinted
RUN_DIR_MARK = "$RUN_DIR"


def fingerprint(composed: dict[str, Any], upstream: list[str], run_dir: Path | None = None,
                data: str | None = None) -> str:
    """What a stage's numbers depend on: its composed recipe without the speed-only fields, with
    paths inside `run_dir` written relative to it (moving the run folder keeps its stages), the
    upstream stages' fingerprints, and the identity of the prepared data (`data_identities`)."""
    text = json.dumps({"config": result_fields(composed, run_dir), "upstream": upstream, "data": data},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def result_fields(composed: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """The composed recipe less SPEED_ONLY_* (see the module docstring)."""
    recipe = copy.deepcopy(composed)
    trainer = recipe.get("trainer") or {}
    for key in SPEED_ONLY_TRAINER:
        trainer.pop(key, None)
    if "callbacks" in trainer:
        trainer["callbacks"] = [c for c in trainer["callbacks"] or []
                                if not c["class_path"].endswith(SPEED_ONLY_CALLBACKS)]
    for key in SPEED_ONLY_DATA:
        (recipe.get("data") or {}).pop(key, None)
    return _relative_to(recipe, str(run_dir)) if run_dir is not None else recipe


def _relative_to(value: Any, root: str) -> Any:
    if isinstance(value, dict):
        return {key: _relative_to(item, root) for key, item in value.items()}
    if isinstance(value, list):
        return [_relative_to(item, root) for item in value]
    if isinstance(value, str) and (value == root or value.startswith(root + os.sep)):
        return RUN_DIR_MARK + value[len(root):]
    return value


def stage_fingerprints(stages: list[Stage], composed: dict[str, dict[str, Any]], config: dict[str, Any],
                       run_dir: Path) -> dict[str, str]:
    """Every stage's fingerprint, in run order (each includes its upstream stages')."""
    data = data_identities(stages, composed, config)
    existing_seed = seed_checkpoint(config)
    # an existing seed checkpoint is fingerprinted by path, size and time, so replacing it reruns the rest
    prints = {"seed": fingerprint({"checkpoint": existing_seed, "stat": [Path(existing_seed).stat().st_size,
                                                                          Path(existing_seed).stat().st_mtime_ns]}, [])
              } if existing_seed else {}
    for stage in stages:
        prints[stage.name] = stage_fingerprint(stage, composed[stage.name], prints, run_dir, data[stage.name])
    return prints


def stage_fingerprint(stage: Stage, composed: dict[str, Any], prints: dict[str, str], run_dir: Path,
                      data: str | None) -> str:
    """`sparse` upcycling reads only the seed (the other sources are checked, not used): its stages
    depend on the seed's fingerprint alone, so retraining an expert leaves them finished."""
    upstream = stage.depends
    if upcycling_method(composed) == "sparse":
        upcycling = next(c for c in composed["trainer"]["callbacks"] if c["class_path"].endswith("UpcyclingCallback"))
        upstream = [stage.depends[int((upcycling.get("init_args") or {}).get("seed_index", 0))]]
    return fingerprint(composed, [prints[name] for name in upstream], run_dir, data)


# ----- the data every stage reads: checked, and identified, before the first stage runs -----
def data_identities(stages: list[Stage], composed: dict[str, dict[str, Any]],
                    config: dict[str, Any]) -> dict[str, str]:
    """Per stage, the identity of the prepared data it reads: the prepared-data settings digest
    (data/prepare.py: sources with each user file's path, size and modification time, tokenizer,
    split, byte cap), the key of the prepared folder itself. Building it checks what a stage would
    refuse within seconds (data module arguments, user paths, a seed checkpoint's tokenizer), so a
    study that cannot run fails here, before any stage is touched."""
    from bam_lightning.data.datamodule import BAMDataModule
    from bam_lightning.data.prepare import settings_digest

    by_data: dict[str, tuple[str, str | None]] = {}
    identities = {}
    for stage in stages:
        data = dict(composed[stage.name].get("data") or {})
        key = json.dumps({k: v for k, v in data.items() if k not in ("train_weights", "order_seed", "num_workers", "prepare_workers")},
                         sort_keys=True)
        if key not in by_data:
            try:
                module = BAMDataModule(**data)
                settings = module._settings()  # resolves user paths: a missing file fails here
            except (TypeError, ValueError, OSError) as error:
                raise StudyError(f"stage {stage.name} ({stage.source}): data: {error}") from None
            by_data[key] = (settings_digest(settings), data_tokenizer_fingerprint(module, settings))
        identities[stage.name] = by_data[key][0]
    existing_seed = seed_checkpoint(config)
    if existing_seed and stages:
        from bam_lightning.checkpoint import read_checkpoint

        seed_tokenizer = read_checkpoint(existing_seed).tokenizer
        tokenizers = {tokenizer for _, tokenizer in by_data.values() if tokenizer}
        for tokenizer in tokenizers:
            if seed_tokenizer and tokenizer != seed_tokenizer:
                raise StudyError(f"{config.get('path', 'study')}: seed.checkpoint: {existing_seed} was trained with "
                                 f"tokenizer {seed_tokenizer!r}, but data.tokenizer gives {tokenizer!r}; set "
                                 "data.tokenizer to the seed's tokenizer.json (the folder `bam import-hf` wrote)")
    return identities


def add_document_hashes(record: dict[str, Any], data: dict[str, Any]) -> None:
    """Put a content hash beside each scored validation document (`val_documents[domain]["hash"]`,
    in the order of `["document"]`), read from the prepared validation split the stage scored,
    so the report pairs two rows only when they scored the same texts."""
    from bam_lightning.data.datamodule import BAMDataModule

    documents = record.get("val_documents") or {}
    if not documents:
        return
    module = BAMDataModule(**data)
    hashes = validation_document_hashes(module._resolve_data_dir(module._settings()), list(documents))
    for domain, stats in documents.items():
        stats["hash"] = [hashes[domain][int(i)] for i in stats["document"]]


def validation_document_hashes(data_dir: Path, domains: list[str]) -> dict[str, list[str]]:
    """Per domain, a short hash of each validation document's tokens (the tokenizer is the same
    for every stage of a study, so equal tokens are equal texts)."""
    from bam_lightning.data.prepare import read_document_offsets, read_manifest

    manifest = read_manifest(data_dir)
    if manifest is None:
        raise FileNotFoundError(f"{data_dir}: no prepared data (manifest.json) to hash validation documents from")
    out = {}
    for domain in domains:
        split = data_dir / domain / "val"
        tokens = read_split_tokens(split, manifest["token_dtype"])
        offsets = read_document_offsets(split)
        out[domain] = [hashlib.blake2b(tokens[start:stop].tobytes(), digest_size=8).hexdigest()
                       for start, stop in zip(offsets[:-1], offsets[1:], strict=True)]
    return out


def read_split_tokens(split_dir: Path, dtype: str):
    """A prepared split's whole token sequence, read from litdata's chunk files (a header of
    uint32 item count and offsets, then the tokens), checked against its index."""
    import numpy as np

    index = json.loads((split_dir / "index.json").read_text())
    parts = []
    for chunk in index["chunks"]:
        header = (1 + int(chunk["chunk_size"]) + 1) * 4
        tokens = np.fromfile(split_dir / chunk["filename"], dtype=dtype, offset=header)
        if len(tokens) != int(chunk["dim"]):
            raise ValueError(f"{split_dir / chunk['filename']}: {len(tokens)} tokens, its index says {chunk['dim']}")
        parts.append(tokens)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def data_tokenizer_fingerprint(module: Any, settings: dict[str, Any]) -> str | None:
    """The data's tokenizer fingerprint where it is known before preparing: bytes, a tokenizer
    file, or a BPE tokenizer already trained for exactly these settings; else None."""
    if settings["tokenizer"] == "byte":
        return "byte"
    if settings.get("tokenizer_fingerprint"):
        return settings["tokenizer_fingerprint"]
    from bam_lightning.data.prepare import read_manifest

    manifest = read_manifest(module._resolve_data_dir(settings))
    return manifest["tokenizer"]["fingerprint"] if manifest and manifest.get("settings") == settings else None


# ----- running -----
def _die_with_parent() -> None:
    """Child stages stop when the pipeline process is killed (no orphan keeps training)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_stage_process(config_path: Path) -> int:
    """Run one stage and return its exit code (143: stopped by SIGTERM after saving its step).

    Under torchrun or SLURM (several ranks, each running this pipeline) every rank runs the stage
    in its own process, in lockstep (see `lockstep.py`). Otherwise the stage gets a process of its
    own: a stage on several devices a fresh `python -m bam_lightning.pipeline --stage CONFIG`, whose
    command line Lightning's launcher runs again for the other ranks (the pipeline's own command
    would start a second pipeline); a one-device stage a fork of this process, which has already
    imported torch and Lightning (7-10 s saved per stage; the parent never runs a torch kernel
    before forking, so the child's OpenMP pool starts clean). A SIGTERM to the pipeline is passed
    on to the stage, which saves its step and exits 143.
    """
    from bam_lightning import lockstep

    if lockstep.active():
        return _run_stage_in_lockstep(config_path)
    if _stage_devices(config_path) != 1 or "fork" not in multiprocessing.get_all_start_methods():
        command = [sys.executable, "-m", "bam_lightning.pipeline", "--stage", str(config_path)]
        child = subprocess.Popen(command, preexec_fn=_die_with_parent)
        with _sigterm_passed_to(child.pid):
            try:
                return child.wait()
            except BaseException:
                child.terminate()
                child.wait()
                raise
    import bam_lightning.lightning_cli  # noqa: F401  (imported once here, inherited by every forked stage)

    sys.stdout.flush()
    sys.stderr.flush()
    forked = multiprocessing.get_context("fork").Process(target=_stage_child, args=(str(config_path),))
    forked.start()
    with _sigterm_passed_to(forked.pid):
        try:
            forked.join()
        except BaseException:  # Ctrl-C or a kill of the pipeline: never leave a stage training alone
            forked.terminate()
            forked.join()
            raise
    return forked.exitcode if forked.exitcode is not None else 1


def _run_stage_in_lockstep(config_path: Path) -> int:
    """Rank 0 of a torchrun/SLURM pipeline: announce the stage, then run it with the others."""
    import traceback

    from bam_lightning import lockstep
    from bam_lightning.callbacks.preemption import PREEMPTED_EXIT_CODE, Preempted

    lockstep.send(("stage", str(config_path)))
    try:
        run_stage(str(config_path))
    except Preempted:
        lockstep.stage_failed = True
        return PREEMPTED_EXIT_CODE
    except Exception:
        lockstep.stage_failed = True  # the other ranks may be inside the stage: no more messages
        traceback.print_exc()
        return 1
    return 0


def _stage_devices(config_path: Path) -> int | None:
    """Processes the stage starts: 1 when it runs on one device (then it may be forked), None
    when it is not one (several devices or nodes, or "auto" on a machine with several GPUs)."""
    trainer = OmegaConf.to_container(OmegaConf.load(config_path)).get("trainer") or {}
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    if nodes not in (1, None):
        return None
    if devices in (1, "1", [0], "0,"):
        return 1
    if devices in ("auto", None, -1, "-1") and trainer.get("accelerator", "auto") in ("cpu", "auto"):
        import torch

        if trainer.get("accelerator") == "cpu" or torch.cuda.device_count() <= 1:
            return 1
    return None


class _sigterm_passed_to:
    """While a stage runs, a SIGTERM to the pipeline goes to the stage (which saves its step)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> None:
        self.previous = signal.signal(signal.SIGTERM, self._forward)

    def _forward(self, signum: int, frame: Any) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _stage_child(config_path: str) -> None:
    _die_with_parent()
    try:
        run_stage(config_path)
    except UserError:  # the pipeline prints its message (from error.txt) once, without a traceback
        sys.exit(2)


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def run_pipeline(path: str, force: bool = False, seeds: list[int] | None = None, check_only: bool = False,
                 sweep: list[int] | None = None, overrides: list[str] | None = None) -> Path | None:
    config = load_pipeline_config(path, sweep, overrides)
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise UserError(f"--seeds: give distinct non-negative mixture seeds, got {seeds}")
        config["seeds"] = list(seeds)
    run_dir = Path(config["run_dir"]).resolve()
    from bam_lightning.lightning_cli import check_writable

    check_writable(run_dir, f"{path}: run_dir")
    stages = plan(config)
    existing_seed = seed_checkpoint(config)
    if existing_seed and not Path(existing_seed).is_file():
        raise UserError(f"{path}: seed.checkpoint: {existing_seed} not found")
    composed_stages = check_stages(stages, config, run_dir)
    prints = stage_fingerprints(stages, composed_stages, config, run_dir)  # also checks the data
    print(f"{len(stages)} stages composed and checked", flush=True)
    for warning in config.get("warnings", []):
        print(f"warning: {warning}", flush=True)
    if check_only:
        for stage in stages:
            recipe = composed_stages[stage.name]
            model = recipe_model_config(recipe)
            experts = f", {model.n_experts} FFN / {model.attn_experts} attention experts" if model.is_moe else ""
            print(f"  {stage.name}: {' '.join(filter(None, (stage.role, stage.budget)))}, {recipe['trainer']['max_steps']} steps{experts}"
                  + (f", from {', '.join(stage.depends)}" if stage.depends else ""), flush=True)
        return None
    started = time.perf_counter()
    for number, stage in enumerate(stages, 1):
        composed = composed_stages[stage.name]
        label = f"[{number}/{len(stages)}] {stage.name}"
        stage_dir = run_dir / "stages" / stage.name
        done = stage_dir / "stage.json"
        if not force and _stored_fingerprint(stage_dir) != prints[stage.name]:
            earlier = _matching_stale(stage_dir, prints[stage.name])
            if earlier is not None:  # the study came back to a configuration run before
                if stage_dir.exists():
                    print(f"{label}: config changed, previous outputs moved to {move_aside(stage_dir)}", flush=True)
                earlier.rename(stage_dir)
                print(f"{label}: outputs of this configuration restored from {earlier}", flush=True)
        if done.exists() and not force and json.loads(done.read_text()).get("fingerprint") == prints[stage.name]:
            print(f"{label}: done earlier, skipped", flush=True)
            continue
        moved = None
        if stage_dir.exists() and (force or _stored_fingerprint(stage_dir) != prints[stage.name]):
            moved = move_aside(stage_dir)
            print(f"{label}: config changed, previous outputs moved to {moved}", flush=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "fingerprint").write_text(prints[stage.name])
        config_path = stage_dir / "config.yaml"
        OmegaConf.save(OmegaConf.create(composed), config_path)
        resume = (stage_dir / "checkpoints" / "last.ckpt").exists()
        print(f"{label}: {'resuming' if resume else 'training'} ({stage.role}, "
              f"{composed['trainer']['max_steps']} steps)", flush=True)
        returncode = run_stage_process(config_path)
        if returncode != 0:
            if moved is not None and not _holds_checkpoint(stage_dir):
                # refused before its first checkpoint: the attempt is kept aside, the old outputs come back
                failed = stage_dir.with_name(stage.name + ".failed")
                if failed.exists() and not _holds_checkpoint(failed):
                    shutil.rmtree(failed)  # an earlier refused attempt: a config and an error, no weights
                failed = move_aside(stage_dir, ".failed")
                moved.rename(stage_dir)
                print(f"{label}: the new configuration stopped before its first checkpoint; previous outputs "
                      f"restored to {stage_dir} (this attempt: {failed})", flush=True)
                config_path = failed / "config.yaml"
            raise stage_failure(label, returncode, stage, config_path)
        record = json.loads((stage_dir / "result.json").read_text())
        check_stage_checkpoint(label, stage_dir / "checkpoints" / "last.ckpt", record["steps"])
        record.update(fingerprint=prints[stage.name], **stage_labels(stage, composed, config))
        add_document_hashes(record, composed["data"])
        write_json_atomic(done, record)
        print(f"{label}: val/avg/ppl {record['final'].get('val/avg/ppl', float('nan')):.3f} "
              f"in {record['wall_time_s']:.0f} s", flush=True)
    from bam_lightning.report import write_report

    # the labels come from this plan, not only from stage.json: a stage finished by an older
    # version (fingerprint unchanged, so skipped) still gets the report's routing labels
    records = [{**json.loads((run_dir / "stages" / s.name / "stage.json").read_text()),
                **stage_labels(s, composed_stages[s.name], config)} for s in stages]
    records = with_existing_seed_row(records, seed_checkpoint(config))
    report = write_report(run_dir, records)
    if config.get("eval"):  # downstream accuracy: one resumable evaluation per model, then its report section
        from bam_lightning.eval.study import append_to_report, report_lines, run_evaluations

        append_to_report(report, report_lines(records, run_evaluations(run_dir, records, config["eval"])))
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s; report: {report}", flush=True)
    return report


def stage_labels(stage: Stage, composed: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """What the report needs to know about a stage besides its numbers (all derived from the plan)."""
    return dict(name=stage.name, row=stage.row, role=stage.role, seed=stage.seed, budget=stage.budget,
                mixture_steps=stage.mixture_steps, sources=stage.depends if stage.role == "mixture" else [],
                method=upcycling_method(composed), seed_domain=(config.get("study") or {}).get("seed_domain"))


def with_existing_seed_row(records: list[dict[str, Any]], existing_seed: str | None) -> list[dict[str, Any]]:
    """An existing seed (`seed: {checkpoint}`) has no stage of its own; its row is the first expert's
    full validation before step 0, which scores exactly the seed's weights on every domain."""
    expert = next((r for r in records if r.get("role") == "expert" and r.get("initial")), None)
    if not existing_seed or expert is None:
        return records
    seed = {key: expert[key] for key in ("config", "params_total", "params_active", "seed", "budget") if key in expert}
    seed.update(name="seed", row="seed", role="seed", final=dict(expert["initial"]), initial={}, steps=0, tokens=0,
                training_flops=0, wall_time_s=0.0, checkpoint=existing_seed)
    return [seed, *records]


def stage_failure(label: str, returncode: int, stage: Stage, config_path: Path) -> SystemExit:
    """The pipeline's exit: 143 when the stage was stopped by SIGTERM (preemption: a re-run
    resumes), with the message printed; otherwise code 1 with the message."""
    from bam_lightning.callbacks.preemption import PREEMPTED_EXIT_CODE

    message = failure_message(label, returncode, stage, config_path)
    if returncode in (PREEMPTED_EXIT_CODE, -signal.SIGTERM):
        print(message, file=sys.stderr, flush=True)
        return SystemExit(PREEMPTED_EXIT_CODE)
    return SystemExit(message)


def failure_message(label: str, returncode: int, stage: Stage, config_path: Path) -> str:
    """Say "re-run to resume" only where a re-run can help (the stage was killed or interrupted);
    for an error, name it and what to fix."""
    from bam_lightning.callbacks.preemption import PREEMPTED_EXIT_CODE

    error_file = config_path.parent / ERROR_FILE
    if returncode in (PREEMPTED_EXIT_CODE, -signal.SIGTERM):
        return (f"{label} was stopped by SIGTERM (its last step is saved). Re-run the same command to "
                "resume from it (finished stages are kept).")
    if returncode < 0 or not error_file.exists():
        how = f"was stopped by signal {-returncode}" if returncode < 0 else f"stopped (exit {returncode})"
        return (f"{label} {how}. Re-run the same command to resume from its last checkpoint "
                "(finished stages are kept).")
    error = error_file.read_text().strip()
    if error.startswith("KeyboardInterrupt"):
        return f"{label} was interrupted. Re-run the same command to resume from its last checkpoint."
    if error.startswith(RANK_LOST):
        return (f"{label} stopped: {error}. Re-run the same command to resume from its last checkpoint "
                "(finished stages are kept).")
    if error.startswith(DiskFullError.__name__):
        reason = error.partition(": ")[2]
    elif f"[Errno {errno.ENOSPC}]" in error or free_bytes(config_path.parent) < DISK_FULL_MARGIN_BYTES:
        reason = f"no space left on device under {config_path.parent}" + (f" ({error})" if error else "")
    elif not error:  # the stage could not even say why
        return f"{label} stopped (exit {returncode}) without a message; see its output above."
    else:
        return (f"{label} failed: {error}\nFix the stage's recipe {stage.source} (composed config: {config_path}), "
                "then re-run the same command; finished stages are kept.")
    return (f"{label} stopped: {reason}\nThe recipe is fine: free some space, then re-run the same command "
            "to resume the stage from its last checkpoint (finished stages are kept).")


def check_stage_checkpoint(label: str, last: Path, steps: int) -> None:
    """A stage is recorded done only with a checkpoint of its final step (the next stages read it)."""
    from bam_lightning.checkpoint import read_checkpoint

    if not last.is_file():
        raise SystemExit(f"{label} finished without writing {last}; the stages after it need that checkpoint. "
                         "Check the stage's ModelCheckpoint settings (save_last) and re-run.")
    source = read_checkpoint(last)
    if source.final is False:
        raise SystemExit(f"{label} finished, but {last} holds step {source.global_step} of {source.max_steps}, "
                         "not its final step. Re-run the same command to resume it.")
    if source.global_step is not None and source.global_step != steps:
        raise SystemExit(f"{last}: holds step {source.global_step}, but the stage trained {steps} steps")


def _stored_fingerprint(stage_dir: Path) -> str | None:
    path = stage_dir / "fingerprint"
    return path.read_text().strip() if path.exists() else None


def move_aside(stage_dir: Path, suffix: str = ".stale") -> Path:
    """Rename a stage's outputs to `<name>.stale`, `<name>.stale.1`, ...: never over an earlier one,
    so no final checkpoint is ever deleted (remove the folders you no longer need by hand)."""
    for number in range(10_000):
        aside = stage_dir.with_name(stage_dir.name + suffix + (f".{number}" if number else ""))
        if not aside.exists():
            stage_dir.rename(aside)
            return aside
    raise SystemExit(f"{stage_dir}: 10,000 earlier outputs beside it; remove the {suffix} folders you do not need")


def _matching_stale(stage_dir: Path, wanted: str) -> Path | None:
    """A folder moved aside earlier that holds this fingerprint's stage (finished ones first)."""
    candidates = [p for p in stage_dir.parent.glob(stage_dir.name + ".stale*")
                  if p.is_dir() and _stored_fingerprint(p) == wanted]
    candidates.sort(key=lambda p: not (p / "stage.json").exists())
    return candidates[0] if candidates else None


def _holds_checkpoint(stage_dir: Path) -> bool:
    folder = stage_dir / "checkpoints"
    return folder.is_dir() and any(folder.iterdir())


def run_stage(config_path: str) -> None:
    """Inside the stage's process: fit (resuming if a last checkpoint exists), validate, record.
    An error is also written to the stage's `error.txt`, for the pipeline's failure line."""
    import torch.distributed

    from bam_lightning.callbacks.preemption import Preempted

    error_file = Path(config_path).parent / ERROR_FILE
    error_file.unlink(missing_ok=True)
    try:
        _run_stage(config_path)
    except Preempted:
        raise  # saved its step: nothing to fix
    except (Exception, KeyboardInterrupt, SystemExit) as error:
        try:
            if isinstance(error, SystemExit):
                if error.code not in (0, None):  # the CLI refused the recipe and printed why above
                    error_file.write_text(f"the recipe was refused (exit {error.code}); its error is printed above")
            elif isinstance(error, torch.distributed.DistError) or any(m in str(error) for m in PEER_LOST_MARKERS):
                # another rank of the stage died (killed, out of memory): its own error is above
                error_file.write_text(f"{RANK_LOST} ({type(error).__name__}: {str(error).splitlines()[0]})")
            else:
                error_file.write_text(f"{type(error).__name__}: {error}")
        except OSError:  # a full disk: the pipeline says so from an empty or missing error.txt
            pass
        raise


def _run_stage(config_path: str) -> None:
    from bam_lightning.lightning_cli import check_before_fit, run_lightning_cli

    cli = run_lightning_cli(["--config", config_path], run=False)
    stage_dir = Path(config_path).parent
    last = stage_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if last.exists() else None
    check_before_fit(cli.trainer, cli.model, cli.datamodule, ckpt_path)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    metrics_file = next(c for c in cli.trainer.callbacks if type(c).__name__ == "MetricsFile")
    steps = cli.trainer.global_step
    records = read_metrics(metrics_file.path) if metrics_file.path.exists() else []
    final = {k: v for k, v in records[-1].items() if k.startswith("val/")} if records else {}
    stale = (not records or records[-1]["step"] != steps or records[-1]["stage"] != "fit" or not final
             or not cli.model.val_document_stats)
    if cli.trainer.strategy.broadcast(stale, src=0):  # rank 0 wrote the metrics: every rank follows it
        # the fit's last validation was before its last step (or in a killed process, so its
        # per-document sums are lost): score the final weights once more
        # one dict per validation loader (domain); routing is logged per loader, so merge them all
        results = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        final = {key: value for result in results for key, value in result.items()}
    model_config = cli.model.config
    seq_len = cli.datamodule.seq_len
    tokens = steps * trainer_tokens_per_step(cli.trainer, cli.datamodule.batch_size, seq_len)
    total, active = parameter_counts(model_config)
    if not cli.trainer.is_global_zero:
        return
    write_json_atomic(stage_dir / "result.json", {
        "final": {k: float(v) for k, v in final.items()},
        "initial": cli.model.initial_val_metrics,
        "steps": steps,
        "tokens": tokens,
        "training_flops": training_flops_per_token(model_config, seq_len) * tokens,
        "warmup_steps": int(cli.model.hparams.warmup_steps),
        "params_total": total,
        "params_active": active,
        "wall_time_s": metrics_file.wall_time(),
        "config": model_config.to_dict(),
        # per validation document: loss sum, tokens, bytes (the report bootstraps over them)
        "val_documents": cli.model.val_document_stats,
    })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bam pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", help="study file, e.g. recipes/tiny/study.yaml (or an older "
                                                  "pipeline file naming one recipe per stage)")
    parser.add_argument("--force", action="store_true", help="rerun every stage, even finished ones")
    parser.add_argument("--sweep", type=int, nargs="+", metavar="STEPS",
                        help="mixture-phase lengths, overriding the study's `mixtures.sweep` (e.g. --sweep 100 400 "
                             "1600): the compute-matched reference and methods, DM and CM, at each length")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="mixture-phase repeats, overriding the recipe's `seeds` (e.g. --seeds 0 1 2); "
                             "seed 0's stages and the dense stages are shared, so finished ones are reused")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="change a field of the study file for this run, repeatable (e.g. --set "
                             "run_dir=runs/tiny_fp --set mixtures.router.ffn_gate_scale=4.0)")
    parser.add_argument("--check", action="store_true",
                        help="compose and check every stage's recipe, print the stages, write and train nothing")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one composed stage
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args.stage)
        return
    if not args.recipe:
        parser.error("give a study file, e.g. `bam pipeline recipes/tiny/study.yaml`")
    from bam_lightning import lockstep

    environment = lockstep.cluster_environment()
    if environment is not None:  # torchrun / srun: rank 0 runs the pipeline, the others follow it
        lockstep.init_process_group(environment)
        if lockstep.rank() != 0:
            lockstep.follow()
            return
    try:
        run_pipeline(args.recipe, force=args.force, seeds=args.seeds, check_only=args.check, sweep=args.sweep,
                     overrides=args.overrides)
    except StudyError as error:  # a bad study file or --set: the message names the field; no traceback
        parser.exit(2, f"bam pipeline: error: {error}\n")
    finally:
        if environment is not None and not lockstep.stage_failed:
            lockstep.send(("done", ""))


if __name__ == "__main__":
    main()
