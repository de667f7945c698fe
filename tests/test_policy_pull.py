"""`gateway policies pull`: the platform's policies as judge rules, against a real stand-in platform."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.audit import RequestInfo, violation_event
from gateway.platform_policies import (
    PlatformAnswerError,
    PolicyDocument,
    parse_answer,
    rule_id_for,
)
from gateway.policy import (
    Action,
    Context,
    JudgeSpec,
    PolicyError,
    Rule,
    Severity,
    Stage,
    evaluate,
    load_rules,
    load_ruleset,
)
from gateway.policy.model import Scope
from gateway.policy_pull import PullError, pull, write_policy_file

ORG = "org-1"
TOKEN = "tok-0123456789abcdef-SECRET"
# Policy content is the platform's text: it never reaches an error, only the written file.
CANARY = "Never reveal the codename ZEBRACANARY"
ROOT = Path(__file__).resolve().parent.parent


def policy(
    platform_id: str,
    *,
    content: str = CANARY,
    risk: object = "HIGH",
    action: object = 2,
    workspace: str | None = None,
    repo: str | None = None,
    name: str = "Codename",
) -> dict[str, Any]:
    return {
        "id": platform_id,
        "orgId": ORG,
        "name": name,
        "content": content,
        "riskType": risk,
        "actionType": action,
        "workspaceId": workspace,
        "repoId": repo,
        "createdAt": "2025-01-01T00:00:00Z",
    }


@dataclass
class Platform:
    """``GET /policy`` as the platform answers it: the org's policies, and those of the scope asked."""

    policies: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    raw: bytes | None = None  # answered as is, instead of the policies
    seen: list[tuple[dict[str, str], str | None]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((dict(request.query), request.headers.get("Authorization")))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"success": False, "message": "Invalid token"}, status=401)
        if self.status != 200:
            return web.json_response({"success": False, "message": "database down"}, status=self.status)
        if self.raw is not None:
            return web.Response(body=self.raw, content_type="application/json")
        query = request.query
        chosen = [
            p
            for p in self.policies
            if p.get("orgId") == query["orgId"]
            and (
                (p.get("workspaceId") is None and p.get("repoId") is None)
                or (p.get("workspaceId") is not None and p.get("workspaceId") == query.get("workspaceId"))
                or (p.get("repoId") is not None and p.get("repoId") == query.get("repoId"))
            )
        ]
        return web.json_response({"success": True, "policies": chosen})


Start = Callable[[Platform], Awaitable[str]]


@pytest.fixture
async def platform(aiohttp_server: Any) -> Start:
    async def start(stand_in: Platform) -> str:
        app = web.Application()
        app.router.add_get("/policy", stand_in.handle)
        server = await aiohttp_server(app)
        return str(server.make_url("/")).rstrip("/")

    return start


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def pulled_rules(
    url: str,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    *,
    workspaces: tuple[str, ...] = (),
    repos: tuple[str, ...] = (),
) -> dict[str, Rule]:
    """The rules of the file a pull wrote, by their reference (the platform's policy id)."""
    document = await pull(url, ORG, workspaces, repos, TOKEN, session)
    out = tmp_path / "platform.yaml"
    write_policy_file(out, document)
    rules, _ = load_rules([out])
    return {rule.reference: rule for rule in rules}


# Mappings.


@pytest.mark.parametrize(
    ("given", "query", "scope"),
    [
        pytest.param({}, {}, Scope(orgs=(ORG,)), id="an org policy is scoped to its org"),
        pytest.param(
            {"workspace": "ws-1"},
            {"workspaces": ("ws-1",)},
            Scope(workspaces=("ws-1",)),
            id="a workspace policy is scoped to its workspace",
        ),
        pytest.param(
            {"workspace": "ws-1", "repo": "repo-1"},
            {"repos": ("repo-1",)},
            Scope(repos=("repo-1",)),
            id="a repo policy is scoped to its repo",
        ),
        pytest.param(
            {"workspace": "null, [x]: y"},
            {"workspaces": ("null, [x]: y",)},
            Scope(workspaces=("null, [x]: y",)),
            id="a workspace id YAML would misread is kept as it is",
        ),
    ],
)
async def test_each_platform_scope_becomes_the_rule_scope(
    platform: Start,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    given: dict[str, str],
    query: dict[str, tuple[str, ...]],
    scope: Scope,
) -> None:
    url = await platform(Platform([policy("p-1", **given)]))
    rules = await pulled_rules(url, session, tmp_path, **query)
    assert rules["p-1"].scope == scope


