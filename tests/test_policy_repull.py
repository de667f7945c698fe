"""`gateway serve` re-pulling the platform's policies: a real stand-in platform, judge and backend,
and real gateway processes.

The platform answers ``GET /policy`` with the policies of a test (workspace-scoped, so that a
request naming the workspace in the trusted header is in their scope); the stand-in judge says a
policy is broken when the text holds one of its UPPERCASE words (tests/judge_fixtures.py).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.cli import main
from gateway.config import ConfigError, load_settings
from gateway.policy_pull import pull, write_policy_file
from tests.gateway_process import ServedProcess, serve_process
from tests.judge_fixtures import ModelServer, model_app

ORG = "org-1"
WORKSPACE = "ws-1"
TOKEN = "tok-repull-0123456789abcdef-SECRET"
HEADER = "X-Workspace-Id"
INTERVAL = 0.5
PROJECT = "Do not discuss the project REDHERON"
CODENAME = "Do not mention the codename BLUEFALCON"


def policy(platform_id: str, content: str) -> dict[str, Any]:
    return {
        "id": platform_id,
        "orgId": ORG,
        "name": f"Policy {platform_id}",
        "content": content,
        "riskType": "HIGH",
        "actionType": 2,
        "workspaceId": WORKSPACE,
        "repoId": None,
    }


@dataclass
class Platform:
    """``GET /policy``: the policies listed, or a failure of the kind a test chose."""

    policies: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    raw: bytes | None = None  # answered as is, instead of the policies
    calls: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"success": False, "message": "Invalid token"}, status=401)
        if self.status != 200:
            return web.json_response({"success": False, "message": "database down"}, status=self.status)
        if self.raw is not None:
            return web.Response(body=self.raw, content_type="application/json")
        scoped = request.query.get("workspaceId")
        chosen = [p for p in self.policies if p["workspaceId"] in (None, scoped)]
        return web.json_response({"success": True, "policies": chosen})


class Gateway(ServedProcess):
    async def get_json(self, path: str) -> dict[str, Any]:
        # A connection of its own each time: with several workers, any of them may answer.
        async with aiohttp.ClientSession() as session, session.get(self.admin_url(path)) as got:
            answer: dict[str, Any] = await got.json()
            return answer

    async def pulls(self, result: str) -> float:
        return await self.metric("policy_gateway_policy_pulls_total", result=result)

    async def prompt(self, text: str) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.url(f"/conversation/c-{uuid.uuid4().hex[:8]}/prompt"),
                json={"prompt": f"{text} (ref {uuid.uuid4().hex[:8]})"},
                headers={HEADER: WORKSPACE},
            ) as got,
        ):
            return got.status, json.loads(await got.read())


async def until(check: Callable[[], Awaitable[bool]], within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@dataclass
class Stack:
    platform: Platform
    platform_server: TestServer
    out: Path  # the file the gateway pulls into, in its policy directory
    start: Callable[..., Awaitable[Gateway]]


async def _server(app: web.Application) -> TestServer:
    server = TestServer(app)
    await server.start_server()
    return server


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    platform = Platform([policy("p-1", PROJECT)])
    platform_app = web.Application()
    platform_app.router.add_get("/policy", platform.handle)
    backend = web.Application()

    async def answer(_: web.Request) -> web.Response:
        return web.json_response({"success": True, "message": "Prompt received"})

    backend.router.add_post("/conversation/{id}/prompt", answer)
    servers = [await _server(platform_app), await _server(backend), await _server(model_app(ModelServer()))]
    platform_url = str(servers[0].make_url("")).rstrip("/")
    policies = tmp_path / "policies"
    policies.mkdir()
    out = policies / "platform.yaml"
    # What an operator does once, before the first start: `gateway policies pull`.
    async with aiohttp.ClientSession() as session:
        assert write_policy_file(out, await pull(platform_url, ORG, [WORKSPACE], [], TOKEN, session))
    token_file = tmp_path / "platform-token"
    token_file.write_text(TOKEN + "\n")
    started: list[Gateway] = []

    async def start(*extra: str) -> Gateway:
        gateway = await serve_process(
            Gateway,
            str(servers[1].make_url("")).rstrip("/"),
            tmp_path,
            "--policies", str(policies),
            "--judge-url", str(servers[2].make_url("/v1")), "--judge-model", "stand-in-1",
            "--workspace-header", HEADER,
            "--platform-url", platform_url, "--platform-org", ORG, "--platform-workspace", WORKSPACE,
            "--platform-token-file", str(token_file),
            "--policies-pull-interval", str(INTERVAL), "--policies-pull-out", str(out),
            *extra,
        )  # fmt: skip
        started.append(gateway)
        return gateway

    try:
        yield Stack(platform, servers[0], out, start)
    finally:
        for gateway in started:
            if gateway.process.returncode is None:
                gateway.process.kill()
                await gateway.process.wait()
        for server in servers:
            await server.close()


async def rules_served(gateway: Gateway, count: int) -> bool:
    return (await gateway.get_json("/readyz"))["rules"] == count


# -- the served rule set follows the platform --------------------------------------------------------


async def test_the_served_rule_set_follows_the_platform(stack: Stack) -> None:
    gateway = await stack.start()
    assert await rules_served(gateway, 1)
    assert (await gateway.prompt("the project redheron ships"))[0] == 403
    assert (await gateway.prompt("ship bluefalcon on Friday"))[0] == 200
    assert await until(lambda: _more(gateway.pulls("unchanged"), 0))

    stack.platform.policies.append(policy("p-2", CODENAME))
    assert await until(lambda: rules_served(gateway, 2), within=10 * INTERVAL + 5)
    status, body = await gateway.prompt("ship bluefalcon on Friday")
    assert status == 403, body
    assert [v["policyId"] for v in body["violations"]] == ["platform.p-2"]
    assert "p-2" in stack.out.read_text()
    assert await gateway.pulls("ok") >= 1

    # A policy the platform dropped stops being enforced too.
    stack.platform.policies = [policy("p-2", CODENAME)]
    assert await until(lambda: rules_served(gateway, 1), within=10 * INTERVAL + 5)
    assert (await gateway.prompt("the project redheron ships"))[0] == 200
    assert (await gateway.prompt("ship bluefalcon on Friday"))[0] == 403


async def _more(value: Awaitable[float], than: float) -> bool:
    return await value > than


# Each answer refused whole: the pull writes nothing and the reload is not asked for.
BAD_ANSWERS: list[dict[str, Any]] = [
    {"status": 500},
    {"status": 401},
    {"raw": b"<html>maintenance</html>"},
    {"raw": b'{"success": false, "policies": []}'},
    {"raw": json.dumps({"success": True, "policies": [{"id": "p-9", "orgId": ORG}]}).encode()},
]


async def test_a_bad_platform_answer_keeps_the_last_good_set_serving(stack: Stack) -> None:
    gateway = await stack.start()
    stack.platform.policies.append(policy("p-2", CODENAME))
    assert await until(lambda: rules_served(gateway, 2), within=10 * INTERVAL + 5)
    good = await gateway.get_json("/readyz")
    written = stack.out.read_bytes()

    for bad in BAD_ANSWERS:
        stack.platform.status, stack.platform.raw = bad.get("status", 200), bad.get("raw")
        failed = await gateway.pulls("failed")
        assert await until(lambda seen=failed: _more(gateway.pulls("failed"), seen + 1)), bad
        assert await gateway.get_json("/readyz") == good, bad
        assert stack.out.read_bytes() == written, bad
        assert (await gateway.prompt("ship bluefalcon on Friday"))[0] == 403, bad

    # And a platform that no longer answers at all.
    failed = await gateway.pulls("failed")
    await stack.platform_server.close()
    assert await until(lambda: _more(gateway.pulls("failed"), failed + 1))
    assert await gateway.get_json("/readyz") == good
    assert stack.out.read_bytes() == written
    assert (await gateway.prompt("the project redheron ships"))[0] == 403

    log = gateway.log.read_text()
    assert TOKEN not in log
    assert "maintenance" not in log
    # The platform's policy text is confidential: the pull's lines name a policy by index and id.
    # (The judge's explanations in violation records may quote it: they are redacted apart.)
    pulls = "\n".join(line for line in log.splitlines() if '"policy.pull' in line)
    for word in ("REDHERON", "BLUEFALCON"):
        assert word not in pulls
    warnings = [e for e in gateway.log_events() if e.get("event") == "policy.pull_failed"]
    assert len(warnings) >= len(BAD_ANSWERS) + 1
    assert all(e["level"] == "warning" for e in warnings)
    reasons = " ".join(str(e.get("error")) for e in warnings)
    for reason in ("HTTP 500", "HTTP 401", "not JSON", "success: true", "'content'", "cannot reach"):
        assert reason in reasons


HOUSE_RULE = """\
policies:
  - id: platform.p-2
    name: A house rule that took the id the platform's next policy gets
    severity: low
    action: log
    match: {keywords: [house]}
