"""Throughput and latency of the whole gateway under load, next to a bare aiohttp proxy.

    .venv/bin/python bench/http_load.py [--duration 8] [--rounds 3] [--quick] [--workers N]

Needs `wrk` (Debian: apt-get install wrk) and `redis-server` on the PATH. Starts on loopback,
each as its own process: the upstream stand-in (bench/upstream.py), a bare aiohttp pass-through
proxy (bench/bare_proxy.py: the limit of our stack), the same proxy reading and parsing both
bodies as any inspecting gateway must (bench/inspecting_proxy.py), that proxy plus only the
work the gateway may not skip, done the cheapest way (bench/floor_proxy.py), a redis-server, and three
`gateway serve` processes: (a) no rules (bench/empty_policies), (b) the built-in pack, (c) the
built-in pack counting usage in Redis (workspace from the X-Workspace-Id header, which every request sends).
Every target must answer the 1 KB prompt with 200 and the upstream's body before anything is
measured. Then wrk POSTs the prompt to /conversation/c1/prompt on each target, at 1 connection
(1 thread) and at 32 connections (2 threads), round-robin over the cells for several rounds
after a warm-up run of each target, so that every cell sees the same machine noise.

Reports the median over rounds of requests/s, p50 and p99 latency, and the CPU time the target
process spent per request, with the ratio of requests/s and the p50 difference to the bare
proxy; then the resident memory of each gateway process and the targets check.

On a 2-core machine wrk shares the cores with the processes it measures: at 32 connections the
proxy, the upstream and wrk compete for CPU, so the absolute numbers understate a dedicated
host; the ratios to the bare proxy, measured under the same conditions, are the point.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
EMPTY_POLICIES = HERE / "empty_policies"  # `policies: []`: the gateway's whole path, no rules
ROUTE = "/conversation/c1/prompt"
# About 1 KB of ordinary prose (no rule of the built-in pack matches it).
PROMPT = (
    "Summarise the design review notes from Tuesday and list the open questions for the team. "
    "The migration of the billing service to the new queue went well, although two consumers "
    "still read from the old topic and will need a small change before the end of the month. "
    "Please also draft a short paragraph for the release notes that explains the new retry "
    "behaviour in plain words, without naming internal systems, and suggest who should review "
    "it. Finally, point out anything in the plan that looks risky to you, such as the order of "
    "the database changes or the lack of a rollback step for the cache warm-up, and propose a "
    "simple way to test each of those steps on the staging cluster before we go ahead. Keep the "
    "answer short: a few bullet points for the questions and one paragraph for the notes, since "
    "the team will read it during the stand-up tomorrow morning and decide on the next steps. "
    "Thanks a lot for your help with this, and let me know if anything is unclear."
)[:1000]
BODY = json.dumps({"prompt": PROMPT, "model": "gpt-4o"})
UPSTREAM_ANSWER = b'{"success": true, "message": "Prompt received"}'
WORKSPACE_HEADER = "X-Workspace-Id"
WORKSPACE = "bench"
CONNECTIONS = ((1, 1), (32, 2))  # (connections, wrk threads)

LUA = """\
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["%(header)s"] = "%(workspace)s"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, '
    .. '"mean_us": %%.1f, "max_us": %%d, "status_errors": %%d, "connect_errors": %%d, '
    .. '"read_errors": %%d, "write_errors": %%d, "timeouts": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.status, e.connect, e.read, e.write,
    e.timeout))
