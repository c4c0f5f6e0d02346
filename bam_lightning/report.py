"""The study's report: a Table-1-shaped markdown table, CSV/JSON, and PNG charts.

Rows with several mixture seeds show mean +- sample standard deviation (one seed: no spread is
shown, there is none to show); BAM-vs-BTX gets a paired margin per seed, since seeds share data
order and router initialisation across methods. Next to that seed spread, each margin gets an
evaluation-sampling interval: a paired bootstrap over validation documents (the same resampled
documents for both models and every seed), from the per-document sums every stage records.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np

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
            entry[f"{name}_ppl_std"] = statistics.stdev(values) if len(values) > 1 else None
        for key in ("params_total", "params_active", "training_flops", "tokens", "steps"):
            entry[key] = group[0][key]
        entry["wall_time_s"] = statistics.fmean(r["wall_time_s"] for r in group)
        table.append(entry)
    return table


BOOTSTRAP_SAMPLES = 2000


def paired_margin(records: list[dict[str, Any]], row: str, reference: str = "btx") -> dict[str, Any] | None:
    """avg-ppl(row) - avg-ppl(reference) per mixture seed: mean, sd (None with one seed), how often
    row wins, and the evaluation-sampling interval of the mean (None without per-document data)."""
    pairs: dict[int, dict[str, dict[str, Any]]] = {}
    for record in records:
        if record["row"] in (row, reference):
            pairs.setdefault(record["seed"], {})[record["row"]] = record
    pairs = {seed: p for seed, p in pairs.items() if row in p and reference in p}
    if not pairs:
        return None
    margins = [p[row]["final"]["val/avg/ppl"] - p[reference]["final"]["val/avg/ppl"] for p in pairs.values()]
    interval = evaluation_interval([(p[row], p[reference]) for p in pairs.values()])
    return {"mean": statistics.fmean(margins), "sd": statistics.stdev(margins) if len(margins) > 1 else None,
            "wins": sum(m < 0 for m in margins), "seeds": len(margins),
            "eval_interval": interval["interval"] if interval else None,
            "val_documents": interval["documents"] if interval else None}


def evaluation_interval(pairs: list[tuple[dict[str, Any], dict[str, Any]]], samples: int = BOOTSTRAP_SAMPLES,
                        seed: int = 0) -> dict[str, Any] | None:
    """95% percentile interval of the seed-mean avg-ppl margin when the validation documents of
    each domain are resampled with replacement (the same draw for both models and all seeds)."""
    if any("val_documents" not in r or not r["val_documents"] for pair in pairs for r in pair):
        return None
    domains = list(pairs[0][1]["val_documents"])
    rng = np.random.default_rng(seed)
    margins = np.zeros(samples)
    documents = 0
    for domain in domains:
        ids = pairs[0][1]["val_documents"][domain]["document"]
        for pair in pairs:
            for record in pair:
                if record["val_documents"].get(domain, {}).get("document") != ids:
                    raise ValueError(f"stage {record.get('name', record['row'])}: validation documents of "
                                     f"{domain!r} differ from the reference's; the margin is not paired")
        documents += len(ids)
        draws = rng.integers(0, len(ids), size=(samples, len(ids)))
        weights = np.stack([np.bincount(d, minlength=len(ids)) for d in draws]).astype(np.float64)
        for row_record, reference_record in pairs:
            ppl = []
            for record in (row_record, reference_record):
                stats = record["val_documents"][domain]
                ppl.append(np.exp(weights @ np.asarray(stats["loss_sum"]) / (weights @ np.asarray(stats["tokens"]))))
            margins += (ppl[0] - ppl[1]) / len(domains) / len(pairs)
    low, high = np.percentile(margins, [2.5, 97.5])
    return {"interval": [float(low), float(high)], "documents": documents}


def margin_line(row: str, m: dict[str, Any]) -> str:
    spread = f"seed sd {m['sd']:.3f} over {m['seeds']} seeds" if m["sd"] is not None else "one seed: no seed spread"
    if m["eval_interval"] is not None:
        low, high = m["eval_interval"]
        evaluation = f"evaluation-sampling 95% interval [{low:+.3f}, {high:+.3f}] over {m['val_documents']} documents"
    else:
        evaluation = "no per-document validation results: evaluation-sampling interval unknown"
    return (f"- {label(row)}: {m['mean']:+.3f} ({spread}; {evaluation}), better than BTX in "
            f"{m['wins']} of {m['seeds']} seed(s)")


def unresolved_reasons(m: dict[str, Any]) -> list[str]:
    """Why a margin's sign is not established (empty when it is)."""
    reasons = []
    if m["eval_interval"] is None:
        reasons.append("no evaluation-sampling interval")
    elif m["eval_interval"][0] <= 0 <= m["eval_interval"][1]:
        reasons.append("its evaluation-sampling interval contains 0")
    if m["seeds"] < 2:
        reasons.append("one seed only")
    elif 0 < m["wins"] < m["seeds"]:
        reasons.append(f"the sign changes between seeds ({m['wins']} of {m['seeds']} better)")
    elif m["sd"] is not None and abs(m["mean"]) < 2 * m["sd"] / m["seeds"] ** 0.5:
        reasons.append("the mean is within two standard errors of 0 over seeds")
    return reasons


def _format(value: float, spread: float | None, n: int) -> str:
    return f"{value:.3f} ± {spread:.3f}" if n > 1 and spread is not None else f"{value:.3f}"


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
        lines += [margin_line(row, m) for row, m in margins.items()]
        unresolved = {row: unresolved_reasons(m) for row, m in margins.items()}
        unresolved = {row: reasons for row, reasons in unresolved.items() if reasons}
        lines += ["", "Differences these numbers cannot resolve (sign not established): "
                  + ("none." if not unresolved else "")]
        lines += [f"- {label(row)} vs BTX: {'; '.join(reasons)}" for row, reasons in unresolved.items()]
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
        ax.bar(xs, [e[f"{name}_ppl"] for e in table], width, yerr=[e[f"{name}_ppl_std"] or 0.0 for e in table], label=name)
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
