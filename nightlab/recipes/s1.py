"""s1: teach a small model to reason from a small curated set of traces, then control its thinking length.

Four steps, each a function of files in one work directory, each resumable (append-only jsonl; rerunning a
step skips what its output already holds):

1. `collect`: a teacher writes a `<think>` trace and an answer per question: a model behind any
   OpenAI-compatible API, or the offline `builtin` teacher (the problem generator's worked solutions).
2. `curate`: keep traces whose answer is right and format intact (quality), whose question the base model gets
   wrong when sampled through the service with its thinking cut at a budget and its answer forced
   (difficulty), balanced across problem types (diversity).
3. `train`: LoRA SFT through the tinker client, loss on the assistant part only; saves sampler weights.
4. `evaluate`: accuracy against thinking budget, with and without budget forcing (the service's sampler takes
   back an early `</think>` and writes "Wait", and forces `</think>` + the answer prefix at the budget; it is
   the `budget_forcing` extension of the service's OpenAI-compatible `/v1/completions`).
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import openai
import tinker
from pydantic import PositiveInt
from pydantic import dataclasses as pydantic_dataclasses
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from nightlab.errors import NightlabError
from nightlab.recipes.common.budget_forcing import budget_forcing
from nightlab.recipes.common.chat_format import (
    THINK_CLOSE,
    THINK_OPEN,
    chat_prompt,
    graded_answer,
    reasoning_example,
    to_datum,
)
from nightlab.recipes.common.plots import plot_scaling
from nightlab.recipes.common.problems import Problem, check_answer, generate_problems, read_problems
from nightlab.recipes.common.service import connect
from nightlab.recipes.common.settings import (
    DEFAULT_SERVICE_URL,
    MODEL_NAME,
    SERVICE_KEY,
    SERVICE_URL,
    setting,
)
from nightlab.recipes.common.teachers import TeacherError, make_teacher

COLLECTED, BASE_CHECKS, CURATED = "collected.jsonl", "base_checks.jsonl", "curated.jsonl"
TRAIN_LOG, EVAL_LOG, SCALING_PNG, SCALING_MD = "train.jsonl", "eval.jsonl", "scaling.png", "scaling.md"
MODES = ("no forcing", "budget forcing")
BROKEN, WRONG, EASY = (
    "format broken (no <think>...</think>)",
    "answer wrong or missing",
    "base model already right",
)
FILTER_HINTS = {
    BROKEN: f"the teacher's replies lack {THINK_OPEN}...{THINK_CLOSE} (see collected.jsonl); ask another "
    "teacher or use --teacher builtin",
    WRONG: "the teacher's answers do not match the verified ones; use a stronger teacher or "
    "--teacher builtin",
    EASY: "the base model already solves these questions; use harder ones (--questions) or "
    "--difficulty-samples 0",
}


class S1Error(NightlabError):
    """A step cannot go on; the message says what is saved and what to do next."""


@pydantic_dataclasses.dataclass
class S1Config:
    """All settings of the pipeline, declared once: the CLI's options are made from these fields. Defaults are
    CPU-sized; docs/recipes.md gives GPU and SmolLM2 settings."""

    workdir: Annotated[Path, setting("Where every step reads and writes its files.", flags=("-w",))]
    base_url: Annotated[str, SERVICE_URL] = DEFAULT_SERVICE_URL
    model: Annotated[str, MODEL_NAME] = ""
    api_key: Annotated[str | None, SERVICE_KEY] = None
    teacher: Annotated[
        str,
        setting(
            "collect: api (a model behind --teacher-base-url) or builtin (the problem generator's worked "
            "solutions; offline, built-in questions only)."
        ),
    ] = "api"
    teacher_base_url: Annotated[
        str, setting("collect: the teacher's OpenAI-compatible base URL (.../v1).")
    ] = ""
    teacher_model: Annotated[str, setting("collect: the teacher model name.")] = ""
    teacher_api_key: Annotated[
        str | None, setting("collect: the teacher's key.", envvar="OPENAI_API_KEY")
    ] = None
    teacher_max_tokens: Annotated[int, setting("collect: longest teacher reply, in tokens.", ge=1)] = 2048
    questions: Annotated[
        Path | None,
        setting(
            "collect: jsonl with question + integer answer (default: built-in arithmetic and word problems)."
        ),
    ] = None
    num_questions: Annotated[int, setting("collect: how many built-in questions.", ge=1)] = 60
    size: Annotated[int, setting("curate: examples to keep.", ge=1)] = 1000
    difficulty_samples: Annotated[
        int, setting("curate: base-model attempts per question (0: no difficulty filter).", ge=0)
    ] = 1
    difficulty_max_tokens: Annotated[
        int, setting("curate: the base model's thinking budget before its answer is forced.", ge=1)
    ] = 96
    epochs: Annotated[int, setting("train: passes over the curated set.", ge=1)] = 3
    batch_size: Annotated[int, setting("train: examples per optimizer step.", ge=1)] = 8
    learning_rate: Annotated[float, setting("train: Adam learning rate.", ge=0)] = 2e-4
    lora_rank: Annotated[int, setting("train: LoRA rank.", ge=1)] = 16
    max_length: Annotated[
        int, setting("train: longest example in tokens (longer ones are skipped).", ge=2)
    ] = 2048
    eval_questions: Annotated[
        Path | None,
        setting("evaluate: jsonl of held-out questions (default: built-in ones not used in training)."),
    ] = None
    num_eval_questions: Annotated[int, setting("evaluate: how many built-in held-out questions.", ge=1)] = 24
    budgets: Annotated[
        list[PositiveInt], setting("evaluate: thinking budgets in tokens, comma-separated.")
    ] = field(default_factory=lambda: [16, 32, 64])
    answer_tokens: Annotated[
        int, setting("curate, evaluate: tokens for the answer after thinking.", ge=1)
    ] = 16
    seed: Annotated[int, setting("Seed for the built-in questions, shuffling and the LoRA init.")] = 0

    def path(self, name: str) -> Path:
        return Path(self.workdir) / name


# --- jsonl --------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file (none if it is missing); a torn last line from a killed run is ignored."""
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise S1Error(f"{path}:{i + 1} is not valid JSON ({exc}); fix or delete that line") from exc
    return rows


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        fh.flush()


