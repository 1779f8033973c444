"""Exceptions for bad requests; the server maps each to an HTTP status."""
from __future__ import annotations


class KVServeError(Exception):
    """Base class: a request kvserve refuses, with a message safe to show the client."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(KVServeError):
    """A parameter is out of range or malformed (HTTP 400)."""


class PromptTooLongError(InvalidRequestError):
    """Prompt (plus max_tokens) exceeds the model's context (HTTP 400)."""


class QueueFullError(KVServeError):
    """The waiting queue is at its limit; retry later (HTTP 503 with Retry-After)."""

    status_code = 503
    error_type = "server_overloaded"


class ModelNotFoundError(KVServeError):
    """The request names a model this server does not serve (HTTP 404)."""

    status_code = 404
    error_type = "model_not_found"
