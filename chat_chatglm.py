"""Chat API of ChatGLM2 / ChatGLM3 models: ``chat``, ``stream_chat``, ``stream_generate``, ``batch_chat``,
``stream_batch_chat``, ``process_response``, ``build_inputs``, ``build_stream_inputs`` (mixed into
``ChatGLMForConditionalGeneration``).

Prompts and reply parsing come from ``chat_format.py`` through the tokenizer. Tokens come from our own decode loop
(``decoding_chatglm``) where ``chat_cache_kind`` says it serves the request (greedy or sampling, top-k / top-p /
temperature / repetition penalty, logits processors; P-tuning models too): on CUDA the static decoder (preallocated
cache, fused step, CUDA graphs), else a growing cache and the eager forward, both in the caller's thread.
Anything else (beams, stopping criteria, n-gram bans, a generation config object, ...) goes to transformers' own
``generate()``; there ``stream_generate`` runs it in a background thread with a streamer that hands each step over
in lock-step, so the cache a caller sees between two steps is not being written to. The static decoder fills the
caller's cache when the stream ends or is closed; a growing run writes into it at every step.

Shapes: ``input_ids`` / ``attention_mask`` / ``position_ids`` are ``[batch, seq]`` (left padded); the streamed ids
are ``[batch, prompt + new]``. Histories: ChatGLM3 a list of message dicts, ChatGLM2 a list of ``[query, response]``.
"""
from __future__ import annotations

import inspect
import itertools
import json
import re
import threading
from dataclasses import dataclass
from queue import Queue
from typing import Any, Dict, Generator, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from transformers import BatchEncoding, GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging

from .chat_format import (
    CHATGLM2,
    CHATGLM3,
    CHAT_DEFAULTS,
    ChatDefaults,
    ChatFormatError,
    FAMILIES,
    process_chatglm2_response,
    process_chatglm3_response,
    system_content,
    validate_chatglm2_history,
    validate_chatglm3_history,
)
from .compat_chatglm import (CACHE_TYPES, GenerationMixin, cache_is_static, cache_length, crop_cache,
                             new_dynamic_cache)
from .decoding_chatglm import FastPathBusy, chat_cache_kind, fast_generate, fast_stream

logger = logging.get_logger(__name__)

Response = Union[str, Dict[str, Any]]
History = List[Any]
ChatResult = Tuple[Response, History]

#: Attribute of a cache object returned by ``stream_chat``: the token ids (prompt + reply) whose keys/values it holds
#: (a prefix of the list; the cache never holds the last generated token).
CACHE_IDS_ATTR = "_chatglm_token_ids"
_REPLACEMENT_CHAR = "\ufffd"  # an incomplete UTF-8 sequence at the end of a partial reply


@dataclass
class _Prompt:
    """One conversation ready for generation: ``ids`` is the prompt row [n]; ``history`` the JSON-clean history the
    reply is appended to (ChatGLM3: it already holds the query turn)."""

    family: str
    ids: List[int]
    history: History
    query: str


class BatchReply(NamedTuple):
    """One conversation of ``stream_batch_chat``: ``response`` and ``history`` as ``chat`` returns them, the
    ``tokens`` generated so far (a stop token included), and ``finish``: None while the reply grows, "stop" after
    a stop token, "length" once its budget is spent."""

    response: Response
    history: History
    tokens: int
    finish: Optional[str]


def _family(tokenizer: Any) -> str:
    family = getattr(tokenizer, "chat_format", None)
    if family in FAMILIES:
        return family
    return CHATGLM3 if hasattr(tokenizer, "build_single_message") else CHATGLM2


