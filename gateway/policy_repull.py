"""``serve`` pulling the platform's policies again, every ``policies_pull_interval`` seconds.

Each pull is ``gateway policies pull``'s (gateway.policy_pull): every answer validated whole, the
file replaced only by a document that loads. A changed file is reloaded as SIGHUP and
``POST /-/reload`` reload it, so a rule set that does not load with the other policy files is
refused there too and the old one keeps serving. A failed pull changes nothing: it is logged once
(no token, no policy text: the pull's messages hold neither) and counted.

With several workers one process pulls: the worker holding an exclusive lock on the directory
of the file (flock; the kernel drops it with the process, and another worker takes it at its next
turn). Its reload reaches the other workers through the master, as the endpoint's does.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import aiohttp
import structlog

from gateway.credentials import read_secret_file
from gateway.policy_pull import PullError, pull, write_policy_file
from gateway.reload import Reloader

log = structlog.get_logger("gateway.policy_repull")


class PolicyRepull:
    def __init__(self, reloader: Reloader) -> None:
        settings = reloader.state.settings
        if settings.policies_pull_interval is None or settings.policies_pull_out is None:
            raise ValueError("a pull needs policies_pull_interval and policies_pull_out")
        self.reloader = reloader
        self.settings = settings
        self.interval: float = settings.policies_pull_interval
        self.out: Path = settings.policies_pull_out
        self._lead: int | None = None  # the locked directory's descriptor, with several workers

    async def run(self) -> None:
        """Pull now, then every interval, until cancelled."""
        # Its own pool and no cookies: nothing of the platform's mixes with client traffic.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            try:
                while True:
                    if self._leads():
                        await self.pull_once(session)
                    await asyncio.sleep(self.interval)
            finally:
                if self._lead is not None:
                    os.close(self._lead)  # releases the lock
                    self._lead = None

    async def pull_once(self, session: aiohttp.ClientSession) -> str:
        """One pull, its file written and reloaded when it changed: ``ok``, ``unchanged`` or ``failed``."""
        settings = self.settings
        try:
            document = await pull(
                settings.platform_url or "",
                settings.platform_org or "",
                settings.platform_workspaces,
                settings.platform_repos,
                self._token(),
                session,
            )
            # Off the event loop: the new file is loaded into a rule set before it is renamed.
            loop = asyncio.get_running_loop()
            written = await loop.run_in_executor(None, write_policy_file, self.out, document)
        except PullError as exc:
            return self._failed(str(exc))
        except Exception as exc:  # the loop must outlive any one pull
            # By type only: an unforeseen message could quote anything.
            return self._failed(f"unexpected {type(exc).__name__}")
        if not written:
            return self._counted("unchanged")
        log.info("policy.pulled", out=str(self.out), policies=len(document.policies))
        result = await self.reloader.reload()
        if result.ok:
            self.reloader.tell_other_workers()
        return self._counted("ok")

    def _token(self) -> str:
        # Read again at each pull: a rotated token file (a Kubernetes Secret) needs no restart.
        if self.settings.platform_token_file is None:
            return self.settings.platform_token or ""
        try:
            return read_secret_file(self.settings.platform_token_file)
        except ValueError as exc:
            raise PullError(f"the token (platform_token_file) {exc}") from None

    def _failed(self, error: str) -> str:
        log.warning(
            "policy.pull_failed",
            error=error,
            out=str(self.out),
            serving=self.reloader.state.ruleset.revision,
        )
        return self._counted("failed")

    def _counted(self, result: str) -> str:
        self.reloader.state.observer.metrics.policy_pulls.labels(result).inc()
        return result

    def _leads(self) -> bool:
        """Whether this process pulls: always with one worker; with several, the lock's holder."""
        if self.settings.workers == 1 or self._lead is not None:
            return True
        try:
            fd = os.open(self.out.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return True  # the pull itself then fails, and says why
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lead = fd
        log.info("policy.pull_lead", out=str(self.out), pid=os.getpid())
        return True