end
"""


@dataclass
class Target:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    admin_port: int | None = None
    is_gateway: bool = False
    rps: dict[int, list[float]] = field(default_factory=dict)
    p50: dict[int, list[float]] = field(default_factory=dict)  # ms
    p99: dict[int, list[float]] = field(default_factory=dict)  # ms
    cpu: dict[int, list[float]] = field(default_factory=dict)  # µs of the target's CPU per request

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{ROUTE}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def request(port: int, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Content-Type": "application/json", WORKSPACE_HEADER: WORKSPACE}
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def wait_until_up(
    process: subprocess.Popen[bytes], port: int, path: str, name: str, seconds: float = 15
) -> None:
    for _ in range(int(seconds / 0.05)):
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with status {process.returncode} before answering")
        try:
            request(port, "GET", path)
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{name} did not come up on port {port}")


def wait_for_redis(process: subprocess.Popen[bytes], port: int) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise SystemExit(f"redis-server exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"redis-server did not come up on port {port}")


def check_answers(target: Target) -> None:
    """Fail loudly unless the target answers the benchmark's request as the upstream does."""
    status, body = request(target.port, "POST", ROUTE, BODY)
    if status != 200 or body != UPSTREAM_ANSWER:
        raise SystemExit(f"{target.name}: POST {ROUTE} answered {status} {body[:200]!r}, expected 200")


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (a gateway with workers forks them)."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                queue.extend(int(child) for child in children)
        except OSError:
            continue
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_wrk(script: Path, target: Target, connections: int, threads: int, seconds: float) -> dict[str, float]:
    command = [
        "wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
        "--timeout", "10s", "-s", str(script), target.url,
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("WRK_RESULT ")]
    if completed.returncode != 0 or not lines:
        raise SystemExit(f"wrk failed on {target.name}:\n{completed.stdout}\n{completed.stderr}")
    result: dict[str, float] = json.loads(lines[-1].removeprefix("WRK_RESULT "))
    if result["status_errors"] or result["requests"] == 0:
        raise SystemExit(f"{target.name} at {connections} connections: non-2xx answers: {result}")
    return result


def start(command: list[str], workers: int | None = None) -> subprocess.Popen[bytes]:
    """``workers``: processes of a bench proxy (BENCH_WORKERS; see bench/bare_proxy.py)."""
    env = None if workers is None else {**os.environ, "BENCH_WORKERS": str(workers)}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def gateway_supports_workers() -> bool:
    completed = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"], capture_output=True, text=True, check=False
    )
    return "--workers" in completed.stdout


def start_gateway(name: str, upstream: str, extra: list[str]) -> Target:
    port, admin = free_port(), free_port()
    process = start(
        [sys.executable, "-m", "gateway", "serve", "--upstream", upstream, "--port", str(port),
         "--admin-port", str(admin), *extra]
    )  # fmt: skip
    return Target(name, port, process, admin_port=admin, is_gateway=True)


def stop(processes: list[subprocess.Popen[bytes]], timeout: float = 10) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_targets(args: argparse.Namespace, processes: list[subprocess.Popen[bytes]]) -> list[Target]:
    """Start every process (each appended to ``processes`` at once, to be stopped whatever happens)
    and return the targets once each has answered the benchmark's request with 200."""
    workers: list[str] = []
    if args.workers is not None:
        if gateway_supports_workers():
            workers = ["--workers", str(args.workers)]
        else:
            print(f"note: `gateway serve` has no --workers option yet; --workers {args.workers} ignored\n")
    up_port, redis_port = free_port(), free_port()
    upstream_process = start([sys.executable, str(HERE / "upstream.py"), str(up_port)])
    processes.append(upstream_process)
    redis = start(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    )
    processes.append(redis)
    upstream_url = f"http://127.0.0.1:{up_port}"
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    bare_port, inspecting_port, floor_port = free_port(), free_port(), free_port()
    # With --workers, the proxies run as many processes as each gateway: like against like.
    bare = start([sys.executable, str(HERE / "bare_proxy.py"), str(bare_port), upstream_url], args.workers)
    processes.append(bare)
    inspecting = start(
        [sys.executable, str(HERE / "inspecting_proxy.py"), str(inspecting_port), upstream_url], args.workers
    )
    processes.append(inspecting)
    floor = start(
        [sys.executable, str(HERE / "floor_proxy.py"), str(floor_port), upstream_url, redis_url], args.workers
    )
    processes.append(floor)
    with_redis = ["--redis-url", redis_url, "--workspace-header", WORKSPACE_HEADER]
    targets = [
        Target("upstream (direct)", up_port, upstream_process),
        Target("bare aiohttp proxy", bare_port, bare),
        Target("inspecting proxy (reads, parses)", inspecting_port, inspecting),
        Target("floor (inspecting + required work)", floor_port, floor),
        start_gateway("gateway, no rules", upstream_url, ["--policies", str(EMPTY_POLICIES), *workers]),
        start_gateway("gateway, pack", upstream_url, workers),
        start_gateway("gateway, pack + Redis", upstream_url, [*with_redis, *workers]),
    ]
    processes.extend(target.process for target in targets if target.is_gateway)

    wait_for_redis(redis, redis_port)
    for target in targets:
        if target.admin_port is not None:
            wait_until_up(target.process, target.admin_port, "/healthz", target.name)
        else:
            wait_until_up(target.process, target.port, "/", target.name)
        check_answers(target)
    for target in targets[4:6]:
        assert target.admin_port is not None
        _, ready = request(target.admin_port, "GET", "/readyz")
        print(f"{target.name}: /readyz {ready.decode(errors='replace')}")
    return targets


