"""The forward path of forward_backward: check the data, cut it into microbatches, turn logits into losses.

Every datum is checked before any gradient is touched, so a bad datum refuses the whole request and leaves the
adapter as it was. Microbatches bound the padded (tokens x vocab) fp32 logits held in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nightlab.train import losses
from nightlab.train.errors import EngineError, LossError
from nightlab.train.lora import LoadedBase
from nightlab.train.records import Datum, ForwardBackwardResult, Precision
from nightlab.train.vision import Pixels, Vision, model_inputs

TOKENS_PER_MICROBATCH = 4096  # padded tokens per forward; bounds the (tokens x vocab) fp32 logits in memory


def pick_autocast(device: str, precision: Precision) -> torch.dtype | None:
    """The autocast of training AND sampling on a base (LoRA weights and logits stay fp32 either way).

    "auto" is bf16 on GPUs with bf16 only. On CPU it is fp32: bf16 would make AMX training ~1.8x faster but
    sampling slower, and the sampler's logprobs would drift from the trainer's by up to a few tenths of a
    nat (bf16 rounding on differently shaped matmuls), which RL importance ratios take for a policy change.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# --- checking the data ---


@dataclass
class Checked:
    """One datum, validated: token and target arrays, and the float loss inputs."""

    tokens: np.ndarray
    targets: np.ndarray  # (T,) or (T, K)
    inputs: dict[str, np.ndarray]
    pixels: Pixels | None = None  # its images, whose placeholders `tokens` holds


