"""Conversion between the Tinker SDK's wire formats and ``twinkle.types``.

Requests: the protobuf ``ForwardBackwardRequest`` (optionally zstd-compressed) and the JSON bodies of the
other routes. Results: ``ForwardBackwardOutput`` and ``SampleResponse`` as protobuf (the 0.38 SDK refuses
JSON for those), everything else as JSON dicts shaped like the SDK's pydantic response models.

All arrays on the proto wire are raw little-endian bytes. Nothing here imports torch or FastAPI.
"""

from __future__ import annotations

import base64
import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
from pydantic import ValidationError

from twinkle.types import (
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ImageChunk,
    InvalidInputError,
    LimitExceededError,
    ModelInput,
    SampleResponse,
    TensorData,
    UnsupportedError,
)
from twinkle.types.api import CheckpointInfo, RunInfo

from .._tinker_proto import tinker_pb2
from .models import ForwardBackwardBody

pb: Any = tinker_pb2()  # the SDK's generated protobuf module (no stubs), loaded without importing torch

__all__ = [
    "DEFAULT_MAX_DECODED_BYTES",
    "MAX_DENSE_ELEMENTS",
    "MAX_INPUT_COLUMNS",
    "METRIC_REDUCTIONS",
    "checkpoint_to_json",
    "decode_forward_backward",
    "encode_forward_backward_output",
    "encode_sample_response",
    "normalize_metrics",
    "run_to_json",
]

METRIC_REDUCTIONS = frozenset({"sum", "mean", "min", "max", "slack", "hash2", "unique"})
_REDUCTION_ALIASES = {"avg": "mean", "average": "mean", "total": "sum"}
_TOPK_MASK_LOGPROB = -99999.0  # the SDK's sentinel for an empty top-k slot

_PB_TO_NUMPY: dict[int, np.dtype[Any]] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
}
_FLOAT_KINDS = {pb.DTYPE_FLOAT32, pb.DTYPE_BFLOAT16}


# ---- requests -------------------------------------------------------------------------------------------------


DEFAULT_MAX_DECODED_BYTES = 64 * 1024 * 1024
"""The decoded size a body may reach when the caller names no limit (the gateway passes max_request_bytes)."""
MAX_DENSE_ELEMENTS = 16 * 1024 * 1024
"""Elements one tensor may hold once densified (a sparse tensor's shape is checked before allocating)."""
MAX_INPUT_COLUMNS = 64
"""Columns K of a two-dimensional ``loss_fn_inputs`` tensor ``(N, K)`` (top-K distillation targets and weights:
tinker-cookbook's SDFT uses K = 20, the server's own top-k logprobs stop at 20)."""
_CHUNK = 1 << 16


def _decompress_bounded(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """Inflate a zstd or gzip body in chunks, refusing (413) as soon as the output would pass ``max_bytes``:
    a small bomb never allocates its decompressed size."""
    import io

    if encoding == "zstd":
        import zstandard

        reader: Any = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body))
        errors: tuple[type[BaseException], ...] = (zstandard.ZstdError,)
    else:
        import gzip
        import zlib

        reader = gzip.GzipFile(fileobj=io.BytesIO(body))
        errors = (OSError, EOFError, zlib.error)
    out = bytearray()
    try:
        with reader:
            while True:
                chunk = reader.read(_CHUNK)
                if not chunk:
                    break
                if len(out) + len(chunk) > max_bytes:
                    raise LimitExceededError(
                        f"forward_backward body decompresses to more than max_request_bytes ({max_bytes})",
                        field="body", detail={"limit": max_bytes})
                out += chunk
    except errors as e:
        raise InvalidInputError(f"forward_backward body is not valid {encoding}: {e}", field="body") from None
    return bytes(out)


def _dense_elements(shape: list[int], where: str) -> int:
    n = 1
    for s in shape:
        if s < 0:
            raise InvalidInputError(f"{where}: negative dimension in shape {shape}", field=where)
        n *= s
        if n > MAX_DENSE_ELEMENTS:
            raise LimitExceededError(f"{where}: shape {shape} exceeds {MAX_DENSE_ELEMENTS} elements",
                                     field=where, detail={"limit": MAX_DENSE_ELEMENTS})
    return n


