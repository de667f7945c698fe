from __future__ import annotations

from pathlib import Path

import pytest

# alertmanager_fixtures imports from redis_fixtures: keep this order.
pytest_plugins = ["tests.redis_fixtures", "tests.alertmanager_fixtures", "tests.express_fixtures"]

CASES = Path(__file__).parent / "cases"


@pytest.fixture
def write_policies(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write ``{filename: yaml_text}`` into a fresh directory and return it."""

    def write(files: dict[str, str]) -> Path:
        directory = tmp_path / "policies"
        directory.mkdir(exist_ok=True)
        for name, text in files.items():
            (directory / name).write_text(text, encoding="utf-8")
        return directory

    return write
