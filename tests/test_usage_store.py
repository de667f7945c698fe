"""The usage stores: one contract for both, then Redis's key schema, round trips and outages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest
from redis.crc import key_slot

from gateway.usage.memory_store import MemoryUsageStore
from gateway.usage.redis_store import RedisUsageStore
from gateway.usage.store import Period, Source, StoreUnavailable, Totals, UsageRecord, UsageStore
from tests.redis_fixtures import RedisClusterProcesses, RedisProcess, free_port

DAY, MONTH = Period.DAY, Period.MONTH


def at(month: int, day: int, hour: int = 12, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=UTC)


def rec(
    id: str,
    workspace: str = "acme",
    conversation: str | None = "c1",
    prompt: int = 1,
    response: int = 1,
    source: Source = "reported",
    when: datetime | None = None,
) -> UsageRecord:
    return UsageRecord(id, workspace, conversation, prompt, response, source, when or at(2, 1))


async def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def timed(call: Awaitable[object]) -> float:
    started = time.monotonic()
    await call
    return time.monotonic() - started


@pytest.fixture(params=["memory", "redis"], ids=["in memory", "in Redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[UsageStore]:
    if request.param == "memory":
        usage: UsageStore = MemoryUsageStore()
    else:
        server: RedisProcess = request.getfixturevalue("clean_redis")
        usage = RedisUsageStore(server.url)
    await usage.start()
    yield usage
    await usage.close()


# -- the contract, for both stores ----------------------------------------------------------------

SEQUENCE = (
    rec("r1", "acme", "c1", 100, 20, "reported", at(1, 31, 23, 59, 59)),
    rec("r2", "acme", "c1", 50, 5, "estimated", at(2, 1, 0, 0, 0)),
    rec("r3", "acme", "c2", 7, 3, "reported", at(2, 1, 12)),
    rec("r4", "acme", None, 1, 1, "estimated", at(2, 28, 23)),
    rec("r5", "globex", "c1", 1000, 0, "reported", at(2, 1, 8)),
)


@pytest.mark.parametrize(
    ("workspace", "period", "when", "expected"),
    [
        pytest.param(
            "acme",
            DAY,
            at(1, 31, 0),
            Totals(100, 20, 1),
            id="the last second of a month counts on its last day",
        ),
        pytest.param(
            "acme", DAY, at(2, 1, 23), Totals(57, 8, 2), id="a day sums its records of both sources"
        ),
        pytest.param("acme", MONTH, at(1, 5), Totals(100, 20, 1), id="a month holds only its own days"),
        pytest.param(
            "acme",
            MONTH,
            at(2, 15),
            Totals(58, 9, 3),
            id="a month sums records with and without a conversation",
        ),
        pytest.param(
            "globex", MONTH, at(2, 15), Totals(1000, 0, 1), id="a workspace counts only its own records"
        ),
        pytest.param("acme", DAY, at(2, 2), Totals(), id="a day without records is zero"),
        pytest.param("nobody", MONTH, at(2, 15), Totals(), id="an unknown workspace is zero"),
    ],
)
async def test_totals(
    store: UsageStore, workspace: str, period: Period, when: datetime, expected: Totals
) -> None:
    """A bucket's totals are the exact sums of the records that fall in it."""
    for record in SEQUENCE:
        await store.record(record)
    assert await store.totals(workspace, period, when) == expected


@pytest.mark.parametrize(
    ("workspace", "conversation", "expected"),
    [
        pytest.param(
            "acme", "c1", Totals(150, 25, 2), id="a conversation sums its records across a month boundary"
        ),
        pytest.param("acme", "c2", Totals(7, 3, 1), id="conversations of one workspace are counted apart"),
        pytest.param(
            "globex",
            "c1",
            Totals(1000, 0, 1),
            id="the same conversation id in another workspace is another conversation",
        ),
        pytest.param("acme", "c9", Totals(), id="an unknown conversation is zero"),
        pytest.param("nobody", "c1", Totals(), id="a conversation of an unknown workspace is zero"),
    ],
)
async def test_conversation_totals(
    store: UsageStore, workspace: str, conversation: str, expected: Totals
) -> None:
    """A conversation's totals are the exact sums of its records, whatever their day."""
    for record in SEQUENCE:
        await store.record(record)
    assert await store.conversation_totals(workspace, conversation) == expected