@pytest.mark.parametrize(
    ("action_type", "action"),
    [(0, Action.LOG), (1, Action.ALERT), (2, Action.BLOCK)],
    ids=["actionType 0 logs", "actionType 1 alerts", "actionType 2 blocks"],
)
async def test_each_action_type_becomes_its_action(
    platform: Start, session: aiohttp.ClientSession, tmp_path: Path, action_type: int, action: Action
) -> None:
    url = await platform(Platform([policy("p-1", action=action_type)]))
    rules = await pulled_rules(url, session, tmp_path)
    assert rules["p-1"].action is action


@pytest.mark.parametrize(
    ("risk", "severity"),
    [("LOW", Severity.LOW), ("MEDIUM", Severity.MEDIUM), ("HIGH", Severity.HIGH)],
    ids=["LOW is low", "MEDIUM is medium", "HIGH is high"],
)
async def test_each_risk_type_becomes_its_severity(
    platform: Start, session: aiohttp.ClientSession, tmp_path: Path, risk: str, severity: Severity
) -> None:
    url = await platform(Platform([policy("p-1", risk=risk)]))
    rules = await pulled_rules(url, session, tmp_path)
    assert rules["p-1"].severity is severity


@pytest.mark.parametrize(
    "content",
    [
        'Do not share: "prices", #discounts,\n- penalties or ünïcode: {x}',
        "Lines with trailing spaces  \n\tand a tab\n\n",
        "- looks like a list item: and a key",
        "'quoted' | piped > folded & anchored *alias !tag %directive @at `tick`",
        "null",
        "Do not " + "share  the figures, " * 20,
    ],
    ids=[
        "quotes, a comment sign, a line break",
        "trailing spaces",
        "a list item",
        "YAML signs",
        "null",
        "long",
    ],
)
async def test_a_policy_becomes_a_judge_rule_on_both_stages_naming_its_platform_id(
    platform: Start, session: aiohttp.ClientSession, tmp_path: Path, content: str
) -> None:
    """The instruction is the platform's text exactly, whatever YAML would make of it unquoted."""
    url = await platform(Platform([policy("c1a2-B3", content=content, name="Contract terms")]))
    rule = (await pulled_rules(url, session, tmp_path))["c1a2-B3"]
    assert rule.id == "platform.c1a2-b3"
    assert rule.name == "Contract terms"
    assert rule.match == JudgeSpec(content)
    assert rule.stages == frozenset(Stage)


