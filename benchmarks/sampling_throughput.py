"""Sampling throughput of the training service against one-at-a-time `model.generate`.

Starts the service in-process (uvicorn on 127.0.0.1), sends N concurrent requests of T tokens through Tinker's
`/asample` (tinker SDK) and through `/v1/completions` (openai SDK), and compares the wall time with the same N
prompts run one after another through Hugging Face `model.generate` on the same weights. Every path produces
exactly T tokens per request (EOS is not a stop), greedy, so the work is identical. Goal: service >= 3x.

    .venv/bin/python benchmarks/sampling_throughput.py [--tiny] [--requests 8] [--tokens 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import openai
import tinker
import torch
from rich.console import Console
from rich.table import Table

from nightlab.train import models
from nightlab.train.api.app import create_app
from nightlab.train.api.background import serve_in_thread
from nightlab.train.engine import Engine
from nightlab.train.settings import ServeSettings
from nightlab.train.tiny import make_tiny_model

KEY = "tml-benchmark"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "Give me three tips for better sleep.",
    "How does a bicycle stay upright?",
    "Name a few uses of baking soda.",
    "What is 17 times 23?",
    "Describe the colour blue to someone who cannot see.",
]


def _prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def _sequential(model, prompts: list[list[int]], tokens: int, device: str) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )
            assert out.shape[1] - len(prompt) == tokens
    return time.perf_counter() - start


def _via_tinker(base_url: str, model: str, prompts: list[list[int]], tokens: int) -> float:
    service = tinker.ServiceClient(base_url=base_url, api_key=KEY)
    sampler = service.create_sampling_client(base_model=model).result()
    params = tinker.SamplingParams(max_tokens=tokens, temperature=0.0, stop=[])
    sampler.sample(tinker.ModelInput.from_ints(prompts[0]), 1, params).result()  # warm-up
    start = time.perf_counter()
    futures = [sampler.sample(tinker.ModelInput.from_ints(p), 1, params) for p in prompts]
    results = [f.result() for f in futures]
    elapsed = time.perf_counter() - start
    assert all(len(r.sequences[0].tokens) == tokens for r in results)
    return elapsed


def _via_openai(base_url: str, model: str, prompts: list[list[int]], tokens: int) -> float:
    async def run() -> float:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=600)
        start = time.perf_counter()
        outs = await asyncio.gather(
            *(
                client.completions.create(
                    model=model, prompt=p, max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True}
                )
                for p in prompts
            )
        )
        elapsed = time.perf_counter() - start
        assert all(o.usage.completion_tokens == tokens for o in outs)
        return elapsed

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random model instead of SmolLM2-135M")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="nightlab-bench-") as tmp:
        data_dir = Path(tmp)
        name = str(make_tiny_model(data_dir / "tiny")) if args.tiny else "smollm2"
        with console.status(f"loading {name}"):
            engine = Engine(data_dir, device=args.device, precision="fp32", show_progress=False)
            served = engine.model_info(name).name
            model, tokenizer, _ = models.load(
                models.resolve(name, data_dir), data_dir, device=args.device, show_progress=False
            )
        prompts = _prompts(tokenizer, args.requests)
        background = serve_in_thread(create_app(ServeSettings(data_dir=data_dir, api_keys=[KEY]), engine))
        base_url = background.url
        rows: list[tuple[str, float]] = []
        with console.status("sequential model.generate"):
            _sequential(model, prompts[:1], 4, args.device)  # warm-up
            rows.append(("sequential model.generate", _sequential(model, prompts, args.tokens, args.device)))
        with console.status("service /asample (tinker SDK, concurrent)"):
            rows.append(("service /asample, tinker SDK", _via_tinker(base_url, served, prompts, args.tokens)))
        with console.status("service /v1/completions (openai SDK, concurrent)"):
            rows.append(
                ("service /v1/completions, openai SDK", _via_openai(base_url, served, prompts, args.tokens))
            )
        background.stop()

    total = args.requests * args.tokens
    table = Table(
        title=f"{args.requests} requests x {args.tokens} tokens, {served}, {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    for col in ("path", "wall s", "tokens/s", "vs sequential"):
        table.add_column(col, justify="right" if col != "path" else "left")
    baseline = rows[0][1]
    for label, seconds in rows:
        table.add_row(label, f"{seconds:.2f}", f"{total / seconds:.1f}", f"{baseline / seconds:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
