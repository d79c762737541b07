"""Shared test fixtures: where ../shared lives, and tiny model configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The remote-code modules live flat at the repo top; tests import them as a package-less path.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("CHATGLM_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
ASSETS = SHARED / "assets"
TOKENIZER_MODEL = ASSETS / "tokenizer" / "tokenizer.model"


def require_shared(path: Path = SHARED) -> Path:
    """Skip the calling test when the shared reference data is not next to the repo."""
    if not path.exists():
        pytest.skip(f"reference data not found at {path} (set CHATGLM_SHARED or place ../shared beside the repo)")
    return path
