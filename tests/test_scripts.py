"""scripts/lib.sh: apt runs wait (bounded) for a lock another apt run holds, and a failure names its step.

apt-get runs for real, in a sandbox of its own (APT_CONFIG: empty package lists, its own dpkg
status and lock files), so the tests need neither root nor the network, and never touch the
machine's own apt state.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.debian_tools import require

ROOT = Path(__file__).resolve().parent.parent
# A script that sources lib.sh as scripts/test and scripts/run do, and installs its arguments.
INSTALL = """\
set -euo pipefail
cd "$1"
source scripts/lib.sh
shift
apt_install "$@"
echo installed
"""


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, str]:
    """The environment of an apt-get whose state, cache, lists and locks are all under tmp_path."""
    require("apt-get", "apt")
    for directory in ("state/lists/partial", "cache/archives/partial", "etc/parts", "admin", "log"):
        (tmp_path / directory).mkdir(parents=True)
    (tmp_path / "admin/status").touch()
    (tmp_path / "etc/sources.list").touch()
    conf = tmp_path / "apt.conf"
    conf.write_text(
        f'Dir::State "{tmp_path}/state";\n'
        f'Dir::State::status "{tmp_path}/admin/status";\n'
        f'Dir::Cache "{tmp_path}/cache";\n'
        f'Dir::Etc::sourcelist "{tmp_path}/etc/sources.list";\n'
        f'Dir::Etc::sourceparts "{tmp_path}/etc/parts";\n'
        f'Dir::Etc::preferencesparts "{tmp_path}/etc/parts";\n'
        f'Dir::Etc::parts "{tmp_path}/etc/parts";\n'
        f'Dir::Log "{tmp_path}/log";\n'
    )
    # A `sudo` that only runs its command: a user who is not root needs none in the sandbox.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    (stubs / "sudo").chmod(0o755)
    script = tmp_path / "install"
    script.write_text(INSTALL)
    return {**os.environ, "APT_CONFIG": str(conf), "PATH": f"{stubs}:{os.environ['PATH']}"}


# The lock `apt-get update` takes (package lists) and the one `apt-get install` takes (dpkg's).
LOCKS = {"lists": "state/lists/lock", "dpkg": "admin/lock-frontend"}


@contextmanager
def held(path: Path) -> Iterator[int]:
    """Hold an apt lock as another apt run would (fcntl, as apt itself locks)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield fd
    finally:
        os.close(fd)


def _install(sandbox: dict[str, str], *packages: str, **env: str) -> subprocess.Popen[str]:
    script = Path(sandbox["APT_CONFIG"]).parent / "install"
    return subprocess.Popen(
        ["bash", str(script), str(ROOT), *packages],
        env={**sandbox, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("lock", LOCKS, ids=["the package lists' lock", "dpkg's lock"])
def test_a_held_apt_lock_is_waited_for_then_the_install_goes_on(sandbox: dict[str, str], lock: str) -> None:
    """The install says it waits, and goes on once the other apt run lets go."""
    lock_file = Path(sandbox["APT_CONFIG"]).parent / LOCKS[lock]
    with held(lock_file):
        run = _install(sandbox)
        assert run.stderr is not None
        said = run.stderr.readline()
        assert "waiting up to 300 s for another apt run" in said, said
        assert "Could not get lock" in said
    out, err = run.communicate(timeout=120)
    assert (run.returncode, out) == (0, "installed\n"), err


def test_the_wait_is_bounded_and_the_failing_step_is_named(sandbox: dict[str, str]) -> None:
    """A lock held past APT_LOCK_TIMEOUT fails the run with apt's words and the step's name."""
    lock_file = Path(sandbox["APT_CONFIG"]).parent / LOCKS["lists"]
    with held(lock_file):
        out, err = _install(sandbox, "redis-server", APT_LOCK_TIMEOUT="0").communicate(timeout=120)
    assert out == ""
    assert "E: Could not get lock" in err
    assert err.rstrip().endswith("failed at step: installing Debian packages: redis-server (exit status 100)")


def test_an_error_other_than_a_lock_fails_at_once(sandbox: dict[str, str]) -> None:
    """An unknown package is not waited on: apt's error and the step, straight away."""
    run = _install(sandbox, "no-such-package-anywhere")
    out, err = run.communicate(timeout=120)
    assert out == ""
    assert "waiting" not in err
    assert "E: Unable to locate package no-such-package-anywhere" in err
    assert "failed at step: installing Debian packages: no-such-package-anywhere" in err


@pytest.mark.parametrize("script", ["scripts/test", "scripts/run"])
def test_the_scripts_name_the_step_that_failed(script: str, tmp_path: Path) -> None:
    """With a Python too old, each script stops at its first step and says which."""
    (tmp_path / "python3").write_text('#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.9.2"\nexit 1\n')
    (tmp_path / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    done = subprocess.run(
        [f"./{script}"], cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "python3 is Python 3.9.2; ai-policy-gateway needs Python 3.11 or newer",
        f"{script}: failed at step: finding Python 3.11 or newer (exit status 1)",
    ]
