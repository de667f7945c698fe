"""The judge's I/O layer on its own: quotes taken out of explanations, and failing closed."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.answers import EvaluationFailed, decide_first, decide_judged, must_wait
from gateway.audit import RequestInfo
from gateway.config import Settings
from gateway.judge.runner import QUOTE, unquoted
from gateway.policy import Context, Stage
from gateway.policy.loader import load_ruleset
from gateway.state import GatewayState

TEXT = "Please ship the bluefalcon build to the customer on Friday, the codename is a secret"


@pytest.mark.parametrize(
    ("explanation", "expected"),
    [
        pytest.param("mentions BLUEFALCON", "mentions BLUEFALCON", id="a word of the text is no quote"),
        pytest.param(
            "the text says: ship the bluefalcon build to the customer",
            "the text says:[quoted text]",
            id="a quote is taken out",
        ),
        pytest.param(f"it reads '{TEXT}' in full", "it reads '[quoted text]' in full", id="the whole text"),
        pytest.param(
            "starts 'Please ship the' and ends 'codename is a secret'",
            "starts '[quoted text]' and ends '[quoted text]'",
            id="every quote",
        ),
        pytest.param("short", "short", id="shorter than a quote"),
    ],
)
def test_an_explanation_loses_what_it_quotes(explanation: str, expected: str) -> None:
    assert unquoted(explanation, TEXT) == expected


def test_no_run_of_the_text_as_long_as_a_quote_is_left() -> None:
    explanation = "the model says the text was: " + TEXT[5:60] + " and more"
    cleaned = unquoted(explanation, TEXT)
    assert not any(cleaned[i : i + QUOTE] in TEXT for i in range(len(cleaned) - QUOTE + 1))


class _Broken:
    async def complete(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(TEXT)


async def test_a_decision_the_judge_layer_cannot_complete_fails_closed(tmp_path: Any) -> None:
    (tmp_path / "house.yaml").write_text(
        "policies:\n  - id: house.codename\n    name: Codename\n    severity: high\n    action: block\n"
        "    match:\n      judge: Do not mention BLUEFALCON\n"
    )
    state = GatewayState(Settings(), load_ruleset([tmp_path]))
    state.judge = _Broken()  # type: ignore[assignment]
    info = RequestInfo()
    decision = decide_first(state, info, Stage.PROMPT, TEXT, Context())
    assert must_wait(decision)
    with pytest.raises(EvaluationFailed):
        await decide_judged(state, info, decision, TEXT, Context())
    metrics = state.observer.metrics
    assert metrics.fallbacks.labels("policy", "evaluation_error")._value.get() == 1
