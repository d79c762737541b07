"""The fused long-prefill kernels (prefill_kernels_chatglm) compute what the torch code they replace computes.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1); with one,
compiled on CUDA, where the blocked attention also runs through cuDNN itself.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from test_modeling import left_pad, prompt_in_pieces, random_prompts

pytest.importorskip("triton", reason="triton is not installed (pip install triton) -- the fused kernels need it")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it before triton is imported)",
                allow_module_level=True)

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    monkeypatch.delenv("CHATGLM_FUSED_PREFILL", raising=False)


def _tolerance(dtype) -> dict:
    """Bit-exact, except bfloat16 in the interpreter: it truncates float32 -> bfloat16 where GPUs round to nearest."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        return dict(rtol=2 ** -6, atol=2 ** -6)
    return dict(rtol=0, atol=0)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _random(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@torch.no_grad()
def test_rms_norm_matches_module(dtype):
    from chatglm.modeling_chatglm import RMSNorm
    from chatglm.prefill_kernels_chatglm import rms_norm

    norm = RMSNorm(96, eps=1e-5).to(DEVICE, dtype)
    norm.weight.copy_(_random(96, dtype=dtype, seed=1))
    x = _random(2, 9, 96, dtype=dtype)[:, 2:7]  # a slice: rows of a batch are not contiguous with the next one
    want = norm(x)
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), want, **_tolerance(dtype))
    out = torch.zeros_like(x)
    rms_norm(x, norm.weight, norm.eps, out)
    torch.testing.assert_close(out, want, **_tolerance(dtype))
    rms_norm(x, norm.weight, norm.eps, x)  # in place, as the chunked final norm does
    torch.testing.assert_close(x, want, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@torch.no_grad()
def test_swiglu_matches_torch(dtype):
    from chatglm.prefill_kernels_chatglm import swiglu

    h = _random(2, 5, 2 * 1100, dtype=dtype) * 4  # 1100: more than one 1024-wide column block, the last partial
    gate, up = h.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = swiglu(h)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        torch.testing.assert_close(got, want, **_tolerance(dtype))
    else:  # silu's exp may differ in its last bit between math libraries, which flips the odd rounding; no more
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-3)
        assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("position_batch", [1, 2], ids=["shared-positions", "per-row-positions"])
@torch.no_grad()
def test_rotary_split_matches_project(dtype, position_batch):
    """The fused projection's output, split into q/k/v heads with rotary on q and k, into buffers of any layout."""
    from chatglm.modeling_chatglm import apply_rotary
    from chatglm.prefill_kernels_chatglm import rotary_split

    b, s, heads, kv_heads, d = 2, 7, 4, 2, 16
    qkv = _random(b, s, (heads + 2 * kv_heads) * d, dtype=dtype)
    angles = _random(position_batch, 1, s, d // 4, dtype=torch.float32, seed=2) * 50
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    want_q = apply_rotary(q.view(b, s, heads, d).transpose(1, 2), cos, sin)
    want_k = apply_rotary(k.view(b, s, kv_heads, d).transpose(1, 2), cos, sin)
    want_v = v.view(b, s, kv_heads, d).transpose(1, 2)
    query = torch.empty(b, s, heads, d, dtype=dtype, device=DEVICE).transpose(1, 2)  # [b, s, h, d] memory
    key = torch.empty(b, kv_heads, s, d, dtype=dtype, device=DEVICE)
    value = torch.empty_like(key)
    rotary_split(qkv, cos, sin, query, key, value)
    for got, want in ((query, want_q), (key, want_k), (value, want_v)):
        torch.testing.assert_close(got, want, **_tolerance(dtype))


def eager_attention_with_lse(query, key, value, causal):
    """Reference for cuDNN's (output, log-sum-exp [b, h, q, 1]) in float32 math."""
    scores = query.float() @ key.float().transpose(-1, -2) / math.sqrt(query.shape[-1])
    if causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ value.float()).to(query.dtype), scores.logsumexp(-1, keepdim=True)


