"""The `nightlab` command: every user-facing entry point, each a thin wrapper over the module at work."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nightlab import __version__
from nightlab.console import fail as _fail
from nightlab.errors import NightlabError
from nightlab.hub.cli import hub_app
from nightlab.recipes.cli import online_app, recipe_app
from nightlab.train.alias_cli import alias_app
from nightlab.train.plan_cli import plan

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


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="New (or empty) directory for the workspace.")],
    template: str = typer.Option("tinygpt", "--template", "-t", help="Built-in template to copy."),
) -> None:
    """Create a workspace from a built-in template: a git repo with nightlab.toml and its first commit."""
    from nightlab.research.workspace import init_workspace

    try:
        dest = init_workspace(template, directory)
    except NightlabError as exc:
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
    proposer: str | None = typer.Option(
        None, help="auto, or a registered proposer: llm, tune, replay, ... (default: nightlab.toml)."
    ),
    budget: float | None = typer.Option(None, help="Override experiment.budget_seconds."),
    hub: str | None = typer.Option(None, "--hub", help="Post every experiment to this hub (or `[hub] url`)."),
    hub_token: str | None = typer.Option(None, envvar="NIGHTLAB_HUB_TOKEN", help="The hub token."),
    workers: int | None = typer.Option(
        None, min=1, help="Experiments at once, on Ray, each in its own worktree (or `[parallel] workers`)."
    ),
    ray_address: str | None = typer.Option(
        None, help="An existing Ray cluster for the workers (default: start one on this machine)."
    ),
    workspace: Path = WORKSPACE_OPTION,
) -> None:
    """Run the research loop until a stop condition (or Ctrl-C); resumes the run after a crash or kill."""
    import signal

    from nightlab.hub.poster import join_hub
    from nightlab.research.live import Chorus, make_view
    from nightlab.research.loop import ResearchLoop, RunOptions

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    options = RunOptions(tag, max_experiments, hours, max_cost, proposer, budget, workers, ray_address)
    try:
        poster = join_hub(workspace.resolve(), hub, hub_token)
        view = Chorus(make_view(), poster) if poster else make_view()
        elsewhere = poster.elsewhere if poster else None
        state = ResearchLoop(workspace, options, observer=view, elsewhere=elsewhere).run_loop()
    except NightlabError as exc:
        _fail(exc)
    typer.echo(f"see `nightlab status` and `nightlab report` (branch {state.branch})")


@app.command()
def status(
    tag: str | None = typer.Option(None, help="Run to show (default: the latest)."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the run as one JSON document (history, best, noise) for agents."
    ),
    workspace: Path = WORKSPACE_OPTION,
) -> None:
    """Show the experiments of a run from the journal."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from nightlab.research.journal import JOURNAL_NAME, STATE_DIR, Journal
    from nightlab.research.live import DECISION_STYLE
    from nightlab.research.report import find_run
    from nightlab.research.safe_text import terminal_safe
    from nightlab.research.summary import run_json

    def shown(text: str) -> str:
        """An agent's words as plain text: no escape sequences, no rich markup."""
        return escape(terminal_safe(text[:70]))

    if not (workspace / STATE_DIR / JOURNAL_NAME).is_file():
        _fail(RuntimeError(f"{workspace.resolve()} has no nightlab journal yet; start with `nightlab run`"))
    journal = Journal.for_workspace(workspace)
    try:
        if as_json:
            typer.echo(run_json(journal, tag))
            return
        journal.verify_chain()
        run = find_run(journal, tag)
        records = journal.experiments(run.id)
        pending = journal.pending(run.id)
    except NightlabError as exc:
        _fail(exc)
    finally:
        journal.close()
    table = Table(title=f"run {run.tag} ({run.branch})")
    for col in ("#", "decision", run.metric_name, "margin/noise", "seconds", "description"):
        table.add_column(col, justify="right" if col in ("#", "seconds") else "left")
    for e in records:
        table.add_row(
            str(e.number),
            f"[{DECISION_STYLE.get(e.decision, '')}]{e.decision}[/]",
            "-" if e.metric is None else f"{e.metric:.6g}",
            "-" if e.sigmas is None else f"{e.sigmas:+.1f}",
            f"{sum(e.timings.values()):.1f}",
            "baseline" if e.kind == "baseline" else shown(e.description),
        )
    for p in pending:
        table.add_row(str(p.number), "[cyan]running[/]", "-", "-", "-", shown(p.experiment.description))
    console = Console()
    console.print(table)
    candidates = [e for e in records if e.kind == "candidate"]
    kept = sum(e.decision == "keep" for e in candidates)
    console.print(f"{len(candidates)} experiments, {kept} kept")


@app.command()
def report(
    tag: str | None = typer.Option(None, help="Run to report (default: the latest)."),
    final: bool = typer.Option(
        False, "--final", help="Score the best on the held-out split first, if not done."
    ),
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: .nightlab/reports/<tag>/).")
    ] = None,
    as_json: bool = typer.Option(
        False, "--json", help="Also write report.json: the run as one document (see `status --json`)."
    ),
    workspace: Path = WORKSPACE_OPTION,
) -> None:
    """Write report.md, progress.png and results.tsv for a run."""
    from nightlab.research.journal import Journal
    from nightlab.research.live import make_view
    from nightlab.research.loop import ResearchLoop, RunOptions
    from nightlab.research.report import build_report, find_run
    from nightlab.research.summary import run_json

    try:
        if final:
            journal = Journal.for_workspace(workspace)
            try:
                run = find_run(journal, tag)
            finally:
                journal.close()
            ResearchLoop(workspace, RunOptions(tag=run.tag), observer=make_view()).final_heldout()
        files = build_report(workspace, tag, out)
        written = [files.report, files.plot, files.tsv, *([files.curves] if files.curves else [])]
        if as_json:
            journal = Journal.for_workspace(workspace)
            try:
                document = run_json(journal, tag)
            finally:
                journal.close()
            written.append(files.report.with_name("report.json"))
            written[-1].write_text(document + "\n", encoding="utf-8")
    except NightlabError as exc:
        _fail(exc)
    typer.echo("\n".join(f"wrote {path}" for path in written))


