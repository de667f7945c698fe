"""Time to the first content byte of a streamed answer: through the gateway, a bare proxy, or direct.

    .venv/bin/python bench/stream.py [--repeat 20] [--delay-ms 20] [--json]
        [--gateway-args="--stream-holdback 64"] [--gateway-cwd DIR] [--gateway-python PYTHON]

Starts on loopback, each as its own process: a backend stand-in that streams its answer as
OpenAI-style SSE chunks (bench/sse_upstream.py: ``data: {..."choices":[{"delta":{"content":
"..."}}]}``, ending with ``data: [DONE]``), the bare aiohttp pass-through proxy
(bench/bare_proxy.py, which forwards each chunk as it arrives and inspects nothing), and one
`gateway serve` with the built-in pack and the in-memory store. Then POSTs a prompt to
/conversation/{id}/prompt through each path in turn, for three answer texts streamed one event
every --delay-ms: ordinary prose (one word to an event), code (a few tokens to an event) and
text full of credential prefixes that are not credentials (``AKIA``, ``ghp_``, ``-----BEGIN
PUBLIC KEY-----``, ``postgres://user:``), which a precise hold-back must hold a while and then
let go. Every answer must arrive byte for byte as the backend sent it, or the run stops.

Per request, from the client's side: the first content byte (the arrival of the first byte of
the first event whose delta carries text: not the headers, not the role chunk), the lag of every
later content event (its arrival at the client less the time the backend wrote it; one monotonic
clock serves both processes), and the total time to the end of the stream. The first round is
a warm-up; then --repeat rounds, the paths taken in a different order each round, so that every
cell sees the same machine noise. Reports the median and p90 over requests of each figure, and
the first byte's median next to the bare proxy's, the issue's measure.

``--gateway-cwd DIR`` runs the gateway from another checkout (a git worktree, to measure the
code as it was): its cwd, and first on its PYTHONPATH. The run prints which gateway package
it loaded and at which revision.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
from latency import free_port, wait_until_up
from sse_upstream import TEXTS, events, pieces

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KINDS = tuple(TEXTS)
BODY = json.dumps({"prompt": "Summarise the design review notes for the team.", "model": "gpt-4o"}).encode()
HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


@dataclass
class Sample:
    first_ms: float  # request sent -> first byte of the first event carrying text
    lag_ms: float  # the largest lag of a later content event: arrival less the backend's write
    total_ms: float  # request sent -> end of the stream


@dataclass
class Target:
    name: str
    port: int
    samples: dict[str, list[Sample]] = field(default_factory=dict)


@dataclass
class Expected:
    """One kind's answer as the backend sends it, and where its events end in the body."""

    body: bytes
    ends: list[int]  # offset just past each event
    first_content: int  # index of the first event carrying text
    content: list[int]  # indexes of every event carrying text

    @classmethod
    def of(cls, kind: str) -> Expected:
        answer = events(kind)
        ends, offset = [], 0
        for event, _ in answer:
            offset += len(event)
            ends.append(offset)
        content = [index for index, (_, text) in enumerate(answer) if text]
        return cls(b"".join(event for event, _ in answer), ends, content[0], content)


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_stream(
    session: aiohttp.ClientSession,
    target: Target,
    upstream: str,
    kind: str,
    stream_id: str,
    expected: Expected,
) -> Sample:
    url = f"http://127.0.0.1:{target.port}/conversation/{kind}-{stream_id}/prompt"
    received = bytearray()
    arrivals: list[int] = []  # bytes received so far, after each chunk
    times: list[float] = []  # and when that chunk arrived
    started = time.monotonic()
    async with session.post(url, data=BODY, headers=HEADERS) as response:
        while chunk := await response.content.readany():
            now = time.monotonic()
            received += chunk
            arrivals.append(len(received))
            times.append(now)
        ended = time.monotonic()
        status = response.status
    if status != 200 or bytes(received) != expected.body:
        at = next((i for i, (a, b) in enumerate(zip(received, expected.body, strict=False)) if a != b), None)
        raise SystemExit(
            f"{target.name}, {kind}: answered {status} with {len(received)} bytes, expected 200 and the "
            f"backend's {len(expected.body)} bytes (first difference at byte {at}): "
            f"{bytes(received[-300:])!r}"
        )
    async with session.get(f"{upstream}/times/{stream_id}") as answer:
        sent: list[float] = await answer.json()

    def arrival(offset: int) -> float:
        """When the byte at ``offset`` reached the client."""
        return times[bisect.bisect_right(arrivals, offset)]

    first = expected.first_content
    first_byte = expected.ends[first - 1] if first else 0
    lags = [arrival(expected.ends[i] - 1) - sent[i] for i in expected.content[1:]]
    return Sample(
        first_ms=(arrival(first_byte) - started) * 1000,
        lag_ms=max(lags) * 1000,
        total_ms=(ended - started) * 1000,
    )


