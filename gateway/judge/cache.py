"""The judge's verdict cache: a repeated text costs one model call, across every gateway instance.

An entry is keyed by the rule-set revision, the check (the judge rule's id) and a keyed
fingerprint of the text (HMAC-SHA256, ``gateway.audit.fingerprint``, with the gateway's
fingerprint key): the text itself is never stored, and without the key nobody can tell from the
cache which texts were judged. A new revision misses everything, so an edited rule is judged
afresh. An entry holds the verdict (violates, explanation) and the judge model's name.

Two layers: a bounded in-memory LRU with a TTL, and, when a Redis client is given, Redis,
shared by every instance. A lookup asks memory first and Redis for the rest, in one MGET; Redis
hits fill memory. A store fills memory, then writes Redis in one pipelined round trip.

Key schema (``pgw`` is ``key_prefix``): ``pgw:judge:{<fingerprint>}:<revision>:<check>``, the
revision and check percent-encoded; the fingerprint is a Redis Cluster hash tag, so every key of
one text shares a slot and one MGET serves a lookup on a cluster too. Values are compact JSON,
``{"v": violates, "x": explanation, "m": model}``, set with the TTL (``SET PX``).

Redis is an optimisation, never a dependency: a failure (refused, timeout, an error reply, a
malformed value) costs only the shared layer's answer, never the lookup or the store, and is told
to ``on_error`` with a bounded reason (``ERRORS``) for the fallbacks counter. Every call to Redis
is bounded by ``timeout``; after a failure Redis is left alone for ``retry_after`` seconds
(reason ``down``), so a hung Redis costs one timeout per ``retry_after``, not one per request.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import jsonlib
from gateway.audit import fingerprint

T = TypeVar("T")

# Why the shared layer gave no answer: the labels ``on_error`` is called with.
ERRORS = ("timeout", "unreachable", "error", "malformed", "down")


@dataclass(frozen=True, slots=True)
class CachedVerdict:
    """A judge's verdict on one text and rule. The explanation is as the model wrote it (it may
    quote the text): the caller redacts it before any sink, as for a fresh verdict."""

    violates: bool
    explanation: str
    model: str


@dataclass(slots=True)
class CacheStats:
    """Counts since the cache was made, by check: for the caller's metrics."""

    memory_hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    redis_errors: int = 0  # calls to ``on_error``


Entry = tuple[float, CachedVerdict]  # (expires at, on ``clock``; verdict)