@pytest.mark.parametrize("length,past,block", [(96, 0, 32), (100, 0, 32), (64, 0, 64), (40, 70, 32), (5, 64, 32),
                                               (70, 3, 32)],
                         ids=["even", "ragged", "one-block", "after-a-past", "few-after-a-past", "short-past"])
@torch.no_grad()
def test_blocked_causal_attention_matches_one_call(length, past, block):
    """Blocks merged by log-sum-exp give causal attention over the whole input (grouped kv heads), also for new
    positions after a cache's keys (each query sees the past and the new keys up to its own)."""
    from chatglm.prefill_kernels_chatglm import blocked_causal_attention

    dtype = torch.float16
    query = _random(1, length, 4, 16, dtype=dtype).transpose(1, 2)
    key, value = (_random(1, 2, past + length, 16, dtype=dtype, seed=seed) for seed in (1, 2))
    scores = query.float() @ key.repeat_interleave(2, 1).float().transpose(-1, -2) / 4.0
    allowed = torch.arange(past + length, device=DEVICE)[None, :] <= past + torch.arange(length, device=DEVICE)[:, None]
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ value.repeat_interleave(2, 1).float()
    got = blocked_causal_attention(query, key, value, block, attend=eager_attention_with_lse)
    assert got.stride() == query.stride(), "the output should keep the query's memory layout"
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-3)


@pytest.mark.skipif(DEVICE != "cuda", reason="cuDNN attention needs a GPU")
@torch.no_grad()
def test_cudnn_log_sum_exp_blocks_match_sdpa(monkeypatch):
    from chatglm import prefill_kernels_chatglm as kernels

    monkeypatch.setitem(kernels._STATE, "lse_attention", None)  # checked afresh
    assert kernels._lse_attention_works(torch.empty(1, 1, 1, 128, dtype=torch.float16, device="cuda"))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@torch.no_grad()
def test_fused_long_prefill_matches_torch_chunks(dtype, monkeypatch):
    """A long input (chunked path) with the fused kernels and the blocked attention is as close to the float32
    model as the same chunked path in plain torch (logits and every layer's cache)."""
    import chatglm.modeling_chatglm as modeling
    from chatglm import prefill_kernels_chatglm as kernels
    from chatglm.compat_chatglm import cache_layer

    monkeypatch.setattr(modeling, "PREFILL_CHUNK", 4)
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", 8)
    monkeypatch.setattr(kernels, "MIN_BLOCKED_LENGTH", 16)
    if DEVICE == "cpu":  # no cuDNN: the same blocking and merge, around a float32 reference attention
        monkeypatch.setattr(kernels, "_attention_with_lse", eager_attention_with_lse)
    monkeypatch.setitem(kernels._STATE, "lse_attention", None)
    calls = []
    monkeypatch.setattr(kernels, "_merge", lambda *a, f=kernels._merge: calls.append(1) or f(*a))
    ids = torch.randint(10, 500, (1, 37), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def outputs(model):
        out = model(input_ids=ids, use_cache=True)
        return [out.logits] + [t for layer in range(model.config.num_layers)
                               for t in cache_layer(out.past_key_values, layer)]

    reference = outputs(tiny_model(seed=5).to(DEVICE))
    model = tiny_model(seed=5).to(DEVICE, dtype)
    fused = outputs(model)
    assert kernels._STATE["lse_attention"] and calls, "the blocked attention should have run"
    monkeypatch.setenv("CHATGLM_FUSED_PREFILL", "0")
    plain = outputs(model)
    for got, torch_path, want in zip(fused, plain, reference):
        assert _relative(got, want) <= 2 * _relative(torch_path, want) + 2e-3
        if dtype == torch.float16:  # exact kernels but for attention's merged blocks
            assert _relative(got, torch_path) < 1e-2


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@torch.no_grad()
def test_new_tokens_after_a_cache_take_the_blocks_without_a_mask(cache_kind, monkeypatch):
    """A prompt fed in pieces (a chunked prefill, the next turn of a chat) attends to the cache's keys through the
    blocked path, without a dense [new, past + new] mask: same logits and cache as the torch path."""
    import chatglm.modeling_chatglm as modeling
    from chatglm import prefill_kernels_chatglm as kernels

    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "_attention_with_lse", eager_attention_with_lse)
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", 8)
    monkeypatch.setitem(kernels._STATE, "lse_attention", None)
    masks = []
    monkeypatch.setattr(modeling, "sdpa",
                        lambda q, k, v, mask, *a, f=modeling.sdpa: masks.append(mask) or f(q, k, v, mask, *a))
    model = tiny_model(seed=8).to(DEVICE, torch.float16)
    ids = torch.randint(10, 500, (1, 30), generator=torch.Generator().manual_seed(6)).to(DEVICE)

    ends = (11, 12, 14, 30)  # pieces of 11, 1, 2 and 16 tokens
    fused = prompt_in_pieces(model, ids, ends, cache_kind)
    assert kernels._STATE["lse_attention"], "the blocked attention should have run"
    assert all(mask is None for mask in masks), "no dense mask should reach SDPA"
    monkeypatch.setenv("CHATGLM_FUSED_PREFILL", "0")
    for got, want in zip(fused, prompt_in_pieces(model, ids, ends, cache_kind), strict=True):
        assert _relative(got, want) < 1e-2