async def measure(args: argparse.Namespace, targets: list[Target], upstream: str) -> None:
    expected = {kind: Expected.of(kind) for kind in KINDS}
    timeout = aiohttp.ClientTimeout(total=120)
    counter = 0
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        for round_index in range(1 + args.repeat):  # round 0: the warm-up, not counted
            if round_index:
                print(f"round {round_index}/{args.repeat} ...", file=sys.stderr, flush=True)
            for kind in KINDS:
                shift = round_index % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    counter += 1
                    sample = await one_stream(session, target, upstream, kind, str(counter), expected[kind])
                    if round_index:
                        target.samples.setdefault(kind, []).append(sample)


def rows(args: argparse.Namespace, targets: list[Target]) -> list[dict[str, object]]:
    median = statistics.median
    bare = next(target for target in targets if target.name == "bare proxy")
    table: list[dict[str, object]] = []
    for kind in KINDS:
        bare_first = median(s.first_ms for s in bare.samples[kind])
        bare_lag = median(s.lag_ms for s in bare.samples[kind])
        for target in targets:
            samples = target.samples[kind]
            first = [s.first_ms for s in samples]
            lag = [s.lag_ms for s in samples]
            total = [s.total_ms for s in samples]
            table.append(
                {
                    "path": target.name,
                    "text": kind,
                    "events": len(pieces(kind)),
                    "first_ms_p50": median(first),
                    "first_ms_p90": quantile(first, 0.9),
                    "first_ms_added_vs_bare": median(first) - bare_first,
                    "max_lag_ms_p50": median(lag),
                    "max_lag_ms_p90": quantile(lag, 0.9),
                    "max_lag_ms_added_vs_bare": median(lag) - bare_lag,
                    "total_ms_p50": median(total),
                    "total_ms_p90": quantile(total, 0.9),
                    "samples": [asdict(s) for s in samples],
                }
            )
    return table