# --- 1. collect ---------------------------------------------------------------------------------------------


def training_problems(cfg: S1Config) -> list[Problem]:
    return (
        list(read_problems(cfg.questions))
        if cfg.questions
        else generate_problems(cfg.num_questions, cfg.seed)
    )


def split_trace(content: str, reasoning: str | None = None) -> tuple[str, str] | None:
    """(thinking, final) from a teacher reply, or None when the format is broken.

    Reasoning APIs that return the thinking in a separate `reasoning_content` field are accepted as they are.
    """
    if reasoning and reasoning.strip():
        return reasoning.strip(), content.rpartition(THINK_CLOSE)[2].strip()
    if THINK_CLOSE not in content:
        return None
    thinking, _, final = content.partition(THINK_CLOSE)
    thinking = thinking.split(THINK_OPEN, 1)[-1].strip()
    return (thinking, final.strip()) if thinking and THINK_OPEN not in final else None


def collect(cfg: S1Config, console: Console | None = None) -> Path:
    """Ask the teacher about every question not yet in collected.jsonl; one row per answer, written at
    once."""
    console = console or Console(stderr=True)
    out = cfg.path(COLLECTED)
    done = {row["id"] for row in read_jsonl(out)}
    todo = [p for p in training_problems(cfg) if p.id not in done]
    if not todo:
        console.print(f"collect: all {len(done)} traces are already in {out}")
        return out
    try:
        teacher = make_teacher(
            cfg.teacher, cfg.teacher_base_url, cfg.teacher_model, cfg.teacher_api_key, cfg.teacher_max_tokens
        )
    except TeacherError as exc:
        raise S1Error(str(exc)) from exc
    console.print(
        f"collect: {len(done)} traces already in {out}, {len(todo)} to ask the {teacher.name} teacher"
    )
    with Progress(console=console) as progress:
        bar = progress.add_task("collect traces", total=len(todo))
        for p in todo:
            try:
                trace = teacher.solve(p)
            except TeacherError as exc:
                raise S1Error(
                    f"the teacher failed on {p.id}: {exc}. {len(read_jsonl(out))} traces are saved in {out}; "
                    "run collect again to continue"
                ) from exc
            append_jsonl(
                out,
                [
                    {
                        "id": p.id,
                        "type": p.type,
                        "question": p.question,
                        "answer": p.answer,
                        "difficulty": p.difficulty,
                        "content": trace.content,
                        "reasoning": trace.reasoning,
                        "teacher": teacher.name,
                    }
                ],
            )
            progress.advance(bar)
    return out


# --- sampling through the service ---------------------------------------------------------------------------


