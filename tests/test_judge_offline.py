"""`gateway test` and `gateway eval` decide judge rules: from a recorded verdict file, or a live model.

The commands run as processes; the model is the real stand-in server of tests/judge_fixtures.py,
which finds a text violating when it holds an upper-case word of the rule's instruction.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.judge.offline import RecordedVerdict, RecordedVerdicts, decide
from gateway.policy import Stage, load_ruleset
from gateway.policy.selftest import Unjudged
from tests.judge_fixtures import ModelServer, model_app

KEY = "house.codename"
VIOLATING = "ship bluefalcon on Friday"
CLEAN = "ship the release on Friday"
API_KEY = "sk-test-judge-key-0123456789"
POLICY = {
    "policies": [
        {
            "id": KEY,
            "name": "Codename",
            "severity": "high",
            "action": "block",
            "match": {"judge": "Do not mention the codename BLUEFALCON"},
            "tests": {"match": [VIOLATING], "no_match": [CLEAN]},
        },
        {
            "id": "house.word",
            "name": "A plain word",
            "severity": "low",
            "action": "log",
            "match": {"keywords": ["plainword"]},
            "tests": {"match": ["a plainword here"]},
        },
    ]
}

Run = Callable[..., Awaitable[tuple[int, str, str]]]
Serve = Callable[..., Awaitable[tuple[str, ModelServer, Any]]]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def verdict_line(key: str, text: str, violates: bool, explanation: str = "recorded") -> str:
    row = {"key": key, "text_sha256": sha(text), "violates": violates, "explanation": explanation}
    return json.dumps(row) + "\n"


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "house.yaml").write_text(yaml.safe_dump(POLICY, sort_keys=False), encoding="utf-8")
    return directory


@pytest.fixture
def gateway() -> Run:
    async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        environment = {k: v for k, v in os.environ.items() if k != "GATEWAY_JUDGE_API_KEY"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**environment, **(env or {})},
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    return run


@pytest.fixture
async def model(aiohttp_server: Any) -> Serve:
    async def serve(mode: str = "ok") -> tuple[str, ModelServer, Any]:
        server = ModelServer(mode=mode)
        http = await aiohttp_server(model_app(server))
        return str(http.make_url("/v1")), server, http

    return serve


async def test_judge_cases_are_skipped_without_a_source(policies: Path, gateway: Run) -> None:
    code, out, _ = await gateway("test", str(policies))
    assert code == 0
    assert f"{KEY}: needs the judge: skipped (2 cases)" in out
    assert "ok: 2 rules, 3 cases, 0 failures, 2 skipped" in out


async def test_recorded_verdicts_decide_the_cases(policies: Path, tmp_path: Path, gateway: Run) -> None:
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text(verdict_line(KEY, VIOLATING, True) + verdict_line(KEY, CLEAN, False))
    code, out, err = await gateway("test", str(policies), "--verdicts", str(verdicts))
    assert (code, err) == (0, "")
    assert "SKIP" not in out
    assert "ok: 2 rules, 3 cases, 0 failures, 2 judged" in out


async def test_a_wrong_recorded_verdict_fails_the_case(policies: Path, tmp_path: Path, gateway: Run) -> None:
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text(verdict_line(KEY, VIOLATING, False) + verdict_line(KEY, CLEAN, False))
    code, out, _ = await gateway("test", str(policies), "--verdicts", str(verdicts))
    assert code == 1
    assert f"FAIL {policies / 'house.yaml'}:2: {KEY}: expected match, got no match: {VIOLATING!r}" in out
    assert "FAILED: 2 rules, 3 cases, 1 failures" in out


async def test_a_missing_verdict_fails_the_case_naming_its_key(
    policies: Path, tmp_path: Path, gateway: Run
) -> None:
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text(verdict_line(KEY, VIOLATING, True))
    code, out, _ = await gateway("test", str(policies), "--verdicts", str(verdicts))
    assert code == 1
    assert f"{KEY}: no recorded verdict for {KEY} (run with --judge-url" in out
    assert "--record FILE" in out
    assert "1 failures" in out


async def test_a_bad_verdict_file_is_refused_by_file_and_line(
    policies: Path, tmp_path: Path, gateway: Run
) -> None:
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text(
        verdict_line(KEY, VIOLATING, True)
        + "\n"
        + '{"key": "house.codename", "text_sha256": "abc", "violates": true}\n'
        + "not json\n"
        + json.dumps({"key": KEY, "text_sha256": sha(CLEAN), "violates": "no"})
        + "\n"
    )
    code, out, err = await gateway("test", str(policies), "--verdicts", str(verdicts))
    assert code == 2
    assert out == ""
    assert f"{verdicts}:3: text_sha256" in err
    assert f"{verdicts}:4: " in err
    assert f"{verdicts}:5: violates" in err
    assert f"{verdicts}:1:" not in err


async def test_a_live_model_decides_and_record_replays_offline(
    policies: Path, tmp_path: Path, gateway: Run, model: Serve
) -> None:
    url, server, http = await model()
    record = tmp_path / "recorded.jsonl"
    record.write_text(verdict_line("other.rule", "kept from an earlier run", True))
    code, out, err = await gateway(
        "test", str(policies), "--judge-url", url, "--judge-model", "judge-1", "--record", str(record),
        env={"GATEWAY_JUDGE_API_KEY": API_KEY},
    )  # fmt: skip
    assert (code, err) == (0, ""), out
    assert "ok: 2 rules, 3 cases, 0 failures, 2 judged" in out
    assert API_KEY not in out
    assert server.calls == 2  # one call a text, the plain rule never asks
    assert set(server.authorizations) == {f"Bearer {API_KEY}"}
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["key"], r["text_sha256"], r["violates"]) for r in rows] == sorted(
        [
            (KEY, sha(VIOLATING), True),
            (KEY, sha(CLEAN), False),
            ("other.rule", sha("kept from an earlier run"), True),
        ]
    )
    assert {r["explanation"] for r in rows if r["key"] == KEY} == {"mentions BLUEFALCON", "nothing forbidden"}
    first = record.read_text()

    # Recording again gives the same file, byte for byte.
    code, _, _ = await gateway(
        "test", str(policies), "--judge-url", url, "--judge-model", "judge-1", "--record", str(record)
    )
    assert code == 0
    assert record.read_text() == first

    await http.close()  # the model is gone: CI replays what was recorded
    code, out, err = await gateway("test", str(policies), "--verdicts", str(record))
    assert (code, err) == (0, "")
    assert "ok: 2 rules, 3 cases, 0 failures, 2 judged" in out


async def test_the_api_key_can_come_from_a_file(
    policies: Path, tmp_path: Path, gateway: Run, model: Serve
) -> None:
    url, server, _ = await model()
    key_file = tmp_path / "judge.key"
    key_file.write_text(API_KEY + "\n")
    code, out, err = await gateway(
        "test", str(policies), "--judge-url", url, "--judge-model", "m", "--judge-api-key-file", str(key_file)
    )
    assert (code, err) == (0, ""), out
    assert API_KEY not in out
    assert set(server.authorizations) == {f"Bearer {API_KEY}"}


async def test_a_malformed_answer_fails_the_case_with_its_kind(
    policies: Path, tmp_path: Path, gateway: Run, model: Serve
) -> None:
    url, _, _ = await model("malformed")
    record = tmp_path / "recorded.jsonl"
    code, out, _ = await gateway(
        "test", str(policies), "--judge-url", url, "--judge-model", "m", "--record", str(record)
    )
    assert code == 1
    assert f"{KEY}: judge error: malformed" in out
    assert "FAILED: 2 rules, 3 cases, 2 failures" in out
    assert not record.exists() or record.read_text() == ""  # nothing recorded for what was not judged


async def test_judge_options_are_checked(policies: Path, tmp_path: Path, gateway: Run) -> None:
    code, _, err = await gateway("test", str(policies), "--judge-url", "http://127.0.0.1:9/v1")
    assert code == 2
    assert "--judge-model" in err
    code, _, err = await gateway("test", str(policies), "--record", str(tmp_path / "r.jsonl"))
    assert code == 2
    assert "--record" in err


def _labelled(path: Path, rows: list[tuple[str, int]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    return path


async def test_eval_counts_judge_flagged_lines_from_recorded_verdicts(
    policies: Path, tmp_path: Path, gateway: Run
) -> None:
    data = _labelled(
        tmp_path / "labelled.jsonl",
        [(VIOLATING, 1), ("BLUEFALCON ships", 1), (CLEAN, 0), ("a plainword here", 0)],
    )
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text(
        verdict_line(KEY, VIOLATING, True)
        + verdict_line(KEY, "BLUEFALCON ships", True)
        + verdict_line(KEY, CLEAN, False)
        + verdict_line(KEY, "a plainword here", False)
    )
    code, out, err = await gateway(
        "eval", "--policies", str(policies), "--json", "--verdicts", str(verdicts), str(data)
    )
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["files"][str(data)]["tp"] == 2
    assert report["files"][str(data)]["fp"] == 1  # the plain rule flags a line labelled clean
    assert report["files"][str(data)]["tn"] == 1
    assert report["files"][str(data)]["unjudged"] == 0
    assert report["rules"][KEY]["tp"] == 2
    assert report["rules"][KEY]["tn"] == 2


async def test_eval_without_a_source_counts_pending_lines_as_unjudged(
    policies: Path, tmp_path: Path, gateway: Run
) -> None:
    data = _labelled(tmp_path / "labelled.jsonl", [(VIOLATING, 1), (CLEAN, 0), ("a plainword here", 0)])
    code, out, err = await gateway("eval", "--policies", str(policies), "--json", str(data))
    assert code == 0
    counts = json.loads(out)["files"][str(data)]
    # The plain rule decides the third line; the judge alone could decide the first two.
    assert (counts["tp"], counts["fp"], counts["fn"], counts["tn"], counts["unjudged"]) == (0, 1, 0, 0, 2)
    assert json.loads(out)["rules"][KEY]["unjudged"] == 3
    assert "3 text(s) left unjudged" in err

    code, out, err = await gateway("eval", "--policies", str(policies), str(data))
    assert code == 0
    assert out.splitlines()[0].split()[-1] == "unjudged"


async def test_eval_with_a_live_model(policies: Path, tmp_path: Path, gateway: Run, model: Serve) -> None:
    url, server, _ = await model()
    data = _labelled(tmp_path / "labelled.jsonl", [(VIOLATING, 1), (CLEAN, 0)])
    code, out, err = await gateway(
        "eval", "--policies", str(policies), "--json", "--judge-url", url, "--judge-model", "m", str(data)
    )
    assert (code, err) == (0, "")
    counts = json.loads(out)["files"][str(data)]
    assert (counts["tp"], counts["tn"], counts["unjudged"]) == (1, 1, 0)
    assert server.calls == 2


def test_decide_asks_the_source_for_each_pending_check_by_key(tmp_path: Path) -> None:
    """Two judges in one rule are keyed rule#1, rule#2; each needs its own recorded verdict."""
    rule = {
        "id": "t.two",
        "name": "Two judges",
        "severity": "high",
        "action": "block",
        "match": {"all": [{"judge": "Do not name ORION"}, {"judge": "Do not name VEGA"}]},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"policies": [rule]}))
    ruleset = load_ruleset([tmp_path])
    text = "orion and vega"
    both = RecordedVerdicts({
        ("t.two#1", sha(text)): RecordedVerdict("t.two#1", sha(text), True),
        ("t.two#2", sha(text)): RecordedVerdict("t.two#2", sha(text), True),
    })  # fmt: skip
    decision = decide(ruleset, Stage.PROMPT, text, both)
    assert decision.blocked
    assert decision.pending == ()
    one = RecordedVerdicts({("t.two#1", sha(text)): RecordedVerdict("t.two#1", sha(text), True)})
    with pytest.raises(Unjudged) as caught:
        decide(ruleset, Stage.PROMPT, text, one)
    assert caught.value.kind == "missing"
    assert "no recorded verdict for t.two#2 (" in str(caught.value)
    assert text not in str(caught.value)
