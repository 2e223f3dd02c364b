"""The one exception tree of vlmlab.

Every error a user can cause or meet is a :class:`VlmlabError`. Each class carries the HTTP status
and the OpenAI error ``type`` the server answers with, so the mapping to the wire happens in one
place (the server's exception handler) and the CLI can print the message without a traceback.
Foreign exceptions (PIL, httpx, torch) are translated where they enter vlmlab, chaining the cause.
"""

from __future__ import annotations

from typing import Any, ClassVar


class VlmlabError(Exception):
    """Base of every vlmlab error.

    Args:
        message: what went wrong, naming the bad value and, where there is one, the fix.
        param: the request field at fault (OpenAI's ``error.param``), if any.
        code: a short machine-readable code (OpenAI's ``error.code``); defaults to the HTTP status.
    """

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "InternalServerError"
    default_code: ClassVar[str | None] = None  # OpenAI-style string code, e.g. "image_too_large"

    def __init__(self, message: str, *, param: str | None = None, code: str | int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's nested error object: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code if self.code is not None else self.status_code,
            }
        }


class BadRequestError(VlmlabError):
    """The request (or CLI input) is malformed or asks for something impossible."""

    status_code = 400
    error_type = "BadRequestError"


class ConfigError(BadRequestError):
    """A setting, option or flag value is invalid."""


class UnknownOptionError(ConfigError):
    """An option name is not understood by the thing it was passed to."""


class ContextLengthError(BadRequestError):
    """Prompt plus requested completion exceed the model's context."""

    default_code = "context_length_exceeded"

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param)


class MediaError(BadRequestError):
    """An image could not be loaded or decoded: the user's input, so a 400, never a 500."""

    default_code = "invalid_image"


class ImageDecodeError(MediaError):
    """The bytes are not a decodable raster image (truncated, empty, SVG, text, ...)."""

    default_code = "image_decode_failed"


class ImageTooLargeError(MediaError):
    """Bytes or pixels exceed a configured limit."""

    default_code = "image_too_large"


class MediaFetchError(MediaError):
    """A URL could not be fetched (unreachable, HTTP error status, not an image)."""

    default_code = "image_fetch_failed"


class MediaTimeoutError(MediaFetchError):
    """Fetching an image took longer than the allowed time (the URL's fault, so still a 400)."""

    default_code = "image_fetch_timeout"


class ForbiddenMediaError(MediaError):
    """A URL or path is refused by the media policy (private address, outside the allowed root)."""

    status_code = 403
    error_type = "PermissionDeniedError"
    default_code = "image_url_forbidden"


class AuthenticationError(VlmlabError):
    status_code = 401
    error_type = "AuthenticationError"


class PayloadTooLargeError(VlmlabError):
    """A request body, or the image work it asks for, is larger than the server accepts at all
    (retrying cannot help; a momentarily full budget is an :class:`OverloadedError`)."""

    status_code = 413
    error_type = "PayloadTooLargeError"


class NotFoundError(VlmlabError):
    """An unknown model, family, dataset, route or file."""

    status_code = 404
    error_type = "NotFoundError"


class OverloadedError(VlmlabError):
    """The request queue is full; retry after ``retry_after`` seconds."""

    status_code = 429
    error_type = "RateLimitError"

    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(VlmlabError):
    """The request did not finish within the server's per-request timeout."""

    status_code = 504
    error_type = "GatewayTimeoutError"


class EngineError(VlmlabError):
    """The engine failed while loading or generating."""

    status_code = 500
    error_type = "InternalServerError"


class EngineUnavailableError(EngineError):
    """An engine cannot run here (missing extra, missing hardware); the message says the fix."""

    status_code = 503
    error_type = "ServiceUnavailableError"
