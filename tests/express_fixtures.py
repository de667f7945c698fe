"""A real Node/Express 4 backend for tests (tests/express/server.js), on two free loopback ports.

Its public port is the upstream a gateway under test proxies to; its control port (never behind
the gateway) tells what Express itself received, as ``express.json()`` with its default options
parsed it, and programs its answers. See tests/express/server.js for the record's fields.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.redis_fixtures import free_ports

EXPRESS_DIR = Path(__file__).parent / "express"
SERVER = EXPRESS_DIR / "server.js"
START_TIMEOUT = 20.0
INSTALL_HINT = "./scripts/test installs them (apt-get install nodejs npm; npm ci --prefix tests/express)"

Route = Literal["prompt", "messages", "conversations", "other"]
HeaderValue = str | Sequence[str]

# Control calls go straight to loopback, whatever http_proxy the environment sets.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ExpressProcess:
    """One ``node server.js``; ``url`` is the public base URL, ``control_url`` the control one."""

    def __init__(self, directory: Path) -> None:
        node = shutil.which("node")
        if node is None:
            pytest.fail(f"node is not installed: {INSTALL_HINT}")
        if not (EXPRESS_DIR / "node_modules" / "express" / "package.json").is_file():
            pytest.fail(f"{EXPRESS_DIR / 'node_modules'} is missing express: {INSTALL_HINT}")
        self.node = node
        self.directory = directory
        self.port = 0
        self.control_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def start(self) -> None:
        # Three attempts: a free port can be taken by someone else between probing and listening.
        for _ in range(3):
            self.port, self.control_port = free_ports(2)
            if self._start_once():
                return
        pytest.fail(f"the Express backend found its ports taken three times; node's stderr:\n{self.stderr()}")

    def _start_once(self) -> bool:
        """True once `ready`; False when the port was taken (try again); pytest.fail otherwise."""
        stdout_path, stderr_path = self.directory / "stdout.log", self.directory / "stderr.log"
        argv = [
            self.node, str(SERVER),
            "--port", str(self.port), "--control-port", str(self.control_port),
            "--exit-with-stdin",
        ]  # fmt: skip
        # Node's stdin is a pipe only this process holds: should pytest die, node exits too.
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=EXPRESS_DIR
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if b"ready\n" in stdout_path.read_bytes():
                return True
            if self.process.poll() is not None:
                if b"EADDRINUSE" in stderr_path.read_bytes():
                    return False
                pytest.fail(
                    f"the Express backend exited with {self.process.returncode} before `ready`:\n"
                    f"{self.stderr()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"the Express backend did not print `ready` within {START_TIMEOUT:.0f}s "
                    f"(ports {self.port}, {self.control_port}); node's stderr:\n{self.stderr()}"
                )
            time.sleep(0.02)

    def stderr(self) -> str:
        path = self.directory / "stderr.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def control(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.control_url}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with _OPENER.open(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise AssertionError(
                f"Express control call {method} {path} failed: {error.code} {detail}"
            ) from None


class ExpressBackend:
    """What a test sees of the Express backend: its URL, what it received, its programmed answers."""

    def __init__(self, process: ExpressProcess) -> None:
        self._process = process
        self.url = process.url
        self.control_url = process.control_url

    def received(self) -> list[dict[str, Any]]:
        """Every request since the last reset, in order, as Express saw and parsed it."""
        records: list[dict[str, Any]] = self._process.control("GET", "/received")
        return records

    def reset(self) -> None:
        """Forget the records and the programmed answers (done before every test)."""
        self._process.control("POST", "/reset", {})

    def answer(
        self,
        route: Route,
        *,
        status: int = 200,
        headers: Mapping[str, HeaderValue] | None = None,
        body: str | bytes | None = None,
        chunks: Sequence[str | bytes] | None = None,
        chunk_delay_ms: int = 0,
        delay_ms: int = 0,
    ) -> None:
        """Program ``route``'s answer until the next reset.

        Sent verbatim with exactly ``headers`` (a Content-Length is added to a ``body`` answer
        that names neither Content-Length nor Transfer-Encoding); ``chunks`` are written one by
        one, ``chunk_delay_ms`` apart, chunked; ``delay_ms`` waits before the status line.
        """
        if body is not None and chunks is not None:
            raise ValueError("give body or chunks, not both")
        program: dict[str, Any] = {
            "route": route,
            "status": status,
            "headers": {
                name: value if isinstance(value, str) else list(value)
                for name, value in (headers or {}).items()
            },
            "chunkDelayMs": chunk_delay_ms,
            "delayMs": delay_ms,
        }
        if isinstance(body, str):
            program["body"] = body
        elif isinstance(body, bytes):
            program["bodyBase64"] = base64.b64encode(body).decode()
        if chunks is not None:
            if all(isinstance(chunk, str) for chunk in chunks):
                program["chunks"] = list(chunks)
            else:
                program["chunksBase64"] = [
                    base64.b64encode(chunk.encode() if isinstance(chunk, str) else chunk).decode()
                    for chunk in chunks
                ]
        self._process.control("POST", "/answer", program)


@pytest.fixture(scope="session")
def express_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExpressProcess]:
    process = ExpressProcess(tmp_path_factory.mktemp("express"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def express(express_server: ExpressProcess) -> ExpressBackend:
    """The session's Express backend, reset: no records, default answers."""
    if express_server.process is not None and express_server.process.poll() is not None:
        pytest.fail(f"the Express backend has exited:\n{express_server.stderr()}")
    backend = ExpressBackend(express_server)
    backend.reset()
    return backend
