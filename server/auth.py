"""`--api-key`: requests that do work must carry `Authorization: Bearer <key>`, as vLLM and TEI ask
(or `x-api-key: <key>`, as Anthropic's clients send it).

Health, metrics, version and the API description stay open: load balancers, Prometheus and
orchestrators probe them without secrets, and they reveal nothing a request could not. The key is
compared in constant time; a miss is a 401 in OpenAI's shape (code `invalid_api_key`) with
`WWW-Authenticate: Bearer`, answered before the body is read.
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_response

OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})


def _bearer(scope: Scope) -> str | None:
    """The request's key: `Authorization: Bearer`, or `x-api-key` (what Anthropic's clients send)."""
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    for key, value in scope.get("headers", ()):
        if key == b"x-api-key":
            return value.decode("latin-1").strip()
    return None


class ApiKeyAuth:
    """ASGI middleware: a 401 for any request outside OPEN_PATHS without the server's key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if token is not None and hmac.compare_digest(token.encode(), self.key):
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided" if token is not None else
                   "No API key provided: send it as 'Authorization: Bearer <key>'")
        resp = error_response(401, message, "invalid_request_error", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"}, path=scope.get("path", ""))
        await resp(scope, receive, send)
