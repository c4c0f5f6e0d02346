"""BAMDataModule end to end on tiny custom domains: prepare, mix, validate, resume, reuse."""

import itertools
import json
import math
import random
import signal

import numpy as np
import pytest
import torch

from bam_lightning.data import BAMDataModule, datamodule, prepare
from bam_lightning.data.prepare import split_indices
from bam_lightning.data.tokenizer import load_tokenizer

SEQ_LEN, BATCH = 16, 8


def write_domains(root, n_docs=24):
    """Two domains that are easy to tell apart: lowercase words (.txt) and digits (.jsonl)."""
    rng = random.Random(0)
    (root / "letters").mkdir(parents=True)
    for i in range(n_docs):
        words = (
            "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(500)
        )
        (root / "letters" / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n")
    with open(root / "digits.jsonl", "w") as file:
        for _ in range(n_docs):
            numbers = (str(rng.randint(0, 10**6)) for _ in range(150))
            file.write(json.dumps({"text": " ".join(numbers)}) + "\n")
    return {"letters": str(root / "letters" / "*.txt"), "digits": str(root / "digits.jsonl")}


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_module")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BAM_CACHE_DIR", str(root / "cache"))
        yield write_domains(root)


def make(domains, **overrides):
    arguments = {"seq_len": SEQ_LEN, "batch_size": BATCH, "val_fraction": 0.1} | overrides
    data = BAMDataModule(domains=domains, **arguments)
    data.prepare_data()
    data.setup("fit")
    return data


def is_digit_window(window):
    return not any(97 <= t <= 122 for t in window.tolist())  # no lowercase letter bytes


def test_batches_and_attributes(domains):
    data = make(domains)
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (BATCH, SEQ_LEN + 1) and batch.dtype == torch.int64
    assert 0 <= int(batch.min()) and int(batch.max()) < data.vocab_size == 257
    assert data.tokenizer_fingerprint == "byte"
    assert data.val_domain_names == ["letters", "digits"]
    manifest = json.loads((data.data_dir / "manifest.json").read_text())
    assert data.train_token_counts == {
        d: manifest["domains"][d]["train"]["tokens"] for d in domains
    }
    for counts in manifest["domains"].values():
        assert counts["train"]["documents"] + counts["val"]["documents"] == 24
        assert counts["val"]["documents"] == 2
        # bytes + one EOS per document
        assert counts["val"]["tokens"] == counts["val"]["bytes"] + counts["val"]["documents"]
    lengths = data.token_byte_lengths()
    assert lengths.shape == (257,) and lengths[:256].tolist() == [1] * 256 and lengths[256] == 0
    loaders = data.val_dataloader()
    assert len(loaders) == 2
    for name, loader in zip(data.val_domain_names, loaders, strict=True):
        first_pass = [b["tokens"] for b in loader]
        assert all(b.shape[1] == SEQ_LEN + 1 for b in first_pass)
        assert all(
            torch.equal(a, b["tokens"]) for a, b in zip(first_pass, list(loader), strict=True)
        )  # fixed set
        windows = torch.cat(first_pass)
        assert all(is_digit_window(w) == (name == "digits") for w in windows)


def test_validation_is_capped_and_selectable(domains):
    data = make(domains, val_tokens_per_domain=3 * (SEQ_LEN + 1) + 5, val_domains=["digits"])
    (loader,) = data.val_dataloader()
    assert data.val_domain_names == ["digits"] and len(loader.dataset) == 3


def test_training_mix_follows_weights(domains):
    data = make(domains, train_weights={"letters": 0.9, "digits": 0.1}, batch_size=16)
    iterator = iter(data.train_dataloader())
    windows = torch.cat([next(iterator) for _ in range(40)])
    digit_share = sum(is_digit_window(w) for w in windows) / len(windows)
    assert 0.05 < digit_share < 0.15
    only_letters = make(domains, train_weights={"letters": 1.0})
    batches = list(itertools.islice(only_letters.train_dataloader(), 20))
    assert not any(is_digit_window(w) for b in batches for w in b)


