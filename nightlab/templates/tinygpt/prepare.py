"""tinygpt harness: data, tokenizer, and the one metric (validation bits per byte). Never edited by the agent.

    python prepare.py                      # download Shakespeare, split it, train the tokenizer (cached)
    python prepare.py --data PATH          # or your own .txt / .jsonl / .parquet files or folders
    python prepare.py --data hf:NAME       # or a Hugging Face dataset (needs `datasets` and a network)
    python prepare.py evaluate --split val # score run/checkpoint.pt; this is how the loop gets the metric

The dataset can also be chosen with the TINYGPT_DATA environment variable, which train.py and the evaluate
step read too. Splits live in separate folders (`<cache>/tinygpt/{train,val,test}/<dataset>`) so a sandbox can
hide the validation split while training runs and the test split while scoring runs.

The evaluate step never imports train.py itself: it runs the model in a separate worker process (the hidden
`model-worker` subcommand) that holds no key, and computes the loss from the logits the worker returns. The
key handling, the worker's jail and pipe, and the probes of causality come from `nightlab.harness`; device
questions from `nightlab.hardware`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import corpus
from corpus import SPLITS, Source, default_source, split_documents

from nightlab import hardware, harness
from nightlab.hardware import fast_bf16, pick_device
from nightlab.paths import cache_dir

if __name__ == "__main__" and "evaluate" in sys.argv[1:]:
    harness.reexec_without_key()  # before numpy and torch load, so the key leaves the environment block early

import numpy as np  # noqa: E402 - after the key is out of the environment
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Fixed settings: changing any of these makes results incomparable with earlier runs.

SEQ_LEN = 256  # context length of every evaluated sequence
EVAL_TOKENS = 64 * SEQ_LEN  # target tokens scored (fewer if the split is smaller); eval stays cheap on a CPU
EVAL_BATCH = 16  # sequences per forward pass during evaluation
VOCAB_SIZE = 2048  # default tokenizer size; small, as CPU time spent on the output head is not spent learning
BOS = "<|bos|>"  # starts every document; worth 0 bytes, never scored
# The split fractions and the default corpus are fixed in corpus.py.


def default_vocab_size() -> int:
    return int(os.environ.get("TINYGPT_VOCAB_SIZE") or VOCAB_SIZE)


def resolve_source(spec: str | None = None, vocab_size: int | None = None) -> Source:
    """The prepared dataset a source names (TINYGPT_DATA by default), at this tokenizer size."""
    return corpus.resolve_source(spec or default_source(), vocab_size or default_vocab_size())


def progress(items, total: int, label: str):
    """Yield `items` while drawing a one-line bar on stderr; when it is no terminal, only the end is told."""
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
    return cache_dir() / "tinygpt" / split / (source or resolve_source()).name


def tokenizer_dir(source: Source | None = None) -> Path:
    return cache_dir() / "tinygpt" / "tokenizer" / (source or resolve_source()).name


def prepare(spec: str | None = None, vocab_size: int | None = None) -> Path:
    """Download, split, train the tokenizer and tokenize; return the tokenizer folder. Cached."""
    vocab = vocab_size or default_vocab_size()
    source = resolve_source(spec, vocab)
    corpus.remember_source(spec or default_source(), source, vocab)
    marker = tokenizer_dir(source) / "prepared.json"
    if marker.exists():
        print(f"data ready: {source.name} (cached under {cache_dir() / 'tinygpt'})", file=sys.stderr)
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
# Peak FLOP/s for train.py's MFU, cached next to the data.


def peak_flops(device: torch.device, dtype: torch.dtype, refresh: bool = False) -> float:
    """FLOP/s the device can reach for matmuls in `dtype` (`python prepare.py` measures again)."""
    return hardware.peak_flops(device, dtype, cache_dir() / "tinygpt" / "hw", refresh)


# ---------------------------------------------------------------------------------------------------------
# The metric.


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


def check_causality(model: torch.nn.Module, vocab: int, trials: int = 2) -> str | None:
    """The probes in process, on random tokens; returns the reason when the model fails one."""
    model.eval()
    return harness.check_causality(lambda x: model_logits(model, x, vocab), vocab, (2, SEQ_LEN), trials)


def score_with_probes(
    logits: harness.Logits, data: EvalTokens, rng: random.Random, probe_logits: harness.Logits | None = None
) -> tuple[float, int, int]:
    """Score every batch in order and probe the model between them, at places drawn from `rng`, the probes
    answered by `probe_logits` (see `nightlab.harness.ProbePlan`). Raises ValueError naming a failed probe."""
    batches = data.batches()
    shape = (EVAL_BATCH, SEQ_LEN)
    probes = harness.ProbePlan(logits, data.vocab, shape, len(batches), rng, probe_logits)
    nats, nbytes, scored = 0.0, 0, 0
    last: tuple[torch.Tensor, torch.Tensor] | None = None
    for done, (x, y) in enumerate(batches):
        probes.run(done, last)
        last = (x, logits(x))
        batch_nats, batch_bytes, batch_scored = batch_loss(last[1], y, data.token_bytes)
        nats, nbytes, scored = nats + batch_nats, nbytes + batch_bytes, scored + batch_scored
    probes.run(len(batches), last)
    return nats, nbytes, scored


# ---------------------------------------------------------------------------------------------------------
# The evaluate step. Two processes: this harness process never imports train.py. It reads the key, the split,
# the token byte counts and the checkpoint first, then starts a model worker (`prepare.py model-worker`) with
# a minimal environment and no key, jailed by bubblewrap where it works (the splits and raw data hidden, the
# file system read-only). The worker imports train.py, loads the weights sent over its stdin and answers
# token batches with logits; the harness computes the loss, checks causality, and signs the result.

WORKER_READY_SECONDS = float(os.environ.get("TINYGPT_WORKER_READY_SECONDS") or 120)  # import, load weights
WORKER_ANSWER_SECONDS = float(os.environ.get("TINYGPT_WORKER_ANSWER_SECONDS") or 60)  # one batch of logits


def _fail(reason: str) -> None:
    print(f"FAIL: {reason}", flush=True)
    raise SystemExit(1)


def _read_checkpoint(checkpoint: Path) -> tuple[bytes, dict]:
    config_path = checkpoint.with_name("model.json")
    if not checkpoint.exists() or not config_path.exists():
        _fail(f"no checkpoint at {checkpoint} (+ model.json); did train.py finish and save?")
    config = json.loads(config_path.read_text()).get("config")
    if not isinstance(config, dict):
        _fail(f"{config_path} has no `config` object")
    return checkpoint.read_bytes(), config


def _hidden_from_worker() -> list[Path]:
    """What the model worker must not see: the validation and test splits, and the raw data they came from."""
    source = resolve_source()
    paths = [
        cache_dir() / "tinygpt" / "val",
        cache_dir() / "tinygpt" / "test",
        cache_dir() / "downloads",
        Path(os.environ.get("PIP_CACHE_DIR") or Path.home() / ".cache" / "pip"),
    ]
    if source.spec.startswith("hf:"):
        paths.append(Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"))
    elif source.spec != "shakespeare":
        paths.append(Path(source.spec))
    return paths


def _worker_logits(worker: harness.ModelWorker, vocab: int) -> harness.Logits:
    """The model's logits for token ids x (B, SEQ_LEN), asked of the worker: float32 (B, SEQ_LEN, vocab)."""

    def logits(x: torch.Tensor) -> torch.Tensor:
        payload = worker.ask(x.contiguous().numpy().tobytes(), limit=WORKER_ANSWER_SECONDS)
        if len(payload) != x.numel() * vocab * 4:
            raise harness.WorkerError(
                f"the model worker sent {len(payload)} bytes of logits for a batch of "
                f"{tuple(x.shape)} tokens and a vocabulary of {vocab}"
            )
        return torch.frombuffer(payload, dtype=torch.float32).view(*x.shape, vocab)

    return logits


