"""External weights (Tinker ``save_weights_external``): encryption to age recipients and signed download URLs.

* :func:`parse_recipients` checks ``age_encryption_recipients`` up front (age X25519 ``age1…`` keys, or SSH
  ``ssh-ed25519``/``ssh-rsa`` public keys), so a bad key is a 400 naming the field before any work is queued.
* :func:`encrypt_dir` replaces every file of a freshly written checkpoint directory by ``<file>.age``, encrypted
  to all the recipients (age format, ``pyrage``); the plaintext never reaches the checkpoint's final place.
* :class:`UrlSigner` makes the per-file URLs of ``GET …/external_weights_urls``: the SDK (and
  ``tinker_cookbook.weights.download``) fetch them with a plain HTTP GET, without the API key, so each URL
  carries an HMAC over (user, checkpoint, file, expiry) with a secret kept in the checkpoint root (it survives
  restarts; delete the file to invalidate every URL ever signed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from twinkle.types import InvalidInputError, NotFoundError

__all__ = ["AGE_SUFFIX", "UrlSigner", "encrypt_dir", "parse_recipients"]

AGE_SUFFIX = ".age"
_MAX_RECIPIENTS = 10  # as the SDK documents


def parse_recipients(raw: Any) -> tuple[str, ...]:
    """The recipients as given (validated), or ``()`` for none."""
    if raw is None:
        return ()
    field = "age_encryption_recipients"
    if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
        raise InvalidInputError("age_encryption_recipients must be a list of strings", field=field)
    if len(raw) > _MAX_RECIPIENTS:
        raise InvalidInputError(f"at most {_MAX_RECIPIENTS} age_encryption_recipients", field=field)
    for i, r in enumerate(raw):
        _recipient(r, f"{field}[{i}]")
    return tuple(raw)


def _recipient(text: str, field: str) -> Any:
    import pyrage

    try:
        if text.startswith("age1"):
            return pyrage.x25519.Recipient.from_str(text)
        if text.startswith("ssh-"):
            return pyrage.ssh.Recipient.from_str(text)
    except Exception:  # pyrage raises its own error types
        pass
    raise InvalidInputError(f"{text[:40]!r} is not an age (age1…) or SSH public key", field=field)


def encrypt_dir(path: Path, recipients: tuple[str, ...]) -> None:
    """Encrypt every file under ``path`` in place (``name`` → ``name.age``)."""
    import pyrage

    keys = [_recipient(r, "age_encryption_recipients") for r in recipients]
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        pyrage.encrypt_file(str(f), str(f.with_name(f.name + AGE_SUFFIX)), keys)
        f.unlink()


class UrlSigner:
    """Signs and checks download tokens ``<payload>.<mac>`` (both base64url)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def for_root(cls, root: Path) -> UrlSigner:
        """The signer whose secret lives in ``root/.url-secret`` (created, mode 0600, on first use)."""
        f = root / ".url-secret"
        root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(32))
        return cls(f.read_bytes())

    def sign(self, claims: dict[str, Any], ttl_s: float) -> tuple[str, float]:
        exp = time.time() + ttl_s
        payload = _b64(json.dumps({**claims, "exp": exp}, sort_keys=True).encode())
        return f"{payload}.{self._mac(payload)}", exp

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid, unexpired token; anything else is a 404 (nothing to learn from it)."""
        payload, _, mac = token.partition(".")
        if not payload or not hmac.compare_digest(mac, self._mac(payload)):
            raise NotFoundError("download link not found", field="token")
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except Exception:
            raise NotFoundError("download link not found", field="token") from None
        if not isinstance(claims, dict) or float(claims.get("exp", 0)) < time.time():
            raise NotFoundError("download link expired; ask for new URLs", field="token")
        return claims

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")
