"""The shared usage store: counters in Redis (or Redis Cluster), so every gateway process agrees.

Key schema (`pgw` is `key_prefix`; `{ws}` the workspace id, a Redis Cluster hash tag):

| key | holds | expires |
|---|---|---|
| `pgw:{ws}:d:YYYY-MM-DD` | hash: the UTC day's totals | 400 days after its last write |
| `pgw:{ws}:m:YYYY-MM` | hash: the UTC month's totals | 760 days (25 months) after its last write |
| `pgw:{ws}:c:<conversation id>` | hash: the conversation's totals | 400 days after its last write |
| `pgw:{ws}:r:<record id>` | string `1`: this record was counted | 8 days after it was counted |

Each hash has the fields `prompt` and `response` (token sums) and `requests` (records counted).
Workspace, conversation and record ids are percent-encoded (everything but ASCII letters, digits
and `-._~`), so no id can close the hash tag or add a `:` separator, and distinct ids never share
a key; the empty workspace id is written `%`. All keys of a workspace share its hash tag, hence
its Cluster slot, so one Lua script can update them together. Day keys are kept for a year of
daily history, month keys for two years of monthly history (year-on-year comparisons), and a
conversation for as long as it keeps being written to.

A record is counted by a script (one round trip for every record written together): `SET` the
record marker `NX` and, only if it was not already there, `HINCRBY` the day, month and
conversation hashes and renew their expiry. A retry of a record whose outcome is unknown
therefore counts it exactly once, as long as the retry comes within the marker's 8 days. A write
waits `LINGER` (2 ms) for more records before it goes, and records that finish while a write is
under way go in the next one: one script run per workspace and write (its
keys share a Cluster slot), each record under its own `pcall`: one refused record (a key of the
wrong type) costs only itself.

Redis down or slow: `record` never raises and never waits much longer than `timeout`; the
record goes to a bounded in-memory buffer (in order) that a background task drains once Redis
answers again, retrying with backoff. Reads raise `StoreUnavailable` instead of waiting.

At close, what is still buffered goes to the usage journal (see journal.py), when there is one,
or is logged as lost. At start, the journal's records go to the front of the buffer; its files
are removed once all of them are written, or once they are journaled again at close. A crash
at any point leaves every record in a file still to replay, at worst in two (the journal written,
the replayed file not yet removed): replaying counts it once, by its marker, as long as the
replay comes within the marker's 8 days. A journal replayed later than that may count a record
twice whose first write did land but was never answered; the replay says how many are that old.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from gateway.usage.journal import Replay, UsageJournal
from gateway.usage.store import Period, StoreUnavailable, Totals, UsageRecord

log = logging.getLogger("gateway.usage")
T = TypeVar("T")

DAY_TTL = 400 * 86400
MONTH_TTL = 760 * 86400
CONVERSATION_TTL = 400 * 86400
MARKER_TTL = 8 * 86400

FIELDS = ("prompt", "response", "requests")
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0
# Records per pipelined round trip while draining: small enough to answer well within `timeout`.
FLUSH_BATCH = 128
CLOSE_FLUSH_SECONDS = 2.0
# How long a write waits for more records to join it. A round trip costs the gateway about
# 100 µs of CPU in redis-py whatever it carries, and under load a request finishes every few
# hundred µs: without the wait most writes would carry one record. Records reach Redis this much
# later; no answer waits for it (accounting runs after the answer is out), and a record that
# a quota close to its end waits for is written at once (``urgent``).
LINGER = 0.002

# ARGV[1..4]: the TTL of the marker, day, month and conversation keys. Then, for each record: its
# number of keys (3, or 4 with a conversation), prompt tokens, response tokens. KEYS: each record's
# marker, day, month[, conversation]. Returns, for each record: 1 counted, 0 counted before, or
# the error text of the call that refused it.
RECORD_SCRIPT = """
local results = {}
local k, a = 1, 5
while a <= #ARGV do
  local n, prompt, response = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
  local ok, outcome = pcall(function()
    if not redis.call('SET', KEYS[k], '1', 'NX', 'EX', ARGV[1]) then
      return 0
    end
    for i = 1, n - 1 do
      local key = KEYS[k + i]
      redis.call('HINCRBY', key, 'prompt', prompt)
      redis.call('HINCRBY', key, 'response', response)
      redis.call('HINCRBY', key, 'requests', 1)
      redis.call('EXPIRE', key, ARGV[i + 1])
    end
    return 1
  end)
  if not ok then
    outcome = type(outcome) == 'table' and outcome.err or tostring(outcome)
  end
  results[#results + 1] = outcome
  k, a = k + n, a + 3
end
return results
"""


def connect(url: str, timeout: float) -> Redis | RedisCluster:
    """A client for ``url``; ``redis+cluster://`` and ``rediss+cluster://`` mean Redis Cluster."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # A failed call is buffered and retried by the flusher, never by the client on our time.
        "retry": Retry(NoBackoff(), 0),
    }
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in {"redis+cluster", "rediss+cluster"}:
        plain = urlunsplit(parts._replace(scheme=scheme.removesuffix("+cluster")))
        return RedisCluster.from_url(plain, **options)
    return Redis.from_url(url, **options)


