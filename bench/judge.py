"""What judge rules cost a request: latency of the paths a judge rule can take, side by side.

    .venv/bin/python bench/judge.py [--requests 1000] [--model-delay-ms 50] [--warmup 50]

Needs `redis-server` on the PATH. Starts on loopback, each as its own process: the upstream
stand-in (bench/upstream.py), a redis-server, the tests' stand-in judge model
(tests/judge_fixtures.py, answering after --model-delay-ms; GET /calls counts its calls by the
model name each gateway asks for, so one stand-in tells the paths apart), and seven
`gateway serve` processes, all with the built-in pack and the workspace from X-Workspace-Id:

  1. baseline: the pack only, no judge configured (1b: the same, a second process, to show
     how far two identical gateways differ: the noise a "no change" is judged against);
  2. out of scope: the pack, the judge configured, and two block judge rules these requests are
     not in scope of (one scoped to another workspace, one gated by a keyword the prompt never
     holds): the model must not be called, and the request must not notice;
  3. alert: the pack and a bare `judge:` alert rule in scope: every prompt goes to the model,
     after the answer, so the request must not wait for it;
  4. block: the pack and a bare `judge:` block rule in scope, whose verdict is clean: every
     request waits for the model, and should pay its delay plus at most 1 ms;
  5. two gateways (5a, 5b) with that block rule, one redis-server and one GATEWAY_AUDIT_KEY:
     each prompt goes to 5a, then the same prompt to 5b, which should find 5a's verdict in Redis
     (one model call a prompt). These two also count usage in Redis (the others in memory).

Every judge rule is at stage `prompt` only (the stand-in backend's answer is the same text every
time, and would be judged once, then cached). Iteration i sends the same ~1 KB prompt (that of
bench/http_load.py) to every path, with i written into it, so every prompt is new to every
verdict cache (paths 3, 4 and 5a each make one model call a request); and the judge request a
gateway sends for it to the stand-in directly, to show what the model itself takes as a client
sees it. One kept-alive connection per target, sequential requests, the paths interleaved in
an order shuffled per iteration, so all see the same machine noise. Prints p50/p90/p99 per path,
the p50 difference to the baseline (with a 95% bootstrap interval over the iterations), the
model calls each path caused, and the targets of issue 16.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from http_load import PROMPT, ROUTE, UPSTREAM_ANSWER, WORKSPACE, WORKSPACE_HEADER
from latency import free_port, quantile, wait_until_up

from gateway.judge.client import Check, messages

HERE = Path(__file__).resolve().parent

WORD = "BLUEFALCON"  # what the judge rules forbid; the stand-in finds it in a text, or not
INSTRUCTION = f"Do not mention the unreleased project codename {WORD}."
AUDIT_KEY = "bench-judge-shared-fingerprint-key"
# "No measurable change": the p50 grows by at most this, or by the difference between two
# identical gateways (1 and 1b) if that is larger.
UNCHANGED_MS = 0.05
BLOCK_ALLOWANCE_MS = 1.0

OUT_OF_SCOPE = f"""\
policies:
  - id: bench.other-workspace
    name: Codename, another workspace's rule
    severity: high
    action: block
    stages: [prompt]
    scope: {{workspaces: [another-team]}}
    match: {{judge: "{INSTRUCTION}"}}
  - id: bench.gated
    name: Codename, judged only when the prompt names the project
    severity: high
    action: block
    stages: [prompt]
    match:
      all:
        - keywords: [bluefalcon, falcon project]
        - judge: "{INSTRUCTION}"
"""
IN_SCOPE = """\
policies:
  - id: bench.codename
    name: Codename
    severity: high
    action: {action}
    stages: [prompt]
    match: {{judge: "{instruction}"}}
"""


def body(index: int) -> bytes:
    """The benchmark's 1 KB prompt, made new by ``index`` (same length for every index)."""
    marker = f"Ref {index:07d}. "
    return json.dumps({"prompt": marker + PROMPT[len(marker) :], "model": "gpt-4o"}).encode()


def model_body(index: int) -> bytes:
    """The request a gateway sends the judge for ``body(index)``, under its own model name."""
    text = json.loads(body(index))["prompt"]
    # The gateway judges every string of the body, keys included, as one text; close enough.
    payload = {
        "model": "direct",
        "messages": messages(text, [Check("bench.codename", INSTRUCTION)], 32_000),
        "temperature": 0,
        "response_format": {"type": "json_object"},
    }
    return json.dumps(payload).encode()


