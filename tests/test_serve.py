"""`gateway serve` as a process: starts, answers, refuses bad policies and settings, stops."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.proxy_fixtures import start_upstream


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _gateway(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _wait_ready(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    for _ in range(100):
        try:
            async with session.get(url) as response:
                return dict(await response.json())
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.1)
    raise AssertionError("gateway did not become ready")


async def test_serve_allows_blocks_and_stops_on_sigterm(aiohttp_server: Any) -> None:
    """The process serves the built-in pack in front of an upstream and exits 0 on SIGTERM."""
    recorder, upstream = await start_upstream(aiohttp_server)
    port, admin = _free_port(), _free_port()
    process = await _gateway(
        "--upstream", str(upstream.make_url("/")), "--port", str(port), "--admin-port", str(admin)
    )
    try:
        async with aiohttp.ClientSession() as session:
            ready = await _wait_ready(session, f"http://127.0.0.1:{admin}/readyz")
            assert ready["ready"] is True
            url = f"http://127.0.0.1:{port}/conversation/c1/prompt"
            async with session.post(url, json={"prompt": "hello", "model": "m"}) as response:
                assert response.status == 200
            async with session.post(url, json={"prompt": "AKIAIOSFODNN7EXAMPLE"}) as response:
                assert response.status == 403
                assert (await response.json())["error_code"] == "POLICY_BLOCKED"
        assert len(recorder.received) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 0
    assert b"AKIAIOSFODNN7EXAMPLE" not in stderr


async def test_a_bad_policy_directory_stops_start_up(tmp_path: Path) -> None:
    """Start-up fails with exit 1 and the `gateway check` listing of every error."""
    (tmp_path / "p.yaml").write_text("policies:\n  - id: x.y\n    name: X\n")
    process = await _gateway("--policies", str(tmp_path), "--port", str(_free_port()))
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 1
    assert f"{tmp_path / 'p.yaml'}:2: x.y: missing 'action', 'match', 'severity'" in stderr.decode()


async def test_bad_settings_stop_start_up() -> None:
    process = await _gateway("--upstream", "not a url", "--port", "8080", "--admin-port", "8080")
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 2
    assert b"gateway: --upstream: must be an http:// or https:// URL" in stderr
    assert b"1 error(s): settings refused" in stderr
