"""The `nightlab` command: every user-facing entry point, each a thin wrapper over a module that does the work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from nightlab import __version__

app = typer.Typer(
    name="nightlab",
    help="A research lab that keeps working while you sleep.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nightlab {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """nightlab: run experiments all night (`run`), fine-tune open models on your hardware (`serve`)."""


# --- research loop commands: init, run, status, report ---

WORKSPACE_OPTION = typer.Option(
    Path("."), "--workspace", "-C", help="The workspace directory (default: here)."
)


def _research_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the user's setup needs a fix": shown as one clear line, no traceback."""
    from nightlab.config import ConfigError
    from nightlab.research.journal import ChainError
    from nightlab.research.loop import LoopError
    from nightlab.research.proposers.replay import ReplayError
    from nightlab.research.report import ReportError
    from nightlab.research.workspace import WorkspaceError

    return ConfigError, ChainError, LoopError, ReplayError, ReportError, WorkspaceError


def _setup_errors() -> tuple[type[BaseException], ...]:
    """Also the proposers' and the sandbox's configuration errors (imported only when something failed)."""
    from nightlab.research.proposers.llm import LLMError
    from nightlab.research.sandbox import SandboxUnavailable

    return (*_research_errors(), LLMError, SandboxUnavailable)


def _fail(exc: BaseException) -> NoReturn:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, soft_wrap=True).print(Text("error: ", style="bold red") + Text(str(exc)))
    raise typer.Exit(1)


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="New (or empty) directory for the workspace.")],
    template: str = typer.Option("tinygpt", "--template", "-t", help="Built-in template to copy."),
) -> None:
    """Create a workspace from a built-in template: a git repo with nightlab.toml and its first commit."""
    from nightlab.research.workspace import WorkspaceError, init_workspace

    try:
        dest = init_workspace(template, directory)
    except WorkspaceError as exc:
        _fail(exc)
    typer.echo(f"created {dest} from template {template}; next: cd {directory} && nightlab run")


@app.command("run")
def run_command(
    tag: str | None = typer.Option(
        None,
        help="Run name; branch nightlab/<tag>. Default: the run branch you "
        "are on, else today's date. An existing tag resumes that run.",
    ),
    max_experiments: int | None = typer.Option(
        None, min=0, help="Stop when the run holds this many experiments."
    ),
    hours: float | None = typer.Option(None, min=0, help="Stop after this many hours (this invocation)."),
    max_cost: float | None = typer.Option(
        None, min=0, help="Stop before LLM spend (USD, whole run) would pass this."
    ),
    proposer: str | None = typer.Option(None, help="auto, llm, tune or replay (default: nightlab.toml)."),
    budget: float | None = typer.Option(None, help="Override experiment.budget_seconds."),
    workspace: Path = WORKSPACE_OPTION,
) -> None:
    """Run the research loop until a stop condition (or Ctrl-C); resumes the run after a crash or kill."""
    import signal

    from nightlab.research.live import make_view
    from nightlab.research.loop import ResearchLoop, RunOptions

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    options = RunOptions(tag, max_experiments, hours, max_cost, proposer, budget)
    try:
        state = ResearchLoop(workspace, options, observer=make_view()).run_loop()
    except _setup_errors() as exc:
        _fail(exc)
    typer.echo(f"see `nightlab status` and `nightlab report` (branch {state.branch})")


@app.command()
def status(
    tag: str | None = typer.Option(None, help="Run to show (default: the latest)."),
    workspace: Path = WORKSPACE_OPTION,
) -> None:
    """Show the experiments of a run from the journal."""
    from rich.console import Console
    from rich.table import Table

    from nightlab.research.journal import JOURNAL_NAME, STATE_DIR, Journal
    from nightlab.research.live import DECISION_STYLE
    from nightlab.research.report import find_run

    if not (workspace / STATE_DIR / JOURNAL_NAME).is_file():
        _fail(RuntimeError(f"{workspace.resolve()} has no nightlab journal yet; start with `nightlab run`"))
    journal = Journal.for_workspace(workspace)
    try:
        journal.verify_chain()
        run = find_run(journal, tag)
        rows = journal.experiments(run.id)
        pending = journal.pending(run.id)
    except _research_errors() as exc:
        _fail(exc)
    finally:
        journal.close()
    table = Table(title=f"run {run.tag} ({run.branch})")
    for col in ("#", "decision", run.metric_name, "margin/noise", "seconds", "description"):
        table.add_column(col, justify="right" if col in ("#", "seconds") else "left")
    for r in rows:
        timings = json.loads(r["timings_json"] or "{}")
        table.add_row(
            str(r["number"]),
            f"[{DECISION_STYLE.get(r['decision'], '')}]{r['decision']}[/]",
            "-" if r["metric"] is None else f"{r['metric']:.6g}",
            "-" if r["sigmas"] is None else f"{r['sigmas']:+.1f}",
            f"{sum(timings.values()):.1f}",
            "baseline" if r["kind"] == "baseline" else (r["description"] or "")[:70],
        )
    for p in pending:
        table.add_row(str(p["number"]), "[cyan]running[/]", "-", "-", "-", p.get("description", "")[:70])
    console = Console()
    console.print(table)
    kept = [r for r in rows if r["kind"] == "candidate" and r["decision"] == "keep"]
    done = sum(r["kind"] == "candidate" for r in rows)
    console.print(f"{done} experiments, {len(kept)} kept")