def evaluate_main(split: str, checkpoint: Path, train_file: Path, key: str | None) -> None:
    """Score the checkpoint with train.py's model in a worker process, probed through a second one that never
    sees the scored batches; print the score, signed if keyed."""
    start = time.time()
    try:
        data = read_eval_tokens(split)
    except (OSError, ValueError) as exc:
        _fail(f"could not read the {split} split: {exc}")
    weights, config = _read_checkpoint(checkpoint)
    here = Path(__file__).resolve()
    argv = [sys.executable, str(here), "model-worker", "--train-file", str(train_file.resolve())]

    def worker() -> harness.ModelWorker:
        return harness.ModelWorker(
            argv,
            code=train_file,
            hidden=_hidden_from_worker(),
            needed=[here],
            keep_env=("TINYGPT_",),
            env={"NIGHTLAB_CACHE_DIR": str(cache_dir())},
            max_message=EVAL_BATCH * SEQ_LEN * data.vocab * 4 + (1 << 20),
        )

    try:
        with worker() as scorer, worker() as prober:  # gone when this block ends, before anything is signed
            print(f"model worker: sandbox {scorer.sandbox}", file=sys.stderr, flush=True)
            for w in (scorer, prober):
                w.start({"config": config, "vocab": data.vocab}, weights, limit=WORKER_READY_SECONDS)
            rng = random.Random(os.urandom(32))
            logits, probe_logits = (_worker_logits(w, data.vocab) for w in (scorer, prober))
            nats, nbytes, scored = score_with_probes(logits, data, rng, probe_logits)
        bpb = bits_per_byte(nats, nbytes)
    except (harness.WorkerError, ValueError) as exc:
        _fail(str(exc))
    metrics = {"val_bpb": bpb, "eval_seconds": round(time.time() - start, 3), "eval_tokens": scored}
    if key:
        print(harness.sign_metrics(metrics, key), flush=True)
    print(
        f"split: {split}\nval_bpb: {bpb:.6f}\neval_seconds: {metrics['eval_seconds']:.1f}\n"
        f"worker_sandbox: {scorer.sandbox}",
        flush=True,
    )