@pytest.mark.parametrize(
    "when",
    [
        pytest.param(at(1, 31, 23, 59, 59), id="on the last day of a month"),
        pytest.param(at(2, 1, 0, 0, 0), id="at the first instant of a month"),
        pytest.param(at(2, 28, 23), id="on a day with a record without conversation"),
        pytest.param(at(3, 1), id="in a month without records"),
    ],
)
async def test_current_is_the_day_and_the_month(store: UsageStore, when: datetime) -> None:
    """``current`` answers what ``totals`` answers for the day and the month of the same moment."""
    for record in SEQUENCE:
        await store.record(record)
    expected = (await store.totals("acme", DAY, when), await store.totals("acme", MONTH, when))
    assert await store.current("acme", when) == expected


@pytest.mark.parametrize(
    ("ids", "copies", "concurrently", "requests"),
    [
        pytest.param(1, 2, False, 1, id="the same id written twice in a row counts once"),
        pytest.param(1, 20, True, 1, id="the same id written twenty times at once counts once"),
        pytest.param(3, 5, True, 3, id="three ids written five times each at once count three times"),
    ],
)
async def test_a_record_id_counts_once(
    store: UsageStore, ids: int, copies: int, concurrently: bool, requests: int
) -> None:
    """Writing a record id again, even concurrently, adds nothing to any total."""
    writes = [rec(f"id-{n}", prompt=10, response=2) for n in range(ids) for _ in range(copies)]
    if concurrently:
        await asyncio.gather(*(store.record(record) for record in writes))
    else:
        for record in writes:
            await store.record(record)
    expected = Totals(10 * requests, 2 * requests, requests)
    assert await store.current("acme", at(2, 1)) == (expected, expected)
    assert await store.conversation_totals("acme", "c1") == expected


async def test_records_written_together_count_as_written_apart(store: UsageStore) -> None:
    """One ``record_many`` of several workspaces, with a repeated id, gives the same totals."""
    await store.record_many([*SEQUENCE, SEQUENCE[1], SEQUENCE[4]])
    await store.record_many([])
    assert await store.current("acme", at(2, 1)) == (Totals(57, 8, 2), Totals(58, 9, 3))
    assert await store.conversation_totals("acme", "c1") == Totals(150, 25, 2)
    assert await store.totals("globex", MONTH, at(2, 15)) == Totals(1000, 0, 1)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(
            ("a:b", "c"), ("a", "b:c"), id="a colon in a workspace id does not reach into another workspace"
        ),
        pytest.param(("{a}", "c"), ("a", "c"), id="braces in a workspace id are part of the id"),
        pytest.param(
            ("a}:c:x", "c"),
            ("a", "x}:d:2026-02-01"),
            id="a workspace id cannot forge another workspace's keys",
        ),
        pytest.param(("a b", "c d"), ("a", "b"), id="spaces are part of the ids"),
        pytest.param(("a%3Ab", "c"), ("a:b", "c"), id="a percent-encoded id is not its decoded form"),
        pytest.param(("", "c"), ("%", "c"), id="the empty workspace id is not the id made of a percent sign"),
    ],
)
async def test_odd_ids_are_kept_apart(
    store: UsageStore, first: tuple[str, str], second: tuple[str, str]
) -> None:
    """Ids with braces, colons, spaces or percent signs never share totals with other ids."""
    await store.record(rec("one", first[0], first[1], prompt=3, response=0))
    await store.record(rec("two", second[0], second[1], prompt=0, response=5))
    for (workspace, conversation), expected in ((first, Totals(3, 0, 1)), (second, Totals(0, 5, 1))):
        assert await store.current(workspace, at(2, 1)) == (expected, expected)
        assert await store.conversation_totals(workspace, conversation) == expected


