"""Which workspace (and repo, and org) a conversation belongs to.

In order: a trusted header, when an operator configured one; what the gateway learned from
answers that passed through it (``GET /conversation`` lists, ``POST /conversation``); a lookup
at the upstream with the caller's own credentials, cached; else ``unresolved``. Answers teach
only when they were given to a caller with credentials (the routes decide): an anonymous caller
must not choose which workspace a conversation's usage is charged to.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

UNRESOLVED = "unresolved"
Source = Literal["header", "learned", "lookup", "unresolved"]


@dataclass(frozen=True, slots=True)
class Placement:
    workspace: str
    repo: str | None = None
    org: str | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    placement: Placement
    source: Source


# One page of GET /conversation for the caller: (status, parsed JSON or None).
PageFetcher = Callable[[int, int], Awaitable[tuple[int, Any]]]


V = TypeVar("V")


class _Bounded(OrderedDict[str, V], Generic[V]):
    """Least-recently-used map with a size bound: learning can never grow memory without end."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: str, value: V) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


def _text_id(value: object) -> str | None:
    return str(value) if isinstance(value, str | int) and str(value) else None


class WorkspaceDirectory:
    """Conversation → placement, and repo → (workspace, org), learned from the upstream."""

    def __init__(
        self,
        *,
        cache_ttl: float = 300.0,
        max_entries: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # conversation -> (placement, or None while only its repo is known; its repo)
        self._conversations: _Bounded[tuple[Placement | None, str | None]] = _Bounded(max_entries)
        self._repos: _Bounded[tuple[str, str | None]] = _Bounded(max_entries)  # repo -> (workspace, org)
        # Conversations a lookup did not find, so one unknown id costs one lookup per TTL.
        self._misses: _Bounded[float] = _Bounded(max_entries)
        self._cache_ttl = cache_ttl
        self._clock = clock
        self._inflight: dict[str, asyncio.Future[Placement | None]] = {}

    def learn_list(self, payload: Any) -> int:
        """Learn every conversation of a ``GET /conversation`` answer; returns how many."""
        conversations = payload.get("conversations") if isinstance(payload, Mapping) else None
        if not isinstance(conversations, list):
            return 0
        learned = 0
        for item in conversations:
            if not isinstance(item, Mapping):
                continue
            conversation, workspace = _text_id(item.get("id")), _text_id(item.get("workspaceId"))
            repo, org = _text_id(item.get("repoId")), _text_id(item.get("orgId"))
            if conversation and workspace:
                self._conversations.put(conversation, (Placement(workspace, repo, org), None))
                self._misses.pop(conversation, None)
                learned += 1
            if repo and workspace:
                self._repos.put(repo, (workspace, org))
        return learned

    def learn_created(self, request_payload: Any, answer: Any) -> bool:
        """Pair a conversation created by ``POST /conversation`` with the repo it was asked for."""
        if not isinstance(request_payload, Mapping) or not isinstance(answer, Mapping):
            return False
        conversation, repo = _text_id(answer.get("conversationId")), _text_id(request_payload.get("repoId"))
        if not conversation or not repo:
            return False
        self._conversations.put(conversation, (None, repo))
        self._misses.pop(conversation, None)
        return True

    def known(self, conversation_id: str) -> Placement | None:
        entry = self._conversations.get(conversation_id)
        if entry is None:
            return None
        placement, repo = entry
        if placement is not None:
            return placement
        # Created here: its workspace is its repo's, once a list has shown that repo.
        owner = self._repos.get(repo) if repo is not None else None
        if owner is None:
            return None
        return Placement(owner[0], repo, owner[1])

    def missed_recently(self, conversation_id: str) -> bool:
        expires = self._misses.get(conversation_id)
        return expires is not None and expires > self._clock()

    async def look_up(self, conversation_id: str, fetch: PageFetcher, *, pages: int) -> Placement | None:
        """Page through the caller's conversations until this one shows; coalesces callers."""
        pending = self._inflight.get(conversation_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Placement | None] = asyncio.get_running_loop().create_future()
        self._inflight[conversation_id] = future
        try:
            placement = await self._page_through(conversation_id, fetch, pages)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so a lone caller leaves no warning behind
            raise
        else:
            future.set_result(placement)
            return placement
        finally:
            del self._inflight[conversation_id]

    async def _page_through(self, conversation_id: str, fetch: PageFetcher, pages: int) -> Placement | None:
        take = 100
        for page in range(pages):
            status, payload = await fetch(take, page * take)
            if status != 200:
                break
            seen = self.learn_list(payload)
            found = self.known(conversation_id)
            if found is not None:
                return found
            if seen < take:
                break
        self._misses.put(conversation_id, self._clock() + self._cache_ttl)
        return None


_UNRESOLVED = Resolution(Placement(UNRESOLVED), "unresolved")
_CLAIMS_LIMIT = 4096


class WorkspaceResolver:
    def __init__(self, directory: WorkspaceDirectory, *, header: str | None, lookup_pages: int) -> None:
        self.directory = directory
        self.header = header
        self.lookup_pages = lookup_pages
        self._claims: dict[tuple[str, str | None, str | None], Resolution] = {}

    def settled(
        self, headers: Mapping[str, str], conversation_id: str | None, *, can_look_up: bool
    ) -> Resolution | None:
        """What ``resolve`` answers when it needs no lookup (``can_look_up``: a fetcher would
        be given); None when it would look the conversation up."""
        learned = self.directory.known(conversation_id) if conversation_id else None
        # SECURITY: the header is read only when configured: a client could send any value.
        if self.header is not None:
            claimed = headers.get(self.header, "").strip()
            if claimed:
                return self._claimed(claimed, learned)
        if learned is not None:
            return Resolution(learned, "learned")
        if (
            conversation_id
            and can_look_up
            and self.lookup_pages > 0
            and not self.directory.missed_recently(conversation_id)
        ):
            return None
        return _UNRESOLVED

    def _claimed(self, claimed: str, learned: Placement | None) -> Resolution:
        # The same workspaces are claimed request after request: one (immutable) resolution
        # each. Bounded (the header is a client's), emptied when full.
        repo, org = (learned.repo, learned.org) if learned else (None, None)
        key = (claimed, repo, org)
        resolution = self._claims.get(key)
        if resolution is None:
            if len(self._claims) >= _CLAIMS_LIMIT:
                self._claims.clear()
            resolution = self._claims[key] = Resolution(Placement(claimed, repo, org), "header")
        return resolution

    async def resolve(
        self, headers: Mapping[str, str], conversation_id: str | None, fetch: PageFetcher | None
    ) -> Resolution:
        resolution = self.settled(headers, conversation_id, can_look_up=fetch is not None)
        if resolution is not None:
            return resolution
        # What settled() leaves to a lookup: a conversation to look up, and how.
        assert conversation_id
        assert fetch is not None
        found = await self.directory.look_up(conversation_id, fetch, pages=self.lookup_pages)
        if found is not None:
            return Resolution(found, "lookup")
        return _UNRESOLVED