@app.command()
def dashboard(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8765, help="Port to listen on."),
    online: Annotated[
        Path | None, typer.Option(help="An online run's log directory, shown at /online (`nightlab online`).")
    ] = None,
    workspace: Path = WORKSPACE_OPTION,
) -> None:
    """Serve a web dashboard of the workspace's runs: live status, experiments, progress, diffs and logs."""
    import uvicorn

    from nightlab.web.app import create_dashboard_app

    try:
        app_ = create_dashboard_app(workspace, online)
    except NightlabError as exc:
        _fail(exc)
    typer.echo(f"nightlab dashboard of {workspace.resolve()} on http://{host}:{port}/ (Ctrl-C stops it)")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


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
    allow_model: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-model",
            help="A model directory or hub id clients may also name, repeatable (besides the prepared models "
            "and the preloads; nothing else is ever opened for a client).",
        ),
    ] = None,
    max_loaded_bases: int = typer.Option(
        2, min=1, help="Base models kept in memory; the least recently used idle one is unloaded past it."
    ),
    max_request_mb: float = typer.Option(
        64, min=0.001, help="The largest request body accepted, in MiB (compressed bodies: once expanded)."
    ),
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-origin",
            help="A web page origin (e.g. http://localhost:3000) allowed to call the API, repeatable; "
            "browsers' requests are refused otherwise.",
        ),
    ] = None,
    quantize: Annotated[
        list[str] | None,
        typer.Option(
            "--quantize",
            help="MODEL=nf4 or MODEL=int8: load that base quantized (QLoRA), repeatable; see `nightlab plan`",
        ),
    ] = None,
    memory_limit_gb: Annotated[
        float | None,
        typer.Option(
            help="Refuse a base whose planned LoRA training peak passes this many GiB (default: the memory "
            "free on the device when it loads).",
        ),
    ] = None,
) -> None:
    """Serve the Tinker training API (/api/v1) and an OpenAI-compatible API (/v1): LoRA fine-tuning here."""
    from nightlab.train.api.app import serve as run_service
    from nightlab.train.settings import ServeSettings, default_data_dir, keys_from_env

    try:
        settings = ServeSettings(
            data_dir=data_dir or default_data_dir(),
            device=device,
            api_keys=[*(api_key or []), *keys_from_env()],
            preload=preload or [],
            allowed_models=allow_model or [],
            max_loaded_bases=max_loaded_bases,
            max_request_bytes=int(max_request_mb * 2**20),
            allowed_origins=allow_origin or [],
            quantization=dict(_quantize_item(item) for item in quantize or []),
            memory_limit_gb=memory_limit_gb,
            host=host,
            port=port,
        )
        settings.check_exposure()
        run_service(settings)
    except (ValueError, NightlabError) as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.echo("interrupted before the server started; nothing was written")
        raise typer.Exit(130) from None


def _quantize_item(item: str) -> tuple[str, str]:
    """--quantize's MODEL=SCHEME, split at the last '=' (a model path may hold one)."""
    model, sep, scheme = item.rpartition("=")
    if not sep or not model:
        raise typer.BadParameter(f"{item!r}: expected MODEL=nf4 or MODEL=int8", param_hint="--quantize")
    return model, scheme


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


app.add_typer(alias_app, name="alias")
app.command()(plan)
feedback_app = typer.Typer(help="Ratings users sent on /v1 answers (POST /v1/feedback).")
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
def feedback_export(
    out: Annotated[Path, typer.Argument(help="The JSON-lines file; pairs go to OUT's .pairs.jsonl.")],
    owner: Annotated[str | None, typer.Option(help="Only this API key owner's feedback.")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="The service's data dir (default: $NIGHTLAB_DATA_DIR, ~/.nightlab)."),
    ] = None,
) -> None:
    """Every rated answer as a dataset row (prompt, answer, rating, correction, comment), and each correction
    as a preference pair (prompt, chosen, rejected)."""
    from nightlab.train.feedback import DB_NAME, FeedbackStore
    from nightlab.train.settings import default_data_dir

    directory = data_dir or default_data_dir()
    if not (directory / DB_NAME).is_file():
        where = f"`nightlab serve --data-dir {directory}` keeps it there"
        _fail(NightlabError(f"no feedback in {directory}: {where}"))
    store = FeedbackStore(directory)
    try:
        rated, pairs = store.export(out, owner)
    finally:
        store.close()
    typer.echo(f"{rated} rated answers -> {out}; {pairs} preference pairs -> {out.stem}.pairs.jsonl")


def _prepare(name: str, data_dir: Path | None) -> None:
    from nightlab.train import models

    try:
        path = models.prepare_model(name, data_dir or models.default_data_dir())
    except (NightlabError, ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(f"prepared {path}\nuse it as model_name: {path}")


@models_app.command("prepare")
def models_prepare(
    name: Annotated[
        str, typer.Argument(help="smollm2 (the offline GGUF) or a hub id already in the HF cache.")
    ],
    data_dir: Path | None = MODELS_DATA_DIR,
) -> None:
    """Convert a model into a regular Hugging Face directory in the data dir (tokenizer checked and fixed)."""
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
app.add_typer(recipe_app, name="recipe")
app.add_typer(hub_app, name="hub")
app.add_typer(online_app, name="online")


if __name__ == "__main__":
    app()