def _build_model(train: ModuleType, hello: dict, weights: bytes) -> harness.Answer:
    """In the model worker: train.py's GPT with the checkpoint's weights, answering token ids with logits."""
    model = train.GPT(train.GPTConfig(**hello["config"]))
    model.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True), strict=True)
    model = model.to(pick_device()).eval()

    def answer(request: bytes) -> bytes:
        x = torch.frombuffer(bytearray(request), dtype=torch.int64).view(-1, SEQ_LEN)
        return model_logits(model, x, hello["vocab"]).contiguous().numpy().tobytes()

    return answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tinygpt harness: prepare data, or score a trained model.")
    parser.add_argument("--data", default=None, help="shakespeare (default), a path, or hf:NAME[:CONFIG]")
    parser.add_argument("--vocab-size", type=int, default=None, help=f"tokenizer size (default {VOCAB_SIZE})")
    sub = parser.add_subparsers(dest="command", metavar="{evaluate}")
    ev = sub.add_parser("evaluate", help="score a checkpoint; prints val_bpb (signed when a key is given)")
    ev.add_argument("--split", choices=("val", "test"), default="val")
    ev.add_argument("--checkpoint", type=Path, default=Path("run/checkpoint.pt"))
    ev.add_argument("--train-file", type=Path, default=Path(__file__).with_name("train.py"))
    worker = sub.add_parser("model-worker")  # started by `evaluate`; not for direct use
    worker.add_argument("--train-file", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.data:
        os.environ["TINYGPT_DATA"] = args.data
    if args.vocab_size:
        os.environ["TINYGPT_VOCAB_SIZE"] = str(args.vocab_size)
    if args.command == "model-worker":
        harness.serve_model(args.train_file, _build_model)
        return
    if args.command == "evaluate":
        evaluate_main(args.split, args.checkpoint, args.train_file, harness.read_key())
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
