"""The Tinker wire format of the SDK's own `tinker_public_pb2`: forward_backward requests and results, and
sample results, between protobuf bytes and the engine's types."""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import zstandard
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from nightlab.train.errors import UserError
from nightlab.train.records import Datum, ImageInput
from nightlab.train.sampling import SampleResult
from nightlab.train.stability import Provenance, Span
from nightlab.train.vision import MAX_IMAGE_TOKENS

PROTOBUF = "application/x-protobuf"
# A loss_fn_inputs tensor holds at most this many cells per token of its datum (a full distribution over a
# large vocabulary fits): a declared shape past it is refused before anything of that size is made.
MAX_CELLS_PER_TOKEN = 1 << 18
_NP_OF_DTYPE = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


def _tensor(name: str, t: pb.Tensor, max_cells: int) -> np.ndarray:
    """A loss_fn_inputs tensor, dense or sparse CSR (unlisted cells are 0), as a numpy array of its shape,
    which may declare at most `max_cells` cells."""
    shape = [int(s) for s in t.shape]
    if any(s < 0 for s in shape) or math.prod(shape) > max_cells:
        raise UserError(
            f"loss_fn_inputs[{name!r}] declares shape {shape}: at most {max_cells} cells "
            f"({MAX_CELLS_PER_TOKEN} per token of its datum) are accepted"
        )
    try:
        if t.dtype == pb.DTYPE_BFLOAT16:
            decode = lambda b: (np.frombuffer(b, np.uint16).astype(np.uint32) << 16).view(np.float32)  # noqa: E731
        else:
            decode = lambda b: np.frombuffer(b, _NP_OF_DTYPE[t.dtype])  # noqa: E731
        if t.WhichOneof("encoding") == "sparse_csr":
            values = decode(t.sparse_csr.values)
            crow = np.frombuffer(t.sparse_csr.crow_indices, np.int64)
            col = np.frombuffer(t.sparse_csr.col_indices, np.int64)
            if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
                raise ValueError(
                    "sparse tensor needs a 2-D shape, rows+1 row pointers and one column per value"
                )
            dense = np.zeros(shape, dtype=values.dtype)
            rows = np.repeat(np.arange(shape[0]), np.diff(crow))
            dense[rows, col] = values
            return dense
        arr = decode(t.dense).copy()
        return arr.reshape(shape) if shape else arr
    except (KeyError, ValueError, IndexError) as exc:
        raise UserError(f"malformed tensor loss_fn_inputs[{name!r}]: {exc}") from exc


def _image(where: str, at: int, chunk: pb.ImageChunk) -> ImageInput:
    """An image chunk as the engine takes it (which decodes it, and counts its placeholders for its model)."""
    if chunk.HasField("override_dimensions"):
        raise UserError(
            f"{where}: override_dimensions is not supported here; resize the image before sending"
        )
    expected = chunk.expected_tokens if chunk.HasField("expected_tokens") else None
    return ImageInput(chunk.data, chunk.format, at, expected)


def _datum(i: int, d: pb.Datum) -> Datum:
    tokens: list[int] = []
    images: list[ImageInput] = []
    for j, chunk in enumerate(d.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind == "image":
            images.append(_image(f"datum {i} chunk {j}", len(tokens), chunk.image))
            continue
        if kind != "encoded_text":
            raise UserError(
                f"datum {i}: {kind} chunks are not supported here; send token chunks (encoded_text) or images"
            )
        if len(chunk.encoded_text.tokens) % 4:
            raise UserError(f"datum {i}: token bytes are not a whole number of int32 values")
        tokens.extend(np.frombuffer(chunk.encoded_text.tokens, np.int32).tolist())
    if not tokens and not images:
        raise UserError(f"datum {i} has no tokens")
    # the engine counts an image's placeholders against its model; until then, bound them by what was declared
    length = len(tokens) + sum(image.expected_tokens or MAX_IMAGE_TOKENS for image in images)
    cells = length * MAX_CELLS_PER_TOKEN
    inputs = {k: _tensor(k, v, cells) for k, v in d.loss_fn_inputs.items()}
    return Datum(tokens=tokens, loss_fn_inputs=inputs, images=images)


@dataclass
class FwdBwdRequest:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str] | None
    forward_only: bool
    data: list[Datum]
    fingerprint: str  # digest of the request's canonical encoding: a retry has the same one
    provenance: list[Provenance | None]  # per datum, when it carries spans (Datum.with_provenance)


def _spans(spans: Iterable[pb.ProvenanceSpan]) -> list[Span]:
    out: list[Span] = []
    for span in spans:
        kind = span.WhichOneof("span")
        if kind is None:
            raise UserError("a provenance span names neither prompt_tokens nor sampled_tokens")
        run = getattr(span, kind)
        out.append(Span(kind == "sampled_tokens", run.sequence_id, run.offset, run.length))
    return out


def _provenance(d: pb.Datum) -> Provenance | None:
    """The datum's provenance; the SDK sends both span lists or neither."""
    if not d.model_input_spans and not d.loss_fn_input_spans:
        return None
    return Provenance(_spans(d.model_input_spans), _spans(d.loss_fn_input_spans))