class ServiceSampler:
    """Batched completions of token prompts from the service's `/v1`, with nightlab's `budget_forcing`
    field."""

    def __init__(self, cfg: S1Config) -> None:
        self.client = openai.OpenAI(base_url=cfg.base_url.rstrip("/") + "/v1", api_key=cfg.api_key or "local")
        self.tokenizer = service_tokenizer(cfg)

    def complete(
        self,
        model: str,
        prompts: list[list[int]],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        budget_forcing: dict[str, Any] | None = None,
    ) -> list[list[str]]:
        """`n` completions per prompt, in prompt order."""
        extra = {"budget_forcing": budget_forcing} if budget_forcing else None
        reply = self.client.completions.create(
            model=model, prompt=prompts, n=n, max_tokens=max_tokens, temperature=temperature, extra_body=extra
        )
        texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def service_tokenizer(cfg: S1Config):
    """The base model's tokenizer as the tinker client resolves it (what the server reports as
    tokenizer_id)."""
    with connect(cfg.base_url, cfg.api_key) as service:
        return service.create_sampling_client(base_model=cfg.model).result().get_tokenizer()


def chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --- 2. curate ----------------------------------------------------------------------------------------------


@dataclass
class CurateReport:
    """How many examples each filter removed, in order, and what remained per problem type."""

    collected: int
    removed: dict[str, int]
    kept_by_type: dict[str, int]

    def table(self) -> Table:
        table = Table(title="curate: what each filter removed")
        table.add_column("filter")
        table.add_column("removed", justify="right")
        table.add_column("left", justify="right")
        left = self.collected
        table.add_row("collected", "", str(left))
        for name, count in self.removed.items():
            left -= count
            table.add_row(name, str(count), str(left))
        return table


def check_difficulty(cfg: S1Config, rows: list[dict[str, Any]], console: Console) -> dict[str, int]:
    """How often the base model answers each question right, sampled through the service; cached per id.

    A base model rarely closes its thinking by itself, so its thinking is cut at `difficulty_max_tokens` and
    the answer prefix forced (budget forcing), which makes it commit to an answer that can be graded.
    """
    cache = cfg.path(BASE_CHECKS)
    correct = {r["id"]: r["correct"] for r in read_jsonl(cache)}
    todo = [r for r in rows if r["id"] not in correct]
    if todo:
        sampler = ServiceSampler(cfg)
        with Progress(console=console) as progress:
            bar = progress.add_task("base model attempts", total=len(todo))
            for batch in chunks(todo, 16):
                prompts = [chat_prompt(sampler.tokenizer, r["question"], think=True) for r in batch]
                outs = sampler.complete(
                    cfg.model,
                    prompts,
                    n=cfg.difficulty_samples,
                    max_tokens=cfg.difficulty_max_tokens + cfg.answer_tokens,
                    temperature=0.7,
                    budget_forcing=budget_forcing(cfg.difficulty_max_tokens),
                )
                checked = [
                    {"id": r["id"], "correct": sum(graded_answer(t) == r["answer"] for t in texts)}
                    for r, texts in zip(batch, outs, strict=True)
                ]
                append_jsonl(cache, checked)
                correct.update({c["id"]: c["correct"] for c in checked})
                progress.advance(bar, len(batch))
    return correct


def balance(rows: list[dict[str, Any]], size: int, seed: int) -> list[dict[str, Any]]:
    """Round-robin over problem types, longest thinking first within a type (s1: longer traces, harder
    problems)."""
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_type[row["type"]].append(row)
    for group in by_type.values():
        random.Random(seed).shuffle(group)
        group.sort(key=lambda r: len(r["thinking"]), reverse=True)
    picked: list[dict[str, Any]] = []
    queues = [by_type[t] for t in sorted(by_type)]
    while len(picked) < size and any(queues):
        for queue in queues:
            if queue and len(picked) < size:
                picked.append(queue.pop(0))
    return picked


