"""Fast decoding: a preallocated key/value cache and a compiled one-token step replayed without host syncs.

transformers' generate() spends more time in Python per token than the GPU spends reading the 12 GB of weights
(~2.8 ms on an H200). `fast_generate` keeps the loop on the device: the prompt is prefilled once (eager), then a
`torch.compile`d step (CUDA graphs on GPU) runs one token at a time, sampling on the device, and the host only
checks for end-of-sequence every few steps. It is what `generate(..., cache_implementation="static")` runs when the
request needs nothing it lacks (see `fast_path_supports`), and a documented call on every transformers version.
"""
from __future__ import annotations

import gc
import os
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .compat_chatglm import kernel_device
from .decode_kernels_chatglm import FusedDecodeStep

# generate() arguments the fast path understands; anything else goes to transformers' generate().
FAST_PATH_KWARGS = frozenset({
    "input_ids", "attention_mask", "position_ids", "max_new_tokens", "max_length", "min_new_tokens", "do_sample",
    "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id", "cache_implementation", "use_cache",
    "num_beams", "num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits",
})
EOS_CHECK_EVERY = 16
MAX_BANNED = 8  # end-of-sequence ids a greedy step can exclude inside its graph (min_new_tokens)


class StaticKVCache:
    """Keys/values preallocated to `capacity` positions: per layer [batch, kv_heads, capacity, head_dim], on the
    layer's device (one device, or one per layer for a model split over GPUs).

    `update` writes at `cache_position` (positions [s] of the new tokens; default: right after the content) and
    returns the whole buffers, so shapes never change and a compiled step can be captured once.
    """

    is_compileable = True

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: Union[str, torch.device, Sequence[torch.device]]):
        shape = (batch, kv_heads, capacity, head_dim)
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * num_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.capacity = capacity
        self.length = 0  # filled positions, tracked on the host by the eager callers (prefill, advance)
        mark_static = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
        if mark_static is not None:
            for tensor in self.keys + self.values:
                mark_static(tensor)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_kwargs: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        position = (cache_kwargs or {}).get("cache_position")
        if position is None:
            position = torch.arange(self.length, self.length + key.shape[-2], device=key.device)
        position = position.to(key.device)  # (a no-op but where a device map put this layer on another GPU)
        self.keys[layer_idx].index_copy_(2, position, key)
        self.values[layer_idx].index_copy_(2, position, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity


def fast_path_supports(model: torch.nn.Module, kwargs: dict) -> bool:
    """Whether `generate(**kwargs)` can run on `fast_generate` with the same result."""
    if kwargs.get("cache_implementation") != "static" or not set(kwargs) <= FAST_PATH_KWARGS:
        return False
    if kwargs.get("num_beams", 1) != 1 or kwargs.get("num_return_sequences", 1) != 1:
        return False
    if kwargs.get("return_dict_in_generate") or kwargs.get("output_scores") or kwargs.get("output_logits"):
        return False
    input_ids = kwargs.get("input_ids")
    return (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and not model.config.pre_seq_len
            and not model.training)


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float
                ) -> torch.Tensor:
    """logits [b, vocab] (float32) → next token ids [b]."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(-1)


class CompiledDecoder:
    """One model's decode step for a batch size and cache capacity (rebuilt when either changes).

    Its state lives in device tensors it owns (the token to feed, its position, its cache slot, which cache slots
    hold real keys), and a step advances that state itself, so on CUDA the whole step, bookkeeping included, is
    captured once in a CUDA graph and each token costs one graph replay and no host synchronisation.
    """

    def __init__(self, model: torch.nn.Module, batch: int, capacity: int, compile: bool):
        config = model.config
        param = next(model.parameters())
        device = param.device
        self.model = model
        self.batch, self.capacity, self.compiled = batch, capacity, compile
        self.weights = weights_fingerprint(model)
        layer_devices = model.transformer.layer_devices()
        self.cache = StaticKVCache(config.num_layers, batch, config.num_key_value_heads, config.kv_channels,
                                   capacity, param.dtype, layer_devices)
        # A model split over devices (accelerate device map) steps eagerly: one CUDA graph cannot hold the
        # work of several GPUs here, and the compiled step would trace accelerate's hooks.
        compile = compile and len({place for _, _, place in self.weights} | set(layer_devices)) == 1
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        # token ids a "greedy_banned" step never picks (end-of-sequence ids before min_new_tokens); fixed size so
        # one captured graph serves any list of up to MAX_BANNED ids (unused entries repeat the first)
        self.banned = torch.zeros(MAX_BANNED, dtype=torch.long, device=device)
        self.use_graphs = compile and device.type == "cuda"
        # Triton kernels with the small operations fused into the weight reads (CUDA, batch <= 16, plain or
        # int8/int4 linears); None: the model's own forward, compiled.
        self.fused = FusedDecodeStep.build(model, self.cache.keys, self.cache.values, batch, capacity) \
            if compile or device.type != "cuda" else None
        steps = {"logits": self._logits_step, "greedy": self._greedy_step,
                 "greedy_banned": lambda: self._greedy_step(self.banned)}
        # CHATGLM_COMPILE_MODE picks torch.compile's mode (e.g. "max-autotune-no-cudagraphs": slower to build,
        # autotunes the matrix products); the CUDA graph is ours either way.
        mode = os.environ.get("CHATGLM_COMPILE_MODE") or None
        self.steps = {k: torch.compile(f, mode=mode, fullgraph=False, dynamic=False) for k, f in steps.items()} \
            if compile and self.fused is None else steps
        self.graphs: dict[str, tuple[Any, torch.Tensor]] = {}

    def start(self, token: torch.Tensor, position: torch.Tensor, slot: int, key_valid: torch.Tensor) -> None:
        """Set the state for the first step: token, position [b, 1]; slot of that token; key_valid [b, :slot]."""
        self.token.copy_(token)
        self.position.copy_(position)
        self.slot.fill_(slot)
        self.key_valid.zero_()
        self.key_valid[:, :slot] = key_valid

    def _logits_step(self) -> torch.Tensor:
        """Feed `token` at `position` into cache `slot`, advance position and slot → logits [b, vocab] float32."""
        if self.fused is not None:
            return self.fused(self.token, self.position, self.slot, self.key_valid)
        self.key_valid.index_fill_(1, self.slot, True)
        out = self.model(input_ids=self.token, position_ids=self.position,
                         attention_mask=self.key_valid[:, None, None, :], past_key_values=self.cache,
                         cache_position=self.slot, use_cache=True)
        self.position.add_(1)
        self.slot.add_(1)
        return out.logits[:, -1].float()

    def _greedy_step(self, banned: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A logits step whose argmax (never an id in `banned`) becomes the next token to feed → that token [b, 1]."""
        if self.fused is not None:
            return self.fused(self.token, self.position, self.slot, self.key_valid, greedy=True, banned=banned)
        logits = self._logits_step()
        if banned is not None:
            logits = logits.index_fill(1, banned, float("-inf"))
        self.token.copy_(logits.argmax(dim=-1, keepdim=True))
        return self.token

    def ban(self, ids: Sequence[int]) -> None:
        """Set the ids "greedy_banned" steps never pick (1 to MAX_BANNED of them)."""
        if not 0 < len(ids) <= MAX_BANNED:
            raise ValueError(f"between 1 and {MAX_BANNED} banned ids are supported, got {len(ids)}")
        self.banned.copy_(torch.tensor(list(ids) + [ids[0]] * (MAX_BANNED - len(ids)), dtype=torch.long))

    def run(self, kind: str) -> torch.Tensor:
        """One step of `kind` ('logits', 'greedy' or 'greedy_banned'), replayed from a CUDA graph where one is
        used."""
        if not self.use_graphs:
            return self.steps[kind]()
        with kernel_device(self.token):  # the model's GPU, which need not be the current one
            if kind not in self.graphs:
                self.graphs[kind] = self._capture(self.steps[kind])
            graph, output = self.graphs[kind]
            graph.replay()
        return output

    def _capture(self, step: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """Warm up (compiling) on a side stream, capture one step; the state is restored around both, and the
        keys/values the warm-up wrote are overwritten by the real step at the same slot."""
        state = [t.clone() for t in (self.token, self.position, self.slot, self.key_valid)]

        def restore() -> None:
            for live, saved in zip((self.token, self.position, self.slot, self.key_valid), state):
                live.copy_(saved)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
                restore()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # on `side`, a stream of the model's GPU: torch.cuda.graph's default capture stream belongs to whichever
        # GPU was current when the process first captured
        with torch.cuda.graph(graph, stream=side):
            output = step()
        restore()
        return graph, output


@torch.no_grad()
def fast_generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.LongTensor] = None,
    max_new_tokens: Optional[int] = None,
    max_length: Optional[int] = None,
    min_new_tokens: int = 0,
    do_sample: Optional[bool] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    pad_token_id: Optional[int] = None,
    compile: Optional[bool] = None,
    **ignored: Any,
) -> torch.LongTensor:
    """Greedy or sampled decoding of a (left-padded) batch [b, n] → sequences [b, n + new], like generate().

    Unset arguments come from `model.generation_config`. After a row's end-of-sequence token it receives
    `pad_token_id`. `compile` defaults to True on CUDA (False runs the same static-cache step eagerly).
    """
    config = model.generation_config
    do_sample = config.do_sample if do_sample is None else do_sample
    temperature = (config.temperature or 1.0) if temperature is None else temperature
    top_k = (config.top_k or 0) if top_k is None else top_k
    top_p = (config.top_p or 1.0) if top_p is None else top_p
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = (config.pad_token_id if config.pad_token_id is not None else 0) if pad_token_id is None else pad_token_id
    batch, prompt_len = input_ids.shape
    if max_new_tokens is None:
        max_new_tokens = (max_length or config.max_length or 20) - prompt_len
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 (got {max_new_tokens}; prompt has {prompt_len} tokens)")
    capacity = prompt_len + max_new_tokens
    if capacity > model.config.seq_length:
        raise ValueError(f"Prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {capacity} tokens exceeds "
                         f"this model's seq_length {model.config.seq_length}")
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("Right padding detected: every row must end with a real token. Use padding_side='left'.")
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    compile = device.type == "cuda" if compile is None else compile

    decoder = _decoder_for(model, batch, min(_bucket(capacity), model.config.seq_length), compile)
    decoder.cache.length = 0
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=decoder.cache, use_cache=True, return_last_logit=True).logits[:, -1].float()
    eos_tensor = torch.tensor(eos, device=device, dtype=torch.long) if eos else None
    out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    # greedy decoding stays on the device: the argmax (eos ids excluded before min_new_tokens) is part of the step
    greedy_in_graph = not do_sample and (eos_tensor is None or len(eos) <= MAX_BANNED)
    if greedy_in_graph and eos_tensor is not None and min_new_tokens > 1:
        decoder.ban(eos)
    produced = max_new_tokens
    for step in range(max_new_tokens):
        if step == 0 or not greedy_in_graph:
            if eos_tensor is not None and step < min_new_tokens:
                logits[:, eos_tensor] = float("-inf")
            token = sample_next(logits, do_sample, temperature, top_k, top_p)[:, None]
            if step == 0:
                decoder.start(token, position_ids[:, -1:] + 1, prompt_len, attention_mask.bool())
            else:
                decoder.token.copy_(token)
        out[:, step:step + 1] = token
        # (no end-of-sequence can have come out before min_new_tokens: no check, no host sync, until then)
        if eos_tensor is not None and step >= min_new_tokens - 1 and step % EOS_CHECK_EVERY == EOS_CHECK_EVERY - 1 \
                and bool(torch.isin(out[:, :step + 1], eos_tensor).any(-1).all()):
            produced = step + 1
            break
        if step == max_new_tokens - 1:
            break
        if greedy_in_graph:
            token = decoder.run("greedy_banned" if eos_tensor is not None and step + 1 < min_new_tokens
                                else "greedy")
        else:
            logits = decoder.run("logits")
    decoder.cache.length = 0  # the cache is scratch space of this call
    out = out[:, :produced]
    if eos_tensor is not None:  # pad after each row's end, and end where the last row ended, as generate() does
        hit = torch.isin(out, eos_tensor)
        out = out.masked_fill(hit.long().cumsum(-1) - hit.long() > 0, pad)
        if bool(hit.any(-1).all()):
            out = out[:, :int(hit.float().argmax(-1).max()) + 1]
    return torch.cat([input_ids, out], dim=1)


def _bucket(capacity: int) -> int:
    """Round the cache capacity up (multiple of 256) so nearby request lengths share one compiled step."""
    return -(-capacity // 256) * 256


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Where every parameter's storage is, in which dtype: a decoder captured its cache and its graphs (and the
    fused step its weight tensors) for one placement, and `.to()`, `.half()`, `quantize()` or a device map after
    a first generate() make new tensors that it would not see (in-place updates keep the fingerprint and are
    seen)."""
    return tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())


def _decoder_for(model: torch.nn.Module, batch: int, capacity: int, compile: bool) -> CompiledDecoder:
    decoder = getattr(model, "_chatglm_decoder", None)
    if decoder is None or decoder.batch != batch or decoder.capacity < capacity or \
            decoder.compiled != compile or decoder.weights != weights_fingerprint(model):
        if decoder is not None:  # free the old cache and graphs before allocating (its step closures form a cycle)
            decoder = None
            object.__setattr__(model, "_chatglm_decoder", None)
            gc.collect()
        decoder = CompiledDecoder(model, batch, capacity, compile)
        # a plain attribute, not a submodule: keeps the cache out of state_dict and .to()
        object.__setattr__(model, "_chatglm_decoder", decoder)
    return decoder
