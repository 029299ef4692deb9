"""tinygpt harness: data sources, deterministic splits, exact byte counts, and the bits-per-byte metric."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.templates.tinygpt_support import VOCAB, load_prepare, write_corpus


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """prepare.py run once on a small .txt corpus in a temp cache; env stays pointed at it for the module."""
    root = tmp_path_factory.mktemp("tinygpt_prepare")
    texts = write_corpus(root / "corpus")
    with pytest.MonkeyPatch.context() as mp:
        prep = load_prepare(mp, root / "cache", root / "corpus")
        prep.prepare()
        yield prep, root, texts


def test_prepare_writes_each_split_to_its_own_folder(harness):
    prep, root, texts = harness
    info = prep.dataset_info()
    assert info["vocab_size"] == VOCAB
    assert sum(info[f"{s}_bytes"] for s in prep.SPLITS) == sum(len(t.encode()) for t in texts)
    folders = {s: prep.split_dir(s) for s in prep.SPLITS}
    assert len({f.parent.name for f in folders.values()}) == 3, "splits must be separately hideable folders"
    for split, folder in folders.items():
        assert folder.is_relative_to(root / "cache" / "tinygpt" / split)
        tokens = prep.load_tokens(split)
        assert len(tokens) == info[f"{split}_tokens"] > 0
        assert tokens[0] == info["bos_id"]
    assert info["val_bytes"] < 0.15 * info["train_bytes"]


def test_splits_are_deterministic_and_disjoint(harness):
    prep, root, _ = harness
    docs = prep.resolve_source().documents()
    first = prep.split_documents(docs)
    again = prep.split_documents(list(reversed(docs)))
    assert {s: sorted(p) for s, p in first.items()} == {s: sorted(p) for s, p in again.items()}
    val, test, train = set(first["val"]), set(first["test"]), set(first["train"])
    assert val and test and train
    assert not (val & test) and not (val & train) and not (test & train)


def test_jsonl_and_parquet_sources_read_the_same_documents(harness, tmp_path):
    prep, root, texts = harness
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "j").mkdir()
    with (tmp_path / "j" / "docs.jsonl").open("w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t, "id": 1}) + "\n")
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"text": texts}), tmp_path / "p" / "part-0.parquet")
    for folder in ("j", "p"):
        source = prep.resolve_source(str(tmp_path / folder))
        assert [t for _, t in source.documents()] == texts
    # a Hugging Face style source, read through `datasets` from local parquet files
    hf = prep.resolve_source(f"hf:{tmp_path / 'p'}")
    assert [t for _, t in hf.documents()] == texts


def test_prepare_from_jsonl_end_to_end(harness, tmp_path, monkeypatch):
    prep, _, texts = harness
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    monkeypatch.setenv("TINYGPT_DATA", str(data))
    monkeypatch.setenv("NIGHTLAB_CACHE_DIR", str(tmp_path / "cache"))
    prep.prepare()
    assert (tmp_path / "cache" / "tinygpt" / "val" / prep.resolve_source().name / "tokens.bin").exists()


def test_bad_input_is_a_clear_error(harness, tmp_path):
    prep, _, _ = harness
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(SystemExit, match="text"):
        prep.resolve_source(str(tmp_path / "bad.jsonl")).documents()
    with pytest.raises(SystemExit, match="does not exist"):
        prep.resolve_source(str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="too small"):
        prep.split_documents([("a", "one line\n")])


def test_tokenizer_round_trip_and_exact_bytes(harness):
    prep, _, texts = harness
    tok = prep.load_tokenizer()
    tbytes = prep.token_bytes()
    raw = prep.token_raw_bytes(tok)
    text = texts[0] + "größe 日本語 😀 unseen: ÿ€\n"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert b"".join(raw[i] for i in ids) == text.encode()
    assert int(tbytes[ids].sum()) == len(text.encode())
    assert tbytes[tok.token_to_id(prep.BOS)] == 0


def test_tokens_that_are_not_utf8_count_their_real_bytes(harness):
    prep, _, _ = harness
    tok = prep.load_tokenizer()
    tbytes = prep.token_bytes()
    raw = prep.token_raw_bytes(tok)

    def valid(b: bytes) -> bool:
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    partial = [i for i, b in enumerate(raw) if b and not valid(b)]
    merged = [i for i in partial if len(raw[i]) > 1]
    assert merged, "the corpus's CJK/emoji should yield merged tokens that are fragments of a character"
    for i in partial:
        assert tbytes[i] == len(raw[i])
        assert raw[i] == tok.decode([i]).encode("utf-8") or "\ufffd" in tok.decode([i])
    # decoding such a token on its own gives U+FFFD (3 bytes), which is how byte counts go wrong
    assert any(len(tok.decode([i]).encode()) != tbytes[i] for i in partial)


class Bigram(torch.nn.Module):
    """logits[b, t] = table[idx[b, t]]: causal, and simple enough to score by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx):
        return self.table[idx]


def test_evaluate_bpb_matches_a_hand_computation(harness):
    prep, _, _ = harness
    model = Bigram(VOCAB)
    first = prep.evaluate_bpb(model, "val")
    assert prep.evaluate_bpb(model, "val") == first, "evaluation must be deterministic"

    tokens = np.asarray(prep.load_tokens("val"), dtype=np.int64)
    tbytes = prep.token_bytes().numpy()
    n = min(prep.EVAL_TOKENS, len(tokens) - 1) // prep.SEQ_LEN * prep.SEQ_LEN
    x, y = tokens[:n], tokens[1 : n + 1]
    table = model.table.detach().double().numpy()
    logz = np.log(np.exp(table - table.max(1, keepdims=True)).sum(1)) + table.max(1)
    nll = logz[x] - table[x, y]
    scored = tbytes[y] > 0
    assert not scored.all(), "the split should contain document separators, which are not scored"
    expected = nll[scored].sum() / (math.log(2) * tbytes[y].sum())
    assert first == pytest.approx(expected, rel=1e-5)


def test_causality_check_catches_a_model_that_looks_ahead(harness):
    prep, _, _ = harness
    assert prep.check_causality(Bigram(VOCAB), VOCAB) is None

    class Peeking(Bigram):
        def forward(self, idx):
            return self.table[idx] + idx.float().mean(dim=1, keepdim=True)[..., None]

    assert "causal" in prep.check_causality(Peeking(VOCAB), VOCAB)


def test_phases_that_cannot_see_the_raw_corpus_find_its_prepared_splits(monkeypatch, tmp_path):
    """The sandbox hides a user's raw texts outside setup (an empty dir in their place); training and
    evaluation still find what setup prepared, and a changed corpus that is visible is prepared anew."""
    write_corpus(tmp_path / "corpus", files=6)
    prep = load_prepare(monkeypatch, tmp_path / "cache", tmp_path / "corpus")
    prep.prepare()
    prepared = prep.resolve_source().name
    (tmp_path / "corpus").rename(tmp_path / "elsewhere")
    (tmp_path / "corpus").mkdir()  # what the jail shows: an empty directory
    assert prep.resolve_source().name == prepared
    assert prep.dataset_info()["vocab_size"] == VOCAB and len(prep.load_tokens("train")) > 0
    (tmp_path / "corpus").rmdir()
    write_corpus(tmp_path / "corpus", files=7, seed=1)  # visible and different: not the prepared one
    assert prep.resolve_source().name != prepared
    with pytest.raises(SystemExit, match="not prepared"):
        prep.dataset_info()