# -- the memory store -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "requests"),
    [
        pytest.param(7 * 86400, 1, id="an id written again within its retention counts once"),
        pytest.param(9 * 86400, 2, id="an id written again after its retention counts again"),
    ],
)
async def test_memory_store_remembers_ids_for_a_bounded_time(elapsed: float, requests: int) -> None:
    """The memory store forgets a record id once its retention has passed, so memory stays bounded."""
    now = [0.0]
    store = MemoryUsageStore(clock=lambda: now[0])
    await store.record(rec("r1"))
    now[0] = elapsed
    await store.record(rec("r1"))
    assert (await store.totals("acme", DAY, at(2, 1))).requests == requests


# -- the Redis store ------------------------------------------------------------------------------

ODD = "pgw:{we%7Bir%7Dd%3A%20ws}"
COUNTED = {"prompt": "3", "response": "4", "requests": "1"}


@pytest.mark.parametrize(
    ("key", "kind", "value", "ttl_days"),
    [
        pytest.param(f"{ODD}:d:2026-02-01", "hash", COUNTED, 400, id="the day is a hash kept 400 days"),
        pytest.param(f"{ODD}:m:2026-02", "hash", COUNTED, 760, id="the month is a hash kept 760 days"),
        pytest.param(
            f"{ODD}:c:conv%3A1", "hash", COUNTED, 400, id="the conversation is a hash kept 400 days"
        ),
        pytest.param(f"{ODD}:r:rec%2F1", "string", "1", 8, id="the record marker is kept 8 days"),
    ],
)
async def test_redis_key_schema(
    clean_redis: RedisProcess, key: str, kind: str, value: object, ttl_days: int
) -> None:
    """A record writes the documented keys, all in its workspace's hash tag, with their expiry."""
    store = RedisUsageStore(clean_redis.url)
    await store.record(rec("rec/1", "we{ir}d: ws", "conv:1", prompt=3, response=4))
    await store.close()
    with clean_redis.client() as client:
        keys = set(client.keys("*"))
        assert len(keys) == 4
        assert key in keys
        assert client.type(key) == kind
        assert (client.hgetall(key) if kind == "hash" else client.get(key)) == value
        assert ttl_days * 86400 - 60 < client.ttl(key) <= ttl_days * 86400
        assert {key_slot(name.encode()) for name in keys} == {key_slot(b"{we%7Bir%7Dd%3A%20ws}")}


async def test_a_record_is_one_command(clean_redis: RedisProcess) -> None:
    """Counting a record sends Redis a single command (EVALSHA), hence one round trip."""
    name = "usage-store-under-test"
    store = RedisUsageStore(f"{clean_redis.url}?client_name={name}")
    await store.record(rec("warm-up"))  # connects and loads the script
    mine = await commands_sent(clean_redis, name, store.record(rec("counted")))
    await store.close()
    assert mine == ["EVALSHA"]


async def test_replies_are_parsed_by_hiredis(clean_redis: RedisProcess) -> None:
    """The usage store's connections parse Redis's replies in C (hiredis, a declared
    dependency), not with redis-py's Python parser."""
    store = RedisUsageStore(clean_redis.url)
    await store.start()
    connection = await store._client.connection_pool.get_connection()  # type: ignore[union-attr]
    try:
        assert type(connection._parser).__name__ == "_AsyncHiredisParser"
    finally:
        await store._client.connection_pool.release(connection)  # type: ignore[union-attr]
        await store.close()


