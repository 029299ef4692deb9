"""A tiny random-init Qwen2.5-VL with its tokenizer and image processor, for vision tests that need no hub.

Like `tiny`, it is a regular Hugging Face directory (config, safetensors, tokenizer with a chat template that
takes image content parts, preprocessor config), so the service loads it the way it loads a real
Qwen2.5-VL: through the image-text-to-text class and `AutoImageProcessor`.
"""

from __future__ import annotations

from pathlib import Path

from nightlab.train.tiny import new_model_dir

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen's layout of one image in text: the image processor's patches replace the single pad token
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PATCH_SIZE = 14
MERGE_SIZE = 2
# small images: a 56 x 56 picture is 4 x 4 patches, 4 tokens after the 2 x 2 merge
MIN_PIXELS = (PATCH_SIZE * MERGE_SIZE * 2) ** 2
MAX_PIXELS = (PATCH_SIZE * MERGE_SIZE * 4) ** 2


def make_tiny_vlm(
    path: str | Path, *, vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> Path:
    """Write a tiny Qwen2.5-VL (vision tower, merger, language model), its tokenizer and image processor to
    `path`; return the path. Idempotent, like `make_tiny_model`."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = new_model_dir(
        path, vocab_size, seed, tuple(VISION_TOKENS), "preprocessor_config.json", CHAT_TEMPLATE
    )
    if tokenizer is None:
        return path
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    ).save_pretrained(path)
    heads = 4
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 4,
            "num_hidden_layers": num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": 2,
            "window_size": PATCH_SIZE * MERGE_SIZE * 2,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return path
