"""Differences between the supported transformers (4.30.2 … 5.x) and torch versions, answered in one place.

The rest of the package never looks at a version number: it asks this module which cache class to use, how to
turn a legacy tuple cache into a cache object, whether SDPA can share key/value heads, which gradient
checkpointing hook the running transformers calls, what generate() uses for a setting left unset, and on which GPU
a hand-written kernel must be launched.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils import logging

try:  # transformers >= 4.36
    from transformers.cache_utils import Cache as _HFCache
    from transformers.cache_utils import DynamicCache as _HFDynamicCache
except ImportError:  # transformers < 4.36 passes caches around as tuples
    _HFCache = None
    _HFDynamicCache = None

try:  # transformers >= 4.38; before 4.4x its instances do not say `is_compileable`
    from transformers.cache_utils import StaticCache as _HFStaticCache
except ImportError:
    _HFStaticCache = None

try:  # transformers >= 5: init functions that leave tensors loaded from a checkpoint alone (5.0 runs the model's
    # weight init after loading and relies on them)
    from transformers import initialization as weight_init
except ImportError:
    weight_init = torch.nn.init

try:  # explicit base since transformers 4.50 stopped mixing it into PreTrainedModel
    from transformers.generation import GenerationMixin
except ImportError:  # pragma: no cover - very old layouts
    from transformers.generation.utils import GenerationMixin


class KVCache:
    """Minimal dynamic key/value cache for transformers versions without `cache_utils` (< 4.36).

    Speaks the subset of transformers' `Cache` interface the model uses; keys/values per layer are
    `[batch, kv_heads, seq, head_dim]`. Indexing gives `(key, value)` of a layer, like the legacy tuples.
    """

    is_compileable = False

    def __init__(self) -> None:
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_kwargs: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.key_cache):
            self.key_cache.append(key)
            self.value_cache.append(value)
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key_cache[layer_idx].shape[-2] if layer_idx < len(self.key_cache) else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for i in range(len(self.key_cache)):
            self.key_cache[i] = self.key_cache[i].index_select(0, beam_idx.to(self.key_cache[i].device))
            self.value_cache[i] = self.value_cache[i].index_select(0, beam_idx.to(self.value_cache[i].device))

    def crop(self, max_length: int) -> None:
        self.key_cache = [k[..., :max_length, :] for k in self.key_cache]
        self.value_cache = [v[..., :max_length, :] for v in self.value_cache]

    def to_legacy_cache(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(zip(self.key_cache, self.value_cache))

    def __len__(self) -> int:
        return len(self.key_cache)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def __iter__(self):
        return iter(self.to_legacy_cache())


CACHE_TYPES: tuple[type, ...] = (KVCache,) if _HFCache is None else (KVCache, _HFCache)


#: transformers >= 4.42 builds a StaticCache for `generate(cache_implementation="static")` on any model; 4.38-4.41
#: asked the model for a `_setup_cache` hook (LLaMA-style attention modules) and older ones have no static cache.
GENERATE_BUILDS_STATIC_CACHE = hasattr(GenerationMixin, "_get_cache")

try:  # transformers >= 4.42 (not 4.40): generate(stop_strings=[...], tokenizer=tok) stops at text
    from transformers import StopStringCriteria
except ImportError:  # pragma: no cover - older transformers
    StopStringCriteria = None


def new_dynamic_cache() -> Any:
    """An empty growing cache of the kind the running transformers' generate() understands."""
    return KVCache() if _HFDynamicCache is None else _HFDynamicCache()


