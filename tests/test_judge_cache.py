"""The judge's verdict cache: in memory, shared through a real redis-server, and Redis's failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.judge.cache import CachedVerdict, VerdictCache
from tests.redis_fixtures import RedisClusterProcesses, RedisProcess, free_port

KEY = b"fingerprint-key-0123456789abcdef"
TEXT = "ship BLUEFALCON on Friday, canary 7f3a9c"
REV = "rev-1"
CODENAME = CachedVerdict(violates=True, explanation="mentions the codename", model="judge-1")
FIGURES = CachedVerdict(violates=False, explanation="no figures", model="judge-1")
TIMEOUT = 0.05


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Errors(list[str]):
    def __call__(self, reason: str) -> None:
        self.append(reason)


def client_of(url: str, timeout: float = TIMEOUT) -> Redis:
    # As the gateway builds its clients: a short socket timeout and no retries by redis-py.
    return Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Redis]]:
    made: list[Redis] = []

    def make(url: str, timeout: float = TIMEOUT) -> Redis:
        made.append(client_of(url, timeout))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, to stop or pause without disturbing other tests."""
    server = RedisProcess(tmp_path, persistent=False)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.resume()
    server.kill()


def verdicts() -> dict[str, CachedVerdict]:
    return {"house.codename": CODENAME, "house.figures": FIGURES}


async def test_a_stored_verdict_is_a_memory_hit() -> None:
    """Verdicts stored for a text come back for the same revision, text and checks."""
    cache = VerdictCache(KEY)
    await cache.store(REV, TEXT, verdicts())
    hits = await cache.lookup(REV, TEXT, ["house.codename", "house.figures", "house.other"])
    assert hits == verdicts()
    assert (cache.stats.memory_hits, cache.stats.redis_hits, cache.stats.misses) == (2, 0, 1)


@pytest.mark.parametrize(
    ("revision", "text", "key"),
    [
        pytest.param("rev-2", TEXT, KEY, id="another revision misses"),
        pytest.param(REV, TEXT + " ", KEY, id="another text misses"),
        pytest.param(REV, TEXT.lower(), KEY, id="the text in other case misses"),
        pytest.param(REV, TEXT, b"another-fingerprint-key-00000000", id="another fingerprint key misses"),
    ],
)
async def test_a_different_identity_misses(
    clean_redis: RedisProcess, clients: Callable[..., Redis], revision: str, text: str, key: bytes
) -> None:
    """A lookup with another revision, text or fingerprint key finds nothing, in memory or Redis."""
    writer = VerdictCache(KEY, redis=clients(clean_redis.url))
    await writer.store(REV, TEXT, verdicts())
    reader = VerdictCache(key, redis=clients(clean_redis.url))
    assert await reader.lookup(revision, text, ["house.codename", "house.figures"]) == {}
    if key == KEY:
        assert await writer.lookup(revision, text, ["house.codename", "house.figures"]) == {}
    assert await reader.lookup(REV, TEXT, ["house.codename"]) == (
        {"house.codename": CODENAME} if key == KEY else {}
    )


async def test_a_verdict_stored_by_one_instance_is_a_hit_for_another(
    clean_redis: RedisProcess, clients: Callable[..., Redis]
) -> None:
    """Two gateway instances on one Redis: the second finds the first's verdicts, then keeps them."""
    first = VerdictCache(KEY, redis=clients(clean_redis.url))
    second = VerdictCache(KEY, redis=clients(clean_redis.url))
    await first.store(REV, TEXT, verdicts())
    assert await second.lookup(REV, TEXT, ["house.codename", "house.figures"]) == verdicts()
    assert (second.stats.memory_hits, second.stats.redis_hits, second.stats.misses) == (0, 2, 0)
    with clean_redis.client() as admin:
        admin.flushall()
    assert await second.lookup(REV, TEXT, ["house.codename", "house.figures"]) == verdicts()
    assert (second.stats.memory_hits, second.stats.redis_hits) == (2, 2)


async def test_memory_first_then_one_redis_round_trip_for_the_misses(
    clean_redis: RedisProcess, clients: Callable[..., Redis]
) -> None:
    """Memory answers what it holds; the rest is asked of Redis in one MGET."""
    first = VerdictCache(KEY, redis=clients(clean_redis.url))
    second = VerdictCache(KEY, redis=clients(clean_redis.url))
    await first.store(REV, TEXT, {"house.figures": FIGURES, "house.third": FIGURES})
    await second.store(REV, TEXT, {"house.codename": CODENAME})
    with clean_redis.client() as admin:
        admin.config_resetstat()
        hits = await second.lookup(REV, TEXT, ["house.codename", "house.figures", "house.third", "house.x"])
        stats = admin.info("commandstats")
    assert hits == {"house.codename": CODENAME, "house.figures": FIGURES, "house.third": FIGURES}
    assert (second.stats.memory_hits, second.stats.redis_hits, second.stats.misses) == (1, 2, 1)
    assert stats["cmdstat_mget"]["calls"] == 1
    assert "cmdstat_get" not in stats
    # A lookup that memory answers whole costs no round trip.
    with clean_redis.client() as admin:
        admin.config_resetstat()
        await second.lookup(REV, TEXT, ["house.codename", "house.figures"])
        assert "cmdstat_mget" not in admin.info("commandstats")


