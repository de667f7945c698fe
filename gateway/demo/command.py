"""``gateway demo``: the gateway with the built-in pack in front of a stand-in backend, one process.

Both serve on one event loop: the stand-in (gateway.demo.backend) first, then the gateway as
``gateway serve`` runs it (gateway.app.run), with the in-memory usage store. Once the admin
port answers ``/readyz`` the commands to try are printed. SIGINT or SIGTERM stops the gateway
as it always stops (requests under way finish), then the stand-in; the exit status is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import replace

import aiohttp
from aiohttp import web

from gateway.app import run
from gateway.audit import configure_logging
from gateway.config import Settings
from gateway.demo.backend import build_backend_app
from gateway.demo.tour import tour
from gateway.policy import BUILTIN_POLICY_DIR, RuleSet, load_ruleset
from gateway.runtime import run_loop

HOST = "127.0.0.1"
# Seconds requests under way get to finish at a stop: the stand-in's longest answer takes about one.
SHUTDOWN_TIMEOUT = 5.0
_READY_POLL = 0.05


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError("must be a port number 1-65535")
    return port


def add_demo_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="the gateway and a stand-in backend in one process, with commands to try (Ctrl-C stops)",
    )
    demo.add_argument("--port", type=_port, default=8080, help="the gateway's public port (8080)")
    demo.add_argument("--admin-port", type=_port, default=9090, help="the gateway's admin port (9090)")
    demo.add_argument("--backend-port", type=_port, default=8000, help="the stand-in backend's port (8000)")
    demo.add_argument(
        "--log-format",
        choices=["console", "json"],
        default="console",
        help="the gateway's log lines: console (default, one readable line per event) or json, "
        "as `gateway serve` writes them",
    )
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    ports = (args.port, args.admin_port, args.backend_port)
    if len(set(ports)) < len(ports):
        print("gateway demo: --port, --admin-port and --backend-port must differ", file=sys.stderr)
        return 2
    settings = replace(
        Settings(),
        upstream=f"http://{HOST}:{args.backend_port}",
        port=args.port,
        admin_port=args.admin_port,
        log_format=args.log_format,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    ruleset = load_ruleset([BUILTIN_POLICY_DIR])
    configure_logging(settings.log_format)
    try:
        run_loop(serve_demo(settings, ruleset, args.backend_port))
    except OSError as exc:
        print(
            f"gateway demo: {exc}\nchoose free ports with --port, --admin-port and --backend-port",
            file=sys.stderr,
        )
        return 2
    return 0


async def serve_demo(settings: Settings, ruleset: RuleSet, backend_port: int) -> None:
    """Serve the stand-in and the gateway until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    # Until the gateway's own handlers are in place (gateway.app.run), a signal ends the start-up.
    early_stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, early_stop.set)
    backend = web.AppRunner(build_backend_app(), access_log=None, shutdown_timeout=1.0)
    await backend.setup()
    try:
        await web.TCPSite(backend, HOST, backend_port).start()
        gateway = asyncio.create_task(run(settings, ruleset))
        ready = asyncio.create_task(_ready(f"http://{HOST}:{settings.admin_port}/readyz"))
        stopping = asyncio.create_task(early_stop.wait())
        done, _ = await asyncio.wait({gateway, ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (ready, stopping):
            task.cancel()
        if gateway not in done and ready in done:
            ready.result()
            print(tour(settings.port, settings.admin_port, backend_port), flush=True)
        elif gateway not in done:
            gateway.cancel()
        try:
            await gateway
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # Only the start-up stopped early is swallowed, never a cancellation of this task.
            if current is not None and current.cancelling():
                raise
    finally:
        await backend.cleanup()


async def _ready(url: str) -> None:
    """Return once ``url`` answers 200: the admin port starts after the public one."""
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(_READY_POLL)
