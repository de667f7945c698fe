"""The gateway command: check, test, explain and eval."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.cli import main

Write = Callable[[dict[str, str]], Path]
KEY = "AKIAIOSFODNN7EXAMPLE"

RULES = """\
policies:
  - id: t.key
    name: Key
    severity: high
    action: block
    match: {regex: '\\bAKIA[A-Z2-7]{16}\\b'}
    tests:
      match: ["key AKIAIOSFODNN7EXAMPLE"]
      no_match: ["no key here"]
  - id: t.word
    name: Word
    severity: low
    action: log
    match: {keywords: [secret]}
    tests:
      match: ["a secret"]
      no_match: ["secretive"]
"""


def test_check_accepts_valid_policies(write_policies: Write, capsys: pytest.CaptureFixture[str]) -> None:
    """The summary names what was checked, as given on the command line."""
    directory = write_policies({"p.yaml": RULES})
    assert main(["check", "builtin", str(directory)]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(
        rf"ok: 10[0-9] rules, revision [0-9a-f]{{12}} \(policies: builtin, {directory}\)\n", out
    )


@pytest.mark.parametrize(
    ("command", "summary"),
    [
        pytest.param("check", r"ok: 10[0-9] rules, revision [0-9a-f]{12}", id="check"),
        pytest.param("test", r"ok: 10[0-9] rules, [0-9]{3,} cases, 0 failures", id="test"),
    ],
)
def test_check_and_test_default_to_the_builtin_pack(
    command: str, summary: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no DIR, check and test read the built-in pack and say so."""
    assert main([command]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(rf"{summary} \(policies: builtin\)", last), last


def test_check_lists_every_error_and_exits_1(
    write_policies: Write, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each error is printed as path:line: rule-id: message, then a count."""
    bad = RULES.replace("severity: high", "severity: severe").replace("[secret]", "[]")
    directory = write_policies({"p.yaml": bad})
    assert main(["check", str(directory)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{directory / 'p.yaml'}:4: t.key: severity must be")
    assert err[1].startswith(f"{directory / 'p.yaml'}:14: t.word: expected a non-empty list")
    assert err[2] == "2 error(s): policies refused"


def test_test_passes_when_every_rule_test_holds(
    write_policies: Write, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["test", str(write_policies({"p.yaml": RULES}))]) == 0
    assert "ok: 2 rules, 4 cases, 0 failures" in capsys.readouterr().out


def test_test_prints_each_failure_and_exits_1(
    write_policies: Write, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong expectation is printed with rule id, text, expected and got."""
    broken = RULES.replace('no_match: ["secretive"]', 'no_match: ["one secret"]').replace(
        'match: ["a secret"]', 'match: ["secrets"]'
    )
    directory = write_policies({"p.yaml": broken})
    assert main(["test", str(directory)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"FAIL {directory / 'p.yaml'}:10: t.word: expected match, got no match: 'secrets'"
    assert out[1] == f"FAIL {directory / 'p.yaml'}:10: t.word: expected no match, got match: 'one secret'"
    assert out[-1] == f"FAILED: 2 rules, 4 cases, 2 failures (policies: {directory})"


def test_shipped_pack_passes_its_own_tests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", str(Path(__file__).parent.parent / "policies")]) == 0


def test_explain_shows_rules_and_spans_but_never_the_matched_text(
    write_policies: Write, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explain reads stdin with '-', and prints offsets and lengths, not the secret."""
    monkeypatch.setattr("sys.stdin", io.StringIO(f"my {KEY} is secret"))
    directory = write_policies({"p.yaml": RULES})
    assert main(["explain", "--policies", str(directory), "-"]) == 0
    out = capsys.readouterr().out
    assert "decision: block" in out
    assert "t.key [high] block: Key\n    span 3-23 (20 chars)" in out
    assert "t.word [low] log: Word\n    span 27-33 (6 chars)" in out
    assert KEY not in out


def test_explain_of_clean_text_allows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--stage", "response", "hello there"]) == 0
    assert capsys.readouterr().out.startswith("decision: allow (stage response")


def test_explain_defaults_to_the_builtin_pack(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --policies, explain judges with the shipped rules."""
    assert main(["explain", f"my key is {KEY}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("decision: block (stage prompt")
    assert "- secrets.aws-access-key-id [high] block: AWS access key id\n    span 10-30 (20 chars)" in out


def _jsonl(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    return path


def test_eval_counts_per_file_and_per_rule(
    write_policies: Write, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tp/fp/fn/tn, precision, recall and false-positive rate, per file and per rule."""
    directory = write_policies({"p.yaml": RULES})
    data = _jsonl(
        tmp_path / "d.jsonl",
        [
            (f"k {KEY}", 1),
            ("a secret", 1),
            ("nothing", 1),
            ("plain", 0),
            ("my secret", 0),
        ],
    )
    assert main(["eval", "--policies", str(directory), "--json", str(data)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"][str(data)] == {
        "tp": 2,
        "fp": 1,
        "fn": 1,
        "tn": 1,
        "precision": 0.6667,
        "recall": 0.6667,
        "false_positive_rate": 0.5,
    }
    assert report["rules"]["t.key"]["tp"] == 1
    assert report["rules"]["t.key"]["fn"] == 2
    assert report["rules"]["t.word"]["fp"] == 1


def test_eval_min_action_counts_only_stronger_rules(
    write_policies: Write, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = write_policies({"p.yaml": RULES})
    data = _jsonl(tmp_path / "d.jsonl", [(f"k {KEY}", 1), ("a secret", 1), ("my secret", 0)])
    assert main(["eval", "--policies", str(directory), "--min-action", "block", "--json", str(data)]) == 0
    counts = json.loads(capsys.readouterr().out)["files"][str(data)]
    assert (counts["tp"], counts["fp"], counts["fn"], counts["tn"]) == (1, 0, 1, 1)


def test_eval_table_output(write_policies: Write, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = write_policies({"p.yaml": RULES})
    data = _jsonl(tmp_path / "d.jsonl", [(f"k {KEY}", 1), ("plain", 0)])
    assert main(["eval", "--policies", str(directory), str(data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "tp", "fp", "fn", "tn", "prec", "recall", "fpr"]
    assert lines[1].split()[1:] == ["1", "0", "0", "1", "1.000", "1.000", "0.000"]


def test_eval_refuses_a_malformed_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad line is named by file and line number; exit code 2."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": 0}\n{"label": 1}\n')
    assert main(["eval", str(data)]) == 2
    assert f"{data}:2:" in capsys.readouterr().err


def test_a_reader_that_stops_early_gets_no_error(tmp_path: Path) -> None:
    """`gateway eval ... | head -1`: the closed pipe ends the command quietly, exit 0."""
    # A row a file, 1,000 files: more than a pipe holds, so the writer meets the closed pipe.
    for index in range(1000):
        (tmp_path / f"{index}.jsonl").write_text('{"text": "key AKIAIOSFODNN7EXAMPLE", "label": 1}\n')
    files = str(tmp_path / "*.jsonl")
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{sys.executable} -m gateway eval {files} | head -1"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.stdout.startswith("file")
    assert done.stderr == ""
    assert done.returncode == 0
