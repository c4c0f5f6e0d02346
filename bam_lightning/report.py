"""The study's report: a Table-1-shaped markdown table, CSV/JSON, and PNG charts.

Rows with several mixture seeds show mean +- sample standard deviation (one seed: no spread is
shown, there is none to show); BAM-vs-BTX gets a paired margin per seed, since seeds share data
order and router initialisation across methods. Next to that seed spread, each margin gets an
evaluation-sampling interval: a paired bootstrap over validation documents (the same resampled
documents for both models and every seed), from the per-document sums every stage records.

Routing: per mixture, a domain x expert heatmap of the FFN load and the attention gates (mean over
layers, from the logged `val/<domain>/ffn_load/...` and `val/<domain>/attn_gate/...`), experts
labelled by the dense model they were upcycled from, and the share each domain sends to its own
expert over the mixture's validations. Sweep (several mixture lengths): validation perplexity
against training FLOPs, margins against BTX per length, and the crossover length if any.
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
from bam_lightning.errors import UserError

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
    base, _, length = row.partition("@")
    return f"{ROW_LABELS.get(base, base)} @{length} steps" if length else ROW_LABELS.get(row, row)


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
        check_same_documents(pairs, domain)
        ids = pairs[0][1]["val_documents"][domain]["document"]
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


def check_same_documents(pairs: list[tuple[dict[str, Any], dict[str, Any]]], domain: str) -> None:
    """Refuse to pair rows that scored different validation documents: other document ids, or
    (where both records carry them) other content hashes, e.g. a stage validated before a
    domain's text was replaced. The message names both rows."""
    first = pairs[0][1]
    ids, hashes = first["val_documents"][domain]["document"], first["val_documents"][domain].get("hash")
    for pair in pairs:
        for record in pair:
            stats = record["val_documents"].get(domain, {})
            differ = None
            if stats.get("document") != ids:
                differ = "other documents"
            elif hashes is not None and stats.get("hash") is not None and stats["hash"] != hashes:
                changed = sum(a != b for a, b in zip(stats["hash"], hashes, strict=True))
                differ = f"{changed} of {len(hashes)} documents with other contents"
            if differ:
                raise UserError(
                    f"cannot pair {_name(record)} with {_name(first)}: on {domain!r} they scored {differ}, "
                    "so a margin between them would compare different texts. Rerun the stage validated on "
                    "older data (`bam pipeline` reruns it when the data changed; or remove its folder).")


def _name(record: dict[str, Any]) -> str:
    return f"row {record['row']!r} (stage {record.get('name', record['row'])}, seed {record.get('seed', 0)})"


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


# ----- routing -----
ROUTING_KINDS = {"ffn_load": "FFN load", "attn_gate": "attention gate"}


def routing_matrix(metrics: dict[str, float], domains: list[str], kind: str) -> np.ndarray | None:
    """domain x expert: `val/<domain>/<kind>/layer<L>/expert<E>` averaged over layers (None if not logged)."""
    values: dict[tuple[int, int], list[float]] = {}
    for d, domain in enumerate(domains):
        prefix = f"val/{domain}/{kind}/layer"
        for key, value in metrics.items():
            if key.startswith(prefix):
                expert = int(key.rsplit("/expert", 1)[1])
                values.setdefault((d, expert), []).append(float(value))
    if not values:
        return None
    matrix = np.full((len(domains), 1 + max(e for _, e in values)), np.nan)
    for (d, e), layer_values in values.items():
        matrix[d, e] = float(np.mean(layer_values))
    return matrix


def expert_sources(record: dict[str, Any], kind: str, n_experts: int) -> list[tuple[str, str | None]]:
    """(label, domain) per expert: what it was upcycled from and the domain that model was branched
    for. Sources come in order (the seed, for the study's seed domain, then the experts); FFN experts
    past them are copies of the seed's (parameter-matched BTX); sparse upcycling copies the seed's
    FFN into every expert."""
    if kind == "ffn_load" and record.get("method") == "sparse":
        return [("seed copy", None)] * n_experts
    seed_domain = record.get("seed_domain")
    out = []
    for source in (record.get("sources") or [])[:n_experts]:
        if source == "seed":
            out.append((f"seed ({seed_domain})" if seed_domain else "seed", seed_domain))
        else:
            out.append((source.removeprefix("expert_"), source.removeprefix("expert_")))
    return out + [("seed copy", None)] * (n_experts - len(out))


def expert_labels(record: dict[str, Any], kind: str, n_experts: int) -> list[str]:
    return [name for name, _ in expert_sources(record, kind, n_experts)]


