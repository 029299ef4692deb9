"""A plain nanoGPT-style baseline for the tinygpt benchmark: the same data, width, depth and time budget.

GPT-2 architecture as nanoGPT writes it (learned position embeddings, LayerNorm, GELU MLP, weight-tied head),
AdamW with warm-up and cosine decay as in nanoGPT's small-model configs, on the device the harness picks
(fp32 on CPU, bf16 autocast on CUDA, as nanoGPT does) and no compilation. Run inside a tinygpt workspace, it
reads the sizes from that workspace's train.py and scores itself with the workspace's own
`prepare.evaluate_bpb`.

    python benchmarks/nanogpt_reference.py --workspace DIR [--budget 60]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LR, MIN_LR_FRAC, WARMUP_FRAC = 1e-3, 0.1, 0.05
BETAS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.99), 0.1, 1.0
UNTIMED_STEPS = 1  # like tinygpt's train.py when it does not compile


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, depth: int, width: int, heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def _load(workspace: Path, name: str) -> ModuleType:
    sys.path.insert(0, str(workspace))
    return __import__(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True, help="a prepared tinygpt workspace")
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds")
    args = parser.parse_args()
    t_start = time.time()
    prepare, train = _load(args.workspace, "prepare"), _load(args.workspace, "train")
    torch.manual_seed(train.SEED)
    vocab = prepare.dataset_info()["vocab_size"]
    seq, batch = train.SEQ_LEN, train.BATCH_SIZE
    device = prepare.pick_device()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model = NanoGPT(vocab, max(seq, prepare.SEQ_LEN), train.DEPTH, train.WIDTH, train.WIDTH // train.HEAD_DIM)
    model = model.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    tokens = prepare.load_tokens("train")
    rng = np.random.default_rng(train.SEED)
    step, timed, training_time = 0, 0, 0.0
    while training_time < args.budget:
        t0 = time.perf_counter()
        starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
        rows = torch.from_numpy(np.stack([tokens[s : s + seq + 1] for s in starts]).astype(np.int64)).to(
            device
        )
        progress = training_time / args.budget
        lr = LR * (
            progress / WARMUP_FRAC
            if progress < WARMUP_FRAC
            else MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * progress))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast:
            loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        step += 1
        if step > UNTIMED_STEPS:
            training_time += time.perf_counter() - t0
            timed += batch * seq
    num_params = sum(p.numel() for p in model.parameters())
    print("---")
    print(f"val_bpb:          {prepare.evaluate_bpb(model, 'val'):.6f}")
    print(f"training_seconds: {training_time:.1f}")
    print(f"total_seconds:    {time.time() - t_start:.1f}")
    print(f"total_tokens_M:   {step * batch * seq / 1e6:.3f}")
    print(f"tokens_per_second: {timed / training_time:.0f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.3f}")
    print(f"depth:            {train.DEPTH}")


if __name__ == "__main__":
    main()
