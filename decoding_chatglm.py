"""Fast decoding: a preallocated key/value cache and a one-token step replayed without host syncs.

transformers' generate() spends more time in Python per token than the GPU spends reading the 12 GB of weights
(~2.8 ms on an H200). `fast_generate` keeps the loop on the device: the prompt is prefilled once (eager), then a
one-token step (the fused Triton kernels, or the model's forward, eager or `torch.compile`d), captured in a CUDA
graph on GPU, runs one token at a time, sampling on the device, and the host only checks for end-of-sequence every
few steps. It is what `generate(..., cache_implementation="static")`, and on CUDA a plain `generate()`, run when the
request needs nothing it lacks (see `fast_path_supports`), and a documented call on every transformers version.

The same loop (`DecodeRun`: settings, penalty, logits processors, sampling in generate()'s order) also runs on a
growing cache with the eager forward (`GrowingCacheRun`), which the chat methods use where the static decoder does
not serve (`chat_cache_kind`): streaming then needs no helper thread around generate().
"""
from __future__ import annotations

import gc
import os
import threading
import types
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.utils import logging

from .compat_chatglm import (
    GENERATE_BUILDS_STATIC_CACHE,
    StopStringCriteria,
    cache_layer,
    cache_length,
    generation_setting,
    kernel_device,
    new_dynamic_cache,
)
from .decode_kernels_chatglm import FusedDecodeStep, unsupported_reason

logger = logging.get_logger(__name__)

# generate() arguments our decode loop understands; anything else goes to transformers' generate().
FAST_PATH_KWARGS = frozenset({
    "input_ids", "attention_mask", "position_ids", "max_new_tokens", "max_length", "min_new_tokens", "do_sample",
    "temperature", "top_k", "top_p", "repetition_penalty", "logits_processor", "stopping_criteria", "stop_strings",
    "tokenizer", "eos_token_id", "pad_token_id", "cache_implementation", "use_cache", "streamer",
    "num_beams", "num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits",
})
FAST_CHAT_ENV = "CHATGLM_FAST_CHAT"  # 0: chat methods on generate(); 1 / static, growing: that loop where it serves
FAST_GENERATE_ENV = "CHATGLM_FAST_GENERATE"  # 0: a plain generate() call stays on transformers' loop on CUDA too
# Generation-config fields the loop honours; a model whose generation config sets any other (beams, n-gram bans,
# min_length, max_new_tokens, ...) decodes on transformers' generate(), which reads them.
LOOP_CONFIG_FIELDS = frozenset({
    "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id", "pad_token_id",
    "bos_token_id", "max_length", "use_cache", "transformers_version", "_from_model_config",
})
EOS_CHECK_EVERY = 16
# adapter-layer attributes (PEFT, old and new names) whose values decide the branches a layer's forward takes
ADAPTER_SWITCHES = ("active_adapter", "active_adapters", "disable_adapters", "merged", "merged_adapters", "scaling")
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
    """Whether `generate(**kwargs)` runs on `fast_generate` (the static decoder) with the same result: requests with
    `cache_implementation="static"` the loop serves (on CUDA, and everywhere on transformers < 4.42, whose
    generate() builds no static cache for this model), and on CUDA plain ones (no cache_implementation, an explicit
    max_new_tokens or max_length) for a model on one GPU whose cache fits in free memory, as chat's
    (`CHATGLM_FAST_GENERATE=0` leaves those on transformers' loop)."""
    if not loop_serves(model, kwargs):
        return False
    if "cache_implementation" in kwargs:  # (on CPU, transformers >= 4.42 builds its own static cache for it)
        return kwargs["cache_implementation"] == "static" and (
            model.device.type == "cuda" or not GENERATE_BUILDS_STATIC_CACHE)
    if _switched_off(FAST_GENERATE_ENV) or (kwargs.get("max_new_tokens") is None and kwargs.get("max_length") is None):
        return False  # (without a budget, transformers' default length depends on its version)
    try:
        return kwargs["input_ids"].device == model.device and _static_decoder_fits(model, kwargs)
    except ValueError:  # prompt + budget past seq_length: transformers' loop runs until an eos, or raises there
        return False


