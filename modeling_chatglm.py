"""ChatGLM2 / ChatGLM3 network and heads (batch-first), loading the official checkpoints unchanged.

Layouts: hidden states `[batch, seq, hidden]`; attention `[batch, heads, seq, head_dim]`; cached keys/values
`[batch, kv_heads, seq, head_dim]` (transformers' cache layout). Module and parameter names are the official ones.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import logging

from .chat_chatglm import ChatGLMChatMixin
# transformers 4.30 copies into its module cache only the modules this file imports itself (not their imports):
from .chat_format import CHATGLM3 as _CHATGLM3  # noqa: F401  (imported by chat_chatglm)
from .compat_chatglm import (
    GENERATE_BUILDS_STATIC_CACHE,
    SDPA_ENABLE_GQA,
    GenerationMixin,
    GradientCheckpointingMixin,
    as_cache,
    attn_implementation,
    cache_is_static,
    cache_layer,
    cache_length,
    host_reads_forbidden,
    is_compiling,
    reorder_cache,
    sdpa,
    set_attn_implementation,
    static_cache_capacity,
    weight_init,
)
from .configuration_chatglm import ChatGLMConfig
from .decode_kernels_chatglm import FUSED_ENV as _FUSED_ENV  # noqa: F401  (imported by decoding_chatglm)
from .decoding_chatglm import FastPathBusy, fast_generate, fast_path_supports, release_decoder
# transformers 4.30 copies only the relative imports of this file into its module cache, so every module the
# package uses is named here
from .int4_kernels_chatglm import GLUON_ENV as _GLUON_ENV  # noqa: F401  (imported by decode_kernels_chatglm)
from .prefill_kernels_chatglm import enabled as fused_prefill_enabled
from .prefill_kernels_chatglm import long_causal_attention, rms_norm, rotary_split, swiglu

logger = logging.get_logger(__name__)

# Inference inputs longer than this run their position-wise work (norms, projections, MLP) in chunks of this many
# tokens, which bounds the activation memory of a long prefill; attention itself always sees the whole input.
PREFILL_CHUNK = 8192


def prefill_chunks(length: int) -> list[slice]:
    """Consecutive slices of at most PREFILL_CHUNK positions covering [0, length)."""
    return [slice(start, min(start + PREFILL_CHUNK, length)) for start in range(0, length, PREFILL_CHUNK)]


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, returned in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(hidden_states.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin of the rotary angles for given positions.

    Only the first half of each head (`rot_dim = kv_channels // 2`) rotates, as interleaved pairs. The angles are
    built in float32 exactly as the reference does (theta = 1 / base^(2i/rot_dim); angle = position * theta):
    at positions near seq_length the rounding of this product decides the last digits of the logits.
    """

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.rot_dim = config.kv_channels // 2
        self.base = config.rope_base
        self.position_scale = config.rope_position_scale

    def forward(self, position_ids: torch.LongTensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] → (cos, sin), each [b, 1, s, rot_dim // 2] in `dtype`."""
        exponents = torch.arange(0, self.rot_dim, 2, dtype=torch.float32, device=position_ids.device) / self.rot_dim
        theta = 1.0 / (self.base ** exponents)
        positions = position_ids.float()
        if self.position_scale != 1.0:
            positions = positions / self.position_scale
        angles = (positions[..., None] * theta)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the first 2·cos.shape[-1] dims of x [b, h, s, d]."""
    rot_dim = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    pairs = x_rot.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


class AttentionMask:
    """What each query may attend to, built once per forward and per key length.

    Holds either an explicit 4D mask from the caller, or a key padding mask [b, kv] (None: no padding) plus the
    cache offset of the first query. `for_keys` gives the attention backends' arguments for a key length,
    preferring `is_causal`/no mask over a dense mask. `is_causal` with more keys than queries means the queries are
    the last positions (causality aligned to the bottom right, as in flash-attn), which every backend here honours.
    A padded query still attends to itself, so no row is empty (an empty row would make NaNs that leak into real
    rows through later layers).
    """

    def __init__(self, query_len: int, past_len: Optional[int], key_padding: Optional[torch.Tensor] = None,
                 explicit: Optional[torch.Tensor] = None):
        self.query_len = query_len
        self.past_len = past_len
        self.key_padding = key_padding
        self.explicit = explicit
        self._built: dict[tuple[int, torch.device], tuple[Optional[torch.Tensor], bool]] = {}

    def last_query(self) -> "AttentionMask":
        """The same mask for the last query position alone."""
        explicit = None if self.explicit is None else self.explicit[..., -1:, :]
        return AttentionMask(1, self.past_len + self.query_len - 1, self.key_padding, explicit)

    def for_keys(self, kv_len: int, device: torch.device) -> tuple[Optional[torch.Tensor], bool]:
        """→ (bool mask [b|1, 1, q, kv] or None, is_causal)."""
        if self.explicit is not None:
            return self.explicit.to(device), False
        key = (kv_len, device)
        if key not in self._built:
            self._built[key] = self._build(kv_len, device)
        return self._built[key]

    def _build(self, kv_len: int, device: torch.device) -> tuple[Optional[torch.Tensor], bool]:
        q = self.query_len
        if self.key_padding is None:
            if kv_len == q:
                return None, q > 1
            if q == 1 and kv_len == self.past_len + 1:
                return None, False
            if self.past_len is not None and kv_len == self.past_len + q:
                return None, True  # new tokens after a cache: causal, aligned to the last key (bottom right)
        query_pos = self.past_len + torch.arange(q, device=device)
        key_pos = torch.arange(kv_len, device=device)
        allowed = key_pos[None, :] <= query_pos[:, None]
        if self.key_padding is None:
            return allowed[None, None], False
        padding = self.key_padding.to(device=device, dtype=torch.bool)
        if padding.shape[-1] < kv_len:  # preallocated cache: slots past the mask are future, causality hides them
            padding = F.pad(padding, (0, kv_len - padding.shape[-1]), value=True)
        allowed = (allowed[None] & padding[:, None, :]) | (key_pos[None, :] == query_pos[:, None])[None]
        return allowed[:, None], False


# ---------------------------------------------------------------------------------------------------------------
# Attention backends: one signature, [b, heads, q, d] x [b, kv_heads, k, d] → [b, heads, q, d]
# ---------------------------------------------------------------------------------------------------------------
def causal_mask(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """Bool [q, k]: the queries are the last `query_len` of `key_len` positions, each sees itself and before."""
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(key_len - query_len)


def eager_attention(query, key, value, mask, is_causal, dropout_p):
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() / math.sqrt(query.shape[-1])
    if is_causal:
        mask = causal_mask(scores.shape[-2], scores.shape[-1], scores.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p).to(value.dtype)
    return torch.matmul(probs, value)


def decode_attention(query, key, value, mask):
    """One query token per row: [b, heads, 1, d] against [b, kv_heads, k, d] → [b, heads, 1, d].

    The query heads of each key/value group are folded into one [group, d] block, so every key/value head is read
    once and never copied, and the product runs as two small batched matmuls. It serves off CUDA and in the
    compiled static-cache step, where at 1280 slots they cost less than SDPA's masked kernels (docs/performance.md);
    eager steps on CUDA run SDPA (see `sdpa_attention`), which also scales to long caches.
    """
    b, heads, _, d = query.shape
    folded = query.reshape(b, key.shape[1], heads // key.shape[1], d)
    scores = torch.matmul(folded, key.transpose(-1, -2))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    probs = scores.softmax(dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(b, heads, 1, d)


def sdpa_attention(query, key, value, mask, is_causal, dropout_p):
    if query.shape[2] == 1 and key.shape[1] < query.shape[1] and dropout_p == 0.0:
        if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and SDPA_ENABLE_GQA \
                and not is_compiling():
            # SDPA splits the keys over the SMs (flash-decoding), where the two matmuls' second one (a reduction
            # over every key) runs on a few blocks, and on slow kernels when the key count is not a multiple of 8
            return sdpa(query, key, value, mask, False, 0.0)
        return decode_attention(query, key, value, mask)
    if is_causal and mask is None and dropout_p == 0.0:
        # None unless CUDA inference and long, or after a cache: then cuDNN blocks merged by log-sum-exp
        context = long_causal_attention(query, key, value)
        if context is not None:
            return context
    if is_causal and key.shape[2] != query.shape[2]:  # SDPA's is_causal aligns to the top left: spell it out
        mask, is_causal = causal_mask(query.shape[2], key.shape[2], query.device), False
    return sdpa(query, key, value, mask, is_causal, dropout_p)


def flash_attention_2(query, key, value, mask, is_causal, dropout_p):
    # padding or a preallocated cache: flash-attn needs unpadded varlen inputs; new tokens after a cache: flash-attn
    # before 2.1 aligned causality to the top left. SDPA handles both.
    if mask is not None or (is_causal and key.shape[2] != query.shape[2]):
        return sdpa_attention(query, key, value, mask, is_causal, dropout_p)
    import importlib

    flash_attn_func = importlib.import_module("flash_attn").flash_attn_func
    out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=dropout_p,
                          causal=is_causal)
    return out.transpose(1, 2)


ATTENTION_BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash_attention_2": flash_attention_2}


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-query attention: fused query_key_value → [q | k | v], rotary on q and k, cache, dense."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.kv_channels
        self.qkv_sizes = [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                          self.num_kv_heads * self.head_dim]
        self.query_key_value = nn.Linear(config.hidden_size, sum(self.qkv_sizes),
                                         bias=config.add_bias_linear or config.add_qkv_bias, device=device)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear,
                               device=device)
        self.attention_dropout = config.attention_dropout
        self.config = config

    def project(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [b, s, hidden] → rotated query [b, heads, s, d], rotated key and value [b, kv_heads, s, d]."""
        b, s, _ = hidden_states.shape
        query, key, value = self.query_key_value(hidden_states).split(self.qkv_sizes, dim=-1)
        query = query.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        key = key.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = value.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin), value

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask,
               past_key_values: Optional[Any] = None, cache_position: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Append key/value to the cache (at `cache_position` [s] for preallocated caches), attend → context
        [b, heads, s, d] (before `dense`)."""
        if past_key_values is not None:
            cache_kwargs = None if cache_position is None else {"cache_position": cache_position}
            key, value = past_key_values.update(key, value, self.layer_idx, cache_kwargs)
            filled = None if mask.past_len is None else mask.past_len + mask.query_len
            if mask.explicit is None and filled is not None and key.shape[-2] > filled:
                # a preallocated cache returns all its slots; those after the new tokens are unwritten, and
                # causality hides them, so attend to the written ones (no [q, capacity] mask, no wasted work)
                key, value = key[:, :, :filled], value[:, :, :filled]
        attn_mask, is_causal = mask.for_keys(key.shape[-2], key.device)
        attend = ATTENTION_BACKENDS[attn_implementation(self.config)]
        dropout_p = self.attention_dropout if self.training else 0.0
        return attend(query, key, value, attn_mask, is_causal, dropout_p)

    def forward(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                past_key_values: Optional[Any] = None, cache_position: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states [b, s, hidden] → [b, s, hidden]; appends this layer's keys/values to the cache."""
        b, s, _ = hidden_states.shape
        context = self.attend(*self.project(hidden_states, rotary), mask, past_key_values, cache_position)
        return self.dense(context.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """dense_h_to_4h → SwiGLU (silu(a) * b) → dense_4h_to_h."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear,
                                       device=device)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear,
                                       device=device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int, device=None):
        super().__init__()
        self.layer_number = layer_idx + 1
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, device=device)
        self.self_attention = SelfAttention(config, layer_idx, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, device=device)
        self.mlp = MLP(config, device=device)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                past_key_values: Optional[Any] = None, cache_position: Optional[torch.Tensor] = None,
                inplace: bool = False, last_only: bool = False) -> torch.Tensor:
        """hidden_states [b, s, hidden] → [b, s, hidden] (long inputs without grad: written into hidden_states
        itself when `inplace`, which the caller allows when nobody else holds that tensor). `last_only`: keys and
        values of every position go to the cache, but only the last position is computed on → [b, 1, hidden]."""
        if last_only and hidden_states.shape[1] > 1:
            return self._forward_last_position(hidden_states, rotary, mask, past_key_values, cache_position)
        if hidden_states.shape[1] > PREFILL_CHUNK and not torch.is_grad_enabled():
            return self._forward_in_chunks(hidden_states, rotary, mask, past_key_values, cache_position, inplace)
        attention = self.self_attention(self.input_layernorm(hidden_states), rotary, mask, past_key_values,
                                        cache_position)
        hidden_states = hidden_states + F.dropout(attention, p=self.hidden_dropout, training=self.training)
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + F.dropout(mlp, p=self.hidden_dropout, training=self.training)

    def _forward_last_position(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                               mask: AttentionMask, past_key_values: Optional[Any],
                               cache_position: Optional[torch.Tensor]) -> torch.Tensor:
        """The block's output at the last position only (what a prefill's next-token logits need from the last
        layer): queries, attention, dense and MLP for one position; keys and values for all of them."""
        attention = self.self_attention
        query, key, value = self._project_all(hidden_states, rotary)
        context = attention.attend(query[:, :, -1:], key, value, mask.last_query(), past_key_values, cache_position)
        residual = hidden_states[:, -1:]
        out = residual + attention.dense(context.transpose(1, 2).reshape(residual.shape[0], 1, -1))
        return out + self.mlp(self.post_attention_layernorm(out))

    def _project_all(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input norm + rotated q, k, v of every position; long inputs without grad PREFILL_CHUNK tokens at a time."""
        attention = self.self_attention
        b, s, _ = hidden_states.shape
        if s <= PREFILL_CHUNK or torch.is_grad_enabled():
            return attention.project(self.input_layernorm(hidden_states), rotary)
        cos, sin = rotary
        # query in [b, s, heads, d] memory: the attention output follows it, so `dense` reads it without a copy
        query = hidden_states.new_empty(b, s, attention.num_heads, attention.head_dim).transpose(1, 2)
        key = hidden_states.new_empty(b, attention.num_kv_heads, s, attention.head_dim)
        value = torch.empty_like(key)
        fused = fused_prefill_enabled(hidden_states)
        for part in prefill_chunks(s):
            normed = _norm(self.input_layernorm, hidden_states[:, part], fused)
            if fused:
                rotary_split(attention.query_key_value(normed), cos[:, :, part], sin[:, :, part], query[:, :, part],
                             key[:, :, part], value[:, :, part])
            else:
                query[:, :, part], key[:, :, part], value[:, :, part] = attention.project(
                    normed, (cos[:, :, part], sin[:, :, part]))
        return query, key, value

    @torch.no_grad()
    def _forward_in_chunks(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                           mask: AttentionMask, past_key_values: Optional[Any],
                           cache_position: Optional[torch.Tensor], inplace: bool) -> torch.Tensor:
        """The same block for long inputs: every position-wise step runs PREFILL_CHUNK tokens at a time, so only
        the query and the attention context exist at full length (the 2·ffn-wide MLP activation never does)."""
        attention = self.self_attention
        b, s, _ = hidden_states.shape
        chunks = prefill_chunks(s)
        query, key, value = self._project_all(hidden_states, rotary)
        context = attention.attend(query, key, value, mask, past_key_values, cache_position)
        del query, key, value
        fused = fused_prefill_enabled(hidden_states)
        out = hidden_states if inplace else torch.empty_like(hidden_states)
        for part in chunks:
            step = context[:, :, part].transpose(1, 2).reshape(b, part.stop - part.start, -1)
            if fused and inplace:
                _add_linear_(out[:, part], attention.dense, step)
            else:
                out[:, part] = hidden_states[:, part] + attention.dense(step)
        del context
        mlp = self.mlp
        for part in chunks:
            residual = out[:, part]
            if fused:
                act = swiglu(mlp.dense_h_to_4h(_norm(self.post_attention_layernorm, residual, fused)))
                _add_linear_(residual, mlp.dense_4h_to_h, act)
            else:
                out[:, part] = residual + mlp(self.post_attention_layernorm(residual))
        return out


