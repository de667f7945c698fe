"""What the public port answers and logs when aiohttp itself refuses a request, or a handler fails.

aiohttp's own answer to a request its parser refused is a text body that quotes the bytes it
read, and its log line quotes them again with a traceback: the client's input, secrets included,
in an error body and on stdout. Here the answer is the backend's error shape with a code, and the
line names the kind of error only.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from gateway.flashback import INVALID_REQUEST, error_body

log = logging.getLogger("gateway.http")

INTERNAL_ERROR = "INTERNAL_ERROR"


def error_answer(status: int, exc: BaseException | None) -> web.Response:
    """The error body for a request aiohttp could not hand to the gateway's handlers."""
    if status >= 500:
        body = error_body("Internal error of the gateway", error_code=INTERNAL_ERROR)
    else:
        body = error_body("Malformed HTTP request", error_code=INVALID_REQUEST)
    answer = web.Response(status=status, body=body, content_type="application/json")
    answer.force_close()
    return answer


class QuietRequestHandler(RequestHandler):
    """aiohttp's connection handler, with its error answer and log line made safe."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            # A client's mistake (or a scanner's), not the gateway's: no traceback. Non-HTTP
            # bytes on a fresh connection are the internet's noise, as aiohttp judges them too.
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
            log.log(level, "request refused by the HTTP parser: %s (status %d)", type(exc).__name__, status)
        else:
            # The traceback goes through the redacting chain, rendered to text and scanned.
            log.error("request failed: %s", type(exc).__name__, exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer has begun: no error answer can follow")
        return error_answer(status, exc)
