"""Few-shot image classification: a vision-language model fine-tuned with LoRA against a linear probe on its
own vision encoder, at k = 1, 2, 4, 8 labelled images per class.

Data is any ImageFolder directory (one subdirectory per class, named after it). Per class, `test_per_class`
images are held out; the k-shot training sets are nested (the 2-shot set holds the 1-shot one), so the curve
shows what more shots buy. The VLM sees each image in a chat turn that lists the class names and learns to
answer with the right one (loss on the answer only); it is scored by the log-probability of every class name
as the answer, so a model that never learned the answer format still gets a fair accuracy. The baseline fits
scikit-learn's logistic regression on the mean-pooled outputs of the same model's vision tower, loaded on this
machine. Training and scoring go through the public tinker client only.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import tinker
from pydantic import PositiveInt
from pydantic import dataclasses as pydantic_dataclasses
from tinker import types

from nightlab.errors import NightlabError
from nightlab.recipes.common.service import connect
from nightlab.recipes.common.settings import MODEL_NAME, SERVICE_KEY, SERVICE_URL, setting

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_PLACEHOLDER = "<|image_pad|>"  # what Qwen-VL chat templates write for an image part
RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy_vs_shots.png"
METHODS = ("vlm_lora", "linear_probe")


@pydantic_dataclasses.dataclass
class VLMClassifyConfig:
    """One few-shot comparison; the CLI's options are made from these fields. Defaults suit a real VLM;
    the tests shrink them for a tiny random one."""

    base_url: Annotated[str, SERVICE_URL]
    model: Annotated[str, MODEL_NAME]
    images: Annotated[Path, setting("ImageFolder directory: one subdirectory of images per class.")]
    log_dir: Annotated[Path, setting("Directory for results.json and the plot.")]
    api_key: Annotated[str | None, SERVICE_KEY] = None
    shots: Annotated[list[PositiveInt], setting("Training images per class, comma-separated.")] = field(
        default_factory=lambda: [1, 2, 4, 8]
    )
    test_per_class: Annotated[int, setting("Held-out images per class.", ge=1)] = 10
    image_size: Annotated[int, setting("Images are resized to this square size (pixels).", ge=8)] = 224
    steps: Annotated[int, setting("LoRA optimizer steps per shot count.", ge=1)] = 20
    batch_size: Annotated[int, setting("Training images per optimizer step.", ge=1)] = 16
    learning_rate: Annotated[float, setting("Adam learning rate.", ge=0)] = 2e-4
    lora_rank: Annotated[int, setting("LoRA rank.", ge=1)] = 16
    seed: Annotated[int, setting("Seed for the split, batches and the LoRA init.")] = 0


@dataclass
class Example:
    image: bytes  # png, resized
    label: int


@dataclass
class Split:
    classes: list[str]
    pool: list[list[Example]]  # per class, training candidates in a fixed order (k shots = the first k)
    test: list[Example]

    def shots(self, k: int) -> list[Example]:
        return [example for examples in self.pool for example in examples[:k]]


def load_split(cfg: VLMClassifyConfig) -> Split:
    """Read the ImageFolder, resize every image, and hold out `test_per_class` images of each class."""
    from PIL import Image

    root = Path(cfg.images)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if len(classes) < 2:
        raise ValueError(f"{root} must hold at least two class subdirectories of images")
    need = max(cfg.shots) + cfg.test_per_class
    rng = random.Random(cfg.seed)
    pool, test = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < need:
            raise ValueError(
                f"class {name!r} has {len(files)} images; {max(cfg.shots)} shots plus {cfg.test_per_class} "
                "test images need " + str(need)
            )
        rng.shuffle(files)
        examples = []
        for path in files[:need]:
            with Image.open(path) as image:
                square = image.convert("RGB").resize(
                    (cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC
                )
            out = io.BytesIO()
            square.save(out, "PNG")
            examples.append(Example(out.getvalue(), label))
        test += examples[: cfg.test_per_class]
        pool.append(examples[cfg.test_per_class :])
    return Split(classes, pool, test)


class Prompter:
    """Chat prompts with one image, as tinker ModelInputs: the model's own chat template around an
    ImageChunk whose token count is the model's image processor's."""

    def __init__(self, tokenizer, model: str, classes: list[str]) -> None:
        from nightlab.train.vision import image_processor

        self.processor = image_processor(model)
        self.placeholder = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        question = f"Which of these is it: {', '.join(classes)}? Answer with the name only."
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tokens = tokenizer.encode(text, add_special_tokens=False)
        if tokens.count(self.placeholder) != 1:
            raise ValueError(f"{model}'s chat template does not write one {IMAGE_PLACEHOLDER} per image")
        at = tokens.index(self.placeholder)
        self.before, self.after = tokens[:at], tokens[at + 1 :]
        self.answers = [
            tokenizer.encode(name, add_special_tokens=False) + [tokenizer.eos_token_id] for name in classes
        ]

    def image_tokens(self, size: int) -> int:
        patches = self.processor.get_number_of_image_patches(size, size, {})
        return patches // self.processor.merge_size**2

    def datum(self, example: Example, answer: int, size: int) -> tinker.Datum:
        """The prompt with class `answer`'s name as the reply, trained (and scored) on the reply only."""
        reply = self.answers[answer]
        image = types.ImageChunk(data=example.image, format="png", expected_tokens=self.image_tokens(size))
        model_input = tinker.ModelInput(
            chunks=[
                types.EncodedTextChunk(tokens=self.before),
                image,
                types.EncodedTextChunk(tokens=self.after + reply[:-1]),
            ]
        )
        prompt = len(self.before) + image.expected_tokens + len(self.after)
        weights = [0.0] * (prompt - 1) + [1.0] * len(reply)
        targets = [0] * (prompt - 1) + reply
        return tinker.Datum(
            model_input=model_input, loss_fn_inputs={"target_tokens": targets, "weights": weights}
        )


