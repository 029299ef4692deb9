"""The fixed harness of the finetune workspace: data splits, the training service, the training loop, score.

    python harness.py setup                 write the data splits (and prepare SmolLM2) in the nightlab cache
    python harness.py train                 LoRA fine-tune with finetune.py's settings, within the budget
    python harness.py evaluate --split val  score the checkpoint training saved on a split this file owns

The task is the built-in arithmetic and word problems of `nightlab.recipes.common.problems`, as chat: the user
asks, the assistant says "The answer is N.". The score is `nll`, the mean negative log-likelihood per token of
the reference answer turn (lower is better), plus greedy-decoding `accuracy`. Everything goes through the
public tinker client, to `NIGHTLAB_SERVICE_URL` when set, else to a training service started inside this
process on 127.0.0.1 (no network needed). The evaluate step runs no code from finetune.py; it signs its metric
line with `nightlab.harness`, after taking the key out of its environment.

The train step runs finetune.py's code in its own process, so whatever it leaves in run/ is untrusted. The
evaluate step takes from there only the path of the checkpoint, and scores it only if:
- it carries this experiment's nonce in its name: `NIGHTLAB_NONCE` when the caller gives one to both steps
  (drawn afresh for every execution, so that no earlier experiment could know it), else the one the train
  step drew into run/nonce;
- it was trained on this file's model, whose tokenizer and chat template render the problems;
- with the in-process service, nothing in the service data training saved leads outside it (a link, or a
  checkpoint directory recorded as an absolute or `..` path).
Anything else ends the step with a `FAIL:` line and no metric.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nightlab.harness import read_key, reexec_without_key, sign_metrics
from nightlab.paths import cache_dir
from nightlab.recipes.common.problems import Problem, extract_answer, generate_problems, read_problems

DATA = cache_dir() / "finetune"
SPLITS = {"train": 2000, "val": 64, "test": 64}
RUN = Path("run")
RESULT = RUN / "result.json"
NONCE_FILE = RUN / "nonce"
NONCE_ENV = "NIGHTLAB_NONCE"
API_KEY = "tml-finetune-local"  # the in-process service has no keys; an external one may need TINKER_API_KEY
EVAL_MAX_TOKENS = 16


def model_name() -> str:
    """FINETUNE_MODEL (a Hugging Face model directory), else SmolLM2-135M-Instruct prepared by `setup`."""
    from nightlab.train.models import SMOLLM2_DIRNAME, models_dir

    return os.environ.get("FINETUNE_MODEL") or str(models_dir(DATA) / SMOLLM2_DIRNAME)


def served_name(model: str) -> str:
    """The name the training service knows a model directory by: its resolved path."""
    return str(Path(model).expanduser().resolve())


def checkpoint_name(nonce: str) -> str:
    return f"final-{nonce}"


def split_path(split: str) -> Path:
    return DATA / "data" / f"{split}.jsonl"


def load_split(split: str) -> list[Problem]:
    path = split_path(split)
    if not path.is_file():
        raise SystemExit(f"FAIL: {path} is missing; run `python harness.py setup` first")
    return list(read_problems(path))


def setup() -> None:
    """Splits drawn from fresh random seeds (so code that reads this file cannot regenerate val or test)."""
    if not all(split_path(s).is_file() for s in SPLITS):
        seen: set[str] = set()
        split_path("train").parent.mkdir(parents=True, exist_ok=True)
        for split, size in SPLITS.items():
            rng_seed, rows = secrets.randbits(32), []
            for problem in generate_problems(size * 3, seed=rng_seed):
                if problem.question not in seen and len(rows) < size:
                    seen.add(problem.question)
                    rows.append(problem.to_json())
            tmp = split_path(split).with_suffix(".tmp")
            tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
            tmp.replace(split_path(split))
        print(f"wrote {', '.join(f'{s} ({n})' for s, n in SPLITS.items())} to {split_path('train').parent}")
    model = Path(model_name())
    if not (model / "config.json").is_file():
        if "FINETUNE_MODEL" in os.environ:
            raise SystemExit(f"FAIL: FINETUNE_MODEL={model} is not a Hugging Face model directory")
        from nightlab.train.models import prepare_model

        prepare_model("smollm2", DATA)
    print(f"model: {model}")


@contextmanager
def service(read_only: bool = False) -> Iterator[str]:
    """The training service's base URL: NIGHTLAB_SERVICE_URL, or one served from this process until exit.

    Training writes its checkpoints under run/service. Evaluation may not write there (the sandbox makes the
    scratch dir read-only outside training), so it serves a temporary copy of what training saved, links
    kept as links, once `check_confined` has passed it."""
    if os.environ.get("NIGHTLAB_SERVICE_URL"):
        yield os.environ["NIGHTLAB_SERVICE_URL"]
        return
    from nightlab.train.api.app import create_app
    from nightlab.train.api.background import serve_in_thread
    from nightlab.train.settings import ServeSettings

    with tempfile.TemporaryDirectory(prefix="finetune-service-") as tmp:
        data_dir = RUN / "service"
        if read_only:
            data_dir = shutil.copytree(data_dir, Path(tmp) / "service", symlinks=True)
            check_confined(data_dir)
        settings = ServeSettings(
            data_dir=data_dir,
            device=os.environ.get("FINETUNE_DEVICE", "auto"),
            allowed_models=[model_name()],
        )
        with serve_in_thread(create_app(settings)) as background:
            yield background.url


def check_confined(data_dir: Path) -> None:
    """Refuse service data that reaches outside itself, whoever wrote it: a link that leads out, or a
    checkpoint whose recorded directory resolves elsewhere (an absolute path, `..`). Either would score files
    that this experiment's training did not save, such as a checkpoint an earlier experiment stashed."""
    from nightlab.train.checkpoints import MAX_PAGE_LIMIT, CheckpointStore
    from nightlab.train.sessions import LOCAL_OWNER

    def real(path: Path) -> Path:  # realpath, unlike Path.resolve, takes a symlink loop without raising
        return Path(os.path.realpath(path))

    root = real(data_dir)
    for top, dirs, files in os.walk(data_dir):
        for path in (Path(top) / name for name in dirs + files):
            if path.is_symlink() and not real(path).is_relative_to(root):
                raise SystemExit(
                    f"FAIL: {path.relative_to(data_dir)} in the service data saved by training links to "
                    f"{real(path)}, outside the service data; refusing to score"
                )
    store = CheckpointStore(data_dir)
    try:
        checkpoints, _ = store.user_checkpoints(LOCAL_OWNER, limit=MAX_PAGE_LIMIT)
    finally:
        store.close()
    for ckpt in checkpoints:
        if not (directory := real(ckpt.directory)).is_relative_to(root):
            raise SystemExit(
                f"FAIL: the service data saved by training records checkpoint {ckpt.tinker_path} in "
                f"{directory}, outside the service data; refusing to score"
            )


