"""The admin port's bearer token, and the origin header that lets the backend refuse whoever
went around the gateway (issue 13, item 7).

Real servers only: the admin app through aiohttp's test server, a real ``gateway serve``
process for what reaches its output, the Express backend in tests/express/ for what the backend
receives, and the Express middleware of docs/operations.md run by node.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from gateway.app import build_admin_app
from gateway.config import ConfigError, Settings, load_settings
from gateway.policy import load_ruleset
from gateway.state import GatewayState
from tests.express_fixtures import EXPRESS_DIR, ExpressBackend
from tests.proxy_fixtures import start_gateway, start_upstream
from tests.redis_fixtures import free_ports

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "adm1n-T0ken-6f3c1e9a27b84d05a1c3e5f7"
SECRET = "0r1gin-S3cret-9b1d7c2e4f6a8093"
UNAUTHORIZED = {"success": False, "error_code": "UNAUTHORIZED"}


async def admin_server(aiohttp_server: Any, aiohttp_client: Any = None, **overrides: Any) -> TestServer:
    _, upstream = await start_upstream(aiohttp_server)
    _, admin, _ = await start_gateway(aiohttp_server, str(upstream.make_url("/")), **overrides)
    return admin


async def call(
    session: aiohttp.ClientSession, method: str, url: str, authorization: str | None = None
) -> tuple[int, dict[str, str], Any]:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with session.request(method, url, headers=headers) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, dict(response.headers), body


def assert_refused(status: int, headers: dict[str, str], body: Any) -> None:
    assert status == 401
    assert isinstance(body, dict)
    assert {key: body[key] for key in UNAUTHORIZED} == UNAUTHORIZED
    assert set(body) == {"success", "message", "error_code"}
    assert isinstance(body["message"], str)
    assert body["message"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in str(body)
    assert TOKEN not in str(headers)


PROTECTED = [("GET", "/usage/ws-a"), ("POST", "/-/reload")]
WRONG = {
    "no Authorization header": None,
    "a wrong token": "Bearer wrong-token",
    "the token with one more character": f"Bearer {TOKEN}x",
    "the token less its last character": f"Bearer {TOKEN[:-1]}",
    "the token under the Basic scheme": f"Basic {TOKEN}",
    "the token with no scheme": TOKEN,
    "the Bearer scheme with no token": "Bearer ",
    "a non-ASCII token": "Bearer adm1n-T0ken-\u00e9",
}


# -- the admin token on the admin port -------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=["usage", "reload"])
@pytest.mark.parametrize("authorization", list(WRONG.values()), ids=list(WRONG))
async def test_usage_and_reload_refuse_a_request_without_the_right_token(
    aiohttp_server: Any, method: str, path: str, authorization: str | None
) -> None:
    """/usage and /-/reload answer 401 UNAUTHORIZED in the backend's error shape, with WWW-Authenticate."""
    admin = await admin_server(aiohttp_server, admin_token=TOKEN)
    async with aiohttp.ClientSession() as session:
        assert_refused(*await call(session, method, str(admin.make_url(path)), authorization))


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_usage_and_reload_serve_a_request_with_the_token(aiohttp_server: Any, scheme: str) -> None:
    """With the token (the scheme in any case), /usage answers the totals and /-/reload reloads."""
    admin = await admin_server(aiohttp_server, admin_token=TOKEN)
    async with aiohttp.ClientSession() as session:
        status, _, body = await call(session, "GET", str(admin.make_url("/usage/ws-a")), f"{scheme} {TOKEN}")
        assert status == 200
        assert body["success"] is True
        assert body["workspace"] == "ws-a"
        status, _, body = await call(session, "POST", str(admin.make_url("/-/reload")), f"{scheme} {TOKEN}")
        assert status == 200
        assert body["success"] is True


async def test_probes_and_metrics_stay_open_by_default(aiohttp_server: Any) -> None:
    """With a token, /healthz, /readyz and /metrics still answer without one."""
    admin = await admin_server(aiohttp_server, admin_token=TOKEN)
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz", "/metrics"):
            status, _, _ = await call(session, "GET", str(admin.make_url(path)))
            assert status == 200, path


