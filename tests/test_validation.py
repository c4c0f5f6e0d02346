"""Validation metrics are exact sums over the scored target tokens: per-document loss, token and
byte sums (what the report bootstraps over), bpb from the bytes of exactly those tokens."""

import math
import random

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from bam_lightning.data import BAMDataModule
from bam_lightning.lit import DenseLM


def write_domains(root):
    """ASCII only, so that decoding one token gives exactly that token's bytes."""
    rng = random.Random(5)
    domains = {}
    for name, alphabet in (("prose", "etaoinshr"), ("numbers", "0123456789")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(6):
            words = ("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(30 + 20 * i))
            (folder / f"{i}.txt").write_text(" ".join(words) + ".\n")
        domains[name] = str(folder / "*.txt")
    return domains


def test_metrics_and_per_document_sums_come_from_the_scored_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    data = BAMDataModule(domains=write_domains(tmp_path), tokenizer="bpe", bpe_vocab_size=300, seq_len=8,
                         batch_size=4, val_fraction=0.34, val_tokens_per_domain=7 * 9)
    data.prepare_data()
    data.setup("validate")
    torch.manual_seed(0)
    model = DenseLM(config=tiny_config(vocab_size=data.vocab_size, max_seq_len=8))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
    tokenizer = data.tokenizer
    model.eval()
    for index, domain in enumerate(data.val_domain_names):
        expected: dict[int, list[float]] = {}
        with torch.no_grad():
            for batch in data.val_dataloader()[index]:
                tokens, documents = batch["tokens"], batch["documents"]
                logits, _ = model.model(tokens[:, :-1])
                losses = F.cross_entropy(logits.double().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
                for loss, target, document in zip(losses.tolist(), tokens[:, 1:].flatten().tolist(),
                                                  documents.flatten().tolist(), strict=True):
                    sums = expected.setdefault(document, [0.0, 0, 0])
                    sums[0] += loss
                    sums[1] += 1
                    sums[2] += len(tokenizer.decode([target]).encode("utf-8"))  # EOS decodes to ""
        recorded = model.val_document_stats[domain]
        assert recorded["document"] == sorted(expected) and len(expected) >= 2
        assert recorded["tokens"] == [expected[d][1] for d in sorted(expected)]
        assert recorded["bytes"] == [expected[d][2] for d in sorted(expected)]
        assert recorded["loss_sum"] == pytest.approx([expected[d][0] for d in sorted(expected)], rel=1e-5)
        loss, n_tokens, n_bytes = (sum(v[i] for v in expected.values()) for i in range(3))
        assert metrics[f"val/{domain}/loss"] == pytest.approx(loss / n_tokens, rel=1e-5)
        assert metrics[f"val/{domain}/bpb"] == pytest.approx(loss / math.log(2) / n_bytes, rel=1e-5)
