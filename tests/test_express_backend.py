"""The real Express 4 backend harness (tests/express), and what Express itself makes of a request.

The requests here go straight to the backend, no gateway: they pin down how `express.json()` with
its default options and Express's router read a request. A gateway in front of such a backend must
read a request the same way, or a prompt it judged is not the prompt the backend gets.
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest

from tests.express_fixtures import ExpressBackend

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PROMPT_PATH = "/conversation/c1/prompt"
RECEIVED = {"success": True, "message": "Prompt received"}


def call(
    express: ExpressBackend,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        express.url + path, data=body, headers=dict(headers or {}), method=method
    )
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def post_json(
    express: ExpressBackend, body: bytes, content_type: str = "application/json", **headers: str
) -> tuple[int, Any]:
    status, _, answer = call(
        express, PROMPT_PATH, body, {"Content-Type": content_type, **headers}, method="POST"
    )
    return status, json.loads(answer)


def only_record(express: ExpressBackend) -> dict[str, Any]:
    records = express.received()
    assert len(records) == 1, records
    return records[0]


def test_a_json_prompt_is_recorded_as_express_parsed_it(express: ExpressBackend) -> None:
    raw = b'{"prompt":"Summarise our release notes","model":"gpt-4o"}'

    status, answer = post_json(express, raw, Authorization="Bearer t0ken")

    assert (status, answer) == (200, RECEIVED)
    record = only_record(express)
    assert record["method"] == "POST"
    assert record["originalUrl"] == record["path"] == PROMPT_PATH
    assert record["params"] == {"conversationId": "c1"}
    assert record["body"] == {"prompt": "Summarise our release notes", "model": "gpt-4o"}
    assert record["headers"]["authorization"] == "Bearer t0ken"
    assert ["Authorization", "Bearer t0ken"] in record["rawHeaders"]
    assert base64.b64decode(record["rawBodyBase64"]) == raw
    assert "error" not in record


def test_each_test_starts_from_a_reset_backend(express: ExpressBackend) -> None:
    assert express.received() == []
    call(express, "/anything")
    assert len(express.received()) == 1
    express.reset()
    assert express.received() == []


def test_utf7_is_decoded_by_the_backend(express: ExpressBackend) -> None:
    # body-parser accepts any charset starting with "utf-" that iconv-lite knows: UTF-7 included.
    status, answer = post_json(
        express,
        b'{"prompt":"deploy with +AEEASwBJAEE-IOSFODNN7EXAMPLE"}',
        "application/json; charset=utf-7",
    )

    assert (status, answer) == (200, RECEIVED)
    assert only_record(express)["body"] == {"prompt": "deploy with AKIAIOSFODNN7EXAMPLE"}


@pytest.mark.parametrize(
    ("charset", "raw"),
    [
        ("utf-16le", b"\xff\xfe" + '{"prompt":"AKIA\u00e9"}'.encode("utf-16-le")),
        ("utf-16", b"\xff\xfe" + '{"prompt":"AKIA\u00e9"}'.encode("utf-16-le")),
        ("utf-16", b"\xfe\xff" + '{"prompt":"AKIA\u00e9"}'.encode("utf-16-be")),
        ("utf-16", '{"prompt":"AKIA\u00e9"}'.encode("utf-16-be")),  # no BOM: guessed
        ("utf-8", b"\xef\xbb\xbf" + '{"prompt":"AKIA\u00e9"}'.encode()),  # one BOM is dropped
    ],
    ids=["utf-16le+bom", "utf-16+le-bom", "utf-16+be-bom", "utf-16-be-no-bom", "utf-8+bom"],
)
def test_utf16_and_boms_are_decoded_by_the_backend(express: ExpressBackend, charset: str, raw: bytes) -> None:
    status, answer = post_json(express, raw, f"application/json; charset={charset}")

    assert (status, answer) == (200, RECEIVED)
    assert only_record(express)["body"] == {"prompt": "AKIA\u00e9"}


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("GZip", gzip.compress), ("deflate", zlib.compress)],
)
def test_compressed_bodies_are_inflated_by_the_backend(
    express: ExpressBackend, encoding: str, compress: Any
) -> None:
    raw = compress(b'{"prompt":"deploy with AKIAIOSFODNN7EXAMPLE"}')

    status, answer = post_json(express, raw, **{"Content-Encoding": encoding})

    assert (status, answer) == (200, RECEIVED)
    record = only_record(express)
    assert record["body"] == {"prompt": "deploy with AKIAIOSFODNN7EXAMPLE"}
    assert base64.b64decode(record["rawBodyBase64"]) == raw  # recorded as it came, compressed


@pytest.mark.parametrize(
    ("content_type", "extra", "status", "message"),
    [
        ("application/json; charset=latin1", {}, 415, 'unsupported charset "LATIN1"'),
        ("application/json; charset=utf-32", {}, 415, 'unsupported charset "UTF-32"'),
        ("application/json", {"Content-Encoding": "br"}, 415, 'unsupported content encoding "br"'),
        ("application/json", {"Content-Encoding": "x-gzip"}, 415, 'unsupported content encoding "x-gzip"'),
    ],
)
def test_refusals_carry_body_parsers_status_and_message(
    express: ExpressBackend, content_type: str, extra: dict[str, str], status: int, message: str
) -> None:
    got = post_json(express, b'{"prompt":"x"}', content_type, **extra)

    assert got == (status, {"success": False, "message": message})
    record = only_record(express)
    assert record["error"]["status"] == status
    assert record["params"] == {}  # refused before routing
    assert record["body"] == {}  # express.json() sets {} before it reads


def test_the_default_body_limit_is_100kb_of_inflated_json(express: ExpressBackend) -> None:
    def prompt(size: int) -> bytes:
        return b'{"prompt":"' + b"a" * (size - 13) + b'"}'

    assert post_json(express, prompt(102_400))[0] == 200
    assert post_json(express, prompt(102_401)) == (
        413,
        {"success": False, "message": "request entity too large"},
    )
    # The limit counts inflated bytes: a small gzip body that inflates past it is refused too.
    small = gzip.compress(prompt(200_000))
    assert len(small) < 2_000
    assert post_json(express, small, **{"Content-Encoding": "gzip"})[0] == 413


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        # The last charset parameter wins.
        ("application/json; charset=utf-8; charset=utf-7", {"prompt": "AKIA"}),
        ("application/json;CHARSET=UTF-7", {"prompt": "AKIA"}),
        # A Content-Type that does not parse is not JSON to body-parser: the body is not read.
        ("application/json; charset=utf-7; junk", {}),
        ("application/vnd.api+json", {}),
        ("text/plain", {}),
    ],
)
def test_which_content_types_the_backend_parses(
    express: ExpressBackend, content_type: str, body: dict[str, str]
) -> None:
    assert post_json(express, b'{"prompt":"+AEEASwBJAEE-"}', content_type) == (200, RECEIVED)
    assert only_record(express)["body"] == body


@pytest.mark.parametrize(
    ("path", "conversation_id"),
    [
        ("/CONVERSATION/c1/PROMPT/", "c1"),  # case-insensitive, optional trailing slash
        ("/conversation/c1/prompt?x=1", "c1"),
        ("/conversation/%63%31/prompt", "c1"),  # the id is percent-decoded
        ("/conversation/c%2F1/prompt", "c/1"),  # an encoded slash stays inside the id
        ("/conversation/c1/prompt//", None),
        ("/conversation//c1/prompt", None),
        ("/conversation/c1/%70rompt", None),  # the path itself is matched undecoded
        ("/conversation/a/../c1/prompt", None),  # no dot-segment normalisation
    ],
)
def test_the_router_matches_the_prompt_route_as_express_does(
    express: ExpressBackend, path: str, conversation_id: str | None
) -> None:
    status, _, answer = call(
        express, path, b'{"prompt":"x"}', {"Content-Type": "application/json"}, method="POST"
    )

    record = only_record(express)
    assert record["body"] == {"prompt": "x"}
    if conversation_id is None:
        assert (status, json.loads(answer)) == (404, {"success": False, "message": "Not found"})
        assert record["params"] == {}
    else:
        assert (status, json.loads(answer)) == (200, RECEIVED)
        assert record["params"] == {"conversationId": conversation_id}
        assert record["originalUrl"] == path


def test_default_answers_have_the_documented_shapes(express: ExpressBackend) -> None:
    status, headers, answer = call(express, "/conversation/c7/messages")
    assert status == 200
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    messages = json.loads(answer)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert {m["conversationId"] for m in messages} == {"c7"}

    listing = json.loads(call(express, "/conversation?take=1")[2])
    assert listing["success"] is True
    assert listing["total"] == 2
    assert [(c["id"], c["workspaceId"]) for c in listing["conversations"]] == [("c1", "ws-1")]

    created = call(express, "/conversation", b'{"repoId":"repo-1"}', {"Content-Type": "application/json"})
    assert json.loads(created[2]) == {"success": True, "conversationId": "conv-1"}
    assert [r["body"] for r in express.received()] == [{}, {}, {"repoId": "repo-1"}]


def test_a_programmed_answer_is_sent_verbatim_until_reset(express: ExpressBackend) -> None:
    express.answer("prompt", status=201, headers={"Content-Type": "application/x-odd"}, body=b"\xff\x00raw")

    for _ in range(2):
        status, headers, answer = call(
            express, PROMPT_PATH, b'{"prompt":"x"}', {"Content-Type": "application/json"}
        )
        assert (status, answer) == (201, b"\xff\x00raw")
        assert headers["Content-Type"] == "application/x-odd"
        assert headers["Content-Length"] == "5"
        assert "X-Powered-By" not in headers
        assert "ETag" not in headers

    express.reset()
    assert post_json(express, b'{"prompt":"x"}') == (200, RECEIVED)


async def test_a_programmed_sse_answer_streams_chunk_by_chunk(express: ExpressBackend) -> None:
    chunks = ["data: one\n\n", "data: two\n\n", "data: three\n\n"]
    express.answer(
        "prompt",
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        chunks=chunks,
        chunk_delay_ms=200,
    )

    arrivals: list[tuple[float, bytes]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(express.url + PROMPT_PATH, json={"prompt": "x"}) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Transfer-Encoding"] == "chunked"
        async for data in response.content.iter_any():
            arrivals.append((time.monotonic(), data))

    assert b"".join(data for _, data in arrivals) == "".join(chunks).encode()
    assert len(arrivals) == 3
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap > 0.1 for gap in gaps), gaps
    assert only_record(express)["body"] == {"prompt": "x"}
