"""The README and the docs pages are executed: every ``console`` example is run, its output compared.

Sybil finds the examples (fenced blocks in ``console``); each is a shell session, ``$ `` commands
each followed by the output it shows (a trailing ``\\`` continues a command on the next line, a
here-document runs to its end word). The commands of one page run in order, from the checkout,
against one ``gateway demo`` started as the README says, on free ports: the page's ``8080``,
``9090`` and ``8000`` are those ports, in the commands as in the outputs. Ids, timestamps and
durations are normalised; a line ``...`` stands for any number of lines. Blocks in ``sh`` are
instructions, not run.
"""

from __future__ import annotations

import asyncio
import difflib
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sybil import Example, Sybil
from sybil.parsers.markdown import CodeBlockParser

from tests.redis_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHOWN_PORTS = ("8080", "9090", "8000")  # public, admin, the demo's backend

# What differs from run to run, and how the pages show it.
_NORMAL = [
    (re.compile(r"\b[0-9a-f]{32}\b"), "<id>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z?"), "<time>"),
    (re.compile(r"\d{4}-\d\d-\d\d\b"), "<date>"),
    (re.compile(r'("(?:durationMs|upstreamMs)":)[0-9.]+'), r"\1<ms>"),
]


def normalised(text: str) -> list[str]:
    for pattern, replacement in _NORMAL:
        text = pattern.sub(replacement, text)
    return [line.rstrip() for line in text.rstrip().splitlines()]


def matches(expected: list[str], got: list[str]) -> bool:
    """Line by line; an expected ``...`` line matches any number of lines."""
    if not expected:
        return not got
    if expected[0] == "...":
        return any(matches(expected[1:], got[skip:]) for skip in range(len(got) + 1))
    return bool(got) and expected[0] == got[0] and matches(expected[1:], got[1:])


def session(block: str) -> Iterator[tuple[str, list[str]]]:
    """(command, the output lines shown after it) for each ``$ `` command of a block."""
    command: list[str] | None = None
    output: list[str] = []
    continued = False
    heredoc: str | None = None  # the word that ends a here-document the command opened
    for line in block.splitlines():
        if heredoc is not None and command is not None:
            command.append(line)
            heredoc = None if line == heredoc else heredoc
        elif continued and command is not None:
            command.append(line)
            continued = line.endswith("\\")
        elif line.startswith("$ "):
            if command is not None:
                yield "\n".join(command), output
            command, output = [line[2:]], []
            continued = line.endswith("\\")
            opened = re.search(r"<<-?'?(\w+)'?", line)
            heredoc = opened.group(1) if opened else None
        else:
            output.append(line)
    if command is not None:
        yield "\n".join(command), output


@dataclass
class Shell:
    """Runs a page's commands from the checkout, with the demo's ports in place of the shown ones."""

    ports: dict[str, int]

    def run(self, command: str) -> str:
        for shown, real in self.ports.items():
            command = command.replace(f":{shown}", f":{real}")
        env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "100"}
        done = subprocess.run(
            ["bash", "-c", command],
            check=False,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = done.stdout + done.stderr
        for shown, real in self.ports.items():
            out = out.replace(f":{real}", f":{shown}")
        return out


def evaluate(example: Example) -> str | None:
    shell: Shell = example.namespace["shell"]
    failures = []
    for command, shown in session(str(example.parsed)):
        got = shell.run(command)
        if not matches(normalised("\n".join(shown)), normalised(got)):
            diff = "\n".join(
                difflib.unified_diff(
                    normalised("\n".join(shown)), normalised(got), "shown", "got", lineterm=""
                )
            )
            failures.append(f"$ {command}\n{diff}")
    return "\n\n".join(failures) or None


SYBIL = Sybil(parsers=[CodeBlockParser(language="console", evaluator=evaluate)])


def examples(page: Path) -> list[Example]:
    return list(SYBIL.parse(page).examples())


def test_the_pages_have_console_examples() -> None:
    counts = {page.name: len(examples(page)) for page in PAGES}
    assert counts["README.md"] >= 5, counts
    assert sum(counts.values()) >= 10, counts


async def _start_demo(ports: dict[str, int]) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        str(ROOT / ".venv" / "bin" / "gateway"), "demo",
        "--port", str(ports["8080"]), "--admin-port", str(ports["9090"]),
        "--backend-port", str(ports["8000"]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(30):
        while b"Try" not in await process.stdout.readline():
            assert process.returncode is None, "the demo stopped"
    return process


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
async def test_every_console_example_shows_what_the_command_prints(page: Path) -> None:
    found = examples(page)
    if not found:
        pytest.skip("no console example on this page")
    ports = {shown: free_port() for shown in SHOWN_PORTS}
    demo = await _start_demo(ports)
    try:
        failures = []
        for example in found:
            example.namespace["shell"] = Shell(ports)
            # The commands call the demo's ports: run them off the loop that the test runs on.
            try:
                await asyncio.to_thread(example.evaluate)
            except Exception as exc:  # sybil raises SybilFailure with the evaluator's text
                failures.append(f"{page.name}, line {example.line}:\n{exc}")
        assert not failures, "\n\n".join(failures)
    finally:
        demo.terminate()
        await demo.wait()


def test_the_pack_table_is_the_generated_one() -> None:
    """docs/builtin-pack.md carries bench/pack_table.py's output for the pack as it is."""
    generated = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "bench/pack_table.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert generated in (ROOT / "docs" / "builtin-pack.md").read_text(encoding="utf-8"), (
        "the pack changed: regenerate the table (.venv/bin/python bench/pack_table.py)"
    )


def test_an_edited_output_fails_and_the_true_one_passes(tmp_path: Path) -> None:
    """The comparison is not vacuous: a page whose shown output is off by one figure fails."""
    true = (
        "```console\n$ .venv/bin/gateway test\n"
        "ok: 100 rules, 589 cases, 0 failures (policies: builtin)\n```\n"
    )
    page = tmp_path / "page.md"
    for text, fails in ((true, False), (true.replace("589 cases", "588 cases"), True)):
        page.write_text(text)
        [example] = examples(page)
        example.namespace["shell"] = Shell({})
        if fails:
            with pytest.raises(Exception, match="588 cases"):
                example.evaluate()
        else:
            example.evaluate()
