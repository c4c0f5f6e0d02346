"""The study's report: a Table-1-shaped markdown table, CSV/JSON, and PNG charts.

Rows with several mixture seeds show mean +- sample standard deviation; BAM-vs-BTX gets a paired
margin per seed, since seeds share data order and router initialisation across methods.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path
from typing import Any

from bam_lightning.callbacks.metrics_file import read_metrics

ROW_LABELS = {
    "seed": "seed",
    "btx": "BTX",
    "bam": "BAM DM Expert-KV",
    "bam_cm": "BAM CM Expert-KV",
    "bam_shared_kv": "BAM DM Shared-KV",
    "bam_shared_kv_cm": "BAM CM Shared-KV",
    "sparse": "sparse upcycling",
    "btx_param_matched": "BTX parameter-matched",
    "dense_baseline": "dense baseline (seed, continued)",
}


def label(row: str) -> str:
    if row.startswith("expert_"):
        return f"{row.removeprefix('expert_')} expert (dense)"
    return ROW_LABELS.get(row, row)


def domains_of(records: list[dict[str, Any]]) -> list[str]:
    names = []
    for key in records[0]["final"]:
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "ppl" and parts[1] != "avg" and parts[1] not in names:
            names.append(parts[1])
    return names


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per report row (mean and spread over mixture seeds), in stage order."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        rows.setdefault(record["row"], []).append(record)
    domains = domains_of(records)
    table = []
    for row, group in rows.items():
        entry: dict[str, Any] = {"row": row, "label": label(row), "n_seeds": len(group)}
        for name in [*domains, "avg"]:
            values = [r["final"][f"val/{name}/ppl"] for r in group]
            entry[f"{name}_ppl"] = statistics.fmean(values)
            entry[f"{name}_ppl_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for key in ("params_total", "params_active", "training_flops", "tokens", "steps"):
            entry[key] = group[0][key]
        entry["wall_time_s"] = statistics.fmean(r["wall_time_s"] for r in group)
        table.append(entry)
    return table


def paired_margin(records: list[dict[str, Any]], row: str, reference: str = "btx") -> dict[str, float] | None:
    """avg-ppl(row) - avg-ppl(reference) per mixture seed: mean, sd and how often row wins."""
    by_seed = {}
    for record in records:
        if record["row"] in (row, reference):
            by_seed.setdefault(record["seed"], {})[record["row"]] = record["final"]["val/avg/ppl"]
    margins = [v[row] - v[reference] for v in by_seed.values() if row in v and reference in v]
    if not margins:
        return None
    return {"mean": statistics.fmean(margins), "sd": statistics.stdev(margins) if len(margins) > 1 else 0.0,
            "wins": sum(m < 0 for m in margins), "seeds": len(margins)}


def _format(value: float, spread: float, n: int) -> str:
    return f"{value:.3f} ± {spread:.3f}" if n > 1 else f"{value:.3f}"


def markdown_table(table: list[dict[str, Any]], domains: list[str]) -> str:
    header = ["model", *domains, "Avg", "params (total)", "params (active)", "train FLOPs", "tokens", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in table:
        cells = [e["label"]] + [_format(e[f"{d}_ppl"], e[f"{d}_ppl_std"], e["n_seeds"]) for d in [*domains, "avg"]]
        cells += [f"{e['params_total'] / 1e6:.2f}M", f"{e['params_active'] / 1e6:.2f}M",
                  f"{e['training_flops']:.2e}", f"{e['tokens'] / 1e6:.2f}M", f"{e['wall_time_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir: Path, records: list[dict[str, Any]]) -> Path:
    run_dir = Path(run_dir)
    domains = domains_of(records)
    table = summarise(records)
    margins = {row: paired_margin(records, row) for row in ("bam", "bam_shared_kv", "bam_cm", "bam_shared_kv_cm")}
    margins = {row: m for row, m in margins.items() if m is not None}
    _write_atomic(run_dir / "results.json", json.dumps({"rows": table, "stages": records, "paired_margins_vs_btx": margins},
                                                       indent=2, sort_keys=True))
    tmp_csv = run_dir / ".results.csv.tmp"
    with tmp_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    os.replace(tmp_csv, run_dir / "results.csv")
    charts = write_charts(run_dir, table, domains, records)

    lines = ["# BAM study report", "",
             "Per-domain validation perplexity (lower is better), per token of the study's tokenizer.",
             "DM: data-matched (every mixture sees the same tokens); CM: compute-matched "
             "(BAM's steps cut so its training FLOPs equal BTX's; its warm-up is cut in the same "
             "proportion, so warm-up is the same share of every run).", "",
             markdown_table(table, domains), ""]
    if margins:
        lines += ["## Paired margins against BTX (average perplexity, negative = better than BTX)", ""]
        for row, m in margins.items():
            lines.append(f"- {label(row)}: {m['mean']:+.3f} (sd {m['sd']:.3f}), better than BTX in "
                         f"{m['wins']} of {m['seeds']} seed(s)")
        lines.append("")
    lines += ["## Charts", ""] + [f"![{c.stem}]({c.name})" for c in charts]
    lines += ["", f"TensorBoard: `tensorboard --logdir {run_dir / 'tensorboard'}`", ""]
    report = run_dir / "report.md"
    _write_atomic(report, "\n".join(lines))
    return report


def write_charts(run_dir: Path, table: list[dict[str, Any]], domains: list[str],
                 records: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = run_dir / "perplexity_by_domain.png"
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(table)), 4.5))
    width = 0.8 / (len(domains) + 1)
    for i, name in enumerate([*domains, "avg"]):
        xs = [j + i * width for j in range(len(table))]
        ax.bar(xs, [e[f"{name}_ppl"] for e in table], width, yerr=[e[f"{name}_ppl_std"] for e in table], label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(table))], [e["label"] for e in table], rotation=30, ha="right")
    ax.set_ylabel("validation perplexity")
    ax.legend(ncol=len(domains) + 1, fontsize=8)
    fig.tight_layout()
    _save_figure(fig, bars)

    # two panels: the seed's first validation (about the vocabulary size) would flatten the rest
    curves = run_dir / "validation_curves.png"
    fig, (dense_ax, mixture_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("tab20").colors
    for number, record in enumerate(records):
        path = run_dir / "stages" / record["name"] / "metrics.jsonl"
        points = [(p["step"], p["val/avg/ppl"]) for p in read_metrics(path) if p.get("stage") == "fit" and "val/avg/ppl" in p] \
            if path.exists() else []
        if points:
            ax = mixture_ax if record.get("role") == "mixture" else dense_ax
            ax.plot(*zip(*points, strict=True), label=record["name"], marker=".",
                    color=colours[number % len(colours)], linestyle=("-", "--", ":")[record.get("seed", 0) % 3])
    for ax, title in ((dense_ax, "seed, experts, dense baseline"), (mixture_ax, "mixtures")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step within stage")
        ax.set_ylabel("val/avg/ppl")
        ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save_figure(fig, curves)
    plt.close("all")
    return [bars, curves]


def _save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
