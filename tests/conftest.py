"""Shared fixtures: the example model repository, built once per session (or reused when already built)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from make_models import build_repository  # noqa: E402


@pytest.fixture(scope="session")
def example_repo() -> Path:
    """The example repository (mlp, tiny, digits v1+v2), built by examples/make_models.py if missing."""
    path = Path(os.environ.get("FERRY_EXAMPLE_MODELS", ROOT / "examples" / "models"))
    build_repository(path)
    return path
