"""Every query of the Grafana dashboard, run by a real Prometheus scraping real gateways.

Run with ``pytest -s tests/test_dashboard_queries.py`` to see each panel's PromQL and what it returned.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.alerts import parse_alert_config
from gateway.config import Budget
from gateway.policy import BUILTIN_POLICY_DIR
from tests.proxy_fixtures import start_gateway, start_upstream

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "policy-gateway.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# The Debian package `prometheus`; ./scripts/test installs it.
PROMETHEUS = "/usr/bin/prometheus"
SCRAPE_SECONDS = 1
# What Grafana would put in the queries; the gateways' whole life fits in each window.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "instance": ".*"}

SHADOW_POLICY = """\
policies:
  - id: shadow.project-nightjar
    name: Project Nightjar code name
    severity: medium
    action: block
    mode: shadow
    stages: [prompt]
    match:
      keywords: [project nightjar]
"""

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
CARD = "4111 1111 1111 1111"


@dataclass(frozen=True)
class Expect:
    """A series the traffic must produce: one whose labels include ``labels``, with a ``value``."""

    labels: dict[str, str] = field(default_factory=dict)
    value: str = "positive"  # positive | finite | any


# Each panel of the dashboard, and what the traffic below must make it show.
PANELS: dict[str, tuple[Expect, ...]] = {
    "Requests by route and status": (
        Expect({"route": "prompt", "status": "200"}),
        Expect({"route": "prompt", "status": "403"}),
        Expect({"route": "prompt", "status": "429"}),
        Expect({"route": "prompt", "status": "500"}),
        Expect({"route": "prompt", "status": "502"}),
        Expect({"route": "messages", "status": "200"}),
        Expect({"route": "conversations", "status": "200"}),
        Expect({"route": "passthrough", "status": "200"}),
    ),
    "Error ratio (5xx share)": (Expect(),),
    "Quota rejections": (Expect(),),
    "Decisions by stage and action": (
        Expect({"stage": "prompt", "action": "allow"}),
        Expect({"stage": "prompt", "action": "log"}),
        Expect({"stage": "prompt", "action": "alert"}),
        Expect({"stage": "prompt", "action": "block"}),
        Expect({"stage": "response", "action": "block"}),
    ),
    "Top policies by violations": (
        Expect({"policy": "secrets.aws-access-key-id"}),
        Expect({"policy": "pii.credit-card"}),
        Expect({"policy": "shadow.project-nightjar"}),
    ),
    "Blocks by high-severity policies": (Expect({"policy": "secrets.aws-access-key-id", "stage": "prompt"}),),
    "Would-block by shadow rules": (Expect({"policy": "shadow.project-nightjar", "stage": "prompt"}),),
    "Violations by workspace": (Expect({"workspace": "ws-a"}), Expect({"workspace": "other"}, "any")),
    "Tokens by direction and source": (
        Expect({"direction": "prompt", "source": "reported"}),
        Expect({"direction": "response", "source": "estimated"}),
    ),
    "Tokens by workspace": (Expect({"workspace": "ws-a"}), Expect({"workspace": "other"}, "any")),
    "Gateway overhead p50 / p99 by stage": (
        Expect({"stage": "prompt"}, "finite"),
        Expect({"stage": "response"}, "finite"),
    ),
    "Request duration p50 / p99 by route": (Expect({"route": "prompt"}, "finite"),),
    "Upstream duration p50 / p99": (Expect({}, "finite"),),
    "Upstream errors by kind": (Expect({"kind": "unreachable"}), Expect({"kind": "timeout"}, "any")),
    "Fallbacks by dependency and reason": (
        Expect({"dependency": "answer", "reason": "encoded"}),
        Expect({"dependency": "redis", "reason": "dropped"}, "any"),
    ),
    "Alert deliveries by sink and result": (
        Expect({"sink": "webhook", "result": "delivered"}),
        Expect({"sink": "webhook-down", "result": "failed"}),
    ),
    "Rule-set revision by instance": (Expect({}, "positive"),),
    "Rules by stage and action": (Expect({"stage": "prompt", "action": "block"}),),
    "Stream hold-back p50 / p99 (characters)": (Expect({}, "finite"),),
    "Stream first-byte delay p50 / p99": (Expect({}, "finite"),),
}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, with Grafana's variables filled in."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(
                r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES.get(m.group(1), m.group(0)), target["expr"]
            )
            assert "$" not in expr, f"unknown variable in {panel['title']!r}: {expr}"
            queries.append((panel["title"], expr))
    return queries


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], str]]:
    """Start a real Prometheus scraping ``targets`` every second; returns its base URL."""
    if not Path(PROMETHEUS).exists():
        pytest.fail(
            f"{PROMETHEUS} not found: install the Debian package `prometheus` "
            "(apt-get install prometheus), as ./scripts/test does"
        )
    processes: list[subprocess.Popen[bytes]] = []

    def start(targets: list[str]) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [
                        {"job_name": "policy-gateway", "static_configs": [{"targets": targets}]}
                    ],
                }
            ),
            encoding="utf-8",
        )
        log = (tmp_path / "prometheus.log").open("wb")
        processes.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def answer(request: web.Request) -> web.StreamResponse:
    """The stand-in backend: each prompt's words choose the kind of answer."""
    if request.path == "/alerts":
        return web.json_response({"ok": True})
    if request.path == "/conversation":
        return web.json_response(
            {"success": True, "data": [{"id": "c1", "workspaceId": "ws-a", "repoId": "r1"}]}
        )
    if request.path.endswith("/messages"):
        return web.json_response(
            {
                "success": True,
                "messages": [
                    {"role": "user", "content": "show me the deploy key"},
                    {"role": "assistant", "content": f"here it is: {AWS_KEY}"},
                    {"role": "assistant", "content": "and that is all"},
                ],
            }
        )
    if not request.path.endswith("/prompt"):
        return web.json_response({"status": "ok"})
    prompt = (await request.json())["prompt"]
    if "stream" in prompt:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("A streamed ", "answer in ", "four events", "."):
            await response.write(
                f"data: {json.dumps({'choices': [{'delta': {'content': word}}]})}\n\n".encode()
            )
        await response.write_eof()
        return response
    if "fail" in prompt:
        return web.json_response({"success": False, "message": "backend exploded"}, status=500)
    if "gzip" in prompt:
        body = gzip.compress(json.dumps({"success": True, "message": "compressed"}).encode())
        return web.Response(
            body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
    return web.json_response(
        {
            "success": True,
            "message": "Prompt received",
            "usage": {"prompt_tokens": 12, "completion_tokens": 3},
        }
    )


async def drive(session: aiohttp.ClientSession, gateway: str, unreachable: str) -> list[int]:
    """One round of traffic touching every panel; returns the statuses seen."""
    statuses = []

    async def send(method: str, url: str, workspace: str = "ws-a", **kwargs: Any) -> None:
        headers = {"X-Workspace-Id": workspace, "Content-Type": "application/json"}
        async with session.request(method, url, headers=headers, **kwargs) as response:
            await response.read()
            statuses.append(response.status)

    def prompt(text: str) -> dict[str, str]:
        return {"data": json.dumps({"prompt": text, "model": "gpt-4o"})}

    prompt_url = f"{gateway}/conversation/c1/prompt"
    await send("POST", prompt_url, **prompt("Summarise our release notes"))  # allowed, reported usage
    await send("POST", prompt_url, **prompt(f"deploy with {AWS_KEY}"))  # blocked, high severity
    await send("POST", prompt_url, **prompt(f"charge card {CARD} please"))  # alert
    await send("POST", prompt_url, **prompt("mail jane.doe@example.com"))  # log
    await send("POST", prompt_url, **prompt("status of Project Nightjar?"))  # shadow would-block
    await send("POST", prompt_url, **prompt("stream the answer please"))  # streamed, estimated usage
    await send("POST", prompt_url, **prompt("make the backend fail"))  # upstream 500
    await send("POST", prompt_url, **prompt("answer with gzip"))  # uninspectable: fallback, 502
    await send("POST", prompt_url, workspace="ws-q", **prompt("over budget"))  # 200, then 429
    await send("GET", f"{gateway}/conversation/c1/messages")  # response-stage block, withheld
    await send("GET", f"{gateway}/conversation")  # conversations
    await send("GET", f"{gateway}/health")  # passthrough
    await send("POST", f"{unreachable}/conversation/c1/prompt", **prompt("hello"))  # 502 unreachable
    return statuses


async def query(session: aiohttp.ClientSession, prometheus: str, expr: str) -> dict[str, Any]:
    async with session.get(f"{prometheus}/api/v1/query", params={"query": expr}) as response:
        body: dict[str, Any] = await response.json()
        return body


async def wait_for_targets(session: aiohttp.ClientSession, prometheus: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            result = await query(session, prometheus, 'sum(up{job="policy-gateway"})')
            if result["data"]["result"] and float(result["data"]["result"][0]["value"][1]) == count:
                return
        except (aiohttp.ClientError, KeyError, ValueError):
            pass
        await asyncio.sleep(0.25)
    pytest.fail(f"Prometheus at {prometheus} did not scrape {count} gateways within 30 s")


def shown(result: dict[str, Any]) -> str:
    """A query's result in one line: each series' distinguishing labels and its value."""
    series = []
    for item in result["data"]["result"]:
        labels = ",".join(f"{k}={v}" for k, v in sorted(item["metric"].items()) if k not in {"job"})
        value = float(item["value"][1])
        series.append(f"{{{labels}}} {value:.4g}")
    return "; ".join(series) or "(empty)"


def meets(result: dict[str, Any], expect: Expect) -> bool:
    for item in result.get("data", {}).get("result", []):
        if not expect.labels.items() <= item["metric"].items():
            continue
        value = float(item["value"][1])
        if (
            expect.value == "any"
            or (expect.value == "finite" and math.isfinite(value))
            or (expect.value == "positive" and value > 0)
        ):
            return True
    return False


async def test_every_dashboard_query_returns_data(
    aiohttp_server: Any, start_prometheus: Callable[[list[str]], str], tmp_path: Path
) -> None:
    """Against gateways under mixed traffic, each dashboard query succeeds and shows what the traffic did."""
    queries = dashboard_queries()
    assert {title for title, _ in queries} == set(PANELS), "PANELS must list exactly the dashboard's panels"

    policies = tmp_path / "shadow"
    policies.mkdir()
    (policies / "shadow.yaml").write_text(SHADOW_POLICY, encoding="utf-8")
    upstream, upstream_server = await start_upstream(aiohttp_server)
    upstream.handler = answer
    upstream_url = str(upstream_server.make_url("/")).rstrip("/")
    closed = f"http://127.0.0.1:{free_port()}"
    alerts = parse_alert_config(
        {
            "sinks": [
                {"type": "webhook", "url": f"{upstream_url}/alerts"},
                {"type": "webhook", "name": "webhook-down", "url": f"{closed}/alerts"},
            ],
            "retries": 1,
            "timeout": 1,
            "window": 0.5,
        }
    )
    # The workspace label is on here and off on the second gateway: the panels must show both.
    public, admin, _ = await start_gateway(
        aiohttp_server,
        upstream_url,
        policies=[policies, BUILTIN_POLICY_DIR],
        workspace_header="X-Workspace-Id",
        quotas={"ws-q": Budget(daily=1)},
        metrics_workspace_label=True,
        alerts=alerts,
    )
    public_down, admin_down, _ = await start_gateway(aiohttp_server, closed, connect_timeout=1.0)
    prometheus = start_prometheus([f"{server.host}:{server.port}" for server in (admin, admin_down)])

    async with aiohttp.ClientSession() as session:
        await wait_for_targets(session, prometheus, 2)
        gateway, unreachable = (str(server.make_url("")).rstrip("/") for server in (public, public_down))
        statuses: set[int] = set()
        for _ in range(4):
            statuses.update(await drive(session, gateway, unreachable))
            await asyncio.sleep(SCRAPE_SECONDS)
        assert {200, 403, 429, 500, 502} <= statuses
        await asyncio.sleep(3 * SCRAPE_SECONDS)

        results = [(title, expr, await query(session, prometheus, expr)) for title, expr in queries]
        async with session.get(f"{prometheus}/api/v1/rules") as response:
            rules = [rule for group in (await response.json())["data"]["groups"] for rule in group["rules"]]

    failures = []
    print()
    for title, expr, result in results:
        ok = result.get("status") == "success" and bool(result["data"]["result"])
        print(f"{title}\n    {expr}\n    -> {shown(result) if ok else result}")
        if not ok:
            failures.append(f"{title}: {expr} returned {result}")
    for title, expects in PANELS.items():
        failures.extend(
            f"{title}: no series with {expect.labels} and a {expect.value} value"
            for expect in expects
            if not any(meets(result, expect) for t, _, result in results if t == title)
        )
    # The alert rules, loaded by the same Prometheus, evaluate against the real series without error.
    assert rules, "Prometheus loaded no alert rules"
    failures.extend(
        f"alert {rule['name']}: {rule.get('lastError')}" for rule in rules if rule["health"] == "err"
    )
    assert not failures, "\n".join(failures)
