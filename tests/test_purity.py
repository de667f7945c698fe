"""The policy engine stays pure: no I/O library is imported inside gateway/policy."""

from __future__ import annotations

import ast
from pathlib import Path

import gateway.policy

FORBIDDEN = {"aiohttp", "redis", "prometheus_client", "structlog", "logging", "socket", "asyncio"}


def test_policy_package_imports_no_io_library() -> None:
    """Every module of gateway/policy imports nothing from the I/O side."""
    offenders = []
    for path in Path(gateway.policy.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [(path.name, n) for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
