"""Operations, with real processes: hot reload under traffic, several workers, graceful stop."""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.usage.redis_store import RedisUsageStore
from gateway.usage.store import Period
from tests.gateway_process import ServedProcess, served_processes
from tests.proxy_fixtures import start_upstream
from tests.redis_fixtures import RedisProcess

BASE = (
    "policies:\n"
    "  - {id: t.key, name: Key, severity: high, action: block, match: {regex: 'AKIA[A-Z2-7]{16}'}}\n"
)
BANANA = "  - {id: t.banana, name: Banana, severity: low, action: block, match: {keywords: [banana]}}\n"


class Gateway(ServedProcess):
    def events(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.log_events() if event.get("event") == name]

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout=30)


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Any:
    recorder, server = await start_upstream(aiohttp_server)
    return recorder, server


@pytest.fixture
async def launch(upstream: Any, tmp_path: Path) -> AsyncIterator[Any]:
    async with served_processes(Gateway, str(upstream[1].make_url("/")), tmp_path) as start:
        yield start


async def _prompt(session: aiohttp.ClientSession, gateway: Gateway, text: str) -> int:
    async with session.post(gateway.url("/conversation/c1/prompt"), json={"prompt": text}) as response:
        await response.read()
        return response.status


async def _reload(session: aiohttp.ClientSession, gateway: Gateway) -> tuple[int, dict[str, Any]]:
    async with session.post(gateway.admin_url("/-/reload")) as response:
        return response.status, await response.json()


async def _ready(session: aiohttp.ClientSession, gateway: Gateway) -> tuple[int, dict[str, Any]]:
    async with session.get(gateway.admin_url("/readyz")) as response:
        return response.status, await response.json()


async def test_reloads_good_and_bad_under_traffic_fail_no_request(launch: Any, tmp_path: Path) -> None:
    """Traffic runs throughout a good reload, a bad one, and one by SIGHUP; none fails."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "rules.yaml").write_text(BASE)
    gateway = await launch("--policies", str(policies))
    statuses: list[int] = []
    stop = asyncio.Event()

    async with aiohttp.ClientSession() as session:

        async def traffic() -> None:
            while not stop.is_set():
                statuses.append(await _prompt(session, gateway, "an ordinary prompt"))

        runners = [asyncio.create_task(traffic()) for _ in range(4)]
        # How many requests had finished at each step: traffic must go on across every reload
        # (a count, not a rate: the machine may be slow, the requests must not fail).
        marks = [len(statuses)]
        _, before = await _ready(session, gateway)
        assert await _prompt(session, gateway, "a banana") == 200

        (policies / "rules.yaml").write_text(BASE + BANANA)
        status, good = await _reload(session, gateway)
        assert status == 200
        assert good["changed"] is True
        assert good["revision"] != before["revision"]
        assert await _prompt(session, gateway, "a banana") == 403
        marks.append(len(statuses))

        (policies / "broken.yaml").write_text("policies:\n  - id: t.broken\n    name: Broken\n")
        status, bad = await _reload(session, gateway)
        assert status == 422
        assert bad["revision"] == good["revision"]
        assert bad["errors"] == [
            f"{policies / 'broken.yaml'}:2: t.broken: missing 'action', 'match', 'severity'"
        ]
        assert await _prompt(session, gateway, "a banana") == 403
        status, ready = await _ready(session, gateway)
        assert (status, ready["ready"], ready["revision"]) == (200, True, good["revision"])
        marks.append(len(statuses))

        (policies / "broken.yaml").unlink()
        (policies / "rules.yaml").write_text(BASE)
        gateway.process.send_signal(signal.SIGHUP)
        for _ in range(300):
            if (await _ready(session, gateway))[1]["revision"] == before["revision"]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("SIGHUP did not reload the policies within 15 s")
        assert await _prompt(session, gateway, "a banana") == 200
        marks.append(len(statuses))
        async with session.get(gateway.admin_url("/metrics")) as response:
            metrics = await response.text()
        stop.set()
        await asyncio.gather(*runners)
    assert all(later > earlier for earlier, later in itertools.pairwise(marks)), marks
    assert set(statuses) == {200}
    assert 'policy_gateway_reloads_total{result="failed"} 1.0' in metrics
    assert 'policy_gateway_reloads_total{result="ok"} 2.0' in metrics
    assert await gateway.stop() == 0


async def test_a_changed_policy_file_is_picked_up_when_watching(launch: Any, tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "rules.yaml").write_text(BASE)
    gateway = await launch("--policies", str(policies), "--watch-policies")
    async with aiohttp.ClientSession() as session:
        (policies / "rules.yaml").write_text(BASE + BANANA)
        for _ in range(100):
            if await _prompt(session, gateway, "a banana") == 403:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the changed file was not reloaded")


async def test_two_workers_serve_one_port_and_their_metrics_add_up(launch: Any) -> None:
    """Two processes answer on one port; /metrics on either counts every request of both."""
    gateway = await launch("--workers", "2")
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection each: spread by the kernel
    async with aiohttp.ClientSession(connector=connector) as session:
        statuses = await asyncio.gather(*(_prompt(session, gateway, f"prompt {i}") for i in range(200)))
        assert statuses == [200] * 200
        await asyncio.sleep(0.5)  # request.completed lines are written after the answers
        for _ in range(3):
            async with session.get(gateway.admin_url("/metrics")) as response:
                metrics = await response.text()
            assert 'policy_gateway_requests_total{route="prompt",status="200"} 200.0' in metrics
    assert await gateway.stop() == 0
    pids = {event["pid"] for event in gateway.events("request.completed")}
    assert len(pids) == 2


async def test_sigterm_finishes_requests_in_flight_and_flushes_usage(
    launch: Any, upstream: Any, clean_redis: RedisProcess
) -> None:
    """Twenty slow prompts in flight when SIGTERM arrives: all answered, all counted, exit 0."""

    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1.0)
        return web.json_response({"success": True, "message": "ok"})

    upstream[0].handler = slow
    gateway = await launch("--redis-url", clean_redis.url, "--workspace-header", "X-Workspace-Id")
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            async with session.post(
                gateway.url("/conversation/c1/prompt"),
                json={"prompt": "hello there"},
                headers={"X-Workspace-Id": "ws-drain"},
            ) as response:
                await response.read()
                return response.status

        requests = [asyncio.create_task(one()) for _ in range(20)]
        await asyncio.sleep(0.3)
        gateway.process.send_signal(signal.SIGTERM)
        statuses = await asyncio.gather(*requests)
    assert statuses == [200] * 20
    assert await gateway.stop() == 0
    store = RedisUsageStore(clean_redis.url)
    try:
        totals = await store.totals("ws-drain", Period.DAY, datetime.now(UTC))
    finally:
        await store.close()
    assert totals.requests == 20