class RedisUsageStore:
    """Usage counters in Redis at ``url`` (``redis://``, ``rediss://``, ``unix://``, or
    ``redis+cluster://`` / ``rediss+cluster://`` for Redis Cluster).

    ``timeout`` bounds every call to Redis (connect included); ``buffer_limit`` bounds the records
    held while Redis is away; ``key_prefix`` starts every key. ``healthy`` tells whether the last
    call to Redis succeeded. ``journal`` (settable until ``start``) keeps what ``close`` could not
    write, and gives it back at the next ``start``.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.25,
        buffer_limit: int = 100_000,
        key_prefix: str = "pgw",
        on_fallback: Callable[[str], None] = lambda reason: None,
        linger: float = LINGER,
        journal: UsageJournal | None = None,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain '{' or '}': the workspace is the hash tag")
        self._client = connect(url, timeout)
        self._script = self._client.register_script(RECORD_SCRIPT)
        self._timeout = timeout
        self._buffer_limit = buffer_limit
        self._prefix = key_prefix
        self._buffer: deque[UsageRecord] = deque()
        self._down = False
        self._healthy = False
        self._dropped = 0
        self._burst = 0  # drops since the buffer last had room: a burst is logged once, not per record
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._outbox: list[tuple[Sequence[UsageRecord], asyncio.Future[None]]] = []
        self._script_loaded = False
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        # Told "buffered" or "dropped" for each record not written on the spot (for metrics).
        self._on_fallback = on_fallback
        self._linger = linger
        self._urgent = False  # a record in the outbox is waited for: no lingering
        self._lingering: asyncio.Future[None] | None = None
        self.journal = journal
        self._replay = Replay()
        self._replaying = 0  # records at the front of the buffer that came from the journal

    @property
    def pending(self) -> int:
        return len(self._buffer)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def healthy(self) -> bool:
        """Whether the last call to Redis succeeded."""
        return self._healthy

    async def start(self) -> None:
        self._ensure_flusher()
        if self.journal is not None:
            self._take_journal(self.journal)
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.ping()
        except Exception as exc:  # any failure means unavailable; the flusher probes until it answers
            self._mark_down(exc)
        else:
            self._healthy = True

    async def record(self, record: UsageRecord) -> None:
        await self.record_many((record,))

    async def record_many(self, records: Sequence[UsageRecord], *, urgent: bool = False) -> None:
        # Shielded: a caller that gives up does not stop the write; it lands or is buffered.
        await asyncio.shield(self.submit(records, urgent=urgent))

    def submit(self, records: Sequence[UsageRecord], *, urgent: bool = False) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not records:
            done.set_result(None)
            return done
        if urgent:
            self._urgent = True
            if self._lingering is not None:
                _resolve(self._lingering)
        if self._down or self._buffer:
            # Behind the buffer, to keep order, and without waiting on a Redis known to be down.
            for record in records:
                self._enqueue(record)
            done.set_result(None)
            return done
        # Records that arrive within the linger, or while a write is under way, go together: one
        # round trip for many requests under load, still one atomic update per record.
        self._outbox.append((records, done))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_outbox())
        return done

    async def _write_outbox(self) -> None:
        while self._outbox:
            if self._linger > 0 and not self._urgent:
                # Let the records of the next few requests join this write (see LINGER), unless
                # an urgent one comes meanwhile.
                loop = asyncio.get_running_loop()
                self._lingering = loop.create_future()
                timer = loop.call_later(self._linger, _resolve, self._lingering)
                try:
                    await self._lingering
                finally:
                    timer.cancel()
                    self._lingering = None
            self._urgent = False
            taken, size = 0, 0
            while taken < len(self._outbox) and (
                taken == 0 or size + len(self._outbox[taken][0]) <= FLUSH_BATCH
            ):
                size += len(self._outbox[taken][0])
                taken += 1
            batch, self._outbox = self._outbox[:taken], self._outbox[taken:]
            try:
                await self._write([record for records, _ in batch for record in records])
            finally:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def _write(self, records: list[UsageRecord]) -> None:
        if self._down or self._buffer:
            for record in records:
                self._enqueue(record)
            return
        groups = _by_workspace(records)
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._run_script(groups, loaded=True)
        except BaseException as exc:
            # Whatever failed (cancellation included), the outcome is unknown: retry them all.
            if isinstance(exc, Exception):
                self._mark_down(exc)
            for record in records:
                self._enqueue(record)
            if not isinstance(exc, Exception):
                raise
            return
        self._healthy = True
        for group, result in zip(groups, results, strict=True):
            for record, outcome in zip(group, _outcomes(result, len(group)), strict=True):
                if outcome is None:
                    continue
                if _permanent(outcome):
                    self._drop(record, outcome)
                else:
                    # NOSCRIPT after a restart, LOADING, ...: the flusher retries with EVAL.
                    self._mark_down(outcome)
                    self._enqueue(record)

    async def _run_script(self, groups: list[list[UsageRecord]], *, loaded: bool) -> list[Any]:
        """One script run per group, in one round trip where Redis is one server. With ``loaded``
        the script is called by its digest (loaded once per connection to a (re)started Redis),
        else sent whole, which loads it again after a restart emptied the script cache."""
        calls = [self._script_call(group) for group in groups]
        if isinstance(self._client, RedisCluster):
            # A cluster routes each run to its workspace's node: no shared pipeline.
            return await asyncio.gather(
                *(self._script(keys=keys, args=args) for keys, args in calls), return_exceptions=True
            )
        if loaded and not self._script_loaded:
            await self._client.script_load(RECORD_SCRIPT)
            self._script_loaded = True
        pipe = self._client.pipeline(transaction=False)
        for keys, args in calls:
            if loaded:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            else:
                pipe.eval(RECORD_SCRIPT, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def totals(self, workspace: str, period: Period, at: datetime) -> Totals:
        key = self._bucket_key(workspace, period, at)
        return _totals(await self._read(lambda: self._client.hmget(key, FIELDS)))

    async def current(self, workspace: str, at: datetime) -> tuple[Totals, Totals]:
        def both() -> Awaitable[list[Any]]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(self._bucket_key(workspace, Period.DAY, at), FIELDS)
            pipe.hmget(self._bucket_key(workspace, Period.MONTH, at), FIELDS)
            return pipe.execute()

        day, month = await self._read(both)
        return _totals(day), _totals(month)

    async def conversation_totals(self, workspace: str, conversation_id: str) -> Totals:
        key = f"{self._tag(workspace)}:c:{_encoded(conversation_id)}"
        return _totals(await self._read(lambda: self._client.hmget(key, FIELDS)))

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writer), CLOSE_FLUSH_SECONDS)
            if not self._writer.done():
                # Its write goes back to the buffer (outcome unknown), and so does the outbox.
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
            outbox, self._outbox = self._outbox, []
            for records, done in outbox:
                for record in records:
                    self._enqueue(record)
                _resolve(done)
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_FLUSH_SECONDS):
                while self._buffer:
                    if not await self._flush_batch():
                        await asyncio.sleep(BACKOFF_MIN)
        self._keep_unwritten()
        await self._client.aclose()

    # -- the journal ----------------------------------------------------------------------------

    def _take_journal(self, journal: UsageJournal) -> None:
        """Put the journal's records ahead of any new one; its files go once they are written."""
        problem = journal.problem()
        if problem is not None:
            log.error(
                "usage journal %s cannot be written (%s): records unwritten at stop would be lost",
                journal.own,
                problem,
            )
        replay = journal.read()
        if not replay.files:
            return
        self._replay = replay
        self._replaying = len(replay.records)
        # Past the buffer's bound: each journal file is bounded itself, and dropping its records
        # here would lose what a previous run kept.
        self._buffer.extendleft(reversed(replay.records))
        log.info("usage journal: replaying %d records from %d files", len(replay.records), len(replay.files))
        expired = datetime.now(UTC) - timedelta(seconds=MARKER_TTL)
        old = sum(1 for record in replay.records if record.at < expired)
        if old:
            log.warning(
                "usage journal: %d records are older than the %d-day record markers: one whose first "
                "write landed unanswered counts twice", old, MARKER_TTL // 86400,
            )  # fmt: skip
        if not replay.records:
            self._journal_written()
        else:
            self._wake.set()

    def _written(self, count: int) -> None:
        """``count`` records left the front of the buffer (written, or refused for good)."""
        if self._replaying:
            self._replaying = max(0, self._replaying - count)
            if not self._replaying:
                self._journal_written()

    def _journal_written(self, *, rewritten: bool = False) -> None:
        """The replayed records are all written, or (``rewritten``) in this process's journal,
        which a replayed file of the same name (a pid reused) was replaced by."""
        journal, files = self.journal, self._replay.files
        if journal is not None and files:
            journal.remove(path for path in files if not (rewritten and path == journal.own))
            if not rewritten:
                log.info(
                    "usage journal replayed: %d records written, its files removed", len(self._replay.records)
                )
        self._replay = Replay()

    def _keep_unwritten(self) -> None:
        """At close: what is still buffered goes to the journal, or is logged as lost."""
        unwritten = list(self._buffer)
        if not unwritten:
            self._journal_written()
            return
        if self.journal is None:
            log.warning(
                "usage store closed with %d records not written to Redis: lost (no usage journal "
                "configured: --usage-journal)", len(unwritten),
            )  # fmt: skip
            return
        try:
            kept = self.journal.write(unwritten)
        except OSError as exc:
            # The files replayed at start stay: their records are lost only if this run's are.
            log.error(
                "usage store closed with %d records not written to Redis: lost, the usage journal "
                "%s could not be written (%s)", len(unwritten), self.journal.own,
                exc.strerror or type(exc).__name__,
            )  # fmt: skip
            return
        log.warning(
            "usage store closed with %d records not written to Redis: journaled to %s for the next start",
            kept, self.journal.own,
        )  # fmt: skip
        if kept < len(unwritten):
            log.error(
                "usage store closed with %d records over the journal's cap of %d: lost",
                len(unwritten) - kept, self.journal.limit,
            )  # fmt: skip
        self._replaying = 0
        self._journal_written(rewritten=True)

    # -- keys -----------------------------------------------------------------------------------

    def _tag(self, workspace: str) -> str:
        return f"{self._prefix}:{{{_encoded(workspace) or '%'}}}"

    def _bucket_key(self, workspace: str, period: Period, at: datetime) -> str:
        return f"{self._tag(workspace)}:{'d' if period is Period.DAY else 'm'}:{period.bucket(at)}"

    def _script_call(self, records: list[UsageRecord]) -> tuple[list[str], list[int]]:
        """Keys and arguments of one script run over ``records`` (all of one workspace)."""
        tag = self._tag(records[0].workspace)
        keys: list[str] = []
        args = [MARKER_TTL, DAY_TTL, MONTH_TTL, CONVERSATION_TTL]
        for record in records:
            keys += (
                f"{tag}:r:{quote(record.id, safe='')}",
                self._bucket_key(record.workspace, Period.DAY, record.at),
                self._bucket_key(record.workspace, Period.MONTH, record.at),
            )
            if record.conversation_id is None:
                args += (3, record.prompt_tokens, record.response_tokens)
            else:
                keys.append(f"{tag}:c:{_encoded(record.conversation_id)}")
                args += (4, record.prompt_tokens, record.response_tokens)
        return keys, args

    # -- reads ----------------------------------------------------------------------------------

    async def _read(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._down:
            # Answer at once: the flusher's probe finds out when Redis is back.
            raise StoreUnavailable("Redis is unavailable")
        try:
            async with asyncio.timeout(self._timeout):
                result = await call()
        except Exception as exc:
            self._mark_down(exc)
            raise StoreUnavailable(f"Redis did not answer: {type(exc).__name__}") from exc
        self._healthy = True
        return result

    # -- the buffer and its flusher -------------------------------------------------------------

    def _enqueue(self, record: UsageRecord) -> None:
        if len(self._buffer) >= self._buffer_limit:
            self._drop(record, None)
            return
        self._buffer.append(record)
        self._on_fallback("buffered")
        self._ensure_flusher()
        self._wake.set()

    def _drop(self, record: UsageRecord, exc: BaseException | None) -> None:
        self._dropped += 1
        self._on_fallback("dropped")
        if exc is not None:
            log.error(
                "usage record %s of workspace %s refused by Redis (%s)", record.id, record.workspace, exc
            )
            return
        self._burst += 1
        if self._burst == 1:
            log.warning(
                "usage buffer full (%d records): dropping records until Redis catches up", len(self._buffer)
            )

    def _mark_down(self, exc: BaseException) -> None:
        self._healthy = False
        self._script_loaded = False  # a Redis that comes back may have lost its script cache
        if not self._down:
            self._down = True
            log.warning("Redis usage store unavailable (%s); buffering records", type(exc).__name__)
        self._ensure_flusher()
        self._wake.set()

    def _mark_up(self) -> None:
        self._healthy = True
        if self._down:
            self._down = False
            log.info("Redis usage store available again; %d records to flush", len(self._buffer))

    def _ensure_flusher(self) -> None:
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="usage-flusher")

    async def _flush_loop(self) -> None:
        delay = BACKOFF_MIN
        while True:
            await self._wake.wait()
            if not self._buffer and not self._down:
                self._wake.clear()
                continue
            if await (self._flush_batch() if self._buffer else self._probe()):
                delay = BACKOFF_MIN
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def reachable(self) -> bool:
        """Ask Redis now (bounded by ``timeout``): for readiness checks."""
        return await self._probe()

    async def _probe(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.ping()
        except Exception as exc:
            self._mark_down(exc)
            return False
        self._mark_up()
        return True

    async def _flush_batch(self) -> bool:
        """Write the oldest buffered records in one round trip; False if Redis did not take them."""
        batch = list(itertools.islice(self._buffer, FLUSH_BATCH))
        groups = _by_workspace(batch)
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._run_script(groups, loaded=False)
        except Exception as exc:
            self._mark_down(exc)
            return False
        outcome_of: dict[int, Exception | None] = {}
        for group, result in zip(groups, results, strict=True):
            for record, outcome in zip(group, _outcomes(result, len(group)), strict=True):
                outcome_of[id(record)] = outcome
        taken = 0
        for record in batch:
            outcome = outcome_of[id(record)]
            if outcome is not None and not _permanent(outcome):
                self._mark_down(outcome)  # e.g. LOADING after a restart: retry from this record on
                self._written(taken)
                return False
            self._buffer.popleft()
            taken += 1
            if outcome is not None:
                self._drop(record, outcome)
        self._written(taken)
        self._mark_up()
        if self._burst and len(self._buffer) < self._buffer_limit:
            log.warning("usage buffer has room again; %d records were dropped", self._burst)
            self._burst = 0
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _by_workspace(records: list[UsageRecord]) -> list[list[UsageRecord]]:
    """The records grouped by workspace, each group in arrival order: one script run each."""
    groups: dict[str, list[UsageRecord]] = {}
    for record in records:
        groups.setdefault(record.workspace, []).append(record)
    return list(groups.values())


def _outcomes(result: Any, count: int) -> list[Exception | None]:
    """What the script said of each record: None where it was counted (now or before)."""
    if isinstance(result, Exception):
        return [result] * count
    if not isinstance(result, list) or len(result) != count:
        return [ResponseError(f"unexpected script answer: {type(result).__name__}")] * count
    outcomes: list[Exception | None] = []
    for item in result:
        if isinstance(item, bytes | str):
            outcomes.append(ResponseError(item.decode(errors="replace") if isinstance(item, bytes) else item))
        else:
            outcomes.append(None)
    return outcomes


def _encoded(identifier: str) -> str:
    """A workspace or conversation id, percent-encoded for a key."""
    if len(identifier) > _MEMO_LENGTH:
        return quote(identifier, safe="")
    return _encoded_memo(identifier)


# Ids recur on every record of a workspace or conversation; only short ones are remembered, so
# that ids a client chooses cannot make the memo large.
_MEMO_LENGTH = 128


@functools.lru_cache(maxsize=4096)
def _encoded_memo(identifier: str) -> str:
    return quote(identifier, safe="")


def _permanent(exc: BaseException) -> bool:
    # A key of the wrong type will fail every retry: drop the record rather than block the buffer.
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


def _totals(values: list[Any]) -> Totals:
    prompt, response, requests = (int(value) if value else 0 for value in values)
    return Totals(prompt, response, requests)
