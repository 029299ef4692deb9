"""tinygpt: pretrain a small GPT for a fixed wall-clock budget. This is the file to edit.

    python train.py > run.log     # trains, saves run/checkpoint.pt, scores itself when run by hand

The harness (prepare.py) owns the data, the tokenizer and the metric (validation bits per byte). The evaluate
step imports this file and rebuilds the model as `GPT(GPTConfig(**config))` from run/model.json, then calls
`model(idx)` and expects logits of shape (batch, time, vocab). Keep those names and that signature.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import prepare
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# Settings. Each can be overridden for a quick check by an env var TINYGPT_<NAME> (e.g. TINYGPT_DEPTH=1).

DEPTH = 4  # transformer blocks
WIDTH = 128  # model dimension
HEAD_DIM = 32  # width / head_dim attention heads
MLP_RATIO = 4
SEQ_LEN = 256  # training context (the evaluation context is prepare.SEQ_LEN)
BATCH_SIZE = 8  # sequences per optimizer step (small: a short CPU run gains more from extra steps)
MATRIX_LR = 0.02  # Muon, for the 2D weights inside the blocks
EMBED_LR = 0.3  # AdamW, token embedding
HEAD_LR = 0.004  # AdamW, output head
SCALAR_LR = 0.02  # AdamW, any other parameter (gains, biases, scalars you add)
ADAM_BETAS = (0.8, 0.95)
WEIGHT_DECAY = 0.0
MUON_MOMENTUM = 0.95
NS_STEPS = 5  # Newton-Schulz iterations that orthogonalise each Muon update
WARMUP_FRAC = 0.0  # fraction of the budget spent ramping the learning rate up
WARMDOWN_FRAC = 0.5  # fraction of the budget at the end spent ramping it down
FINAL_LR_FRAC = 0.0
SOFTCAP = 15.0  # logits are squashed into (-SOFTCAP, SOFTCAP)
UNTIMED_STEPS = (
    3  # first steps (allocation, compilation) are not counted against the budget; 1 when not compiling
)
SEED = 42
DEVICE = "auto"  # auto | cpu | cuda | mps
AUTOCAST = "auto"  # auto (bf16 where the hardware is fast at it) | bf16 | fp32
COMPILE = "auto"  # auto (on CUDA only; compiling costs more than it saves in a short CPU run) | on | off


def _env_overrides(names: dict) -> None:
    """Apply TINYGPT_<NAME> environment overrides to the settings above, keeping each setting's type."""
    for name, value in list(names.items()):
        raw = os.environ.get(f"TINYGPT_{name}")
        if raw is None or not name.isupper() or name.startswith("_"):
            continue
        if isinstance(value, bool):
            names[name] = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(value, tuple):
            names[name] = tuple(float(v) for v in raw.split(","))
        else:
            names[name] = type(value)(raw)


_env_overrides(globals())


# ---------------------------------------------------------------------------------------------------------
# Model: rotary embeddings, parameter-free RMSNorm, QK-norm, ReLU^2 MLP, untied head, soft-capped logits.


@dataclass
class GPTConfig:
    vocab_size: int
    seq_len: int = 256
    n_layer: int = 4
    n_embd: int = 256
    head_dim: int = 64
    mlp_ratio: int = 4
    softcap: float = 15.0
    rope_base: float = 10000.0


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


# Three pieces written out by hand, forward and backward, because autograd runs each as a string of small
# elementwise kernels and on a CPU those, not the matmuls, bound the step: memory traffic, not arithmetic.
# Each equals a one-line plain form, named in its docstring; swapping that form back in is always correct,
# just slower.


class SoftcappedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of capped logits, with its gradient, for logits (N, vocab) and targets (N,).

    Plain form: F.cross_entropy(cap * torch.tanh(logits.float() / cap), targets). The (N, vocab) logits are
    the largest tensors of the step; here they are walked once, in chunks of rows that stay in cache, and the
    gradient is made on the way. tanh(u) = 2 sigmoid(2u) - 1, as CPU sigmoid is ~3x faster than tanh; and as
    the capped logits z never exceed cap, exp(z - cap) cannot overflow and needs no max pass."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
        n, chunk = logits.size(0), max(1, 2**18 // logits.size(1))  # 1 MB of fp32 a chunk: it stays in cache
        grad = torch.empty_like(logits)
        total = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            target = targets[rows, None]
            s = logits[rows].float().mul_(2 / cap).sigmoid_()  # capped logit z = cap * (2s - 1)
            p = (s - 1).mul_(2 * cap).exp_()  # exp(z - cap)
            sums = p.sum(-1, keepdim=True)
            total += (sums.log().squeeze(1) + 2 * cap * (1 - s.gather(1, target).squeeze(1))).sum()
            p.div_(sums).scatter_add_(1, target, p.new_full(target.shape, -1.0))  # softmax - one-hot
            grad[rows].copy_(p.mul_(torch.addcmul(s, s, s, value=-1).mul_(4 / n)))  # dz/dlogit = 4 s (1 - s)
        ctx.save_for_backward(grad)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if torch.compiler.is_compiling() or grad_loss.item() != 1.0:  # loss.backward() passes 1
            grad = grad * grad_loss
        return grad, None, None


class NormRotary(torch.autograd.Function):
    """QK-norm, then the rotary embedding, of head vectors x (..., T, D).

    Plain form: rms_norm(x) rotated pairwise, (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos) for the two
    halves of the last dim. Written as out = n * cos + roll(n, D/2) * sin with the buffers GPT keeps (cos
    repeated, sin with its first half negated). Six kernels forward and nine backward, where autograd takes
    about twenty."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rstd = x.square().mean(-1, keepdim=True).add_(torch.finfo(x.dtype).eps).rsqrt_()
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, cos, sin)
        return torch.addcmul(normed * cos, normed.roll(x.size(-1) // 2, -1), sin)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        normed, rstd, cos, sin = ctx.saved_tensors
        grad_n = (grad_out * sin).roll(grad_out.size(-1) // 2, -1).addcmul_(grad_out, cos)
        return (grad_n - normed * (grad_n * normed).mean(-1, keepdim=True)).mul_(rstd), None, None


class ReluSquared(torch.autograd.Function):
    """Plain form: F.relu(x).square(). Two kernels each way; autograd's relu, pow and backwards take six."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        relu = torch.relu(x)
        ctx.save_for_backward(relu)
        return relu * relu

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (relu,) = ctx.saved_tensors
        return (relu + relu).mul_(grad_out)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_embd // cfg.head_dim
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        qk = qkv[:2].to(torch.float32, memory_format=torch.contiguous_format)  # q and k, normed in one go
        qk = NormRotary.apply(qk, cos, sin)  # QK-norm bounds attention logits
        q, k, v = qk[0], qk[1], qkv[2]
        if x.device.type == "cpu":  # the CPU attention kernels are faster in fp32 than in bf16 at these sizes
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q, k, v.float(), is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(ReluSquared.apply(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), cos, sin)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        freqs = cfg.rope_base ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float32), freqs)
        self.register_buffer("cos", angles.cos().repeat(1, 2), persistent=False)
        self.register_buffer("sin", torch.cat((-angles.sin(), angles.sin()), dim=1), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = 3**0.5 * self.cfg.n_embd**-0.5  # uniform with std 1/sqrt(width)
        for block in self.blocks:
            nn.init.uniform_(block.attn.qkv.weight, -bound, bound)
            nn.init.uniform_(block.mlp.fc.weight, -bound, bound)
            nn.init.zeros_(block.attn.proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.proj.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.size(1)
        cos, sin = self.cos[None, None, :T], self.sin[None, None, :T]
        x = rms_norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(rms_norm(x))
        if targets is None:
            return self.cfg.softcap * torch.tanh(logits.float() / self.cfg.softcap)
        return SoftcappedCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), self.cfg.softcap)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at context seq_len: 6 per matmul weight, plus attention scores, mixing."""
        matmul = sum(
            p.numel() for n, p in self.named_parameters() if p.dim() == 2 and not n.startswith("wte")
        )
        return 6 * matmul + 6 * self.cfg.n_layer * self.cfg.n_embd * seq_len


# ---------------------------------------------------------------------------------------------------------
# Optimizers: Muon (momentum, then an orthogonalised update) for the block matrices, AdamW for the rest.


def orthogonalize(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Approximately replace each matrix in g (n, rows, cols) by the nearest semi-orthogonal one
    (quintic Newton-Schulz iteration); rows <= cols."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(s, s, s, beta=b, alpha=c), x, beta=a)  # a x + (b s + c s s) x
    return x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then an orthogonalised update. Matrices of one shape are stacked and orthogonalised
    together: a few batched matmuls instead of many small ones, which is what a CPU is slow at."""

    def __init__(self, params, lr: float, momentum: float, ns_steps: int, ns_dtype: torch.dtype):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, ns_dtype=ns_dtype))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
            for p in group["params"]:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for (rows, cols), params in by_shape.items():
                grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
                state = self.state[params[0]]
                buf = state.setdefault("momentum", torch.zeros_like(grads))
                buf.lerp_(grads, 1 - group["momentum"])
                update = grads.lerp_(buf, group["momentum"])  # Nesterov
                tall = rows > cols
                update = orthogonalize(update.mT if tall else update, group["ns_steps"], group["ns_dtype"])
                update = (update.mT if tall else update).to(grads.dtype)
                scale = -group["lr"] * max(1.0, rows / cols) ** 0.5
                for p, u in zip(params, update.unbind(0), strict=True):
                    p.add_(u, alpha=scale)


