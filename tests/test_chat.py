"""Model-side chat API (chat_chatglm.py): chat / stream_chat / stream_generate / batch_chat / process_response /
build_inputs, for ChatGLM3 and ChatGLM2, on a tiny float64 model (so greedy ties cannot flip).

Runs with a tiny sentencepiece model trained by test_tokenizer's fixture (always) and with the real tokenizer.model
when ../shared is present. Runs on transformers 4.30.2 and 5.x."""
from __future__ import annotations

import json
import threading
from typing import Any, Dict, List, Tuple

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from conftest import GOLDEN, TOKENIZER_MODEL, require_shared, tiny_config, tiny_model
from test_tokenizer import load, make_dir, our_config, tiny_model_file  # noqa: F401  (tiny_model_file: fixture)
from chatglm import chat_format as cf
from chatglm.chat_chatglm import CACHE_IDS_ATTR
from chatglm.decoding_chatglm import FAST_CHAT_ENV
from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration
from chatglm.tokenization_chatglm import ChatGLMTokenizer

GREEDY = dict(do_sample=False, max_new_tokens=6)
TOOLS = [{"name": "get_weather", "description": "weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
THREAD_NAME = "chatglm-stream-generate"


# ------------------------------------------------------------------------------------------------ fixtures
_models: Dict[int, ChatGLMForConditionalGeneration] = {}


def model_for(tok) -> ChatGLMForConditionalGeneration:
    """A tiny float64 model whose vocabulary covers ``tok`` (512 for the tiny tokenizer, 65024 for the real one)."""
    vocab = 512 if tok.vocab_size <= 512 else 65024
    if vocab not in _models:
        _models[vocab] = tiny_model(7, padded_vocab_size=vocab, seq_length=1024).double()
    return _models[vocab]


@pytest.fixture(scope="module")
def tiny_toks(tiny_model_file) -> Dict[str, ChatGLMTokenizer]:  # noqa: F811
    return {f: ChatGLMTokenizer(vocab_file=str(tiny_model_file), chat_format=f) for f in cf.FAMILIES}


@pytest.fixture(scope="module")
def real_toks(tmp_path_factory) -> Dict[str, Any]:
    model_file = require_shared(TOKENIZER_MODEL)
    return {f: load(make_dir(tmp_path_factory.mktemp(f"chat_{f}"), model_file, our_config(f))) for f in cf.FAMILIES}


@pytest.fixture(params=["tiny", "real"])
def toks(request, tiny_toks) -> Dict[str, Any]:
    return tiny_toks if request.param == "tiny" else request.getfixturevalue("real_toks")


@pytest.fixture(params=["loop", "generate"])
def path(request, monkeypatch) -> str:
    """Which decoding serves the chat methods: our own loop (the default; on CPU a growing cache) or generate()."""
    if request.param == "loop":
        monkeypatch.delenv(FAST_CHAT_ENV, raising=False)
    else:
        monkeypatch.setenv(FAST_CHAT_ENV, "0")
    return request.param


@pytest.fixture(params=cf.FAMILIES)
def family(request) -> str:
    return request.param


def history_for(family: str) -> List[Any]:
    if family == cf.CHATGLM3:
        return [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "metadata": "", "content": "Hi there"}]
    return [("Hello", "Hi there")]


def reference_reply(model, tok, ids: List[int], **kwargs) -> List[int]:
    """Plain generate() on the prompt ids, cut before the first stop id."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         eos_token_id=tok.stop_token_ids, pad_token_id=0, **kwargs)[0].tolist()[len(ids):]
    return out[: next((i for i, t in enumerate(out) if t in tok.stop_token_ids), len(out))]


class Spy:
    """Wraps model.generate, recording its keyword arguments (and optionally replacing its output); chat requests go
    to generate() while it is in place (not to our own decode loop)."""

    def __init__(self, model, monkeypatch, reply: List[int] = None):
        monkeypatch.setenv(FAST_CHAT_ENV, "0")
        self.calls: List[Dict[str, Any]] = []
        original = model.generate

        def generate(*args, **kwargs):
            self.calls.append(kwargs)
            if reply is None:
                return original(*args, **kwargs)
            ids = kwargs["input_ids"]
            return torch.cat([ids, torch.tensor([reply], dtype=ids.dtype).expand(ids.shape[0], -1)], dim=1)

        monkeypatch.setattr(model, "generate", generate)


def forward_lengths(model) -> Tuple[List[int], Any]:
    """Record the number of tokens of every forward pass (a hook on the embedding)."""
    lengths: List[int] = []
    handle = model.transformer.embedding.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    return lengths, handle


# ------------------------------------------------------------------------------------------------ chat
def test_chat(toks, family):
    tok = toks[family]
    model = model_for(tok)
    history = history_for(family)
    snapshot = json.dumps(history)
    response, new_history = model.chat(tok, "What is the weather like?", history, **GREEDY)
    assert json.dumps(history) == snapshot, "the caller's history must not change"
    assert json.loads(json.dumps(new_history, ensure_ascii=False)) == new_history  # lists/dicts/str only
    if family == cf.CHATGLM3:
        ids = tok.build_chat_input("What is the weather like?", history)["input_ids"][0].tolist()
        expected, expected_history = cf.process_chatglm3_response(
            tok.decode(reference_reply(model, tok, ids, **GREEDY)),
            history + [{"role": "user", "content": "What is the weather like?"}])
        assert (response, new_history) == (expected, expected_history)
        assert new_history[-1]["role"] == "assistant"
    else:
        ids = model.build_inputs(tok, "What is the weather like?", history)["input_ids"][0].tolist()
        expected = cf.process_chatglm2_response(tok.decode(reference_reply(model, tok, ids, **GREEDY)))
        assert response == expected
        assert new_history == [["Hello", "Hi there"], ["What is the weather like?", expected]]
        # tuples or lists in the history give the same conversation
        assert model.chat(tok, "What is the weather like?", [list(p) for p in history], **GREEDY) == (
            response, new_history)


def test_chat_generation_arguments(tiny_toks, monkeypatch):
    tok = tiny_toks[cf.CHATGLM3]
    model = model_for(tok)
    spy = Spy(model, monkeypatch)
    model.chat(tok, "hi", max_new_tokens=3, repetition_penalty=1.3, bad_words_ids=[[5]])
    kwargs = spy.calls[-1]
    n = tok.tokenizer.n_sp
    assert kwargs["eos_token_id"] == [2, n + 6, n + 8] == tok.stop_token_ids
    assert (kwargs["top_p"], kwargs["temperature"], kwargs["do_sample"]) == (0.8, 0.8, True)
    assert (kwargs["max_new_tokens"], kwargs["repetition_penalty"], kwargs["bad_words_ids"]) == (3, 1.3, [[5]])
    assert "max_length" not in kwargs  # max_new_tokens alone decides (no warning about both)
    model.chat(tok, "hi", top_p=0.5, temperature=0.3, max_length=40)
    kwargs = spy.calls[-1]
    assert (kwargs["top_p"], kwargs["temperature"], kwargs["max_length"]) == (0.5, 0.3, 40)
    model.chat(tok, "hi", do_sample=False, max_new_tokens=2)
    assert "top_p" not in spy.calls[-1] and "temperature" not in spy.calls[-1]



@pytest.mark.parametrize("name, overrides, family, expected", [
    ("THUDM/chatglm3-6b-128k", {"seq_length": 131072}, cf.CHATGLM3, (131072, 0.7, 0.95)),
    ("/models/chatglm3-6b-32k/", {"seq_length": 32768}, cf.CHATGLM3, (32768, 0.8, 0.8)),
    ("my-finetune", {"seq_length": 131072}, cf.CHATGLM3, (131072, 0.7, 0.95)),
    ("my-finetune", {"seq_length": 32768}, cf.CHATGLM2, (8192, 0.8, 0.8)),
    ("my-finetune", {"seq_length": 32768, "rope_ratio": 16, "rope_ratio_mode": "divide_positions"}, cf.CHATGLM2,
     (32768, 0.8, 0.8)),
    ("THUDM/chatglm3-6b", {}, cf.CHATGLM3, (256, 0.8, 0.8)),  # never above the model's seq_length
])
def test_chat_defaults_by_variant(name, overrides, family, expected):
    config = tiny_config(**overrides)
    config._name_or_path = name
    holder = type("Holder", (), {"config": config})()
    got = ChatGLMForConditionalGeneration._chat_defaults(holder, family)
    assert (got.max_length, got.top_p, got.temperature) == expected


def test_tool_call_and_observation(toks, monkeypatch):
    tok = toks[cf.CHATGLM3]
    model = model_for(tok)
    stop = tok.get_command("<|observation|>")
    call_text = "get_weather\n```python\ntool_call(city='北京')\n```"
    reply = tok.encode(call_text, add_special_tokens=False) + [stop]
    history = [{"role": "system", "content": "Answer with tools.", "tools": TOOLS}]
    with monkeypatch.context() as patch:
        Spy(model, patch, reply=reply)
        response, history = model.chat(tok, "北京天气如何？", history)
    assert response == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert history[-1] == {"role": "assistant", "metadata": "get_weather",
                           "content": "```python\ntool_call(city='北京')\n```"}
    assert json.loads(json.dumps(history, ensure_ascii=False)) == history
    # the tool result goes back as an observation turn
    observation = json.dumps({"city": "北京", "temperature": 20}, ensure_ascii=False)
    response2, history2 = model.chat(tok, observation, history, role="observation", **GREEDY)
    assert history2[len(history)] == {"role": "observation", "content": observation}
    # query="" after an observation already in the history: no empty turn, just <|assistant|>
    with_observation = history + [{"role": "observation", "content": observation}]
    spy = Spy(model, monkeypatch)
    response3, history3 = model.chat(tok, "", with_observation, **GREEDY)
    assert (response3, history3) == (response2, history2)
    expected_ids = tok.build_chat_input(observation, history, role="observation")["input_ids"][0].tolist()
    assert spy.calls[-1]["input_ids"][0].tolist() == expected_ids
    # metadata without tools in the conversation → {"name", "content"}
    monkeypatch.undo()
    with monkeypatch.context() as patch:
        Spy(model, patch, reply=tok.encode("plotter\nsome content", add_special_tokens=False) + [2])
        assert model.chat(tok, "plot it")[0] == {"name": "plotter", "content": "some content"}


def test_process_response():
    model = object.__new__(ChatGLMForConditionalGeneration)  # the method needs no weights
    history = [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "q"}]
    response, new_history = model.process_response("get_weather\n tool_call(city='x')", history)
    assert response == {"name": "get_weather", "parameters": {"city": "x"}} and len(new_history) == 3
    assert model.process_response(" [[训练时间]]发布 ", [])[0] == "2023年发布"
    assert model.process_response(" [[训练时间]]发布 ") == "2023年发布"  # ChatGLM2's one-argument form
    bad = model.process_response("get_weather\n tool_call(city=__import__('os'))", history)[0]
    assert bad["name"] == "get_weather" and "parse_error" in bad


@pytest.mark.parametrize("call", [
    dict(query="q", history=None, role="robot"),
    dict(query="q", history=[("a", "b")], role="user"),
    dict(query="q", history=[{"role": "user"}], role="user"),
    dict(query="q", history=[{"role": "wizard", "content": "x"}], role="user"),
    dict(query="q", history=[{"role": "user", "content": 3}], role="user"),
    dict(query="q", history={"role": "user", "content": "x"}, role="user"),
    dict(query=None, history=None, role="user"),
])
def test_chatglm3_errors(tiny_toks, call):
    tok = tiny_toks[cf.CHATGLM3]
    with pytest.raises(ValueError):
        model_for(tok).chat(tok, call["query"], call["history"], role=call["role"], **GREEDY)


@pytest.mark.parametrize("call", [
    dict(history=[{"role": "user", "content": "x"}], role="user"),
    dict(history=[("a", "b", "c")], role="user"),
    dict(history=[("a", 1)], role="user"),
    dict(history=None, role="observation"),
])
def test_chatglm2_errors(tiny_toks, call):
    tok = tiny_toks[cf.CHATGLM2]
    with pytest.raises(ValueError):
        model_for(tok).chat(tok, "q", call["history"], role=call["role"], **GREEDY)


def test_too_long(tiny_toks, family):
    tok = tiny_toks[family]
    model = model_for(tok)
    with pytest.raises(ValueError, match="seq_length"):
        model.chat(tok, "Hello world " * 1000, **GREEDY)
    with pytest.raises(ValueError, match="max_length"):
        model.chat(tok, "Hello world " * 5, max_length=10, do_sample=False)
    with pytest.raises(ValueError, match="seq_length"):
        next(model.stream_chat(tok, "Hello world " * 1000, **GREEDY))


# ------------------------------------------------------------------------------------------------ stream_chat
def test_stream_chat_matches_chat(toks, family, path):
    tok = toks[family]
    model = model_for(tok)
    history = history_for(family)
    kwargs = dict(do_sample=False, max_new_tokens=10)
    items = list(model.stream_chat(tok, "Tell me a story", history, **kwargs))
    assert len(items) >= 2 and all(len(item) == 2 for item in items)
    assert items[-1] == model.chat(tok, "Tell me a story", history, **kwargs)
    for i, (response, new_history) in enumerate(items):
        assert json.loads(json.dumps(new_history, ensure_ascii=False)) == new_history
        if isinstance(response, str) and i < len(items) - 1:  # only the final item may end mid-character
            assert "\ufffd" not in response[-1:]
    with_cache = list(model.stream_chat(tok, "Tell me a story", history, return_past_key_values=True, **kwargs))
    assert [item[:2] for item in with_cache] == items and all(len(item) == 3 for item in with_cache)


def test_stream_chat_cache_reuse_equals_recompute(toks, family, path):
    tok = toks[family]
    model = model_for(tok)
    kwargs = dict(do_sample=False, max_new_tokens=8)
    *_, (response1, history1, cache) = model.stream_chat(tok, "Hello", return_past_key_values=True, **kwargs)
    assert len(getattr(cache, CACHE_IDS_ATTR)) == cache.get_seq_length() + 1  # the last token is never cached
    held = cache.get_seq_length()
    lengths, handle = forward_lengths(model)
    try:
        *_, (response2, history2, cache2) = model.stream_chat(tok, "Tell me more", history1, past_key_values=cache,
                                                              return_past_key_values=True, **kwargs)
    finally:
        handle.remove()
    full = len(model._chat_prompt(tok, "Tell me more", history1, "user").ids)
    assert 0 < lengths[0] < full, "the second turn must reuse the cached prefix"
    assert (response2, history2) == model.chat(tok, "Tell me more", history1, **kwargs)
    # a cache the consumer abandoned early is still exact
    stream = model.stream_chat(tok, "Goodbye", history2, past_key_values=cache2, return_past_key_values=True,
                               **kwargs)
    _, _, partial = next(stream)
    stream.close()
    *_, (response3, history3, _) = model.stream_chat(tok, "Goodbye", history2, past_key_values=partial,
                                                     return_past_key_values=True, **kwargs)
    assert (response3, history3) == model.chat(tok, "Goodbye", history2, **kwargs)
    # a cache without a record of its tokens is not trusted: recomputed from the history
    foreign = model.stream_chat(tok, "Goodbye", history2, past_key_values=model.stream_generate(
        torch.tensor([[5, 6, 7]]), max_new_tokens=1, return_past_key_values=True).__next__()[1], **kwargs)
    assert list(foreign)[-1] == (response3, history3)


# ------------------------------------------------------------------------------------------------ stream_generate
def _prompt(tok) -> Dict[str, torch.Tensor]:
    return dict(tok.build_chat_input("Count to ten") if tok.chat_format == cf.CHATGLM3
                else tok(["[Round 1]\n\n问：Count to ten\n\n答："], return_tensors="pt"))


def unused_eos(model, inputs, steps: int) -> int:
    """An id that greedy decoding of ``inputs`` does not produce within ``steps`` tokens (so nothing stops early)."""
    n, eos = inputs["input_ids"].shape[1], 3
    while True:
        new = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)[0, n:].tolist()
        if eos not in new:
            return eos
        eos = next(i for i in range(3, 10**6) if i not in new)


def test_stream_generate_cumulative_ids(toks, family, path):
    tok = toks[family]
    model = model_for(tok)
    inputs = _prompt(tok)
    n = inputs["input_ids"].shape[1]
    never = unused_eos(model, inputs, 6)
    steps = list(model.stream_generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=never))
    assert [s.shape[1] for s in steps] == [n + k for k in range(1, 7)]
    for before, after in zip(steps, steps[1:]):
        assert torch.equal(after[:, :-1], before)
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=never, pad_token_id=0)
    assert torch.equal(steps[-1], expected)
    # stops at the given eos id, which is included; int or list
    generated = steps[-1][0, n:].tolist()
    eos = generated[3]
    cut = generated.index(eos) + 1
    for eos_arg in (eos, [eos, never]):
        stopped = list(model.stream_generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=eos_arg))
        assert stopped[-1][0, n:].tolist() == generated[:cut] and len(stopped) == cut
    # without eos_token_id: the generation config's eos
    config = GenerationConfig(eos_token_id=eos, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert list(model.stream_generate(**inputs, generation_config=config))[-1][0, n:].tolist() == generated[:cut]
    original = model.generation_config
    try:
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=0)
        got = list(model.stream_generate(**inputs, max_new_tokens=6, do_sample=False))[-1][0, n:].tolist()
    finally:
        model.generation_config = original
    assert got == generated[:cut]


def test_stream_generate_cache_and_unknown_kwargs(tiny_toks, path):
    tok = tiny_toks[cf.CHATGLM3]
    model = model_for(tok)
    inputs = _prompt(tok)
    n = inputs["input_ids"].shape[1]
    never = unused_eos(model, inputs, 7)
    plain = list(model.stream_generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=never))
    odd = list(model.stream_generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=never,
                                     not_a_generate_argument=1, history=[], role="user"))
    assert all(torch.equal(a, b) for a, b in zip(plain, odd)) and len(odd) == 4
    steps = list(model.stream_generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=never,
                                       return_past_key_values=True))
    ids, cache = steps[-1]
    assert torch.equal(ids, plain[-1]) and cache.get_seq_length() == n + 3
    # official style: only the new tokens, attention mask over cached + new, positions shifted
    more = torch.tensor([[13, 14, 15]])
    official = list(model.stream_generate(
        input_ids=more, attention_mask=torch.ones(1, ids.shape[1] - 1 + 3, dtype=torch.long),
        position_ids=torch.arange(3).unsqueeze(0) + ids.shape[1] - 1, past_key_values=cache, max_new_tokens=3,
        do_sample=False, eos_token_id=never))
    full = torch.cat([ids[:, :-1], more], dim=1)
    # an explicit mask: a generated id 0 (the pad id) must not be taken for padding by generate()
    reference = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=3, do_sample=False,
                               eos_token_id=never, pad_token_id=0)
    assert torch.equal(official[-1][0, :3], more[0]) and torch.equal(official[-1][0, 3:], reference[0, full.shape[1]:])


def test_stream_generate_early_stop_and_errors(tiny_toks, path):
    tok = tiny_toks[cf.CHATGLM3]
    model = model_for(tok)
    inputs = _prompt(tok)
    never = unused_eos(model, inputs, 3)
    lengths, handle = forward_lengths(model)
    try:
        stream = model.stream_generate(**inputs, max_new_tokens=200, do_sample=False, eos_token_id=never)
        next(stream)
        next(stream)
        stream.close()
    finally:
        handle.remove()
    assert len(lengths) <= 4, "generation must end soon after the consumer stops"
    assert not any(t.name == THREAD_NAME for t in threading.enumerate())
    for _ in model.stream_generate(**inputs, max_new_tokens=200, do_sample=False):
        break  # a plain break ends the thread too
    assert not any(t.name == THREAD_NAME for t in threading.enumerate())

    class Boom(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] > inputs["input_ids"].shape[1] + 1:
                raise RuntimeError("boom from the generation thread")
            return scores

    stream = model.stream_generate(**inputs, max_new_tokens=10, do_sample=False,
                                   logits_processor=LogitsProcessorList([Boom()]))
    with pytest.raises(RuntimeError, match="boom"):
        list(stream)
    assert not any(t.name == THREAD_NAME for t in threading.enumerate())


# ------------------------------------------------------------------------------------------------ batch_chat
def test_batch_chat_equals_one_by_one(toks, family, path):
    tok = toks[family]
    model = model_for(tok)
    queries = ["Hi", "What is the capital of France, and why is it famous?", "你好，请介绍一下你自己"]
    histories = [None, history_for(family), None]
    for kwargs in (dict(do_sample=False, max_new_tokens=7), dict(do_sample=False, max_length=120)):
        batched = model.batch_chat(tok, queries, histories, **kwargs)
        single = [model.chat(tok, q, h, **kwargs) for q, h in zip(queries, histories)]
        assert batched == single
    with pytest.raises(ValueError):
        model.batch_chat(tok, "not a list", **GREEDY)
    with pytest.raises(ValueError):
        model.batch_chat(tok, ["a", "b"], [None], **GREEDY)


def test_stream_batch_chat_streams_what_chat_returns(toks, family, path):
    """Each row's final reply equals `chat` with that row's budget (one budget per query, one role per query), a
    row that emits a stop id finishes with "stop" while the others go on, and replies grow step by step."""
    tok = toks[family]
    model = model_for(tok)
    queries = ["Hi", "What is the capital of France, and why is it famous?", "你好，请介绍一下你自己"]
    histories = [None, history_for(family), None]
    budgets = [4, 9, 6]
    free = model.batch_chat(tok, queries, histories, do_sample=False, max_new_tokens=budgets)
    assert free == [model.chat(tok, q, h, do_sample=False, max_new_tokens=b) for q, h, b in zip(queries, histories,
                                                                                              budgets)]
    row = model.generate(**model._left_padded([model._chat_prompt(tok, queries[1], histories[1], "user").ids], 0),
                         max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0)[0, -9:].tolist()
    stop = row[2]  # the third token of row 1's reply: a stop id for this test
    settings = dict(do_sample=False, max_new_tokens=budgets, eos_token_id=[stop])
    steps = list(model.stream_batch_chat(tok, queries, histories, **settings))
    final = steps[-1]
    assert [(r.response, r.history) for r in final] == model.batch_chat(tok, queries, histories, **settings)
    assert final[1].finish == "stop" and final[1].tokens == row.index(stop) + 1
    for reply, budget in zip(final[::2], budgets[::2]):
        assert reply.finish in ("stop", "length") and reply.tokens <= budget
        assert reply.finish == "stop" or reply.tokens == budget
    assert len(steps) > 1 and any(r.finish is None for r in steps[0])
    assert all(len(step) == len(queries) for step in steps)
    if family == cf.CHATGLM3:  # one role per query: an observation turn after a tool call
        call = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='Paris')"}]
        roles = ["user", "observation"]
        *_, last = model.stream_batch_chat(tok, ["Hi", '{"temperature": 21}'], [None, call], role=roles, **GREEDY)
        assert [(r.response, r.history) for r in last] == [
            model.chat(tok, q, h, role=r, **GREEDY) for q, h, r in zip(["Hi", '{"temperature": 21}'], [None, call],
                                                                        roles)]
    with pytest.raises(ValueError, match="roles"):
        next(model.stream_batch_chat(tok, ["a", "b"], role=["user"], **GREEDY))
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(model.stream_batch_chat(tok, ["a", "b"], do_sample=False, max_new_tokens=[3, 0]))


# ------------------------------------------------------------------------------------------------ golden
def test_golden_chatglm2_build_inputs(real_toks):
    cases_path = require_shared(GOLDEN / "tokenizer" / "cases.json")
    cases = json.loads(cases_path.read_text(encoding="utf-8"))["chatglm2_prompts"]["cases"]
    tok = real_toks[cf.CHATGLM2]
    model = model_for(tok)
    for case in cases:
        history = [tuple(pair) for pair in case["history"]]
        for method in ("build_inputs", "build_stream_inputs"):
            got = getattr(model, method)(tok, case["query"], history)
            for key in ("input_ids", "attention_mask", "position_ids"):
                assert got[key].tolist() == case[method][key], (method, key, case["query"])


# ------------------------------------------------------------------------------------------------ remote code
def test_remote_code_chat(tiny_model_file, tmp_path):  # noqa: F811
    """The client path: AutoModel / AutoTokenizer with trust_remote_code from one folder, then chat."""
    from transformers import AutoModel, AutoTokenizer

    from conftest import copy_code

    folder = make_dir(tmp_path, tiny_model_file, our_config(cf.CHATGLM3))
    model = tiny_model(3, seq_length=1024)
    model.save_pretrained(str(folder))
    copy_code(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    loaded = AutoModel.from_pretrained(str(folder), trust_remote_code=True).float().eval()
    assert type(loaded).__module__.startswith("transformers_modules.")
    expected = model.chat(tok, "你好", **GREEDY)
    assert loaded.chat(tok, "你好", **GREEDY) == expected
    assert list(loaded.stream_chat(tok, "你好", **GREEDY))[-1] == expected
