"""The admin port's bearer token: who may read usage, reload policies and, if asked, scrape.

With a token configured, every admin endpoint but those of ``admin_open`` (by default the probes
and ``/metrics``) asks for ``Authorization: Bearer <token>`` and answers 401 ``UNAUTHORIZED``
in the backend's error shape otherwise. Without one, the admin port is open as before, and a
warning says so at start when it listens beyond loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.credentials import read_secret_file
from gateway.flashback import error_body

if TYPE_CHECKING:
    from gateway.config import Settings

log = structlog.get_logger("gateway.admin")

UNAUTHORIZED = "UNAUTHORIZED"
# The endpoints that may be served without the token (route names of the admin app).
OPENABLE = ("healthz", "readyz", "metrics")
# SECURITY: the same answer for a missing and a wrong token; neither is ever echoed.
_REFUSAL = error_body(
    "Admin token missing or wrong: send Authorization: Bearer <token>", error_code=UNAUTHORIZED
)


def parse_admin_open(value: object) -> tuple[str, ...]:
    items = [item.strip() for item in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"must be a list of {', '.join(OPENABLE)}")
    names = tuple(str(item) for item in items if str(item))
    unknown = sorted(set(names) - set(OPENABLE))
    if unknown:
        raise ValueError(f"{unknown}: only {', '.join(OPENABLE)} can be served without the token")
    return tuple(dict.fromkeys(names))


def _digest(secret: bytes) -> bytes:
    # Compared as digests: equal lengths, so the comparison time says nothing of the token's length.
    return hashlib.sha256(secret).digest()


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        info = os.stat(path)  # follows the symbolic links a Secret volume swaps on rotation
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


class AdminToken:
    """The token asked for: the configured one or, from a file, the file's current content.

    The file is read again whenever it changes (checked on each request that needs the token),
    so a rotated Kubernetes Secret takes effect without a restart. A file that turns unreadable
    or empty keeps the previous token: a rotation caught half-way never opens the port.
    """

    def __init__(self, token: str | None, path: Path | None = None) -> None:
        self._digest = None if token is None else _digest(token.encode())
        self._path = path
        self._seen = _file_identity(path) if path is not None and token is not None else None

    @property
    def required(self) -> bool:
        return self._digest is not None or self._path is not None

    def current(self) -> bytes | None:
        """The digest of the token in force (``None``: no token, the port is open)."""
        if self._path is not None:
            identity = _file_identity(self._path)
            if identity != self._seen:
                self._seen = identity
                try:
                    self._digest = _digest(read_secret_file(self._path).encode())
                    log.info("admin.token_file_read")
                except ValueError as exc:
                    log.warning("admin.token_file_unusable", reason=str(exc), kept=self._digest is not None)
        return self._digest


def _presented(authorization: str | None) -> bytes | None:
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    token = credentials.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("utf-8", "surrogateescape")


def unauthorized() -> web.Response:
    return web.Response(
        status=401,
        body=_REFUSAL,
        content_type="application/json",
        headers={"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
    )


def admin_auth(token: AdminToken, open_endpoints: Iterable[str]) -> Middleware:
    """The middleware asking for the token on every endpoint but ``open_endpoints``."""
    open_names = frozenset(open_endpoints)

    @web.middleware
    async def check_admin_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        endpoint = request.match_info.route.name  # None for a path the admin port does not serve
        if endpoint in open_names:
            return await handler(request)
        expected = token.current()
        if expected is None:
            if token.required:  # a token file that never could be read: closed, not open
                return unauthorized()
            return await handler(request)
        presented = _presented(request.headers.get("Authorization"))
        # SECURITY: constant-time comparison; an unknown path is refused before it is looked up.
        if presented is None or not hmac.compare_digest(_digest(presented), expected):
            log.warning(
                "admin.unauthorized",
                endpoint=endpoint or "unknown",
                method=request.method,
                reason="missing" if presented is None else "wrong",
                peer=request.remote,
            )
            return unauthorized()
        return await handler(request)

    return check_admin_token


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_if_exposed(settings: Settings) -> None:
    """Say once, at start, that an admin port reachable beyond this host answers anyone."""
    if (
        settings.admin_token is None
        and settings.admin_token_file is None
        and not _loopback(settings.admin_host)
    ):
        log.warning(
            "admin.unprotected",
            admin=f"{settings.admin_host}:{settings.admin_port}",
            hint="no admin token: /usage and POST /-/reload answer anyone who reaches this address; "
            "set GATEWAY_ADMIN_TOKEN or --admin-token-file",
        )