def own_expert_shares(metrics: dict[str, float], record: dict[str, Any], domains: list[str],
                      kind: str) -> dict[str, float]:
    """domain -> the share of its routing that goes to the expert branched on that domain."""
    matrix = routing_matrix(metrics, domains, kind)
    if matrix is None:
        return {}
    owners = [domain for _, domain in expert_sources(record, kind, matrix.shape[1])]
    return {domain: float(matrix[d, owners.index(domain)]) for d, domain in enumerate(domains) if domain in owners}


def routing_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The mixtures shown: seed 0 of each row at the study's own length (sweep rows have '@')."""
    return [r for r in records if r.get("role") == "mixture" and r.get("seed", 0) == records_first_seed(records)
            and "@" not in r["row"] and routing_matrix(r["final"], domains_of(records), "ffn_load") is not None]


def records_first_seed(records: list[dict[str, Any]]) -> int:
    return min(r.get("seed", 0) for r in records)


def routing_lines(run_dir: Path, records: list[dict[str, Any]], charts: list[Path]) -> list[str]:
    shown = routing_records(records)
    if not shown:
        return []
    domains = domains_of(records)
    lines = ["## Routing", "",
             "Share of each domain's validation tokens routed to the expert branched on that domain "
             "(FFN load: top-k assignments; attention: soft gate weight), mean over layers, final weights. "
             "Uniform routing would give 1/(number of experts).", ""]
    header = ["model", *(f"{d} {ROUTING_KINDS[k]}" for k in ROUTING_KINDS for d in domains)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in shown:
        cells = [label(record["row"])]
        for kind in ROUTING_KINDS:
            shares = own_expert_shares(record["final"], record, domains, kind)
            cells += [f"{shares[d]:.2f}" if d in shares else "–" for d in domains]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""] + [f"![{chart.stem}]({chart.name})" for chart in charts] + [""]


def write_routing_charts(run_dir: Path, records: list[dict[str, Any]], plt) -> list[Path]:
    domains = domains_of(records)
    paths = []
    for record in routing_records(records):
        path = run_dir / f"routing_{record['name']}.png"
        fig, axes = plt.subplots(1, 3, figsize=(15, 0.5 * len(domains) + 3))
        for ax, kind in zip(axes[:2], ROUTING_KINDS, strict=True):
            matrix = routing_matrix(record["final"], domains, kind)
            if matrix is None:
                ax.set_axis_off()
                ax.set_title(f"{ROUTING_KINDS[kind]}: one attention (no gate)", fontsize=9)
                continue
            ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
            for (d, e), value in np.ndenumerate(matrix):
                ax.text(e, d, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value < 0.5 else "black")
            ax.set_xticks(range(matrix.shape[1]), expert_labels(record, kind, matrix.shape[1]), rotation=30, ha="right")
            ax.set_yticks(range(len(domains)), domains)
            ax.set_xlabel("expert (upcycled from)")
            ax.set_title(f"{label(record['row'])}: {ROUTING_KINDS[kind]}, mean over layers", fontsize=9)
        metrics_path = run_dir / "stages" / record["name"] / "metrics.jsonl"
        history = [p for p in read_metrics(metrics_path) if p.get("stage") == "fit"] if metrics_path.exists() else []
        for kind, style in zip(ROUTING_KINDS, ("-", "--"), strict=True):
            for domain in domains:
                points = [(p["step"], own_expert_shares(p, record, domains, kind).get(domain)) for p in history]
                points = [(x, y) for x, y in points if y is not None]
                if points:
                    axes[2].plot(*zip(*points, strict=True), style, marker=".", label=f"{domain} {ROUTING_KINDS[kind]}")
        axes[2].set_title("share routed to the domain's own expert, during training", fontsize=9)
        axes[2].set_xlabel("step")
        if axes[2].lines:
            axes[2].legend(fontsize=7)
        fig.tight_layout()
        _save_figure(fig, path)
        paths.append(path)
    return paths


# ----- sweep over the mixture length -----
def sweep_lengths(records: list[dict[str, Any]]) -> list[int]:
    return sorted({r["mixture_steps"] for r in records if r.get("role") == "mixture" and r.get("mixture_steps")})