class VerdictCache:
    """Verdicts of the judge by (revision, check, keyed fingerprint of the text).

    Only real verdicts belong here: the caller never stores the outcome of a judge error (an
    ``on_error`` fallback of a rule), which would make a text the judge never saw pass or block
    for ``ttl`` without being judged.

    ``key`` is the fingerprint key (the gateway's ``audit_key``, or its per-process random key);
    instances that share a Redis must share it to share entries. ``entries`` bounds memory,
    least recently used out first; ``ttl`` (seconds) bounds an entry's age in memory and in
    Redis. ``redis`` is best built with a short socket timeout and no retries of its own (as the
    usage store builds its client); ``timeout`` bounds each call anyway.
    """

    def __init__(
        self,
        key: bytes,
        *,
        redis: Redis | RedisCluster | None = None,
        entries: int = 10_000,
        ttl: float = 3600.0,
        timeout: float = 0.05,
        retry_after: float = 1.0,
        key_prefix: str = "pgw",
        on_error: Callable[[str], None] = lambda reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not key:
            raise ValueError("key must not be empty: fingerprints would be plain hashes of the text")
        if entries < 1:
            raise ValueError("entries must be at least 1")
        if ttl <= 0 or timeout <= 0 or retry_after < 0:
            raise ValueError("ttl and timeout must be positive, retry_after not negative")
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain '{' or '}': the fingerprint is the hash tag")
        self._key = key
        self._redis = redis
        self._entries = entries
        self._ttl = ttl
        self._ttl_ms = max(1, round(ttl * 1000))
        self._timeout = timeout
        self._retry_after = retry_after
        self._prefix = f"{key_prefix}:judge:"
        self._on_error = on_error
        self._clock = clock
        self._memory: OrderedDict[tuple[str, str, str], Entry] = OrderedDict()
        self._down_until = float("-inf")
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._memory)

    async def lookup(self, revision: str, text: str, keys: Sequence[str]) -> dict[str, CachedVerdict]:
        """The cached verdicts of ``text`` for the checks ``keys`` (only those found)."""
        if not keys:
            return {}
        digest = fingerprint(self._key, text)
        now = self._clock()
        hits: dict[str, CachedVerdict] = {}
        missing: list[str] = []
        for check in keys:
            verdict = self._recall((revision, check, digest), now)
            if verdict is None:
                missing.append(check)
            else:
                hits[check] = verdict
        self.stats.memory_hits += len(hits)
        if missing and self._redis is not None:
            found = await self._fetch(revision, digest, missing)
            for check, verdict in found.items():
                self._remember((revision, check, digest), verdict, now)
            hits.update(found)
            self.stats.redis_hits += len(found)
        self.stats.misses += len(keys) - len(hits)
        return hits

    async def store(self, revision: str, text: str, verdicts: Mapping[str, CachedVerdict]) -> None:
        """Keep real verdicts of ``text`` (never an error fallback), by check."""
        if not verdicts:
            return
        digest = fingerprint(self._key, text)
        now = self._clock()
        for check, verdict in verdicts.items():
            self._remember((revision, check, digest), verdict, now)
        if self._redis is not None:
            await self._write(revision, digest, verdicts)

    # -- memory ---------------------------------------------------------------------------------

    def _recall(self, key: tuple[str, str, str], now: float) -> CachedVerdict | None:
        entry = self._memory.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._memory[key]
            return None
        self._memory.move_to_end(key)
        return entry[1]

    def _remember(self, key: tuple[str, str, str], verdict: CachedVerdict, now: float) -> None:
        self._memory[key] = (now + self._ttl, verdict)
        self._memory.move_to_end(key)
        while len(self._memory) > self._entries:
            self._memory.popitem(last=False)

    # -- Redis ----------------------------------------------------------------------------------

    def _redis_key(self, revision: str, digest: str, check: str) -> str:
        return f"{self._prefix}{{{digest}}}:{quote(revision, safe='')}:{quote(check, safe='')}"

    async def _fetch(self, revision: str, digest: str, checks: list[str]) -> dict[str, CachedVerdict]:
        redis = self._available()
        if redis is None:
            return {}
        names = [self._redis_key(revision, digest, check) for check in checks]
        try:
            values = await self._call(lambda: redis.mget(names))
        except Exception as exc:  # any failure: no shared answer this time
            self._failed(exc)
            return {}
        found: dict[str, CachedVerdict] = {}
        malformed = False
        for check, value in zip(checks, values, strict=True):
            if value is None:
                continue
            verdict = _decoded(value)
            if verdict is None:
                malformed = True
            else:
                found[check] = verdict
        if malformed:
            self._report("malformed")
        return found

    async def _write(self, revision: str, digest: str, verdicts: Mapping[str, CachedVerdict]) -> None:
        redis = self._available()
        if redis is None:
            return
        values = [
            (self._redis_key(revision, digest, check), _encoded(verdict))
            for check, verdict in verdicts.items()
        ]

        def set_all() -> Awaitable[list[Any]]:
            pipe = redis.pipeline(transaction=False)
            for name, value in values:
                pipe.set(name, value, px=self._ttl_ms)
            return pipe.execute(raise_on_error=False)

        try:
            results = await self._call(set_all)
        except Exception as exc:
            self._failed(exc)
            return
        failure = next((result for result in results if isinstance(result, Exception)), None)
        if failure is not None:
            self._failed(failure)

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        async with asyncio.timeout(self._timeout):
            try:
                return await call()
            except RedisConnectionError:
                # A pooled connection that Redis closed (a restart) fails once and is replaced:
                # try again, within the same time (GET and SET are safe to repeat).
                return await call()

    def _available(self) -> Redis | RedisCluster | None:
        """The client, unless a recent failure says to leave Redis alone for now."""
        if self._clock() < self._down_until:
            self._report("down")
            return None
        return self._redis

    def _failed(self, exc: BaseException) -> None:
        self._down_until = self._clock() + self._retry_after
        if isinstance(exc, TimeoutError | RedisTimeoutError):
            self._report("timeout")
        elif isinstance(exc, RedisConnectionError | OSError):
            self._report("unreachable")
        else:
            self._report("error")

    def _report(self, reason: str) -> None:
        self.stats.redis_errors += 1
        self._on_error(reason)


def _encoded(verdict: CachedVerdict) -> bytes:
    return jsonlib.dumps({"v": verdict.violates, "x": verdict.explanation, "m": verdict.model})


def _decoded(value: Any) -> CachedVerdict | None:
    try:
        data = jsonlib.loads(value)
    except (ValueError, TypeError):
        return None
    if not isinstance(data, dict):
        return None
    violates, explanation, model = data.get("v"), data.get("x"), data.get("m")
    if not isinstance(violates, bool) or not isinstance(explanation, str) or not isinstance(model, str):
        return None
    return CachedVerdict(violates, explanation, model)
