"""The usage journal: records a stopping gateway could not write to Redis survive to the next start."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config import ConfigError, load_settings
from gateway.usage.journal import UsageJournal
from gateway.usage.redis_store import RedisUsageStore
from gateway.usage.store import Period, Totals, UsageRecord
from tests.gateway_process import ServedProcess, served_processes
from tests.proxy_fixtures import start_upstream
from tests.redis_fixtures import RedisProcess

TOKENS_IN, TOKENS_OUT = 12, 8
NOW = datetime.now(UTC)


def _records(count: int, *, start: int = 0, workspace: str = "ws-j") -> list[UsageRecord]:
    return [
        UsageRecord(
            id=f"r-{index}",
            workspace=workspace,
            conversation_id=None if index % 3 == 0 else f"c-{index % 2}",
            prompt_tokens=3 + index,
            response_tokens=2,
            source="reported" if index % 2 else "estimated",
            at=NOW - timedelta(seconds=index),
        )
        for index in range(start, start + count)
    ]


def _journal(tmp_path: Path, *, pid: int = 4242, limit: int = 1000) -> UsageJournal:
    return UsageJournal(tmp_path / "usage.journal", limit=limit, pid=pid)


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "gateway.usage" and r.levelno >= logging.ERROR
    ]


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.usage"]


# -- the journal file ---------------------------------------------------------------------------


def test_a_journal_holds_its_records_as_written_readable_by_its_owner_only(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    records = _records(5)
    assert journal.write(records) == 5
    assert journal.own == tmp_path / "usage.journal.4242"
    assert stat.S_IMODE(journal.own.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usage.journal.4242"]
    replay = _journal(tmp_path, pid=1).read()
    assert list(replay.records) == records
    assert replay.files == (journal.own,)


def test_a_failed_write_leaves_the_previous_journal_whole(tmp_path: Path, monkeypatch: Any) -> None:
    """Written to a temporary file, fsynced, then renamed: a failure before the rename changes nothing."""
    journal = _journal(tmp_path)
    journal.write(_records(2))

    def fail(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        journal.write(_records(7, start=10))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["usage.journal.4242"]
    assert list(_journal(tmp_path, pid=1).read().records) == _records(2)


def test_a_temporary_file_left_by_a_crash_is_not_replayed(tmp_path: Path) -> None:
    (tmp_path / "usage.journal.77.tmp").write_text('{"half": ')
    journal = _journal(tmp_path)
    journal.write(_records(1))
    replay = _journal(tmp_path, pid=1).read()
    assert replay.files == (journal.own,)
    assert (tmp_path / "usage.journal.77.tmp").exists()


def test_a_journal_keeps_at_most_its_cap_the_oldest_records_first(tmp_path: Path) -> None:
    journal = _journal(tmp_path, limit=4)
    records = _records(10)
    assert journal.write(records) == 4
    assert list(journal.read().records) == records[:4]


def test_every_process_file_is_replayed_and_a_record_in_two_files_once(tmp_path: Path) -> None:
    """One file per worker process; a record in two of them (a crash between a write and a
    removal) is read once."""
    _journal(tmp_path, pid=11).write(_records(3))
    _journal(tmp_path, pid=12).write(_records(3, start=2))
    (tmp_path / "other.journal.13").write_text("not ours")
    replay = _journal(tmp_path, pid=99).read()
    assert sorted(record.id for record in replay.records) == ["r-0", "r-1", "r-2", "r-3", "r-4"]
    assert [p.name for p in replay.files] == ["usage.journal.11", "usage.journal.12"]


def _header(count: int) -> str:
    return json.dumps({"journal": "policy-gateway usage records", "version": 1, "records": count})


def _line(record: UsageRecord, **changes: Any) -> str:
    fields = {
        "id": record.id,
        "workspace": record.workspace,
        "conversation": record.conversation_id,
        "prompt": record.prompt_tokens,
        "response": record.response_tokens,
        "source": record.source,
        "at": record.at.isoformat(),
    }
    fields.update(changes)
    return json.dumps(fields)


RECORD = _records(1)[0]


@pytest.mark.parametrize(
    "text",
    [
        _header(2) + "\n" + _line(RECORD) + "\n",
        _header(1) + "\n" + _line(RECORD)[:-9],
        _line(RECORD) + "\n",
        _header(1) + "\n" + "{not json\n",
        _header(1) + "\n" + _line(RECORD, prompt=-1) + "\n",
        _header(1) + "\n" + _line(RECORD, prompt="12") + "\n",
        _header(1) + "\n" + _line(RECORD, source="guessed") + "\n",
        _header(1) + "\n" + _line(RECORD, at="2026-12-01T10:00:00") + "\n",
        _header(1) + "\n" + _line(RECORD, extra=1) + "\n",
        json.dumps({"journal": "policy-gateway usage records", "version": 9, "records": 1})
        + "\n"
        + _line(RECORD)
        + "\n",
        "\x00\x01\x02",
    ],
    ids=[
        "truncated: fewer records than its header says",
        "cut in the middle of a line",
        "no header",
        "a line that is not JSON",
        "a negative token count",
        "a token count that is not a number",
        "an unknown source",
        "a time with no time zone",
        "a field it does not know",
        "a version it does not know",
        "binary garbage",
    ],
)
def test_a_corrupt_journal_is_refused_whole_kept_aside_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.usage")
    corrupt = tmp_path / "usage.journal.31"
    corrupt.write_bytes(text.encode("utf-8", "surrogatepass"))
    good = _journal(tmp_path, pid=32)
    good.write(_records(2, start=50))
    replay = _journal(tmp_path, pid=99).read()
    assert sorted(record.id for record in replay.records) == ["r-50", "r-51"]
    assert replay.files == (good.own,)
    assert not corrupt.exists()
    kept = tmp_path / "usage.journal.31.corrupt"
    assert kept.read_bytes() == text.encode("utf-8", "surrogatepass")
    (error,) = _errors(caplog)
    assert error.startswith(f"usage journal {corrupt} refused (")
    assert "kept as " + str(kept) in error
    assert RECORD.workspace not in error  # the reason, never the content


def test_a_second_corrupt_journal_of_the_same_name_does_not_replace_the_first(tmp_path: Path) -> None:
    for content in ("first", "second"):
        (tmp_path / "usage.journal.5").write_text(content)
        assert _journal(tmp_path, pid=1).read().records == ()
    kept = sorted(p.read_text() for p in tmp_path.iterdir())
    assert kept == ["first", "second"]


@pytest.mark.parametrize(
    ("flags", "environ", "expected"),
    [
        ({"usage_journal": "/var/lib/gw/usage", "redis_url": "redis://r"}, {}, Path("/var/lib/gw/usage")),
        ({}, {"GATEWAY_USAGE_JOURNAL": "/j/usage", "REDIS_URL": "redis://r"}, Path("/j/usage")),
        ({"redis_url": "redis://r"}, {"GATEWAY_USAGE_JOURNAL": ""}, None),
        ({"usage_journal": "/j/usage"}, {}, "usage_journal needs redis_url"),
    ],
    ids=[
        "from the flag",
        "from the environment",
        "empty: no journal",
        "refused without Redis: the in-memory store has nothing to journal",
    ],
)
def test_the_journal_setting(
    flags: dict[str, str], environ: dict[str, str], expected: Path | str | None
) -> None:
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            load_settings(flags, environ, None)
    else:
        assert load_settings(flags, environ, None).usage_journal == expected


# -- replay through the Redis store -------------------------------------------------------------


@pytest.fixture
def journals(tmp_path: Path) -> Path:
    """A directory of journals alone (a redis-server fixture keeps its files in tmp_path)."""
    directory = tmp_path / "journals"
    directory.mkdir()
    return directory


async def _drained(store: RedisUsageStore) -> None:
    for _ in range(500):
        if store.pending == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{store.pending} records still buffered")


async def _totals(url: str, workspace: str = "ws-j") -> Totals:
    store = RedisUsageStore(url, timeout=2.0)
    try:
        return await store.totals(workspace, Period.DAY, NOW)
    finally:
        await store.close()


def _sum(records: list[UsageRecord]) -> Totals:
    today = [r for r in records if Period.DAY.bucket(r.at) == Period.DAY.bucket(NOW)]
    return Totals(sum(r.prompt_tokens for r in today), sum(r.response_tokens for r in today), len(today))


async def test_a_replayed_journal_is_counted_once_even_when_replayed_again(
    clean_redis: RedisProcess, journals: Path
) -> None:
    """Replayed, written, removed; the same journal found again (a crash before its removal)
    counts nothing more, nor does a record that was already in Redis before its replay."""
    records = _records(300)
    already = RedisUsageStore(clean_redis.url)
    await already.start()
    await already.record_many(records[:10])
    await already.close()
    _journal(journals, pid=1).write(records)
    for _ in range(2):
        store = RedisUsageStore(clean_redis.url, journal=_journal(journals, pid=2))
        await store.start()
        await _drained(store)
        assert list(journals.iterdir()) == []
        await store.close()
        assert await _totals(clean_redis.url) == _sum(records)
        _journal(journals, pid=1).write(records)


async def test_with_redis_down_at_start_the_journal_stays_until_its_records_are_written(
    persistent_redis: RedisProcess, journals: Path
) -> None:
    records = _records(40)
    source = _journal(journals, pid=1)
    source.write(records)
    persistent_redis.pause()
    try:
        store = RedisUsageStore(persistent_redis.url, journal=_journal(journals, pid=2))
        await store.start()
        assert store.pending == 40
        assert source.own.exists()
    finally:
        persistent_redis.resume()
    await _drained(store)
    assert not source.own.exists()
    await store.close()
    assert await _totals(persistent_redis.url) == _sum(records)


async def test_a_store_stopped_before_its_replay_ends_journals_the_rest_itself(
    persistent_redis: RedisProcess, journals: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down from start to stop: the replayed records and the new ones go to this process's
    journal, the file it replayed is removed, and the next start counts each record once."""
    caplog.set_level(logging.INFO, logger="gateway.usage")
    old, new = _records(30), _records(20, start=100)
    _journal(journals, pid=1).write(old)
    persistent_redis.pause()
    try:
        store = RedisUsageStore(persistent_redis.url, journal=_journal(journals, pid=2))
        await store.start()
        await store.record_many(new)
        await store.close()
    finally:
        persistent_redis.resume()
    assert [p.name for p in journals.iterdir()] == ["usage.journal.2"]
    assert any("50 records not written to Redis: journaled to" in m for m in _messages(caplog))
    store = RedisUsageStore(persistent_redis.url, journal=_journal(journals, pid=3))
    await store.start()
    await _drained(store)
    await store.close()
    assert list(journals.iterdir()) == []
    assert await _totals(persistent_redis.url) == _sum(old + new)


