"""Errors a person can act on: one line each for a non-Twinkle URL, an unset/misspelt variable, TLS, proxy."""

from __future__ import annotations

import httpx
import pytest

import twinkle_client
from twinkle.types import NotFoundError
from twinkle_client._errors import ConnectionLostError, explain_transport_error

HTML = "<!doctype html><html><head><title>Welcome to nginx!</title></head><body>" + "x" * 5000 + "</body></html>"


def test_a_web_page_is_not_dumped():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text=HTML, headers={"content-type": "text/html; charset=utf-8"})

    with pytest.raises(NotFoundError) as info:
        twinkle_client.connect("http://intranet:8080", "k", transport=httpx.MockTransport(handler),
                               heartbeat=False, persist_state=False)
    msg = str(info.value)
    assert "html" not in msg.lower().replace("text/html", "") and "\n" not in msg and len(msg) < 250
    assert "intranet:8080 answered HTTP 404 with a text/html page, not the Twinkle API" in msg


def test_unset_and_misspelt_variables(monkeypatch):
    monkeypatch.setenv("TWINKLE_SERVER_URL", "http://gpu:8000")
    with pytest.raises(ConnectionLostError, match=r"contains \$TWINKLE_SERVER_ULR, but no environment variable "
                       r"TWINKLE_SERVER_ULR is set — did you mean \$TWINKLE_SERVER_URL\?"):
        twinkle_client.connect("http://$TWINKLE_SERVER_ULR", "k", heartbeat=False)
    with pytest.raises(ConnectionLostError, match=r"API key contains \$NOPE_KEY.*set it"):
        twinkle_client.connect("http://gpu:8000", "$NOPE_KEY", heartbeat=False)


@pytest.mark.parametrize(("exc", "expect"), [
    (httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), "SSL_CERT_FILE"),
    (httpx.ProxyError("407 Proxy Authentication Required"), "NO_PROXY=gpu"),
    (httpx.ConnectError("[Errno -2] Name or service not known"), "does not resolve"),
    (httpx.ConnectError("[Errno 111] Connection refused"), "connection refused"),
])
def test_network_failures_say_what_to_fix(exc, expect):
    msg = explain_transport_error("https://gpu:8000", exc)
    assert expect in msg and "\n" not in msg

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(ConnectionLostError, match=expect):
        twinkle_client.connect("https://gpu:8000", "k", transport=httpx.MockTransport(handler), heartbeat=False,
                               retry_seconds=0.0, persist_state=False)
