"""``gateway serve --workers N``: a master that runs N worker processes on the same ports.

Workers bind with SO_REUSEPORT, so the kernel spreads connections over them. Metrics are
shared through prometheus-client's multiprocess directory, so ``/metrics`` on any worker shows
the sum over all. The master forwards SIGHUP (reload) and SIGTERM/SIGINT (drain and stop), and
restarts a worker that dies on its own.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

import structlog
from prometheus_client import multiprocess

from gateway.app import run
from gateway.audit import configure_logging
from gateway.config import Settings
from gateway.policy import BUILTIN_POLICY_DIR, load_ruleset
from gateway.reload import MASTER_PID
from gateway.runtime import run_loop

log = structlog.get_logger("gateway.workers")


def _worker(settings: Settings, log_format: str) -> None:
    # A spawned process imports prometheus-client afresh, with the multiprocess directory
    # already in its environment: that is what makes its metrics shared.
    configure_logging(log_format)
    ruleset = load_ruleset(settings.policies or [BUILTIN_POLICY_DIR])
    run_loop(run(settings, ruleset, reuse_port=True))


def serve_workers(settings: Settings) -> int:
    directory = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    os.environ[MASTER_PID] = str(os.getpid())
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> BaseProcess:
        process = context.Process(target=_worker, args=(settings, settings.log_format), daemon=False)
        process.start()
        return process

    def forward(signum: int, _: Any) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for process in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    workers = [start() for _ in range(settings.workers)]
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    log.info("gateway.workers", count=settings.workers, pids=[p.pid for p in workers])
    try:
        while not stopping:
            time.sleep(0.2)
            for index, process in enumerate(workers):
                if not process.is_alive() and not stopping:
                    log.warning("gateway.worker_died", pid=process.pid, exitcode=process.exitcode)
                    if process.pid is not None:
                        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                    workers[index] = start()
        deadline = time.monotonic() + settings.shutdown_timeout + 10
        for process in workers:
            process.join(max(0.1, deadline - time.monotonic()))
        failed = [p.pid for p in workers if p.exitcode not in (0, None)]
        for process in workers:
            if process.is_alive():
                process.kill()
                failed.append(process.pid)
        return 1 if failed else 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
