"""The documents a user reads stay true to the tree: every relative link points at a file that
exists, and no document carries a path of the machine it was written on."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.md"),
                    *ROOT.glob("recipes/**/*.md")])
MACHINE_PATHS = re.compile(r"(/root/|/work/|/home/\w+|/tmp/[\w.-]+/)")
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_relative_links_in_documents_resolve():
    broken = []
    for document in DOCUMENTS:
        for target, _ in LINK.findall(document.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (document.parent / target).exists():
                broken.append(f"{document.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_no_document_carries_a_path_of_the_machine_it_was_written_on():
    found = []
    for document in DOCUMENTS:
        for number, line in enumerate(document.read_text().splitlines(), 1):
            if MACHINE_PATHS.search(line):
                found.append(f"{document.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert not found, found
