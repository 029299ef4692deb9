"""Images inside model inputs, for Qwen-VL-style image-text-to-text models.

A client sends text tokens with images between them (Tinker's `ImageChunk`, OpenAI's `image_url` parts). Each
image becomes as many placeholder tokens (`image_token_id`) as the model's image processor makes patches after
the spatial merge, so positions, targets and logprobs count an image the way the Tinker SDK's
`expected_tokens` does. The vision tower's embeddings replace the placeholders inside the model, and M-RoPE
positions (3 axes; an image advances text positions by its larger side only) come from the model's own
`get_rope_index`, so training and sampling place every token where the model expects it.
"""

from __future__ import annotations

import io
import itertools
import json
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from nightlab.train.errors import EngineError, UserError
from nightlab.train.records import ImageInput

FORMATS = {"png": "PNG", "jpeg": "JPEG"}  # the formats Tinker's ImageChunk declares, as PIL names them
MAX_IMAGE_PIXELS = 40_000_000  # a decoded image past this is refused before its pixels are allocated
MAX_IMAGE_TOKENS = 16384  # placeholders of one image at Qwen-VL's default largest size (12.8 Mpixel / 28²)


def decode_image(data: bytes, fmt: str, what: str) -> Any:
    """The RGB PIL image in `data`, which must really be a `fmt` ("png" or "jpeg") image; refuses, naming
    `what`, bytes that are not, a truncated file, or an image too large to decode safely."""
    from PIL import Image, UnidentifiedImageError

    pil_name = FORMATS.get(fmt.lower())
    if pil_name is None:
        raise UserError(f"{what}: image format {fmt!r} is not supported; send png or jpeg")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format != pil_name:
                raise UserError(f"{what}: the bytes are a {image.format or 'unknown'} image, not {fmt}")
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise UserError(
                    f"{what}: {image.width}x{image.height} pixels is over the limit of {MAX_IMAGE_PIXELS}"
                )
            image.load()
    except UserError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as exc:
        raise UserError(f"{what}: not a readable {fmt} image ({exc})") from None
    return image.convert("RGB")


def image_processor(location: str) -> Any:
    """The model's image processor; without torchvision, the PIL twin of the class its config names
    (transformers' auto class needs torchvision even where a PIL implementation exists)."""
    import transformers
    from transformers.utils import cached_file

    try:
        return transformers.AutoImageProcessor.from_pretrained(location)
    except ImportError:
        with open(cached_file(location, "preprocessor_config.json")) as f:
            name = json.load(f)["image_processor_type"].removesuffix("Fast")
        return getattr(transformers, f"{name}Pil").from_pretrained(location)


@dataclass
class Pixels:
    """One sequence's images, preprocessed: patch rows of all its images and each image's (t, h, w) grid."""

    values: torch.Tensor
    grid: torch.Tensor


@dataclass
class Vision:
    """What a vision-language base needs to take images: its image processor and placeholder token ids."""

    processor: Any
    image_token_id: int
    placeholder_ids: frozenset[int]  # image and video pads: only images may put them in a sequence
    rope_index: Any  # the model's get_rope_index: M-RoPE positions and deltas of a batch

    def expand(
        self, tokens: list[int], images: list[ImageInput], what: str
    ) -> tuple[list[int], Pixels | None]:
        """`tokens` with each image's placeholders inserted at its place, and the images' pixels. Refuses
        (EngineError, naming `what`) placeholder ids sent as text and an image whose token count is not the
        one its `expected_tokens` declared."""
        if any(t in self.placeholder_ids for t in tokens):
            raise EngineError(
                f"{what}: token ids {sorted(self.placeholder_ids)} are image placeholders; send images as "
                "image chunks, not their placeholder tokens"
            )
        if not images:
            return tokens, None
        if any(a.at == b.at for a, b in itertools.pairwise(images)):
            raise EngineError(f"{what}: two images with no token between them; separate them with text")
        pictures = [
            decode_image(image.data, image.format, f"{what}: image {i}") for i, image in enumerate(images)
        ]
        batch = self.processor(images=pictures, return_tensors="pt")
        grid = batch["image_grid_thw"]
        counts = (grid.prod(-1) // self.processor.merge_size**2).tolist()
        out: list[int] = []
        start = 0
        for index, (image, picture, count) in enumerate(zip(images, pictures, counts, strict=True)):
            if image.expected_tokens is not None and image.expected_tokens != count:
                raise EngineError(
                    f"{what}: image {index} ({picture.width}x{picture.height}) is {count} tokens for this "
                    f"model, not the {image.expected_tokens} its expected_tokens says"
                )
            out += tokens[start : image.at] + [self.image_token_id] * count
            start = image.at
        return out + tokens[start:], Pixels(batch["pixel_values"], grid)


def vision_of(model: Any, location: str) -> Vision | None:
    """The Vision of a loaded image-text-to-text model (None for a text-only one), `location` being where its
    image processor is saved."""
    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    body = getattr(model, model.base_model_prefix, None)
    if image_token_id is None or not hasattr(body, "get_rope_index"):
        return None
    video = getattr(config, "video_token_id", None)
    placeholders = frozenset(t for t in (image_token_id, video) if t is not None)
    try:
        processor = image_processor(location)
    except (OSError, KeyError, AttributeError) as error:
        raise EngineError(f"{location} takes images but has no usable image processor: {error}") from None
    return Vision(processor, image_token_id, placeholders, body.get_rope_index)


def model_inputs(
    vision: Vision, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: list[Pixels | None]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The extra forward inputs of a batch whose rows carry `pixels` (pixel values, grids, M-RoPE position
    ids), and each row's rope delta: how far its next text position is from its count of tokens."""
    present = [p for p in pixels if p is not None]
    grid = torch.cat([p.grid for p in present])
    kinds = (input_ids == vision.image_token_id).int()
    positions, deltas = vision.rope_index(
        input_ids, mm_token_type_ids=kinds, image_grid_thw=grid, attention_mask=attention_mask
    )
    inputs = {
        "pixel_values": torch.cat([p.values for p in present]).to(input_ids.device),
        "image_grid_thw": grid.to(input_ids.device),
        "position_ids": positions,
    }
    return inputs, deltas.view(-1)