async def test_many_records_are_one_command_and_a_refused_one_costs_only_itself(
    clean_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Records written together go in one EVALSHA; a record Redis refuses (a key of the wrong
    type) is dropped and logged, and the others of its workspace and batch are counted."""
    name = "usage-store-batch"
    store = RedisUsageStore(f"{clean_redis.url}?client_name={name}")
    await store.record(rec("warm-up", conversation=None, when=at(3, 1)))
    batch = [
        rec("ok-1", "acme", "c1", 3, 1),
        rec("refused", "acme", "c1", 5, 5, when=at(2, 2)),
        rec("ok-2", "acme", None, 4, 1),
    ]
    with clean_redis.client() as client:
        client.set("pgw:{acme}:d:2026-02-02", "not a hash")
    mine = await commands_sent(clean_redis, name, store.record_many(batch))
    assert mine == ["EVALSHA"]
    assert (store.pending, store.dropped) == (0, 1)
    assert await store.totals("acme", DAY, at(2, 1)) == Totals(7, 2, 2)
    assert await store.conversation_totals("acme", "c1") == Totals(3, 1, 1)
    assert any("refused by Redis" in record.getMessage() for record in caplog.records)
    await store.close()


async def test_records_finishing_within_the_linger_share_one_write(clean_redis: RedisProcess) -> None:
    """Records that finish one after another, a little apart, reach Redis together."""
    name = "usage-store-linger"
    store = RedisUsageStore(f"{clean_redis.url}?client_name={name}", linger=0.05)
    await store.record(rec("warm-up", conversation=None, when=at(3, 1)))

    async def one_after_another() -> None:
        writes = []
        for n in range(10):
            writes.append(asyncio.ensure_future(store.record(rec(f"r{n}"))))
            await asyncio.sleep(0.002)
        await asyncio.gather(*writes)

    mine = await commands_sent(clean_redis, name, one_after_another())
    assert mine == ["EVALSHA"]
    assert await store.conversation_totals("acme", "c1") == Totals(10, 10, 10)
    await store.close()


async def test_an_urgent_record_cuts_the_linger_short(clean_redis: RedisProcess) -> None:
    """A record someone waits for (a quota near its end) goes at once, with those lingering."""
    store = RedisUsageStore(clean_redis.url, linger=2.0)
    await store.start()
    started = time.monotonic()
    lingering = asyncio.ensure_future(store.record(rec("lingering")))
    await asyncio.sleep(0.05)
    assert not lingering.done()
    await store.record_many([rec("urgent")], urgent=True)
    await lingering
    assert time.monotonic() - started < 1.0
    assert await store.conversation_totals("acme", "c1") == Totals(2, 2, 2)
    await store.close()


async def test_records_written_while_redis_is_stalled_are_flushed_when_it_resumes(
    persistent_redis: RedisProcess,
) -> None:
    """A stalled Redis costs a writer at most a timeout; its records are all counted, once, later."""
    store = RedisUsageStore(persistent_redis.url, timeout=0.25)
    await store.start()
    await store.record(rec("before"))
    persistent_redis.pause()
    try:
        durations = await asyncio.gather(*(timed(store.record(rec(f"stalled-{n}"))) for n in range(40)))
        durations += [await timed(store.record(rec(f"after-{n}"))) for n in range(20)]
        assert max(durations) < 1.5
        assert (store.pending, store.healthy) == (60, False)
        assert await timed(read_fails(store.totals("acme", DAY, at(2, 1)))) < 0.1
    finally:
        persistent_redis.resume()
    await wait_until(lambda: store.pending == 0)
    assert await store.totals("acme", DAY, at(2, 1)) == Totals(61, 61, 61)
    assert store.healthy
    await store.close()


async def test_a_redis_killed_mid_stream_and_restarted_loses_and_doubles_nothing(
    persistent_redis: RedisProcess,
) -> None:
    """Records sent around a crash and a restart, some applied but never acknowledged, count once each."""
    store = RedisUsageStore(persistent_redis.url, timeout=0.25)
    await store.start()

    async def stream(bursts: range) -> None:
        for burst in bursts:
            await asyncio.gather(
                *(store.record(rec(f"r-{burst}-{n}", prompt=n, response=1)) for n in range(8))
            )

    await stream(range(15))
    # A burst Redis applies but never acknowledges: sent while it is stopped, so the writes time
    # out and are buffered, then applied (and fsynced) when it resumes, just before it dies.
    persistent_redis.pause()
    await stream(range(15, 16))
    persistent_redis.resume()
    await asyncio.sleep(0.03)
    persistent_redis.kill()
    await stream(range(16, 30))
    assert await timed(read_fails(store.conversation_totals("acme", "c1"))) < 0.5
    restart = asyncio.create_task(asyncio.to_thread(persistent_redis.start))
    await stream(range(30, 50))
    await restart
    await wait_until(lambda: store.pending == 0)
    expected = Totals(50 * sum(range(8)), 400, 400)
    assert await store.current("acme", at(2, 1)) == (expected, expected)
    assert await store.conversation_totals("acme", "c1") == expected
    await store.close()


async def test_a_full_buffer_drops_and_counts_what_does_not_fit(
    persistent_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Past ``buffer_limit`` records are dropped, counted, and logged once; the buffered ones land."""
    persistent_redis.kill()
    store = RedisUsageStore(persistent_redis.url, timeout=0.25, buffer_limit=5)
    await store.start()
    with caplog.at_level(logging.WARNING, logger="gateway.usage"):
        for n in range(8):
            await store.record(rec(f"r{n}"))
        assert (store.pending, store.dropped) == (5, 3)
        await asyncio.to_thread(persistent_redis.start)
        await wait_until(lambda: store.pending == 0)
    assert await store.totals("acme", DAY, at(2, 1)) == Totals(5, 5, 5)
    messages = [record.getMessage() for record in caplog.records]
    assert sum("buffer full" in message for message in messages) == 1
    assert any("3 records were dropped" in message for message in messages)
    await store.close()


async def test_close_writes_what_is_buffered(persistent_redis: RedisProcess) -> None:
    """Records buffered while Redis was away are written by ``close`` once it is back."""
    persistent_redis.kill()
    store = RedisUsageStore(persistent_redis.url, timeout=0.25)
    await store.start()
    await store.record(rec("buffered"))
    await asyncio.to_thread(persistent_redis.start)
    await store.close()
    assert store.pending == 0
    with persistent_redis.client() as client:
        assert client.hgetall("pgw:{acme}:d:2026-02-01") == {"prompt": "1", "response": "1", "requests": "1"}


async def test_redis_cluster(redis_cluster: RedisClusterProcesses) -> None:
    """Through a Redis Cluster, each workspace's keys live on one node, and totals survive a stalled node."""
    store = RedisUsageStore(redis_cluster.url, timeout=0.25)
    await store.start()
    workspaces = ["a", "b{x}", "c:d", "e", "f", "g", "h", "i"]
    await asyncio.gather(
        *(store.record(rec(f"r{n % 2}", workspace)) for workspace in workspaces for n in range(3))
    )
    holders = {}
    for node in redis_cluster.nodes:
        with node.client() as client:
            holders.update({key.split(":")[1]: node for key in client.keys("*")})
    assert len(set(holders.values())) > 1
    stalled = holders["{a}"]
    stalled.pause()
    try:
        await asyncio.gather(*(store.record(rec("r2", workspace)) for workspace in workspaces))
        assert store.pending >= 1
    finally:
        stalled.resume()
    await wait_until(lambda: store.pending == 0)
    for workspace in workspaces:
        assert await store.current(workspace, at(2, 1)) == (Totals(3, 3, 3), Totals(3, 3, 3))
        assert await store.conversation_totals(workspace, "c1") == Totals(3, 3, 3)
    for node in redis_cluster.nodes:
        with node.client() as client:
            tags = {key.split(":")[1] for key in client.keys("*")}
        assert all(holders[tag] is node for tag in tags)
    await store.close()


async def test_reads_fail_fast_when_nothing_listens() -> None:
    """With no Redis listening, reads raise StoreUnavailable within about the timeout, then at once."""
    store = RedisUsageStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.25)
    assert await timed(read_fails(store.current("acme", at(2, 1)))) < 1.0
    assert await timed(read_fails(store.totals("acme", MONTH, at(2, 1)))) < 0.01
    assert not store.healthy
    await store.close()


async def commands_sent(server: RedisProcess, client_name: str, work: Awaitable[object]) -> list[str]:
    """The commands the client named ``client_name`` sent Redis while ``work`` ran."""
    with server.client() as client:
        client.config_set("slowlog-log-slower-than", 0)  # log every command, with its client
        client.slowlog_reset()
        try:
            await work
            entries = client.slowlog_get(128)
        finally:
            client.config_set("slowlog-log-slower-than", 10_000)
    return [
        _text(entry["command"]).split()[0] for entry in entries if _text(entry["client_name"]) == client_name
    ]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def read_fails(call: Awaitable[object]) -> None:
    with pytest.raises(StoreUnavailable):
        await call