def loop_serves(model: torch.nn.Module, kwargs: dict) -> bool:
    """Whether our decode loop gives what `generate(**kwargs)` gives: greedy or sampling with the settings it
    knows (logits processors included), one sequence per row, no scores; an inference model whose generation config
    sets nothing else."""
    if not set(kwargs) <= FAST_PATH_KWARGS:
        return False
    if kwargs.get("num_beams", 1) != 1 or kwargs.get("num_return_sequences", 1) != 1:
        return False
    if kwargs.get("return_dict_in_generate") or kwargs.get("output_scores") or kwargs.get("output_logits"):
        return False
    if kwargs.get("stop_strings") and (StopStringCriteria is None or kwargs.get("tokenizer") is None):
        return False  # (generate() gives its own error, or ignores them, where it cannot stop at text)
    if any(value not in (None, False, [], {}) and name not in LOOP_CONFIG_FIELDS  # (False/0/None: a switch left off)
           for name, value in model.generation_config.to_diff_dict().items()):
        return False
    input_ids = kwargs.get("input_ids")
    return isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and not model.training


def _switched_off(env: str) -> bool:
    return os.environ.get(env, "").strip().lower() in ("0", "false", "no", "off")


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
        self.weights, self.module_state = weights_fingerprint(model), module_state(model)
        layer_devices = model.transformer.layer_devices()
        self.cache = StaticKVCache(config.num_layers, batch, config.num_key_value_heads, config.kv_channels,
                                   capacity, param.dtype, layer_devices)
        # A model split over devices (accelerate device map) steps eagerly: one CUDA graph cannot hold the
        # work of several GPUs here, and the compiled step would trace accelerate's hooks.
        one_device = len({place for _, _, place in self.weights} | set(layer_devices)) == 1
        compile = compile and one_device
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        # token ids a "greedy_banned" step never picks (end-of-sequence ids before min_new_tokens); fixed size so
        # one captured graph serves any list of up to MAX_BANNED ids (unused entries repeat the first)
        self.banned = torch.zeros(MAX_BANNED, dtype=torch.long, device=device)
        # the step, fused, compiled or the model's eager forward, replays from a CUDA graph: one launch per token
        self.use_graphs = one_device and device.type == "cuda"
        # Triton kernels with the small operations fused into the weight reads (CUDA, batch <= 16, plain or
        # int8/int4 linears); None: the model's own forward, compiled where `compile` asks for it.
        self.fused = FusedDecodeStep.build(model, self.cache.keys, self.cache.values, batch, capacity) \
            if compile or device.type != "cuda" else None
        steps = {"logits": self._logits_step, "greedy": self._greedy_step,
                 "greedy_banned": lambda: self._greedy_step(self.banned)}
        # CHATGLM_COMPILE_MODE picks torch.compile's mode (e.g. "max-autotune-no-cudagraphs": slower to build,
        # autotunes the matrix products); the CUDA graph is ours either way.
        mode = os.environ.get("CHATGLM_COMPILE_MODE") or None
        self.steps = {k: torch.compile(_own_code(f), mode=mode, fullgraph=False, dynamic=False)
                      for k, f in steps.items()} if compile and self.fused is None else steps
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
                try:
                    self.graphs[kind] = self._capture(self.steps[kind])
                except Exception as error:  # an eager step that reads device values on the host (a custom layer)
                    if self.compiled:
                        raise
                    logger.warning_once(f"fast path: the eager decode step cannot be captured in a CUDA graph "
                                        f"({error}); it runs without one")
                    self.use_graphs = False
                    return self.steps[kind]()
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


def _own_code(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`step` (a bound method or a function) with a code object of its own. torch.compile keeps its graphs and
    counts recompilations (`recompile_limit`, 8) per code object, and a decoder of a new batch size or capacity
    means new tensor shapes: shared code would make the ninth decoder of a process run its step uncompiled, which
    fails inside the CUDA graph capture. Each decoder's graphs also go with its code when it is dropped."""
    func = getattr(step, "__func__", step)
    own = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                             func.__closure__)
    bound_to = getattr(step, "__self__", None)
    return own if bound_to is None else types.MethodType(own, bound_to)


class FastPathBusy(RuntimeError):
    """The model's decoder is in use: by another thread, or by a stream that has not finished."""