# The rows of the table, by key: the gateways, then the model stand-in called directly.
ROWS = {
    "1": "1. pack only (baseline)",
    "1b": "1b. pack only, a second process (noise control)",
    "2": "2. + judge rules out of scope",
    "3": "3. + alert judge rule in scope",
    "4": "4. + block judge rule, clean verdict",
    "5a": "5a. block rule, shared Redis, first gateway",
    "5b": "5b. the same prompt, second gateway",
    "model": "model stand-in, called directly",
}


@dataclass
class Gateway:
    key: str
    model: str | None  # the --judge-model it asks the stand-in for; None: no judge
    process: asyncio.subprocess.Process
    port: int
    admin: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{ROUTE}"


@dataclass
class Run:
    samples: dict[str, list[float]] = field(default_factory=dict)  # ms per request, by row key
    calls: dict[str, int] = field(default_factory=dict)  # model calls by judge model name
    prompts: int = 0  # distinct prompts sent in the loop (warm-up included)
    cache: dict[str, dict[str, float]] = field(default_factory=dict)  # judge_cache_total by key


async def start_gateway(
    key: str, upstream: str, scratch: Path, extra: list[str], model: str | None, judge_url: str
) -> Gateway:
    port, admin = free_port(), free_port()
    judge = ["--judge-url", judge_url, "--judge-model", model] if model else []
    log = scratch / f"gateway-{key}.log"
    env = {**os.environ, "GATEWAY_AUDIT_KEY": AUDIT_KEY}  # 5a and 5b must share it: it keys the cache
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--upstream", upstream, "--port", str(port),
            "--admin-port", str(admin), "--workspace-header", WORKSPACE_HEADER, "--policies", "builtin",
            *extra, *judge, stdout=asyncio.subprocess.DEVNULL, stderr=stderr, env=env,
        )  # fmt: skip
    return Gateway(key, model, process, port, admin, log)