@pytest.mark.parametrize(
    ("admin_open", "closed"),
    [
        (("healthz", "readyz"), ["/metrics"]),
        (("healthz",), ["/metrics", "/readyz"]),
        ((), ["/metrics", "/readyz", "/healthz"]),
    ],
    ids=["metrics protected", "metrics and readyz protected", "everything protected"],
)
async def test_a_narrowed_admin_open_puts_the_rest_behind_the_token(
    aiohttp_server: Any, admin_open: tuple[str, ...], closed: list[str]
) -> None:
    """An endpoint left out of admin_open answers 401 without the token, 200 with it; the others stay open."""
    admin = await admin_server(aiohttp_server, admin_token=TOKEN, admin_open=admin_open)
    async with aiohttp.ClientSession() as session:
        for path in ("/metrics", "/readyz", "/healthz"):
            status, headers, body = await call(session, "GET", str(admin.make_url(path)))
            if path in closed:
                assert_refused(status, headers, body)
                status, _, _ = await call(session, "GET", str(admin.make_url(path)), f"Bearer {TOKEN}")
            assert status == 200, path


async def test_an_unknown_admin_path_is_refused_before_it_is_looked_up(aiohttp_server: Any) -> None:
    """With a token, a path the admin port does not serve is 401 too: no route is revealed."""
    admin = await admin_server(aiohttp_server, admin_token=TOKEN)
    async with aiohttp.ClientSession() as session:
        assert_refused(*await call(session, "GET", str(admin.make_url("/nothing-here"))))
        status, _, _ = await call(session, "GET", str(admin.make_url("/nothing-here")), f"Bearer {TOKEN}")
        assert status == 404


async def test_without_a_token_the_admin_port_is_open_as_before(aiohttp_server: Any) -> None:
    """No token configured: /usage and /-/reload answer without Authorization (a loopback default)."""
    admin = await admin_server(aiohttp_server)
    async with aiohttp.ClientSession() as session:
        assert (await call(session, "GET", str(admin.make_url("/usage/ws-a"))))[0] == 200
        assert (await call(session, "POST", str(admin.make_url("/-/reload"))))[0] == 200


