"""Peak memory of LoRA training and sampling on a base model, predicted from its config alone.

Pure arithmetic, so a 70B model can be planned on a laptop and `nightlab serve` can refuse a base before
allocating it. The counts follow what the engine actually runs (docs/planner.md shows the derivation and
checks it against measured and published peaks):

- weights: every linear layer at the scheme's bytes per parameter (nf4 with double-quantized block scales,
  int8 with one fp32 scale per row); embeddings, the unembedding, norms and MoE experts stay unquantized;
- adapters: LoRA A and B (rank r) on every attention and MLP linear and on the unembedding (Tinker's
  defaults), in fp32; training adds their fp32 gradients and AdamW's two fp32 moments;
- activations: what autograd saves per token and layer without gradient checkpointing (the engine runs
  without it), for one microbatch of at most `forward.TOKENS_PER_MICROBATCH` padded tokens, plus the fp32
  logits the loss holds at the start of backward;
- sampling: a prefill's largest transient and the KV cache for batch x seq tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from nightlab.errors import NightlabError
from nightlab.train import models
from nightlab.train.forward import TOKENS_PER_MICROBATCH
from nightlab.train.quantize import SCHEMES, Scheme

logger = logging.getLogger(__name__)

GIB = 2**30
USABLE_FRACTION = 0.9  # of a machine's memory: the rest goes to the OS, the CUDA context, fragmentation
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64, an fp32 scale per 256 absmax
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
Device = Literal["cpu", "cuda", "mps"]


class PlanError(NightlabError, ValueError):
    """A model the planner cannot read, or a workload it cannot plan."""


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer that decide its memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    dtype_bytes: int = 2  # of the checkpoint's weights, what an unquantized load keeps
    experts: int = 0  # mixture of experts: experts per layer (0: a dense MLP)
    experts_per_token: int = 0
    expert_intermediate: int = 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int, int]]:
        """(in, out, count) of one layer's linear layers: attention, and the MLP of a dense model."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        attn = [(h, q, 1), (h, kv, 1), (h, kv, 1), (q, h, 1)]
        return attn if self.experts else [*attn, (h, i, 2), (i, h, 1)]

    def expert_parameters(self) -> int:
        """One layer's expert weights: transformers keeps them as fused 3-D tensors (gate_up, down), which are
        not linear layers, so bitsandbytes leaves them (and the router) unquantized."""
        return self.experts * 3 * self.hidden * self.expert_intermediate

    def parameters(self) -> dict[str, int]:
        """Parameter counts by kind: linear layers (what quantization shrinks), experts and routers,
        embeddings, norms."""
        return {
            "linear": self.layers * sum(i * o * n for i, o, n in self.linears()),
            "experts": self.layers * (self.expert_parameters() + self.hidden * self.experts),
            "embeddings": self.vocab * self.hidden * (1 if self.tied_embeddings else 2),
            "norms": (2 * self.layers + 1) * self.hidden,
        }

    def total_parameters(self) -> int:
        return sum(self.parameters().values())

    @classmethod
    def from_hf_config(cls, config: Any) -> Architecture:
        """Read a transformers config (its text model's, for a vision-language one)."""
        config = config.get_text_config()
        try:
            hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
            intermediate = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 0)
            experts = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0) or 0)
            dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
            return cls(
                hidden=hidden,
                intermediate=intermediate or 4 * hidden,
                layers=int(config.num_hidden_layers),
                heads=heads,
                kv_heads=int(getattr(config, "num_key_value_heads", 0) or heads),
                head_dim=int(getattr(config, "head_dim", 0) or hidden // heads),
                vocab=int(config.vocab_size),
                tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                dtype_bytes=DTYPE_BYTES.get(dtype, 4),
                experts=experts,
                experts_per_token=int(getattr(config, "num_experts_per_tok", 0) or 0) if experts else 0,
                # Mixtral and OLMoE size their experts with intermediate_size
                expert_intermediate=int(getattr(config, "moe_intermediate_size", 0) or intermediate)
                if experts
                else 0,
            )
        except (AttributeError, TypeError, ValueError) as error:
            raise PlanError(
                f"config lacks what the planner needs ({error}): not a decoder-only LM?"
            ) from None

    @classmethod
    def from_gguf_fields(cls, metadata: Mapping[str, Any]) -> Architecture:
        """Read GGUF metadata; the weights are dequantized to fp32 when transformers loads a GGUF."""
        arch = metadata["general.architecture"]
        hidden = int(metadata[f"{arch}.embedding_length"])
        heads = int(metadata[f"{arch}.attention.head_count"])
        return cls(
            hidden=hidden,
            intermediate=int(metadata[f"{arch}.feed_forward_length"]),
            layers=int(metadata[f"{arch}.block_count"]),
            heads=heads,
            kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=hidden // heads,
            vocab=len(metadata["tokenizer.ggml.tokens"]),
            tied_embeddings=True,
            dtype_bytes=4,
        )


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **kw: Any) -> Architecture:
    kw.setdefault("head_dim", hidden // heads)
    kw.setdefault("vocab", 128256)
    kw.setdefault("tied_embeddings", False)
    return Architecture(hidden, intermediate, layers, heads, kv_heads, **kw)


# Popular bases, from their config.json (bf16 checkpoints); `nightlab plan` takes these names too.
CATALOGUE: dict[str, Architecture] = {
    "Llama-3.2-1B": _llama(2048, 8192, 16, 32, 8, tied_embeddings=True),
    "Llama-3.2-3B": _llama(3072, 8192, 28, 24, 8, head_dim=128, tied_embeddings=True),
    "Llama-3.1-8B": _llama(4096, 14336, 32, 32, 8),
    "Llama-3.3-70B": _llama(8192, 28672, 80, 64, 8),
    "Qwen3-0.6B": _llama(1024, 3072, 28, 16, 8, head_dim=128, vocab=151936, tied_embeddings=True),
    "Qwen3-8B": _llama(4096, 12288, 36, 32, 8, head_dim=128, vocab=151936),
    "Qwen3-14B": _llama(5120, 17408, 40, 40, 8, head_dim=128, vocab=151936),
    "Qwen3-32B": _llama(5120, 25600, 64, 64, 8, head_dim=128, vocab=151936),
    "Qwen3-30B-A3B": _llama(
        2048,
        0,
        48,
        32,
        4,
        head_dim=128,
        vocab=151936,
        experts=128,
        experts_per_token=8,
        expert_intermediate=768,
    ),
    "Qwen3-235B-A22B": _llama(
        4096,
        0,
        94,
        64,
        4,
        head_dim=128,
        vocab=151936,
        experts=128,
        experts_per_token=8,
        expert_intermediate=1536,
    ),
}

# Named machines: memory (GiB) the model lives in, and the device kind that decides the compute dtype.
MACHINES: dict[str, tuple[float, Device]] = {
    "dgx-spark": (128, "cuda"),  # unified memory
    "h200": (141, "cuda"),
    "h100-80gb": (80, "cuda"),
    "a100-80gb": (80, "cuda"),
    "a100-40gb": (40, "cuda"),
    "l40s": (48, "cuda"),
    "rtx-5090": (32, "cuda"),
    "rtx-4090": (24, "cuda"),
    "rtx-3090": (24, "cuda"),
    "m3-max-64gb": (64, "mps"),
    "m2-ultra-192gb": (192, "mps"),
}


@dataclass(frozen=True)
class Workload:
    """What runs on the base: LoRA rank, sequence length, batch (sequences per step or samples at once)."""

    rank: int = 32
    seq: int = 2048
    batch: int = 1
    quant: Scheme = "none"
    device: Device = "cuda"
    gradient_checkpointing: bool = False  # the engine runs without it; `nightlab plan` can show the saving

    def __post_init__(self) -> None:
        if min(self.rank, self.seq, self.batch) < 1:
            raise PlanError(
                f"rank, seq and batch must be positive, got {self.rank}, {self.seq}, {self.batch}"
            )
        if self.quant not in SCHEMES:
            raise PlanError(f"unknown quantization {self.quant!r}: one of {', '.join(SCHEMES)}")

    def weight_dtype_bytes(self, arch: Architecture) -> int:
        """Bytes per unquantized weight: a quantized load keeps the rest of the model in its compute dtype
        (bf16 on CUDA, fp32 elsewhere: `quantize.compute_dtype`); a plain load keeps the checkpoint's."""
        if self.quant != "none":
            return 2 if self.device == "cuda" else 4
        return arch.dtype_bytes

    def activation_bytes(self, arch: Architecture) -> int:
        """Bytes per activation: bf16 under the engine's CUDA autocast, else the weights' dtype."""
        return 2 if self.device == "cuda" else self.weight_dtype_bytes(arch)


@dataclass(frozen=True)
class Breakdown:
    """Predicted bytes by component; `total` is the peak."""

    weights: int = 0
    adapters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    logits: int = 0
    kv_cache: int = 0
    workspace: int = 0  # a quantized matmul's temporaries

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def rows(self) -> list[tuple[str, int]]:
        return [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self)]