def _expand(body: bytes, max_bytes: int) -> bytes:
    """A zstd body decompressed in steps, stopping one byte past `max_bytes`."""
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True) as reader:
        while len(out) <= max_bytes and (chunk := reader.read(min(1 << 20, max_bytes + 1 - len(out)))):
            out += chunk
    return bytes(out)


def decode_forward_backward(body: bytes, content_encoding: str | None, max_bytes: int) -> FwdBwdRequest:
    """Parse the SDK's protobuf ForwardBackwardRequest (zstd-compressed when it says so, and then expanding
    to at most `max_bytes`, whatever size its frame claims)."""
    if content_encoding and content_encoding.lower() == "zstd":
        try:
            body = _expand(body, max_bytes)
        except zstandard.ZstdError as exc:
            raise UserError(f"body says Content-Encoding: zstd but does not decompress: {exc}") from exc
        if len(body) > max_bytes:
            raise UserError(
                f"the zstd body expands past the request limit of {max_bytes} bytes (--max-request-mb)", 413
            )
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise UserError(f"malformed protobuf ForwardBackwardRequest: {exc}") from exc
    if not msg.model_id:
        raise UserError("ForwardBackwardRequest has no model_id")
    if not msg.data:
        raise UserError("ForwardBackwardRequest has no data")
    config: dict[str, float | str] = {k: v for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():
        config[k] = v.text if v.WhichOneof("value") == "text" else v.number
    return FwdBwdRequest(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        loss_fn=msg.loss_fn or "cross_entropy",
        loss_fn_config=config or None,
        forward_only=msg.forward_only,
        data=[_datum(i, d) for i, d in enumerate(msg.data)],
        fingerprint=hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest(),
        provenance=[_provenance(d) for d in msg.data],
    )


def _batched(arrays: list[np.ndarray]) -> pb.BatchedTensor:
    is_float = np.issubdtype(arrays[0].dtype, np.floating)
    dtype = np.float32 if is_float else np.int64
    blobs = [np.ascontiguousarray(a, dtype=dtype).tobytes() for a in arrays]
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    return pb.BatchedTensor(
        data=b"".join(blobs),
        offsets=offsets.tobytes(),
        dtype=pb.DTYPE_FLOAT32 if is_float else pb.DTYPE_INT64,
        trailing_shape=list(arrays[0].shape[1:]),
    )


def encode_forward_backward(outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """ForwardBackwardOutput: one ArrayRecord per run of datums whose fields share trailing shapes."""
    msg = pb.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord", metrics={k: float(v) for k, v in metrics.items()}
    )
    outputs = [{k: np.asarray(v) for k, v in o.items()} for o in outputs]

    def signature(o: dict[str, np.ndarray]) -> tuple:
        return tuple(sorted((k, v.shape[1:], np.issubdtype(v.dtype, np.floating)) for k, v in o.items()))

    start = 0
    while start < len(outputs):
        end = start + 1
        while end < len(outputs) and signature(outputs[end]) == signature(outputs[start]):
            end += 1
        group = outputs[start:end]
        record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(group))
        for name in group[0]:
            record.fields[name].CopyFrom(_batched([o[name] for o in group]))
        start = end
    return msg.SerializeToString()


def encode_sample(result: SampleResult, last_n: int | None) -> bytes:
    """SampleResponse: int32 tokens, float32 logprobs, NaN where a prompt logprob does not exist."""
    msg = pb.SampleResponse()
    for seq in result.sequences:
        out = msg.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(seq.tokens, np.int32).tobytes(),
            logprobs=np.asarray(seq.logprobs, np.float32).tobytes(),
        )
        if seq.topk_logprobs:
            out.topk_sampled_logprobs.CopyFrom(_topk(seq.topk_logprobs))
    hide = (lambda n: max(0, n - last_n)) if last_n else (lambda n: 0)
    if result.prompt_logprobs is not None:
        lp = [np.nan if v is None else v for v in result.prompt_logprobs]
        lp[: hide(len(lp))] = [np.nan] * hide(len(lp))
        msg.prompt_logprobs = np.asarray(lp, np.float32).tobytes()
    if result.topk_prompt_logprobs:
        rows = list(result.topk_prompt_logprobs)
        rows[: hide(len(rows))] = [None] * hide(len(rows))
        msg.topk_prompt_logprobs.CopyFrom(_topk(rows))
    return msg.SerializeToString()


def _topk(rows: list[list[tuple[int, float]] | None]) -> pb.TopkLogprobs:
    """Rows of (token, logprob) pairs as the protocol's dense N x K matrices; empty cells are (0, -99999)."""
    k = max((len(r) for r in rows if r), default=0)
    ids = np.zeros((len(rows), k), np.int32)
    lps = np.full((len(rows), k), -99999.0, np.float32)
    for i, row in enumerate(rows):
        for j, (tok, val) in enumerate(row or []):
            ids[i, j], lps[i, j] = tok, val
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=lps.tobytes(), k=k, length=len(rows))