def vlm_accuracy(
    service: tinker.ServiceClient, prompter: Prompter, split: Split, cfg: VLMClassifyConfig, k: int, progress
) -> float:
    """Fine-tune a fresh LoRA on the k-shot set, then score each test image by its most likely class name."""
    trainer = service.create_lora_training_client(
        base_model=cfg.model, rank=cfg.lora_rank, seed=cfg.seed
    ).result()
    train = [prompter.datum(e, e.label, cfg.image_size) for e in split.shots(k)]
    rng = random.Random(cfg.seed + k)
    adam = tinker.AdamParams(learning_rate=cfg.learning_rate)
    task = progress.add_task(f"{k}-shot LoRA", total=cfg.steps + 1)
    order: list[tinker.Datum] = []
    for _ in range(cfg.steps):
        while len(order) < cfg.batch_size:
            order += rng.sample(train, len(train))
        batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
        step = trainer.forward_backward(batch, "cross_entropy")
        trainer.optim_step(adam).result()
        loss = step.result().metrics["loss:sum"]
        progress.update(task, advance=1, description=f"{k}-shot LoRA, batch loss {loss:.3f}")
    scored = [prompter.datum(e, c, cfg.image_size) for e in split.test for c in range(len(split.classes))]
    outputs = trainer.forward(scored, "cross_entropy").result().loss_fn_outputs
    progress.advance(task)
    weights = [np.asarray(d.loss_fn_inputs["weights"].tolist()) for d in scored]
    scores = [float(np.dot(o["logprobs"].to_numpy(), w)) for o, w in zip(outputs, weights, strict=True)]
    guesses = np.asarray(scores).reshape(len(split.test), len(split.classes)).argmax(1)
    return float(np.mean(guesses == [e.label for e in split.test]))


def vision_features(model: str, examples: list[Example], progress) -> np.ndarray:
    """One vector per image: the model's vision tower (and merger) output, mean-pooled over its tokens."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from nightlab.train.vision import image_processor

    task = progress.add_task("vision features", total=len(examples) + 1)
    vlm = AutoModelForImageTextToText.from_pretrained(model).eval()
    processor = image_processor(model)
    progress.advance(task)
    rows = []
    with torch.inference_mode():
        for example in examples:
            batch = processor(images=[Image.open(io.BytesIO(example.image))], return_tensors="pt")
            tokens = vlm.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0]
            rows.append(tokens.float().mean(0).numpy())
            progress.advance(task)
    return np.stack(rows)


def probe_accuracies(cfg: VLMClassifyConfig, split: Split, progress) -> dict[int, float]:
    """Logistic regression on standardized vision features, per shot count."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise NightlabError(
            "the linear-probe baseline needs scikit-learn: pip install 'nightlab[vision]'"
        ) from None

    pool = split.shots(max(cfg.shots))
    features = vision_features(cfg.model, pool + split.test, progress)
    by_image = {id(e): f for e, f in zip(pool + split.test, features, strict=True)}
    test_x = np.stack([by_image[id(e)] for e in split.test])
    accuracies = {}
    for k in cfg.shots:
        train = split.shots(k)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(np.stack([by_image[id(e)] for e in train]), [e.label for e in train])
        accuracies[k] = float(np.mean(probe.predict(test_x) == [e.label for e in split.test]))
    return accuracies


def run_vlm_classify(cfg: VLMClassifyConfig, show_progress: bool = True) -> list[dict[str, Any]]:
    """Both methods at every shot count; rows {shots, method, accuracy} go to results.json and the plot."""
    from rich.progress import Progress

    from nightlab.recipes.common.plots import plot_accuracy_vs_shots

    split = load_split(cfg)
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with Progress(disable=not show_progress) as progress, connect(cfg.base_url, cfg.api_key) as service:
        tokenizer = service.create_sampling_client(base_model=cfg.model).result().get_tokenizer()
        prompter = Prompter(tokenizer, cfg.model, split.classes)
        probe = probe_accuracies(cfg, split, progress)
        for k in cfg.shots:
            accuracy = vlm_accuracy(service, prompter, split, cfg, k, progress)
            rows.append({"shots": k, "method": "vlm_lora", "accuracy": accuracy})
            rows.append({"shots": k, "method": "linear_probe", "accuracy": probe[k]})
    summary = {"config": asdict(cfg), "classes": split.classes, "test_images": len(split.test), "rows": rows}
    (cfg.log_dir / RESULTS_FILE).write_text(json.dumps(summary, default=str, indent=2))
    plot_accuracy_vs_shots(rows, cfg.log_dir / PLOT_FILE, chance=1 / len(split.classes))
    return rows


def accuracy_table(rows: list[dict[str, Any]]):
    """The rich table the command prints: one row per shot count, one column per method."""
    from rich.table import Table

    table = Table(title="few-shot accuracy (held-out images)")
    table.add_column("shots / class", justify="right")
    for method in METHODS:
        table.add_column(method.replace("_", " "), justify="right")
    for k in sorted({r["shots"] for r in rows}):
        cells = {r["method"]: f"{100 * r['accuracy']:.1f}%" for r in rows if r["shots"] == k}
        table.add_row(str(k), *(cells.get(m, "-") for m in METHODS))
    return table
