"""Stability records for ``stable_reinforce`` (Tinker's ``record_stability_info``).

A sample asked with ``record_stability_info: true`` is recorded here when its result is delivered: for each
sampled sequence (``sequence_id`` = the id the SDK attaches, ``<future>-<i>``) its tokens and the sampler's
logprobs, owned by the user who sampled. A ``forward_backward`` with ``loss_fn="stable_reinforce"`` names,
through provenance spans on its targets (``Datum.loss_fn_input_spans``), which sampled tokens each target
position reproduces; :meth:`StabilityStore.apply` checks every such target against the record (a mismatch or an
unknown / foreign / expired id is a 400 naming the datum) and writes the recorded logprobs into
``loss_fn_inputs["logprobs"]`` there. Prompt positions keep the client's values (their advantages are 0).

Records live in the gateway's memory for ``ttl_s`` (a day, as Tinker documents) within a byte budget
(oldest dropped first), so neither a long run nor a hostile user can grow it without bound.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from twinkle.types import Datum, InvalidInputError, TensorData

__all__ = ["Span", "StabilityStore"]

Span = tuple[str, str, int, int]
"""(kind "prompt" | "sampled", sequence_id, offset, length): one run of a provenance tiling."""


@dataclass
class _Record:
    tokens: np.ndarray  # int64
    logprobs: np.ndarray  # float32
    at: float

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes + self.logprobs.nbytes) + 128


class StabilityStore:
    def __init__(self, *, ttl_s: float = 86400.0, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def record(self, user: str, future_id: str, result: Any) -> None:
        """Record every sequence of a delivered sample result (a ``SampleResponse`` or its dict)."""
        seqs = result.get("sequences") if isinstance(result, dict) else getattr(result, "sequences", None)
        now = time.time()
        with self._lock:
            for i, s in enumerate(seqs or []):
                toks = s.get("tokens") if isinstance(s, dict) else s.tokens
                lps = s.get("logprobs") if isinstance(s, dict) else s.logprobs
                if lps is None or toks is None or len(lps) != len(toks):
                    continue
                key = (user, f"{future_id}-{i}")
                rec = _Record(np.asarray(toks, dtype=np.int64), np.asarray(lps, dtype=np.float32), now)
                old = self._records.pop(key, None)
                if old is not None:
                    self._bytes -= old.nbytes
                self._records[key] = rec
                self._bytes += rec.nbytes
            self._evict(now)

    def _evict(self, now: float) -> None:
        while self._records:
            key, rec = next(iter(self._records.items()))
            if self._bytes <= self.max_bytes and now - rec.at <= self.ttl_s:
                break
            del self._records[key]
            self._bytes -= rec.nbytes

    def _get(self, user: str, sequence_id: str, where: str) -> _Record:
        rec = self._records.get((user, sequence_id))
        if rec is None or time.time() - rec.at > self.ttl_s:
            raise InvalidInputError(
                f"{where}: no stability record for sequence {sequence_id!r} (sample with record_stability_info, "
                "in this server, within a day)", field=where)
        return rec

    def apply(self, user: str, data: list[Datum], spans: list[list[Span] | None]) -> list[Datum]:
        """The datums with the recorded sampler logprobs in place (see the module docstring)."""
        if len(spans) != len(data):
            raise InvalidInputError("stable_reinforce needs provenance spans on every datum", field="data")
        out = []
        with self._lock:
            for i, (d, runs) in enumerate(zip(data, spans, strict=True)):
                where = f"data[{i}].loss_fn_input_spans"
                if not runs:
                    raise InvalidInputError(
                        f"{where}: stable_reinforce needs provenance spans (sample with record_stability_info and "
                        "attach them with Datum.with_provenance)", field=where)
                target = d.loss_fn_inputs.get("target_tokens")
                q = d.loss_fn_inputs.get("logprobs")
                if target is None or q is None:
                    out.append(d)  # the loss registry names the missing input
                    continue
                tgt = target.to_numpy().reshape(-1)
                lp = q.to_numpy().astype(np.float32).reshape(-1).copy()
                if sum(r[3] for r in runs) != tgt.size or lp.size != tgt.size:
                    raise InvalidInputError(
                        f"{where}: the spans cover {sum(r[3] for r in runs)} positions but target_tokens has "
                        f"{tgt.size}", field=where)
                pos = 0
                for kind, seq_id, offset, length in runs:
                    if kind == "sampled" and length:
                        rec = self._get(user, seq_id, where)
                        if offset + length > rec.tokens.size:
                            raise InvalidInputError(
                                f"{where}: span [{offset}, {offset + length}) is past the {rec.tokens.size} tokens "
                                f"sampled in {seq_id!r}", field=where)
                        if not np.array_equal(tgt[pos:pos + length], rec.tokens[offset:offset + length]):
                            raise InvalidInputError(
                                f"{where}: target tokens at {pos}..{pos + length - 1} differ from the tokens "
                                f"sampled in {seq_id!r}", field=where)
                        lp[pos:pos + length] = rec.logprobs[offset:offset + length]
                    pos += length
                inputs = dict(d.loss_fn_inputs)
                inputs["logprobs"] = TensorData.from_numpy(lp, "float32")
                out.append(d.model_copy(update={"loss_fn_inputs": inputs}))
        return out
