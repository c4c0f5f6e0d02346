"""A study file: the whole BAM study declared once, composed into one `bam fit` recipe per stage.

Each fact is said once: the domains, tokenizer, sequence length and validation size (`data`),
the dense shape (`model`), the seed (a budget, or an existing dense checkpoint), the experts
(by default one per domain other than the seed's), the mixture methods and their budget, the
compute-matched rows, an optional sweep over the mixture length, the dense baseline, the seeds.
What follows from those is derived, never typed: the number of FFN and attention experts, the
upcycling sources (the seed, then the experts in domain order), the validation domains (all of
them, for every stage), `attn_shared_kv`. `overrides` changes any field of any stage.

`load_study` turns the file into the pipeline's plan input (recipes as dicts instead of paths);
`bam pipeline` then writes each stage's composed recipe under `<run_dir>/stages/<name>/`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bam_lightning.config import ModelConfig
from bam_lightning.errors import UserError
from bam_lightning.lit import BaseLM

DEFAULT_WARMUP_STEPS = inspect.signature(BaseLM.__init__).parameters["warmup_steps"].default

STUDY_KEYS = {"run_dir", "seeds", "checkpoint_every_n_steps", "seed_everything", "data", "trainer", "model",
              "optimizer", "seed", "experts", "mixtures", "dense_baseline", "overrides", "eval"}
SEED_KEYS = {"domain", "train_weights", "steps", "val_check_interval", "lr", "warmup_steps", "checkpoint"}
EXPERT_KEYS = {"domains", "train_weights", "steps", "val_check_interval", "lr", "warmup_steps"}
MIXTURE_KEYS = {"methods", "train_weights", "steps", "val_check_interval", "lr", "warmup_steps", "router",
                "compute_matched", "sweep"}
# method -> how its mixture config follows from N sources (the seed plus the experts):
#   upcycle: UpcyclingCallback method; attention: one attention expert per source (BAM);
#   shared_kv: BAM Shared-KV; extra_experts: FFN copies of the seed past the N sources, with ffn_top_k.
METHODS: dict[str, dict[str, Any]] = {
    "btx": {"upcycle": "btx", "attention": False},
    "bam": {"upcycle": "bam", "attention": True, "shared_kv": False},
    "bam_shared_kv": {"upcycle": "bam_shared_kv", "attention": True, "shared_kv": True},
    "sparse": {"upcycle": "sparse", "attention": False},
    # BTX with two more FFN experts (copies of the seed's) at top-2: near BAM's total and active parameters
    "btx_param_matched": {"upcycle": "btx", "attention": False, "extra_experts": 2, "ffn_top_k": 2},
}
# placeholders in an expert's train_weights
OWN, SEED = "own", "seed"


class StudyError(UserError):
    """A study file that cannot be composed; the message names the file and the field."""


def is_study(config: dict[str, Any]) -> bool:
    """A study file has a `data` section; an old pipeline file names recipe files only."""
    return "data" in config or "model" in config


def load_study(path: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pipeline config of a study file: `seed`, `experts`, `mixtures`, `dense_baseline` hold
    composed recipe dicts (or `seed: {"checkpoint": path}`), `sweep` maps a length to recipes."""
    if config is None:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    err = _errors(path)
    unknown = sorted(set(config) - STUDY_KEYS)
    if unknown:
        raise err("", f"unknown keys {unknown}; known: {sorted(STUDY_KEYS)}")
    for key in ("run_dir", "data", "model", "seed", "mixtures"):
        if key not in config:
            raise err(key, "missing")
    data = _mapping(config, "data", err)
    domains = list(_mapping(data, "domains", err, "data.domains"))
    if not domains:
        raise err("data.domains", "name at least one domain")
    for key in ("train_weights", "val_domains"):
        if key in data:
            raise err(f"data.{key}", "is derived per stage (train_weights: seed/experts/mixtures; validation: "
                                     "every domain), do not set it here")
    seed = _mapping(config, "seed", err)
    _known(seed, SEED_KEYS, "seed", err)
    experts_cfg = _mapping(config, "experts", err) if config.get("experts") is not None else {}
    _known(experts_cfg, EXPERT_KEYS, "experts", err)
    mixtures = _mapping(config, "mixtures", err)
    _known(mixtures, MIXTURE_KEYS, "mixtures", err)

    seed_domain = seed.get("domain")
    if seed_domain not in domains:
        raise err("seed.domain", f"{seed_domain!r} is not one of data.domains {domains}")
    for placeholder in (OWN, SEED):
        if placeholder in domains:
            raise err("data.domains", f"{placeholder!r} is reserved (experts.train_weights uses it for the "
                                      "expert's own / the seed's domain); rename that domain")
    expert_domains = experts_cfg.get("domains", [d for d in domains if d != seed_domain])
    if not isinstance(expert_domains, list) or len(set(expert_domains)) != len(expert_domains):
        raise err("experts.domains", f"a list of distinct domains, got {expert_domains!r}")
    for domain in expert_domains:
        if domain not in domains:
            raise err("experts.domains", f"expert for {domain!r}, which is not one of data.domains {domains}")
        if domain == seed_domain:
            raise err("experts.domains", f"{domain!r} is the seed's domain (expert 0)")

    methods = mixtures.get("methods")
    if not isinstance(methods, list) or not methods:
        raise err("mixtures.methods", f"a list of methods from {sorted(METHODS)}, got {methods!r}")
    for method in methods:
        if method not in METHODS:
            raise err("mixtures.methods", f"unknown method {method!r}; known: {sorted(METHODS)}")
    if len(set(methods)) != len(methods):
        raise err("mixtures.methods", f"a method is named twice: {methods}")
    matched = mixtures.get("compute_matched") or {}
    if matched:
        if matched.get("reference") not in methods:
            raise err("mixtures.compute_matched.reference",
                      f"{matched.get('reference')!r} is not run (mixtures.methods: {methods})")
        for method in matched.get("methods", []):
            if method not in methods:
                raise err("mixtures.compute_matched.methods", f"{method!r} is not run (mixtures.methods: {methods})")
    fields = {field.name for field in dataclasses.fields(ModelConfig)}
    derived = {"n_experts", "attn_experts", "attn_shared_kv"}  # from the methods and the sources
    for where, section in (("model", config.get("model") or {}), ("mixtures.router", mixtures.get("router") or {})):
        for key in section:
            if key in derived:
                raise err(f"{where}.{key}", "derived from mixtures.methods and the experts; do not set it")
            if key not in fields:
                raise err(f"{where}.{key}", f"not a model field; known: {sorted(fields - derived)}")
    sweep = mixtures.get("sweep") or []
    if not isinstance(sweep, list) or not all(_positive_int(s) for s in sweep) or len(set(sweep)) != len(sweep):
        raise err("mixtures.sweep", f"a list of distinct positive step counts, got {sweep!r}")
    if sweep and not matched:
        raise err("mixtures.sweep", "compares against mixtures.compute_matched.reference: set compute_matched")

    overrides = config.get("overrides") or {}
    stage_names = {"seed", "dense_baseline", *(f"expert_{d}" for d in expert_domains), *methods}
    for key in overrides:
        if key not in stage_names:
            raise err(f"overrides.{key}", f"names no stage or method; known: {sorted(stage_names)}")

    build = _Builder(config, err, domains, overrides)
    sources = ["seed", *(f"expert_{d}" for d in expert_domains)]
    out: dict[str, Any] = {key: config[key] for key in ("run_dir", "seeds", "checkpoint_every_n_steps")
                           if key in config}
    if seed.get("checkpoint") is not None:
        extra = sorted(set(seed) - {"checkpoint", "domain"})
        if extra:
            raise err("seed", f"an existing checkpoint seed trains nothing: remove {extra}")
        out["seed"] = {"checkpoint": str(seed["checkpoint"])}
    else:
        out["seed"] = build.dense("seed", seed, build.weights(seed, "seed", seed_domain, None))
    out["experts"] = {d: build.dense(f"expert_{d}", experts_cfg, build.weights(experts_cfg, "experts", seed_domain, d))
                      for d in expert_domains}
    mixture_weights = build.weights(mixtures, "mixtures", seed_domain, None)
    out["warnings"] = [
        *left_out_domains(path, "seed", seed, domains, seed.get("checkpoint") is None),
        *left_out_domains(path, "mixtures", mixtures, domains, True)]
    steps = _steps(mixtures, "mixtures", err)
    out["mixtures"] = {m: build.mixture(m, mixtures, mixture_weights, len(sources), steps) for m in methods}
    out["compute_matched"] = dict(matched)
    if sweep:
        swept = [matched["reference"], *matched.get("methods", [])]
        out["sweep"] = {length: {m: build.mixture(m, mixtures, mixture_weights, len(sources), length) for m in swept}
                        for length in sweep if length != steps}
    if config.get("dense_baseline"):
        out["dense_baseline"] = build.dense("dense_baseline", mixtures, mixture_weights)
    out["study"] = {"domains": domains, "sources": sources, "seed_domain": seed_domain, "path": str(path)}
    if config.get("eval") is not None:  # downstream accuracy of every model (bam_lightning/eval/study.py)
        from bam_lightning.eval.study import check_eval_section

        out["eval"] = check_eval_section(config["eval"], f"{path}: eval")
    return out


