"""OpenAI-style API errors and the mapping of engine exceptions onto them."""
from __future__ import annotations

import re

from fastapi.responses import JSONResponse

from arctic_jax.engine.front import QueueFullError
from arctic_jax.engine.step_failure import RequestFailed
from arctic_jax.serving.protocol import ErrorInfo, ErrorResponse

RETRY_AFTER_S = 1                    # Retry-After sent with 429 (queue full)


class APIError(Exception):
    """An error returned to the client as an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type,
                                             param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status,
                            headers=self.headers)


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


def engine_error(exc: BaseException) -> APIError:
    """The API error for an exception raised by ``AsyncEngine.generate``."""
    if isinstance(exc, QueueFullError):
        return APIError(429, f"the server is busy ({exc}); retry later", type="rate_limit_error",
                        code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    if isinstance(exc, RequestFailed):   # one step failed; the engine runs on
        return APIError(500, str(exc), type="server_error", code="step_failed")
    return APIError(500, f"engine failure: {exc}", type="server_error", code="engine_failure")


def sampling_error(exc: ValueError, rename: dict[str, str]) -> APIError:
    """SamplingParams raises "SamplingParams.<field>=<value>: why"; name the request field."""
    message = str(exc)
    m = re.match(r"SamplingParams\.(\w+)=", message)
    param = None
    if m:
        param = rename.get(m.group(1), m.group(1))
        message = param + message[m.end(1):]
    return APIError(400, message, param=param)
