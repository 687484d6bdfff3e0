"""What a test does when something it needs is missing here: skipped locally, failed under CI=true."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(what: str, reason: str) -> NoReturn:
    """Skip the test for ``reason``; under CI=true fail it instead: CI must run every test."""
    if IN_CI:
        pytest.fail(f"CI=true requires {what}: {reason}", pytrace=False)
    pytest.skip(reason)