def weight_bytes(arch: Architecture, work: Workload) -> int:
    """Linear layers at the scheme's size; the rest (embeddings, unembedding, norms, experts) unquantized."""
    counts = arch.parameters()
    linear = counts.pop("linear")
    rest = sum(counts.values()) * work.weight_dtype_bytes(arch)
    if work.quant == "nf4":
        return rest + int(linear * NF4_BYTES)
    if work.quant == "int8":
        return rest + linear + 4 * arch.layers * sum(o * n for _, o, n in arch.linears())
    return rest + linear * work.weight_dtype_bytes(arch)


def quantized_workspace(arch: Architecture, work: Workload, tokens: int) -> int:
    """The temporaries of one quantized matmul at the widest linear: nf4 dequantizes the weight to the compute
    dtype; LLM.int8() casts the input to fp16, quantizes it to int8 and accumulates in int32."""
    if work.quant == "nf4":
        return max(i * o for i, o, _ in arch.linears()) * work.weight_dtype_bytes(arch)
    if work.quant == "int8":
        return tokens * max(3 * i + 4 * o for i, o, _ in arch.linears())
    return 0


def lora_parameters(arch: Architecture, rank: int) -> int:
    """LoRA A (r x in) and B (out x r) on every attention and MLP linear and on the unembedding; fused
    experts get rank-r factors per expert on gate_up (h -> 2 x mi) and on down (mi -> h); routers none."""
    per_layer = sum(rank * (i + o) * n for i, o, n in arch.linears())
    per_layer += arch.experts * rank * (2 * arch.hidden + 3 * arch.expert_intermediate)
    return arch.layers * per_layer + rank * (arch.hidden + arch.vocab)


