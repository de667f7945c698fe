"""`gateway demo` as a newcomer runs it: each printed command does what its comment says."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.demo.backend import SECRET
from gateway.demo.tour import LAST_LINE
from tests.redis_fixtures import free_ports

REPO = Path(__file__).resolve().parents[1]
# The key the printed blocked prompt carries: it may show in the printed commands, never in a log line.
PROMPT_KEY = "AKIAIOSFODNN7EXAMPLE"
WAIT = 60.0  # a bound on a hung process, not a measurement


@dataclass
class Demo:
    """One `gateway demo` process; its output (stdout and stderr) collected as it comes."""

    process: subprocess.Popen[str]
    ports: tuple[int, int, int]  # public, admin, backend
    lines: list[str] = field(default_factory=list)
    printed: bool = False
    settled: threading.Event = field(default_factory=threading.Event)  # printed, or output ended

    @classmethod
    def start(cls, port: int, admin_port: int, backend_port: int) -> Demo:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port),
             "--admin-port", str(admin_port), "--backend-port", str(backend_port)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        demo = cls(process, (port, admin_port, backend_port))
        threading.Thread(target=demo._read, daemon=True).start()
        demo.settled.wait(WAIT)
        if not demo.printed:
            process.kill()
            pytest.fail("the demo printed no commands:\n" + demo.output)
        return demo

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.strip() == LAST_LINE:
                self.printed = True
                self.settled.set()
        self.settled.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def examples(self) -> list[tuple[str, str]]:
        """(comment, command) pairs of the printed block; a command under no comment keeps the last."""
        start = next(i for i, line in enumerate(self.lines) if line.startswith("Demo ready"))
        found, comment = [], ""
        for line in self.lines[start:]:
            if line.startswith("# "):
                comment = line[2:].strip()
            elif line.startswith(("curl ", ".venv/bin/gateway ")):
                found.append((comment, line.strip()))
            elif line.strip() == LAST_LINE:
                return found
        raise AssertionError("the printed block has no end")

    def stop(self, sig: signal.Signals = signal.SIGINT) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(WAIT)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def shell(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """Runs a printed line with bash, where `.venv/bin/gateway` is this checkout's command."""
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: the demo prints curl commands (`apt-get install curl`)")
    home = tmp_path_factory.mktemp("newcomer")
    command = home / ".venv" / "bin" / "gateway"
    command.parent.mkdir(parents=True)
    command.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m gateway "$@"\n')
    command.chmod(0o755)

    def run(line: str) -> str:
        done = subprocess.run(
            ["bash", "-c", line], cwd=home, capture_output=True, text=True, timeout=WAIT, check=False
        )
        assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
        return done.stdout

    return run


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    running = Demo.start(*free_ports(3))
    yield running
    running.stop()


def status_of(shell: Callable[[str], str], command: str) -> int:
    """The HTTP status of a printed curl command, sent once more (curl's last -w wins)."""
    return int(shell(command + " -o /dev/null -w '%{http_code}'"))


def sse_events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            events.append(fields)
    return events


def allowed(shell: Callable[[str], str], command: str, output: str) -> None:
    answer = json.loads(output)
    assert answer["success"] is True
    assert "nothing to block" in answer["message"]
    assert status_of(shell, command) == 200


def prompt_blocked(shell: Callable[[str], str], command: str, output: str) -> None:
    answer = json.loads(output)
    assert answer["error_code"] == "POLICY_BLOCKED"
    assert [v["policyId"] for v in answer["violations"]] == ["secrets.aws-access-key-id"]
    assert status_of(shell, command) == 403


def streamed(shell: Callable[[str], str], command: str, output: str) -> None:
    events = sse_events(output)
    pieces = [json.loads(event["data"])["content"] for event in events if "event" not in event]
    assert len(pieces) > 3, output
    assert "".join(pieces).startswith("This answer arrives a few words per event.")
    assert events[-1] == {"event": "done", "data": '{"success": true}'}


def response_blocked(shell: Callable[[str], str], command: str, output: str) -> None:
    answer = json.loads(output)
    assert answer["error_code"] == "RESPONSE_BLOCKED"
    assert [v["policyId"] for v in answer["violations"]] == ["secrets.aws-secret-access-key"]
    assert status_of(shell, command) == 403