"""


async def test_a_pulled_file_that_does_not_load_with_the_others_is_refused_by_the_reload(
    stack: Stack,
) -> None:
    """The file loads on its own, so the pull writes it; the rule set as a whole does not, so the
    reload refuses it, as a reload of any file would, and the last good set keeps serving."""
    (stack.out.parent / "house.yaml").write_text(HOUSE_RULE)
    gateway = await stack.start()
    good = await gateway.get_json("/readyz")
    assert good["rules"] == 2
    refused = await gateway.metric("policy_gateway_reloads_total", result="failed")
    stack.platform.policies.append(policy("p-2", CODENAME))
    assert await until(lambda: _more(gateway.pulls("ok"), 0))
    assert await until(
        lambda: _more(gateway.metric("policy_gateway_reloads_total", result="failed"), refused)
    )
    assert "p-2" in stack.out.read_text()
    assert await gateway.get_json("/readyz") == good
    assert (await gateway.prompt("ship bluefalcon on Friday"))[0] == 200
    assert (await gateway.prompt("the project redheron ships"))[0] == 403
    # Nothing changed since: the next pulls find the file as written and ask for no reload.
    assert await until(lambda: _more(gateway.pulls("unchanged"), 1))
    assert await gateway.metric("policy_gateway_reloads_total", result="failed") == refused + 1


async def test_with_several_workers_one_pulls_and_every_worker_serves_the_new_set(stack: Stack) -> None:
    gateway = await stack.start("--workers", "2")
    stack.platform.policies.append(policy("p-2", CODENAME))

    async def all_serve_two() -> bool:
        answers = [await gateway.get_json("/readyz") for _ in range(12)]
        return all(answer["rules"] == 2 for answer in answers)

    assert await until(all_serve_two, within=10 * INTERVAL + 10)
    leads = {e["pid"] for e in gateway.log_events() if e.get("event") == "policy.pull_lead"}
    assert len(leads) == 1
    # One puller: about one pull per interval (two calls each: the org's, the workspace's).
    calls, started = stack.platform.calls, time.monotonic()
    await asyncio.sleep(8 * INTERVAL)
    assert (stack.platform.calls - calls) / 2 <= (time.monotonic() - started) / INTERVAL + 2


# -- settings refused at start -----------------------------------------------------------------------


def _refusal(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["serve", *args]) == 2
    return capsys.readouterr().err


def test_an_interval_without_where_to_pull_from_refuses_to_start(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("GATEWAY_PLATFORM_TOKEN", raising=False)
    err = _refusal(["--policies", str(tmp_path), "--policies-pull-interval", "30"], capsys)
    for needed in ("platform_url", "platform_org", "platform_token", "policies_pull_out"):
        assert f"gateway: --policies-pull-interval: needs {needed}" in err
    assert "4 error(s): settings refused" in err


@pytest.mark.parametrize(
    ("out", "policies"),
    [
        pytest.param("elsewhere/platform.yaml", ["policies"], id="a file outside the policy directory"),
        pytest.param("policies/sub/platform.yaml", ["policies"], id="a file below the policy directory"),
        pytest.param("policies/platform.txt", ["policies"], id="a file the directory's loading skips"),
        pytest.param("policies/platform.yaml", ["policies/house.yaml"], id="another policy file"),
        pytest.param("policies/platform.yaml", [], id="the built-in pack only"),
    ],
)
def test_a_pull_file_the_reload_would_not_read_refuses_to_start(
    out: str,
    policies: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATEWAY_PLATFORM_TOKEN", TOKEN)
    given = [arg for path in policies for arg in ("--policies", path)]
    err = _refusal(
        [
            *given, "--platform-url", "https://platform.example", "--platform-org", ORG,
            "--policies-pull-interval", "30", "--policies-pull-out", out,
        ],
        capsys,
    )  # fmt: skip
    assert f"gateway: --policies-pull-out: {out} is not read by the policies" in err
    assert TOKEN not in err


@pytest.mark.parametrize(
    ("out", "policies"),
    [
        pytest.param("policies/platform.yaml", ["policies"], id="in the policy directory"),
        pytest.param("policies/platform.yml", ["builtin", "policies"], id="beside the built-in pack"),
        pytest.param("policies/platform.yaml", ["policies/platform.yaml"], id="the policy file itself"),
        pytest.param("./policies/../policies/platform.yaml", ["policies"], id="spelled otherwise"),
    ],
)
def test_a_pull_file_the_reload_reads_is_accepted(
    out: str, policies: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(
        {
            "policies": [Path(p) for p in policies],
            "policies_pull_interval": 30.0,
            "policies_pull_out": Path(out),
            "platform_url": "https://platform.example/api/",
            "platform_workspaces": ["ws-1"],
        },
        {
            "GATEWAY_PLATFORM_TOKEN": TOKEN,
            "GATEWAY_PLATFORM_ORG": ORG,
            "GATEWAY_PLATFORM_REPOS": "repo-1,repo-2",
        },
        None,
    )
    assert settings.policies_pull_interval == 30.0
    assert settings.platform_url == "https://platform.example/api"
    assert settings.platform_token == TOKEN
    assert settings.platform_workspaces == ("ws-1",)
    assert settings.platform_repos == ("repo-1", "repo-2")
    assert TOKEN not in repr(settings)


@pytest.mark.parametrize("interval", ["0", "", None])
def test_no_interval_means_no_pull_and_needs_nothing(interval: str | None) -> None:
    environ = {} if interval is None else {"GATEWAY_POLICIES_PULL_INTERVAL": interval}
    assert load_settings({}, environ, None).policies_pull_interval is None


@pytest.mark.parametrize(
    ("flags", "environ", "error"),
    [
        pytest.param(
            {"policies_pull_interval": -1.0},
            {},
            "--policies-pull-interval: -1.0 must be",
            id="a negative interval",
        ),
        pytest.param(
            {"platform_url": "https://user:hunter2-pass@platform.example"},
            {},
            "--platform-url: must hold no user",
            id="a URL with a password",
        ),
        pytest.param(
            {"platform_url": "ftp://platform.example"}, {}, "--platform-url: must be", id="not http"
        ),
        pytest.param(
            {"platform_token_file": Path("/nonexistent/token")},
            {"GATEWAY_PLATFORM_TOKEN": TOKEN},
            "platform_token and platform_token_file are both given",
            id="a token given twice",
        ),
        pytest.param(
            {}, {"GATEWAY_PLATFORM_TOKEN": "short"}, "GATEWAY_PLATFORM_TOKEN: must be", id="a short token"
        ),
    ],
)
def test_bad_platform_settings_are_located_errors(
    flags: dict[str, object], environ: dict[str, str], error: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(flags, environ, None)
    errors = "\n".join(raised.value.errors)
    assert error in errors
    assert "hunter2-pass" not in errors
    assert TOKEN not in errors
