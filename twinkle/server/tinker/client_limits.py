"""What ``POST client/config`` tells the Tinker SDK about request sizes, so that it splits a large
``forward_backward`` into requests the server accepts (the SDK reads ``fwdbwd_max_chunk_len``, datums per
request, and ``fwdbwd_max_chunk_bytes_count``, its estimate of a request's bytes: 4 per input token plus the raw
bytes of every ``loss_fn_inputs`` tensor).

Every loss reads ``target_tokens``, which the SDK sends as int64, so a valid datum is estimated at 12 bytes or
more per token: a byte cap of ``12 × max_tokens_per_request`` keeps every chunk within the token cap (a request
may still carry up to that many tokens: the worker runs it in micro-batches, see ``twinkle.server.microbatch``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["MIN_BYTES_PER_TOKEN", "client_limits"]

MIN_BYTES_PER_TOKEN = 12
"""4 (the int32 input token) + 8 (its int64 target token): the least the SDK's estimate counts per token."""

SDK_MAX_CHUNK_LEN = 1024
"""The SDK's own default datums per request."""


def client_limits(token_caps: list[int], max_request_bytes: int) -> dict[str, Any]:
    """The size flags for ``client/config``: ``token_caps`` are the served models' tokens-per-request limits
    (the smallest one wins: the SDK asks before it knows the model)."""
    if not token_caps:
        return {}
    by_tokens = min(token_caps) * MIN_BYTES_PER_TOKEN
    # the estimate leaves out protobuf framing (a few bytes per tensor): stay well under the body limit
    by_body = max(1, (max_request_bytes * 3) // 4)
    return {"fwdbwd_max_chunk_len": SDK_MAX_CHUNK_LEN, "fwdbwd_max_chunk_bytes_count": min(by_tokens, by_body)}
