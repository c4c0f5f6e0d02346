"""`bam pipeline RECIPE`: the whole BAM study, stage by stage, then the report.

seed -> one continued-pre-training branch per domain -> the mixtures (upcycled from the seed
plus the branches) and a dense baseline -> report. Each stage is an ordinary `bam fit` recipe,
composed with the stage's paths (checkpoints, TensorBoard, sources) and written to
`<run_dir>/stages/<name>/config.yaml`; it runs in its own process, so a killed pipeline loses at
most the steps since a stage's last checkpoint. A stage counts as done only when its `last.ckpt`
holds its final step, so the next stage never starts from an older one.

Compute-matched (CM) stages cut the steps to the reference's training FLOPs and scale the
warm-up with them: warm-up is the same fraction of every run, DM or CM.

Stages are idempotent: a stage whose fingerprint (its composed config plus its upstream stages'
fingerprints) matches a finished `stage.json` is skipped; an unfinished one resumes from its
`last.ckpt`; a changed config moves the old stage aside (`<name>.stale`) and reruns it and every
stage after it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
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
from bam_lightning.config import ModelConfig
from bam_lightning.flops import (
    parameter_counts,
    recipe_tokens_per_step,
    trainer_tokens_per_step,
    training_flops_per_token,
)
from bam_lightning.lit import BaseLM

PIPELINE_KEYS = {"run_dir", "seeds", "seed", "seed_checkpoint", "experts", "mixtures", "compute_matched",
                 "dense_baseline", "checkpoint_every_n_steps"}
MIXTURE_METHODS = {"bam", "bam_shared_kv", "btx", "sparse", "btx_param_matched"}
ERROR_FILE = "error.txt"  # a stage's exception, for the pipeline's failure line
DEFAULT_WARMUP_STEPS = inspect.signature(BaseLM.__init__).parameters["warmup_steps"].default


@dataclass
class Stage:
    name: str  # directory name and TensorBoard run name
    row: str  # the report's row key
    role: str  # seed | expert | mixture | dense_baseline
    recipe: str
    depends: list[str] = field(default_factory=list)
    seed: int = 0  # mixture-phase seed (data order + router init)
    max_steps: int | None = None  # set for compute-matched rows
    budget: str = ""  # "DM" or "CM" for mixtures


# ----- loading and planning -----
def load_pipeline_config(path: str) -> dict[str, Any]:
    """Read and check a pipeline recipe before any stage runs; errors name the key or file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: pipeline recipe not found")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a pipeline recipe is a mapping of {sorted(PIPELINE_KEYS)}")
    unknown = sorted(set(config) - PIPELINE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(PIPELINE_KEYS)}")
    for key in ("run_dir", "seed", "experts", "mixtures"):
        if key not in config:
            raise ValueError(f"{path}: missing key {key!r}")
    unknown_methods = sorted(set(config["mixtures"]) - MIXTURE_METHODS)
    if unknown_methods:
        raise ValueError(f"{path}: mixtures: unknown {unknown_methods}; known: {sorted(MIXTURE_METHODS)}")
    config.setdefault("seeds", [0])
    seeds = config["seeds"]
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and x >= 0 for x in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ValueError(f"{path}: seeds must be a list of distinct non-negative integers, got {seeds!r}")
    config.setdefault("compute_matched", {})
    config.setdefault("checkpoint_every_n_steps", 50)
    recipes = [config["seed"], *config["experts"].values(), *config["mixtures"].values()]
    if config.get("dense_baseline"):
        recipes.append(config["dense_baseline"])
    for recipe in recipes:
        if not Path(recipe).is_file():
            raise FileNotFoundError(f"{path}: recipe {recipe} not found")
        steps = (read_recipe(recipe).get("trainer") or {}).get("max_steps")
        if recipe == config["seed"] and config.get("seed_checkpoint"):
            if steps != 0:
                raise ValueError(f"{recipe}: with seed_checkpoint the seed stage only scores the imported model; "
                                 f"set its trainer.max_steps to 0 (got {steps!r})")
        elif not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"{recipe}: trainer.max_steps must be a positive number of steps, got {steps!r} "
                             "(every stage of a pipeline trains a fixed number of steps)")
    if config.get("seed_checkpoint") and not Path(config["seed_checkpoint"]).is_file():
        raise FileNotFoundError(f"{path}: seed_checkpoint {config['seed_checkpoint']} not found "
                                "(a pretrained seed: bam import-hf SRC --out CKPT)")
    matched = config["compute_matched"]
    if matched:
        if matched.get("reference") not in config["mixtures"]:
            raise ValueError(f"{path}: compute_matched.reference must be one of mixtures {sorted(config['mixtures'])}")
        for method in matched.get("methods", []):
            if method not in config["mixtures"]:
                raise ValueError(f"{path}: compute_matched.methods: {method!r} is not in mixtures")
    return config


