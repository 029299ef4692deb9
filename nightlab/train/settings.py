"""Settings of the training service (`nightlab serve`), in one place so the CLI, the app and tests agree."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from nightlab.train.models import default_data_dir
from nightlab.train.quantize import check_scheme

API_KEY_PREFIX = "tml-"
API_KEYS_ENV = "NIGHTLAB_API_KEYS"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def keys_from_env() -> list[str]:
    """API keys configured through the environment (comma-separated), so they stay out of shell history."""
    return [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]


@dataclass
class ServeSettings:
    """Everything the service needs to start; defaults suit a single user on one machine."""

    data_dir: Path = field(default_factory=default_data_dir)
    device: str = "auto"
    api_keys: list[str] = field(default_factory=list)
    preload: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    # A forward_backward chunk that waits this long for an earlier seq_id of its model fails: the gap will not
    # fill. Only chunks of one call can arrive out of order; the SDK sends the first chunk once the others
    # were accepted (milliseconds here), so 30 s leaves room for a few of its retries (0.5-10 s apart) only.
    seq_gap_timeout_s: float = 30.0
    # A session without a heartbeat for this long is ended and its adapters freed (the SDK beats every 10 s).
    session_timeout_s: float = 300.0
    # On shutdown, queued training work (forward_backward, optim_step, saves) gets this long to finish.
    shutdown_grace_s: float = 30.0
    # Told to the SDK by /client/config: datums per forward_backward request, and whether to zstd the body (on
    # a local link compression only costs CPU on both ends).
    fwdbwd_max_chunk_len: int = 256
    proto_compress_fwdbwd: bool = False
    # Sampling requests for the same weights that arrive within this window run as one batch.
    sample_batch_window_s: float = 0.01
    sample_max_batch: int = 64
    # retrieve_future answers 408 after this long; the SDK's own timeout for the call is 45 s.
    long_poll_s: float = 30.0
    # Finished results are kept this long for clients that poll late.
    future_ttl_s: float = 3600.0
    # Clients may name the models prepared under <data_dir>/models, the preloads, and these (model directories
    # or hub ids); no other path or hub id is ever opened for a client.
    allowed_models: list[str] = field(default_factory=list)
    # Base models kept in memory; past this the least recently used one without training clients is unloaded
    # (its next request loads it again).
    max_loaded_bases: int = 2
    # What one API key may hold at once (429 past each: the tinker SDK retries for a few minutes, so a client
    # waits for room, e.g. a session ending) and the size of what a client may store (400 past each).
    max_active_sessions_per_key: int = 64
    max_training_clients_per_key: int = 32
    max_checkpoints_per_key: int = 5000
    max_display_name_chars: int = 1024
    max_metadata_bytes: int = 65_536  # each of user_metadata, tags, a finish reason..., as JSON
    # The largest request body read at all (413 past it), and the most a compressed one may expand to.
    max_request_bytes: int = 64 << 20
    # Web pages (`Origin` values, e.g. "http://localhost:3000") allowed to call the API; none by default.
    allowed_origins: list[str] = field(default_factory=list)
    # Bases loaded quantized (QLoRA), by model name: "nf4" or "int8" ("none" by default); see docs/planner.md.
    quantization: dict[str, str] = field(default_factory=dict)
    # A base is refused when the planner's LoRA training peak for it passes this (GiB; None: the memory the
    # device has free when it loads), with the planner's numbers.
    memory_limit_gb: float | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        bad = [k for k in self.api_keys if not k.startswith(API_KEY_PREFIX)]
        if bad:
            raise ValueError(f"API keys must start with {API_KEY_PREFIX!r} (the tinker SDK refuses others)")
        if self.max_loaded_bases < 1:
            raise ValueError(f"max_loaded_bases must be at least 1, got {self.max_loaded_bases}")
        for scheme in self.quantization.values():
            check_scheme(scheme)
        if self.memory_limit_gb is not None and self.memory_limit_gb <= 0:
            raise ValueError(f"memory_limit_gb must be positive, got {self.memory_limit_gb}")

    @property
    def memory_limit(self) -> int | None:
        """The memory limit in bytes, as the engine takes it."""
        return None if self.memory_limit_gb is None else int(self.memory_limit_gb * 2**30)

    def check_exposure(self) -> None:
        """Refuse to listen beyond this machine without API keys: anyone connecting could train and read
        checkpoints."""
        if not self.api_keys and self.host not in LOCAL_HOSTS:
            raise ValueError(
                f"refusing to listen on {self.host} without API keys: "
                f"pass --api-key tml-... (repeatable) or set {API_KEYS_ENV}, or listen on 127.0.0.1"
            )
