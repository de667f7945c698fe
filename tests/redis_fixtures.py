"""Real redis-server processes for tests, each on a free loopback port (never the machine's 6379)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on, distinct: all are held open until all are chosen."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class RedisProcess:
    """One redis-server; ``restart`` brings it back on the same port and directory (same data)."""

    def __init__(
        self, directory: Path, *, persistent: bool, port: int | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: `apt-get install redis-server` (./scripts/test does)")
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        )
        self.argv = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            *persistence,
            "--dir", str(directory),
            "--logfile", str(directory / "redis.log"),
            *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while True:
                if self.process.poll() is not None:
                    pytest.fail(f"redis-server exited at start:\n{self.log()}")
                try:
                    # Ready only once the append-only file is loaded: PING answers LOADING before.
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"redis-server did not answer on port {self.port}:\n{self.log()}")
                    time.sleep(0.02)
        finally:
            client.close()

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what was fsynced survives."""
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)


class RedisClusterProcesses:
    """Three master nodes, no replicas, with every slot assigned; ``url`` is a ``redis+cluster://`` URL."""

    def __init__(self, directory: Path) -> None:
        ports = free_ports(6)
        self.nodes = [
            RedisProcess(
                directory / f"node-{port}",
                persistent=False,
                port=port,
                extra=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(bus),
                    "--cluster-config-file",
                    "nodes.conf",
                ),
            )
            for port, bus in zip(ports[:3], ports[3:], strict=True)
        ]
        self.url = f"redis+cluster://127.0.0.1:{ports[0]}/0"

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed: `apt-get install redis-tools` (./scripts/test does)")
        for node in self.nodes:
            node.directory.mkdir()
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run(create, check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        for node in self.nodes:
            with node.client() as client:
                while _cluster_state(client) != "ok":
                    if time.monotonic() > deadline:
                        pytest.fail(f"the cluster did not converge:\n{node.log()}")
                    time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def _cluster_state(client: redis.Redis) -> str:
    info = client.execute_command("CLUSTER INFO")  # parsed into a dict by recent redis-py only
    if isinstance(info, dict):
        return str(info.get("cluster_state"))
    return dict(line.split(":", 1) for line in str(info).splitlines() if ":" in line).get("cluster_state", "")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A throw-away redis-server for the whole session (no persistence)."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"), persistent=False)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def clean_redis(redis_server: RedisProcess) -> RedisProcess:
    """The session's redis-server, emptied so that no test sees another's keys."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    """A small real Redis Cluster of this test alone."""
    cluster = RedisClusterProcesses(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, with every write fsynced, to pause, kill and restart."""
    server = RedisProcess(tmp_path, persistent=True)
    server.start()
    yield server
    server.kill()