@app.command()
def report(
    tag: str | None = typer.Option(None, help="Run to report (default: the latest)."),
    final: bool = typer.Option(
        False, "--final", help="Score the best on the held-out split first, if not done."
    ),
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: .nightlab/reports/<tag>/).")
    ] = None,
    workspace: Path = WORKSPACE_OPTION,
) -> None:
    """Write report.md, progress.png and results.tsv for a run."""
    from nightlab.research.journal import Journal
    from nightlab.research.live import make_view
    from nightlab.research.loop import ResearchLoop, RunOptions
    from nightlab.research.report import build_report, find_run

    try:
        if final:
            journal = Journal.for_workspace(workspace)
            try:
                run = find_run(journal, tag)
            finally:
                journal.close()
            ResearchLoop(workspace, RunOptions(tag=run.tag), observer=make_view()).final_heldout()
        files = build_report(workspace, tag, out)
    except _setup_errors() as exc:
        _fail(exc)
    typer.echo(f"wrote {files.report}\nwrote {files.plot}\nwrote {files.tsv}")


# --- training service commands: serve, models ---
@app.command()
def serve(
    host: str = typer.Option(
        "127.0.0.1", help="Interface to listen on; other than localhost needs --api-key."
    ),
    port: int = typer.Option(8000, help="Port to listen on."),
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Models, checkpoints and the service database (default: $NIGHTLAB_DATA_DIR or ~/.nightlab).",
        ),
    ] = None,
    device: str = typer.Option("auto", help="Where models run: auto, cpu, cuda or mps."),
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="An accepted API key (tml-...), repeatable; also $NIGHTLAB_API_KEYS, comma-separated.",
        ),
    ] = None,
    preload: Annotated[
        list[str] | None, typer.Option("--preload", help="A base model to load before serving, repeatable.")
    ] = None,
) -> None:
    """Serve the Tinker training API (/api/v1) and an OpenAI-compatible API (/v1): LoRA fine-tuning on this machine."""
    from nightlab.train.api.app import serve as run_service
    from nightlab.train.engine import EngineError
    from nightlab.train.settings import ServeSettings, default_data_dir, keys_from_env

    try:
        settings = ServeSettings(
            data_dir=data_dir or default_data_dir(),
            device=device,
            api_keys=[*(api_key or []), *keys_from_env()],
            preload=preload or [],
            host=host,
            port=port,
        )
        settings.check_exposure()
        run_service(settings)
    except (ValueError, EngineError) as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.echo("interrupted before the server started; nothing was written")
        raise typer.Exit(130) from None