async def test_an_entry_expires_from_memory_after_its_ttl() -> None:
    clock = Clock()
    cache = VerdictCache(KEY, ttl=60.0, clock=clock)
    await cache.store(REV, TEXT, verdicts())
    clock.now += 59.0
    assert await cache.lookup(REV, TEXT, ["house.codename"]) == {"house.codename": CODENAME}
    clock.now += 2.0
    assert await cache.lookup(REV, TEXT, ["house.codename"]) == {}
    assert len(cache) == 1  # the expired entry went; its sibling goes when it is next looked up


async def test_a_redis_entry_carries_the_ttl(
    clean_redis: RedisProcess, clients: Callable[..., Redis]
) -> None:
    cache = VerdictCache(KEY, redis=clients(clean_redis.url), ttl=3600.0)
    await cache.store(REV, TEXT, verdicts())
    with clean_redis.client() as admin:
        keys = list(admin.scan_iter("*"))
        assert len(keys) == 2
        for key in keys:
            assert 3590_000 < admin.pttl(key) <= 3600_000


async def test_memory_holds_at_most_its_entries_least_recently_used_first_out() -> None:
    cache = VerdictCache(KEY, entries=2)
    for text in ("one", "two"):
        await cache.store(REV, text, {"house.codename": CODENAME})
    assert await cache.lookup(REV, "one", ["house.codename"])  # "one" is now the most recent
    await cache.store(REV, "three", {"house.codename": CODENAME})
    assert len(cache) == 2
    assert await cache.lookup(REV, "two", ["house.codename"]) == {}
    assert await cache.lookup(REV, "one", ["house.codename"]) == {"house.codename": CODENAME}
    assert await cache.lookup(REV, "three", ["house.codename"]) == {"house.codename": CODENAME}


async def test_redis_down_costs_only_the_shared_layer(clients: Callable[..., Redis]) -> None:
    """Redis refusing connections: memory still answers, nothing raises, each failure is reported."""
    errors = Errors()
    cache = VerdictCache(KEY, redis=clients(f"redis://127.0.0.1:{free_port()}/0"), on_error=errors)
    await cache.store(REV, TEXT, {"house.codename": CODENAME})
    assert errors == ["unreachable"]
    hits = await cache.lookup(REV, TEXT, ["house.codename", "house.figures"])
    assert hits == {"house.codename": CODENAME}
    assert errors == ["unreachable", "down"]  # within retry_after: Redis is not asked again
    assert cache.stats.redis_errors == 2


async def test_redis_stopped_then_back(own_redis: RedisProcess, clients: Callable[..., Redis]) -> None:
    """A Redis that goes away and comes back: misses and a report meanwhile, hits again after;
    a pooled connection the restart closed costs no failure."""
    errors = Errors()
    clock = Clock()
    cache = VerdictCache(KEY, redis=clients(own_redis.url), on_error=errors, retry_after=1.0, clock=clock)
    other = VerdictCache(KEY, redis=clients(own_redis.url), on_error=(other_errors := Errors()))
    await other.store(REV, TEXT, verdicts())
    own_redis.kill()
    assert await cache.lookup(REV, TEXT, ["house.codename"]) == {}
    assert errors == ["unreachable"]
    own_redis.start()
    await other.store(REV, TEXT, verdicts())  # on a connection the restart closed
    assert other_errors == []
    assert await cache.lookup(REV, TEXT, ["house.codename"]) == {}
    assert errors == ["unreachable", "down"]
    clock.now += 1.5
    assert await cache.lookup(REV, TEXT, ["house.codename"]) == {"house.codename": CODENAME}
    assert errors == ["unreachable", "down"]


