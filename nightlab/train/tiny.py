"""A tiny random-init causal LM with a locally trained tokenizer, so tests and demos never need a hub.

It is a regular Hugging Face model directory (config, safetensors, tokenizer with a chat template), prepared
the same way as any real model, so every code path that serves a real model serves this one too.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "this",
    "be",
    "are",
    "from",
    "or",
    "have",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "your",
    "which",
    "their",
    "said",
    "if",
    "do",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "she",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "her",
    "two",
    "like",
    "him",
    "see",
    "time",
    "could",
    "no",
    "make",
    "than",
    "first",
    "been",
    "its",
    "who",
    "now",
    "people",
    "my",
    "made",
    "over",
    "did",
    "down",
    "only",
    "way",
    "find",
    "use",
    "may",
    "water",
    "long",
    "little",
    "very",
    "after",
    "words",
    "called",
    "just",
    "where",
    "most",
    "know",
    "question",
    "answer",
    "think",
    "wait",
    "plus",
    "minus",
    "times",
    "equals",
    "number",
    "sum",
    "result",
    "reason",
    "step",
    "because",
    "therefore",
]


def _corpus(lines: int, seed: int) -> list[str]:
    """Deterministic pseudo-text with words, digits, arithmetic and chat markers, enough to train a BPE."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        out.append(" ".join(words) + f". {a} + {b} = {a + b}. <|im_start|>user\nhi<|im_end|>\n")
    return out


def train_tokenizer(vocab_size: int, seed: int, special_tokens: list[str]):
    """A byte-level BPE trained on the pseudo-text corpus; ChatML markers are its BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(2000, seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def new_model_dir(
    path: Path,
    vocab_size: int,
    seed: int,
    extra_tokens: tuple[str, ...] = (),
    last_file: str = "tokenizer.json",
    chat_template: str | None = None,
) -> Any | None:
    """Start a tiny model directory: write its tokenizer (ChatML, with `extra_tokens`; `chat_template` or
    CHAT_TEMPLATE) to `path` and return it; None when `path` already holds a complete model (its config and
    `last_file`), which the builders then reuse, so that session-scoped test fixtures stay cheap."""
    if (path / "config.json").is_file() and (path / last_file).is_file():
        return None
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size, seed, SPECIAL_TOKENS + list(extra_tokens))
    tokenizer.chat_template = chat_template or CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def decoder_fields(
    tokenizer: Any, hidden_size: int, num_layers: int, num_heads: int, max_positions: int
) -> dict[str, Any]:
    """The config fields every tiny decoder shares: its sizes, untied embeddings, and the tokenizer's
    vocabulary and special ids (so generation stops and pads as the chat template expects)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": max_positions,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }


def make_tiny_model(
    path: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tiny Llama-architecture model and its tokenizer to `path`; return the path.

    Idempotent: an existing complete directory is reused, so session-scoped test fixtures stay cheap.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = new_model_dir(path, vocab_size, seed)
    if tokenizer is None:
        return path

    config = LlamaConfig(
        intermediate_size=hidden_size * 4,
        **decoder_fields(tokenizer, hidden_size, num_layers, num_heads, max_positions),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return path
