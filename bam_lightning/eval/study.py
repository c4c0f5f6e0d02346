"""Downstream accuracy in a study: the `eval:` section, one resumable evaluation per model, and
the report's Table-3-shaped section.

    eval:
      tasks: [reasoning, knowledge, math, mmlu]   # task names or categories (see `bam eval --help`)
      num_fewshot: null                           # null: each task's own (0; mmlu 5)
      limit: 200                                  # first N items of each task (null: all)
      batch_size: 16

Each model's result is `run_dir/eval/<stage>.json`, reused while its checkpoint's stage
fingerprint and the `eval:` section are unchanged (an interrupted study redoes only what is
missing). Margins against BTX are paired over items: the same questions, resampled together.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from bam_lightning.errors import UserError

EVAL_KEYS = {"tasks", "num_fewshot", "limit", "batch_size"}
BOOTSTRAP_SAMPLES = 2000


def check_eval_section(section: Any, where: str = "eval") -> dict[str, Any]:
    """The study's `eval:` section, checked before any stage runs (task names included)."""
    from bam_lightning.eval.tasks import expand

    if not isinstance(section, dict):
        raise UserError(f"{where}: a mapping of {sorted(EVAL_KEYS)}, got {section!r}")
    unknown = sorted(set(section) - EVAL_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown}; known: {sorted(EVAL_KEYS)}")
    tasks = section.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise UserError(f"{where}.tasks: a list of task names or categories, got {tasks!r}")
    try:
        expand(tasks)
    except UserError as error:
        raise UserError(f"{where}.tasks: {error}") from error
    for key, low in (("num_fewshot", 0), ("limit", 1), ("batch_size", 1)):
        value = section.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise UserError(f"{where}.{key}: an integer >= {low} (or null), got {value!r}")
    return {"tasks": list(tasks), "num_fewshot": section.get("num_fewshot"), "limit": section.get("limit"),
            "batch_size": section.get("batch_size") or 16}


def checkpoint_of(run_dir: Path, record: dict[str, Any]) -> Path:
    return Path(record.get("checkpoint") or run_dir / "stages" / record["name"] / "checkpoints" / "last.ckpt")


def run_evaluations(run_dir: Path, records: list[dict[str, Any]], section: dict[str, Any],
                    log=print) -> dict[str, dict[str, Any]]:
    """stage name -> `bam eval` summary, evaluating only what is missing or stale."""
    from bam_lightning.eval.command import evaluate_checkpoint, write_json

    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for number, record in enumerate(records, 1):
        name = record["name"]
        path = out_dir / f"{name}.json"
        key = hashlib.sha256(json.dumps([section, record.get("fingerprint"), str(checkpoint_of(run_dir, record))],
                                        sort_keys=True).encode()).hexdigest()[:16]
        if path.is_file() and json.loads(path.read_text()).get("bam", {}).get("study_key") == key:
            log(f"[eval {number}/{len(records)}] {name}: done earlier, skipped")
            results[name] = json.loads(path.read_text())
            continue
        log(f"[eval {number}/{len(records)}] {name}: {', '.join(section['tasks'])}")
        summary = evaluate_checkpoint(checkpoint_of(run_dir, record), section["tasks"], limit=section["limit"],
                                      num_fewshot=section["num_fewshot"], batch_size=section["batch_size"],
                                      progress=False)
        summary["bam"]["study_key"] = key
        write_json(summary, path)
        scores = ", ".join(f"{category} {100 * value:.1f}" for category, value in summary["categories"].items())
        items = sum(len(v) for v in summary["items"].values())
        log(f"[eval {number}/{len(records)}] {name}: {scores or 'no complete category'}; {items} items in "
            f"{summary['bam']['seconds']:.0f} s ({summary['bam']['items_per_second']:.1f} items/s)")
        log_to_tensorboard(Path(run_dir) / "tensorboard" / name / "eval", summary, record.get("steps") or 0)
        results[name] = summary
    return results


def log_to_tensorboard(folder: Path, summary: dict[str, Any], step: int) -> None:
    """`eval/<task>/<metric>` and `eval/category/<name>` scalars beside the stage's training logs."""
    from torch.utils.tensorboard import SummaryWriter

    from bam_lightning.eval.command import SCORE_KEYS, metric_value

    writer = SummaryWriter(str(folder))
    try:
        for task, values in summary["results"].items():
            for metric in SCORE_KEYS:
                found = metric_value(values, metric)
                if found:
                    writer.add_scalar(f"eval/{task}/{metric}", found[1], step)
        for category, value in summary.get("categories", {}).items():
            writer.add_scalar(f"eval/category/{category}", value, step)
    finally:
        writer.close()