def measure(args: argparse.Namespace, targets: list[Target]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-http-") as scratch:
        script = Path(scratch) / "prompt.lua"
        script.write_text(LUA % {"body": BODY, "header": WORKSPACE_HEADER, "workspace": WORKSPACE})
        for target in targets:  # warm-up: connections, caches, the DFA, the first Redis calls
            run_wrk(script, target, 32, 2, args.warmup)
        cells = [(target, connections, threads) for connections, threads in CONNECTIONS for target in targets]
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
            shift = round_index % len(cells)  # each round starts at a different cell
            for target, connections, threads in cells[shift:] + cells[:shift]:
                cpu_before = cpu_seconds(target.process.pid)
                result = run_wrk(script, target, connections, threads, args.duration)
                cpu_used = cpu_seconds(target.process.pid) - cpu_before
                seconds = result["duration_us"] / 1e6
                target.rps.setdefault(connections, []).append(result["requests"] / seconds)
                target.p50.setdefault(connections, []).append(result["p50_us"] / 1000)
                target.p99.setdefault(connections, []).append(result["p99_us"] / 1000)
                target.cpu.setdefault(connections, []).append(cpu_used * 1e6 / result["requests"])
                if result["connect_errors"] or result["read_errors"] or result["write_errors"]:
                    print(f"  {target.name} at {connections}: socket errors {result}", file=sys.stderr)

    gateway_c = targets[-1]
    assert gateway_c.admin_port is not None
    status, body = request(gateway_c.admin_port, "GET", f"/usage/{WORKSPACE}?period=day")
    recorded = json.loads(body).get("requests") if status == 200 else None
    if not recorded:
        raise SystemExit(f"gateway, pack + Redis recorded no usage in Redis: {status} {body[:200]!r}")
    print(f"usage recorded in Redis for workspace {WORKSPACE!r}: {recorded} requests\n")


def gateway_rss(targets: list[Target], heading: str) -> float:
    """Print the VmRSS of every process of every target; return the largest of a gateway worker."""
    print(f"\nresident memory {heading} (VmRSS):")
    worker_rss: list[float] = []
    for target in targets:
        pids = process_tree(target.process.pid)
        sizes = [rss_mb(pid) for pid in pids]
        if target.is_gateway:
            # With workers, the parent only supervises: a worker is every process below it.
            worker_rss.extend(sizes[1:] if len(sizes) > 1 else sizes)
        detail = ", ".join(f"pid {pid}: {size:.1f} MB" for pid, size in zip(pids, sizes, strict=True))
        print(f"  {target.name}: {detail}")
    return max(worker_rss)


def memory_report(targets: list[Target]) -> tuple[float, float]:
    """RSS after the runs (gpt-4o prompts only: one tokenizer encoding loaded), then after one
    gpt-4 prompt to each gateway, which loads the second encoding (cl100k) as traffic would."""
    after_runs = gateway_rss(targets, "after the runs, gpt-4o prompts only")
    gpt4 = json.dumps({"prompt": PROMPT, "model": "gpt-4"})
    for target in targets:
        if target.is_gateway:
            status, body = request(target.port, "POST", ROUTE, gpt4)
            if status != 200:
                raise SystemExit(f"{target.name}: gpt-4 prompt answered {status} {body[:200]!r}")
    time.sleep(0.5)
    return after_runs, gateway_rss(targets, "after one more prompt with model gpt-4")


def report(args: argparse.Namespace, targets: list[Target]) -> None:
    median = statistics.median
    bare = targets[1]
    print(
        f"POST {ROUTE}, {len(BODY)}-byte JSON prompt; wrk, {args.rounds} rounds x {args.duration:g} s "
        f"per cell, interleaved, medians over rounds; {os.cpu_count()} CPUs shared with wrk\n"
    )
    print(
        "| target | conns | req/s | x bare req/s | p50 ms | p50 - bare ms | p99 ms | target CPU µs/req |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for connections, _ in CONNECTIONS:
        for target in targets:
            rps, p50 = median(target.rps[connections]), median(target.p50[connections])
            ratio = rps / median(bare.rps[connections])
            added = p50 - median(bare.p50[connections])
            print(
                f"| {target.name} | {connections} | {rps:,.0f} | {ratio:.2f} | {p50:.3f} | {added:+.3f} | "
                f"{median(target.p99[connections]):.3f} | {median(target.cpu[connections]):.0f} |"
            )
    worst, worst_cl100k = memory_report(targets)

    gateway_c, floor = targets[-1], targets[3]
    keeps = median(gateway_c.rps[32]) / median(bare.rps[32])
    floor_keeps = median(floor.rps[32]) / median(bare.rps[32])
    adds = median(gateway_c.p50[1]) - median(bare.p50[1])
    print("\ntargets:")
    of_floor = median(gateway_c.rps[32]) / median(floor.rps[32])
    print(
        f"  gateway + pack + Redis keeps {of_floor:.2f} of the floor's requests/s at 32 connections "
        f"(issue 15 target ≥ 0.80): {'met' if of_floor >= 0.80 else 'MISSED'}, and {keeps:.2f} of the bare "
        f"proxy's (never below 0.45): {'met' if keeps >= 0.45 else 'MISSED'}; the floor keeps "
        f"{floor_keeps:.2f} of the bare proxy's"
    )
    print(
        f"  adds {adds:.3f} ms to the bare proxy's p50 at 1 connection (target ≤ 0.25 ms): "
        f"{'met' if adds <= 0.25 else 'MISSED'}"
    )
    print(
        f"  RSS per worker {worst:.1f} MB (target ≤ 150 MB): {'met' if worst <= 150 else 'MISSED'}; "
        f"{worst_cl100k:.1f} MB once a gpt-4 prompt has loaded the second encoding: "
        f"{'met' if worst_cl100k <= 150 else 'MISSED'}"
    )


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of each wrk run (8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every cell (3)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of the warm-up run per target (3)")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s runs, 1 s warm-up")
    parser.add_argument(
        "--workers",
        type=int,
        help="processes per gateway (gateway serve --workers) and per bench proxy (BENCH_WORKERS)",
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds, args.warmup = 3.0, 1, 1.0
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found on PATH (Debian: apt-get install {tool.split('-')[0]})")
    processes: list[subprocess.Popen[bytes]] = []
    load_before = os.getloadavg()[0]
    try:
        targets = start_targets(args, processes)
        measure(args, targets)
        report(args, targets)
        # Other work on the machine skews every cell; the interleaving spreads it, not removes it.
        print(f"\nload average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after the runs")
    finally:
        stop(processes)


if __name__ == "__main__":
    main()