async def test_records_over_the_journals_cap_are_logged_as_lost(
    persistent_redis: RedisProcess, journals: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.usage")
    persistent_redis.pause()
    try:
        store = RedisUsageStore(persistent_redis.url, journal=_journal(journals, pid=2, limit=15))
        await store.start()
        await store.record_many(_records(25))
        await store.close()
    finally:
        persistent_redis.resume()
    assert len(_journal(journals, pid=3).read().records) == 15
    assert any("10 records over the journal's cap of 15: lost" in m for m in _errors(caplog))


async def test_a_journal_directory_that_cannot_be_written_is_reported_at_start(
    clean_redis: RedisProcess, journals: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.usage")
    store = RedisUsageStore(clean_redis.url, journal=UsageJournal(journals / "missing" / "usage", limit=10))
    await store.start()
    await store.close()
    (error,) = _errors(caplog)
    assert "missing does not exist" in error
    assert "would be lost" in error


async def test_with_no_journal_the_records_not_written_are_logged_as_lost(
    persistent_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.usage")
    persistent_redis.pause()
    try:
        store = RedisUsageStore(persistent_redis.url)
        await store.start()
        await store.record_many(_records(7))
        await store.close()
    finally:
        persistent_redis.resume()
    assert any("7 records not written to Redis" in m and "lost" in m for m in _messages(caplog))


# -- a real gateway stopped with Redis paused, then started again -------------------------------


async def _reporting(_: web.Request) -> web.StreamResponse:
    usage = {"prompt_tokens": TOKENS_IN, "completion_tokens": TOKENS_OUT}
    return web.json_response({"success": True, "message": "ok", "usage": usage})


class Gateway(ServedProcess):
    def events(self) -> list[dict[str, Any]]:
        return self.log_events()


@pytest.fixture
async def launch(aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    recorder, upstream = await start_upstream(aiohttp_server)
    recorder.handler = _reporting
    fixed = ("--workspace-header", "X-Workspace-Id")
    async with served_processes(
        Gateway, str(upstream.make_url("/")), tmp_path, *fixed, attempts=200
    ) as start:
        yield start


async def _usage(session: aiohttp.ClientSession, gateway: Gateway, workspace: str) -> dict[str, Any]:
    async with session.get(f"http://127.0.0.1:{gateway.admin}/usage/{workspace}") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def _prompt(session: aiohttp.ClientSession, gateway: Gateway, index: int) -> int:
    async with session.post(
        f"http://127.0.0.1:{gateway.port}/conversation/c-{index % 3}/prompt",
        json={"prompt": "hello"},
        headers={"X-Workspace-Id": "ws-restart"},
    ) as response:
        await response.read()
        return response.status


@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "two worker processes"])
async def test_prompts_served_while_redis_was_paused_are_counted_once_after_a_restart(
    launch: Callable[..., Awaitable[Gateway]], persistent_redis: RedisProcess, tmp_path: Path, workers: int
) -> None:
    """Redis paused, N prompts served, SIGTERM; Redis back, the gateway started again on the same
    journal: every prompt counted, exactly once, and the journal gone."""
    paused = 60
    journal = tmp_path / "journal" / "usage.journal"
    journal.parent.mkdir()
    args = ("--redis-url", persistent_redis.url, "--usage-journal", str(journal), "--workers", str(workers))
    first = await launch(*args)
    # A new connection for each prompt, so that the kernel spreads them over the workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Served while Redis answers, until every worker has served one (all are listening).
        before = 0
        while len({e["pid"] for e in first.events() if e.get("event") == "request.completed"}) < workers:
            assert before < 200, "a worker never served"
            assert await _prompt(session, first, before) == 200
            before += 1
            await asyncio.sleep(0.01)  # its request.completed line is written after the answer
        persistent_redis.pause()
        try:
            statuses = await asyncio.gather(*(_prompt(session, first, index) for index in range(paused)))
            assert statuses == [200] * paused
            assert await first.stop() == 0
        finally:
            persistent_redis.resume()
    served = before + paused
    journaled = [e["event"] for e in first.events() if "journaled to" in str(e.get("event"))]
    print(f"{before} prompts before the pause, {paused} during it; {journaled}")
    assert len(journaled) == workers  # each worker its own file (60 connections, spread by the kernel)
    assert not any("lost" in e.get("event", "") for e in first.events())
    assert len(list(journal.parent.iterdir())) == workers

    second = await launch(*args)
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            usage = await _usage(session, second, "ws-restart")
            # Every worker up before SIGTERM: one still starting would die of it (exit 1).
            serving = [e for e in second.events() if e.get("event") == "gateway.serving"]
            if usage["requests"] >= served and not list(journal.parent.iterdir()) and len(serving) == workers:
                break
            await asyncio.sleep(0.05)
    assert await second.stop() == 0
    assert list(journal.parent.iterdir()) == []
    totals = await _totals(persistent_redis.url, "ws-restart")
    assert totals == Totals(served * TOKENS_IN, served * TOKENS_OUT, served)