def _add_linear_(residual: torch.Tensor, linear: nn.Module, x: torch.Tensor) -> None:
    """residual += linear(x) in place ([b, s, n]); a bias-free nn.Linear on one sequence lets cuBLAS add the
    residual in its epilogue (one rounding instead of two, no temporary)."""
    if type(linear) is nn.Linear and linear.bias is None and residual.shape[0] == 1 and residual[0].is_contiguous():
        residual[0].addmm_(x[0], linear.weight.t())
    else:
        residual.add_(linear(x))


def _norm(norm: RMSNorm, hidden_states: torch.Tensor, fused: bool, out: Optional[torch.Tensor] = None
          ) -> torch.Tensor:
    """`norm(hidden_states)`, in one Triton pass when `fused` (written into `out` if given). A norm whose weight
    is not beside the input (offloaded by accelerate to "meta" until its hook runs) runs as the module."""
    if fused and norm.weight.device == hidden_states.device:
        return rms_norm(hidden_states, norm.weight, norm.eps, out)
    if out is None:
        return norm(hidden_states)
    out.copy_(norm(hidden_states))
    return out


class _FixedPast:
    """Cache stand-in for a checkpointed layer: prepends fixed keys/values (the P-tuning prefix), stores nothing."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Optional[dict] = None):
        return torch.cat([self.key, key], dim=-2), torch.cat([self.value, value], dim=-2)


def _layer_after_fixed_past(layer: "GLMBlock", hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                            mask: "AttentionMask", key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return layer(hidden_states, rotary, mask, _FixedPast(key, value))


class GLMTransformer(nn.Module):
    """The stack of GLMBlocks and the final norm."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.num_layers = config.num_layers
        self.layers = nn.ModuleList([GLMBlock(config, i, device=device) for i in range(config.num_layers)])
        self.post_layer_norm = config.post_layer_norm
        if self.post_layer_norm:
            self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, device=device)
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                past_key_values: Optional[Any] = None, output_hidden_states: bool = False,
                cache_position: Optional[torch.Tensor] = None, input_is_scratch: bool = False,
                last_position_only: bool = False) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        """→ (normed last hidden [b, s, hidden], per-layer inputs + last layer output before the final norm).
        `input_is_scratch`: the caller holds no other use for hidden_states, so long inputs may be updated in place.
        `last_position_only` (inference, no hidden states wanted): the last layer computes the last position only
        (every layer's keys and values still reach the cache) → [b, 1, hidden].
        """
        last_position_only = last_position_only and not output_hidden_states and not self.training
        all_hidden = () if output_hidden_states else None
        checkpointing = self.gradient_checkpointing and self.training
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if checkpointing:
                checkpoint = getattr(self, "_gradient_checkpointing_func", None) or partial(
                    torch.utils.checkpoint.checkpoint, use_reentrant=False)
                if past_key_values is not None and cache_length(past_key_values):
                    # P-tuning prefix (use_cache is off while checkpointing): give the layer its cached keys/values
                    # as tensors, so the recomputation sees the same keys and the prefix receives gradients.
                    prefix_key, prefix_value = cache_layer(past_key_values, layer.self_attention.layer_idx)
                    hidden_states = checkpoint(_layer_after_fixed_past, layer, hidden_states, rotary, mask,
                                               prefix_key, prefix_value)
                else:
                    hidden_states = checkpoint(layer.__call__, hidden_states, rotary, mask, None)
            else:
                inplace = not output_hidden_states and (input_is_scratch or layer is not self.layers[0])
                hidden_states = layer(hidden_states, rotary, mask, past_key_values, cache_position, inplace,
                                      last_only=last_position_only and layer is self.layers[-1])
        if output_hidden_states:
            all_hidden += (hidden_states,)
        if self.post_layer_norm:
            hidden_states = self._final_norm(hidden_states, inplace=not output_hidden_states and input_is_scratch)
        return hidden_states, all_hidden

    def _final_norm(self, hidden_states: torch.Tensor, inplace: bool) -> torch.Tensor:
        """Final RMSNorm; long inputs without grad are normed PREFILL_CHUNK positions at a time (its float32
        temporaries would otherwise be 4x the hidden states)."""
        s = hidden_states.shape[1]
        if s <= PREFILL_CHUNK or torch.is_grad_enabled():
            return self.final_layernorm(hidden_states)
        device = self.final_layernorm.weight.device
        if device != hidden_states.device and device.type != "meta":  # a device map put the norm on another GPU
            hidden_states, inplace = hidden_states.to(device), True
        out = hidden_states if inplace else torch.empty_like(hidden_states)
        fused = fused_prefill_enabled(hidden_states)
        for part in prefill_chunks(s):
            _norm(self.final_layernorm, hidden_states[:, part], fused, out[:, part])
        return out