def left_out_domains(path: str, where: str, section: dict[str, Any], domains: list[str], trains: bool) -> list[str]:
    """A warning naming the domains an explicit `train_weights` mapping leaves out (they train
    with weight 0). A warning, not an error: weight 0 is a legitimate choice (a domain only
    validated on), and the study still runs as written; `<domain>: 0` states it and silences
    this. Experts are not checked: their mapping is about their own domain by design."""
    weights = section.get("train_weights", "equal")
    if not trains or not isinstance(weights, dict):
        return []
    missing = [d for d in domains if d not in weights]
    if not missing:
        return []
    return [f"{path}: {where}.train_weights leaves out {', '.join(map(repr, missing))}: the {where} stage(s) "
            f"train on {'it' if len(missing) == 1 else 'them'} with weight 0 (validation still covers every "
            f"domain); give {'it' if len(missing) == 1 else 'each'} a share, or write "
            f"`{missing[0]}: 0` to say so"]


# ----- composing -----
class _Builder:
    def __init__(self, config: dict[str, Any], err, domains: list[str], overrides: dict[str, Any]):
        self.config, self.err, self.domains, self.overrides = config, err, domains, overrides

    def weights(self, section: dict[str, Any], where: str, seed_domain: str, own: str | None) -> dict[str, float]:
        weights = section.get("train_weights", "equal")
        if weights == "equal":
            return {d: 1.0 / len(self.domains) for d in self.domains}
        if not isinstance(weights, dict) or not weights:
            raise self.err(f"{where}.train_weights", f"'equal' or a mapping domain -> share, got {weights!r}")
        out = {}
        for name, share in weights.items():
            domain = {OWN: own, SEED: seed_domain}.get(name, name) if own is not None else name
            if domain not in self.domains:
                raise self.err(f"{where}.train_weights", f"{name!r} is not one of data.domains {self.domains}"
                               + (f" (or {OWN!r}, {SEED!r})" if own is not None else ""))
            if domain in out:
                raise self.err(f"{where}.train_weights", f"{domain!r} is named twice")
            out[domain] = share
        return out

    def base(self, name: str, section: dict[str, Any], where: str, weights: dict[str, float],
             model_class: str, model_config: dict[str, Any], steps: int) -> dict[str, Any]:
        trainer = copy.deepcopy(self.config.get("trainer") or {})
        if "max_steps" in trainer:
            raise self.err("trainer.max_steps", "is per stage: set seed.steps, experts.steps, mixtures.steps")
        trainer["max_steps"] = steps
        trainer["val_check_interval"] = section.get("val_check_interval", steps)
        init_args = {**copy.deepcopy(self.config.get("optimizer") or {}),
                     **{k: section[k] for k in ("lr", "warmup_steps") if k in section},
                     "config": model_config}
        recipe = {"trainer": trainer, "model": {"class_path": f"bam_lightning.lit.{model_class}", "init_args": init_args},
                  "data": {**copy.deepcopy(self.config["data"]), "train_weights": weights}}
        if "seed_everything" in self.config:
            recipe = {"seed_everything": self.config["seed_everything"], **recipe}
        return recipe

    def finish(self, name: str, recipe: dict[str, Any], *keys: str) -> dict[str, Any]:
        for key in keys:
            if key in self.overrides:
                recipe = apply_overrides(recipe, self.overrides[key], f"overrides.{key}", self.err)
        return recipe

    def dense(self, name: str, section: dict[str, Any], weights: dict[str, float]):
        steps = _steps(section, name if name == "seed" else ("experts" if name.startswith("expert_") else "mixtures"),
                       self.err)
        # experts and the dense baseline start from the seed: the pipeline sets init_from
        recipe = self.base(name, section, name, weights, "DenseLM", copy.deepcopy(self.config["model"]), steps)
        return self.finish(name, recipe, name)

    def mixture(self, method: str, section: dict[str, Any], weights: dict[str, float], n_sources: int,
                steps: int) -> dict[str, Any]:
        spec = METHODS[method]
        base_steps = _steps(section, "mixtures", self.err)
        model_config = {**copy.deepcopy(self.config["model"]), **copy.deepcopy(section.get("router") or {})}
        model_config["n_experts"] = n_sources + spec.get("extra_experts", 0)
        if "ffn_top_k" in spec:
            model_config["ffn_top_k"] = spec["ffn_top_k"]
        model_config["attn_experts"] = n_sources if spec["attention"] else 0
        model_config["attn_shared_kv"] = spec.get("shared_kv", False)
        recipe = self.base(method, section, "mixtures", weights, "MoELM", model_config, steps)
        recipe["trainer"].setdefault("callbacks", []).append({
            "class_path": "bam_lightning.callbacks.UpcyclingCallback",
            "init_args": {"method": spec["upcycle"], "sources": [], "seed_index": 0, "router_seed": 0}})
        recipe = self.finish(method, recipe, method)
        if steps != base_steps:
            # a sweep length: validation and warm-up keep their share of the run. The effective values
            # are scaled (after the method's overrides; the model's default warm-up when none is set),
            # or a short run would never leave its warm-up and a long one would barely have one.
            trainer, init_args = recipe["trainer"], recipe["model"].setdefault("init_args", {})
            trainer["val_check_interval"] = max(1, round(trainer["val_check_interval"] * steps / base_steps))
            warmup = init_args.get("warmup_steps", DEFAULT_WARMUP_STEPS)
            init_args["warmup_steps"] = round(int(warmup) * steps / base_steps)
        return recipe