@torch.no_grad()
def test_enabled_only_for_half_precision_inference(monkeypatch):
    from chatglm.prefill_kernels_chatglm import enabled

    half = torch.zeros(2, device=DEVICE, dtype=torch.float16)
    assert enabled(half)
    assert not enabled(half.float()), "float32 keeps the torch path (the golden numerics)"
    with torch.enable_grad():
        assert not enabled(half), "training keeps the torch path (autograd)"
    monkeypatch.setenv("CHATGLM_FUSED_PREFILL", "0")
    assert not enabled(half)


def test_padded_left_batch_keeps_torch_attention(monkeypatch):
    """Padding means a mask: the blocked path (causal, no mask) must not be taken."""
    import chatglm.modeling_chatglm as modeling
    from chatglm import prefill_kernels_chatglm as kernels

    model = tiny_model(seed=6).to(DEVICE, torch.float16)
    monkeypatch.setattr(modeling, "PREFILL_CHUNK", 4)
    monkeypatch.setattr(kernels, "MIN_BLOCKED_LENGTH", 8)
    monkeypatch.setattr(kernels, "blocked_causal_attention", lambda *a, **k: pytest.fail("blocked path taken"))
    ids, mask = left_pad(random_prompts(seed=4, lengths=(9, 12)))
    with torch.no_grad():
        out = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE))
    assert torch.isfinite(out.logits.float()).all()


@torch.no_grad()
def test_blocked_attention_falls_back_when_the_log_sum_exp_op_fails(monkeypatch):
    """Where the private cuDNN op is missing or fails (other torch versions, other GPUs), the check turns the blocked
    path off once, and long inputs take the one-call SDPA path with the same result."""
    import chatglm.modeling_chatglm as modeling
    from chatglm import prefill_kernels_chatglm as kernels

    def broken(*args, **kwargs):
        raise RuntimeError("no such op here")

    monkeypatch.setattr(modeling, "PREFILL_CHUNK", 4)
    monkeypatch.setattr(kernels, "MIN_BLOCKED_LENGTH", 16)
    monkeypatch.setattr(kernels, "_attention_with_lse", broken)
    monkeypatch.setitem(kernels._STATE, "lse_attention", None)
    model = tiny_model(seed=7).to(DEVICE, torch.float16)
    ids = torch.randint(10, 500, (1, 21), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = model(input_ids=ids).logits
    assert kernels._STATE["lse_attention"] is False
    monkeypatch.setattr(kernels, "MIN_BLOCKED_LENGTH", 10 ** 9)  # the path the fallback should have taken
    torch.testing.assert_close(got, model(input_ids=ids).logits, rtol=0, atol=0)