class Embedding(nn.Module):
    """Token embedding (module kept for the official key name `embedding.word_embeddings`)."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, device=device)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class PrefixEncoder(nn.Module):
    """P-tuning v2 prefix: pre_seq_len learned key/value vectors for every layer, optionally through an MLP.

    prefix [b, pre_seq_len] → [b, pre_seq_len, num_layers * 2 * kv_heads * kv_channels].
    """

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        kv_size = config.num_layers * 2 * config.num_key_value_heads * config.kv_channels
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        if self.prefix_projection:
            self.trans = nn.Sequential(nn.Linear(kv_size, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, kv_size))

    def forward(self, prefix: torch.LongTensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.prefix_projection else embedded


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
class ChatGLMPreTrainedModel(GradientCheckpointingMixin, PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = ["past_key_values", "past_key_value"]
    # The checkpoints carry the rotary frequencies; they are derived from the config instead (in float32).
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_cache_class = True
    _supports_static_cache = True
    _supports_quantized_cache = False
    _can_compile_fullgraph = True

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            weight_init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                weight_init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            weight_init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            weight_init.ones_(module.weight)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """transformers' from_pretrained; a P-tuning model (`pre_seq_len`) is frozen again after loading, except
        its prefix encoder (transformers >= 5 loads weights as new parameters with requires_grad=True)."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_for_prefix_tuning()
        return loaded

    def freeze_for_prefix_tuning(self) -> None:
        """P-tuning v2 (`pre_seq_len` set) trains only the prefix encoder: freeze every other parameter."""
        if getattr(self.config, "pre_seq_len", None):
            for name, param in self.named_parameters():
                if "prefix_encoder." not in name:
                    param.requires_grad_(False)

    @staticmethod
    def _accept_init_kwargs(config: ChatGLMConfig, kwargs: dict) -> None:
        """Official-API init kwargs: `empty_init` is accepted (transformers already skips needless init);
        `attn_implementation` arrives here on transformers versions that do not handle it themselves."""
        kwargs.pop("empty_init", None)
        if kwargs.get("attn_implementation") is not None:
            set_attn_implementation(config, kwargs.pop("attn_implementation"))
        if kwargs:
            logger.warning(f"Ignoring unknown init arguments {sorted(kwargs)}")


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embedding → GLMTransformer; also owns `output_layer` (the official module path)."""

    def __init__(self, config: ChatGLMConfig, device=None, **kwargs):
        super().__init__(config)
        self._accept_init_kwargs(config, kwargs)
        self.embedding = Embedding(config, device=device)
        self.num_layers = config.num_layers
        self.kv_heads = config.num_key_value_heads
        self.kv_channels = config.kv_channels
        self.seq_length = config.seq_length
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = GLMTransformer(config, device=device)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False, device=device)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config)
            self.dropout = nn.Dropout(0.1)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embeddings = value

    def get_prompt(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """P-tuning prefix as keys/values: [num_layers * 2, b, kv_heads, pre_seq_len, kv_channels]."""
        prefix = torch.arange(self.pre_seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        past = self.prefix_encoder(prefix).to(dtype)
        past = past.view(batch_size, self.pre_seq_len, self.num_layers * 2, self.kv_heads, self.kv_channels)
        return self.dropout(past).permute(2, 0, 3, 1, 4)

    def layer_devices(self) -> list[torch.device]:
        """The device each encoder layer computes on: its accelerate hook's execution device where a device map
        placed it (offloaded weights sit on "meta" until the hook brings them), else the device of its weights."""
        devices = []
        for layer in self.encoder.layers:
            device = getattr(getattr(layer, "_hf_hook", None), "execution_device", None)
            if device is None:  # a weight by name: DataParallel's replicas hold theirs as tensors, not parameters
                device = layer.input_layernorm.weight.device
            devices.append(torch.device("cuda", device) if isinstance(device, int) else torch.device(device))
        return devices

    def _check_legacy_cache(self, past_key_values: Any, batch_size: int) -> None:
        """Tuples must be batch-first [batch, kv_heads, seq, head_dim] per layer; the official code's
        sequence-first [seq, batch, kv_heads, head_dim] would otherwise be misread silently."""
        key = past_key_values[0][0]
        expected = (batch_size, self.kv_heads, self.kv_channels)
        if len(past_key_values) != self.num_layers or (key.shape[0], key.shape[1], key.shape[3]) != expected:
            raise ValueError(
                f"past_key_values tuples must hold {self.num_layers} layers of (key, value), each [batch={batch_size}, "
                f"kv_heads={self.kv_heads}, seq, head_dim={self.kv_channels}]; got {len(past_key_values)} layers of "
                f"{tuple(key.shape)}. The official sequence-first layout converts with "
                f"tuple((k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)) for k, v in past_key_values)."
            )

    def _check_input_ids(self, input_ids: torch.LongTensor) -> None:
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.padded_vocab_size):
            raise ValueError(
                f"input_ids must lie in [0, {self.config.padded_vocab_size}) (the model's padded_vocab_size); got "
                f"values in [{int(input_ids.min())}, {int(input_ids.max())}]. Check that the tokenizer matches the model."
            )

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        full_attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Any] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        last_position_only: bool = False,
        **kwargs: Any,
    ) -> Union[BaseModelOutputWithPast, tuple]:
        """input_ids [b, s] (or inputs_embeds [b, s, hidden]); attention_mask [b, past + s] of 1/0 (left or right
        padding) or a 4D mask [b, 1, s, kv]; position_ids [b, s] (default: from the mask, else past + 0..s-1).
        → last_hidden_state [b, s, hidden] after the final norm, past_key_values (a cache object).
        `last_position_only` (inference): last_hidden_state is [b, 1, hidden], the last position's, and the last
        layer computes nothing else (the cache still gets every position's keys and values)."""
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_attentions:
            logger.warning_once("output_attentions is not supported by ChatGLM; attentions are returned as None")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        # traced by torch.compile or captured in a CUDA graph: no checks or shapes that read device values
        compiling = host_reads_forbidden(inputs_embeds if input_ids is None else input_ids)
        if input_ids is not None and not compiling:
            self._check_input_ids(input_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch_size, query_len = inputs_embeds.shape[:2]
        if self.encoder.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False")
            use_cache = False

        if isinstance(past_key_values, (tuple, list)) and past_key_values:
            self._check_legacy_cache(past_key_values, batch_size)
        cache = as_cache(past_key_values) if (use_cache or past_key_values is not None or self.pre_seq_len) else None
        prefix_len = self.pre_seq_len or 0
        if prefix_len and cache_length(cache) == 0:
            prompt = self.get_prompt(batch_size, inputs_embeds.device, inputs_embeds.dtype)
            for layer_idx, device in enumerate(self.layer_devices()):  # each layer appends to its prefix there
                cache.update(prompt[2 * layer_idx].to(device), prompt[2 * layer_idx + 1].to(device), layer_idx)
        past_len = None if compiling else cache_length(cache)

        if past_len is not None:
            total = past_len - prefix_len + query_len
            if total > self.seq_length:
                raise ValueError(
                    f"Input of {total} tokens ({past_len - prefix_len} cached + {query_len} new) is longer than this "
                    f"model's seq_length {self.seq_length}. Shorten the input (or the max_length / max_new_tokens "
                    f"of generation)."
                )
        mask, position_ids = self._attention_inputs(attention_mask, position_ids, batch_size, query_len, past_len,
                                                    prefix_len, inputs_embeds.device, compiling)
        rotary = self.rotary_pos_emb(position_ids, inputs_embeds.dtype)
        cache_position = kwargs.get("cache_position")
        if cache_position is None and past_len is not None and cache_is_static(cache):
            cache_position = torch.arange(past_len, past_len + query_len, device=inputs_embeds.device)
        hidden_states, all_hidden = self.encoder(inputs_embeds, rotary, mask, cache, output_hidden_states,
                                                 cache_position, input_is_scratch=input_ids is not None,
                                                 last_position_only=last_position_only and past_len is not None)
        presents = cache if use_cache else None
        output = BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=presents,
                                         hidden_states=all_hidden, attentions=None)
        return output if return_dict else output.to_tuple()

    def _attention_inputs(self, attention_mask, position_ids, batch_size, query_len, past_len, prefix_len, device,
                          compiling) -> tuple[AttentionMask, torch.LongTensor]:
        """Validate the caller's mask/positions and derive what is missing."""
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = AttentionMask(query_len, past_len, explicit=attention_mask)
            if position_ids is None:
                if past_len is None:
                    raise ValueError("position_ids are required when the forward pass is compiled")
                position_ids = torch.arange(past_len - prefix_len, past_len - prefix_len + query_len, device=device)
                position_ids = position_ids.unsqueeze(0).expand(batch_size, -1)
            return mask, position_ids
        key_padding = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be [batch, length] or [batch, 1, query, key]; got "
                                 f"shape {tuple(attention_mask.shape)}")
            if past_len is not None and attention_mask.shape[1] != past_len - prefix_len + query_len:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[1]} columns but the cache holds {past_len - prefix_len} "
                    f"tokens and {query_len} are new: it must cover cached + new tokens ({past_len - prefix_len + query_len})."
                )
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_len:]
            if compiling or not bool(attention_mask.all()):
                key_padding = attention_mask
                if prefix_len:
                    key_padding = F.pad(key_padding, (prefix_len, 0), value=1)
        if position_ids is None:
            if past_len is None:
                raise ValueError("position_ids are required when the forward pass is compiled")
            position_ids = torch.arange(past_len - prefix_len, past_len - prefix_len + query_len, device=device)
            position_ids = position_ids.unsqueeze(0).expand(batch_size, -1)
        if position_ids.shape[-1] != query_len:
            raise ValueError(f"position_ids has {position_ids.shape[-1]} positions for {query_len} input tokens")
        return AttentionMask(query_len, past_len, key_padding=key_padding), position_ids


