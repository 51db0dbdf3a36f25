"""Point the unmodified Tinker SDK at a Twinkle server.

    from twinkle_client import init_tinker_client
    init_tinker_client("http://gpu-box:8000", api_key="tw-...")
    import tinker
    service = tinker.ServiceClient()          # talks to the Twinkle server

The server speaks the SDK's own wire protocol, so nothing in the SDK needs changing, with one exception:
the SDK refuses API keys that do not start with ``tml-`` *on the client side*
(``tinker.lib._auth_token_provider.ApiKeyAuthProvider.__init__``). Keys minted by
``twinkle-server keys create`` already start with ``tml-``; for any other key this module lifts exactly that
check (and nothing else). It does not import torch; ``tinker`` itself is imported only when a patch is needed.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["init_tinker_client", "lift_key_prefix_check"]

_PATCH_FLAG = "_twinkle_prefix_check_lifted"


def lift_key_prefix_check() -> bool:
    """Let the SDK accept API keys without the ``tml-`` prefix. Idempotent; returns True once patched.

    The replacement ``__init__`` keeps the SDK's behaviour for JWTs (``eyJ...``: expiry read from the token)
    and for ``tml-`` keys; it only stops raising for other keys.
    """
    try:
        from tinker.lib import _auth_token_provider as atp
    except ImportError:  # tinker not installed: nothing to patch
        return False
    cls = atp.ApiKeyAuthProvider
    if getattr(cls, _PATCH_FLAG, False):
        return True
    original_init = cls.__init__

    def __init__(self: Any, api_key: str) -> None:
        if api_key.startswith(("tml-", "eyJ")):
            original_init(self, api_key)
            return
        self._token = api_key
        self._expires_at = float("inf")  # an opaque key never expires client-side

    __init__.__doc__ = original_init.__doc__
    cls.__init__ = __init__  # type: ignore[method-assign]
    setattr(cls, _PATCH_FLAG, True)
    return True


def init_tinker_client(base_url: str | None = None, api_key: str | None = None) -> dict[str, str]:
    """Configure the Tinker SDK for a Twinkle server.

    ``base_url`` defaults to ``TWINKLE_SERVER_URL`` (then an existing ``TINKER_BASE_URL``), ``api_key`` to
    ``TWINKLE_API_KEY`` (then ``TINKER_API_KEY``). Sets ``TINKER_BASE_URL`` / ``TINKER_API_KEY`` so every
    ``tinker.ServiceClient()`` / ``tinker.RestClient()`` created afterwards uses them, and lifts the SDK's
    client-side ``tml-`` key check when the key lacks that prefix. Returns the settings applied.
    """
    url = base_url or os.environ.get("TWINKLE_SERVER_URL") or os.environ.get("TINKER_BASE_URL")
    key = api_key or os.environ.get("TWINKLE_API_KEY") or os.environ.get("TINKER_API_KEY")
    if not url:
        raise ValueError("no server URL: pass base_url= or set TWINKLE_SERVER_URL")
    if not key:
        raise ValueError("no API key: pass api_key= or set TWINKLE_API_KEY")
    url = url.rstrip("/")
    os.environ["TINKER_BASE_URL"] = url
    os.environ["TINKER_API_KEY"] = key
    if not key.startswith(("tml-", "eyJ")):
        lift_key_prefix_check()
    return {"base_url": url, "api_key": key}