def apply_overrides(recipe: dict[str, Any], overrides: dict[str, Any], where: str, err) -> dict[str, Any]:
    """Deep-merge `overrides` (nested mappings; a dotted key is a path) into a copy of `recipe`."""
    if not isinstance(overrides, dict):
        raise err(where, f"a mapping of recipe fields, got {overrides!r}")
    recipe = copy.deepcopy(recipe)
    for key, value in overrides.items():
        *parents, leaf = str(key).split(".")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise err(f"{where}.{key}", f"{part!r} is not a mapping in the stage's recipe")
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = apply_overrides(node[leaf], value, f"{where}.{key}", err)
        else:
            node[leaf] = copy.deepcopy(value)
    return recipe


def _errors(path: str):
    def err(field: str, message: str) -> StudyError:
        return StudyError(f"{path}: {field + ': ' if field else ''}{message}")
    return err


def _mapping(config: dict[str, Any], key: str, err, where: str | None = None) -> dict[str, Any]:
    value = config.get(key)
    if not isinstance(value, dict):
        raise err(where or key, f"a mapping, got {value!r}")
    return value


def _known(section: dict[str, Any], known: set[str], where: str, err) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        raise err(where, f"unknown keys {unknown}; known: {sorted(known)}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _steps(section: dict[str, Any], where: str, err) -> int:
    steps = section.get("steps")
    if not _positive_int(steps):
        raise err(f"{where}.steps", f"a positive number of optimizer steps, got {steps!r}")
    return steps


def load_yaml(path: str, resolve: bool = True) -> Any:
    """A YAML file as plain containers; a key given twice is an error naming its dotted path
    (YAML would otherwise keep one of the two silently, or fail naming only a line).
    `resolve=False` keeps `${...}` interpolations as written (see `resolve_interpolations`)."""
    import yaml

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=resolve)
    except yaml.constructor.ConstructorError as error:
        if error.problem_mark is None or "duplicate key" not in str(error.problem):
            raise
        lines = Path(path).read_text().splitlines()
        line = error.problem_mark.line
        parts = [lines[line].split(":")[0].strip()]
        indent = len(lines[line]) - len(lines[line].lstrip())
        for text in reversed(lines[:line]):
            stripped = text.lstrip()
            if stripped and not stripped.startswith("#") and len(text) - len(stripped) < indent:
                indent = len(text) - len(stripped)
                parts.insert(0, stripped.split(":")[0].strip())
        raise StudyError(f"{path}: {'.'.join(parts)}: named twice (line {line + 1})") from None


def resolve_interpolations(path: str, config: dict[str, Any]) -> dict[str, Any]:
    """Resolve `${...}` after `--set` changed the file's values, as if the file said them."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except OmegaConfBaseException as error:
        raise StudyError(f"{path}: {error}".splitlines()[0]) from None


def recipe_path_or_dict(recipe: str | dict[str, Any]) -> dict[str, Any]:
    """A stage recipe: a file (old pipeline format) or a dict composed from a study file."""
    if isinstance(recipe, dict):
        return copy.deepcopy(recipe)
    return OmegaConf.to_container(OmegaConf.load(Path(recipe)), resolve=True)