def sweep_points(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """method row (without '@length') -> one point per length: mean training FLOPs, mean and sd of val/avg/ppl."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("role") == "mixture" and r.get("mixture_steps"):
            groups.setdefault((r["row"].partition("@")[0], r["mixture_steps"]), []).append(r)
    points: dict[str, list[dict[str, Any]]] = {}
    for (method, length), group in sorted(groups.items(), key=lambda item: item[0][1]):
        ppl = [r["final"]["val/avg/ppl"] for r in group]
        points.setdefault(method, []).append({
            "length": length, "row": group[0]["row"], "training_flops": statistics.fmean(r["training_flops"] for r in group),
            "ppl": statistics.fmean(ppl), "ppl_sd": statistics.stdev(ppl) if len(ppl) > 1 else None})
    return points


def sweep_margins(records: list[dict[str, Any]], reference: str = "btx") -> dict[str, list[dict[str, Any]]]:
    """method -> per length, its paired margin against the reference at the same length."""
    points = sweep_points(records)
    reference_rows = {p["length"]: p["row"] for p in points.get(reference, [])}
    margins: dict[str, list[dict[str, Any]]] = {}
    for method, method_points in points.items():
        if method == reference:
            continue
        for point in method_points:
            if point["length"] in reference_rows:
                m = paired_margin(records, point["row"], reference_rows[point["length"]])
                if m is not None:
                    margins.setdefault(method, []).append({"length": point["length"], **m})
    return margins


def crossover(margins: list[dict[str, Any]]) -> str:
    """The shortest length from which the method beats the reference at every longer length."""
    wins = [m["mean"] < 0 for m in margins]
    if all(wins):
        return f"better than BTX at every length ({margins[0]['length']}-{margins[-1]['length']} steps)"
    if not wins[-1]:
        return f"no crossover: not better than BTX at {margins[-1]['length']} steps, the longest run"
    first = next(i for i in range(len(wins)) if all(wins[i:]))
    established = all(m["eval_interval"] is not None and m["eval_interval"][1] < 0 for m in margins[first:])
    return (f"crosses between {margins[first - 1]['length']} and {margins[first]['length']} steps"
            + ("" if established else " (not established: an interval at or after it contains 0)"))


def sweep_lines(records: list[dict[str, Any]], chart: Path) -> list[str]:
    # the swept methods only: a row run at one length (sparse, parameter-matched BTX) has no trend
    margins = {method: rows for method, rows in sweep_margins(records).items() if len(rows) > 1}
    lines = ["## Mixture-length sweep", "",
             "Validation perplexity against training FLOPs for every method and mixture length (the same seed "
             f"model and experts at every length): ![sweep]({chart.name})", "",
             "Paired margins against BTX at the same length (average perplexity, negative = better than BTX); "
             "seed sd over mixture seeds, 95% interval from resampling validation documents:", "",
             "| method | length | margin | seed sd | evaluation 95% interval | better in |", "|---|---|---|---|---|---|"]
    for method, rows in margins.items():
        for m in rows:
            interval = (f"[{m['eval_interval'][0]:+.3f}, {m['eval_interval'][1]:+.3f}]"
                        if m["eval_interval"] is not None else "unknown")
            sd = f"{m['sd']:.3f}" if m["sd"] is not None else "one seed"
            lines.append(f"| {label(method)} | {m['length']} | {m['mean']:+.3f} | {sd} | {interval} | "
                         f"{m['wins']} of {m['seeds']} |")
    lines += ["", "Crossover length:"] + [f"- {label(method)}: {crossover(rows)}" for method, rows in margins.items()]
    return lines + [""]


def write_sweep_chart(run_dir: Path, records: list[dict[str, Any]], plt) -> Path:
    path = run_dir / "sweep_ppl_vs_flops.png"
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, points in sweep_points(records).items():
        xs, ys = [p["training_flops"] for p in points], [p["ppl"] for p in points]
        ax.errorbar(xs, ys, yerr=[p["ppl_sd"] or 0.0 for p in points], marker="o", capsize=3, label=label(method))
        for p in points:
            ax.annotate(str(p["length"]), (p["training_flops"], p["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("mixture-phase training FLOPs")
    ax.set_ylabel("val/avg/ppl")
    ax.set_title("mixture length sweep (labels: data-matched steps)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    return path


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
    charts, routing_charts, sweep_chart = write_charts(run_dir, table, domains, records)

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
    lines += routing_lines(run_dir, records, routing_charts)
    if sweep_chart is not None:
        lines += sweep_lines(records, sweep_chart)
    lines += ["## Charts", ""] + [f"![{c.stem}]({c.name})" for c in charts]
    lines += ["", f"TensorBoard: `tensorboard --logdir {run_dir / 'tensorboard'}`", ""]
    report = run_dir / "report.md"
    _write_atomic(report, "\n".join(lines))
    return report


def write_charts(run_dir: Path, table: list[dict[str, Any]], domains: list[str],
                 records: list[dict[str, Any]]) -> tuple[list[Path], list[Path], Path | None]:
    """The bar chart and validation curves; the routing heatmaps; the sweep chart (None without a sweep)."""
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
    routing = write_routing_charts(run_dir, records, plt)
    sweep = write_sweep_chart(run_dir, records, plt) if len(sweep_lengths(records)) > 1 else None
    plt.close("all")
    return [bars, curves], routing, sweep


def _save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
