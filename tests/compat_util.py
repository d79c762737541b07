"""Helpers for the client-compatibility tests (tests/test_compat_*.py, issue 6).

The tests build tiny random-weight model folders with tools/make_tiny_model.py (our code files, configs, weights,
and, where the tokenizer is involved, the real tokenizer.model from ../shared) and then make the calls that
existing client programs make, the way they make them: `from_pretrained(dir, trust_remote_code=True, ...)`.
"""
from __future__ import annotations

import functools
import inspect
import sys
import uuid
from pathlib import Path

import pytest
import torch

from conftest import REPO, TOKENIZER_MODEL, require_shared

sys.path.insert(0, str(REPO / "tools"))
from make_tiny_model import make_tiny_model  # noqa: E402

import transformers  # noqa: E402

TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])
# TrainingArguments that keep Trainer on the CPU; releases without `use_cpu` (4.30) call it `no_cuda`
CPU_TRAINING = ({"use_cpu": True} if "use_cpu" in transformers.TrainingArguments.__dataclass_fields__
                else {"no_cuda": True})

# Module names the official multi-GPU helper (ChatGLM2/3 `utils.auto_configure_device_map`) puts in its device map.
OFFICIAL_DEVICE_MAP_MODULES = (
    "transformer.embedding.word_embeddings",
    "transformer.rotary_pos_emb",
    "transformer.encoder.final_layernorm",
    "transformer.output_layer",
)


def build(root: Path, name: str, variant: str = "chatglm3-6b", tokenizer: bool = False, seed: int = 0) -> Path:
    """A tiny model folder; with `tokenizer` it also holds the real tokenizer.model (skips without ../shared).

    The folder name is unique per call: transformers 4.30 caches remote code under the folder's base name
    (~/.cache/huggingface/modules/transformers_modules/<name>/) and never removes files there, so a reused name
    could hide a module that the current code fails to copy."""
    if tokenizer:
        require_shared(TOKENIZER_MODEL)
    folder = root / f"{name}_{uuid.uuid4().hex[:8]}"
    return make_tiny_model(folder, TOKENIZER_MODEL if tokenizer else None, variant, seed)


def official_device_map(num_layers: int, device="cpu") -> dict:
    """What ChatGLM2/3 `utils.auto_configure_device_map` writes (with every target replaced by `device`):
    note the 'lm_head' entry, a name this model (like the official one) does not have."""
    device_map = {
        "transformer.embedding.word_embeddings": device,
        "transformer.encoder.final_layernorm": device,
        "transformer.output_layer": device,
        "transformer.rotary_pos_emb": device,
        "lm_head": device,
    }
    for i in range(num_layers):
        device_map[f"transformer.encoder.layers.{i}"] = device
    return device_map


def accepts_kwarg(func, name: str) -> bool:
    return name in inspect.signature(func).parameters


@functools.lru_cache(maxsize=None)
def cpu_half_matmul_works() -> bool:
    try:
        torch.nn.functional.linear(torch.ones(2, 4, dtype=torch.half), torch.ones(3, 4, dtype=torch.half))
        return True
    except RuntimeError:
        return False


def left_padded_inputs(rows: list[list[int]]) -> dict:
    """input_ids / attention_mask / position_ids as the ChatGLM tokenizer returns them (left padding)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pos = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
        pos[i, width - len(r):] = torch.arange(len(r))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def skip_without(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed in this environment")