def report(args: argparse.Namespace, table: list[dict[str, object]], provenance: str) -> None:
    print(
        f"{args.repeat} requests per cell after a warm-up round, paths interleaved; one event every "
        f"{args.delay_ms:g} ms; {os.cpu_count()} CPUs shared by every process\n{provenance}\n"
    )
    print(
        "| path | text | events | first byte ms p50 | p90 | + vs bare ms | max event lag ms p50 | p90 "
        "| total ms p50 | p90 |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for row in table:
        print(
            f"| {row['path']} | {row['text']} | {row['events']} | {row['first_ms_p50']:.1f} | "
            f"{row['first_ms_p90']:.1f} | {row['first_ms_added_vs_bare']:+.1f} | "
            f"{row['max_lag_ms_p50']:.1f} | {row['max_lag_ms_p90']:.1f} | "
            f"{row['total_ms_p50']:.0f} | {row['total_ms_p90']:.0f} |"
        )
    prose = next(row for row in table if row["path"] == "gateway" and row["text"] == "prose")
    added = float(str(prose["first_ms_added_vs_bare"]))
    lag = float(str(prose["max_lag_ms_added_vs_bare"]))
    print("\ntargets (gateway, prose):")
    print(
        f"  first content byte {added:+.1f} ms from the bare proxy's (median; target ≤ +20 ms): "
        f"{'met' if added <= 20 else 'MISSED'}"
    )
    print(
        f"  the most a later event waits beyond the bare proxy's: {lag:+.1f} ms (median over requests; "
        f"target ≤ one event's delay, {args.delay_ms:g} ms): {'met' if lag <= args.delay_ms else 'MISSED'}"
    )


def provenance(args: argparse.Namespace, env: dict[str, str]) -> str:
    """Which gateway package the gateway process loads, and its revision (dirty or not)."""
    where = subprocess.run(
        [args.gateway_python, "-c", "import gateway, os; print(os.path.dirname(gateway.__file__))"],
        cwd=args.gateway_cwd, env=env, capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    git = ["git", "-C", str(args.gateway_cwd)]

    def output(*command: str) -> str:
        return subprocess.run([*git, *command], capture_output=True, text=True, check=False).stdout

    revision, dirty = output("rev-parse", "--short=12", "HEAD"), output("status", "--porcelain", "gateway")
    state = "with uncommitted changes in gateway/" if dirty.strip() else "clean"
    return f"gateway: {where} at {revision.strip() or 'unknown revision'} ({state})"


def start(
    command: list[str], log: IO[bytes], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=cwd, env=env)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def run(args: argparse.Namespace) -> None:
    processes: list[subprocess.Popen[bytes]] = []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(args.gateway_cwd), os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryFile() as log:
        try:
            up_port, bare_port, port, admin = free_port(), free_port(), free_port(), free_port()
            upstream = f"http://127.0.0.1:{up_port}"
            processes.append(
                start([sys.executable, str(HERE / "sse_upstream.py"), str(up_port), str(args.delay_ms)], log)
            )
            processes.append(
                start([sys.executable, str(HERE / "bare_proxy.py"), str(bare_port), upstream], log)
            )
            gateway = start(
                [args.gateway_python, "-m", "gateway", "serve", "--upstream", upstream, "--port", str(port),
                 "--admin-port", str(admin), *shlex.split(args.gateway_args)],
                log, cwd=args.gateway_cwd, env=env,
            )  # fmt: skip
            processes.append(gateway)
            targets = [Target("direct", up_port), Target("bare proxy", bare_port), Target("gateway", port)]
            async with aiohttp.ClientSession() as session:
                await wait_until_up(session, f"{upstream}/", processes[0])
                await wait_until_up(session, f"http://127.0.0.1:{bare_port}/", processes[1])
                await wait_until_up(session, f"http://127.0.0.1:{admin}/healthz", gateway)
            await measure(args, targets, upstream)
        except BaseException:
            stop(processes)
            log.seek(0)
            sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
            raise
        stop(processes)
    table, source = rows(args, targets), provenance(args, env)
    if args.json:
        document = {"delay_ms": args.delay_ms, "repeat": args.repeat, "gateway": source, "rows": table}
        print(json.dumps(document, indent=2))
    else:
        report(args, table, source)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument(
        "--repeat", type=int, default=20, help="requests per path and text, after a warm-up (20)"
    )
    parser.add_argument("--delay-ms", type=float, default=20.0, help="ms between the backend's events (20)")
    parser.add_argument("--json", action="store_true", help="print the results, every request's too, as JSON")
    parser.add_argument(
        "--gateway-args",
        default="",
        help='more `gateway serve` flags, one string: --gateway-args="--stream-holdback 64"',
    )
    parser.add_argument(
        "--gateway-cwd",
        type=Path,
        default=ROOT,
        help="checkout the gateway runs from (its cwd, first on PYTHONPATH)",
    )
    parser.add_argument("--gateway-python", default=sys.executable, help="Python that runs the gateway")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