def curate(cfg: S1Config, console: Console | None = None) -> CurateReport | None:
    """Filter collected.jsonl into curated.jsonl; None when curated.jsonl already exists (delete it to
    redo)."""
    console = console or Console(stderr=True)
    out = cfg.path(CURATED)
    if out.is_file():
        console.print(
            f"curate: {out} already holds {len(read_jsonl(out))} examples; delete it to curate again"
        )
        return None
    unique: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(cfg.path(COLLECTED)):
        unique.setdefault(row["id"], row)  # a question collected twice counts once
    rows = list(unique.values())
    if not rows:
        raise S1Error(f"nothing to curate: {cfg.path(COLLECTED)} is empty or missing; run collect first")
    removed: dict[str, int] = {}
    parsed = []
    for row in rows:
        trace = split_trace(row["content"], row.get("reasoning"))
        if trace is not None:
            parsed.append({**row, "thinking": trace[0], "final": trace[1]})
    removed[BROKEN] = len(rows) - len(parsed)
    verified = [r for r in parsed if check_answer(r["final"], r["answer"])]
    removed[WRONG] = len(parsed) - len(verified)
    hard = verified
    if cfg.difficulty_samples > 0:
        base_correct = check_difficulty(cfg, verified, console)
        hard = [r for r in verified if base_correct[r["id"]] == 0]
        removed[EASY] = len(verified) - len(hard)
    picked = balance(hard, cfg.size, cfg.seed)
    removed[f"over the size of {cfg.size} (kept types balanced)"] = len(hard) - len(picked)
    report = CurateReport(len(rows), removed, dict(sorted(Counter(r["type"] for r in picked).items())))
    console.print(report.table())
    if not picked:
        worst = max(removed, key=lambda name: removed[name])
        raise S1Error(
            f"curate kept nothing: '{worst}' removed {removed[worst]} of {len(rows)} examples; "
            f"{FILTER_HINTS[worst]}. Nothing was written; run curate again after the fix"
        )
    keep = ("id", "type", "question", "answer", "thinking")
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in picked), encoding="utf-8")
    tmp.replace(out)
    console.print("kept per type: " + ", ".join(f"{t} {n}" for t, n in report.kept_by_type.items()))
    return report


# --- 3. train -----------------------------------------------------------------------------------------------


def trained_sampler_path(cfg: S1Config) -> str | None:
    """The tinker:// path of the finished run's sampler weights, if train has completed."""
    done = [r for r in read_jsonl(cfg.path(TRAIN_LOG)) if r["event"] == "done"]
    return done[-1]["sampler_path"] if done else None


def train(cfg: S1Config, console: Console | None = None) -> str:
    """LoRA SFT on curated.jsonl; state is saved every epoch so a killed run resumes there. Returns sampler
    path."""
    console = console or Console(stderr=True)
    finished = trained_sampler_path(cfg)
    if finished:
        console.print(f"train: already done, sampler weights at {finished}")
        return finished
    rows = read_jsonl(cfg.path(CURATED))
    if not rows:
        raise S1Error(f"nothing to train on: {cfg.path(CURATED)} is empty or missing; run curate first")
    log = cfg.path(TRAIN_LOG)
    saved = [r for r in read_jsonl(log) if r["event"] == "saved"]
    with connect(cfg.base_url, cfg.api_key) as service:  # closed as errored, not success, if a step fails
        if saved:
            trainer = service.create_training_client_from_state_with_optimizer(saved[-1]["path"]).result()
            console.print(f"train: resuming after epoch {saved[-1]['epoch']} from {saved[-1]['path']}")
        else:
            trainer = service.create_lora_training_client(
                base_model=cfg.model, rank=cfg.lora_rank, seed=cfg.seed
            ).result()
        examples = [
            reasoning_example(trainer.get_tokenizer(), r["question"], r["thinking"], r["answer"])
            for r in rows
        ]
        data = [to_datum(e) for e in examples if len(e.tokens) <= cfg.max_length]
        if len(data) < len(examples):
            console.print(
                f"train: skipped {len(examples) - len(data)} examples longer than {cfg.max_length} tokens"
            )
        if not data:
            raise S1Error(f"every example is longer than max_length={cfg.max_length}; raise it")
        first_epoch = saved[-1]["epoch"] + 1 if saved else 0
        run_epochs(cfg, trainer, data, first_epoch, log, console)
        path = trainer.save_weights_for_sampler("s1-final").result().path
    append_jsonl(log, [{"event": "done", "sampler_path": path}])
    console.print(f"train: sampler weights at {path}")
    return path