def test_state_dict_resumes_the_same_stream(domains):
    data = make(domains)
    iterator = iter(data.train_dataloader())
    for _ in range(3):
        next(iterator)
    state = data.state_dict()
    expected = [next(iterator) for _ in range(4)]
    resumed = BAMDataModule(domains=domains, seq_len=SEQ_LEN, batch_size=BATCH, val_fraction=0.1)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    iterator = iter(resumed.train_dataloader())
    assert all(torch.equal(a, next(iterator)) for a in expected)


def test_prepare_data_reuses_prepared_data(domains, monkeypatch):
    data = make(domains)
    manifest = data.data_dir / "manifest.json"
    modified = manifest.stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(datamodule, "prepare", must_not_run)
    monkeypatch.setattr(datamodule, "load_all_documents", must_not_run)
    # Read-time settings (weights, windows, batches, validation cap) share the prepared data.
    again = make(
        domains, train_weights={"digits": 1.0}, seq_len=8, batch_size=2, val_tokens_per_domain=99
    )
    assert again.data_dir == data.data_dir and manifest.stat().st_mtime_ns == modified


def test_settings_and_edited_files_get_their_own_data(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    domains = write_domains(tmp_path, n_docs=4)
    first = make(domains)
    assert make(domains, seed=99).data_dir != first.data_dir
    with open(tmp_path / "digits.jsonl", "a") as file:
        file.write(json.dumps({"text": "12 34"}) + "\n")
    edited = make(domains)
    assert edited.data_dir != first.data_dir
    assert edited.manifest["domains"]["digits"]["train"]["documents"] == 4  # 5 docs, 1 held out


def test_bpe_is_trained_on_the_training_split_only(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    domains = write_domains(tmp_path, n_docs=10)
    trained_on = []
    original = prepare.build_tokenizer

    def spy(kind, train_texts, bpe_vocab_size, out_dir):
        trained_on.extend(train_texts)
        return original(kind, train_texts, bpe_vocab_size, out_dir)

    monkeypatch.setattr(prepare, "build_tokenizer", spy)
    data = make(domains, tokenizer="bpe", bpe_vocab_size=300)
    letters = [p.read_text() for p in sorted((tmp_path / "letters").glob("*.txt"))]
    digits = [
        json.loads(line)["text"] for line in (tmp_path / "digits.jsonl").read_text().splitlines()
    ]
    expected = []
    for documents in (letters, digits):
        train, val = split_indices(len(documents), 0.1, seed=1234)
        expected += [documents[i] for i in train]
        assert not any(documents[i] in trained_on for i in val)
    assert sorted(trained_on) == sorted(expected)

    assert (data.data_dir / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(str(data.data_dir))
    assert (
        data.tokenizer_fingerprint == tokenizer.fingerprint
        and data.tokenizer_fingerprint.startswith("bpe-")
    )
    assert 258 < data.vocab_size <= 300
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (BATCH, SEQ_LEN + 1) and int(batch.max()) < data.vocab_size
    lengths = data.token_byte_lengths()
    assert lengths.shape == (data.vocab_size,) and lengths[tokenizer.eos_id] == 0
    assert lengths.max() > 1  # merges span several bytes
    assert tokenizer.decode(tokenizer.encode(letters[0])) == letters[0]


def test_bad_inputs_fail_before_any_work(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BAM_CACHE_DIR", str(cache))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    data = BAMDataModule(domains={"math": "builtin", "mine": str(tmp_path / "bad.jsonl")})
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: no \"text\" field"):
        data.prepare_data()
    with pytest.raises(FileNotFoundError, match=r"domain 'mine': .*missing\.txt does not exist"):
        BAMDataModule(
            domains={"math": "builtin", "mine": str(tmp_path / "missing.txt")}
        ).prepare_data()
    assert not (cache / "corpora").exists() and not (cache / "prepared").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            {"train_weights": {"letters": 1.0, "latin": 1.0}},
            r"unknown domain 'latin'; known domains: letters, digits",
        ),
        (
            {"train_weights": {"letters": -1.0}},
            r"train_weights\['letters'\] must be a finite number >= 0",
        ),
        ({"train_weights": {"letters": math.nan}}, r"train_weights\['letters'\] must be a finite"),
        ({"train_weights": {"letters": 0.0, "digits": 0}}, r"train_weights are all zero"),
        (
            {"val_domains": ["letters", "poetry"]},
            r"val_domains names unknown domain 'poetry'; known domains",
        ),
        ({"val_domains": []}, r"val_domains is empty"),
        ({"domains": {}}, r"domains is empty"),
        (
            {"domains": {"poetry": "builtin"}},
            r"no built-in 'poetry' corpus; built-ins are code, legal",
        ),
        ({"domains": {"a/b": "x.txt"}}, r"domain name 'a/b'"),
        ({"tokenizer": "wordpiece"}, r"tokenizer must be 'byte' or 'bpe', got 'wordpiece'"),
        ({"tokenizer": "bpe", "bpe_vocab_size": 100}, r"bpe_vocab_size must exceed 257"),
        ({"val_fraction": 0.0}, r"val_fraction must be between 0 and 1"),
        ({"seq_len": 0}, r"seq_len must be at least 1"),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    arguments = {"domains": {"letters": "l/*.txt", "digits": "d.jsonl"}} | arguments
    with pytest.raises(ValueError, match=message):
        BAMDataModule(**arguments)


def test_prepare_is_atomic_and_leaves_the_process_alone(tmp_path, monkeypatch):
    domains = write_domains(tmp_path, n_docs=4)
    data_dir = tmp_path / "prepared" / "mine"
    original = prepare.write_token_dataset
    calls = []

    def fail_on_second_split(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return original(*args, **kwargs)

    monkeypatch.setattr(prepare, "write_token_dataset", fail_on_second_split)
    with pytest.raises(RuntimeError, match="interrupted"):
        BAMDataModule(domains=domains, data_dir=str(data_dir)).prepare_data()
    assert list((tmp_path / "prepared").iterdir()) == []  # no half-written data, no staging left
    monkeypatch.undo()

    handler, torch_state, numpy_state = (
        signal.getsignal(signal.SIGINT),
        torch.get_rng_state(),
        np.random.get_state(),
    )
    python_state = random.getstate()
    make(domains, data_dir=str(data_dir))
    assert signal.getsignal(signal.SIGINT) is handler
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert list((tmp_path / "prepared").iterdir()) == [data_dir]

    with pytest.raises(ValueError, match=r"holds data prepared with other settings"):
        BAMDataModule(domains=domains, data_dir=str(data_dir), seed=1).prepare_data()
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["settings"]["format"] = 2  # flat .npy arrays: never read as litdata chunks
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    for step in ("prepare_data", "setup"):
        with pytest.raises(ValueError, match=r"older bam_lightning \(format 2, this version reads format 3\)"):
            getattr(BAMDataModule(domains=domains, data_dir=str(data_dir)), step)()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"foreign is not empty and has no manifest\.json"):
        BAMDataModule(domains=domains, data_dir=str(tmp_path / "foreign")).prepare_data()


def test_lightning_cli_can_build_it_from_yaml_values():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(BAMDataModule, "data")
    config = parser.parse_object(
        {
            "data": {
                "domains": {"code": "builtin", "notes": ["notes/*.txt", "more.jsonl"]},
                "train_weights": {"code": 0.9, "notes": 0.1},
                "tokenizer": "bpe",
                "seq_len": 64,
            }
        }
    )
    data = parser.instantiate_classes(config).data
    assert data.domains == {"code": "builtin", "notes": ["notes/*.txt", "more.jsonl"]}
    assert data.train_weights == {"code": 0.9, "notes": 0.1} and data.val_domain_names == [
        "code",
        "notes",
    ]


def test_order_seed_changes_the_training_order_only(domains):
    """A mixture-phase repeat (`order_seed`) must see the same documents, split and validation
    windows, in another training order; otherwise its scores are not comparable across seeds."""
    base, repeat = make(domains), make(domains, order_seed=1235)
    assert repeat.data_dir == base.data_dir  # the same prepared documents and split
    for ours, theirs in zip(base.val_dataloader(), repeat.val_dataloader(), strict=True):
        assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(ours, theirs, strict=True))
    first = list(itertools.islice(base.train_dataloader(), 3))
    again = list(itertools.islice(make(domains).train_dataloader(), 3))
    other = list(itertools.islice(repeat.train_dataloader(), 3))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