def training_tokens(work: Workload) -> int:
    """Padded tokens in the largest microbatch: the engine packs sequences up to TOKENS_PER_MICROBATCH (a
    longer sequence runs alone)."""
    return work.seq * min(work.batch, max(1, TOKENS_PER_MICROBATCH // work.seq))


def saved_per_token(arch: Architecture, rank: int) -> int:
    """Elements autograd keeps per token and layer for the backward of a LoRA'd decoder layer.

    RMSNorm keeps its input and 1/rms (x2 norms); LoRA A keeps its input (the normed hidden state, shared by
    q/k/v and by gate/up; the attention output; the MLP product) and B the rank-r middle; attention keeps the
    rotated q and k, v, its output and log-sum-exp; the MLP keeps gate, up and silu(gate). Frozen linears
    keep nothing of the activations. An expert keeps, per routed token, its gathered input, gate_up,
    silu(gate), up, their product and its output (weighted by the router); the router its logits and
    probabilities.
    """
    h, q, kv = arch.hidden, arch.q_dim, arch.kv_dim
    norms = 2 * (2 * h + 1)
    attention = (q + 2 * kv) + q + arch.heads + 4 * rank
    if arch.experts:
        mlp = arch.experts_per_token * (2 * h + 5 * arch.expert_intermediate) + 2 * arch.experts
    else:
        mlp = 4 * arch.intermediate + 3 * rank
    return norms + attention + mlp


def training(arch: Architecture, work: Workload) -> Breakdown:
    """Peak of a steady training step: AdamW moments exist, gradients accumulate, backward starts."""
    lora = lora_parameters(arch, work.rank) * 4
    tokens = training_tokens(work)
    act_bytes = work.activation_bytes(arch)
    # LoRA on fused experts (PEFT's target_parameters) adds B @ A to the 3-D weights on each forward, and
    # autograd keeps the sum: one layer's expert weights per layer
    per_layer = saved_per_token(arch, work.rank) * tokens * act_bytes + arch.expert_parameters() * act_bytes
    if work.gradient_checkpointing:  # keep each layer's input; recompute one layer at a time in backward
        saved = arch.layers * arch.hidden * tokens * act_bytes + per_layer
    else:
        saved = arch.layers * per_layer
    head = (2 * arch.hidden + 1 + work.rank) * tokens * act_bytes  # final norm, unembedding LoRA
    return Breakdown(
        weights=weight_bytes(arch, work),
        adapters=lora,
        gradients=lora,
        optimizer=2 * lora,
        activations=saved + head,
        logits=3 * tokens * arch.vocab * 4,  # fp32: saved log-softmax, its gradient, the logits' gradient
        workspace=quantized_workspace(arch, work, tokens),
    )


def sampling(arch: Architecture, work: Workload) -> Breakdown:
    """Peak of sampling `batch` sequences of `seq` tokens (prompt and completion) with an adapter on."""
    compute = work.activation_bytes(arch)
    tokens = work.batch * work.seq
    kv_cache = 2 * arch.layers * arch.kv_dim * tokens * compute
    mlp = arch.experts_per_token * arch.expert_intermediate if arch.experts else arch.intermediate
    # prefill: the residual stream and normed input, then q, k, v, attention output, or gate, up, silu; an
    # adapter on fused experts adds one layer's merged expert weights
    per_token = 2 * arch.hidden + max(3 * arch.q_dim + 2 * arch.kv_dim, 3 * mlp)
    transient = per_token * tokens * compute + arch.expert_parameters() * compute
    return Breakdown(
        weights=weight_bytes(arch, work),
        adapters=lora_parameters(arch, work.rank) * 4,
        activations=transient,
        logits=work.batch * arch.vocab * 4,
        kv_cache=kv_cache,
        workspace=quantized_workspace(arch, work, tokens),
    )


def architecture_of(name: str, data_dir: Path) -> tuple[str, Architecture]:
    """(display name, architecture) of a model on this machine (HF dir, prepared model, the offline GGUF),
    else the catalogue entry a name or hub id matches ("meta-llama/Llama-3.1-8B-Instruct": Llama-3.1-8B)."""
    try:
        resolved = models.resolve(name, data_dir)
    except models.UnknownModelError:
        resolved = None
    if resolved is not None and resolved.source != "hub":
        return resolved.name, architecture_of_resolved(resolved)
    wanted = name.strip().split("/")[-1].lower()
    for key, arch in CATALOGUE.items():
        if wanted == key.lower() or wanted.startswith(f"{key.lower()}-"):
            return key, arch
    if resolved is not None:  # another hub id: its config.json from the Hugging Face cache or the hub
        try:
            return resolved.name, architecture_of_resolved(resolved)
        except OSError as error:
            raise PlanError(f"cannot read the config of {name}: {error}") from None
    raise PlanError(
        f"{name!r} is neither a model on this machine (a Hugging Face directory, a prepared model, smollm2) "
        f"nor in the catalogue: {', '.join(CATALOGUE)}"
    )


def architecture_of_resolved(resolved: models.ResolvedModel) -> Architecture:
    """The architecture of a `models.ResolvedModel`, read from its config (a hub model's from the Hugging Face
    cache or the hub, as loading it would), not its weights."""
    from transformers import AutoConfig

    if resolved.source == "gguf":
        return Architecture.from_gguf_fields(models._gguf_fields(resolved.path / resolved.gguf_file))
    return Architecture.from_hf_config(AutoConfig.from_pretrained(resolved.hub_id or resolved.path))


def fits(breakdown: Breakdown, memory_bytes: float) -> bool:
    return breakdown.total <= memory_bytes * USABLE_FRACTION


def device_kind(device: str) -> Device:
    """cpu, cuda or mps: what decides the compute dtype (a "cuda:1" is cuda)."""
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise PlanError(f"unknown device {device!r}: cpu, cuda or mps")
    return kind  # type: ignore[return-value]


def device_memory(device: str, *, free: bool) -> int:
    """Bytes of `device`: free GPU memory or available RAM now (`free`), else the total. CPU and MPS (unified
    memory) count the machine's RAM."""
    import psutil

    if device_kind(device) == "cuda":
        import torch

        free_bytes, total = torch.cuda.mem_get_info(torch.device(device))
        return free_bytes if free else total
    memory = psutil.virtual_memory()
    return memory.available if free else memory.total


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def check_fits(resolved: models.ResolvedModel, quant: Scheme, device: str, limit: int | None) -> None:
    """Refuse a base whose LoRA training at the planner's defaults would not fit `limit` bytes (default: what
    the device has free now), with the planner's numbers. A config the planner cannot read is let through
    with a warning: the planner knows decoder-only transformers, the engine may serve more."""
    try:
        arch = architecture_of_resolved(resolved)
    except PlanError as error:
        logger.warning("%s: loading it without a memory check: %s", resolved.name, error)
        return
    work = Workload(quant=quant, device=device_kind(device))
    need = training(arch, work)
    have = limit if limit is not None else device_memory(device, free=True)
    if fits(need, have):
        return
    parts = ", ".join(f"{name} {gib(size)}" for name, size in need.rows() if size)
    raise PlanError(
        f"{resolved.name} will not fit: LoRA training (rank {work.rank}, {work.seq} tokens, {quant}) needs "
        f"{gib(need.total)} GiB at peak ({parts}), and {gib(have * USABLE_FRACTION)} GiB of the "
        f"{gib(have)} GiB on {device} is usable. Quantize it (--quantize MODEL=nf4), pick a smaller base, or "
        f"raise --memory-limit-gb if you train shorter sequences; `nightlab plan {resolved.name}` shows more"
    )
