"""Errors as values with meaning.

Every error the server returns is one of these, serialised as ``{"error", "category", "detail"}``.
``category`` is lower case (``user`` | ``server`` | ``unknown``) because the Tinker SDK reads it that way.
The HTTP status never is 402 (the Tinker SDK loops on it) and a permanent user error is never a 409/429/5xx
(the SDK retries those for minutes).
"""

from __future__ import annotations

from typing import Any


class TwinkleError(Exception):
    """Base class. ``status`` is the HTTP status the server answers with."""

    status: int = 500
    category: str = "server"
    code: str = "internal_error"
    # Set by the client on an error it received: the server's ids for the request (its logs, its traces).
    request_id: str | None = None
    trace_id: str | None = None

    def __init__(self, message: str, *, field: str | None = None, detail: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.detail = dict(detail or {})
        if field is not None:
            self.detail.setdefault("field", field)

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "category": self.category, "code": self.code, "detail": self.detail}

    @classmethod
    def from_dict(cls, body: dict[str, Any], status: int | None = None) -> TwinkleError:
        """Rebuild the right subclass from a server error body (used by the client)."""
        code = body.get("code")
        klass = _BY_CODE.get(code) if code else None
        if klass is None and status is not None:
            klass = _BY_STATUS.get(status, TwinkleError)
        klass = klass or TwinkleError
        raw = body.get("detail")
        detail: dict[str, Any] = raw if isinstance(raw, dict) else {}
        err = klass(str(body.get("error", "unknown error")), detail=detail)
        err.field = detail.get("field")
        if status is not None:
            err.status = status
        return err

    def __str__(self) -> str:
        return self.message


class InvalidInputError(TwinkleError):
    """The request is malformed or a value is out of range; ``field`` names the culprit."""

    status = 400
    category = "user"
    code = "invalid_input"


class UnsupportedError(TwinkleError):
    """The request asks for something this server does not do (a route, a loss, a feature)."""

    status = 400
    category = "user"
    code = "unsupported"


class AuthenticationError(TwinkleError):
    status = 401
    category = "user"
    code = "unauthenticated"


class ForbiddenError(TwinkleError):
    """The caller is known but may not read this (another user's usage, the metrics endpoint)."""

    status = 403
    category = "user"
    code = "forbidden"


class NotFoundError(TwinkleError):
    """Absent, or owned by somebody else (we never reveal which)."""

    status = 404
    category = "user"
    code = "not_found"


class NonFiniteError(InvalidInputError):
    """A loss or gradient came out NaN or infinite: nothing was applied, the run is unchanged and usable."""

    code = "non_finite"


class GoneError(TwinkleError):
    """A session or future that existed but has expired."""

    status = 410
    category = "user"
    code = "gone"


class LimitExceededError(TwinkleError):
    """A per-user or per-request limit (adapters, rank, tokens, bytes)."""

    status = 413
    category = "user"
    code = "limit_exceeded"


class CapacityError(TwinkleError):
    """Transient: a queue is full. Answered as 429 with Retry-After."""

    status = 429
    category = "server"
    code = "capacity"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after
        self.detail.setdefault("retry_after", retry_after)


class StateLostError(TwinkleError):
    """The worker holding an adapter died; restore it from its last checkpoint."""

    status = 400
    category = "user"
    code = "state_lost"


class InternalError(TwinkleError):
    status = 500
    category = "server"
    code = "internal_error"


_BY_CODE: dict[str, type[TwinkleError]] = {
    k.code: k
    for k in (
        InvalidInputError,
        NonFiniteError,
        UnsupportedError,
        AuthenticationError,
        ForbiddenError,
        NotFoundError,
        GoneError,
        LimitExceededError,
        CapacityError,
        StateLostError,
        InternalError,
    )
}
_BY_STATUS: dict[int, type[TwinkleError]] = {
    400: InvalidInputError,
    401: AuthenticationError,
    403: ForbiddenError,
    404: NotFoundError,
    410: GoneError,
    413: LimitExceededError,
    429: CapacityError,
}
