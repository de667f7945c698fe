"""Reloading policies while serving: compiled beside the old set, swapped only when good.

A bad reload keeps the old rule set serving; it is logged, counted, and answered with every
error. Triggers: SIGHUP, ``POST /-/reload`` on the admin port, and (with ``watch_policies``)
a change to a policy file. With several workers, a worker that reloaded through the endpoint
asks the master to send SIGHUP to all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.heap import release_free_heap
from gateway.policy import BUILTIN_POLICY_DIR, PolicyError, load_ruleset
from gateway.policy.loader import policy_files
from gateway.state import GatewayState

log = structlog.get_logger("gateway.reload")
MASTER_PID = "GATEWAY_MASTER_PID"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    revision: str
    rules: int
    errors: tuple[str, ...] = ()
    changed: bool = False


class Reloader:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self._lock = asyncio.Lock()

    @property
    def paths(self) -> list[Path]:
        return list(self.state.settings.policies or [BUILTIN_POLICY_DIR])

    async def reload(self) -> ReloadResult:
        async with self._lock:
            old = self.state.ruleset
            try:
                # Compiled off the event loop: requests keep being served meanwhile.
                ruleset = await asyncio.get_running_loop().run_in_executor(None, load_ruleset, self.paths)
            except PolicyError as exc:
                errors = tuple(str(problem) for problem in exc.problems)
                self.state.observer.metrics.reloads.labels("failed").inc()
                log.error("policy.reload_failed", revision=old.revision, errors=list(errors))
                return ReloadResult(False, old.revision, len(old.rules), errors)
            self.state.swap_ruleset(ruleset)
            release_free_heap()  # what compiling the new set left free
            self.state.observer.metrics.reloads.labels("ok").inc()
            log.info(
                "policy.reloaded", previous=old.revision, revision=ruleset.revision, rules=len(ruleset.rules)
            )
            return ReloadResult(
                True, ruleset.revision, len(ruleset.rules), changed=ruleset.revision != old.revision
            )

    def tell_other_workers(self) -> None:
        master = os.environ.get(MASTER_PID)
        if master and master.isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(master), signal.SIGHUP)

    def fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        files, _ = policy_files(self.paths)
        return tuple(_stat(path) for path in files)

    async def watch(self, interval: float = 2.0) -> None:
        """Reload when a policy file appears, goes, or changes (polled: no extra dependency)."""
        seen = self.fingerprint()
        while True:
            await asyncio.sleep(interval)
            current = self.fingerprint()
            if current != seen:
                seen = current
                await self.reload()


def _stat(path: Path) -> tuple[str, int, int]:
    try:
        info = path.stat()
    except OSError:
        return (str(path), -1, -1)
    return (str(path), info.st_mtime_ns, info.st_size)