async def post(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", WORKSPACE_HEADER: WORKSPACE}
    async with session.post(url, data=data, headers=headers) as response:
        return response.status, await response.read()


async def model_calls(session: aiohttp.ClientSession, model_url: str) -> dict[str, int]:
    async with session.get(f"{model_url}/calls") as response:
        answer = await response.json()
    return {str(name): int(count) for name, count in answer["by_model"].items()}


async def judge_cache(session: aiohttp.ClientSession, gateway: Gateway) -> dict[str, float]:
    async with session.get(f"http://127.0.0.1:{gateway.admin}/metrics") as response:
        text = await response.text()
    found = {}
    for line in text.splitlines():
        if line.startswith("policy_gateway_judge_cache_total{"):
            label, value = line.split("}", 1)
            found[label.split('"')[1]] = float(value)
    return found


async def check_paths(session: aiohttp.ClientSession, gateways: list[Gateway]) -> None:
    """Fail loudly unless every gateway forwards the benchmark's prompt as the upstream answers it,
    and the judge rules are live: the codename is blocked where a block rule is in scope of it
    (on 2, the keyword gate lets it through to the judge)."""
    for gateway in gateways:
        status, answer = await post(session, gateway.url, body(0))
        if status != 200 or answer != UPSTREAM_ANSWER:
            raise SystemExit(f"{ROWS[gateway.key]}: answered {status} {answer[:200]!r}, expected 200")
    codename = json.dumps({"prompt": f"When does {WORD.lower()} ship?", "model": "gpt-4o"}).encode()
    expected = {"1": 200, "2": 403, "3": 200, "4": 403}
    for gateway in gateways:
        want = expected.get(gateway.key)
        if want is not None and (status := (await post(session, gateway.url, codename))[0]) != want:
            raise SystemExit(f"{ROWS[gateway.key]}: the codename prompt answered {status}, expected {want}")


async def start_all(
    args: argparse.Namespace, scratch: Path, processes: list[asyncio.subprocess.Process]
) -> tuple[list[Gateway], str, str]:
    """Start every process (each appended to ``processes`` at once, to be stopped whatever
    happens); return the gateways, the upstream's URL and the stand-in model's."""
    up_port, redis_port, model_port = free_port(), free_port(), free_port()
    upstream = [sys.executable, str(HERE / "upstream.py"), str(up_port)]
    model = [str(HERE.parent / "tests" / "judge_fixtures.py"), str(model_port)]
    redis = ["--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    delay = ["--delay", f"{args.model_delay_ms / 1000:g}"]
    processes.append(await asyncio.create_subprocess_exec(*upstream))
    processes.append(await asyncio.create_subprocess_exec(sys.executable, *model, *delay))
    quiet = asyncio.subprocess.DEVNULL
    processes.append(await asyncio.create_subprocess_exec("redis-server", *redis, stdout=quiet))
    for name, text in {
        "out-of-scope": OUT_OF_SCOPE,
        "alert": IN_SCOPE.format(action="alert", instruction=INSTRUCTION),
        "block": IN_SCOPE.format(action="block", instruction=INSTRUCTION),
    }.items():
        (scratch / name).mkdir()
        (scratch / name / "rules.yaml").write_text(text)
    shared = ["--policies", str(scratch / "block"), "--redis-url", f"redis://127.0.0.1:{redis_port}/0"]
    specs: list[tuple[str, list[str], str | None]] = [
        ("1", [], None),
        ("1b", [], None),
        ("2", ["--policies", str(scratch / "out-of-scope")], "out-of-scope"),
        ("3", ["--policies", str(scratch / "alert")], "alert"),
        ("4", ["--policies", str(scratch / "block")], "block"),
        ("5a", shared, "shared"),
        ("5b", shared, "shared"),
    ]
    upstream_url, model_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{model_port}"
    gateways = []
    for key, extra, judge_model in specs:
        gateways.append(
            await start_gateway(key, upstream_url, scratch, extra, judge_model, f"{model_url}/v1")
        )
        processes.append(gateways[-1].process)
    return gateways, upstream_url, model_url


async def interleave(args: argparse.Namespace, gateways: list[Gateway], model_url: str, run: Run) -> None:
    """The measured loop: iteration i sends prompt i to every path, in an order shuffled per
    iteration (a fixed order would always put the same path after the idle of a 50 ms call)."""
    targets = {g.key: g.url for g in gateways} | {"model": f"{model_url}/v1/chat/completions"}
    run.samples = {key: [] for key in targets}
    sessions = {key: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for key in targets}
    # 5b must find 5a's verdict: they go together, 5a first.
    units = [[key] for key in targets if key not in ("5a", "5b")] + [["5a", "5b"]]
    headers = {"Content-Type": "application/json", WORKSPACE_HEADER: WORKSPACE}
    shuffler = random.Random(16)
    total = args.warmup + args.requests
    started = time.monotonic()
    try:
        for index in range(1, total + 1):
            prompt, judge_request = body(index), model_body(index)
            shuffler.shuffle(units)
            for key in (key for unit in units for key in unit):
                data = judge_request if key == "model" else prompt
                clock = time.perf_counter()
                async with sessions[key].post(targets[key], data=data, headers=headers) as answer:
                    await answer.read()
                elapsed = (time.perf_counter() - clock) * 1000
                if answer.status != 200:
                    raise SystemExit(f"{ROWS[key]}: status {answer.status} at request {index}")
                if index > args.warmup:
                    run.samples[key].append(elapsed)
            if index % 200 == 0:
                rate = index / (time.monotonic() - started)
                print(f"  {index}/{total} iterations ({rate:.1f}/s)", file=sys.stderr, flush=True)
    finally:
        for session in sessions.values():
            await session.close()
    run.prompts = total


async def measure(args: argparse.Namespace, scratch: Path) -> Run:
    processes: list[asyncio.subprocess.Process] = []
    run = Run()
    try:
        gateways, upstream_url, model_url = await start_all(args, scratch, processes)
        async with aiohttp.ClientSession() as control:
            await wait_until_up(control, f"{upstream_url}/")
            await wait_until_up(control, f"{model_url}/calls")
            for gateway in gateways:
                try:
                    await wait_until_up(control, f"http://127.0.0.1:{gateway.admin}/healthz")
                except SystemExit:
                    log = gateway.log.read_text()[-2000:]
                    raise SystemExit(f"{ROWS[gateway.key]} did not come up:\n{log}") from None
            await check_paths(control, gateways)
            before = await model_calls(control, model_url)
            await interleave(args, gateways, model_url, run)
            # Alert verdicts arrive after their answers: wait until the last ones are in.
            for _ in range(100):
                after = await model_calls(control, model_url)
                if after.get("alert", 0) - before.get("alert", 0) >= run.prompts:
                    break
                await asyncio.sleep(0.05)
            run.calls = {name: after.get(name, 0) - before.get(name, 0) for name in after}
            run.cache = {g.key: await judge_cache(control, g) for g in gateways if g.key in ("4", "5b")}
        return run
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


def p50_interval(values: list[float], base: list[float], draws: int = 1000) -> tuple[float, float]:
    """95% bootstrap interval of p50(values) - p50(base), resampling iterations (paired)."""
    chooser = random.Random(16)
    count = len(values)
    differences = []
    for _ in range(draws):
        picks = [chooser.randrange(count) for _ in range(count)]
        differences.append(
            statistics.median(values[i] for i in picks) - statistics.median(base[i] for i in picks)
        )
    differences.sort()
    return differences[int(0.025 * draws)], differences[int(0.975 * draws)]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(args: argparse.Namespace, run: Run) -> None:
    base = run.samples["1"]
    p50 = {key: statistics.median(values) for key, values in run.samples.items()}
    delta = {key: p50[key] - p50["1"] for key in run.samples}
    calls = {
        "2": "out-of-scope",
        "3": "alert",
        "4": "block",
        "5a": "shared",
        "5b": "shared",
        "model": "direct",
    }
    print(
        f"\nPOST {ROUTE}, ~1 KB JSON prompt (new text every iteration), {args.requests} requests per path "
        f"after {args.warmup} warm-up, one kept-alive connection each, sequential, interleaved (order "
        f"shuffled per iteration); stand-in model answers after {args.model_delay_ms:g} ms; "
        f"{os.cpu_count()} CPUs shared\n"
    )
    print(
        "| path | p50 ms | p90 ms | p99 ms | p50 - baseline ms (95% CI) | model calls |\n"
        "|---|---|---|---|---|---|"
    )
    for key, values in run.samples.items():
        shown, called = "-", "- (no judge)"
        if key != "1":
            low, high = p50_interval(values, base)
            shown = f"{delta[key]:+.3f} ({low:+.3f} to {high:+.3f})"
        if key in calls:
            called = f"{run.calls.get(calls[key], 0)} for {run.prompts} prompts"
            called += " (5a and 5b together)" if key in ("5a", "5b") else ""
        print(
            f"| {ROWS[key]} | {p50[key]:.3f} | {quantile(values, 0.9):.3f} | {quantile(values, 0.99):.3f} | "
            f"{shown} | {called} |"
        )
    block, second = run.cache.get("4", {}), run.cache.get("5b", {})
    print(
        f"\njudge_cache_total on 4: memory {block.get('memory', 0):.0f}, miss {block.get('miss', 0):.0f} "
        f"(the verdict cache never answered: every prompt new); on 5b: redis {second.get('redis', 0):.0f}, "
        f"memory {second.get('memory', 0):.0f}, miss {second.get('miss', 0):.0f}"
    )

    # "No measurable change": within the noise between two identical gateways (1b), or 0.05 ms.
    noise = max(UNCHANGED_MS, abs(delta["1b"]))
    out_of_scope, alert = run.calls.get("out-of-scope", 0), run.calls.get("alert", 0)
    over_delay = delta["4"] - args.model_delay_ms
    over_model = delta["4"] - p50["model"]
    shared = run.calls.get("shared", 0)
    print(f"\ntargets (issue 16); noise: two identical gateways differ by {delta['1b']:+.3f} ms at p50")
    print(
        f"  no judge rule in scope: p50 {delta['2']:+.3f} ms vs baseline (target: no measurable change, "
        f"≤ +{noise:.3f} ms), model calls {out_of_scope} (target 0): "
        f"{verdict(delta['2'] <= noise and out_of_scope == 0)}"
    )
    print(
        f"  alert judge rule in scope: p50 {delta['3']:+.3f} ms vs baseline (target: unchanged, "
        f"≤ +{noise:.3f} ms), the model judged {alert} of {run.prompts} prompts after their answers: "
        f"{verdict(delta['3'] <= noise and alert == run.prompts)}"
    )
    print(
        f"  block judge rule, clean verdict: p50 {delta['4']:+.3f} ms vs baseline = the model's delay "
        f"{args.model_delay_ms:g} ms {over_delay:+.3f} ms (target ≤ +{BLOCK_ALLOWANCE_MS:g} ms): "
        f"{verdict(over_delay <= BLOCK_ALLOWANCE_MS)}; = the stand-in's own p50 as a client sees it "
        f"({p50['model']:.3f} ms) {over_model:+.3f} ms: {verdict(over_model <= BLOCK_ALLOWANCE_MS)}"
    )
    print(
        f"  the same prompt to two gateways sharing one Redis: {shared} model calls for {run.prompts} "
        f"prompts, {shared / run.prompts:.2f} a prompt (target 1): {verdict(shared == run.prompts)}"
    )


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per path (1000)")
    parser.add_argument("--warmup", type=int, default=50, help="iterations before measuring (50)")
    parser.add_argument("--model-delay-ms", type=float, default=50.0, help="the model's answer time (50)")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server not found on PATH (Debian: apt-get install redis-server)")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-judge-") as scratch:
        run = asyncio.run(measure(args, Path(scratch)))
    report(args, run)
    print(f"\nload average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after the runs")


if __name__ == "__main__":
    main()