def stream_blocked(shell: Callable[[str], str], command: str, output: str) -> None:
    events = sse_events(output)
    assert events[-1]["event"] == "error"
    assert json.loads(events[-1]["data"])["error_code"] == "RESPONSE_BLOCKED"


def withheld(shell: Callable[[str], str], command: str, output: str) -> None:
    messages = json.loads(output)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3]["policyWithheld"] is True
    assert messages[3]["content"] == "[This message was withheld by policy: AWS secret access key]"
    assert not any(m.get("policyWithheld") for m in messages[:3])


def explained(shell: Callable[[str], str], command: str, output: str) -> None:
    lines = output.splitlines()
    assert lines[0].startswith("decision: block (stage prompt,")
    assert lines[1] == "- secrets.aws-access-key-id [high] block: AWS access key id"


def admin(shell: Callable[[str], str], command: str, output: str) -> None:
    if "/usage/" in command:
        usage = json.loads(output)
        assert usage["workspace"] == "demo"
        assert usage["requests"] >= 1
    else:
        lines = output.splitlines()
        assert lines, "no decisions counted"
        assert all(line.startswith("policy_gateway_decisions_total{") for line in lines)
        blocked = [line for line in lines if 'action="block",stage="response"' in line]
        assert blocked
        assert float(blocked[0].rsplit(" ", 1)[1]) >= 1


Check = Callable[[Callable[[str], str], str, str], None]
# In the printed order: a later example may count what an earlier one did (usage, decisions).
EXAMPLES: list[tuple[str, Check]] = [
    ("an allowed prompt", allowed),
    ("a prompt carrying a credential", prompt_blocked),
    ("a streamed answer", streamed),
    ("an answer carrying a secret", response_blocked),
    ("the same answer streamed", stream_blocked),
    ("the conversation's messages", withheld),
    ("why a text is blocked", explained),
    ("the admin port", admin),
]


def example_of(comment: str) -> str:
    """The EXAMPLES entry a printed comment starts with ("" when none does)."""
    return next((what for what, _ in EXAMPLES if comment.startswith(what)), "")


def test_every_printed_command_has_a_check(demo: Demo) -> None:
    """The block prints these examples, in this order, and nothing this test does not run."""
    printed = list(dict.fromkeys(example_of(comment) for comment, _ in demo.examples()))
    assert printed == [what for what, _ in EXAMPLES]


def test_every_printed_command_does_what_its_comment_says(demo: Demo, shell: Callable[[str], str]) -> None:
    """Run in the printed order, each command's output is what its comment promises."""
    checks = dict(EXAMPLES)
    for comment, command in demo.examples():
        checks[example_of(comment)](shell, command, shell(command))


def test_printed_ports_are_the_ones_asked_for(demo: Demo) -> None:
    """Every printed curl line goes to the gateway's public or admin port, never the backend."""
    public, admin_port, backend = demo.ports
    for _, command in demo.examples():
        if command.startswith("curl "):
            assert f"localhost:{public}/" in command or f"localhost:{admin_port}/" in command
            assert f"localhost:{backend}/" not in command


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_both_cleanly_and_no_secret_is_printed(
    sig: signal.Signals, shell: Callable[[str], str]
) -> None:
    """After the secret-bearing examples ran, a stop signal exits 0; no traceback, no secret."""
    ports = free_ports(3)
    running = Demo.start(*ports)
    try:
        for comment, command in running.examples():
            if "secret" in comment or "credential" in comment:
                shell(command)
    finally:
        code = running.stop(sig)
    output = running.output
    assert code == 0, output
    assert "Traceback" not in output
    assert SECRET not in output
    logged = output.split(LAST_LINE, 1)[1]
    assert PROMPT_KEY not in logged
    assert "policy.violation" in logged  # the blocks were logged, as their offsets and fingerprints
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "18080", "--admin-port", "18080"], "must differ"),
        (["--port", "0"], "must be a port number 1-65535"),
    ],
    ids=["ports that collide", "port zero"],
)
def test_bad_ports_are_refused(flags: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=WAIT, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr


def test_a_port_in_use_is_named_without_a_traceback() -> None:
    """The newcomer learns which flag moves the demo off a busy port."""
    port, admin_port, backend = free_ports(3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port),
             "--admin-port", str(admin_port), "--backend-port", str(backend)],
            cwd=REPO, capture_output=True, text=True, timeout=WAIT, check=False,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"('127.0.0.1', {port})" in done.stderr
    assert "choose free ports with --port, --admin-port and --backend-port" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
