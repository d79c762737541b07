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
if str(REPO / "tools") not in sys.path:  # the command-line tools double as test helpers
    sys.path.insert(0, str(REPO / "tools"))
if "chatglm" not in sys.modules:
    _package = types.ModuleType("chatglm")
    _package.__path__ = [str(REPO)]
    sys.modules["chatglm"] = _package

# Without a GPU, Triton kernels (the fused decode step) are checked in Triton's interpreter on CPU tensors. The
# switch must be set before anything imports triton (torch may, during collection), hence here.
import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(os.environ.get("CHATGLM_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
ASSETS = SHARED / "assets"
TOKENIZER_MODEL = ASSETS / "tokenizer" / "tokenizer.model"


def require_shared(path: Path = SHARED) -> Path:
    """Skip the calling test when the shared reference data is not next to the repo."""
    if not path.exists():
        pytest.skip(f"reference data not found at {path} (set CHATGLM_SHARED or place ../shared beside the repo)")
    return path


TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_attention=True,
            multi_query_group_num=2, ffn_hidden_size=96, padded_vocab_size=512, seq_length=256, add_qkv_bias=True)


def tiny_config(**overrides):
    """A tiny ChatGLM3-shaped config (2 layers, hidden 64, 4 heads sharing 2 key/value groups)."""
    from chatglm.configuration_chatglm import ChatGLMConfig

    return ChatGLMConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides):
    """A tiny random ChatGLMForConditionalGeneration in eval mode, weights scaled like the golden models."""
    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    model = ChatGLMForConditionalGeneration(tiny_config(**overrides))
    return randomize_weights(model, seed).eval()


def randomize_weights(model, seed: int = 0):
    """Overwrite every parameter like the golden models: norms 1 + 0.1·N, biases 0.05·N, the rest 0.15·N."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.05 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model


def copy_code(folder: Path) -> Path:
    """Put the remote-code modules (every top-level .py file) into `folder`, as a Hub model repo holds them."""
    import shutil

    for source in REPO.glob("*.py"):
        shutil.copy(source, folder / source.name)
    return folder
