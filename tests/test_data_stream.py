"""The training stream: the same for any number of workers, resumed exactly (also a resumed run,
across an epoch boundary) by a Trainer; validation spread over every document; bpb bytes;
near-duplicates kept on one side of the split."""

import itertools
import random
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from helpers import read_prepared_split

from bam_lightning.data import BAMDataModule, prepare
from bam_lightning.data.dedup import minhash_signatures, near_duplicate_groups, shingle_hashes
from bam_lightning.data.prepare import split_indices
from bam_lightning.data.stream import BLOCK, TrainStream, validation_windows
from bam_lightning.data.tokenizer import ByteTokenizer, train_bpe

SEQ_LEN, BATCH = 8, 4


def write_domains(root, n_domains):
    """`n_domains` small domains of distinct letters, each a few documents of different sizes,
    so that an epoch is a handful of batches."""
    rng = random.Random(n_domains)
    domains = {}
    for d in range(n_domains):
        folder = root / f"d{d}"
        folder.mkdir(parents=True)
        letters = "abcdefghijklmnopqrstuvwxyz"[d * 5:d * 5 + 5]
        for i in range(6):
            words = ("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(4 + 3 * i))
            (folder / f"{i}.txt").write_text(" ".join(words))
        domains[f"d{d}"] = str(folder / "*.txt")
    return domains


@pytest.fixture(scope="module", params=[2, 4], ids=["2domains", "4domains"])
def domains(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"stream{request.param}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BAM_CACHE_DIR", str(root / "cache"))
        yield write_domains(root, request.param)


def weights_for(domains):
    return {name: float(i + 1) for i, name in enumerate(domains)}  # unequal: 1:2(:3:4)


def make(domains, **overrides):
    arguments = {"seq_len": SEQ_LEN, "batch_size": BATCH, "val_fraction": 0.2,
                 "train_weights": weights_for(domains)} | overrides
    data = BAMDataModule(domains=domains, **arguments)
    data.prepare_data()
    data.setup("fit")
    return data


def reference_stream(data, n_samples):
    """The stream written out sequentially from its definition, as an independent check of
    `TrainStream.visits` (which computes any range on its own via per-block counts)."""
    stream = data.train_stream()
    drawn = np.concatenate([stream.block_domains(b) for b in range(n_samples // BLOCK + 1)])[:n_samples]
    seen = [0] * len(stream.names)
    out = []
    for d in drawn:
        n = stream.window_counts[d]
        order = np.random.default_rng([data.order_seed, _key(stream.names[d]), seen[d] // n]).permutation(n)
        out.append((int(d), int(order[seen[d] % n])))
        seen[d] += 1
    return out


def _key(name):
    import zlib

    return zlib.crc32(name.encode())


def test_any_range_of_the_stream_equals_the_sequential_definition(domains):
    data = make(domains)
    expected = reference_stream(data, 2 * BLOCK + 50)
    stream = data.train_stream()
    for start, stop in ((0, 10), (BLOCK - 3, BLOCK + 5), (2 * BLOCK + 10, 2 * BLOCK + 50), (5, 2 * BLOCK)):
        assert data.train_stream().samples(start, stop) == expected[start:stop]
        assert stream.samples(start, stop) == expected[start:stop]
    # each pass of a domain reads every window once
    first_domain = [w for d, w in expected if d == 0][: stream.window_counts[0]]
    assert sorted(first_domain) == list(range(stream.window_counts[0]))
    share = np.bincount([d for d, _ in expected], minlength=len(domains)) / len(expected)
    target = np.array(list(weights_for(domains).values())) / sum(weights_for(domains).values())
    assert np.abs(share - target).max() < 0.02


def test_batches_do_not_depend_on_num_workers(domains):
    loaders = [make(domains, num_workers=workers).train_dataloader() for workers in (0, 2)]
    epoch = loaders[0].epoch_batches
    assert epoch < 40  # the comparison below crosses two epoch boundaries
    batches = []
    for loader in loaders:
        run = []
        while len(run) < 2 * epoch + 3:
            run += list(loader)  # one epoch per iteration, continuing the stream
        batches.append(torch.stack(run[: 2 * epoch + 3]))
    assert torch.equal(batches[0], batches[1])
    # and they are the stream's windows
    data = make(domains)
    splits = [read_prepared_split(data.data_dir / d / "train", "uint16") for d in data.train_stream().names]
    assert all(len(chunks) == 1 for _, chunks, _ in splits)  # small splits: one chunk, so window w is
    block = SEQ_LEN + 1                                          # the w-th block of the sequence
    expected = [splits[d][0][w * block:(w + 1) * block] for d, w in data.train_stream().samples(0, 3 * BATCH)]
    assert np.array_equal(batches[0][:3].reshape(-1, block).numpy(), np.stack(expected))


def test_ranks_share_one_global_stream(domains):
    single = make(domains).train_dataloader()
    expected = list(itertools.islice(single, 6))
    per_rank = []
    for rank in (0, 1):
        data = make(domains)
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2, training=False)
        per_rank.append(list(itertools.islice(data.train_dataloader(), 3)))
        assert data.state_dict()["batches"] == 6  # global batches, the same on every rank
    interleaved = [batch for pair in zip(*per_rank, strict=True) for batch in pair]
    assert all(torch.equal(a, b) for a, b in zip(interleaved, expected, strict=True))


class RecordingModule(L.LightningModule):
    """Trains nothing; remembers every batch it was given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        return self.weight.sum() * batch.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_trainer_resume_of_a_resumed_run_across_epochs_is_exact(domains, workers, tmp_path):
    epoch = make(domains).train_dataloader().epoch_batches
    total = 2 * epoch + 2  # crosses two epoch boundaries

    def fit(steps, ckpt_path=None, every=None):
        module = RecordingModule()
        callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every,
                                                         save_top_k=-1)] if every else []
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, limit_val_batches=0,
                            enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=bool(callbacks), callbacks=callbacks, default_root_dir=tmp_path)
        trainer.fit(module, datamodule=make(domains, num_workers=workers), ckpt_path=ckpt_path)
        return module.seen, tmp_path / "ckpt"

    uninterrupted, _ = fit(total)
    # stop points: early, just before and just after an epoch boundary, inside the second epoch
    stops = sorted({3, epoch - 1, epoch + 1, epoch + 2, total - 2})
    first_stop = stops[0]
    seen, folder = fit(first_stop, every=1)
    chain = list(seen)
    previous = first_stop
    for stop in stops[1:]:  # each resume starts from a checkpoint that a resumed run wrote
        (checkpoint,) = [p for p in folder.iterdir() if p.name.endswith(f"step={previous}.ckpt")]
        seen, folder = fit(stop, ckpt_path=checkpoint, every=1)
        assert len(seen) == stop - previous
        chain += seen
        previous = stop
    (checkpoint,) = [p for p in folder.iterdir() if p.name.endswith(f"step={previous}.ckpt")]
    seen, _ = fit(total, ckpt_path=checkpoint)
    chain += seen
    assert len(chain) == total
    for step, (ours, theirs) in enumerate(zip(chain, uninterrupted, strict=True)):
        assert torch.equal(ours, theirs), f"batch {step} differs"


def test_a_checkpoint_of_another_stream_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    domains = write_domains(tmp_path, 2)
    data = make(domains)
    list(itertools.islice(data.train_dataloader(), 2))
    state = data.state_dict()
    assert state["batches"] == 2
    with pytest.raises(ValueError, match=r"data\.order_seed = 1234, this run has 7"):
        make(domains, order_seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data\.batch_size = 4, this run has 2"):
        make(domains, batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"older bam_lightning \(litdata loader state\)"):
        make(domains).load_state_dict({"train_loader": {"current_epoch": 0}})


# --- validation windows, bytes, near-duplicates ---------------------------------------------------


def test_validation_windows_spread_over_every_document(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    domains = write_domains(tmp_path, 1)
    data = make(domains, val_fraction=0.5, val_tokens_per_domain=10 * (SEQ_LEN + 1))
    (loader,) = data.val_dataloader()
    tokens, _, offsets = read_prepared_split(data.data_dir / "d0" / "val", "uint16")
    batches = list(loader)
    windows = torch.cat([b["tokens"] for b in batches])
    documents = torch.cat([b["documents"] for b in batches])
    assert len(windows) == 10
    # every scored target token is tagged with the document that holds it
    block = SEQ_LEN + 1
    for k, start in enumerate(validation_windows(len(tokens) // block, 10) * block):
        assert windows[k].tolist() == tokens[start:start + block].tolist()
        for t in range(SEQ_LEN):
            position = start + 1 + t
            owner = next(i for i in range(len(offsets) - 1) if offsets[i] <= position < offsets[i + 1])
            assert documents[k, t] == owner
    assert set(documents.flatten().tolist()) == set(range(len(offsets) - 1))  # all 3 documents
    assert validation_windows(100, 4).tolist() == [0, 25, 50, 75]
    assert validation_windows(3, 10).tolist() == [0, 1, 2]


def test_litdata_chunks_hold_every_document_and_windows_follow_them(tmp_path, monkeypatch):
    """Chunks far smaller than a split: every document is stored once, in order, EOS-ended;
    windows are numbered chunk by chunk (a chunk's partial tail is never read); training batches
    and tagged validation windows are those windows, read back through litdata."""
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 256)  # a few documents per chunk
    domains = write_domains(tmp_path, 2)
    data = make(domains, val_fraction=0.5, val_tokens_per_domain=10**6)
    block, eos = SEQ_LEN + 1, ByteTokenizer.eos_id
    sources = {d: {f.read_text() for f in tmp_path.glob(f"{d}/*.txt")} for d in domains}
    sequences, starts = {}, {}
    for domain in domains:
        stored = []
        for split in ("train", "val"):
            tokens, chunks, offsets = read_prepared_split(data.data_dir / domain / split, "uint16")
            assert len(chunks) > 1 and chunks == data.chunk_tokens[domain, split]
            assert offsets[0] == 0 and offsets[-1] == len(tokens) and (tokens[offsets[1:] - 1] == eos).all()
            bounds = zip(offsets[:-1], offsets[1:], strict=True)
            stored += [ByteTokenizer().decode(tokens[a:b - 1].tolist()) for a, b in bounds]
            # window starts, chunk by chunk, written out independently of window_starts()
            chunk_start, own = 0, []
            for n in chunks:
                own += [chunk_start + k * block for k in range(n // block)]
                chunk_start += n
            sequences[domain, split], starts[domain, split] = tokens, own
        assert sorted(stored) == sorted(sources[domain])

    names = data.train_stream().names
    batches = torch.cat(list(itertools.islice(iter(data.train_dataloader()), 3)))
    for row, (d, w) in zip(batches, data.train_stream().samples(0, 3 * BATCH), strict=True):
        start = starts[names[d], "train"][w]
        assert row.tolist() == sequences[names[d], "train"][start:start + block].tolist()
    assert data.train_stream().window_counts == [len(starts[d, "train"]) for d in names]

    for domain, loader in zip(data.val_domain_names, data.val_dataloader(), strict=True):
        tokens, own = sequences[domain, "val"], starts[domain, "val"]
        _, _, offsets = read_prepared_split(data.data_dir / domain / "val", "uint16")
        batches = list(loader)
        windows = torch.cat([b["tokens"] for b in batches])
        documents = torch.cat([b["documents"] for b in batches])
        assert len(windows) == len(own)  # the cap exceeds the split: every window, in order
        for k, start in enumerate(own):
            assert windows[k].tolist() == tokens[start:start + block].tolist()
            owners = np.searchsorted(offsets, np.arange(start + 1, start + block), side="right") - 1
            assert documents[k].tolist() == owners.tolist()


def test_token_byte_lengths_count_the_bytes_of_decoded_tokens(tmp_path):
    texts = ["héllo wörld, ünïcode — ✓ " * 20, "plain ascii text with some words " * 30, "数学 と 言葉 " * 15]
    for tokenizer in (ByteTokenizer(), train_bpe(texts, 400, tmp_path / "tokenizer.json")):
        lengths = tokenizer.token_byte_lengths()
        assert lengths.shape == (tokenizer.vocab_size,) and lengths[tokenizer.eos_id] == 0
        for text in texts:
            ids = tokenizer.encode(text) + [tokenizer.eos_id]
            assert int(lengths[ids].sum()) == len(tokenizer.decode(ids).encode("utf-8")) == len(text.encode())
            # any run of whole characters: its tokens' lengths sum to its bytes
            pieces = [tokenizer.decode([i]) for i in ids[:-1]]
            if all("\ufffd" not in p for p in pieces):
                assert [len(p.encode()) for p in pieces] == lengths[ids[:-1]].tolist()


def test_near_duplicates_are_grouped_and_never_straddle_the_split():
    rng = random.Random(3)
    vocabulary = [f"w{i}" for i in range(400)]
    originals = [" ".join(rng.choice(vocabulary) for _ in range(300)) for _ in range(40)]
    documents = list(originals)
    planted = {}
    for source in range(0, 40, 4):  # ten near-duplicates: a few words changed, re-wrapped, re-cased
        words = originals[source].split()
        for position in rng.sample(range(300), 6):
            words[position] = "changed"
        planted[len(documents)] = source
        documents.append("\n".join(" ".join(words[i:i + 12]) for i in range(0, 300, 12)).upper())
    groups = near_duplicate_groups(documents)
    for copy, source in planted.items():
        assert groups[copy] == groups[source]
    assert len(set(groups)) == 40  # nothing else joined
    for seed in range(20):
        train, val = split_indices(len(documents), 0.2, seed, groups)
        assert sorted(train + val) == list(range(len(documents))) and len(val) >= 8
        train_groups = {groups[i] for i in train}
        assert not any(groups[i] in train_groups for i in val)
    # without grouping, some seeds would put a copy and its source on different sides
    straddles = 0
    for seed in range(20):
        train, val = split_indices(len(documents), 0.2, seed)
        straddles += any((c in val) != (s in val) for c, s in planted.items())
    assert straddles > 0


def test_minhash_estimates_the_exact_shingle_jaccard():
    rng = random.Random(4)
    base = [f"w{rng.randrange(10**6)}" for _ in range(600)]
    documents = [" ".join(base)]
    for keep in (0.97, 0.9, 0.6, 0.05):  # word survival; shingle Jaccard about 0.75, 0.42, 0.04, 0
        words = [w if rng.random() < keep else f"x{rng.randrange(10**6)}" for w in base]
        documents.append(" ".join(words))
    signatures = minhash_signatures(documents)
    first = set(shingle_hashes(documents[0]).tolist())
    for k in range(1, len(documents)):
        other = set(shingle_hashes(documents[k]).tolist())
        exact = len(first & other) / len(first | other)
        assert abs(np.mean(signatures[0] == signatures[k]) - exact) < 0.1, (k, exact)
    groups = near_duplicate_groups(documents)
    assert groups[1] == groups[0] and len(set(groups[2:])) == 3 and groups[0] not in groups[2:]


def test_stream_rejects_a_domain_without_windows():
    with pytest.raises(ValueError, match="at least one window"):
        TrainStream(["a", "b"], [3, 0], [1.0, 1.0], 0)


def test_a_domain_of_copies_is_named_before_any_data_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    domains = write_domains(tmp_path, 1)
    (tmp_path / "same").mkdir()
    for i in range(3):
        (tmp_path / "same" / f"{i}.txt").write_text("the same licence text, word for word. " * 20)
    with pytest.raises(ValueError, match=r"domain 'same': all 3 documents are near-duplicates of each other"):
        make({**domains, "same": str(tmp_path / "same" / "*.txt")}, train_weights=None)
    assert not (tmp_path / "cache" / "prepared").exists() or not any((tmp_path / "cache" / "prepared").iterdir())
