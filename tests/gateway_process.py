"""`gateway serve` as a process on free ports, its log in a file, ready once ``/healthz`` answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from tests.redis_fixtures import free_ports


class ServedProcess:
    def __init__(self, process: asyncio.subprocess.Process, port: int, admin: int, log: Path) -> None:
        self.process, self.port, self.admin, self.log = process, port, admin, log

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin}{path}"

    def log_events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        async with aiohttp.ClientSession() as session, session.get(self.admin_url("/metrics")) as got:
            text = await got.text()
        total = 0.0
        for line in text.splitlines():
            found = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if found is None or found[1] != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', found[2] or ""))
            if all(have.get(key) == value for key, value in labels.items()):
                total += float(found[3])
        return total

    async def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout=60)


Served = TypeVar("Served", bound=ServedProcess)


async def serve_process(
    kind: type[Served], upstream_url: str, log_dir: Path, *args: str, attempts: int = 150
) -> Served:
    """Start ``gateway serve`` in front of ``upstream_url``; return once it is healthy."""
    port, admin = free_ports(2)
    log = log_dir / f"gateway-{port}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--upstream", upstream_url,
            "--port", str(port), "--admin-port", str(admin), *args, stdout=out, stderr=out,
        )  # fmt: skip
    served = kind(process, port, admin, log)
    if await answers(served.admin_url("/healthz"), attempts):
        return served
    process.kill()
    await process.wait()
    raise AssertionError(f"gateway did not start:\n{log.read_text()}")


async def answers(url: str, attempts: int = 150) -> bool:
    """Whether ``url`` answers 200 within ``attempts`` tries, 0.1 s apart (a gateway starting)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(attempts):
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return True
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    return False


@contextlib.asynccontextmanager
async def served_processes(
    kind: type[Served],
    upstream_url: str,
    log_dir: Path,
    *fixed: str,
    attempts: int = 150,
    gently: bool = False,
) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """A starter of gateways (``fixed`` flags, then the caller's); each is stopped at the end:
    killed, or ``gently`` with SIGTERM first."""
    started: list[Served] = []

    async def start(*args: str) -> Served:
        served = await serve_process(kind, upstream_url, log_dir, *fixed, *args, attempts=attempts)
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            if served.process.returncode is not None:
                continue
            if gently:
                served.process.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(served.process.wait(), timeout=15)
            if served.process.returncode is None:
                served.process.kill()
                await served.process.wait()