def _check_rows(shape: list[int], rows: int, where: str) -> None:
    """A loss input is per token: shape ``(N,)`` or ``(N, K)`` with N the datum's tokens and K bounded, so a
    sparse tensor describes no more than its datum (checked before it is densified)."""
    if not shape:
        return
    if len(shape) > 2 or shape[0] != rows:
        raise InvalidInputError(f"{where} has shape {shape}; the datum has {rows} tokens, so it must be "
                                f"({rows},) or ({rows}, K)", field=where)
    if len(shape) == 2 and shape[1] > MAX_INPUT_COLUMNS:
        raise LimitExceededError(f"{where} has {shape[1]} columns; at most {MAX_INPUT_COLUMNS} are allowed",
                                 field=where, detail={"limit": MAX_INPUT_COLUMNS})


class _Budget:
    """Values a request may decode into: as many as a dense body of ``max_bytes`` carries (4 bytes each), so a
    sparse encoding never makes a request bigger than the body limit allows."""

    def __init__(self, max_bytes: int):
        self.left = max_bytes // 4
        self.limit = self.left

    def take(self, n: int, where: str) -> None:
        self.left -= n
        if self.left < 0:
            raise LimitExceededError(f"{where}: the request's loss_fn_inputs hold more than {self.limit} values "
                                     "once densified (max_request_bytes / 4)", field=where,
                                     detail={"limit": self.limit})


