"""The redactor: every rule of the set, exception texts, short and long values, bounded memory."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from aiohttp.http_exceptions import BadHttpMessage

from gateway.audit import configure_logging
from gateway.policy import load_ruleset
from gateway.redaction import REDACTED, REDACTOR, Redactor, describe_exception

AWS = "AKIAQWERTYUIOPASDFGH"  # block
TWILIO = "SK7dfe9b5c33b0f5d2e8e023fc9a8d39e6"  # alert
EMAIL = "jane.doe+news@example.co.uk"  # log
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ4NGp1NWt2NjF2IiwiaWF0IjoxNzU0NTI0OTEyfQ"
    ".g3nBlA4tKpdQQe_WGWDA-rrc7q7p5Ao2szzcdvqT594"
)


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    redactor = Redactor()
    redactor.ruleset = load_ruleset()
    return redactor


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    before = REDACTOR.ruleset
    REDACTOR.ruleset = load_ruleset()
    configure_logging("json", stream)
    yield stream
    REDACTOR.ruleset = before


@pytest.mark.parametrize("value", [AWS, TWILIO, EMAIL, JWT], ids=["block", "alert", "log", "jwt"])
def test_a_value_any_rule_catches_is_redacted_whole(redactor: Redactor, value: str) -> None:
    """Block, alert and log rules alike: a client's id must not carry what any rule reports."""
    assert redactor.identifier(value) == REDACTED
    assert redactor.event({"conversationId": value, "requestId": "r-1"}) == {
        "conversationId": REDACTED,
        "requestId": "r-1",
    }


def test_clean_values_pass_and_content_keys_never_do(redactor: Redactor) -> None:
    assert redactor.identifier("c-42") == "c-42"
    assert redactor.identifier(None) is None
    assert redactor.event({"workspace": "ws-1", "prompt": "hello", "nested": {"text": "x", "n": 1}}) == {
        "workspace": "ws-1",
        "prompt": REDACTED,
        "nested": {"text": REDACTED, "n": 1},
    }


def test_a_text_keeps_its_words_around_what_is_replaced(redactor: Redactor) -> None:
    text = f"first line of a message, key {AWS} and card {TWILIO} end"
    redacted = redactor.text(text)
    assert AWS not in redacted
    assert TWILIO not in redacted
    assert redacted.endswith(f"key {REDACTED} and card {REDACTED} end")
    assert redacted.startswith("first line of a message, key ")


def test_rules_of_every_stage_and_scope_are_applied(tmp_path: pytest.TempPathFactory) -> None:
    """A response-only rule, scoped to one workspace and in shadow mode, still redacts."""
    folder = tmp_path / "p"  # type: ignore[operator]
    folder.mkdir()
    (folder / "p.yaml").write_text(
        "policies:\n"
        "  - id: house.codename\n    name: Codename\n    severity: low\n    action: log\n"
        "    mode: shadow\n    stages: [response]\n    scope: {workspaces: [ws-9]}\n"
        "    match: {regex: 'BLUEFALCON-[0-9]{4}'}\n"
        "  - id: house.long\n    name: Long\n    severity: low\n    action: log\n"
        "    match: {max_tokens: 1}\n"
    )
    redactor = Redactor()
    redactor.ruleset = load_ruleset([folder])
    assert redactor.identifier("BLUEFALCON-1234") == REDACTED
    # A rule that judges a whole text finds nothing to redact: it would take every value.
    assert redactor.identifier("a rather long identifier") == "a rather long identifier"


def test_the_memory_of_clean_values_is_bounded_and_never_holds_a_caught_one() -> None:
    redactor = Redactor()
    redactor.ruleset = load_ruleset()
    for index in range(5000):
        redactor.sensitive(f"id-{index}")
    assert redactor.sensitive(AWS)
    _, _, clean = redactor._current
    assert len(clean) <= 4096
    assert AWS not in clean
    redactor.ruleset = load_ruleset()
    assert len(redactor._current[2]) == 0


def test_an_exception_text_is_scanned_and_the_traceback_kept(log_lines: io.StringIO) -> None:
    try:
        int(f"value {AWS}")
    except ValueError:
        logging.getLogger("some.library").exception("conversion failed")
    [line] = [json.loads(text) for text in log_lines.getvalue().splitlines()]
    assert AWS not in log_lines.getvalue()
    assert "Traceback" in line["exception"]
    assert "ValueError" in line["exception"]
    assert REDACTED in line["exception"]
    structlog.get_logger("gateway").error("own failure", exc_info=ValueError(f"id {TWILIO}"))
    assert TWILIO not in log_lines.getvalue()


def test_bytes_the_http_parser_refused_are_never_quoted(log_lines: io.StringIO) -> None:
    """Even bytes no rule knows: the parser's quote is the client's input, whatever it holds."""
    error = BadHttpMessage("Invalid header value char:\n\n  b'X-Note: a private remark\\x01'")
    assert "private remark" not in describe_exception(error)
    try:
        raise error
    except BadHttpMessage:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "1.2.3.4")
    text = log_lines.getvalue()
    assert "private remark" not in text
    assert "BadHttpMessage: status 400" in text