def item_scores(summary: dict[str, Any]) -> dict[tuple[str, int], float]:
    """(task, doc_id) -> the item's score on its task's primary metric (acc, or exact match for
    generative tasks), for every task the summary holds."""
    from bam_lightning.eval.tasks import primary_metric

    scores = {}
    for task, items in summary["items"].items():
        for item in items:
            metric = next((m for m in (primary_metric(task), "acc", "exact_match") if m in item), None)
            if metric is not None:
                scores[(task, item["doc_id"])] = item[metric]
    return scores


def paired_interval(row: dict[str, Any], reference: dict[str, Any], samples: int = BOOTSTRAP_SAMPLES,
                    seed: int = 0) -> tuple[float, float, float, int]:
    """(margin, low, high, items): mean item score of `row` minus `reference` over the items both
    scored, and its 95% percentile interval when items are resampled together."""
    a, b = item_scores(row), item_scores(reference)
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("no items in common")
    diff = np.array([a[k] - b[k] for k in keys])
    draws = np.random.default_rng(seed).integers(0, len(diff), size=(samples, len(diff)))
    means = diff[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high), len(keys)


def report_lines(records: list[dict[str, Any]], results: dict[str, dict[str, Any]]) -> list[str]:
    """The Table-3-shaped section: rows seed, experts, mixtures (mean over mixture seeds); columns
    the categories and their average (accuracy %); then paired margins against BTX."""
    from bam_lightning.eval.tasks import CATEGORIES, NO_OFFLINE_DATA
    from bam_lightning.report import label  # the perplexity table's row names

    rows: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["name"] in results:
            rows.setdefault(record["row"], []).append(results[record["name"]])
    categories = [c for c in CATEGORIES if any(c in s.get("categories", {}) for r in rows.values() for s in r)]
    columns = [*categories, "average"]
    lines = ["## Downstream accuracy (lm-evaluation-harness, offline benchmarks)", "",
             "Accuracy in % (exact match for generative tasks), per category of the paper's Table 3; a row "
             "with several mixture seeds shows their mean. " + " ".join(f"{c.capitalize()}: {why}."
                                                                       for c, why in NO_OFFLINE_DATA.items()), "",
             "| model | " + " | ".join(c.capitalize() for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for row, summaries in rows.items():
        cells = []
        for column in columns:
            values = [s["categories"][column] for s in summaries if column in s.get("categories", {})]
            cells.append(f"{100 * statistics.fmean(values):.2f}" if values else "")
        lines.append(f"| {label(row)} | " + " | ".join(cells) + " |")
    lines.append("")
    btx = {r["seed"]: results[r["name"]] for r in records if r["row"] == "btx" and r["name"] in results}
    margin_rows = [r for r in records if r.get("role") == "mixture" and r["row"] != "btx" and r["name"] in results]
    if btx and margin_rows:
        lines += ["Margins against BTX over the items both scored (all category tasks pooled, percentage points): "
                  "95% paired bootstrap interval over items, and the spread over mixture seeds.", ""]
        unresolved = []
        by_row: dict[str, list[tuple[float, float, float, int]]] = {}
        for record in margin_rows:
            if record["seed"] in btx:
                by_row.setdefault(record["row"], []).append(paired_interval(results[record["name"]],
                                                                            btx[record["seed"]]))
        for row, margins in by_row.items():
            mean = statistics.fmean(m[0] for m in margins)
            sd = statistics.stdev(m[0] for m in margins) if len(margins) > 1 else None
            low, high = min(m[1] for m in margins), max(m[2] for m in margins)
            spread = f"seed sd {100 * sd:.2f} over {len(margins)} seeds" if sd is not None else "one seed: no seed spread"
            lines.append(f"- {label(row)} - BTX: {100 * mean:+.2f} (items interval [{100 * low:+.2f}, {100 * high:+.2f}], "
                         f"{margins[0][3]} items; {spread})")
            if low <= 0 <= high:
                unresolved.append(f"{label(row)} vs BTX: the item interval contains 0")
            elif sd is not None and abs(mean) <= sd:
                unresolved.append(f"{label(row)} vs BTX: the margin is within one seed sd")
        lines += ["", "Differences these numbers cannot resolve: " + ("none." if not unresolved else "")]
        lines += [f"- {reason}" for reason in unresolved]
        lines.append("")
    return lines


def append_to_report(report: Path, lines: list[str]) -> None:
    """Add the section to the report written by `report.write_report` (atomically)."""
    text = report.read_text().rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    tmp = report.with_name(f".{report.name}.tmp")
    tmp.write_text(text)
    tmp.replace(report)
