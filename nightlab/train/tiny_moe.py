"""Tiny random-init Mixture-of-Experts causal LMs (Qwen3-MoE, OLMoE, Mixtral), for tests that need no hub.

Like `tiny`, each is a regular Hugging Face directory with the same ChatML tokenizer, so the service loads it
the way it loads a real MoE checkpoint. In transformers 5 all three families keep their experts as fused 3-D
parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) behind a top-k router (`mlp.gate`).
"""

from __future__ import annotations

from pathlib import Path

from nightlab.train.tiny import decoder_fields, new_model_dir

# model_type: its config's names for the number of experts and for one expert's hidden width
MOE_FAMILIES = {
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
    "olmoe": ("num_experts", "intermediate_size"),
    "mixtral": ("num_local_experts", "intermediate_size"),
}


def make_tiny_moe_model(
    path: str | Path,
    family: str,
    *,
    num_experts: int = 4,
    experts_per_token: int = 2,
    vocab_size: int = 512,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tiny MoE model of `family` (a key of MOE_FAMILIES) and its tokenizer to `path`; return the
    path. Idempotent, like `make_tiny_model`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in MOE_FAMILIES:
        raise ValueError(f"unknown MoE family {family!r}: pick one of {', '.join(MOE_FAMILIES)}")
    path = Path(path)
    tokenizer = new_model_dir(path, vocab_size, seed)
    if tokenizer is None:
        return path

    count_key, width_key = MOE_FAMILIES[family]
    config = AutoConfig.for_model(
        family,
        **{count_key: num_experts, width_key: hidden_size * 2},
        num_experts_per_tok=experts_per_token,
        **decoder_fields(tokenizer, hidden_size, num_layers, num_heads, max_positions),
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    return path
