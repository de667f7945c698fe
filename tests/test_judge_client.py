"""The judge's model client against a real stand-in model server: verdicts and every failure path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from gateway.judge.client import Check, JudgeClient, JudgeError, JudgeSettings, parse_verdicts
from tests.judge_fixtures import ModelServer, model_app
from tests.redis_fixtures import free_port

CODENAME = Check("house.codename", "Do not mention the codename BLUEFALCON")
FIGURES = Check("house.figures", "Do not share REVENUE figures", violating=("revenue was 4M",))

Start = Callable[..., Awaitable[tuple[JudgeClient, ModelServer]]]


@pytest.fixture
async def judge(aiohttp_server: Any) -> AsyncIterator[Start]:
    sessions: list[aiohttp.ClientSession] = []

    async def start(mode: str = "ok", delay: float = 0.0, **settings: Any) -> tuple[JudgeClient, ModelServer]:
        server = ModelServer(mode=mode, delay=delay)
        http = await aiohttp_server(model_app(server))
        session = aiohttp.ClientSession()
        sessions.append(session)
        options = {"timeout": 2.0, **settings}
        client = JudgeClient(JudgeSettings(str(http.make_url("/v1")), "judge-1", **options), session)
        return client, server

    yield start
    for session in sessions:
        await session.close()


async def test_one_call_judges_every_rule(judge: Start) -> None:
    client, server = await judge(api_key="sk-test-key")
    judgement = await client.judge("ship BLUEFALCON on Friday", [CODENAME, FIGURES])
    assert server.calls == 1
    assert judgement.verdicts["house.codename"].violates is True
    assert judgement.verdicts["house.figures"].violates is False
    assert judgement.model == "judge-1"
    assert judgement.prompt_tokens > 0
    assert judgement.completion_tokens > 0
    assert server.authorizations == ["Bearer sk-test-key"]
    [body] = server.bodies
    assert body["temperature"] == 0
    assert "revenue was 4M" in body["messages"][0]["content"]  # the rule's example reached the model


async def test_a_slow_model_is_a_timeout_not_a_verdict(judge: Start) -> None:
    client, _ = await judge(delay=1.0, timeout=0.3)
    with pytest.raises(JudgeError) as caught:
        await client.judge("anything", [CODENAME])
    assert caught.value.kind == "timeout"


async def test_429_with_retry_after_is_retried_once_the_server_allows(judge: Start) -> None:
    client, server = await judge("rate_limited")
    judgement = await client.judge("BLUEFALCON", [CODENAME])
    assert judgement.verdicts["house.codename"].violates is True
    assert server.calls == 2


async def test_a_model_that_keeps_refusing_gives_up_within_the_retries(judge: Start) -> None:
    client, server = await judge("rate_limited_forever", retries=2)
    with pytest.raises(JudgeError) as caught:
        await client.judge("BLUEFALCON", [CODENAME])
    assert caught.value.kind == "rate_limited"
    assert server.calls == 3


@pytest.mark.parametrize(
    ("mode", "kind"), [("fail", "http_error"), ("malformed", "malformed"), ("partial", "malformed")]
)
async def test_an_unusable_answer_is_an_error_of_its_kind(judge: Start, mode: str, kind: str) -> None:
    client, server = await judge(mode)
    with pytest.raises(JudgeError) as caught:
        await client.judge("BLUEFALCON", [CODENAME, FIGURES])
    assert caught.value.kind == kind
    assert server.calls == 1  # an answer came: asking again would cost as much and say the same


async def test_an_unreachable_model_is_retried_then_reported() -> None:
    async with aiohttp.ClientSession() as session:
        settings = JudgeSettings(f"http://127.0.0.1:{free_port()}/v1", "judge-1", timeout=2.0, retries=1)
        with pytest.raises(JudgeError) as caught:
            await JudgeClient(settings, session).judge("text", [CODENAME])
    assert caught.value.kind == "unreachable"


async def test_calls_in_flight_are_capped(judge: Start) -> None:
    client, server = await judge(delay=0.1, max_concurrent=2)
    await asyncio.gather(*(client.judge(f"text {index}", [CODENAME]) for index in range(6)))
    assert server.calls == 6
    assert server.most_in_flight == 2


def test_verdicts_are_read_from_a_fenced_answer_and_unknown_rules_ignored() -> None:
    verdicts_json = (
        '{"verdicts": [{"rule": "house.codename", "violates": false}, {"rule": "x", "violates": true}]}'
    )
    content = f"```json\n{verdicts_json}\n```"
    verdicts = parse_verdicts({"choices": [{"message": {"content": content}}]}, [CODENAME])
    assert verdicts == {"house.codename": verdicts["house.codename"]}
    assert verdicts["house.codename"].violates is False
    with pytest.raises(JudgeError):
        parse_verdicts(
            {
                "choices": [
                    {"message": {"content": '{"verdicts": [{"rule": "house.codename", "violates": "no"}]}'}}
                ]
            },
            [CODENAME],
        )


def test_the_api_key_is_in_no_repr_of_the_settings() -> None:
    key = "sk-test-0123456789abcdef"
    assert key not in repr(JudgeSettings(url="http://127.0.0.1:1/v1", model="m", api_key=key))
