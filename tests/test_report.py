"""The report's spreads and intervals on synthetic stage records: no fake "sd 0.000" with one
seed, a paired document bootstrap next to the seed spread, and a plain list of what it cannot
resolve."""

import math

import numpy as np
import pytest

from bam_lightning.report import (
    evaluation_interval,
    paired_margin,
    summarise,
    unresolved_reasons,
    write_report,
)

DOMAINS = ("code", "legal")


def record(row, seed, per_document_loss):
    """A stage record whose metrics are computed from per-document losses (tokens: 100 each)."""
    final, documents = {}, {}
    for domain, losses in per_document_loss.items():
        tokens = [100] * len(losses)
        loss_sum = [loss * t for loss, t in zip(losses, tokens, strict=True)]
        final[f"val/{domain}/ppl"] = math.exp(sum(loss_sum) / sum(tokens))
        documents[domain] = {"document": list(range(len(losses))), "loss_sum": loss_sum,
                             "tokens": tokens, "bytes": [300] * len(losses)}
    final["val/avg/ppl"] = sum(final[f"val/{d}/ppl"] for d in per_document_loss) / len(per_document_loss)
    return {"row": row, "seed": seed, "name": f"{row}_{seed}", "final": final, "val_documents": documents,
            "params_total": 1, "params_active": 1, "training_flops": 1.0, "tokens": 1, "steps": 1,
            "wall_time_s": 1.0}


def losses(rng, shift, n=40):
    base = rng.uniform(1.5, 2.5, size=n)  # documents differ a lot; both models share them
    return {d: (base + shift + rng.normal(0, 0.01, size=n)).tolist() for d in DOMAINS}


def brute_force_interval(pairs, samples, seed):
    """The bootstrap written directly: resample documents, recompute every ppl from scratch."""
    rng = np.random.default_rng(seed)
    domains = list(pairs[0][1]["val_documents"])
    draws = {}
    margins = np.zeros(samples)
    for domain in domains:
        n = len(pairs[0][1]["val_documents"][domain]["document"])
        draws[domain] = rng.integers(0, n, size=(samples, n))
    for s in range(samples):
        total = 0.0
        for row, reference in pairs:
            for domain in domains:
                index = draws[domain][s]
                ppl = [math.exp(sum(r["val_documents"][domain]["loss_sum"][i] for i in index)
                                / sum(r["val_documents"][domain]["tokens"][i] for i in index))
                       for r in (row, reference)]
                total += (ppl[0] - ppl[1]) / len(domains) / len(pairs)
        margins[s] = total
    return np.percentile(margins, [2.5, 97.5]).tolist()


def test_the_bootstrap_matches_a_direct_implementation():
    rng = np.random.default_rng(0)
    pairs = [(record("bam", s, losses(rng, -0.02)), record("btx", s, losses(rng, 0.0))) for s in range(2)]
    fast = evaluation_interval(pairs, samples=200, seed=5)
    assert fast["documents"] == 80
    assert fast["interval"] == pytest.approx(brute_force_interval(pairs, 200, 5), rel=1e-9)


def test_one_seed_has_no_spread_and_a_clear_margin_is_resolved(tmp_path):
    rng = np.random.default_rng(1)
    shared = losses(rng, 0.0)
    better = {d: [x - 0.3 for x in v] for d, v in shared.items()}  # every document clearly better
    records = [record("btx", 0, shared), record("bam", 0, better)]
    table = summarise(records)
    assert all(entry["avg_ppl_std"] is None for entry in table)
    margin = paired_margin(records, "bam")
    assert margin["sd"] is None and margin["eval_interval"][1] < 0
    assert unresolved_reasons(margin) == ["one seed only"]
    report = write_report(tmp_path, records).read_text()
    assert "sd 0.000" not in report and "± 0.000" not in report
    assert "one seed: no seed spread" in report and "evaluation-sampling 95% interval" in report