def read_recipe(path: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def recipe_model_config(recipe: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**recipe["model"]["init_args"]["config"])


def plan(config: dict[str, Any]) -> list[Stage]:
    stages = [Stage("seed", "seed", "seed", config["seed"])]
    for domain, recipe in config["experts"].items():
        stages.append(Stage(f"expert_{domain}", f"expert_{domain}", "expert", recipe, depends=["seed"]))
    experts = [s.name for s in stages]
    matched = config["compute_matched"]
    for seed in config["seeds"]:
        suffix = f"_s{seed}" if seed != 0 else ""  # seed 0's stages are shared by 1- and 3-seed runs
        for method, recipe in config["mixtures"].items():
            stages.append(Stage(f"{method}{suffix}", method, "mixture", recipe, experts, seed, budget="DM"))
        for method in matched.get("methods", []):
            steps = compute_matched_steps(config["mixtures"][matched["reference"]], config["mixtures"][method])
            stages.append(Stage(f"{method}_cm{suffix}", f"{method}_cm", "mixture", config["mixtures"][method],
                                experts, seed, max_steps=steps, budget="CM"))
    if config.get("dense_baseline"):
        stages.append(Stage("dense_baseline", "dense_baseline", "dense_baseline", config["dense_baseline"], ["seed"]))
    return stages


def compute_matched_steps(reference_recipe: str, recipe: str) -> int:
    """Steps that give `recipe` the training FLOPs `reference_recipe` spends (fewer tokens).
    Tokens per step count accumulation, devices and nodes on both sides."""
    ref, this = read_recipe(reference_recipe), read_recipe(recipe)
    ref_flops = training_flops_per_token(recipe_model_config(ref), ref["data"].get("seq_len", 128))
    this_flops = training_flops_per_token(recipe_model_config(this), this["data"].get("seq_len", 128))
    ref_total = ref_flops * recipe_tokens_per_step(ref, reference_recipe) * ref["trainer"]["max_steps"]
    return max(1, math.floor(ref_total / (this_flops * recipe_tokens_per_step(this, recipe))))


# ----- composing one stage's config -----
def compose_stage(stage: Stage, config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The stage's recipe with this run's paths, sources and seed filled in."""
    recipe = copy.deepcopy(read_recipe(stage.recipe))
    stage_dir = run_dir / "stages" / stage.name
    # a pretrained seed (`seed_checkpoint`, from `bam import-hf`) replaces the seed stage's weights:
    # the seed stage then only scores it (its recipe has max_steps: 0) and every later stage starts from it
    seed_checkpoint = config.get("seed_checkpoint")
    ckpt = lambda name: (str(Path(seed_checkpoint).resolve()) if name == "seed" and seed_checkpoint  # noqa: E731
                         else str(run_dir / "stages" / name / "checkpoints" / "last.ckpt"))
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
                 if not c["class_path"].endswith(("ModelCheckpoint", "MetricsFile"))]
    callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": str(stage_dir / "checkpoints"), "save_last": True,
                                    "save_top_k": 0, "every_n_train_steps": config["checkpoint_every_n_steps"]}})
    callbacks.append({"class_path": "bam_lightning.callbacks.MetricsFile",
                      "init_args": {"path": str(stage_dir / "metrics.jsonl")}})
    for callback in callbacks:
        if callback["class_path"].endswith("UpcyclingCallback"):
            callback.setdefault("init_args", {})["sources"] = [ckpt(name) for name in stage.depends]
            callback["init_args"]["router_seed"] = stage.seed
    trainer["callbacks"] = callbacks
    if stage.role in ("expert", "dense_baseline") or (stage.role == "seed" and seed_checkpoint):
        recipe["model"].setdefault("init_args", {})["init_from"] = ckpt("seed")
    if stage.role == "mixture" and stage.seed:
        # a repeat: another data order and router initialisation; the same documents, split and
        # validation set (data.seed), so every seed's numbers are comparable
        recipe["seed_everything"] = int(recipe.get("seed_everything", 0)) + stage.seed
        recipe["data"]["order_seed"] = int(recipe["data"].get("seed", 1234)) + stage.seed
    return recipe


def fingerprint(composed: dict[str, Any], upstream: list[str]) -> str:
    text = json.dumps({"config": composed, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----- running -----
def _die_with_parent() -> None:
    """Child stages stop when the pipeline process is killed (no orphan keeps training)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_stage_process(config_path: Path) -> int:
    """Run one stage in a child process and return its exit code.

    On Linux the child is forked from this process, which has already imported torch and
    Lightning: that saves the 7-10 s a fresh interpreter spends on imports, for every stage.
    The parent never runs a torch kernel before forking, so the child's OpenMP pool starts clean.
    Elsewhere (no `fork`), a fresh interpreter runs the stage.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        command = [sys.executable, "-m", "bam_lightning.pipeline", "--stage", str(config_path)]
        return subprocess.run(command).returncode
    import bam_lightning.lightning_cli  # noqa: F401  (imported once here, inherited by every forked stage)

    sys.stdout.flush()
    sys.stderr.flush()
    child = multiprocessing.get_context("fork").Process(target=_stage_child, args=(str(config_path),))
    child.start()
    try:
        child.join()
    except BaseException:  # Ctrl-C or a kill of the pipeline: never leave a stage training alone
        child.terminate()
        child.join()
        raise
    return child.exitcode if child.exitcode is not None else 1


def _stage_child(config_path: str) -> None:
    _die_with_parent()
    run_stage(config_path)


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def run_pipeline(path: str, force: bool = False, seeds: list[int] | None = None) -> Path:
    config = load_pipeline_config(path)
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"--seeds: give distinct non-negative mixture seeds, got {seeds}")
        config["seeds"] = list(seeds)
    run_dir = Path(config["run_dir"]).resolve()
    stages = plan(config)
    prints = {}
    started = time.perf_counter()
    for number, stage in enumerate(stages, 1):
        composed = compose_stage(stage, config, run_dir)
        prints[stage.name] = fingerprint(composed, [prints[d] for d in stage.depends])
        label = f"[{number}/{len(stages)}] {stage.name}"
        stage_dir = run_dir / "stages" / stage.name
        done = stage_dir / "stage.json"
        if done.exists() and not force and json.loads(done.read_text()).get("fingerprint") == prints[stage.name]:
            print(f"{label}: done earlier, skipped", flush=True)
            continue
        if stage_dir.exists() and (force or _stored_fingerprint(stage_dir) != prints[stage.name]):
            stale = stage_dir.with_name(stage.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            stage_dir.rename(stale)
            print(f"{label}: config changed, previous outputs moved to {stale}", flush=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "fingerprint").write_text(prints[stage.name])
        config_path = stage_dir / "config.yaml"
        OmegaConf.save(OmegaConf.create(composed), config_path)
        resume = (stage_dir / "checkpoints" / "last.ckpt").exists()
        print(f"{label}: {'resuming' if resume else 'training'} ({stage.role}, "
              f"{composed['trainer']['max_steps']} steps)", flush=True)
        returncode = run_stage_process(config_path)
        if returncode != 0:
            raise SystemExit(failure_message(label, returncode, stage, config_path))
        record = json.loads((stage_dir / "result.json").read_text())
        if composed["trainer"]["max_steps"] > 0:  # a score-only seed (seed_checkpoint) writes none
            check_stage_checkpoint(label, stage_dir / "checkpoints" / "last.ckpt", record["steps"])
        record.update(fingerprint=prints[stage.name], name=stage.name, row=stage.row, role=stage.role,
                      seed=stage.seed, budget=stage.budget)
        write_json_atomic(done, record)
        print(f"{label}: val/avg/ppl {record['final'].get('val/avg/ppl', float('nan')):.3f} "
              f"in {record['wall_time_s']:.0f} s", flush=True)
    from bam_lightning.report import write_report

    report = write_report(run_dir, [json.loads((run_dir / "stages" / s.name / "stage.json").read_text())
                                    for s in stages])
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s; report: {report}", flush=True)
    return report


def failure_message(label: str, returncode: int, stage: Stage, config_path: Path) -> str:
    """Say "re-run to resume" only where a re-run can help (the stage was killed or interrupted);
    for an error, name it and what to fix."""
    error_file = config_path.parent / ERROR_FILE
    if returncode < 0 or not error_file.exists():
        how = f"was stopped by signal {-returncode}" if returncode < 0 else f"stopped (exit {returncode})"
        return (f"{label} {how}. Re-run the same command to resume from its last checkpoint "
                "(finished stages are kept).")
    error = error_file.read_text().strip()
    if error.startswith("KeyboardInterrupt"):
        return f"{label} was interrupted. Re-run the same command to resume from its last checkpoint."
    return (f"{label} failed: {error}\nFix the stage's recipe {stage.recipe} (composed config: {config_path}), "
            "then re-run the same command; finished stages are kept.")


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


def run_stage(config_path: str) -> None:
    """Inside the stage's process: fit (resuming if a last checkpoint exists), validate, record.
    An error is also written to the stage's `error.txt`, for the pipeline's failure line."""
    error_file = Path(config_path).parent / ERROR_FILE
    error_file.unlink(missing_ok=True)
    try:
        _run_stage(config_path)
    except (Exception, KeyboardInterrupt, SystemExit) as error:
        if isinstance(error, SystemExit):
            if error.code not in (0, None):  # the CLI refused the recipe and printed why above
                error_file.write_text(f"the recipe was refused (exit {error.code}); its error is printed above")
        else:
            error_file.write_text(f"{type(error).__name__}: {error}")
        raise


def _run_stage(config_path: str) -> None:
    from bam_lightning.lightning_cli import check_before_fit, run_lightning_cli

    sys.argv = sys.argv[:1]  # the stage's arguments are the config below, not this process's
    cli = run_lightning_cli(["--config", config_path], run=False)
    stage_dir = Path(config_path).parent
    last = stage_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if last.exists() else None
    score_only = cli.trainer.max_steps == 0  # an imported seed (seed_checkpoint): scored, not trained
    if score_only:
        cli.model.load_init_from()
    else:
        check_before_fit(cli.trainer, cli.model, cli.datamodule, ckpt_path)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    metrics_file = next(c for c in cli.trainer.callbacks if type(c).__name__ == "MetricsFile")
    steps = cli.trainer.global_step
    records = read_metrics(metrics_file.path) if metrics_file.path.exists() else []
    final = {k: v for k, v in records[-1].items() if k.startswith("val/")} if records else {}
    if (score_only or not records or records[-1]["step"] != steps or records[-1]["stage"] != "fit" or not final
            or not cli.model.val_document_stats):
        # the fit's last validation was before its last step (or in a killed process, so its
        # per-document sums are lost): score the final weights once more
        final = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    model_config = cli.model.config
    seq_len = cli.datamodule.seq_len
    tokens = steps * trainer_tokens_per_step(cli.trainer, cli.datamodule.batch_size, seq_len)
    total, active = parameter_counts(model_config)
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
    parser.add_argument("recipe", nargs="?", help="pipeline YAML, e.g. recipes/tiny/pipeline.yaml")
    parser.add_argument("--force", action="store_true", help="rerun every stage, even finished ones")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="mixture-phase repeats, overriding the recipe's `seeds` (e.g. --seeds 0 1 2); "
                             "seed 0's stages and the dense stages are shared, so finished ones are reused")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one composed stage
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args.stage)
    elif args.recipe:
        run_pipeline(args.recipe, force=args.force, seeds=args.seeds)
    else:
        parser.error("give a pipeline recipe, e.g. `bam pipeline recipes/tiny/pipeline.yaml`")


if __name__ == "__main__":
    main()