models_app = typer.Typer(
    help="Base models the training service can serve: list, prepare, pull.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
MODELS_DATA_DIR = typer.Option(
    None, "--data-dir", help="Where prepared models live (default: $NIGHTLAB_DATA_DIR or ~/.nightlab)."
)


@models_app.command("list")
def models_list(data_dir: Path | None = MODELS_DATA_DIR) -> None:
    """Show servable models, one per line; the first column is exactly what to pass as `model_name`."""
    from rich.console import Console

    from nightlab.train import models

    data_dir = data_dir or models.default_data_dir()
    with Console(stderr=True).status("reading model configs"):
        found = [(model, *models.describe(model)) for model in models.list_prepared(data_dir)]
    typer.echo("NAME\tsource\tarch\tcontext")
    for model, arch, context in found:
        typer.echo(f"{model.name}\t{model.source}\t{arch}\t{context}")
    if any(model.source == "gguf" for model, *_ in found):
        typer.echo(
            "tip: `nightlab models prepare smollm2` writes a directory clients can load its tokenizer from",
            err=True,
        )


def _prepare(name: str, data_dir: Path | None) -> None:
    from nightlab.train import models

    try:
        path = models.prepare_model(name, data_dir or models.default_data_dir())
    except (models.UnknownModelError, ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(f"prepared {path}\nuse it as model_name: {path}")


@models_app.command("prepare")
def models_prepare(
    name: Annotated[
        str, typer.Argument(help="smollm2 (the offline GGUF) or a hub id already in the HF cache.")
    ],
    data_dir: Path | None = MODELS_DATA_DIR,
) -> None:
    """Convert a model into a regular Hugging Face directory under the data dir (tokenizer checked and fixed)."""
    _prepare(name, data_dir)


@models_app.command("pull")
def models_pull(
    hub_id: Annotated[
        str, typer.Argument(help="A Hugging Face hub id such as org/name (needs the network).")
    ],
    data_dir: Path | None = MODELS_DATA_DIR,
) -> None:
    """Download a model from the Hugging Face hub and save it as a prepared model under the data dir."""
    _prepare(hub_id, data_dir)


# --- recipe commands: s1, rl (post-training through the training service's public API) ---
recipe_app = typer.Typer(
    help="Post-training recipes run through `nightlab serve`: s1, rl.", no_args_is_help=True
)
app.add_typer(recipe_app, name="recipe")
SERVICE_URL = typer.Option(
    "http://127.0.0.1:8000",
    "--base-url",
    envvar="TINKER_BASE_URL",
    help="The training service (nightlab serve).",
)
SERVICE_KEY = typer.Option(
    None, "--api-key", envvar="TINKER_API_KEY", help="The service's API key (tml-...)."
)
MODEL_NAME = typer.Option(
    ..., "--model", help="Base model on the service, as `nightlab models list` prints it."
)


def _recipe_errors() -> tuple[type[BaseException], ...]:
    import httpx
    import openai
    import tinker

    from nightlab.recipes.s1 import S1Error
    from nightlab.recipes.service import ServiceUnreachable

    return (
        S1Error,
        ServiceUnreachable,
        ValueError,
        OSError,
        tinker.TinkerError,
        openai.OpenAIError,
        httpx.TransportError,
    )


def _recipe_fail(exc: BaseException, base_url: str) -> NoReturn:
    """A lost connection says how to start the service at `base_url`; other errors are shown as they are."""
    import httpx
    import openai

    from nightlab.recipes.service import unreachable_message

    if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
        _fail(RuntimeError(unreachable_message(base_url, exc)))
    _fail(exc)


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter("give at least one budget, each >= 1")
    return values


@recipe_app.command("s1")
def recipe_s1(
    step: Annotated[
        str, typer.Argument(help="collect, curate, train, evaluate, or all (each skips finished work).")
    ],
    workdir: Annotated[
        Path, typer.Option("--workdir", "-w", help="Where every step reads and writes its files.")
    ],
    model: str = MODEL_NAME,
    base_url: str = SERVICE_URL,
    api_key: str | None = SERVICE_KEY,
    teacher: str = typer.Option(
        "api",
        help="collect: api (a model behind --teacher-base-url) or builtin (the "
        "problem generator's worked solutions; offline, built-in questions only).",
    ),
    teacher_base_url: str = typer.Option(
        "", help="collect: the teacher's OpenAI-compatible base URL (.../v1)."
    ),
    teacher_model: str = typer.Option("", help="collect: the teacher model name."),
    teacher_api_key: str | None = typer.Option(
        None, envvar="OPENAI_API_KEY", help="collect: the teacher's key."
    ),
    teacher_max_tokens: int = typer.Option(2048, min=1, help="collect: longest teacher reply, in tokens."),
    questions: Annotated[
        Path | None,
        typer.Option(
            help="collect: jsonl with question + integer answer "
            "(default: built-in arithmetic and word problems)."
        ),
    ] = None,
    num_questions: int = typer.Option(60, min=1, help="collect: how many built-in questions."),
    size: int = typer.Option(1000, min=1, help="curate: examples to keep."),
    difficulty_samples: int = typer.Option(
        1, min=0, help="curate: base-model attempts per question (0: no difficulty filter)."
    ),
    difficulty_max_tokens: int = typer.Option(
        96, min=1, help="curate: the base model's thinking budget before its answer is forced."
    ),
    epochs: int = typer.Option(3, min=1, help="train: passes over the curated set."),
    batch_size: int = typer.Option(8, min=1, help="train: examples per optimizer step."),
    learning_rate: float = typer.Option(2e-4, min=0, help="train: Adam learning rate."),
    lora_rank: int = typer.Option(16, min=1, help="train: LoRA rank."),
    max_length: int = typer.Option(
        2048, min=2, help="train: longest example in tokens (longer ones are skipped)."
    ),
    eval_questions: Annotated[
        Path | None,
        typer.Option(
            help="evaluate: jsonl of held-out questions (default: built-in ones not used in training)."
        ),
    ] = None,
    num_eval_questions: int = typer.Option(24, min=1, help="evaluate: how many built-in held-out questions."),
    budgets: str = typer.Option("16,32,64", help="evaluate: thinking budgets in tokens, comma-separated."),
    answer_tokens: int = typer.Option(
        16, min=1, help="curate, evaluate: tokens for the answer after thinking."
    ),
    checkpoint: str | None = typer.Option(
        None, help="evaluate: a tinker:// sampler path or base model name (default: the trained weights)."
    ),
    seed: int = typer.Option(0, help="Seed for the built-in questions, shuffling and the LoRA init."),
) -> None:
    """s1: collect teacher traces, curate, LoRA SFT with thinking, evaluate accuracy vs thinking budget."""
    from nightlab.recipes import s1

    steps = {"collect": s1.collect, "curate": s1.curate, "train": s1.train, "all": s1.run_all}
    if step not in (*steps, "evaluate"):
        _fail(ValueError(f"unknown step {step!r}: use collect, curate, train, evaluate or all"))
    cfg = s1.S1Config(
        workdir,
        base_url=base_url,
        model=model,
        api_key=api_key,
        teacher=teacher,
        teacher_base_url=teacher_base_url,
        teacher_model=teacher_model,
        teacher_api_key=teacher_api_key,
        questions=questions,
        num_questions=num_questions,
        teacher_max_tokens=teacher_max_tokens,
        size=size,
        difficulty_samples=difficulty_samples,
        difficulty_max_tokens=difficulty_max_tokens,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        lora_rank=lora_rank,
        max_length=max_length,
        eval_questions=eval_questions,
        num_eval_questions=num_eval_questions,
        budgets=_csv_ints(budgets),
        answer_tokens=answer_tokens,
        seed=seed,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if step == "evaluate":
            s1.evaluate(cfg, model=checkpoint)
        else:
            steps[step](cfg)
    except _recipe_errors() as exc:
        _recipe_fail(exc, base_url)


@recipe_app.command("rl")
def recipe_rl(
    log_dir: Annotated[Path, typer.Option("--log-dir", help="New directory for metrics.jsonl and the plot.")],
    model: str = MODEL_NAME,
    base_url: str = SERVICE_URL,
    api_key: str | None = SERVICE_KEY,
    env: str = typer.Option(
        "arithmetic", help="Environment: arithmetic, or package.module:factory for your own."
    ),
    steps: int = typer.Option(10, min=1, help="Optimizer steps."),
    prompts_per_step: int = typer.Option(4, min=1, help="Prompts (groups) per step."),
    group_size: int = typer.Option(
        4, min=2, help="Samples per prompt; advantages are relative to the group."
    ),
    max_tokens: int = typer.Option(16, min=1, help="Longest completion."),
    temperature: float = typer.Option(1.0, min=0, help="Sampling temperature."),
    learning_rate: float = typer.Option(3e-4, min=0, help="Adam learning rate."),
    lora_rank: int = typer.Option(16, min=1, help="LoRA rank."),
    loss: str = typer.Option("importance_sampling", help="importance_sampling or ppo."),
    kl_coef: float = typer.Option(0.0, min=0, help="Per-token KL penalty to the base model (0: off)."),
    seed: int = typer.Option(0, help="Seed for prompts and the LoRA init."),
) -> None:
    """GRPO-style RL with LoRA: groups of samples from the latest weights, group-relative advantages."""
    from nightlab.recipes.rl import PLOT_FILE, RLConfig, run_rl

    cfg = RLConfig(
        base_url,
        model,
        log_dir,
        env=env,
        api_key=api_key,
        steps=steps,
        prompts_per_step=prompts_per_step,
        group_size=group_size,
        max_tokens=max_tokens,
        temperature=temperature,
        learning_rate=learning_rate,
        lora_rank=lora_rank,
        loss=loss,
        kl_coef=kl_coef,
        seed=seed,  # type: ignore[arg-type]
    )
    try:
        rows = run_rl(cfg)
    except _recipe_errors() as exc:
        _recipe_fail(exc, base_url)
    first, last = rows[0]["reward_mean"], rows[-1]["reward_mean"]
    typer.echo(f"reward {first:.3f} -> {last:.3f} over {len(rows)} steps; see {log_dir / PLOT_FILE}")


if __name__ == "__main__":
    app()
