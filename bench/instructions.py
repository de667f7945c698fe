"""Instructions per request, counted by callgrind: the quiet companion of http_load and ablation.

    .venv/bin/python bench/instructions.py [--seconds 20] [TARGET ...]

A target is ``bare`` (bench/bare_proxy.py), ``inspecting`` (bench/inspecting_proxy.py),
``floor`` (bench/floor_proxy.py), or a variant of bench/ablation.py (``full``, ``bookkeeping``,
``bookkeeping+decisions``, ...: the gateway with the pack and Redis, parts switched off).
Default: bare inspecting floor full bookkeeping bookkeeping+decisions.

Each target runs alone under ``valgrind --tool=callgrind`` (Debian: apt-get install valgrind)
with counting off; after a warm-up, counting is switched on while wrk sends the 1 KB prompt of
bench/http_load.py at 32 connections, and the report is the instructions the target executed
per request answered. Counts do not depend on what else the machine is doing, unlike the CPU
times of the other benchmarks; they still move by a few percent between runs, because how
many requests share a turn of the event loop changes the work per request. Under valgrind a
target serves about 100 requests a second, so this takes about 40 s a target.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import http_load as load

DEFAULT = ("bare", "inspecting", "floor", "full", "bookkeeping", "bookkeeping+decisions")
PROXIES = {"bare": "bare_proxy.py", "inspecting": "inspecting_proxy.py", "floor": "floor_proxy.py"}


def command(target: str, port: int, admin: int, upstream: str, redis_url: str) -> list[str]:
    if target in PROXIES:
        return [sys.executable, str(load.HERE / PROXIES[target]), str(port), upstream, redis_url]
    return [
        sys.executable, str(load.HERE / "ablation.py"), "--serve", target, "serve", "--upstream", upstream,
        "--port", str(port), "--admin-port", str(admin), "--redis-url", redis_url,
        "--workspace-header", load.WORKSPACE_HEADER,
    ]  # fmt: skip


def count(target: str, upstream: str, redis_url: str, script: Path, seconds: float, scratch: str) -> float:
    """Instructions per request of ``target`` under callgrind."""
    port, admin = load.free_port(), load.free_port()
    out = Path(scratch) / f"callgrind.{target}"
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         *command(target, port, admin, upstream, redis_url)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        health = (admin, "/healthz") if target not in PROXIES else (port, "/")
        load.wait_until_up(process, *health, target, seconds=300)  # valgrind starts slowly
        measured = load.Target(target, port, process)
        load.run_wrk(script, measured, 32, 1, 5)  # warm-up: connections, caches, the first Redis calls
        subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], capture_output=True, check=True)
        requests = load.run_wrk(script, measured, 32, 1, seconds)["requests"]
        subprocess.run(["callgrind_control", "-i", "off", str(process.pid)], capture_output=True, check=True)
        # The counts written now, not only as the process exits: a target still busy with the
        # queue valgrind left it may not exit in time, and a killed one writes nothing.
        subprocess.run(["callgrind_control", "-d", str(process.pid)], capture_output=True, check=True)
    finally:
        load.stop([process], timeout=300)
    totals = [
        int(line.split()[1])
        for path in Path(scratch).glob(f"{out.name}*")
        for line in path.read_text(errors="replace").splitlines()
        if line.startswith(("summary:", "totals:"))
    ]
    if not totals:
        raise SystemExit(f"callgrind wrote no totals for {target}")
    return max(totals) / requests


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("targets", nargs="*", default=list(DEFAULT))
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds counted per target (20)")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian: apt-get install valgrind wrk redis-server)")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        up, redis_port = load.free_port(), load.free_port()
        upstream_process = load.start([sys.executable, str(load.HERE / "upstream.py"), str(up)])
        redis = load.start(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"])
        processes += [upstream_process, redis]
        load.wait_for_redis(redis, redis_port)
        load.wait_until_up(upstream_process, up, "/", "upstream")
        upstream, redis_url = f"http://127.0.0.1:{up}", f"redis://127.0.0.1:{redis_port}/0"
        with tempfile.TemporaryDirectory(prefix="bench-instructions-") as scratch:
            script = Path(scratch) / "prompt.lua"
            script.write_text(
                load.LUA % {"body": load.BODY, "header": load.WORKSPACE_HEADER, "workspace": load.WORKSPACE}
            )
            counts: dict[str, float] = {}
            for target in args.targets:
                counts[target] = count(target, upstream, redis_url, script, args.seconds, scratch)
                print(f"{target}: {counts[target] / 1000:.0f} k instructions a request", file=sys.stderr)
        base = counts.get("bare")
        print("| target | k instructions/req | x bare |\n|---|---|---|")
        for target, per_request in counts.items():
            ratio = f"{per_request / base:.2f}" if base else "-"
            print(f"| {target} | {per_request / 1000:.0f} | {ratio} |")
    finally:
        load.stop(processes)


if __name__ == "__main__":
    main()
