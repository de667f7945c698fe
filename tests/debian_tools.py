"""Programs the tests run that come from Debian packages, which ./scripts/test installs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def require(tool: str, package: str) -> str:
    """The tool's path; a missing one fails the test (never skips) and names its package."""
    # /usr/bin too: PATH may not hold it when the tests run under another environment.
    fallback = Path("/usr/bin") / tool
    found = shutil.which(tool) or (str(fallback) if fallback.exists() else None)
    if found is None:
        pytest.fail(
            f"{tool} not found: install the Debian package `{package}` "
            f"(apt-get install {package}), as ./scripts/test does"
        )
    return found