def test_a_margin_inside_the_document_noise_is_listed_as_unresolved(tmp_path):
    rng = np.random.default_rng(2)
    records = []
    for seed in range(3):
        shared = losses(rng, 0.0)
        # per-document differences of +-0.05 that cancel on average: no real difference
        noise = {d: [x + 0.05 * (-1) ** i for i, x in enumerate(v)] for d, v in shared.items()}
        records += [record("btx", seed, shared), record("bam", seed, noise)]
    margin = paired_margin(records, "bam")
    low, high = margin["eval_interval"]
    assert low < 0 < high and margin["sd"] is not None and margin["seeds"] == 3
    assert "its evaluation-sampling interval contains 0" in unresolved_reasons(margin)
    report = write_report(tmp_path, records).read_text()
    assert "cannot resolve" in report and "- BAM DM Expert-KV vs BTX: its evaluation-sampling interval contains 0" in report


def test_records_without_per_document_results_say_so():
    rng = np.random.default_rng(3)
    records = [record("btx", 0, losses(rng, 0)), record("bam", 0, losses(rng, 0))]
    for r in records:
        del r["val_documents"]
    margin = paired_margin(records, "bam")
    assert margin["eval_interval"] is None
    assert "no evaluation-sampling interval" in unresolved_reasons(margin)


# ----- routing heatmaps and the length sweep -----
def routed(row, name, sources, method, ffn, attn=None):
    """A mixture record whose final metrics hold routing per domain, layer and expert:
    ffn/attn: domain -> layers x experts nested lists."""
    rec = record(row, 0, {d: [2.0] * 4 for d in DOMAINS})
    rec.update(name=name, role="mixture", sources=sources, method=method, mixture_steps=100)
    for kind, table in (("ffn_load", ffn), ("attn_gate", attn or {})):
        for domain, layers in table.items():
            for layer, experts in enumerate(layers):
                for e, value in enumerate(experts):
                    rec["final"][f"val/{domain}/{kind}/layer{layer}/expert{e}"] = value
    return rec


def test_routing_matrix_is_the_mean_over_layers_with_experts_labelled_by_source(tmp_path):
    from bam_lightning.report import expert_labels, own_expert_shares, routing_matrix

    rng = np.random.default_rng(3)
    ffn = {d: rng.dirichlet(np.ones(3), size=2).tolist() for d in DOMAINS}  # 2 layers, 3 experts
    attn = {d: rng.dirichlet(np.ones(3), size=2).tolist() for d in DOMAINS}
    bam = routed("bam", "bam", ["seed", "expert_code", "expert_legal"], "bam", ffn, attn)
    matrix = routing_matrix(bam["final"], list(DOMAINS), "ffn_load")
    for d, domain in enumerate(DOMAINS):
        for e in range(3):
            assert matrix[d, e] == pytest.approx((ffn[domain][0][e] + ffn[domain][1][e]) / 2, rel=1e-12)
    assert expert_labels(bam, "attn_gate", 3) == ["seed", "code", "legal"]
    shares = own_expert_shares(bam["final"], bam, list(DOMAINS), "attn_gate")
    assert shares == pytest.approx({"code": (attn["code"][0][1] + attn["code"][1][1]) / 2,
                                    "legal": (attn["legal"][0][2] + attn["legal"][1][2]) / 2})
    # parameter-matched BTX: FFN experts past the sources are copies of the seed's; sparse copies it everywhere
    matched = routed("btx_param_matched", "btx_param_matched", ["seed", "expert_code"], "btx", {})
    assert expert_labels(matched, "ffn_load", 4) == ["seed", "code", "seed copy", "seed copy"]
    assert expert_labels({**matched, "method": "sparse"}, "ffn_load", 2) == ["seed copy", "seed copy"]
    assert routing_matrix(routed("btx", "btx", ["seed"], "btx", ffn)["final"], list(DOMAINS), "attn_gate") is None


