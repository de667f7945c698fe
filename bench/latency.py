"""Added latency of the gateway over a direct call: one connection, sequential 1 KB prompts.

    .venv/bin/python bench/latency.py [--requests 3000]

Starts bench/upstream.py, a redis-server, and two `gateway serve` processes (built-in pack;
one with the in-memory store, one counting usage in Redis) on loopback, then sends the same
1 KB prompt in turn to the upstream directly and through each gateway, over one kept-alive
connection each, so all paths see the same machine noise. Prints p50, p90 and p99 of each path
and what each gateway adds to the direct call's median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
# About 1 KB of ordinary prompt text (no rule of the pack matches it).
PROMPT = ("Summarise the design review notes and list the open questions for the team. " * 14)[:1000]
BODY = json.dumps({"prompt": PROMPT, "model": "gpt-4o"}).encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until_up(
    session: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait (20 s at most) until ``url`` answers; stop at once if ``process`` exits first."""
    for _ in range(400):
        if process is not None and process.poll() is not None:
            raise SystemExit(f"{url}: the process exited with status {process.returncode} before answering")
        try:
            async with session.get(url) as response:
                await response.read()
                return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def start_gateway(upstream: str, *extra: str) -> tuple[asyncio.subprocess.Process, int, int]:
    port, admin = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--upstream", upstream, "--port", str(port),
        "--admin-port", str(admin), "--workspace-header", "X-Workspace-Id", *extra,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return process, port, admin


async def measure(requests: int) -> dict[str, list[float]]:
    up_port, redis_port = free_port(), free_port()
    upstream = await asyncio.create_subprocess_exec(sys.executable, str(HERE / "upstream.py"), str(up_port))
    redis = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    upstream_url = f"http://127.0.0.1:{up_port}"
    memory, memory_port, memory_admin = await start_gateway(upstream_url)
    with_redis, redis_gw_port, redis_admin = await start_gateway(
        upstream_url, "--redis-url", f"redis://127.0.0.1:{redis_port}/0"
    )
    processes = [memory, with_redis, redis, upstream]
    targets = {
        "direct": f"{upstream_url}/conversation/c1/prompt",
        "gateway, memory store": f"http://127.0.0.1:{memory_port}/conversation/c1/prompt",
        "gateway, Redis store": f"http://127.0.0.1:{redis_gw_port}/conversation/c1/prompt",
    }
    samples: dict[str, list[float]] = {name: [] for name in targets}
    try:
        sessions = {name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for name in targets}
        await wait_until_up(sessions["direct"], f"{upstream_url}/")
        await wait_until_up(sessions["gateway, memory store"], f"http://127.0.0.1:{memory_admin}/healthz")
        await wait_until_up(sessions["gateway, Redis store"], f"http://127.0.0.1:{redis_admin}/healthz")
        headers = {"Content-Type": "application/json", "X-Workspace-Id": "bench"}
        for index in range(requests + 200):
            for name, url in targets.items():
                started = time.perf_counter()
                async with sessions[name].post(url, data=BODY, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise SystemExit(f"{name}: status {response.status}")
                if index >= 200:  # warm-up excluded
                    samples[name].append((time.perf_counter() - started) * 1000)
        for session in sessions.values():
            await session.close()
    finally:
        for process in processes:
            process.terminate()
            await process.wait()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    samples = asyncio.run(measure(args.requests))
    print(f"{args.requests} sequential 1 KB prompts per path, one connection, interleaved\n")
    print("| path | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|")
    for name, values in samples.items():
        print(
            f"| {name} | {statistics.median(values):.3f} | {quantile(values, 0.9):.3f} | "
            f"{quantile(values, 0.99):.3f} |"
        )
    direct = statistics.median(samples["direct"])
    print()
    for name in ("gateway, memory store", "gateway, Redis store"):
        added = statistics.median(samples[name]) - direct
        print(f"{name} adds {added:.3f} ms at p50 (built-in pack, both stages, usage counted)")


if __name__ == "__main__":
    main()