async def test_a_violation_of_an_imported_rule_names_the_platform_policy(
    platform: Start, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    url = await platform(Platform([policy("p-9")]))
    out = tmp_path / "platform.yaml"
    write_policy_file(out, await pull(url, ORG, (), (), TOKEN, session))
    ruleset = load_ruleset([out])
    context = Context(org=ORG, verdicts={"platform.p-9": True})
    [violation] = evaluate(ruleset, Stage.PROMPT, "some text", context).violations
    decision = evaluate(ruleset, Stage.PROMPT, "some text", context)
    event = violation_event(violation, decision, "d-1", RequestInfo(), lambda s, e: None, b"k")
    assert event["policyId"] == "platform.p-9"
    assert event["reference"] == "p-9"


def test_a_rule_without_a_reference_records_none(tmp_path: Path) -> None:
    out = tmp_path / "house.yaml"
    out.write_text(
        "policies:\n  - {id: a.b, name: B, severity: low, action: log, match: {keywords: [word]}}\n"
    )
    ruleset = load_ruleset([out])
    decision = evaluate(ruleset, Stage.PROMPT, "a word")
    [violation] = decision.violations
    event = violation_event(violation, decision, "d-1", RequestInfo(), lambda s, e: None, b"k")
    assert "reference" not in event


async def test_the_scopes_chosen_are_each_asked_once_and_merged_by_policy_id(
    platform: Start, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stand_in = Platform(
        [
            policy("org-wide"),
            policy("in-ws", workspace="ws-1", action=1),
            policy("in-repo", workspace="ws-1", repo="repo-1", action=0),
            policy("other-ws", workspace="ws-2"),
        ]
    )
    url = await platform(stand_in)
    rules = await pulled_rules(url, session, tmp_path, workspaces=("ws-1",), repos=("repo-1",))
    assert sorted(rules) == ["in-repo", "in-ws", "org-wide"]  # org-wide came in all three answers
    assert [query for query, _ in stand_in.seen] == [
        {"orgId": ORG},
        {"orgId": ORG, "workspaceId": "ws-1"},
        {"orgId": ORG, "repoId": "repo-1"},
    ]
    assert {auth for _, auth in stand_in.seen} == {f"Bearer {TOKEN}"}


# The pure conversion.


def answer(*policies: object) -> dict[str, Any]:
    return {"success": True, "policies": list(policies)}


@pytest.mark.parametrize(
    ("given", "named"),
    [
        pytest.param({"success": False, "message": "no"}, "success", id="success false"),
        pytest.param(["not", "an", "object"], "object", id="not an object"),
        pytest.param({"success": True, "policies": {}}, "list", id="policies not a list"),
        pytest.param(answer(policy("p-1"), "x"), "policy 1", id="a policy not an object"),
        pytest.param(answer({**policy("p-1"), "id": ""}), "policy 0", id="an empty id"),
        pytest.param(answer({**policy("p-1"), "id": 7}), "policy 0", id="an id not text"),
        pytest.param(
            answer({k: v for k, v in policy("p-1").items() if k != "content"}), "p-1", id="no content"
        ),
        pytest.param(answer(policy("p-1", content="  ")), "p-1", id="empty content"),
        pytest.param(answer(policy("p-1", risk="SEVERE")), "riskType", id="unknown riskType"),
        pytest.param(answer(policy("p-1", risk=None)), "riskType", id="no riskType"),
        pytest.param(answer(policy("p-1", action=3)), "actionType", id="unknown actionType"),
        pytest.param(answer(policy("p-1", action="2")), "actionType", id="actionType as text"),
        pytest.param(answer(policy("p-1", action=True)), "actionType", id="actionType as a boolean"),
        pytest.param(answer(policy("p-1"), policy("p-1")), "duplicate", id="a duplicate id"),
        pytest.param(answer(policy("A-1"), policy("a-1")), "same rule id", id="ids equal but for case"),
        pytest.param(answer({**policy("p-1"), "orgId": "org-2"}), "org-2", id="another org's policy"),
        pytest.param(answer(policy("x" * 200)), "policy 0", id="an id too long"),
    ],
)
def test_a_bad_answer_is_refused_naming_the_policy_never_its_content(given: object, named: str) -> None:
    with pytest.raises(PlatformAnswerError) as caught:
        parse_answer(given, org=ORG)
    assert named in str(caught.value)
    assert "ZEBRACANARY" not in str(caught.value)


@pytest.mark.parametrize(
    ("platform_id", "rule_id"),
    [
        ("3f2a9c1e-8b7d-4e2f-9a1b-0c3d5e7f9a1b", "platform.3f2a9c1e-8b7d-4e2f-9a1b-0c3d5e7f9a1b"),
        ("clx9Q2", "platform.clx9q2"),
        ("pol/7:x", "platform.pol-7-x"),
        ("_x", "platform.p_x"),
    ],
)
def test_a_platform_id_becomes_a_loadable_rule_id(platform_id: str, rule_id: str) -> None:
    assert rule_id_for(platform_id) == rule_id


def test_the_document_says_it_was_generated_from_where_and_when() -> None:
    document = PolicyDocument(
        parse_answer(answer(policy("p-1")), org=ORG),
        source="https://api.flashback.tech/policy",
        scopes=(f"org {ORG}", "workspace ws-1"),
        generated_at=datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
    )
    header = document.text.split("policies:")[0]
    assert "gateway policies pull" in header
    assert "https://api.flashback.tech/policy" in header
    assert "2025-03-01T12:00:00Z" in header
    assert "workspace ws-1" in header


# The loader's reference field.


@pytest.mark.parametrize(
    "reference",
    ["''", "[a, b]", "'" + "r" * 129 + "'", '"two\\nlines"'],
    ids=["empty", "not text", "too long", "two lines"],
)
def test_a_bad_reference_is_a_located_error(tmp_path: Path, reference: str) -> None:
    out = tmp_path / "p.yaml"
    out.write_text(
        "policies:\n  - id: a.b\n    name: B\n    severity: low\n    action: log\n"
        f"    reference: {reference}\n    match: {{keywords: [w]}}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_rules([out])
    [problem] = caught.value.problems
    assert (problem.line, problem.rule_id) == (6, "a.b")
    assert "reference" in problem.message


# Keep-last-good and the command.


GOOD_FILE = (
    b"# last good\npolicies:\n  - {id: a.b, name: B, severity: low, action: log, match: {keywords: [w]}}\n"
)


async def gateway(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def pull_argv(url: str, out: Path, *extra: str) -> list[str]:
    return ["policies", "pull", "--platform-url", url, "--org", ORG, "--out", str(out), *extra]


async def test_the_command_writes_a_file_that_check_accepts(platform: Start, tmp_path: Path) -> None:
    url = await platform(
        Platform([policy("p-0", action=0), policy("p-1", action=1), policy("p-2", workspace="ws-1")])
    )
    out = tmp_path / "platform.yaml"
    code, stdout, stderr = await gateway(
        *pull_argv(url, out, "--workspace", "ws-1"), env={"GATEWAY_PLATFORM_TOKEN": TOKEN}
    )
    assert (code, stderr) == (0, "")
    assert stdout == f"3 policies: 1 block, 1 alert, 1 log → {out}\n"
    assert TOKEN not in stdout + out.read_text()
    assert out.read_text().startswith(f"# Generated by `gateway policies pull` from {url}/policy")
    code, stdout, stderr = await gateway("check", str(out))
    assert code == 0, stderr
    assert stdout.startswith("ok: 3 rules")


async def test_the_token_is_read_from_a_named_variable_or_a_file(platform: Start, tmp_path: Path) -> None:
    stand_in = Platform([policy("p-1")])
    url = await platform(stand_in)
    out = tmp_path / "platform.yaml"
    code, _, stderr = await gateway(*pull_argv(url, out, "--token-env", "MY_TOKEN"), env={"MY_TOKEN": TOKEN})
    assert code == 0, stderr
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    code, _, stderr = await gateway(*pull_argv(url, out, "--token-file", str(token_file)))
    assert code == 0, stderr
    assert [auth for _, auth in stand_in.seen] == [f"Bearer {TOKEN}"] * 2


async def test_no_token_is_an_error_before_any_call(platform: Start, tmp_path: Path) -> None:
    stand_in = Platform([policy("p-1")])
    url = await platform(stand_in)
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_PLATFORM_TOKEN"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *pull_argv(url, tmp_path / "p.yaml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode == 1
    assert "GATEWAY_PLATFORM_TOKEN" in err.decode()
    assert stand_in.seen == []


BAD_ANSWERS = [
    pytest.param(Platform(status=500), "500", id="HTTP 500"),
    pytest.param(Platform(raw=b"<html>oops</html>"), "JSON", id="not JSON"),
    pytest.param(
        Platform(raw=json.dumps({"success": False, "message": CANARY}).encode()),
        "success",
        id="success false",
    ),
    pytest.param(
        Platform([{k: v for k, v in policy("p-1").items() if k != "riskType"}]),
        "p-1",
        id="a malformed policy",
    ),
    pytest.param(Platform([policy("p-1"), policy("p-2", action=7)]), "actionType", id="unknown actionType"),
]


@pytest.mark.parametrize(("stand_in", "reason"), BAD_ANSWERS)
async def test_a_bad_platform_answer_leaves_the_last_good_file(
    platform: Start, tmp_path: Path, stand_in: Platform, reason: str
) -> None:
    url = await platform(stand_in)
    out = tmp_path / "platform.yaml"
    out.write_bytes(GOOD_FILE)
    code, stdout, stderr = await gateway(*pull_argv(url, out), env={"GATEWAY_PLATFORM_TOKEN": TOKEN})
    assert (code, stdout) == (1, "")
    assert reason in stderr
    assert "kept" in stderr
    assert TOKEN not in stderr
    assert "ZEBRACANARY" not in stderr
    assert out.read_bytes() == GOOD_FILE
    assert [p.name for p in tmp_path.iterdir()] == ["platform.yaml"]  # no temporary file left


async def test_a_refused_token_leaves_the_last_good_file(platform: Start, tmp_path: Path) -> None:
    url = await platform(Platform([policy("p-1")]))
    out = tmp_path / "platform.yaml"
    out.write_bytes(GOOD_FILE)
    wrong = "wrong-token-0123456789"
    code, _, stderr = await gateway(*pull_argv(url, out), env={"GATEWAY_PLATFORM_TOKEN": wrong})
    assert code == 1
    assert "401" in stderr
    assert wrong not in stderr
    assert out.read_bytes() == GOOD_FILE


async def test_an_unreachable_platform_is_an_error(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    with pytest.raises(PullError) as caught:
        await pull("http://127.0.0.1:9", ORG, (), (), TOKEN, session)
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["ftp://host", "http://user:pw@host", "http://host/?token=x", "host"], ids=str
)
async def test_a_platform_url_with_credentials_or_no_http_is_refused(
    url: str, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(PullError) as caught:
        await pull(url, ORG, (), (), TOKEN, session)
    assert "pw" not in str(caught.value)
    assert "token=x" not in str(caught.value)


async def test_a_second_pull_of_the_same_policies_leaves_the_file_as_it_was(
    platform: Start, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The revision changes only when the policies do, not with the time of the pull."""
    url = await platform(Platform([policy("p-1")]))
    out = tmp_path / "platform.yaml"
    assert write_policy_file(out, await pull(url, ORG, (), (), TOKEN, session)) is True
    before = out.read_bytes()
    assert write_policy_file(out, await pull(url, ORG, (), (), TOKEN, session)) is False
    assert out.read_bytes() == before
