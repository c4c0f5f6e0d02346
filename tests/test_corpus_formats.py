"""Corpora as they come at scale: gzip/zstd JSON lines, Parquet, Arrow and Hugging Face
`save_to_disk` folders, read as streams; and folders never drop a file silently."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from bam_lightning.data import BAMDataModule
from bam_lightning.data.corpora import load_documents, read_documents, resolve_files

TEXTS = ["first doc", "second\u2028doc with a line separator", "third \u00e9\u00e8 doc"]


def jsonl_bytes(texts, field="text"):
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def write_saved_dataset(folder, texts, field="text", shards=2):
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC stream shards, state.json listing
    them, dataset_info.json (written here with pyarrow alone)."""
    folder.mkdir(parents=True)
    names = []
    for shard in range(shards):
        name = f"data-{shard:05d}-of-{shards:05d}.arrow"
        table = pa.table({field: texts[shard::shards], "n": list(range(len(texts[shard::shards])))})
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        names.append(name)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "x", "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {field: {"dtype": "string"}}}))
    return [t for shard in range(shards) for t in texts[shard::shards]]


def test_each_format_reads_every_document_in_order(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(TEXTS)))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(TEXTS[::-1])))
    pq.write_table(pa.table({"text": TEXTS, "other": [1, 2, 3]}), tmp_path / "c.parquet", row_group_size=2)
    saved = write_saved_dataset(tmp_path / "saved", TEXTS)
    assert load_documents("d", str(tmp_path / "a.jsonl.gz")) == TEXTS
    assert load_documents("d", str(tmp_path / "b.jsonl.zst")) == TEXTS[::-1]
    assert load_documents("d", str(tmp_path / "c.parquet")) == TEXTS
    assert load_documents("d", str(tmp_path / "saved")) == saved and sorted(saved) == sorted(TEXTS)
    everything = read_documents(resolve_files("d", str(tmp_path)))
    assert everything == TEXTS + TEXTS[::-1] + TEXTS + saved  # the folder, in sorted order


def test_a_named_field_or_column(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(TEXTS, "content")))
    pq.write_table(pa.table({"content": TEXTS}), tmp_path / "b.parquet")
    write_saved_dataset(tmp_path / "saved", TEXTS, field="content", shards=1)
    for name in ("a.jsonl.gz", "b.parquet", "saved"):
        assert load_documents("d", str(tmp_path / name), text_field="content") == TEXTS
    with pytest.raises(ValueError, match=r'b\.parquet: no "text" column \(columns: content\)'):
        load_documents("d", str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match=r'a\.jsonl\.gz, line 1: no "text" field'):
        load_documents("d", str(tmp_path / "a.jsonl.gz"))


def test_a_folder_reads_every_file_and_names_an_unsupported_one(tmp_path):
    book = tmp_path / "book"
    book.mkdir()
    for chapter in range(20):
        (book / f"chapter{chapter:02d}.txt").write_text(f"chapter {chapter}")
    (book / "notes.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(["note one", "note two"])))
    (book / ".hidden.swp").write_bytes(b"\x00editor state")  # hidden: skipped, as documented
    (book / ".git").mkdir()
    (book / ".git" / "HEAD").write_text("ref")
    documents = load_documents("book", str(book))
    assert len(documents) == 22 and documents[-2:] == ["note one", "note two"]
    (book / "cover.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"folder .*book holds .*cover\.png, an unsupported file type"):
        resolve_files("book", str(book))
    (book / "cover.png").unlink()
    saved = write_saved_dataset(book / "saved", TEXTS)  # a save_to_disk folder inside: read too
    assert load_documents("book", str(book)) == documents + saved
    (book / "saved" / "cache-1234.arrow").write_bytes(b"x")  # not listed in its state.json
    with pytest.raises(ValueError, match=r"cache-1234\.arrow is in a save_to_disk folder but not one of"):
        resolve_files("book", str(book))


def test_broken_compressed_and_columnar_files_are_named(tmp_path):
    (tmp_path / "torn.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(TEXTS * 50))[:60])
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    for name, message in (("torn.jsonl.gz", "cannot decompress"), ("bad.jsonl.zst", "cannot decompress"),
                          ("bad.parquet", "not a readable .parquet file"),
                          ("ints.parquet", 'column "text" holds int64, not strings')):
        with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: {message}"):
            load_documents("d", str(tmp_path / name))


def test_the_data_module_prepares_a_parquet_domain_with_a_named_column(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    texts = [f"document number {i} " * (5 + i) for i in range(12)]
    pq.write_table(pa.table({"body": texts}), tmp_path / "corpus.parquet")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(texts)))
    data = BAMDataModule(domains={"pq": str(tmp_path / "corpus.parquet"), "zst": str(tmp_path / "plain")},
                         text_fields={"pq": "body"}, seq_len=8, val_fraction=0.25)
    data.prepare_data()
    data.setup("fit")
    for domain in ("pq", "zst"):
        counts = data.manifest["domains"][domain]
        assert counts["train"]["documents"] + counts["val"]["documents"] == 12
        assert counts["train"]["bytes"] + counts["val"]["bytes"] == sum(len(t.encode()) for t in texts)
    with pytest.raises(ValueError, match=r"text_fields\['nope'\]"):
        BAMDataModule(domains={"pq": str(tmp_path / "corpus.parquet")}, text_fields={"nope": "body"})
