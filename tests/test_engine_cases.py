"""Table-driven engine cases from tests/cases/engine.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.policy import Action, Context, Stage, evaluate, load_ruleset

CASES = Path(__file__).parent / "cases" / "engine.yaml"


def _load() -> list[Any]:
    data = yaml.safe_load(CASES.read_text(encoding="utf-8"))
    rows = []
    for group in data["groups"]:
        for case in group["cases"]:
            rows.append(pytest.param(group["policies"], case, id=f"{group['note']}: {case['note']}"))
    return rows


@pytest.mark.parametrize(("policies", "case"), _load())
def test_case(policies: list[dict[str, Any]], case: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"policies": policies}), encoding="utf-8")
    ruleset = load_ruleset([tmp_path])
    text = case["text"]
    decision = evaluate(ruleset, Stage(case.get("stage", "prompt")), text, Context(**case.get("context", {})))
    want = case["want"]
    got = {v.rule_id: [[s.start, s.end] for s in v.spans] for v in decision.violations}
    assert got == want["violations"]
    assert decision.action is Action[want["action"].upper()]
    assert decision.revision == ruleset.revision
    for violation in decision.violations:
        assert all(0 <= s.start <= s.end <= len(text) for s in violation.spans)