class ChatGLMGenerationMixin(GenerationMixin):
    """transformers' GenerationMixin plus the compiled fast path (decoding_chatglm).

    The override lives in a class named like this on purpose: LLaMA-Factory (and projects copying its loader)
    replace a model's `generate` with `PreTrainedModel.generate` unless `str(model.generate.__func__)` mentions
    "GenerationMixin", and transformers >= 4.50 has no `PreTrainedModel.generate`, so that load would fail.
    """

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' generate(). Requests our decode loop serves identically (greedy or sampling; see
        decoding_chatglm.loop_serves) run on `fast_generate` where `fast_path_supports` says so: with
        `cache_implementation="static"` on CUDA (and on every device where transformers' generate() builds no static
        cache for this model, < 4.42), and on CUDA plain requests with an explicit length for a model on one GPU."""
        if args and isinstance(args[0], torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        if not args and fast_path_supports(self, kwargs):
            try:
                return fast_generate(self, **kwargs)
            except FastPathBusy:  # another thread or an open stream holds our decoder: transformers' own path
                logger.info("fast path busy; this generate() runs on transformers' own loop")
        if kwargs.get("cache_implementation") == "static" and not GENERATE_BUILDS_STATIC_CACHE:
            logger.warning_once("this transformers' generate() builds no static cache for this model, and the "
                                "request is one our decode loop does not serve: it runs on a growing cache (same "
                                "tokens); transformers >= 4.42 has the static cache")
            kwargs.pop("cache_implementation")
        return super().generate(*args, **kwargs)

    def fast_generate(self, input_ids: torch.LongTensor, **kwargs: Any) -> torch.LongTensor:
        """Static-cache decoding with a one-token step (fused, eager or compiled; a CUDA graph on GPU), on every
        transformers version: input_ids [b, n] (left-padded) → sequences [b, n + new]. `cache_kind="growing"`: the
        same loop on a growing cache with the eager forward. See decoding_chatglm.fast_generate."""
        return fast_generate(self, input_ids, **kwargs)

    def release_decoder(self) -> bool:
        """Free the fast path's decoder: its key/value cache (batch × prompt + budget, rounded up to 256 positions)
        and CUDA graphs stay on the model between calls so the next one reuses them → whether there was one."""
        return release_decoder(self)


class ChatGLMForConditionalGeneration(ChatGLMChatMixin, ChatGLMPreTrainedModel, ChatGLMGenerationMixin):
    """ChatGLMModel plus the language-model head (`transformer.output_layer`), loss, generation hooks."""

    # save_pretrained copies this package's code next to the weights on every transformers version (4.30 only
    # does so for classes registered for an auto class), so a saved folder loads with trust_remote_code alone.
    _auto_class = "AutoModel"

    def __init__(self, config: ChatGLMConfig, empty_init: bool = True, device=None, **kwargs):
        super().__init__(config)
        self._accept_init_kwargs(config, kwargs)
        self.max_sequence_length = config.seq_length
        self.transformer = ChatGLMModel(config, device=device)
        self.freeze_for_prefix_tuning()
        if config.quantization_bit:
            self.quantize(config.quantization_bit, empty_init=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.transformer.output_layer = value

    def quantize(self, bits: int, empty_init: bool = False, device=None, backend: Optional[str] = None,
                 **kwargs: Any) -> "ChatGLMForConditionalGeneration":
        """Weight-only int8/int4 quantization of the encoder linears, in place (see quantization.py)."""
        from .quantization import quantize

        return quantize(self, bits, empty_init=empty_init, device=device, backend=backend)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Any] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        return_last_logit: bool = False,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
        **kwargs: Any,
    ) -> Union[CausalLMOutputWithPast, tuple]:
        """→ logits [b, s, vocab], loss when labels [b, s] are given (shifted cross-entropy in float32, -100 ignored):
        the mean over labelled tokens, or their sum over `num_items_in_batch`, the labelled tokens of every micro-batch
        and process of an optimizer step, which transformers' Trainer passes (≥ 4.49) so that gradient accumulation
        and data parallel weigh every token alike; it then no longer divides the loss itself.
        `logits_to_keep` (transformers' convention; `num_logits_to_keep` on 4.45-4.49): n > 0 keeps the last n
        positions' logits, a 1D tensor the positions it lists; `return_last_logit` (the official flag) is n = 1,
        where the last layer computes the last position only."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        logits_to_keep = 1 if return_last_logit else kwargs.pop("num_logits_to_keep", logits_to_keep)
        keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if labels is not None and not keep_all:
            raise ValueError("labels need the logits of every position: drop logits_to_keep / return_last_logit, "
                             "or compute the loss from the kept logits yourself")
        outputs = self.transformer(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                   output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                                   return_dict=True, cache_position=kwargs.get("cache_position"),
                                   last_position_only=isinstance(logits_to_keep, int) and logits_to_keep == 1)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep.to(hidden_states.device)]
        elif not keep_all:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.transformer.output_layer(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100, reduction="mean" if num_items_in_batch is None else "sum")
            if num_items_in_batch is not None:
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                        hidden_states=outputs.hidden_states, attentions=None)
        return output if return_dict else output.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Optional[Any] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        **kwargs: Any,
    ) -> dict:
        """Slice the not-yet-cached tail of the sequence and give it positions and a mask."""
        total_len = input_ids.shape[1]
        prefix_len = self.config.pre_seq_len or 0
        cached = cache_length(past_key_values) if past_key_values is not None else 0
        past_tokens = max(cached - prefix_len, 0) if cached else 0
        if past_tokens == 0 and attention_mask is not None and attention_mask.dim() == 2 \
                and not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "Right padding detected: generation appends after the last column, so every row must end with a "
                "real token. Use a tokenizer with padding_side='left' (the ChatGLM tokenizer's default)."
            )
        position_ids = self._positions_for(input_ids, attention_mask, position_ids)
        model_inputs: dict[str, Any] = {}
        if inputs_embeds is not None and past_tokens == 0:
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            # contiguous copies: a compiled forward guards on strides, and a sliced view's stride grows every step
            model_inputs["input_ids"] = input_ids[:, past_tokens:].clone(memory_format=torch.contiguous_format)
        query_len = total_len - past_tokens
        model_inputs["position_ids"] = position_ids[:, -query_len:].clone(memory_format=torch.contiguous_format)
        if cache_is_static(past_key_values) and query_len == 1 and (attention_mask is None or
                                                                     attention_mask.dim() == 2):
            # Fixed-shape mask over the whole preallocated cache keeps compiled decoding free of recompiles. (The
            # prompt keeps its 2D mask: an eager forward attends to the written slots only.)
            key_padding = attention_mask if attention_mask is not None else input_ids.new_ones(input_ids.shape)
            key_padding = F.pad(key_padding, (prefix_len, 0), value=1) if prefix_len else key_padding
            max_len = static_cache_capacity(past_key_values)
            attention_mask, _ = AttentionMask(query_len, cached, key_padding=key_padding).for_keys(
                int(max_len), input_ids.device)
        model_inputs.update(past_key_values=past_key_values, attention_mask=attention_mask,
                            use_cache=use_cache if use_cache is not None else True,
                            return_last_logit=past_tokens == 0)
        return model_inputs

    @staticmethod
    def _positions_for(input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor],
                       position_ids: Optional[torch.LongTensor]) -> torch.LongTensor:
        """Positions of the whole sequence [b, total]: the caller's, continued by +1 per generated token; else from
        the attention mask (0 on pads, 0..n-1 on tokens); else 0..total-1."""
        total_len = input_ids.shape[1]
        if position_ids is not None:
            missing = total_len - position_ids.shape[-1]
            if missing > 0:
                steps = torch.arange(1, missing + 1, device=position_ids.device, dtype=position_ids.dtype)
                position_ids = torch.cat([position_ids, position_ids[:, -1:] + steps], dim=-1)
            return position_ids
        if attention_mask is not None and attention_mask.dim() == 2:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return torch.arange(total_len, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], -1)

    @staticmethod
    def _reorder_cache(past_key_values: Any, beam_idx: torch.LongTensor) -> Any:
        return reorder_cache(past_key_values, beam_idx)