def build_optimizers(model: GPT, fast_bf16: bool) -> list[torch.optim.Optimizer]:
    """Every parameter gets exactly one optimizer, so a gain or scalar added to the model is never frozen."""
    matrices = [p for p in model.blocks.parameters() if p.dim() == 2]
    special = {id(p) for p in (*matrices, model.wte.weight, model.lm_head.weight)}
    scalars = [p for p in model.parameters() if id(p) not in special]
    adam_groups = [
        dict(params=[model.wte.weight], lr=EMBED_LR),
        dict(params=[model.lm_head.weight], lr=HEAD_LR),
        dict(params=scalars, lr=SCALAR_LR),
    ]
    ns_dtype = torch.bfloat16 if fast_bf16 else torch.float32
    optimizers = [
        torch.optim.AdamW(adam_groups, betas=ADAM_BETAS, eps=1e-10, weight_decay=WEIGHT_DECAY, fused=True),
        Muon(matrices, lr=MATRIX_LR, momentum=MUON_MOMENTUM, ns_steps=NS_STEPS, ns_dtype=ns_dtype),
    ]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_multiplier(progress: float) -> float:
    """Learning-rate scale as a function of the elapsed fraction of the time budget."""
    if progress < WARMUP_FRAC:
        return progress / WARMUP_FRAC
    if progress > 1 - WARMDOWN_FRAC:
        left = (1 - progress) / WARMDOWN_FRAC
        return FINAL_LR_FRAC + (1 - FINAL_LR_FRAC) * max(left, 0.0)
    return 1.0


# ---------------------------------------------------------------------------------------------------------
# Training.


