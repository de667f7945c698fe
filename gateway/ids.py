"""Unique ids for requests, usage records and decisions, without a system call for each.

An id is 32 hex digits, as a uuid4's hex is: 16 random ones drawn once per process (again in a
forked child) and a 64-bit counter. Usage record ids are Redis idempotency markers shared by
every gateway process, so the random part must differ between processes; within one it only has
to count. ``uuid.uuid4()`` reads the kernel's random source on every call, which showed up in
the request path's profile.
"""

from __future__ import annotations

import itertools
import os


class IdSource:
    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


new_id = IdSource()
os.register_at_fork(after_in_child=new_id.reseed)