class ChatGLMForSequenceClassification(ChatGLMPreTrainedModel):
    """Classifier on the final hidden state of the last position (real with left padding)."""

    _auto_class = "AutoModelForSequenceClassification"
    # The loss is a mean over the micro-batch: Trainer (≥ 4.49) must scale it for accumulation itself, not pass a
    # token count, which it would otherwise do for a forward that takes **kwargs.
    accepts_loss_kwargs = False

    def __init__(self, config: ChatGLMConfig, empty_init: bool = True, device=None, **kwargs):
        super().__init__(config)
        self._accept_init_kwargs(config, kwargs)
        self.num_labels = config.num_labels
        self.transformer = ChatGLMModel(config, device=device)
        self.classifier_head = nn.Linear(config.hidden_size, config.num_labels, bias=True, device=device)
        self.dropout = nn.Dropout(config.classifier_dropout) if config.classifier_dropout is not None else None
        self.freeze_for_prefix_tuning()
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        full_attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Any] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[SequenceClassifierOutputWithPast, tuple]:
        """→ logits [b, num_labels]; loss by config.problem_type (inferred like transformers' classifiers)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                   output_hidden_states=output_hidden_states, return_dict=True)
        pooled = outputs.last_hidden_state[:, -1]
        if self.dropout is not None:
            pooled = self.dropout(pooled)
        logits = self.classifier_head(pooled.to(self.classifier_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels.to(logits.device))
        output = SequenceClassifierOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                                  hidden_states=outputs.hidden_states, attentions=None)
        return output if return_dict else output.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