async def test_a_hung_redis_costs_at_most_the_timeout(
    own_redis: RedisProcess, clients: Callable[..., Redis]
) -> None:
    """A SIGSTOPped Redis: the lookup and the store return after about the timeout, no later."""
    errors = Errors()
    clock = Clock()
    # A client whose own socket timeout is long: the cache's timeout alone bounds the wait.
    patient = clients(own_redis.url, 5.0)
    cache = VerdictCache(KEY, redis=patient, on_error=errors, timeout=TIMEOUT, retry_after=1.0, clock=clock)
    await cache.store(REV, "remembered", {"house.codename": CODENAME})
    other = VerdictCache(KEY, redis=clients(own_redis.url))
    await other.store(REV, TEXT, {"house.figures": FIGURES})
    own_redis.pause()
    try:
        started = time.monotonic()
        hits = await cache.lookup(REV, TEXT, ["house.codename", "house.figures"])
        lookup_took = time.monotonic() - started
        clock.now += 1.5
        started = time.monotonic()
        await cache.store(REV, "new", {"house.codename": CODENAME})
        store_took = time.monotonic() - started
        assert await cache.lookup(REV, "remembered", ["house.codename"]) == {"house.codename": CODENAME}
    finally:
        own_redis.resume()
    assert hits == {}
    assert lookup_took < 0.3, lookup_took
    assert store_took < 0.3, store_took
    assert errors == ["timeout", "timeout"]
    # Redis answers again: the connection cut off mid-call gives no stale reply to the next one.
    clock.now += 1.5
    assert await cache.lookup(REV, TEXT, ["house.codename", "house.figures"]) == {"house.figures": FIGURES}
    assert await other.lookup(REV, "new", ["house.codename"]) in ({}, {"house.codename": CODENAME})


async def test_a_malformed_redis_value_is_a_miss(
    clean_redis: RedisProcess, clients: Callable[..., Redis]
) -> None:
    errors = Errors()
    writer = VerdictCache(KEY, redis=clients(clean_redis.url))
    await writer.store(REV, TEXT, verdicts())
    with clean_redis.client() as admin:
        for key in admin.scan_iter("*"):
            admin.set(key, '{"v": "yes"}' if "codename" in key else "not json")
    reader = VerdictCache(KEY, redis=clients(clean_redis.url), on_error=(errors := Errors()))
    assert await reader.lookup(REV, TEXT, ["house.codename", "house.figures"]) == {}
    assert errors == ["malformed"]


async def test_redis_never_holds_the_text_or_the_fingerprint_key(
    clean_redis: RedisProcess, clients: Callable[..., Redis]
) -> None:
    """Keys name the revision, check and keyed fingerprint; values hold the verdict alone."""
    cache = VerdictCache(KEY, redis=clients(clean_redis.url))
    await cache.store(REV, TEXT, verdicts())
    await cache.store(REV, "BLUEFALCON", {"house.codename": CODENAME})
    with clean_redis.client() as admin:
        everything = {key: admin.get(key) for key in admin.scan_iter("*")}
    assert len(everything) == 3
    forbidden = [TEXT, "BLUEFALCON", "bluefalcon", "7f3a9c", KEY.decode(), KEY.hex()]
    for key, value in everything.items():
        assert key.startswith("pgw:judge:{")
        for secret in forbidden:
            assert secret not in key
            assert secret not in value
    values = sorted(everything.values())
    assert '{"v":true,"x":"mentions the codename","m":"judge-1"}' in values  # compact JSON


async def test_a_shared_cache_on_redis_cluster(redis_cluster: RedisClusterProcesses) -> None:
    """On a Redis Cluster every key of a text shares its slot: one MGET still answers them all."""
    url = redis_cluster.url.replace("redis+cluster://", "redis://")
    made = [RedisCluster.from_url(url, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)) for _ in range(2)]
    try:
        errors = Errors()
        first = VerdictCache(KEY, redis=made[0], on_error=errors, timeout=0.5)
        second = VerdictCache(KEY, redis=made[1], on_error=errors, timeout=0.5)
        await first.store(REV, TEXT, verdicts())
        assert await second.lookup(REV, TEXT, ["house.codename", "house.figures"]) == verdicts()
        assert errors == []
    finally:
        for client in made:
            await client.aclose()


def test_a_cache_refuses_an_empty_key_or_bounds() -> None:
    with pytest.raises(ValueError, match="key"):
        VerdictCache(b"")
    with pytest.raises(ValueError, match="entries"):
        VerdictCache(KEY, entries=0)
    with pytest.raises(ValueError, match="ttl"):
        VerdictCache(KEY, ttl=0)
    with pytest.raises(ValueError, match="key_prefix"):
        VerdictCache(KEY, key_prefix="pg{w}")


async def test_concurrent_lookups_share_nothing_but_answers() -> None:
    """Many lookups and stores at once on one instance: each gets its own text's verdicts."""
    cache = VerdictCache(KEY)

    async def one(index: int) -> dict[str, Any]:
        verdict = CachedVerdict(index % 2 == 0, f"verdict {index}", "judge-1")
        await cache.store(REV, f"text {index}", {"house.codename": verdict})
        return await cache.lookup(REV, f"text {index}", ["house.codename"])

    results = await asyncio.gather(*(one(index) for index in range(50)))
    for index, hits in enumerate(results):
        assert hits["house.codename"].explanation == f"verdict {index}"