def _tensor_from_pb(msg: Any, where: str, rows: int | None = None, budget: _Budget | None = None) -> TensorData:
    np_dtype = _PB_TO_NUMPY.get(msg.dtype)
    if np_dtype is None:
        raise InvalidInputError(f"{where} has an unsupported dtype ({msg.dtype})", field=where)
    shape = [int(s) for s in msg.shape]
    n = _dense_elements(shape, where)  # before anything is allocated for it
    if rows is not None:
        _check_rows(shape, rows, where)
    if budget is not None:
        budget.take(n if shape else len(msg.dense) // max(1, np_dtype.itemsize), where)
    if msg.WhichOneof("encoding") == "sparse_csr":
        csr = msg.sparse_csr
        values = _frombuffer(csr.values, np_dtype, where)
        crow = _frombuffer(csr.crow_indices, np.dtype("<i8"), where)
        col = _frombuffer(csr.col_indices, np.dtype("<i8"), where)
        if len(shape) != 2 or crow.size != shape[0] + 1 or col.size != values.size:
            raise InvalidInputError(f"{where}: malformed sparse CSR tensor (shape {shape})", field=where)
        counts = np.diff(crow)
        if crow[0] != 0 or crow[-1] != col.size or (counts < 0).any():
            raise InvalidInputError(f"{where}: CSR row pointers out of range", field=where)
        if col.size and (col.min() < 0 or col.max() >= shape[1]):
            raise InvalidInputError(f"{where}: CSR column index out of range", field=where)
        dense = np.zeros(shape, dtype=values.dtype)
        dense[np.repeat(np.arange(shape[0]), counts), col] = values
        arr = dense
    else:
        arr = _frombuffer(msg.dense, np_dtype, where)
    if msg.dtype == pb.DTYPE_BFLOAT16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    if shape:
        if int(np.prod(shape)) != arr.size:
            raise InvalidInputError(f"{where}: shape {shape} does not match {arr.size} values", field=where)
        arr = arr.reshape(shape)
    if msg.dtype in _FLOAT_KINDS:
        return TensorData(data=arr.astype(np.float32).reshape(-1), dtype="float32", shape=list(arr.shape))
    return TensorData(data=arr.astype(np.int64).reshape(-1), dtype="int64", shape=list(arr.shape))


def _frombuffer(buf: bytes, dtype: np.dtype, where: str) -> np.ndarray:
    if len(buf) % dtype.itemsize:
        raise InvalidInputError(f"{where}: {len(buf)} bytes is not a multiple of {dtype.itemsize}", field=where)
    return np.frombuffer(buf, dtype=dtype)


def _datum_rows(msg: Any) -> int | None:
    """The datum's length in tokens from the wire (text tokens plus each image's ``expected_tokens``); None if an
    image does not say (the datum is refused later for that)."""
    n = 0
    for chunk in msg.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind == "encoded_text":
            n += len(chunk.encoded_text.tokens) // 4
        elif kind == "image":
            if not chunk.image.HasField("expected_tokens"):
                return None
            n += int(chunk.image.expected_tokens)
    return n


def _count_tokens(msg: Any, max_tokens: int) -> None:
    """Refuse (413) a request with more tokens than any model takes, before any token becomes a Python object."""
    total = 0
    for i, d in enumerate(msg.data):
        total += _datum_rows(d) or 0
        if total > max_tokens:
            raise LimitExceededError(f"data[{i}]: the request has more than {max_tokens} tokens, the most this "
                                     "server takes in one request", field="data", detail={"limit": max_tokens})


def _datum_from_pb(msg: Any, index: int, budget: _Budget | None = None) -> Datum:
    where = f"data[{index}]"
    rows = _datum_rows(msg)
    chunks: list[EncodedTextChunk | ImageChunk] = []
    for j, chunk in enumerate(msg.model_input):
        kind = chunk.WhichOneof("chunk")
        cwhere = f"{where}.model_input.chunks[{j}]"
        if kind == "encoded_text":
            toks = _frombuffer(chunk.encoded_text.tokens, np.dtype("<i4"), cwhere)
            chunks.append(EncodedTextChunk(tokens=toks.astype(np.int64).tolist()))
        elif kind == "image":
            img = chunk.image
            chunks.append(
                ImageChunk(
                    data=base64.b64encode(img.data).decode("ascii"),
                    format=img.format or "png",
                    expected_tokens=img.expected_tokens if img.HasField("expected_tokens") else None,
                )
            )
        elif kind == "dmel":
            raise UnsupportedError("audio (dmel) model input chunks are not supported", field=f"{cwhere}.type")
        else:
            raise InvalidInputError(f"{cwhere} is empty", field=cwhere)
    inputs = {name: _tensor_from_pb(t, f"{where}.loss_fn_inputs.{name}", rows, budget)
              for name, t in msg.loss_fn_inputs.items()}
    return Datum(model_input=ModelInput(chunks=chunks), loss_fn_inputs=inputs)


_SPAN_KINDS = {"prompt_tokens": "prompt", "sampled_tokens": "sampled"}
_MAX_SPANS = 65536


def _spans_from_pb(msg: Any, index: int) -> list[tuple[str, str, int, int]] | None:
    if not len(msg.loss_fn_input_spans):
        return None
    where = f"data[{index}].loss_fn_input_spans"
    if len(msg.loss_fn_input_spans) > _MAX_SPANS:
        raise InvalidInputError(f"{where} has more than {_MAX_SPANS} spans", field=where)
    out = []
    for span in msg.loss_fn_input_spans:
        kind = span.WhichOneof("span")
        if kind not in _SPAN_KINDS:
            raise InvalidInputError(f"{where} has an empty span", field=where)
        run = getattr(span, kind)
        if run.offset < 0 or run.length < 0 or not run.sequence_id or len(run.sequence_id) > 256:
            raise InvalidInputError(f"{where} has a span with a bad sequence_id, offset or length", field=where)
        out.append((_SPAN_KINDS[kind], run.sequence_id, int(run.offset), int(run.length)))
    return out


def _loss_config(msg: Any) -> dict[str, float | str] | None:
    cfg: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():  # v2 wins: it also carries text values
        which = v.WhichOneof("value")
        if which == "text":
            cfg[k] = v.text
        elif which == "number":
            cfg[k] = float(v.number)
    return cfg or None


def decode_forward_backward(body: bytes, content_encoding: str | None = None, *,
                            max_bytes: int = DEFAULT_MAX_DECODED_BYTES,
                            max_tokens: int | None = None) -> ForwardBackwardBody:
    """Decode the SDK's protobuf forward_backward body (zstd or gzip per ``Content-Encoding``, inflated at
    most to ``max_bytes``) into the same model the JSON form validates into. ``max_tokens``: the most tokens
    any model takes in one request, checked on the wire form (the run's own model's limit is checked later)."""
    encoding = (content_encoding or "").lower()
    if "zstd" in encoding:
        body = _decompress_bounded(body, "zstd", max_bytes)
    elif "gzip" in encoding:
        body = _decompress_bounded(body, "gzip", max_bytes)
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # google.protobuf.message.DecodeError
        raise InvalidInputError(f"forward_backward body is not a valid ForwardBackwardRequest: {e}", field="body") from None
    if not msg.model_id:
        raise InvalidInputError("forward_backward needs model_id", field="model_id")
    if max_tokens is not None:
        _count_tokens(msg, max_tokens)
    budget = _Budget(max_bytes)
    fields = {
        "model_id": msg.model_id,
        "seq_id": int(msg.seq_id),
        "data": [_datum_from_pb(d, i, budget) for i, d in enumerate(msg.data)],
        "loss_fn": msg.loss_fn or "cross_entropy",
        "loss_fn_config": _loss_config(msg),
        "forward_only": bool(msg.forward_only),
        "target_spans": [_spans_from_pb(d, i) for i, d in enumerate(msg.data)],
    }
    try:
        return ForwardBackwardBody.model_validate(fields)
    except ValidationError as e:
        first: Any = e.errors()[0] if e.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise InvalidInputError(f"invalid forward_backward: {field}: {first.get('msg')}", field=field) from None


# ---- results --------------------------------------------------------------------------------------------------


def normalize_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """Make every key ``name:reduction`` with a reduction the SDK knows (it drops or rejects others)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        name, sep, red = str(key).rpartition(":")
        if not sep:
            name, red = str(key), "mean"
        red = _REDUCTION_ALIASES.get(red, red)
        if red not in METRIC_REDUCTIONS:
            name, red = f"{name}_{red}", "mean"
        out[f"{name.replace(':', '_')}:{red}"] = v
    return out


def _as_array(td: Any) -> np.ndarray:
    if isinstance(td, TensorData):
        return td.to_numpy()
    if isinstance(td, dict) and "data" in td:
        return TensorData.model_validate(td).to_numpy()
    return np.asarray(td)


def encode_forward_backward_output(out: ForwardBackwardOutput | dict[str, Any]) -> bytes:
    """Encode as the proto ``ForwardBackwardOutput``. Consecutive datums whose fields share dtype and
    trailing shape go into one ``ArrayRecord``; ragged ones start a new record."""
    if isinstance(out, dict):
        out = ForwardBackwardOutput.model_validate(out)
    msg = pb.ForwardBackwardOutput()
    msg.loss_fn_output_type = out.loss_fn_output_type or "ArrayRecord"
    for k, v in normalize_metrics(out.metrics).items():
        msg.metrics[k] = v

    groups: list[tuple[tuple[Any, ...], list[dict[str, np.ndarray]]]] = []
    for item in out.loss_fn_outputs:
        arrays = {name: _as_array(td) for name, td in item.items()}
        arrays = {
            name: (a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a.astype(np.int64))
            for name, a in arrays.items()
        }
        for name, a in arrays.items():
            if a.ndim == 0:
                arrays[name] = a.reshape(1)
        key = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in arrays.items()))
        if groups and groups[-1][0] == key:
            groups[-1][1].append(arrays)
        else:
            groups.append((key, [arrays]))

    for key, items in groups:
        rec = msg.loss_fn_outputs.add()
        rec.type_tag = "TensorData"
        rec.num_datums = len(items)
        for name, dstr, trailing in key:
            dtype = np.dtype(dstr)
            parts = [np.ascontiguousarray(it[name], dtype=dtype.newbyteorder("<")) for it in items]
            offsets = np.zeros(len(parts) + 1, dtype="<i8")
            offsets[1:] = np.cumsum([p.nbytes for p in parts])
            bt = rec.fields[name]
            bt.data = b"".join(p.tobytes() for p in parts)
            bt.offsets = offsets.tobytes()
            bt.dtype = pb.DTYPE_FLOAT32 if dtype.kind == "f" else pb.DTYPE_INT64
            bt.trailing_shape.extend(int(s) for s in trailing)
    if not out.loss_fn_outputs:
        msg.ClearField("loss_fn_outputs")
    return msg.SerializeToString()


def _set_topk(target: Any, rows: list[Any], k: int | None = None) -> None:
    """``rows``: one entry per position, each None or a list of ``(token_id, logprob)``."""
    n = len(rows)
    if k is None:
        k = max((len(r) for r in rows if r), default=0)
    ids = np.zeros((n, k), dtype="<i4")
    lps = np.full((n, k), _TOPK_MASK_LOGPROB, dtype="<f4")
    for i, r in enumerate(rows):
        for j, pair in enumerate((r or [])[:k]):
            tok, lp = pair
            ids[i, j] = int(tok)
            lps[i, j] = float(lp)
    target.token_ids = ids.tobytes()
    target.logprobs = lps.tobytes()
    target.k = k
    target.length = n


def _to_float32_with_nan(values: list[Any]) -> np.ndarray:
    return np.asarray([math.nan if v is None else float(v) for v in values], dtype="<f4")


def encode_sample_response(
    resp: SampleResponse | dict[str, Any], *, prompt_logprobs_last_n: int | None = None, topk_prompt_k: int = 0
) -> bytes:
    """Encode as the proto ``SampleResponse``. With ``prompt_logprobs_last_n`` only the last N prompt
    positions keep their (top-k) logprobs; earlier ones become NaN / empty, as the SDK checks."""
    if isinstance(resp, dict):
        resp = SampleResponse.model_validate(resp)
    msg = pb.SampleResponse()
    for seq in resp.sequences:
        s = msg.sequences.add()
        s.stop_reason = pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        s.tokens = np.asarray(seq.tokens, dtype="<i4").tobytes()
        if seq.logprobs is not None:
            s.logprobs = np.asarray(seq.logprobs, dtype="<f4").tobytes()
        topk = getattr(seq, "topk_logprobs", None)
        if topk:
            _set_topk(s.topk_sampled_logprobs, list(topk))
    if resp.prompt_logprobs is not None:
        plp = _to_float32_with_nan(list(resp.prompt_logprobs))
        if prompt_logprobs_last_n is not None and prompt_logprobs_last_n < plp.size:
            plp[: plp.size - prompt_logprobs_last_n] = math.nan
        msg.prompt_logprobs = plp.tobytes()
    if resp.topk_prompt_logprobs is not None:
        rows = list(resp.topk_prompt_logprobs)
        if prompt_logprobs_last_n is not None and prompt_logprobs_last_n < len(rows):
            rows[: len(rows) - prompt_logprobs_last_n] = [None] * (len(rows) - prompt_logprobs_last_n)
        _set_topk(msg.topk_prompt_logprobs, rows, topk_prompt_k or None)
    return msg.SerializeToString()


# ---- JSON shapes of the REST routes ----------------------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(float(ts), tz=timezone.utc).isoformat()


_KIND_TO_TINKER = {"training": "training", "sampler": "sampler", "external": "external"}


def _str_dict(d: dict[str, Any] | None) -> dict[str, str] | None:
    if not d:
        return None
    return {str(k): v if isinstance(v, str) else str(v) for k, v in d.items()}


def checkpoint_to_json(ck: CheckpointInfo) -> dict[str, Any]:
    """A Twinkle ``CheckpointInfo`` as the SDK's ``Checkpoint``."""
    return {
        "checkpoint_id": ck.checkpoint_id,
        "checkpoint_type": _KIND_TO_TINKER.get(ck.kind, "training"),
        "time": _iso(ck.created_at),
        "tinker_path": ck.path,
        "size_bytes": ck.size_bytes,
        "public": bool(ck.public),
        "expires_at": _iso(ck.expires_at),
    }


def run_to_json(
    run: RunInfo, *, last_checkpoint: CheckpointInfo | None = None, last_sampler: CheckpointInfo | None = None
) -> dict[str, Any]:
    """A Twinkle ``RunInfo`` as the SDK's ``TrainingRun``."""
    return {
        "training_run_id": run.run_id,
        "base_model": run.base_model,
        "model_owner": run.user,
        "is_lora": True,
        "corrupted": run.state == "lost",
        "lora_rank": run.lora.rank,
        "last_request_time": _iso(run.last_request_time or run.created_at),
        "last_checkpoint": checkpoint_to_json(last_checkpoint) if last_checkpoint else None,
        "last_sampler_checkpoint": checkpoint_to_json(last_sampler) if last_sampler else None,
        "user_metadata": _str_dict(run.metadata),
    }