class Batches:
    """Random windows of SEQ_LEN + 1 tokens from the train split (a memory map, so any size fits)."""

    def __init__(self, device: torch.device, seed: int):
        self.tokens = prepare.load_tokens("train")
        self.device = device
        self.rng = np.random.default_rng(seed)
        if len(self.tokens) <= SEQ_LEN + 1:
            raise SystemExit(f"FAIL: the train split has only {len(self.tokens)} tokens")

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, len(self.tokens) - SEQ_LEN - 1, size=BATCH_SIZE)
        rows = np.stack([self.tokens[s : s + SEQ_LEN + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows).to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]


def keep_freed_memory() -> None:
    """Stop glibc from handing freed tensor memory back to the OS after every step. By default each step's
    multi-MB activations are fresh mmaps, so a CPU step re-faults (and the kernel re-zeroes) tens of MB of
    pages: about a tenth of the step here. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)  # the largest glibc accepts; bigger blocks are rare here
    libc.mallopt(m_trim_threshold, 1 << 30)


def budget_seconds(device: torch.device) -> float:
    budget = float(os.environ.get("NIGHTLAB_BUDGET_SECONDS") or (60 if device.type == "cpu" else 300))
    if budget <= 0:
        fail(f"the time budget must be positive, got {budget} s (NIGHTLAB_BUDGET_SECONDS)")
    return budget


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def save_checkpoint(model: GPT, folder: Path) -> None:
    """Weights (a plain state dict) + config as JSON, each written to a temp name and moved into place."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "checkpoint.pt.tmp")
    os.replace(folder / "checkpoint.pt.tmp", folder / "checkpoint.pt")
    (folder / "model.json.tmp").write_text(json.dumps({"config": asdict(model.cfg)}, indent=1))
    os.replace(folder / "model.json.tmp", folder / "model.json")


def fail(message: str) -> None:
    print(f"FAIL: {message}", flush=True)
    raise SystemExit(1)


def main() -> None:
    t_start = time.time()
    seed = SEED + int(os.environ.get("NIGHTLAB_SEED_OFFSET") or 0)
    torch.manual_seed(seed)
    device = prepare.pick_device() if DEVICE == "auto" else torch.device(DEVICE)
    use_bf16 = prepare.fast_bf16(device) if AUTOCAST == "auto" else AUTOCAST == "bf16"
    compile_model = device.type == "cuda" if COMPILE == "auto" else COMPILE == "on"
    vocab_size = prepare.dataset_info()["vocab_size"]
    cfg = GPTConfig(vocab_size, max(SEQ_LEN, prepare.SEQ_LEN), DEPTH, WIDTH, HEAD_DIM, MLP_RATIO, SOFTCAP)
    if device.type == "cpu":
        keep_freed_memory()
    model = GPT(cfg).to(device)
    optimizers = build_optimizers(model, use_bf16)
    forward = torch.compile(model) if compile_model else model
    untimed_steps = UNTIMED_STEPS if compile_model else 1
    batches = Batches(device, seed)
    budget = budget_seconds(device)
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"device {device} | {'bf16' if use_bf16 else 'fp32'} | compile {compile_model} | "
        f"params {num_params / 1e6:.2f}M | budget {budget:.0f}s",
        flush=True,
    )

    explode_at = 3 * math.log(vocab_size)  # three times the loss of a uniform guess
    step, training_time, timed_tokens = 0, 0.0, 0
    last_log = time.time()
    while training_time < budget:
        t0 = time.perf_counter()
        x, y = batches.next()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = forward(x, y)
        loss.backward()
        multiplier = lr_multiplier(training_time / budget)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * multiplier
            opt.step()
        model.zero_grad(set_to_none=True)
        loss_value = loss.item()  # also waits for the device, so the step time below is real
        if not math.isfinite(loss_value) or loss_value > explode_at:
            fail(
                f"loss is {loss_value} at step {step} (diverged); lower the learning rates or fix the change"
            )
        step += 1
        if step > untimed_steps:
            training_time += time.perf_counter() - t0
            timed_tokens += x.numel()
        if time.time() - last_log > 5 or step == 1:
            last_log = time.time()
            tok_s = timed_tokens / training_time if training_time else 0.0
            print(
                f"step {step:5d} | loss {loss_value:.4f} | lr x{multiplier:.2f} | {tok_s:,.0f} tok/s | "
                f"{100 * min(training_time / budget, 1):.0f}% of budget",
                flush=True,
            )

    save_checkpoint(model, Path("run"))  # before any evaluation, so a crash there loses nothing
    tokens_per_second = timed_tokens / training_time
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    mfu = model.flops_per_token(SEQ_LEN) * tokens_per_second / prepare.peak_flops(device, dtype)
    print("---")
    if os.environ.get("NIGHTLAB_PHASE") != "train":  # under the loop, the harness evaluates separately
        try:
            print(f"val_bpb:          {prepare.evaluate_bpb(model, 'val'):.6f}")
        except FileNotFoundError as exc:
            print(f"# no self-evaluation: {exc}")
    print(f"training_seconds: {training_time:.1f}")
    print(f"total_seconds:    {time.time() - t_start:.1f}")
    print(f"peak_memory_mb:   {peak_memory_mb(device):.1f}")
    print(f"mfu_percent:      {100 * mfu:.2f}")
    print(f"total_tokens_M:   {step * BATCH_SIZE * SEQ_LEN / 1e6:.3f}")
    print(f"tokens_per_second: {tokens_per_second:.0f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.3f}")
    print(f"depth:            {DEPTH}")


if __name__ == "__main__":
    main()