def client(url: str):  # noqa: ANN201 - a tinker.ServiceClient, imported late to keep `--help` fast
    import tinker

    return tinker.ServiceClient(base_url=url, api_key=os.environ.get("TINKER_API_KEY", API_KEY))


def render(tokenizer, problem: Problem) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer-turn tokens) in the model's own chat template: the fixed format of the task."""
    user = [{"role": "user", "content": problem.question}]
    full = user + [{"role": "assistant", "content": f"The answer is {problem.answer}."}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(full, tokenize=False)
    if not text.startswith(prompt):
        raise SystemExit("FAIL: the chat template renders the prompt differently inside the conversation")
    return (
        tokenizer.encode(prompt, add_special_tokens=False),
        tokenizer.encode(text[len(prompt) :], add_special_tokens=False),
    )


def training_nonce() -> str:
    """This experiment's nonce: the caller's, else a fresh one, left in run/nonce for the evaluate step."""
    nonce = os.environ.get(NONCE_ENV)
    if not nonce:
        nonce = secrets.token_hex(16)
        NONCE_FILE.write_text(nonce)
    return nonce


def train() -> None:
    """Train until finetune.STEPS or the time budget, whichever comes first; save weights for sampling under
    this experiment's nonce."""
    nonce = training_nonce()
    import finetune as ft
    import tinker
    from transformers import AutoTokenizer

    budget = float(os.environ.get("NIGHTLAB_BUDGET_SECONDS", "60"))
    seed = ft.SEED + int(os.environ.get("NIGHTLAB_SEED_OFFSET", "0"))
    problems = load_split("train")
    random.Random(seed).shuffle(problems)
    model = model_name()
    tokenizer = AutoTokenizer.from_pretrained(model)
    examples = [render(tokenizer, p) for p in problems]
    with service() as url:
        trainer = (
            client(url).create_lora_training_client(base_model=model, rank=ft.LORA_RANK, seed=seed).result()
        )
        # The first step (model load, warm-up) is outside the budget; the budget clock starts after it.
        start, steps, losses, last = None, 0, [], 0.0
        while steps < ft.STEPS:
            if start is not None and time.monotonic() - start + last > budget:
                break  # the next step would end past the budget
            began = time.monotonic()
            batch = [examples[(steps * ft.BATCH_SIZE + i) % len(examples)] for i in range(ft.BATCH_SIZE)]
            data = [ft.build_datum(prompt, answer) for prompt, answer in batch]
            adam = tinker.AdamParams(
                learning_rate=ft.learning_rate(steps),
                beta1=ft.BETA1,
                beta2=ft.BETA2,
                eps=1e-8,
                weight_decay=ft.WEIGHT_DECAY,
                grad_clip_norm=ft.GRAD_CLIP_NORM,
            )
            fwd = trainer.forward_backward(data, ft.LOSS, ft.LOSS_CONFIG)
            opt = trainer.optim_step(adam)
            result, _ = fwd.result(), opt.result()
            weight = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in data)
            losses.append(result.metrics["loss:sum"] / max(weight, 1e-9))
            steps += 1
            last = time.monotonic() - began
            start = start if start is not None else time.monotonic()
            if not math.isfinite(losses[-1]):
                raise SystemExit(f"FAIL: training loss is {losses[-1]} at step {steps}")
            print(
                f"step {steps:4d}  loss {losses[-1]:.4f}  lr {adam.learning_rate:.2e}  {last:5.2f}s/step",
                flush=True,
            )
        seconds = time.monotonic() - start if start is not None else 0.0
        path = trainer.save_weights_for_sampler(checkpoint_name(nonce)).result().path
    RESULT.write_text(json.dumps({"sampler_path": path, "steps": steps, "train_seconds": seconds}))
    final = losses[-1] if losses else float("nan")
    print(f"trained {steps} steps in {seconds:.1f}s; final train loss {final:.4f}")