async def test_a_rotated_token_file_takes_effect_without_a_restart(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """The file is read again once it changes (as a Secret volume swaps it): new token in, old out;
    a file emptied half-way keeps the token it replaced."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    settings = load_settings({"admin_token_file": token_file}, {})
    admin = await aiohttp_server(build_admin_app(GatewayState(settings, load_ruleset())))
    url = str(admin.make_url("/usage/ws-a"))
    rotated = "r0tated-T0ken-a1b2c3d4e5f60718"
    async with aiohttp.ClientSession() as session:
        assert (await call(session, "GET", url, f"Bearer {TOKEN}"))[0] == 200
        replacement = tmp_path / "admin-token.new"
        replacement.write_text(rotated + "\n")
        os.replace(replacement, token_file)
        assert (await call(session, "GET", url, f"Bearer {rotated}"))[0] == 200
        assert_refused(*await call(session, "GET", url, f"Bearer {TOKEN}"))
        empty = tmp_path / "admin-token.empty"
        empty.write_text("\n")
        with capture_logs() as logs:
            os.replace(empty, token_file)
            assert (await call(session, "GET", url, f"Bearer {rotated}"))[0] == 200
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["admin.token_file_unusable"]
        assert rotated not in str(logs)


@pytest.mark.parametrize(
    ("admin_host", "token", "warned"),
    [
        ("0.0.0.0", None, True),
        ("::", None, True),
        ("10.1.2.3", None, True),
        ("gateway.internal", None, True),
        ("0.0.0.0", TOKEN, False),
        ("127.0.0.1", None, False),
        ("::1", None, False),
        ("localhost", None, False),
    ],
    ids=str,
)
def test_an_exposed_admin_port_without_a_token_is_warned_about(
    admin_host: str, token: str | None, warned: bool
) -> None:
    """A non-loopback admin address with no token logs admin.unprotected at start; nothing else does."""
    settings = replace(Settings(), admin_host=admin_host, admin_token=token)
    with capture_logs() as logs:
        build_admin_app(GatewayState(settings, load_ruleset()))
    warnings = [e for e in logs if e["event"] == "admin.unprotected"]
    assert len(warnings) == (1 if warned else 0)
    for event in warnings:
        assert event["log_level"] == "warning"
        assert event["admin"] == f"{admin_host}:{settings.admin_port}"


# -- settings ----------------------------------------------------------------------------------


def test_the_token_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    """GATEWAY_ADMIN_TOKEN, or --admin-token-file (surrounding whitespace and the newline dropped)."""
    assert load_settings({}, {"GATEWAY_ADMIN_TOKEN": TOKEN}).admin_token == TOKEN
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    settings = load_settings({"admin_token_file": token_file}, {})
    assert settings.admin_token == TOKEN
    assert settings.admin_token_file == token_file
    config = tmp_path / "gateway.yaml"
    config.write_text(f"admin_token_file: {token_file}\nadmin_open: [healthz, readyz]\n")
    settings = load_settings({}, {}, config)
    assert (settings.admin_token, settings.admin_open) == (TOKEN, ("healthz", "readyz"))
    assert load_settings({}, {"GATEWAY_ADMIN_OPEN": "healthz,readyz"}).admin_open == ("healthz", "readyz")
    assert load_settings({}, {"GATEWAY_ADMIN_OPEN": ""}).admin_open == ()
    assert Settings().admin_open == ("healthz", "readyz", "metrics")


@pytest.mark.parametrize(
    ("content", "flags_env", "expected"),
    [
        ("", {}, "--admin-token-file: is empty"),
        ("  \n\t\n", {}, "--admin-token-file: is empty"),
        (f"{TOKEN} second-word\n", {}, "--admin-token-file: must be one word of visible ASCII characters"),
        (None, {}, "--admin-token-file: cannot read"),
        (TOKEN, {"GATEWAY_ADMIN_TOKEN": TOKEN}, "admin_token and admin_token_file are both given"),
        (TOKEN, {"GATEWAY_ADMIN_TOKEN": f"{TOKEN}\u00e9"}, "GATEWAY_ADMIN_TOKEN: must be one word"),
    ],
    ids=["empty", "whitespace only", "two words", "missing", "both given", "non-ASCII variable"],
)
def test_a_bad_token_setting_is_a_config_error_that_never_shows_the_token(
    tmp_path: Path, content: str | None, flags_env: dict[str, str], expected: str
) -> None:
    """Empty, whitespace-only, unreadable, two-word or doubly given: refused, the value never echoed."""
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    with pytest.raises(ConfigError) as refused:
        load_settings({"admin_token_file": token_file}, flags_env)
    assert any(error.startswith(expected) for error in refused.value.errors), refused.value.errors
    assert TOKEN not in str(refused.value)


def test_origin_settings(tmp_path: Path) -> None:
    """The origin secret from GATEWAY_ORIGIN_SECRET or a file; a header name that is a valid,
    gateway-neutral token; neither secret in a settings repr."""
    assert Settings().origin_header == "X-Gateway-Origin"
    secret_file = tmp_path / "origin"
    secret_file.write_text(SECRET + "\n")
    settings = load_settings({"origin_secret_file": secret_file, "origin_header": "X-Origin-Auth"}, {})
    assert (settings.origin_secret, settings.origin_header) == (SECRET, "X-Origin-Auth")
    assert load_settings({}, {"GATEWAY_ORIGIN_SECRET": SECRET}).origin_secret == SECRET
    for bad in ("Host", "Authorization", "Connection", "X-Forwarded-For", "two words", "X:Y", ""):
        with pytest.raises(ConfigError):
            load_settings({"origin_header": bad}, {})
    shown = repr(replace(Settings(), admin_token=TOKEN, origin_secret=SECRET))
    assert TOKEN not in shown
    assert SECRET not in shown


# -- a real process: what reaches its output ---------------------------------------------------


async def test_the_token_never_reaches_the_gateway_output(aiohttp_server: Any, tmp_path: Path) -> None:
    """`gateway serve --admin-token-file` on 0.0.0.0: right and wrong tokens, a rotation, a reload and
    SIGTERM leave neither token, nor the origin secret, anywhere in stdout or stderr."""
    _, upstream = await start_upstream(aiohttp_server)
    token_file, secret_file = tmp_path / "admin-token", tmp_path / "origin-secret"
    token_file.write_text(TOKEN + "\n")
    secret_file.write_text(SECRET + "\n")
    wrong = "wr0ng-T0ken-ffeeddccbbaa99887766"
    port, admin_port = free_ports(2)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve",
        "--upstream", str(upstream.make_url("/")),
        "--port", str(port), "--admin-port", str(admin_port), "--admin-host", "0.0.0.0",
        "--admin-token-file", str(token_file), "--origin-secret-file", str(secret_file),
        "--admin-open", "healthz",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{admin_port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"{base}/healthz") as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            for path in ("/usage/ws-a", "/metrics", "/readyz"):
                assert_refused(*await call(session, "GET", base + path, f"Bearer {wrong}"))
                assert (await call(session, "GET", base + path, f"Bearer {TOKEN}"))[0] == 200
            assert_refused(*await call(session, "POST", f"{base}/-/reload", f"Bearer {wrong}"))
            assert (await call(session, "POST", f"{base}/-/reload", f"Bearer {TOKEN}"))[0] == 200
            async with session.post(
                f"http://127.0.0.1:{port}/conversation/c1/prompt",
                json={"prompt": "hello"},
                headers={"X-Gateway-Origin": wrong},
            ) as response:
                assert response.status == 200
            token_file.write_text("\n")  # a rotation caught half-way: warned, the token kept
            assert (await call(session, "GET", f"{base}/usage/ws-a", f"Bearer {TOKEN}"))[0] == 200
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 0, stderr.decode()
    output = (stdout + stderr).decode()
    for event in ("gateway.serving", "admin.unauthorized", "admin.token_file_unusable", "gateway.stopped"):
        assert event in output, event
    assert "admin.unprotected" not in output
    for secret in (TOKEN, wrong, SECRET):
        assert secret not in output, secret
        assert secret[6:20] not in output, secret


async def test_an_exposed_admin_port_without_a_token_is_warned_about_by_the_process() -> None:
    """`gateway serve --admin-host 0.0.0.0` with no token says so once at start (admin.unprotected)."""
    port, admin_port = free_ports(2)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--upstream", "http://127.0.0.1:9",
        "--port", str(port), "--admin-port", str(admin_port), "--admin-host", "0.0.0.0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        lines = []
        while not lines or "gateway.serving" not in lines[-1]:
            line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
            assert line, "the gateway exited before serving"
            lines.append(line.decode())
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), timeout=20)
    (warning,) = [line for line in lines if "admin.unprotected" in line]
    assert '"level":"warning"' in warning.replace(" ", "")


# -- the origin header: what the backend receives ---------------------------------------------


async def _lookup_then_prompt(public: TestServer, forged: str | None) -> None:
    headers = {"Authorization": "Bearer user-token", **({"X-Gateway-Origin": forged} if forged else {})}
    async with aiohttp.ClientSession() as session:
        for method, path in (
            ("POST", "/conversation/c1/prompt"),  # the workspace lookup, then the prompt
            ("GET", "/conversation/c1/messages"),
            ("GET", "/conversation"),
            ("GET", "/health/anything"),  # pass-through
        ):
            body = {"prompt": "hello", "model": "gpt-4o"} if method == "POST" else None
            async with session.request(
                method, str(public.make_url(path)), json=body, headers=headers
            ) as answer:
                await answer.read()


@pytest.mark.parametrize(
    "forged", [None, "forged-by-the-client", SECRET], ids=["none", "forged", "the secret"]
)
async def test_every_upstream_request_carries_the_origin_secret_and_no_client_copy(
    aiohttp_server: Any, express: ExpressBackend, forged: str | None
) -> None:
    """Prompt, workspace lookup, messages, conversation list and pass-through reach Express with
    exactly one X-Gateway-Origin, the gateway's, whatever the client sent."""
    public, _, _ = await start_gateway(aiohttp_server, express.url, origin_secret=SECRET)
    await _lookup_then_prompt(public, forged)
    records = express.received()
    seen = [(r["method"], r["originalUrl"].split("?")[0]) for r in records]
    assert seen == [
        ("GET", "/conversation"),  # the workspace lookup of routes._page_fetcher
        ("POST", "/conversation/c1/prompt"),
        ("GET", "/conversation/c1/messages"),
        ("GET", "/conversation"),
        ("GET", "/health/anything"),
    ], seen
    assert "take=" in records[0]["originalUrl"]
    for record in records:
        origin = [value for name, value in record["rawHeaders"] if name.lower() == "x-gateway-origin"]
        assert origin == [SECRET], (record["originalUrl"], origin)


async def test_without_an_origin_secret_a_client_copy_is_still_stripped(
    aiohttp_server: Any, express: ExpressBackend
) -> None:
    """No secret configured: a client's X-Gateway-Origin reaches the backend on no route."""
    public, _, _ = await start_gateway(aiohttp_server, express.url)
    await _lookup_then_prompt(public, "forged-by-the-client")
    records = express.received()
    assert len(records) == 5
    for record in records:
        assert "x-gateway-origin" not in record["headers"], record["originalUrl"]


async def test_a_renamed_origin_header_is_the_one_added_and_stripped(
    aiohttp_server: Any, express: ExpressBackend
) -> None:
    """origin_header names the header: that one is replaced; the default name is then no one's."""
    public, _, _ = await start_gateway(
        aiohttp_server, express.url, origin_secret=SECRET, origin_header="X-Origin-Auth"
    )
    async with aiohttp.ClientSession() as session:
        headers = {"X-Origin-Auth": "forged", "X-Gateway-Origin": "just-a-header"}
        async with session.get(str(public.make_url("/health/x")), headers=headers) as answer:
            await answer.read()
    (record,) = express.received()
    assert record["headers"]["x-origin-auth"] == SECRET
    assert record["headers"]["x-gateway-origin"] == "just-a-header"


# -- the Express middleware of docs/operations.md ------------------------------------------------


def readme_middleware() -> str:
    readme = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = readme.split("## Closing the side door", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```js\n(.*?)```", section, flags=re.S)
    return snippet


async def test_the_readme_middleware_admits_the_gateway_and_refuses_the_side_door(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """The docs' snippet, in a real Express app: the gateway's requests pass, requests straight
    to the backend (no header, a wrong one) get 403, and a backend with no secret will not start."""
    node = shutil.which("node")
    assert node is not None, "node is not installed (./scripts/test installs it)"
    app = tmp_path / "backend.js"
    app.write_text(
        "const express = require('express')\nconst app = express()\n"
        + readme_middleware()
        + "\napp.use(express.json())\n"
        "app.all('*', (req, res) => res.json({ success: true, message: 'Prompt received' }))\n"
        "const server = app.listen(0, '127.0.0.1', () => console.log(server.address().port))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ORIGIN_SECRET"}
    env["NODE_PATH"] = str(EXPRESS_DIR / "node_modules")
    for unusable in ({}, {"GATEWAY_ORIGIN_SECRET": ""}, {"GATEWAY_ORIGIN_SECRET": f"{SECRET},short"}):
        refused = await asyncio.create_subprocess_exec(
            node, str(app), env={**env, **unusable},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.wait_for(refused.communicate(), timeout=20)
        assert refused.returncode != 0, f"the middleware started with {unusable}"

    backend = await asyncio.create_subprocess_exec(
        node, str(app), env={**env, "GATEWAY_ORIGIN_SECRET": SECRET},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert backend.stdout is not None
    try:
        port = int(await asyncio.wait_for(backend.stdout.readline(), timeout=20))
        backend_url = f"http://127.0.0.1:{port}"
        gateway, _, _ = await start_gateway(aiohttp_server, backend_url, origin_secret=SECRET)
        outsider, _, _ = await start_gateway(aiohttp_server, backend_url)
        prompt = {"prompt": "hello"}
        async with aiohttp.ClientSession() as session:
            for url, headers, expected in (
                (f"{backend_url}/conversation/c1/prompt", {}, 403),
                (f"{backend_url}/conversation/c1/prompt", {"X-Gateway-Origin": "guess"}, 403),
                (f"{backend_url}/conversation/c1/prompt", {"X-Gateway-Origin": SECRET[:-1]}, 403),
                (f"{backend_url}/conversation/c1/prompt", {"X-Gateway-Origin": ""}, 403),
                (f"{backend_url}/conversation/c1/prompt", {"X-Gateway-Origin": SECRET}, 200),
                (str(outsider.make_url("/conversation/c1/prompt")), {"X-Gateway-Origin": SECRET}, 403),
                (str(gateway.make_url("/conversation/c1/prompt")), {"X-Gateway-Origin": "guess"}, 200),
                (str(gateway.make_url("/conversation/c1/prompt")), {}, 200),
            ):
                async with session.post(url, json=prompt, headers=headers) as answer:
                    body = await answer.json()
                    assert (answer.status, url, headers) == (expected, url, headers)
                    if expected == 403:
                        assert body["success"] is False
                        assert body["error_code"] == "FORBIDDEN"
    finally:
        backend.terminate()
        await backend.wait()
