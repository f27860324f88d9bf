"""`ApiError`: a refused request, as OpenAI's error JSON with its HTTP status."""

from __future__ import annotations

from typing import Any

TYPES = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}


class ApiError(Exception):
    """A request the server refuses or could not answer.

    Args:
        status: HTTP status (400 bad request, 401 key, 404 model, 413 body, 503 queue full).
        message: one line: what is wrong and how to fix it.
        param: the request field at fault, if any ("messages.2", "max_tokens").
        code: a machine-readable code ("invalid_api_key", "context_length_exceeded", ...).
    """

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        """OpenAI's error type for the status."""
        if self.status >= 500:
            return "server_error"
        return TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