def score(url: str, path: str, problems: list[Problem]) -> dict[str, float]:
    """Mean NLL per answer-turn token (teacher forcing) and greedy accuracy, from the sampler weights at
    `path`, with this file's model's tokenizer and chat template: a checkpoint on another base is refused."""
    import tinker
    from transformers import AutoTokenizer

    model = model_name()
    sampler = client(url).create_sampling_client(model_path=path).result()
    base = sampler.get_base_model()
    if base != served_name(model):
        raise SystemExit(
            f"FAIL: {path} was trained on {base}, not on {model}, whose tokenizer and chat template the "
            "score uses; refusing to score"
        )
    tokenizer = AutoTokenizer.from_pretrained(model)
    rendered = [render(tokenizer, p) for p in problems]
    logprob_futures = [
        sampler.compute_logprobs(tinker.ModelInput.from_ints(prompt + answer)) for prompt, answer in rendered
    ]
    greedy = tinker.SamplingParams(max_tokens=EVAL_MAX_TOKENS, temperature=0.0)
    sample_futures = [
        sampler.sample(tinker.ModelInput.from_ints(prompt), 1, greedy) for prompt, _ in rendered
    ]
    nll = tokens = 0.0
    for (prompt, answer), future in zip(rendered, logprob_futures, strict=True):
        nll -= sum(future.result()[len(prompt) :])
        tokens += len(answer)
    correct = sum(
        extract_answer(tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True)) == p.answer
        for p, f in zip(problems, sample_futures, strict=True)
    )
    return {"nll": nll / tokens, "accuracy": correct / len(problems), "eval_tokens": tokens}


def evaluation_nonce() -> str:
    """This experiment's nonce: the caller's, else the one the train step drew (a step run by hand)."""
    nonce = os.environ.get(NONCE_ENV)
    if nonce:
        return nonce
    try:
        return NONCE_FILE.read_text().strip()
    except OSError as exc:
        raise SystemExit(f"FAIL: no {NONCE_ENV} and no {NONCE_FILE} from the train step: {exc}") from None


def evaluate(split: str) -> int:
    """Score the checkpoint this experiment's training saved on `split`; sign the metrics when the loop gave
    a key."""
    reexec_without_key()
    key = read_key()
    try:
        result = json.loads(RESULT.read_text())
        path = str(result["sampler_path"])
        trained = {"train_steps": float(result["steps"]), "train_seconds": float(result["train_seconds"])}
        if not all(map(math.isfinite, trained.values())):
            raise ValueError(f"steps and train_seconds must be finite numbers, got {trained}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"FAIL: no usable {RESULT} from the train step: {exc}")
        return 1
    expected = checkpoint_name(evaluation_nonce())
    if not (path.startswith("tinker://") and path.endswith(f"/sampler_weights/{expected}")):
        print(
            f"FAIL: {path} is not this experiment's checkpoint (sampler weights named {expected}); a "
            "checkpoint from another experiment is never scored"
        )
        return 1
    problems = load_split(split)
    with service(read_only=True) as url:
        metrics = score(url, path, problems)
    metrics.update(trained)
    if not math.isfinite(metrics["nll"]):
        print(f"FAIL: nll is {metrics['nll']}")
        return 1
    for name, value in metrics.items():
        print(f"{name}: {value:.6f}")
    print(f"(scored {path} on {len(problems)} {split} problems)")
    if key:
        print(sign_metrics(metrics, key))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("setup", help="write the data splits; prepare SmolLM2 unless FINETUNE_MODEL is set")
    sub.add_parser("train", help="fine-tune with finetune.py's settings within NIGHTLAB_BUDGET_SECONDS")
    ev = sub.add_parser("evaluate", help="score the trained weights; prints a signed metric line")
    ev.add_argument("--split", choices=["val", "test"], default="val")
    args = parser.parse_args()
    if args.step == "setup":
        setup()
    elif args.step == "train":
        RUN.mkdir(exist_ok=True)
        train()
    else:
        return evaluate(args.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
