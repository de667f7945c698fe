"""Where the gateway's CPU goes: the gateway with parts of its work switched off, side by side.

    .venv/bin/python bench/ablation.py [--rounds 4] [--seconds 4] [VARIANT ...]

A variant is ``full`` or parts joined by ``+``, from: ``bookkeeping`` (everything after the
answer: metrics, the request.completed line, token counts, the usage record), ``decisions``
(both policy evaluations and what makes them visible), ``usage`` (all of accounting: token
counts, the usage record and its write), ``log``, ``metrics``, ``redis`` (the usage write),
``tokens``. Default: full, bookkeeping, bookkeeping+decisions, log, metrics,
redis, tokens. Every gateway serves the built-in pack and counts usage in one redis-server; the
bare proxy (bench/bare_proxy.py) is measured in the same rounds. wrk sends the 1 KB prompt of
bench/http_load.py at 32 connections to each target in turn, for several rounds; the report is
the median CPU time each target spent per request, and its requests/s as a share of the bare
proxy's. A part switched off is replaced by a no-op in that process only (this file runs as
the gateway's entry point with ``--serve``): it measures, it is not a way to run the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import http_load as load

import gateway.answers
import gateway.app
import gateway.metrics
import gateway.observe
import gateway.routes
import gateway.usage.accounting
import gateway.usage.redis_store
import gateway.usage.tokens
from gateway.cli import main as gateway_main
from gateway.policy import Action, Decision

PARTS = ("bookkeeping", "decisions", "usage", "log", "metrics", "redis", "tokens")
DEFAULT = ("full", "bookkeeping", "bookkeeping+decisions", "log", "metrics", "redis", "tokens")


def switch_off(parts: set[str]) -> None:
    """Replace the named parts of the gateway's work by no-ops, in this process."""
    if "bookkeeping" in parts:
        gateway.app.completed = lambda finished: None  # type: ignore[assignment]
    if "decisions" in parts:
        # Every decision on a whole text goes through decide_first (the prompt and a whole answer)
        # or decide_with (answers' decide).
        def allow(state: Any, info: Any, stage: Any, text: Any, context: Any, where: Any = None) -> Decision:
            return Decision(stage, Action.ALLOW, "ablation")

        gateway.routes.decide_first = gateway.answers.decide_first = allow  # type: ignore[assignment]
        gateway.answers.decide_with = allow  # type: ignore[assignment]
    if "usage" in parts:

        def settle(self: Any, exchange: Any, completed: dict[str, Any]) -> None:
            exchange.ticket.release()
            self.observer.request_completed(completed)

        gateway.usage.accounting.Accountant.settle = settle  # type: ignore[method-assign]
    if "log" in parts:
        gateway.observe.Observer.request_completed = lambda self, fields: None  # type: ignore[method-assign]
    if "metrics" in parts:

        class Series:
            def inc(self, *_: Any) -> None: ...
            def observe(self, *_: Any) -> None: ...

        gateway.metrics.Metrics.child = lambda self, metric, *labels: Series()  # type: ignore[method-assign]
        gateway.metrics.Metrics.count = lambda self, *args: None  # type: ignore[method-assign]
    if "redis" in parts:

        def written(self: Any, records: Any, *, urgent: bool = False) -> Any:
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

        # Accounting hands each turn's records to submit(); record_many() goes through it too.
        gateway.usage.redis_store.RedisUsageStore.submit = written  # type: ignore[method-assign]
    if "tokens" in parts:
        gateway.usage.tokens.TokenCounter.count = lambda self, text, model=None: 1  # type: ignore[method-assign]


def serve(parts: str, argv: list[str]) -> None:
    switch_off(set(filter(None, parts.split("+"))) - {"full"})
    sys.argv = ["gateway", *argv]
    sys.exit(gateway_main())


def measure(args: argparse.Namespace) -> None:
    processes: list[subprocess.Popen[bytes]] = []
    try:
        up, redis_port = load.free_port(), load.free_port()
        upstream_process = load.start([sys.executable, str(load.HERE / "upstream.py"), str(up)])
        processes.append(upstream_process)
        processes.append(
            load.start(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"])
        )
        upstream = f"http://127.0.0.1:{up}"
        bare_port = load.free_port()
        bare = load.start([sys.executable, str(load.HERE / "bare_proxy.py"), str(bare_port), upstream])
        processes.append(bare)
        targets = [load.Target("bare aiohttp proxy", bare_port, bare)]
        for variant in args.variants:
            unknown = set(variant.split("+")) - {*PARTS, "full"}
            if unknown:
                raise SystemExit(f"unknown part(s) {sorted(unknown)}; known: full, {', '.join(PARTS)}")
            port, admin = load.free_port(), load.free_port()
            command = [
                sys.executable, __file__, "--serve", variant, "serve", "--upstream", upstream,
                "--port", str(port), "--admin-port", str(admin),
                "--redis-url", f"redis://127.0.0.1:{redis_port}/0",
                "--workspace-header", load.WORKSPACE_HEADER,
            ]  # fmt: skip
            process = load.start(command)
            processes.append(process)
            targets.append(load.Target(variant, port, process, admin_port=admin, is_gateway=True))
        load.wait_for_redis(processes[1], redis_port)
        load.wait_until_up(upstream_process, up, "/", "upstream")
        for target in targets:
            path = "/healthz" if target.admin_port else "/"
            load.wait_until_up(target.process, target.admin_port or target.port, path, target.name)
            load.check_answers(target)
        with tempfile.TemporaryDirectory(prefix="bench-ablation-") as scratch:
            script = Path(scratch) / "prompt.lua"
            script.write_text(
                load.LUA % {"body": load.BODY, "header": load.WORKSPACE_HEADER, "workspace": load.WORKSPACE}
            )
            for target in targets:
                load.run_wrk(script, target, 32, 2, 2)
            for round_index in range(args.rounds):
                print(f"round {round_index + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
                for target in targets:
                    before = load.cpu_seconds(target.process.pid)
                    result = load.run_wrk(script, target, 32, 2, args.seconds)
                    used = load.cpu_seconds(target.process.pid) - before
                    target.rps.setdefault(32, []).append(result["requests"] * 1e6 / result["duration_us"])
                    target.cpu.setdefault(32, []).append(used * 1e6 / result["requests"])
        bare_rps = statistics.median(targets[0].rps[32])
        print("| target | CPU µs/req | req/s | x bare |\n|---|---|---|---|")
        for target in targets:
            rps = statistics.median(target.rps[32])
            cpu = statistics.median(target.cpu[32])
            print(f"| {target.name} | {cpu:.0f} | {rps:,.0f} | {rps / bare_rps:.2f} |")
    finally:
        load.stop(processes)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variants", nargs="*", default=list(DEFAULT))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    if not args.variants:
        args.variants = list(DEFAULT)
    measure(args)


if __name__ == "__main__":
    main()