def as_cache(past_key_values: Any) -> Any:
    """Return a cache object for `past_key_values`: None → empty cache; legacy tuples → filled cache.

    Legacy tuples are `((key, value), ...)` per layer in `[batch, kv_heads, seq, head_dim]`.
    """
    if past_key_values is None:
        return new_dynamic_cache()
    if isinstance(past_key_values, CACHE_TYPES) or hasattr(past_key_values, "get_seq_length"):
        return past_key_values  # a cache object (transformers', ours, or any with the same interface)
    if isinstance(past_key_values, (tuple, list)):
        cache = new_dynamic_cache()
        for layer_idx, layer in enumerate(past_key_values):
            if len(layer) < 2 or layer[0].dim() != 4:
                raise ValueError(
                    "past_key_values tuples must hold (key, value) per layer, each [batch, kv_heads, seq, head_dim]; "
                    "the official sequence-first layout [seq, batch, kv_heads, head_dim] must be transposed with "
                    ".permute(1, 2, 0, 3) first"
                )
            cache.update(layer[0], layer[1], layer_idx)
        return cache
    raise TypeError(f"past_key_values must be a Cache, a tuple of (key, value) pairs or None, got {type(past_key_values)}")


def cache_length(cache: Any) -> int:
    """Number of positions held by `cache` (0 for None)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def cache_layer(cache: Any, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key, value) that `cache` holds for one layer, each [batch, kv_heads, seq, head_dim]."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.54: one object per layer
        return layers[layer_idx].keys, layers[layer_idx].values
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]


def crop_cache(cache: Any, keep: int) -> bool:
    """Keep the first `keep` positions of a growing cache, in place; False when the cache cannot be cropped.

    A negative count (remove that many from the end) is the form `crop` accepts on every version: transformers
    5.x rejects a positive length, and our KVCache slices either way.
    """
    if hasattr(cache, "crop"):
        cache.crop(keep - cache_length(cache))
        return True
    if isinstance(getattr(cache, "key_cache", None), list) and not cache_is_static(cache):
        # transformers 4.36-4.40's DynamicCache: lists of [b, kv_heads, seq, d] and a count, but no crop()
        cache.key_cache = [k[..., :keep, :] for k in cache.key_cache]
        cache.value_cache = [v[..., :keep, :] for v in cache.value_cache]
        count = next((name for name in ("_seen_tokens", "seen_tokens") if name in vars(cache)), None)
        if count is not None:  # the attribute itself: 4.40 puts a read-only property in front of _seen_tokens
            setattr(cache, count, keep)
        return True
    return False


def cache_is_static(cache: Any) -> bool:
    """True for preallocated caches (StaticCache): their length is the allocation, not the content."""
    if isinstance(cache, KVCache):
        return False
    return bool(getattr(cache, "is_compileable", False)) or (_HFStaticCache is not None
                                                               and isinstance(cache, _HFStaticCache))


def static_cache_capacity(cache: Any) -> int:
    """Allocated length of a preallocated cache (`get_max_length` in 5.x, `get_max_cache_shape` in 4.4x)."""
    for name in ("get_max_length", "get_max_cache_shape"):
        if hasattr(cache, name):
            return int(getattr(cache, name)())
    return int(cache.max_cache_len)


def reorder_cache(past_key_values: Any, beam_idx: torch.LongTensor) -> Any:
    """Select beams of a cache object (in place) or of legacy tuples (new tuples)."""
    if isinstance(past_key_values, CACHE_TYPES):
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
    return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values)


def generation_setting(config: GenerationConfig, name: str) -> Any:
    """Setting `name` (top_k, temperature, repetition_penalty, ...) as generate() resolves it for a model whose
    generation config is `config`: the config's value, else transformers' global default. transformers 5 leaves
    unset fields None and fills them in inside generate() (top_k 50 among them); older versions keep the defaults
    on every GenerationConfig."""
    value = getattr(config, name, None)
    if value is not None:
        return value
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    return defaults().get(name) if defaults is not None else getattr(GenerationConfig(), name, None)


def is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False  # pragma: no cover - torch < 2.3


def host_reads_forbidden(tensor: torch.Tensor) -> bool:
    """Whether code running on `tensor` must not read device values on the host (input checks, data-dependent
    branches): under torch.compile, or while a CUDA graph captures it (the decoder's eager step)."""
    return is_compiling() or (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def kernel_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context to launch a Triton or CUDA kernel on `tensor` in: its GPU made the current one.

    torch operations follow their tensors' device, but a Triton launch goes to the *current* device and its
    stream, so for a model on cuda:1, or split over GPUs by a device map, it would run on cuda:0's stream with
    cuda:1's pointers (a fault, or a race with the stream that wrote its inputs). Under torch.compile the
    compiler places the launches itself."""
    if not tensor.is_cuda or is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def _sdpa_has_enable_gqa() -> bool:
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


SDPA_ENABLE_GQA = _sdpa_has_enable_gqa()
LONG_ATTENTION = 4096  # causal inputs at least this long try cuDNN attention first

try:  # torch >= 2.3 names its SDPA backends; cuDNN attention from 2.5 (enable_gqa with it needs the same)
    from torch.nn.attention import SDPBackend as _SDPBackend
    from torch.nn.attention import sdpa_kernel as _sdpa_kernel
    CUDNN_BACKEND = getattr(_SDPBackend, "CUDNN_ATTENTION", None) if SDPA_ENABLE_GQA else None
except ImportError:  # pragma: no cover - older torch
    _sdpa_kernel, CUDNN_BACKEND = None, None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.get_logger(__name__).warning(message)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
         is_causal: bool, dropout_p: float) -> torch.Tensor:
    """`F.scaled_dot_product_attention` with fewer key/value heads than query heads.

    query [b, heads, q, d]; key/value [b, kv_heads, k, d] → [b, heads, q, d]. Key/value heads are only copied on
    torch versions whose SDPA cannot share them (< 2.5).
    """
    group = query.shape[1] // key.shape[1]
    if is_causal and attn_mask is None and query.shape[2] >= LONG_ATTENTION and query.is_cuda and CUDNN_BACKEND:
        try:  # cuDNN's fused attention is ~1.7x FlashAttention-2 on Hopper for long causal prefill (docs/performance.md)
            with _sdpa_kernel([CUDNN_BACKEND]):
                return F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=dropout_p,
                                                      enable_gqa=group > 1)
        except RuntimeError as error:  # no cuDNN kernel for this GPU/shape/dtype: the default choice below
            _warn_once(f"cuDNN attention unavailable ({str(error)[:200]}); using the default SDPA kernel")
    if group > 1 and not SDPA_ENABLE_GQA:
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
    elif group > 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              dropout_p=dropout_p, enable_gqa=True)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                          dropout_p=dropout_p)


# transformers < 4.35 turns gradient checkpointing on through `_set_gradient_checkpointing(module, value)`; later
# versions set `gradient_checkpointing` and `_gradient_checkpointing_func` on every module that has the attribute.
_base_hook = getattr(PreTrainedModel, "_set_gradient_checkpointing", None)
LEGACY_GRADIENT_CHECKPOINTING = _base_hook is None or "value" in inspect.signature(_base_hook).parameters


class GradientCheckpointingMixin:
    """Supplies the pre-4.35 hook where transformers still calls it; empty otherwise."""

    if LEGACY_GRADIENT_CHECKPOINTING:
        def _set_gradient_checkpointing(self, module: torch.nn.Module, value: bool = False) -> None:
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = value


def attn_implementation(config: Any) -> str:
    """The attention backend chosen for `config`: transformers' choice where it makes one, else SDPA."""
    chosen = getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)
    return chosen or "sdpa"


def set_attn_implementation(config: Any, name: str) -> None:
    """Record a backend chosen through `from_pretrained(..., attn_implementation=...)` on versions that pass it
    to the model's __init__ rather than handling it themselves (< 4.36)."""
    try:
        config._attn_implementation = name
    except AttributeError:  # a read-only property on versions that manage it
        config.attn_implementation = name


__all__: Sequence[str] = (
    "KVCache", "CACHE_TYPES", "SDPA_ENABLE_GQA", "GENERATE_BUILDS_STATIC_CACHE", "GenerationMixin",
    "StopStringCriteria",
    "GradientCheckpointingMixin", "as_cache", "attn_implementation", "cache_is_static", "cache_layer", "cache_length",
    "crop_cache", "host_reads_forbidden", "is_compiling", "new_dynamic_cache", "reorder_cache", "sdpa",
    "set_attn_implementation",
    "static_cache_capacity", "weight_init",
)
