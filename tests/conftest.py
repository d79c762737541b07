"""Shared test fixtures: where ../shared lives, and tiny model configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import types

import pytest

REPO = Path(__file__).resolve().parents[1]
# The remote-code modules live flat at the repo top and import each other relatively, as transformers loads them.
# Tests import them through a package named `chatglm` whose path is the repo top: `from chatglm.modeling_chatglm ...`.
if "chatglm" not in sys.modules:
    _package = types.ModuleType("chatglm")
    _package.__path__ = [str(REPO)]
    sys.modules["chatglm"] = _package

SHARED = Path(os.environ.get("CHATGLM_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
ASSETS = SHARED / "assets"
TOKENIZER_MODEL = ASSETS / "tokenizer" / "tokenizer.model"


def require_shared(path: Path = SHARED) -> Path:
    """Skip the calling test when the shared reference data is not next to the repo."""
    if not path.exists():
        pytest.skip(f"reference data not found at {path} (set CHATGLM_SHARED or place ../shared beside the repo)")
    return path