class DecodeRun:
    """One generation by our own loop: the request's settings (unset ones as generate() resolves them), the prompt
    prefilled, then `steps`; `close` ends it. Subclasses hold the keys/values: `StaticCacheRun` in the model's
    preallocated decoder (fused, compiled or eager step), `GrowingCacheRun` in a growing cache (the eager forward).

    `past_key_values`: a growing cache that holds the keys/values of the first k < n tokens of input_ids [b, n];
    only the rest of the prompt is computed.
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.LongTensor,
                 attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.LongTensor] = None,
                 max_new_tokens: Optional[int] = None, max_length: Optional[int] = None, min_new_tokens: int = 0,
                 do_sample: Optional[bool] = None, temperature: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
                 logits_processor: Optional[Sequence[Callable]] = None,
                 stopping_criteria: Optional[Sequence[Callable]] = None,
                 stop_strings: Optional[Union[str, Sequence[str]]] = None, tokenizer: Any = None,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None,
                 compile: Optional[bool] = None, past_key_values: Any = None,
                 cache_implementation: Optional[str] = None, **ignored: Any):
        config = model.generation_config

        def setting(name: str, value: Any) -> Any:  # a request's value, else what generate() would use
            return generation_setting(config, name) if value is None else value

        self.do_sample = bool(setting("do_sample", do_sample))
        self.temperature, self.top_k = setting("temperature", temperature), setting("top_k", top_k) or 0
        self.top_p = setting("top_p", top_p)
        self.repetition_penalty = float(setting("repetition_penalty", repetition_penalty))
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be a positive number (1.0: none), got {repetition_penalty}")
        self.processors = LogitsProcessorList(logits_processor or [])  # the caller's, run as generate() runs them
        self.criteria = StoppingCriteriaList(stopping_criteria or [])
        if stop_strings:
            if StopStringCriteria is None or tokenizer is None:
                raise ValueError("stop_strings need transformers >= 4.42 and the tokenizer: pass tokenizer=tok")
            self.criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
        eos = setting("eos_token_id", eos_token_id)
        self.eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.pad = setting("pad_token_id", pad_token_id) or 0
        self.min_new_tokens = min_new_tokens or 0
        self.input_ids = input_ids
        batch, self.prompt_len = input_ids.shape
        self.max_new_tokens = new_token_budget(model, self.prompt_len, max_new_tokens, max_length)
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("Right padding detected: every row must end with a real token. Use padding_side='left'.")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.attention_mask, self.position_ids = attention_mask, position_ids
        held = cache_length(past_key_values)  # (a P-tuning model's cache starts with its prefix)
        self.held = held - (model.config.pre_seq_len or 0) if held else 0
        if not 0 <= self.held < self.prompt_len:
            raise ValueError(f"past_key_values holds {self.held} positions; it must hold fewer than the "
                             f"{self.prompt_len} tokens of input_ids (their start)")
        self.eos_tensor = torch.tensor(self.eos, device=device, dtype=torch.long) if self.eos else None
        self.seen: Optional[torch.Tensor] = None  # [b, vocab]: ids in each row so far (for repetition_penalty)
        self.out = torch.full((batch, self.max_new_tokens), self.pad, dtype=torch.long, device=device)
        self.produced = 0
        if compile is None:  # torch.compile where asked for: its first call for a shape takes tens of seconds
            compile = device.type == "cuda" and (cache_implementation == "static"
                                                 or unsupported_reason(model, batch) is None)
        self.logits = self._open(model, past_key_values, compile)

    def _open(self, model: torch.nn.Module, past: Any, compile: bool) -> torch.Tensor:
        """Take what the run needs, prefill the prompt after what `past` holds → last logits [b, vocab] fp32."""
        raise NotImplementedError

    def steps(self, stream: bool) -> Iterator[torch.Tensor]:
        """Decode. stream: yield every step's new tokens [b] on the CPU (pad for rows that ended before) until every
        row has produced an end-of-sequence id or the budget is spent; otherwise yield nothing."""
        raise NotImplementedError

    def export(self, cache: Any) -> None:
        """Bring `cache` (the one the run started from) to what generate() would leave in it by now: the keys/values
        of every token but the last one produced, the prompt included."""

    def close(self) -> None:
        """End the run (a stream closed early included), giving back what it holds."""

    def _forward_prompt(self, model: torch.nn.Module, cache: Any) -> torch.Tensor:
        """The prompt after the `held` tokens `cache` already has, into it → last-position logits [b, vocab] fp32."""
        out = model(input_ids=self.input_ids[:, self.held:], attention_mask=self.attention_mask,
                    position_ids=self.position_ids[:, self.held:], past_key_values=cache, use_cache=True,
                    return_last_logit=True)
        return out.logits[:, -1].float()

    def _pick(self, step: int) -> torch.Tensor:
        """The token of `step` from the last logits → [b, 1]. In generate()'s order: the repetition penalty on every
        id the row holds, eos ids excluded before min_new_tokens, the caller's logits processors (given the ids so
        far [b, n + step]), then the sampling warpers. Left padding is not penalized (as in transformers >= 5.23;
        older ones penalize the pad id too), so a row's reply does not depend on the batch it is in."""
        logits = self.logits
        if self.repetition_penalty != 1.0:
            if self.seen is None:  # (pad positions are scattered into a spare column past the vocabulary)
                batch, vocab = logits.shape
                seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device)
                seen.scatter_(1, self.input_ids.masked_fill(self.attention_mask == 0, vocab), True)
                self.seen = seen[:, :vocab]
            penalized = torch.where(logits < 0, logits * self.repetition_penalty, logits / self.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if self.eos_tensor is not None and step < self.min_new_tokens:
            logits[:, self.eos_tensor] = float("-inf")
        if self.processors:
            logits = self.processors(torch.cat([self.input_ids, self.out[:, :step]], dim=1), logits)
        token = sample_next(logits, self.do_sample, self.temperature, self.top_k, self.top_p)[:, None]
        if self.seen is not None:
            self.seen.scatter_(1, token, True)
        return token

    def _criteria_stop(self, step: int) -> Optional[torch.Tensor]:
        """The caller's stopping criteria on the ids so far [b, n + step + 1] (scores None, as generate() passes them
        without output_scores) → the rows they end [b] on the CPU, or None where they end the whole batch (a bool:
        transformers < 4.39, whose generate() then stops every row)."""
        done = self.criteria(torch.cat([self.input_ids, self.out[:, :step + 1]], dim=1), None)
        if isinstance(done, torch.Tensor) and done.dim() > 0:
            return done.view(-1).bool().cpu()
        return None if bool(done) else torch.zeros(self.out.shape[0], dtype=torch.bool)

    def sequences(self) -> torch.LongTensor:
        """input_ids followed by the new tokens [b, n + new], as generate() returns them: pad after each row's end,
        cut where the last row ended."""
        out = self.out[:, :self.produced]
        if self.eos_tensor is not None:
            hit = torch.isin(out, self.eos_tensor)
            out = out.masked_fill(hit.long().cumsum(-1) - hit.long() > 0, self.pad)
            if bool(hit.any(-1).all()):
                out = out[:, :int(hit.float().argmax(-1).max()) + 1]
        return torch.cat([self.input_ids, out], dim=1)


class StaticCacheRun(DecodeRun):
    """A run on the model's `CompiledDecoder` (preallocated cache; compiled, fused or eager step), held under a
    per-model lock: FastPathBusy while another run has it. The prompt goes into the decoder's cache after a copy of
    what `past_key_values` holds (or a P-tuning model's prefix); `export` appends the new slots to that cache."""

    def _open(self, model: torch.nn.Module, past: Any, compile: bool) -> torch.Tensor:
        # cache slots: a P-tuning model's prefix first, then the tokens; `exported`: slots the caller's cache holds
        self.prefix = model.config.pre_seq_len or 0
        self.exported = cache_length(past)
        # greedy decoding stays on the device: the argmax (eos ids excluded before min_new_tokens) is in the step
        self.greedy_in_graph = not self.do_sample and self.repetition_penalty == 1.0 and not self.processors and \
            (self.eos_tensor is None or len(self.eos) <= MAX_BANNED)
        self.lock = _model_lock(model)
        if not self.lock.acquire(blocking=False):
            raise FastPathBusy("this model's fast path is in use by another generation (another thread, or a stream "
                               "not yet finished or closed)")
        try:
            self.decoder = _decoder_for(model, self.out.shape[0], _capacity(model, self.prompt_len,
                                                                            self.max_new_tokens), compile)
            return self._prefill(model, past)
        except BaseException:
            self.close()
            raise

    def _prefill(self, model: torch.nn.Module, past: Any) -> torch.Tensor:
        """The prompt (after what `past` holds) into the decoder's cache → last-position logits [b, vocab] fp32.
        The slots before it come from `past`, or for a P-tuning model with nothing in `past`, from its prefix."""
        cache = self.decoder.cache
        start = self.prefix + self.held
        prefix = None if self.exported or not self.prefix else \
            model.transformer.get_prompt(self.out.shape[0], cache.keys[0].device, cache.keys[0].dtype)
        for layer_idx in range(len(cache.keys) if start else 0):
            key, value = cache_layer(past, layer_idx) if prefix is None else prefix[2 * layer_idx:2 * layer_idx + 2]
            cache.keys[layer_idx][:, :, :start].copy_(key)
            cache.values[layer_idx][:, :, :start].copy_(value)
        cache.length = start
        return self._forward_prompt(model, cache)

    def steps(self, stream: bool) -> Iterator[torch.Tensor]:
        """Decode. Each step launches the next one before the host looks at its token, so the GPU keeps working.

        stream: yield every step's new tokens [b] on the CPU (pad for rows that ended before), until every row has
        produced an end-of-sequence id (or met a stopping criterion) or the budget is spent. Otherwise yield nothing
        and check for the end every EOS_CHECK_EVERY steps (one host synchronisation each; none before
        min_new_tokens), or every step where there are stopping criteria."""
        decoder, last = self.decoder, self.max_new_tokens - 1
        ended = torch.zeros(self.out.shape[0], dtype=torch.bool)
        eos_host = torch.tensor(self.eos, dtype=torch.long)
        host = HostCopy(self.out.device) if stream or self.criteria else None
        self.produced = 0 if host is not None else self.max_new_tokens
        for step in range(self.max_new_tokens):
            if step == 0 or not self.greedy_in_graph:
                token = self._pick(step)
                if step == 0:
                    if self.greedy_in_graph and self.eos_tensor is not None and self.min_new_tokens > 1:
                        decoder.ban(self.eos)
                    decoder.start(token, self.position_ids[:, -1:] + 1, self.prefix + self.prompt_len,
                                  F.pad(self.attention_mask.bool(), (self.prefix, 0), value=True))
                else:
                    decoder.token.copy_(token)
            self.out[:, step:step + 1] = token
            if host is not None:
                host.start(token)
            if step < last:
                if self.greedy_in_graph:
                    banned = self.eos_tensor is not None and step + 1 < self.min_new_tokens
                    token = decoder.run("greedy_banned" if banned else "greedy")
                else:
                    self.logits = decoder.run("logits")
            if host is not None:
                tokens = host.result()
                if self.eos:  # generate() pads a finished row's later tokens only where there is an eos id
                    tokens = tokens.masked_fill(ended, self.pad)
                    if self.criteria:  # which read the ids so far as generate() holds them
                        self.out[:, step].masked_fill_(ended.to(self.out.device), self.pad)
                self.produced = step + 1
                if stream:
                    yield tokens
                if self.eos:
                    ended |= torch.isin(tokens, eos_host)
                if self.criteria:
                    stopped = self._criteria_stop(step)
                    if stopped is None:
                        return
                    ended |= stopped
                if bool(ended.all()):
                    return
            elif self.eos_tensor is not None and step >= self.min_new_tokens - 1 and \
                    step % EOS_CHECK_EVERY == EOS_CHECK_EVERY - 1 and step < last and \
                    bool(torch.isin(self.out[:, :step + 1], self.eos_tensor).any(-1).all()):
                self.produced = step + 1
                return

    def export(self, cache: Any) -> None:
        """Only new positions are appended; a cache that changed meanwhile (another generation extended it) is left
        alone."""
        length = self.prefix + self.prompt_len + self.produced - 1
        if length <= self.exported:
            return
        if cache_length(cache) != self.exported:
            logger.warning("fast path: the cache was changed by another generation during this one; not updated")
            return
        for layer_idx, (keys, values) in enumerate(zip(self.decoder.cache.keys, self.decoder.cache.values)):
            cache.update(keys[:, :, self.exported:length].clone(), values[:, :, self.exported:length].clone(),
                         layer_idx)
        self.exported = length

    def close(self) -> None:
        """Give the decoder back (its cache is scratch space of each run)."""
        decoder = getattr(self, "decoder", None)
        if decoder is not None:
            decoder.cache.length = 0
        if self.lock.locked():
            self.lock.release()


class GrowingCacheRun(DecodeRun):
    """A run on a growing cache (the caller's `past_key_values`, else a new one) with the model's eager forward, one
    step at a time in the caller's thread: nothing preallocated and nothing shared, so no lock. For CPU and for
    requests the static decoder does not take (batch or cache size, the decoder busy). Rows that ended are fed pad,
    and the cache holds every token but the last one produced, as generate() leaves them."""

    def _open(self, model: torch.nn.Module, past: Any, compile: bool) -> torch.Tensor:
        self.model = model
        self.cache = new_dynamic_cache() if past is None else past
        return self._forward_prompt(model, self.cache)

    def steps(self, stream: bool) -> Iterator[torch.Tensor]:
        """Each token is fed to the model when the next one is asked for, so a stream closed after step k leaves the
        cache without token k."""
        batch = self.out.shape[0]
        ended = torch.zeros(batch, 1, dtype=torch.bool, device=self.out.device)
        mask, position = self.attention_mask, self.position_ids[:, -1:]
        for step in range(self.max_new_tokens):
            token = self._pick(step)
            if self.eos_tensor is not None:  # (as generate(): a row ended by a stopping criterion alone goes on)
                token = token.masked_fill(ended, self.pad)
            self.out[:, step:step + 1] = token
            self.produced = step + 1
            if stream:
                yield token.view(-1).cpu()
            if self.eos_tensor is not None:
                ended |= torch.isin(token, self.eos_tensor)
            if self.criteria:
                stopped = self._criteria_stop(step)
                if stopped is None:
                    return
                ended |= stopped.to(ended.device)[:, None]
            if (self.eos_tensor is not None or self.criteria) and bool(ended.all()):
                return
            if step == self.max_new_tokens - 1:
                return
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            position = position + 1
            out = self.model(input_ids=token, attention_mask=mask, position_ids=position, past_key_values=self.cache,
                             use_cache=True)
            self.logits = out.logits[:, -1].float()


class HostCopy:
    """A device → CPU copy of a step's tokens that the host waits for without waiting for the steps after it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffer: Optional[torch.Tensor] = None
        self.event = torch.cuda.Event() if self.cuda else None
        self.device = device

    def start(self, token: torch.Tensor) -> None:
        if self.buffer is None:
            self.buffer = torch.empty(token.numel(), dtype=token.dtype, pin_memory=self.cuda)
        self.buffer.copy_(token.view(-1), non_blocking=self.cuda)
        if self.event is not None:
            self.event.record(torch.cuda.current_stream(self.device))

    def result(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.buffer.clone()


@torch.no_grad()
def fast_generate(model: torch.nn.Module, input_ids: torch.LongTensor, cache_kind: str = "static",
                  streamer: Any = None, **kwargs: Any) -> torch.LongTensor:
    """Greedy or sampled decoding of a (left-padded) batch [b, n] → sequences [b, n + new], like generate().

    Keyword arguments: attention_mask, position_ids, max_new_tokens / max_length, min_new_tokens, do_sample,
    temperature, top_k, top_p, repetition_penalty, logits_processor, eos_token_id, pad_token_id (unset ones as
    generate() sets them: from `model.generation_config`, else transformers' defaults such as top_k 50; after a
    row's end-of-sequence token it receives pad_token_id), and `compile`: which step a static decoder runs on CUDA.
    By default the fused Triton step where it serves the batch, else the model's eager forward, both replayed from a
    CUDA graph; `cache_implementation="static"` or compile=True puts torch.compile on the forward instead (faster
    for large batches, tens of seconds to build); compile=False is the eager forward. Others are ignored.
    cache_kind "static": the model's preallocated decoder (FastPathBusy while another run holds it); "growing": a
    growing cache and the eager forward (`GrowingCacheRun`).
    `streamer` (a transformers TextStreamer / TextIteratorStreamer) is fed as generate() feeds it: the prompt, each
    step's tokens [b] on the CPU, then `end()`.
    """
    run = _run_class(cache_kind)(model, input_ids, **kwargs)
    try:
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for tokens in run.steps(stream=streamer is not None):
            streamer.put(tokens)
    finally:
        run.close()
    if streamer is not None:
        streamer.end()
    return run.sequences()


@torch.no_grad()
def fast_stream(model: torch.nn.Module, input_ids: torch.LongTensor, past_key_values: Any = None,
                live_cache: bool = False, cache_kind: str = "static", **kwargs: Any) -> Iterator[torch.LongTensor]:
    """`fast_generate` one step at a time: yields each step's new tokens [b] (CPU; pad for rows already ended).

    With `past_key_values` (a growing cache holding the start of input_ids, possibly nothing), only the rest of
    the prompt is computed, and once the stream ends or is closed the cache holds the keys/values of every token
    but the last one yielded, as generate() leaves it; with `live_cache` it is brought up to date before every
    yield (for callers that read it between steps: a growing cache's appends cost time at long contexts). A
    "growing" run writes into that cache itself and keeps it current at every step."""
    run = _run_class(cache_kind)(model, input_ids, past_key_values=past_key_values, **kwargs)
    try:
        for tokens in run.steps(stream=True):
            if live_cache and past_key_values is not None:
                run.export(past_key_values)
            yield tokens
    finally:
        try:
            if past_key_values is not None:
                run.export(past_key_values)
        finally:
            run.close()


def _run_class(cache_kind: str) -> type:
    runs = {"static": StaticCacheRun, "growing": GrowingCacheRun}
    if cache_kind not in runs:
        raise ValueError(f"cache_kind must be one of {sorted(runs)}, got {cache_kind!r}")
    return runs[cache_kind]


def chat_cache_kind(model: torch.nn.Module, request: dict) -> Optional[str]:
    """How chat / batch_chat / stream_chat decode `request` (generate()'s keyword arguments, inputs included):
    "static" (`StaticCacheRun`), "growing" (`GrowingCacheRun`), or None (transformers' generate(): beams, stopping
    criteria, n-gram bans, ...).

    CHATGLM_FAST_CHAT=0: None; =1 (or "static"): "static" wherever `loop_serves` (CPU included: the eager step);
    ="growing": "growing" there. Default: "static" for a model on one GPU where a cache for prompt + budget fits
    in the free GPU memory (the fused Triton step where it serves the batch, else the eager forward, in a CUDA
    graph; nothing to compile); "growing" for the other requests the loop serves (CPU among them: nothing
    preallocated there, and no thread)."""
    if _switched_off(FAST_CHAT_ENV) or not loop_serves(model, request):
        return None
    setting = os.environ.get(FAST_CHAT_ENV, "").strip().lower()
    if setting in ("1", "true", "yes", "on", "static"):
        return "static"
    if setting == "growing":
        return "growing"
    return "static" if _static_decoder_fits(model, request) else "growing"


def _static_decoder_fits(model: torch.nn.Module, request: dict) -> bool:
    """On CUDA, a model on one GPU: its decoder for the batch and prompt + budget exists or fits in memory."""
    batch, prompt_len = request["input_ids"].shape
    if model.device.type != "cuda" or len({p.device for p in model.parameters()}) > 1:
        return False
    new = new_token_budget(model, prompt_len, request.get("max_new_tokens"), request.get("max_length"))
    capacity = _capacity(model, prompt_len, new)
    decoder = getattr(model, "_chatglm_decoder", None)
    if decoder is not None and decoder.batch == batch and decoder.capacity >= capacity:
        return True
    config = model.config
    need = (2 * config.num_layers * batch * config.num_key_value_heads * config.kv_channels * capacity
            * next(model.parameters()).element_size())
    free = torch.cuda.mem_get_info(model.device)[0] + torch.cuda.memory_reserved(model.device) \
        - torch.cuda.memory_allocated(model.device)
    return need + 2**29 <= free


def new_token_budget(model: torch.nn.Module, prompt_len: int, max_new_tokens: Optional[int],
                     max_length: Optional[int]) -> int:
    """How many tokens a request may add to a prompt (max_new_tokens, else max_length − prompt); ValueError when
    none or when the total passes the model's seq_length."""
    if max_new_tokens is None:
        max_new_tokens = (max_length or model.generation_config.max_length or 20) - prompt_len
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 (got {max_new_tokens}; prompt has {prompt_len} tokens)")
    if prompt_len + max_new_tokens > model.config.seq_length:
        raise ValueError(f"Prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
                         f"tokens exceeds this model's seq_length {model.config.seq_length}")
    return max_new_tokens


_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(model: torch.nn.Module) -> threading.Lock:
    """The lock a run holds on `model`'s decoder (kept outside the module, so copies and pickles of the model work)."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.Lock())


def _capacity(model: torch.nn.Module, prompt_len: int, new_tokens: int) -> int:
    """Cache slots a decoder is built with for a request: prompt + new tokens rounded up to a multiple of 256
    (so nearby request lengths share one compiled step), at most the model's seq_length; plus a P-tuning prefix."""
    tokens = min(-(-(prompt_len + new_tokens) // 256) * 256, model.config.seq_length)
    return tokens + (model.config.pre_seq_len or 0)


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Where every parameter's storage is, in which dtype: a decoder captured its cache and its graphs (and the
    fused step its weight tensors) for one placement, and `.to()`, `.half()`, `quantize()` or a device map after
    a first generate() make new tensors that it would not see (in-place updates keep the fingerprint and are
    seen)."""
    return tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())


def module_state(model: torch.nn.Module) -> tuple:
    """The Python-side state a captured step bakes in beyond the weights: forward hooks, and the switches of adapter
    layers (PEFT LoRA: active adapter, disabled, merged, scaling). A CUDA graph replays the branches its capture took,
    so `with peft_model.disable_adapter():`, `set_adapter` or a hook added after a first call must rebuild the
    decoder."""
    state = []
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            state.append((name, tuple(module._forward_hooks), tuple(module._forward_pre_hooks)))
        if type(module).__module__.startswith("peft."):
            state.append((name, *(_read(module, switch) for switch in ADAPTER_SWITCHES)))
    return tuple(state)


def _read(module: torch.nn.Module, attribute: str) -> str:
    try:
        return repr(getattr(module, attribute, None))
    except Exception:  # (a property that refuses in this module's configuration)
        return "?"


def release_decoder(model: torch.nn.Module) -> bool:
    """Free the model's static decoder (its cache and CUDA graphs; the next fast-path call builds a new one) →
    whether there was one. FastPathBusy while a run holds it."""
    lock = _model_lock(model)
    if not lock.acquire(blocking=False):
        raise FastPathBusy("this model's fast path is in use by another generation; release it after that ends")
    try:
        held = getattr(model, "_chatglm_decoder", None) is not None
        _drop_decoder(model)
        return held
    finally:
        lock.release()


def _drop_decoder(model: torch.nn.Module) -> None:
    """Free the model's decoder now (its step closures form a cycle, which only the collector frees)."""
    object.__setattr__(model, "_chatglm_decoder", None)
    gc.collect()


def _decoder_for(model: torch.nn.Module, batch: int, capacity: int, compile: bool) -> CompiledDecoder:
    decoder = getattr(model, "_chatglm_decoder", None)
    if decoder is None or decoder.batch != batch or decoder.capacity < capacity or decoder.compiled != compile or \
            decoder.weights != weights_fingerprint(model) or decoder.module_state != module_state(model):
        if decoder is not None:  # free the old cache and graphs before allocating the new ones
            decoder = None
            _drop_decoder(model)
        # its tensors are updated in place by every run: made outside inference mode, so a run under
        # torch.inference_mode() and a later one outside it can both use them
        with torch.inference_mode(False):
            decoder = CompiledDecoder(model, batch, capacity, compile)
        # a plain attribute, not a submodule: keeps the cache out of state_dict and .to()
        object.__setattr__(model, "_chatglm_decoder", decoder)
    return decoder
