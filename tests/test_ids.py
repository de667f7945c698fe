import os

from gateway.ids import IdSource, new_id


def test_ids_are_unique_hex_of_uuid_length() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in ids)


def test_two_sources_do_not_share_ids() -> None:
    first, second = IdSource(), IdSource()
    assert {first() for _ in range(100)}.isdisjoint({second() for _ in range(100)})


def test_a_forked_child_draws_its_own_prefix() -> None:
    parent = new_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    assert len(child) == 32
    assert child[:16] != parent[:16]