def run_epochs(
    cfg: S1Config,
    trainer: tinker.TrainingClient,
    data: list[tinker.Datum],
    first_epoch: int,
    log: Path,
    console: Console,
) -> None:
    batches_per_epoch = -(-len(data) // cfg.batch_size)
    adam = tinker.AdamParams(learning_rate=cfg.learning_rate)
    with Progress(console=console) as progress:
        bar = progress.add_task(
            "SFT", total=batches_per_epoch * cfg.epochs, completed=batches_per_epoch * first_epoch
        )
        for epoch in range(first_epoch, cfg.epochs):
            order = list(range(len(data)))
            random.Random(cfg.seed * 1000 + epoch).shuffle(order)
            for b, batch_ids in enumerate(chunks(order, cfg.batch_size)):
                batch = [data[i] for i in batch_ids]
                fb = trainer.forward_backward(batch, "cross_entropy")
                opt = trainer.optim_step(adam)
                weighted = sum(float(d.loss_fn_inputs["weights"].to_numpy().sum()) for d in batch)
                loss = fb.result().metrics["loss:sum"] / max(weighted, 1.0)
                opt.result()
                append_jsonl(log, [{"event": "step", "epoch": epoch, "batch": b, "loss": loss}])
                progress.update(bar, advance=1, description=f"SFT epoch {epoch + 1} loss {loss:.3f}")
            path = trainer.save_state(f"s1-epoch{epoch}").result().path
            append_jsonl(log, [{"event": "saved", "epoch": epoch, "path": path}])


# --- 4. evaluate --------------------------------------------------------------------------------------------


def evaluation_problems(cfg: S1Config) -> list[Problem]:
    """Held-out questions: from a file, else built-in ones with a different seed and no question seen in
    training."""
    if cfg.eval_questions:
        return list(read_problems(cfg.eval_questions))
    seen = {p.question for p in training_problems(cfg)}
    fresh = [p for p in generate_problems(cfg.num_eval_questions * 2, cfg.seed + 1) if p.question not in seen]
    return fresh[: cfg.num_eval_questions]


def evaluate(cfg: S1Config, model: str | None = None, console: Console | None = None) -> list[dict[str, Any]]:
    """Accuracy per (budget, mode) on held-out questions; writes eval.jsonl, scaling.md and scaling.png.

    `model` defaults to the trained sampler weights (or the base model when train has not run).
    """
    console = console or Console(stderr=True)
    model = model or trained_sampler_path(cfg) or cfg.model
    problems = evaluation_problems(cfg)
    log = cfg.path(EVAL_LOG)
    done = {(r["model"], r["budget"], r["mode"]) for r in read_jsonl(log)}
    todo = [(b, m) for b in cfg.budgets for m in MODES if (model, b, m) not in done]
    if todo:
        sampler = ServiceSampler(cfg)
        prompts = [chat_prompt(sampler.tokenizer, p.question, think=True) for p in problems]
        with Progress(console=console) as progress:
            bar = progress.add_task("evaluate", total=len(todo))
            for budget, mode in todo:
                texts = sampler.complete(
                    model,
                    prompts,
                    n=1,
                    max_tokens=budget + cfg.answer_tokens,
                    temperature=0.0,
                    # think exactly `budget` tokens: an earlier close becomes "Wait"; at the budget, answer
                    budget_forcing=budget_forcing(budget, budget) if mode == "budget forcing" else None,
                )
                append_jsonl(
                    log,
                    [
                        {
                            "model": model,
                            "budget": budget,
                            "mode": mode,
                            "id": p.id,
                            "text": out[0],
                            "correct": graded_answer(out[0]) == p.answer,
                            "thinking_tokens": thinking_tokens(sampler.tokenizer, out[0]),
                        }
                        for p, out in zip(problems, texts, strict=True)
                    ],
                )
                progress.advance(bar)
    summary = summarize([r for r in read_jsonl(log) if r["model"] == model])
    write_report(cfg, model, summary, console)
    return summary


def thinking_tokens(tokenizer, completion: str) -> int:
    return len(tokenizer.encode(completion.partition(THINK_CLOSE)[0], add_special_tokens=False))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["budget"], r["mode"])].append(r)
    return [
        {
            "budget": budget,
            "mode": mode,
            "n": len(rs),
            "accuracy": sum(r["correct"] for r in rs) / len(rs),
            "thinking_tokens": sum(r["thinking_tokens"] for r in rs) / len(rs),
        }
        for (budget, mode), rs in sorted(cells.items())
    ]


def write_report(cfg: S1Config, model: str, summary: list[dict[str, Any]], console: Console) -> None:
    lines = [
        f"# s1 evaluation of {model}",
        "",
        "| budget | mode | accuracy | mean thinking tokens | n |",
        "|---:|---|---:|---:|---:|",
    ]
    table = Table(title=f"accuracy vs thinking budget ({model})")
    for col in ("budget", "mode", "accuracy", "thinking tokens", "n"):
        table.add_column(col)
    for s in summary:
        cells = [
            str(s["budget"]),
            s["mode"],
            f"{100 * s['accuracy']:.1f}%",
            f"{s['thinking_tokens']:.1f}",
            str(s["n"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        table.add_row(*cells)
    cfg.path(SCALING_MD).write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot_scaling(summary, cfg.path(SCALING_PNG))
    console.print(table)
    console.print(f"wrote {cfg.path(SCALING_MD)} and {cfg.path(SCALING_PNG)}")


def run_all(cfg: S1Config, console: Console | None = None) -> list[dict[str, Any]]:
    """collect, curate, train, evaluate; each skips the work its output already holds."""
    console = console or Console(stderr=True)
    collect(cfg, console)
    curate(cfg, console)
    train(cfg, console)
    return evaluate(cfg, console=console)
