"""Request bodies of the Tinker JSON endpoints, and the budget-forcing extension both APIs accept.

Unknown keys are ignored (newer SDKs add fields), except in budget forcing, nightlab's own extension.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from nightlab.train.errors import UserError
from nightlab.train.records import ImageInput


class BudgetForcingBody(BaseModel):  # s1-style thinking control, on Tinker's /asample and OpenAI's /v1
    model_config = ConfigDict(extra="forbid")
    min_thinking_tokens: int = Field(0, ge=0)
    max_thinking_tokens: int | None = Field(None, ge=1)
    end_thinking: str = Field("</think>", min_length=1)
    wait_text: str = Field("Wait", min_length=1)
    answer_prefix: str = ""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class CreateSessionBody(_Body):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    display_name: str | None = None


class SessionIdBody(_Body):
    session_id: str


class FinishBody(_Body):
    reason: dict[str, Any] | None = None
    detail: str | None = None


class LoraBody(_Body):
    rank: int = Field(32, ge=1, le=1024)
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class OptimizerConfigBody(_Body):
    model_config = ConfigDict(extra="allow")
    type: str = "adamw"


class CreateModelBody(_Body):
    session_id: str
    model_seq_id: int
    base_model: str
    lora_config: LoraBody = LoraBody()
    optimizer_config: OptimizerConfigBody = OptimizerConfigBody()
    user_metadata: dict[str, Any] | None = None


class ModelIdBody(_Body):
    model_id: str


class AdamBody(_Body):
    """The optimizer step's settings as sent; what is left out takes the engine's AdamParams defaults."""

    type: str = "adamw"
    learning_rate: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    weight_decay: float | None = None
    grad_clip_norm: float | None = None


class OptimStepBody(_Body):
    model_id: str
    seq_id: int | None = None
    adam_params: AdamBody = Field(
        validation_alias=AliasChoices("adam_params", "optim_params", "optimizer_params")
    )


class SaveWeightsBody(_Body):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = Field(None, ge=1)
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveForSamplerBody(SaveWeightsBody):
    sampling_session_seq_id: int | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"


class LoadWeightsBody(_Body):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: OptimizerConfigBody | None = None


class CreateSamplerBody(_Body):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


class ChunkBody(_Body):
    type: str = "encoded_text"
    tokens: list[int] = []
    data: str | None = None  # image: base64 of the png or jpeg bytes
    format: str | None = None
    expected_tokens: int | None = Field(None, ge=0)


class ModelInputBody(_Body):
    chunks: list[ChunkBody]

    def parts(self) -> tuple[list[int], list[ImageInput]]:
        """The text tokens, and the images' bytes with their places among those tokens."""
        tokens: list[int] = []
        images: list[ImageInput] = []
        for i, chunk in enumerate(self.chunks):
            if chunk.type == "encoded_text":
                tokens.extend(chunk.tokens)
            elif chunk.type == "image":
                try:
                    data = base64.b64decode(chunk.data or "", validate=True)
                except binascii.Error:
                    raise UserError(f"prompt chunk {i}: image data is not base64") from None
                images.append(ImageInput(data, chunk.format or "", len(tokens), chunk.expected_tokens))
            else:  # image_asset_pointer names a file or URL this offline server cannot fetch
                raise UserError(
                    f"prompt chunk {i}: {chunk.type} chunks are not supported here; send token chunks "
                    "(encoded_text) and images as bytes (ImageChunk)"
                )
        return tokens, images


class SamplingParamsBody(_Body):
    max_tokens: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[int] | list[str] | None = None
    temperature: float = Field(1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(1.0, gt=0, le=1)


class SampleBody(_Body):
    prompt: ModelInputBody
    sampling_params: SamplingParamsBody
    num_samples: int = Field(1, ge=1, le=1024)
    sampling_session_id: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(0, ge=0)
    topk_sample_logprobs: int = Field(0, ge=0)
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = Field(None, ge=1)
    record_stability_info: bool | None = None  # keep the sequences for stable_reinforce (train/stability.py)
    budget_forcing: BudgetForcingBody | None = Field(
        None, description="nightlab extension: s1-style min/max thinking length (see docs/recipes.md)"
    )


class RetrieveBody(_Body):
    request_id: str
    allow_metadata_only: bool = False


class WeightsInfoBody(_Body):
    tinker_path: str