def _as_array(value: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError:
        raise EngineError(f"{what} must be a rectangular numeric array") from None
    if array.dtype.kind not in "biuf":
        raise EngineError(f"{what} must be numeric, got dtype {array.dtype}")
    return array


def _check_tokens(array: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise EngineError(f"{what} must hold integer token ids")
        array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise EngineError(f"{what} holds ids outside the vocabulary [0, {vocab_size})")
    return array.astype(np.int64)


def check_datum(
    index: int, datum: Datum, vocab_size: int, loss_fn: str, vision: Vision | None = None
) -> Checked:
    """Refuse, naming datum `index` and the input, anything the model (`vision` when it takes images) or
    loss `loss_fn` cannot take; images become their placeholder tokens here."""
    where = f"datum {index}"
    token_list, pixels = datum.tokens, None
    if vision is not None:
        token_list, pixels = vision.expand(datum.tokens, datum.images, where)
    elif datum.images:
        raise EngineError(f"{where}: this model takes no images; send text tokens only")
    tokens = _check_tokens(_as_array(token_list, f"{where}: tokens"), vocab_size, f"{where}: tokens")
    if tokens.ndim != 1 or tokens.size == 0:
        raise EngineError(f"{where}: tokens must be a non-empty 1-D list, got shape {tokens.shape}")
    if "target_tokens" not in datum.loss_fn_inputs:
        raise EngineError(f"{where}: loss_fn_inputs['target_tokens'] is missing")
    what = f"{where}: loss_fn_inputs['target_tokens']"
    targets = _check_tokens(_as_array(datum.loss_fn_inputs["target_tokens"], what), vocab_size, what)
    if targets.ndim not in (1, 2) or targets.shape[0] != tokens.size:
        raise EngineError(
            f"{what} must have shape (T,) or (T, K) with T = {tokens.size}, got {targets.shape}"
        )
    inputs = {
        key: _as_array(value, f"{where}: loss_fn_inputs[{key!r}]").astype(np.float32)
        for key, value in datum.loss_fn_inputs.items()
        if key != "target_tokens"
    }
    try:
        losses.check_inputs(loss_fn, targets.shape, {key: value.shape for key, value in inputs.items()})
    except LossError as error:
        raise EngineError(f"{where}: {error}") from None
    return Checked(tokens, targets, inputs, pixels)


def microbatches(data: list[Checked]) -> Iterator[list[int]]:
    """Consecutive datum indices whose padded batch stays within TOKENS_PER_MICROBATCH (at least one each)."""
    batch: list[int] = []
    longest = 0
    for i, datum in enumerate(data):
        longest_with = max(longest, datum.tokens.size)
        if batch and longest_with * (len(batch) + 1) > TOKENS_PER_MICROBATCH:
            yield batch
            batch, longest_with = [], datum.tokens.size
        batch.append(i)
        longest = longest_with
    if batch:
        yield batch


# --- running the model ---


def causal_logits(
    model, autocast: torch.dtype | None, *, keep: int = 0, **inputs: Any
) -> tuple[torch.Tensor, Any]:
    """fp32 logits of the last `keep` positions (all when 0), and the KV cache when `inputs` ask for one.

    Training and sampling both score tokens here, so a sampler and its trainer agree on the same weights (RL
    importance ratios compare the two). Under autocast only the transformer body runs in bf16; the
    unembedding stays fp32 so target logprobs stay accurate. `model` is the HF model, LoRA layers included.
    """
    autocast_ctx = (
        torch.autocast(model.device.type, dtype=autocast) if autocast is not None else nullcontext()
    )
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        with autocast_ctx:  # the head is more than a matmul here: let the model apply it
            output = model(**inputs, logits_to_keep=keep)
        return output.logits.float(), output.past_key_values
    body = getattr(model, model.base_model_prefix)
    with autocast_ctx:
        output = body(**inputs)
    head = model.get_output_embeddings()
    hidden = output.last_hidden_state[:, -keep:]
    return head(hidden.to(head.weight.dtype)).float(), output.past_key_values


def target_logprobs(base: LoadedBase, batch: list[Checked]) -> list[torch.Tensor]:
    """log p(target) per datum: position i of the input predicts targets[i]; (T,) or (T, K) each."""
    length = max(d.tokens.size for d in batch)
    width = max(1 if d.targets.ndim == 1 else d.targets.shape[1] for d in batch)
    input_ids = torch.zeros(len(batch), length, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), length, dtype=torch.long)
    targets = torch.zeros(len(batch), length, width, dtype=torch.long)
    for row, datum in enumerate(batch):
        size = datum.tokens.size
        input_ids[row, :size] = torch.from_numpy(datum.tokens)
        attention_mask[row, :size] = 1
        target = torch.from_numpy(datum.targets)
        targets[row, :size, : (1 if target.dim() == 1 else target.shape[1])] = target.view(size, -1)
    input_ids, attention_mask = input_ids.to(base.device), attention_mask.to(base.device)
    images: dict[str, torch.Tensor] = {}
    if any(d.pixels is not None for d in batch):
        images, _ = model_inputs(base.vision, input_ids, attention_mask, [d.pixels for d in batch])
    scores, _ = causal_logits(
        base.model,
        base.autocast,
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        **images,
    )
    targets = targets.to(base.device)
    if width == 1:  # one target per position: the fused kernel, about a third faster than gather - logsumexp
        flat = F.cross_entropy(scores.flatten(0, 1), targets.flatten(), reduction="none")
        logp = -flat.view(len(batch), length, 1)
    else:
        logp = scores.gather(-1, targets) - torch.logsumexp(scores, dim=-1, keepdim=True)
    return [
        logp[row, : d.tokens.size, 0]
        if d.targets.ndim == 1
        else logp[row, : d.tokens.size, : d.targets.shape[1]]
        for row, d in enumerate(batch)
    ]


def run_losses(
    base: LoadedBase, data: list[Checked], loss_fn: str, config: Mapping[str, float], backward: bool
) -> ForwardBackwardResult:
    """Loss and per-token logprobs of checked `data` under the active adapter, microbatch by microbatch;
    with `backward`, each microbatch's gradients are added to the adapter's. The caller holds the base's
    lock."""
    outputs: list[dict[str, np.ndarray]] = []
    total = 0.0
    for indices in microbatches(data):
        batch = [data[i] for i in indices]
        loss = torch.zeros((), device=base.device)
        for datum, logp in zip(batch, target_logprobs(base, batch), strict=True):
            inputs = {k: torch.from_numpy(v).to(base.device) for k, v in datum.inputs.items()}
            datum_loss, elementwise = losses.compute(loss_fn, logp, inputs, config)
            loss = loss + datum_loss
            outputs.append(
                {
                    "logprobs": logp.detach().float().cpu().numpy(),
                    "elementwise_loss": elementwise.detach().float().cpu().numpy(),
                }
            )
        if backward:
            loss.backward()
        total += float(loss.detach())
    metrics = {
        "loss:sum": total,
        "num_tokens:sum": float(sum(d.tokens.size for d in data)),
        "num_sequences:sum": float(len(data)),
    }
    return ForwardBackwardResult(outputs, metrics)
