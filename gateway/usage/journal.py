"""The usage journal: records a stopping process could not write to Redis, kept for the next start.

``--usage-journal PATH`` names a family of files: each process writes its own, ``PATH.<pid>``
(several workers stop at the same time, and none may overwrite another's), and every start
reads all of them. A file is written whole or not at all: to ``PATH.<pid>.tmp`` in the same
directory, fsynced, renamed over ``PATH.<pid>``, then the directory is fsynced. It holds at most
``limit`` records (the oldest first); the rest are reported lost by the caller.

The file is JSON lines: a header (``{"journal": ..., "version": 1, "records": N}``), then one
record a line. A file that is not exactly that (cut short, a line that is not JSON, a field of
the wrong type, a field too many) is refused whole: renamed to ``PATH.<pid>.corrupt`` (kept for
an operator, never replayed by itself) and logged. Replaying counts each record once because
the Redis store does: a record id it has counted is remembered for 8 days (see redis_store).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.usage.store import UsageRecord

log = logging.getLogger("gateway.usage")

KIND = "policy-gateway usage records"
VERSION = 1
_FIELDS = frozenset({"id", "workspace", "conversation", "prompt", "response", "source", "at"})


class CorruptJournal(ValueError):
    """A journal file that is not what this module writes; the message says why, never what."""


@dataclass(frozen=True, slots=True)
class Replay:
    """What a start found: the records (each id once, oldest file first) and the files they came
    from, to be removed once every record is written (or journaled again)."""

    records: tuple[UsageRecord, ...] = ()
    files: tuple[Path, ...] = ()


class UsageJournal:
    """The journal files at ``path`` (``path.<pid>``, one a process); this process's is ``own``."""

    def __init__(self, path: Path | str, *, limit: int, pid: int | None = None) -> None:
        if limit <= 0:
            raise ValueError("a journal must hold at least one record")
        self.path = Path(path)
        self.limit = limit
        self.own = self.path.with_name(f"{self.path.name}.{pid if pid is not None else os.getpid()}")

    def files(self) -> list[Path]:
        """The journal files present, in the order of their names (pids)."""
        prefix = self.path.name + "."
        try:
            names = os.listdir(self.path.parent)
        except FileNotFoundError:
            return []
        found = [name for name in names if name.startswith(prefix) and name[len(prefix) :].isdigit()]
        return [self.path.parent / name for name in sorted(found, key=lambda n: int(n[len(prefix) :]))]

    def problem(self) -> str | None:
        """Why a journal could not be written here, if it could not (checked at start)."""
        directory = self.path.parent
        if not directory.is_dir():
            return f"directory {directory} does not exist"
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"directory {directory} is not writable"
        return None

    def read(self) -> Replay:
        """Every journal file's records; a corrupt file is set aside and logged, not replayed."""
        records: dict[tuple[str, str], UsageRecord] = {}
        files: list[Path] = []
        for path in self.files():
            try:
                found = _read_file(path)
            except CorruptJournal as exc:
                try:
                    kept = _set_aside(path)
                except OSError:
                    kept = path  # refused again at the next start, and logged again
                log.error(
                    "usage journal %s refused (%s): kept as %s, not replayed; repair it and rename it "
                    "to %s.<digits> to replay it (a record counted before counts once)",
                    path, exc, kept, self.path.name,
                )  # fmt: skip
                continue
            except OSError as exc:
                log.error(
                    "usage journal %s not read (%s): left in place", path, exc.strerror or type(exc).__name__
                )
                continue
            files.append(path)
            for record in found:
                records.setdefault((record.workspace, record.id), record)
        return Replay(tuple(records.values()), tuple(files))

    def write(self, records: Sequence[UsageRecord]) -> int:
        """Write this process's journal atomically, replacing it; returns how many records it
        holds (at most ``limit``). Raises ``OSError`` if it could not be written."""
        kept = records[: self.limit]
        temporary = self.own.with_name(self.own.name + ".tmp")
        header = {"journal": KIND, "version": VERSION, "records": len(kept)}
        lines = [json.dumps(header)] + [json.dumps(_fields(record)) for record in kept]
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as out:
                out.write("\n".join(lines) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.own)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        fsync_directory(self.own.parent)
        return len(kept)

    def remove(self, files: Iterable[Path]) -> None:
        """Remove journal files whose records are all written, or journaled again."""
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        fsync_directory(self.path.parent)


def _fields(record: UsageRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "workspace": record.workspace,
        "conversation": record.conversation_id,
        "prompt": record.prompt_tokens,
        "response": record.response_tokens,
        "source": record.source,
        "at": record.at.isoformat(),
    }


def _read_file(path: Path) -> list[UsageRecord]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorruptJournal("not UTF-8 text") from None
    if not text.endswith("\n"):
        raise CorruptJournal("cut short: no final newline")
    lines = text[:-1].split("\n")
    header = _object(lines[0], 1)
    if header.get("journal") != KIND or header.get("version") != VERSION:
        raise CorruptJournal(f"line 1: not a version {VERSION} journal header")
    count = header.get("records")
    if not _whole(count) or count != len(lines) - 1:
        raise CorruptJournal(f"cut short or extended: {len(lines) - 1} records, not the header's count")
    return [_record(_object(line, number), number) for number, line in enumerate(lines[1:], start=2)]


def _object(line: str, number: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        raise CorruptJournal(f"line {number}: not JSON") from None
    if not isinstance(value, dict):
        raise CorruptJournal(f"line {number}: not a JSON object")
    return value


def _record(fields: dict[str, Any], number: int) -> UsageRecord:
    if set(fields) != _FIELDS:
        raise CorruptJournal(f"line {number}: fields are not {', '.join(sorted(_FIELDS))}")
    identifier, workspace, conversation = fields["id"], fields["workspace"], fields["conversation"]
    if not isinstance(identifier, str) or not identifier or not isinstance(workspace, str):
        raise CorruptJournal(f"line {number}: id and workspace must be text")
    if conversation is not None and not isinstance(conversation, str):
        raise CorruptJournal(f"line {number}: conversation must be text or null")
    prompt, response, source = fields["prompt"], fields["response"], fields["source"]
    if not _whole(prompt) or not _whole(response):
        raise CorruptJournal(f"line {number}: token counts must be whole numbers, 0 or more")
    if source not in ("reported", "estimated"):
        raise CorruptJournal(f"line {number}: source must be reported or estimated")
    try:
        at = datetime.fromisoformat(fields["at"])
    except (TypeError, ValueError):
        raise CorruptJournal(f"line {number}: at is not an ISO 8601 time") from None
    if at.utcoffset() is None:
        raise CorruptJournal(f"line {number}: at has no time zone")
    return UsageRecord(identifier, workspace, conversation, prompt, response, source, at)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _set_aside(path: Path) -> Path:
    """Rename a refused file out of the journal's names, never over an earlier refused one."""
    for attempt in range(1000):
        kept = path.with_name(path.name + (".corrupt" if attempt == 0 else f".corrupt.{attempt}"))
        if not kept.exists():
            os.replace(path, kept)
            return kept
    return path


def fsync_directory(directory: Path) -> None:
    """Make a rename or an unlink in ``directory`` durable (the directory on disk too)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
