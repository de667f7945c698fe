"""The backend's shapes: error bodies, block bodies, and where its answers carry text."""

from __future__ import annotations

from collections.abc import Iterable

from gateway import jsonlib
from gateway.policy import Decision, Stage, Violation
from gateway.redaction import REDACTOR

# Where an answer carries the text meant for the user: what is counted as response tokens, and,
# in a stream, the text a client joins from event to event (so a match split across events is
# still seen whole). It does not limit what is inspected: every string of an answer is.
# `message` is what the backend sends today; the others are the shapes the docs say may come,
# and the streaming shapes of the common model APIs.
DEFAULT_RESPONSE_FIELDS = (
    "message",
    "content",
    "response",
    "text",
    "delta",  # OpenAI Responses API events: {"type": "response.output_text.delta", "delta": ...}
    "message.content",  # Ollama
    "choices[].message.content",
    "choices[].delta.content",
    "choices[].delta.reasoning_content",
    "choices[].delta.refusal",
    "choices[].delta.tool_calls[].function.arguments",
    "choices[].text",  # OpenAI completions
    "delta.text",  # Anthropic text_delta
    "delta.partial_json",  # Anthropic input_json_delta
    "delta.thinking",  # Anthropic thinking_delta
    "delta.message.content.text",  # Cohere v2
    "candidates[].content.parts[].text",  # Gemini
)

POLICY_BLOCKED = "POLICY_BLOCKED"
RESPONSE_BLOCKED = "RESPONSE_BLOCKED"
EVALUATION_FAILED = "POLICY_EVALUATION_FAILED"
QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
# Every refusal the gateway writes carries a code, so a client tells them apart without
# matching message text.
INVALID_REQUEST = "INVALID_REQUEST"
UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
BODY_TOO_LARGE = "BODY_TOO_LARGE"
UPSTREAM_UNREACHABLE = "UPSTREAM_UNREACHABLE"
UPSTREAM_TIMEOUT = "UPSTREAM_TIMEOUT"
ANSWER_NOT_INSPECTABLE = "ANSWER_NOT_INSPECTABLE"


def error_body(message: str, **extra: object) -> bytes:
    # An error body is a sink like a log line: a message that echoes input is redacted.
    return jsonlib.dumps({"success": False, "message": REDACTOR.text(message), **extra})


def violation_records(violations: Iterable[Violation]) -> list[dict[str, str]]:
    """What a client may learn of a violation: never the matched text, nor its offsets."""
    return [
        {
            "policyId": v.rule_id,
            "policyName": v.name,
            "severity": v.severity.value,
            "stage": v.stage.value,
        }
        for v in violations
    ]


def blocking(decision: Decision) -> list[Violation]:
    return [v for v in decision.violations if v.effective_action is decision.action]


def block_body(decision: Decision) -> bytes:
    """The 403 body for a blocked prompt or response."""
    culprits = blocking(decision)
    names = ", ".join(dict.fromkeys(v.name for v in culprits))
    if decision.stage is Stage.PROMPT:
        message, code = f"Prompt blocked by policy: {names}", POLICY_BLOCKED
    else:
        message, code = f"Response blocked by policy: {names}", RESPONSE_BLOCKED
    return error_body(message, error_code=code, violations=violation_records(culprits))


def withheld_notice(decision: Decision) -> str:
    names = ", ".join(dict.fromkeys(v.name for v in blocking(decision)))
    return f"[This message was withheld by policy: {names}]"


def parse_field_path(path: str) -> tuple[str, ...]:
    """``choices[].message.content`` -> ("choices", "[]", "message", "content")."""
    steps: list[str] = []
    for part in path.split("."):
        if part.endswith("[]"):
            steps += [part[:-2], "[]"]
        else:
            steps.append(part)
    if not path or any(not step for step in steps):
        raise ValueError(f"bad response field path {path!r}: use names, dots and [] for lists")
    return tuple(steps)