def test_report_shows_routing_heatmaps_per_mixture(tmp_path):
    ffn = {"code": [[0.1, 0.7, 0.2], [0.1, 0.5, 0.4]], "legal": [[0.2, 0.2, 0.6], [0.4, 0.2, 0.4]]}
    attn = {"code": [[0.3, 0.4, 0.3], [0.3, 0.4, 0.3]], "legal": [[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]]}
    sources = ["seed", "expert_code", "expert_legal"]
    records = [routed("btx", "btx", sources, "btx", ffn), routed("bam", "bam", sources, "bam", ffn, attn)]
    report = write_report(tmp_path, records).read_text()
    assert "## Routing" in report
    # own-expert shares: code FFN (0.7+0.5)/2, legal FFN (0.6+0.4)/2; attention 0.4 and 0.5; BTX has no gate
    assert "| BAM DM Expert-KV | 0.60 | 0.50 | 0.40 | 0.50 |" in report
    assert "| BTX | 0.60 | 0.50 | – | – |" in report
    for name in ("btx", "bam"):
        assert (tmp_path / f"routing_{name}.png").stat().st_size > 0


def test_sweep_reports_margins_per_length_and_the_crossover(tmp_path):
    from bam_lightning.report import crossover, sweep_margins

    rng = np.random.default_rng(4)
    records = []
    for length, shift in ((100, 0.3), (400, -0.05), (1600, -0.3)):
        at = "" if length == 100 else f"@{length}"
        for seed in (0, 1):
            shared = losses(rng, 0.0)
            for row, delta in (("btx", 0.0), ("bam_cm", shift)):
                r = record(f"{row}{at}", seed, {d: [x + delta for x in v] for d, v in shared.items()})
                r.update(role="mixture", mixture_steps=length, training_flops=float(length), name=f"{row}{at}_{seed}")
                records.append(r)
    unswept = record("sparse", 0, losses(rng, 0.1))  # run at the study's length only
    unswept.update(role="mixture", mixture_steps=100, training_flops=100.0, name="sparse_0")
    records.append(unswept)
    margins = sweep_margins(records)["bam_cm"]
    assert [m["length"] for m in margins] == [100, 400, 1600]
    assert [m["mean"] > 0 for m in margins] == [True, False, False]
    assert crossover(margins).startswith("crosses between 100 and 400 steps")
    assert crossover(margins[:1]) == "no crossover: not better than BTX at 100 steps, the longest run"
    assert crossover(margins[1:]).startswith("better than BTX at every length")
    report = write_report(tmp_path, records).read_text()
    assert "## Mixture-length sweep" in report and "| BAM CM Expert-KV | 1600 |" in report
    sweep_section = report.split("## Mixture-length sweep")[1]
    assert "sparse" not in sweep_section  # one length: no trend, no crossover line
    assert (tmp_path / "sweep_ppl_vs_flops.png").stat().st_size > 0


def test_the_seed_expert_owns_the_study_seed_domain():
    from bam_lightning.report import expert_labels, own_expert_shares

    ffn = {"code": [[0.3, 0.7]], "legal": [[0.9, 0.1]]}
    bam = routed("bam", "bam", ["seed", "expert_code"], "bam", ffn)
    bam["seed_domain"] = "legal"
    assert expert_labels(bam, "ffn_load", 2) == ["seed (legal)", "code"]
    assert own_expert_shares(bam["final"], bam, list(DOMAINS), "ffn_load") == pytest.approx({"code": 0.7, "legal": 0.9})


def test_rows_validated_on_different_texts_are_not_paired():
    """Issue 22, item 2: same document ids, other contents (a domain's text replaced between two
    stages): the report refuses to pair them, naming both rows; equal hashes pair as before."""
    rng = np.random.default_rng(3)
    bam, btx = record("bam", 0, losses(rng, -0.2, n=4)), record("btx", 0, losses(rng, 0.0, n=4))
    for stage in (bam, btx):
        for domain in DOMAINS:
            stage["val_documents"][domain]["hash"] = [f"{domain}{i:014d}" for i in range(4)]
    assert paired_margin([bam, btx], "bam")["eval_interval"] is not None
    btx["val_documents"]["legal"]["hash"][2] = "0123456789abcdef"
    with pytest.raises(ValueError, match=r"cannot pair row 'bam' \(stage bam_0, seed 0\) with row 'btx' "
                                         r"\(stage btx_0, seed 0\): on 'legal' they scored 1 of 4 documents "
                                         r"with other contents"):
        paired_margin([bam, btx], "bam")