def _stop_ids(tokenizer: Any, family: str) -> List[int]:
    """ChatGLM3 ``[eos, <|user|>, <|observation|>]`` (2, 64795, 64797), ChatGLM2 ``[eos]``."""
    ids = getattr(tokenizer, "stop_token_ids", None)
    if ids:
        return [int(i) for i in ids]
    if family == CHATGLM3:
        return [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    return [tokenizer.eos_token_id]


def _as_list(ids: Union[None, int, Sequence[int], torch.Tensor]) -> List[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def _json_clean(value: Any) -> Any:
    """A deep copy made of dicts, lists, str, numbers, bools and None only."""
    return json.loads(json.dumps(value, ensure_ascii=False, default=str))


def _reply_ids(row: Sequence[int], prompt_len: int, stop: Sequence[int], budget: Optional[int] = None) -> List[int]:
    """The reply part of a generated row: after the prompt, at most ``budget`` tokens, cut before the first stop id
    (which also drops the padding that follows it in a batch)."""
    reply = list(row[prompt_len:])[:budget]
    for i, token in enumerate(reply):
        if token in stop:
            return reply[:i]
    return reply


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _StepStreamer(BaseStreamer):
    """Streamer that hands each ``put`` to the consumer thread and waits until it asks for the next step.

    The first ``put`` is the prompt ``[batch, n]``, the later ones the new token of each row ``[batch]``.
    """

    def __init__(self) -> None:
        self.items: "Queue[Tuple[str, Any]]" = Queue()
        self.stopped = threading.Event()
        self._go = threading.Semaphore(0)

    def put(self, value: torch.Tensor) -> None:
        if self.stopped.is_set():
            return
        self.items.put(("ids", value))
        self._go.acquire()

    def end(self) -> None:
        self.items.put(("end", None))

    def fail(self, error: BaseException) -> None:
        self.items.put(("error", error))

    def resume(self) -> None:
        self._go.release()

    def stop(self) -> None:
        self.stopped.set()
        self._go.release()


class _StopWhenSet(StoppingCriteria):
    """Ends generation once the consumer of ``stream_generate`` has stopped iterating."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> bool:
        return self.flag.is_set()


class ChatGLMChatMixin:
    """``chat`` / ``stream_chat`` / ``batch_chat`` / ``stream_generate`` for ``ChatGLMForConditionalGeneration``."""

    # ------------------------------------------------------------------------------------------ building prompts
    def build_inputs(self, tokenizer: Any, query: str, history: Optional[Sequence[Sequence[str]]] = None
                     ) -> BatchEncoding:
        """ChatGLM2 prompt of ``query`` after ``(query, response)`` pairs: ids, mask, positions [1, n]."""
        prompt = tokenizer.build_prompt(query, history=history)
        return tokenizer([prompt], return_tensors="pt").to(self.device)

    def build_stream_inputs(self, tokenizer: Any, query: str, history: Optional[Sequence[Sequence[str]]] = None
                            ) -> BatchEncoding:
        """ChatGLM2 continuation of a cached conversation: only the new round ``\\n\\n[Round n]…答：`` (its leading
        dummy-prefix piece removed), or the whole prompt when there is no history. [1, m]."""
        if not history:
            return self.build_inputs(tokenizer, query, history)
        text = "\n\n[Round {}]\n\n问：{}\n\n答：".format(len(history) + 1, query)
        ids = tokenizer.encode(text, add_special_tokens=False)[1:]
        data = {"input_ids": [ids], "attention_mask": [[1] * len(ids)], "position_ids": [list(range(len(ids)))]}
        return BatchEncoding(data, tensor_type="pt").to(self.device)

    def _chat_prompt(self, tokenizer: Any, query: str, history: Optional[Sequence[Any]], role: str) -> _Prompt:
        """Validate the conversation (ValueError naming the problem) and build its prompt ids."""
        if not isinstance(query, str):
            raise ChatFormatError(f"query must be a string, got {type(query).__name__}")
        family = _family(tokenizer)
        if family == CHATGLM2:
            if role != "user":
                raise ChatFormatError(f"ChatGLM2 conversations have only user turns, got role {role!r}")
            pairs = [list(p) for p in validate_chatglm2_history(history)]
            ids = self.build_inputs(tokenizer, query, pairs)["input_ids"][0].tolist()
            return _Prompt(family, ids, _json_clean(pairs), query)
        messages = validate_chatglm3_history(history)
        if query == "" and role in ("user", "observation") and messages and messages[-1]["role"] == "observation":
            # the reply to a tool result: no empty turn after the observation, just <|assistant|>
            ids = list(tokenizer.get_prefix_tokens())
            for m in messages:
                ids += tokenizer.build_single_message(m["role"], m.get("metadata") or "", system_content(m))
            ids.append(tokenizer.get_command("<|assistant|>"))
        else:
            ids = tokenizer.build_chat_input(query, history=messages, role=role)["input_ids"][0].tolist()
            messages = messages + [{"role": role, "content": query}]
        return _Prompt(family, [int(i) for i in ids], _json_clean(messages), query)

    def _chat_response(self, tokenizer: Any, prompt: _Prompt, reply: List[int], text: Optional[str] = None
                       ) -> ChatResult:
        """(response, history) of the reply ids (`text`: their decoding, when the caller has it already)."""
        text = tokenizer.decode(reply) if text is None else text
        if prompt.family == CHATGLM3:
            return process_chatglm3_response(text, prompt.history)
        response = process_chatglm2_response(text)
        return response, prompt.history + [[prompt.query, response]]

    def process_response(self, output: str, history: Optional[Sequence[Dict[str, Any]]] = None
                         ) -> Union[str, ChatResult]:
        """ChatGLM3 ``process_response(output, history) -> (response, new_history)`` (see chat_format); called
        without a history it is ChatGLM2's ``process_response(output) -> str``."""
        if history is None:
            return process_chatglm2_response(output)
        return process_chatglm3_response(output, history)

    # ------------------------------------------------------------------------------------------ generation settings
    def _chat_defaults(self, family: str) -> ChatDefaults:
        """The variant's defaults, found by config name, else by family and seq_length; 8192/0.8/0.8 otherwise.
        max_length never exceeds the model's seq_length."""
        config = self.config
        name = str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "")
        candidates = [re.split(r"[\\/]", name.rstrip("/\\"))[-1]]
        seq = getattr(config, "seq_length", None)
        if family == CHATGLM3:
            candidates.append({32768: "chatglm3-6b-32k", 131072: "chatglm3-6b-128k"}.get(seq, CHATGLM3))
        else:
            long = getattr(config, "rope_ratio_mode", None) == "divide_positions" and (config.rope_ratio or 1) > 1
            candidates.append("chatglm2-6b-32k" if long else CHATGLM2)
        found = next((CHAT_DEFAULTS[c.lower()] for c in candidates if c.lower() in CHAT_DEFAULTS),
                     ChatDefaults(8192, 0.8, 0.8))
        return ChatDefaults(min(found.max_length, seq or found.max_length), found.top_p, found.temperature)

    def _chat_generate_kwargs(self, tokenizer: Any, family: str, max_length: Optional[int], num_beams: int,
                              do_sample: bool, top_p: Optional[float], temperature: Optional[float],
                              logits_processor: Any, extra: Dict[str, Any]) -> Dict[str, Any]:
        """Keyword arguments for ``generate``: the variant's defaults, the family's stop ids, then ``extra``."""
        defaults = self._chat_defaults(family)
        kwargs: Dict[str, Any] = {"num_beams": num_beams, "do_sample": do_sample,
                                  "eos_token_id": _stop_ids(tokenizer, family), "pad_token_id": tokenizer.pad_token_id}
        if do_sample:
            kwargs["top_p"] = defaults.top_p if top_p is None else top_p
            kwargs["temperature"] = defaults.temperature if temperature is None else temperature
        if max_length is not None or extra.get("max_new_tokens") is None:
            kwargs["max_length"] = defaults.max_length if max_length is None else max_length
        if logits_processor is not None:
            kwargs["logits_processor"] = LogitsProcessorList(logits_processor)
        kwargs.update(extra)
        return kwargs

    def _check_prompt_length(self, length: int, kwargs: Dict[str, Any]) -> None:
        limit = self.config.seq_length
        if length > limit:
            raise ValueError(f"the conversation is {length} tokens long, more than this model's seq_length {limit}: "
                             "drop old turns from the history or shorten the query")
        if kwargs.get("max_new_tokens") is None and length >= kwargs["max_length"]:
            raise ValueError(f"the conversation is {length} tokens long, which leaves no room for a reply under "
                             f"max_length={kwargs['max_length']}: raise max_length, pass max_new_tokens, or drop old "
                             "turns from the history")

    def _left_padded(self, rows: Sequence[Sequence[int]], pad_id: int) -> Dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` / ``attention_mask`` / ``position_ids`` [batch, longest] on the model's device."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(pad_id or 0), dtype=torch.long)
        mask = torch.zeros_like(ids)
        positions = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            n = len(row)
            ids[i, width - n:] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - n:] = 1
            positions[i, width - n:] = torch.arange(n)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "position_ids": positions.to(self.device)}

    def _generate_for_chat(self, request: Dict[str, Any]) -> Any:
        """``generate(**request)``, by our own loop (decoding_chatglm) where ``chat_cache_kind`` says it serves it."""
        kind = chat_cache_kind(self, request)
        if kind == "static":
            try:
                return fast_generate(self, **request)
            except FastPathBusy:
                logger.info("chat: the static decoder is busy (another thread or an open stream); using a growing "
                            "cache")
                kind = "growing"
        if kind == "growing":
            return fast_generate(self, cache_kind="growing", **request)
        return self.generate(**request)

    # ------------------------------------------------------------------------------------------ chat
    @torch.no_grad()
    def chat(self, tokenizer: Any, query: str, history: Optional[Sequence[Any]] = None, role: str = "user",
             max_length: Optional[int] = None, num_beams: int = 1, do_sample: bool = True,
             top_p: Optional[float] = None, temperature: Optional[float] = None, logits_processor: Any = None,
             **gen_kwargs: Any) -> ChatResult:
        """One reply to ``query`` → ``(response, history)``; the caller's history is not modified.

        ChatGLM3: history of ``{"role", "content", "metadata"?, "tools"?}`` dicts; the response is a str, a tool call
        ``{"name", "parameters"}`` (system message with tools) or ``{"name", "content"}``. ChatGLM2: history of
        ``(query, response)`` pairs, returned as ``[query, response]`` lists. Extra keyword arguments go to
        ``generate`` (``max_new_tokens``, ``repetition_penalty``, ``bad_words_ids``, ...). ``query=""`` right after
        an observation message in the history asks for the reply to that tool result (no empty turn is added).
        Defaults: the variant's max_length / top_p / temperature (never above the model's seq_length); stop ids
        of the family. ValueError for an unknown role, a malformed history or a conversation that is too long.
        """
        prompt = self._chat_prompt(tokenizer, query, history, role)
        kwargs = self._chat_generate_kwargs(tokenizer, prompt.family, max_length, num_beams, do_sample, top_p,
                                            temperature, logits_processor, gen_kwargs)
        self._check_prompt_length(len(prompt.ids), kwargs)
        output = self._generate_for_chat({**self._left_padded([prompt.ids], tokenizer.pad_token_id), **kwargs})
        sequences = getattr(output, "sequences", output)
        reply = _reply_ids(sequences[0].tolist(), len(prompt.ids), _as_list(kwargs["eos_token_id"]))
        return self._chat_response(tokenizer, prompt, reply)

    @torch.no_grad()
    def batch_chat(self, tokenizer: Any, queries: Sequence[str], histories: Optional[Sequence[Any]] = None,
                   role: Union[str, Sequence[str]] = "user", max_length: Optional[int] = None, num_beams: int = 1,
                   do_sample: bool = True, top_p: Optional[float] = None, temperature: Optional[float] = None,
                   logits_processor: Any = None, **gen_kwargs: Any) -> List[ChatResult]:
        """``chat`` over several conversations in one left-padded ``generate`` call → ``[(response, history)]``.

        Each row gets the token budget it would get alone (``max_length`` minus its own prompt length, or
        ``max_new_tokens``, which may also be one budget per query), so under greedy decoding the answers equal
        one-by-one ``chat`` answers. ``role`` may be one role per query.
        """
        prompts, kwargs, budgets, inputs = self._batch_request(tokenizer, queries, histories, role, max_length,
                                                               num_beams, do_sample, top_p, temperature,
                                                               logits_processor, gen_kwargs)
        output = self._generate_for_chat({**inputs, **kwargs})
        sequences = getattr(output, "sequences", output).tolist()
        stop, width = _as_list(kwargs["eos_token_id"]), inputs["input_ids"].shape[1]
        return [self._chat_response(tokenizer, p, _reply_ids(row, width, stop, budget))
                for p, row, budget in zip(prompts, sequences, budgets)]

    def stream_batch_chat(self, tokenizer: Any, queries: Sequence[str], histories: Optional[Sequence[Any]] = None,
                          role: Union[str, Sequence[str]] = "user", max_length: Optional[int] = None,
                          do_sample: bool = True, top_p: Optional[float] = None, temperature: Optional[float] = None,
                          logits_processor: Any = None, **gen_kwargs: Any) -> Iterator[List[BatchReply]]:
        """``batch_chat`` streamed: after every step in which a reply grew, yield one ``BatchReply`` per query
        (``response``, ``history``, ``tokens`` generated, ``finish``: None while it grows, then "stop" or "length").
        Stops once every row has finished; the final responses equal ``batch_chat``'s. Closing the generator early
        ends the generation."""
        prompts, kwargs, budgets, inputs = self._batch_request(tokenizer, queries, histories, role, max_length, 1,
                                                               do_sample, top_p, temperature, logits_processor,
                                                               gen_kwargs)
        stop, width = _as_list(kwargs["eos_token_id"]), inputs["input_ids"].shape[1]
        replies = [BatchReply(*self._chat_response(tokenizer, p, []), 0, None) for p in prompts]
        shown: List[List[int]] = [[] for _ in prompts]
        stream = self._stream_steps(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], None,
                                    kwargs.pop("eos_token_id"), None, kwargs.pop("logits_processor", None), False,
                                    kwargs)
        try:
            for _, rows, _ in stream:
                grew = False
                for i, (prompt, row, budget) in enumerate(zip(prompts, rows, budgets)):
                    if replies[i].finish:
                        continue
                    new = row[width:width + budget]
                    ids = _reply_ids(row, width, stop, budget)
                    finish = "stop" if len(ids) < len(new) else "length" if len(new) == budget else None
                    if finish is None and ids == shown[i]:
                        continue
                    text = tokenizer.decode(ids)
                    if finish is None and text.endswith(_REPLACEMENT_CHAR):
                        continue
                    shown[i], grew = ids, True
                    replies[i] = BatchReply(*self._chat_response(tokenizer, prompt, ids, text),
                                            len(ids) + (finish == "stop"), finish)
                if grew:
                    yield list(replies)
                if all(r.finish for r in replies):
                    return
        finally:
            stream.close()
        # rows whose budget the padded batch could not give them (seq_length) end with the stream
        yield [r if r.finish else BatchReply(*self._chat_response(tokenizer, p, ids), len(ids), "length")
               for r, p, ids in zip(replies, prompts, shown)]

    def _batch_request(self, tokenizer: Any, queries: Sequence[str], histories: Optional[Sequence[Any]],
                       role: Union[str, Sequence[str]], max_length: Optional[int], num_beams: int, do_sample: bool,
                       top_p: Optional[float], temperature: Optional[float], logits_processor: Any,
                       gen_kwargs: Dict[str, Any]
                       ) -> Tuple[List[_Prompt], Dict[str, Any], List[int], Dict[str, torch.Tensor]]:
        """The prompts of a batch, generate()'s keyword arguments (``max_new_tokens``: the largest row budget the
        padded batch can hold), each row's budget, and the left-padded inputs."""
        if isinstance(queries, str) or not isinstance(queries, Sequence) or not queries:
            raise ValueError("queries must be a non-empty list of strings (use chat() for a single query)")
        count = len(queries)
        histories = [None] * count if histories is None else list(histories)
        roles = [role] * count if isinstance(role, str) else list(role)
        new_tokens = gen_kwargs.pop("max_new_tokens", None)
        new_tokens = list(new_tokens) if isinstance(new_tokens, (list, tuple)) else [new_tokens] * count
        for name, values in (("histories", histories), ("roles", roles), ("max_new_tokens", new_tokens)):
            if len(values) != count:
                raise ValueError(f"got {count} queries but {len(values)} {name}")
        if not all(n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 1) for n in new_tokens):
            raise ValueError(f"max_new_tokens must be a positive integer (or one per query), got {new_tokens}")
        prompts = [self._chat_prompt(tokenizer, q, h, r) for q, h, r in zip(queries, histories, roles)]
        kwargs = self._chat_generate_kwargs(tokenizer, prompts[0].family, max_length, num_beams, do_sample, top_p,
                                            temperature, logits_processor, gen_kwargs)
        for prompt, new in zip(prompts, new_tokens):
            self._check_prompt_length(len(prompt.ids), {**kwargs, "max_new_tokens": new})
            if new is not None and len(prompt.ids) + new > self.config.seq_length:
                raise ValueError(f"prompt ({len(prompt.ids)} tokens) + max_new_tokens ({new}) exceeds this model's "
                                 f"seq_length {self.config.seq_length}: lower max_new_tokens")
        budgets = [new if new is not None else kwargs["max_length"] - len(p.ids) for p, new in zip(prompts, new_tokens)]
        width = max(len(p.ids) for p in prompts)
        kwargs.pop("max_length", None)
        kwargs["max_new_tokens"] = min(max(budgets), self.config.seq_length - width)
        if kwargs["max_new_tokens"] < max(budgets):
            logger.warning(f"batch chat: padded to {width} tokens, rows can generate at most "
                           f"{kwargs['max_new_tokens']} tokens within seq_length {self.config.seq_length}")
        return prompts, kwargs, budgets, self._left_padded([p.ids for p in prompts], tokenizer.pad_token_id)

    def _reusable_cache(self, cache: Any, ids: List[int]) -> Any:
        """``cache`` cropped to the longest prefix of ``ids`` it holds (at most ``len(ids) - 1`` tokens, so the
        last prompt token is always fed), or a new empty cache when it cannot be reused."""
        if cache is None:
            return new_dynamic_cache()
        known = getattr(cache, CACHE_IDS_ATTR, None)
        prefix = self.config.pre_seq_len or 0
        held = cache_length(cache) - prefix if isinstance(cache, CACHE_TYPES) else -1
        if known is None or held < 0 or held > len(known):
            logger.info("stream_chat: past_key_values carries no record of its tokens; recomputing the conversation")
            return new_dynamic_cache()
        common = min(_common_prefix(known[:held], ids), len(ids) - 1)
        if common == held:
            return cache
        if common == 0 or not crop_cache(cache, common + prefix):
            return new_dynamic_cache()
        return cache

    def stream_chat(self, tokenizer: Any, query: str, history: Optional[Sequence[Any]] = None, role: str = "user",
                    past_key_values: Any = None, max_length: Optional[int] = None, do_sample: bool = True,
                    top_p: Optional[float] = None, temperature: Optional[float] = None, logits_processor: Any = None,
                    return_past_key_values: bool = False, **kwargs: Any) -> Iterator[tuple]:
        """Like ``chat``, yielding ``(response, history)`` (or ``(response, history, past_key_values)``) as the reply
        grows; the last item equals ``chat``'s result. Pass the yielded ``past_key_values`` back with the next turn
        to reuse the keys/values of the common prefix (the conversation ids are rebuilt and compared with the ids
        the cache records, so the text equals a recomputation)."""
        prompt = self._chat_prompt(tokenizer, query, history, role)
        gen = self._chat_generate_kwargs(tokenizer, prompt.family, max_length, 1, do_sample, top_p, temperature,
                                         logits_processor, kwargs)
        self._check_prompt_length(len(prompt.ids), gen)
        cache = self._reusable_cache(past_key_values, prompt.ids)
        stop = _as_list(gen["eos_token_id"])
        last: Optional[List[int]] = None
        shown: Optional[List[int]] = None
        inputs = self._left_padded([prompt.ids], tokenizer.pad_token_id)
        stream = self._stream_steps(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], cache,
                                    gen.pop("eos_token_id"), None, gen.pop("logits_processor", None), True, gen,
                                    live_cache=False)  # (the cache a reply leaves is complete when it ends)
        try:
            for _, rows, _ in stream:
                row = rows[0]
                setattr(cache, CACHE_IDS_ATTR, row)
                last = _reply_ids(row, len(prompt.ids), stop)
                text = tokenizer.decode(last)
                if text and not text.endswith(_REPLACEMENT_CHAR) and last != shown:
                    shown = last
                    result = self._chat_response(tokenizer, prompt, last, text)
                    yield (*result, cache) if return_past_key_values else result
        finally:  # a consumer that stops early ends the generation now, leaving the cache as the ids say
            stream.close()
        if last is None or last != shown:
            result = self._chat_response(tokenizer, prompt, last or [])
            yield (*result, cache) if return_past_key_values else result

    # ------------------------------------------------------------------------------------------ streaming generate
    def _generate_kwargs_only(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """Drop keyword arguments that ``generate`` would reject (neither generation settings nor model inputs)."""
        # transformers' generate(), not our override's (*args, **kwargs), names the arguments it takes
        known = set(inspect.signature(GenerationMixin.generate).parameters) | set(GenerationConfig().to_dict())
        known |= set(inspect.signature(self.prepare_inputs_for_generation).parameters)
        known |= set(inspect.signature(self.forward).parameters)
        known -= {"self", "kwargs", "model_kwargs"}
        unknown = sorted(k for k in kwargs if k not in known)
        if unknown:
            logger.debug(f"stream_generate: ignoring keyword arguments generate() does not accept: {unknown}")
        return {k: v for k, v in kwargs.items() if k in known}

    def _fast_stream(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor],
                     position_ids: Optional[torch.LongTensor], past_key_values: Any, eos_token_id: Any,
                     generation_config: Optional[GenerationConfig], logits_processor: Any, kwargs: Dict[str, Any],
                     want_cache: bool, live_cache: bool
                     ) -> Optional[Tuple[torch.Tensor, Generator[torch.Tensor, None, None], Any]]:
        """``stream_generate``'s request by our own loop → (the first step's new tokens [batch], the generator of
        the next ones, the cache it fills), or None where the loop does not serve it: a generation config, a cache
        that is not a growing one holding the start of ``input_ids``, or ``chat_cache_kind`` says no. A busy static
        decoder sends the request to a growing cache."""
        if generation_config is not None:
            return None
        cache = past_key_values
        if cache is not None and (not isinstance(cache, CACHE_TYPES) or cache_is_static(cache)
                                  or cache_length(cache) - (self.config.pre_seq_len or 0) >= input_ids.shape[1]
                                  or (attention_mask is not None and attention_mask.shape[1] != input_ids.shape[1])):
            return None
        optional = {"attention_mask": attention_mask, "position_ids": position_ids, "eos_token_id": eos_token_id,
                    "logits_processor": logits_processor}
        request = {"input_ids": input_ids, **{k: v for k, v in optional.items() if v is not None}, **kwargs}
        kind = chat_cache_kind(self, request)
        if kind is None:
            return None
        if cache is None and want_cache:
            cache = new_dynamic_cache()
        tokens = fast_stream(self, past_key_values=cache, live_cache=live_cache, cache_kind=kind, **request)
        try:  # the first step takes the decoder (or finds it busy) and prefills
            first = next(tokens)
        except FastPathBusy:
            logger.info("stream_generate: the static decoder is busy (another thread or an open stream); using a "
                        "growing cache")
            tokens = fast_stream(self, past_key_values=cache, live_cache=live_cache, cache_kind="growing", **request)
            first = next(tokens)
        return first, tokens, cache

    def _generate_in_thread(self, streamer: _StepStreamer, kwargs: Dict[str, Any]) -> None:
        try:
            self.generate(**kwargs)
        except BaseException as error:  # handed to the consumer, which re-raises it
            streamer.fail(error)
        else:
            streamer.end()

    def stream_generate(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                        position_ids: Optional[torch.LongTensor] = None, past_key_values: Any = None,
                        eos_token_id: Union[None, int, List[int]] = None, return_past_key_values: bool = False,
                        generation_config: Optional[GenerationConfig] = None, logits_processor: Any = None,
                        **kwargs: Any) -> Iterator[Any]:
        """Yield the cumulative ids ``[batch, prompt + new]`` (stop token included) after every generated token, or
        ``(ids, past_key_values)`` with ``return_past_key_values``. Without ``eos_token_id`` generation stops at
        ``generation_config.eos_token_id`` (the model's by default). Unknown keyword arguments are ignored.

        ``past_key_values`` may hold the start of ``input_ids`` (only the rest is computed), or — official style —
        the tokens before ``input_ids`` when ``attention_mask`` covers cached + new positions.
        """
        stream = self._stream_steps(input_ids, attention_mask, position_ids, past_key_values, eos_token_id,
                                    generation_config, logits_processor, return_past_key_values, kwargs,
                                    host_rows=False)
        try:
            for ids, _, cache in stream:
                yield (ids, cache) if return_past_key_values else ids
        finally:
            stream.close()

    def _stream_steps(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor],
                      position_ids: Optional[torch.LongTensor], past_key_values: Any, eos_token_id: Any,
                      generation_config: Optional[GenerationConfig], logits_processor: Any, want_cache: bool,
                      kwargs: Dict[str, Any], live_cache: bool = True, host_rows: bool = True
                      ) -> Generator[Tuple[torch.Tensor, Optional[List[List[int]]], Any], None, None]:
        """``stream_generate``'s steps → (ids [batch, prompt + new] on the input's device, with ``host_rows`` the
        same rows as lists (else None), the cache). On the fast path the lists come from the host copy of each
        step's tokens, so a caller that only reads them (stream_chat) never waits for the GPU to finish the step
        already running; without ``live_cache`` the cache is brought up to date when the stream ends or is closed,
        not at every step."""
        kwargs = self._generate_kwargs_only(kwargs)
        fast = self._fast_stream(input_ids, attention_mask, position_ids, past_key_values, eos_token_id,
                                 generation_config, logits_processor, kwargs, want_cache, live_cache)
        if fast is not None:
            first, steps, cache = fast
            ids, rows = input_ids, input_ids.tolist() if host_rows else None
            try:
                for new in itertools.chain([first], steps):
                    if rows is not None:
                        for row, token in zip(rows, new.tolist()):
                            row.append(token)
                    if ids.is_cuda:  # (pinned: the copy does not wait for the step in flight)
                        new = new.pin_memory()
                    ids = torch.cat([ids, new.to(ids.device, non_blocking=True)[:, None]], dim=1)
                    yield ids, None if rows is None else [list(row) for row in rows], cache
            finally:  # at once, not whenever the garbage collector finds it: it fills the cache, frees the decoder
                steps.close()
            return
        streamer = _StepStreamer()
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(_StopWhenSet(streamer.stopped))
        cache = new_dynamic_cache() if past_key_values is None else past_key_values
        skip = 0  # placeholder ids put in front of input_ids for the official "new tokens only" call
        if past_key_values is not None and attention_mask is not None and isinstance(cache, CACHE_TYPES):
            skip = attention_mask.shape[1] - input_ids.shape[1]
            if skip > 0:
                input_ids = torch.cat([input_ids.new_zeros(input_ids.shape[0], skip), input_ids], dim=1)
                if position_ids is not None:
                    start = torch.arange(skip, device=position_ids.device, dtype=position_ids.dtype)
                    position_ids = torch.cat([start.expand(input_ids.shape[0], -1), position_ids], dim=1)
        call: Dict[str, Any] = {"input_ids": input_ids, "past_key_values": cache, "streamer": streamer,
                                "stopping_criteria": criteria, **kwargs}
        optional = {"attention_mask": attention_mask, "position_ids": position_ids, "eos_token_id": eos_token_id,
                    "generation_config": generation_config, "logits_processor": logits_processor}
        call.update({k: v for k, v in optional.items() if v is not None})
        thread = threading.Thread(target=self._generate_in_thread, args=(streamer, call), daemon=True,
                                  name="chatglm-stream-generate")
        thread.start()
        try:
            ids: Optional[torch.Tensor] = None
            while True:
                kind, value = streamer.items.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    break
                ids = value[:, skip:] if ids is None else torch.cat([ids, value.view(-1, 1)], dim=1)
                if ids.shape[1] > input_ids.shape[1] - skip:  # the first item is the prompt itself
                    out = ids.to(input_ids.device)
                    yield out, out.tolist() if host_rows else None, cache
                streamer.resume()
        finally:
            streamer.stop()
            thread.join()
