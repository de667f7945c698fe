"""A real Alertmanager process for tests, on a free loopback port, clustering off, storage in tmp."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.redis_fixtures import free_port

BINARY = "/usr/bin/prometheus-alertmanager"
# Alerts go nowhere: the tests read them back from Alertmanager's own API.
CONFIG = """\
route:
  receiver: blackhole
receivers:
  - name: blackhole
"""


class AlertmanagerProcess:
    """One Alertmanager; ``url`` is its base URL, ``alerts()`` what its API holds now."""

    def __init__(self, directory: Path) -> None:
        binary = BINARY if os.access(BINARY, os.X_OK) else shutil.which("prometheus-alertmanager")
        if binary is None:
            pytest.fail(
                f"Alertmanager is not installed ({BINARY} is missing): "
                "`apt-get install prometheus-alertmanager`"
            )
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "alertmanager.yml"
        config.write_text(CONFIG, encoding="utf-8")
        self.argv = [
            binary,
            f"--config.file={config}",
            f"--storage.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # empty: no gossip port, no peers
            "--log.level=warn",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.directory / "alertmanager.log").open("wb") as output:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"Alertmanager exited at start:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=0.5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Alertmanager did not become ready on port {self.port}:\n{self.log()}")
            time.sleep(0.05)

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=2) as response:
            alerts: list[dict[str, Any]] = json.loads(response.read())
        return alerts

    def log(self) -> str:
        path = self.directory / "alertmanager.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@pytest.fixture(scope="session")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertmanagerProcess]:
    """A throw-away Alertmanager for the whole session."""
    server = AlertmanagerProcess(tmp_path_factory.mktemp("alertmanager"))
    server.start()
    yield server
    server.stop()
