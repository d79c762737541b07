"""Issue 6, chat API: `chat`, `stream_chat`, `stream_generate`, `process_response` called the way the ChatGLM2/3
demos (CLI, web, OpenAI-style API server, tool-use, composite demo), FastChat and xinference call them.

Tiny random-weight folders with the real tokenizer.model (../shared; skipped with the reason when absent),
loaded with `from_pretrained(dir, trust_remote_code=True)`. The weights are scaled up and the model runs in
float64 so that greedy decoding has no near-ties (comparisons between cached and recomputed runs stay exact).
Where a test needs a particular reply (a tool call, a stop token), a logits processor forces it.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from compat_util import build
from conftest import randomize_weights

from transformers import AutoModel, AutoTokenizer, LogitsProcessor  # noqa: E402

STOP3 = [2, 64795, 64797]
TOOLS = [{"name": "track", "description": "追踪指定股票的实时价格",
          "parameters": {"type": "object", "properties": {"symbol": {"description": "需要追踪的股票代码"}},
                         "required": ["symbol"]}}]
TOOL_REPLY = "track\n ```python\ntool_call(symbol='10111')\n```"


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """The demos' processor (openai_api_demo/utils.py, FastChat)."""

    def __call__(self, input_ids, scores):
        if torch.isnan(scores).any() or torch.isinf(scores).any():
            scores.zero_()
            scores[..., 5] = 5e4
        return scores


class ForceReply(LogitsProcessor):
    """Makes the model emit `ids` (then whatever it likes); finite scores so sampling settings keep working."""

    def __init__(self, ids):
        self.ids = list(ids)
        self.start = None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        if step < len(self.ids):
            scores = torch.full_like(scores, -1e9)
            scores[:, self.ids[step]] = 1e9
        return scores


def _load(folder):
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    return randomize_weights(model, seed=0).double().eval()


@pytest.fixture(scope="module")
def glm3(tmp_path_factory):
    folder = build(tmp_path_factory.mktemp("compat_chat"), "glm3_chat", "chatglm3-6b", tokenizer=True)
    return _load(folder), AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def glm2(tmp_path_factory):
    folder = build(tmp_path_factory.mktemp("compat_chat"), "glm2_chat", "chatglm2-6b", tokenizer=True)
    return _load(folder), AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)


def _greedy_reply_ids(model, tokenizer, query, history=None, role="user", **gen):
    inputs = tokenizer.build_chat_input(query, history=history, role=role)
    out = model.generate(**inputs, do_sample=False, eos_token_id=STOP3, **gen)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    while new and new[-1] in STOP3:
        new = new[:-1]
    return new


def _sp(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _assistant_text(entry):
    """The reply text an assistant history entry stands for (metadata line + content)."""
    return (entry["metadata"] + "\n" if entry.get("metadata") else "") + entry["content"]


# ------------------------------------------------------------------------------------------------- chat
def test_chat_with_the_official_signature(glm3):
    """cli/web demos: `model.chat(tokenizer, query, history=None, role="user", max_length=..., num_beams=1,
    do_sample=True, top_p=..., temperature=..., logits_processor=None)` → (response, history)."""
    model, tok = glm3
    response, history = model.chat(tok, "你好", history=None, role="user", max_length=32, num_beams=1,
                                   do_sample=True, top_p=0.8, temperature=0.8, logits_processor=None)
    assert isinstance(response, (str, dict))
    assert history[0] == {"role": "user", "content": "你好"}
    assert history[-1]["role"] == "assistant"
    json.dumps(history, ensure_ascii=False)
    response2, history2 = model.chat(tok, "再见", history, max_length=80, top_p=0.8, temperature=0.8)  # xinference
    assert history2[:len(history)] == history and len(history2) == len(history) + 2
    json.dumps(history2, ensure_ascii=False)


def test_chat_passes_generation_kwargs_through(glm3):
    """openai-style servers and FastChat pass `max_new_tokens`, `bad_words_ids`, `repetition_penalty`."""
    model, tok = glm3
    forced = _sp(tok, "今天天气很好，我们去公园散步吧")
    response, history = model.chat(tok, "你好", history=[], max_new_tokens=3, do_sample=False,
                                   logits_processor=[ForceReply(forced)])
    assert _assistant_text(history[-1]).strip() == tok.decode(forced[:3]).strip()

    greedy = _greedy_reply_ids(model, tok, "你好", max_new_tokens=4)
    _, history = model.chat(tok, "你好", history=[], max_new_tokens=4, do_sample=False)
    assert _assistant_text(history[-1]).strip() == tok.decode(greedy).strip()
    banned = _greedy_reply_ids(model, tok, "你好", max_new_tokens=4, bad_words_ids=[[greedy[0]]])
    _, history = model.chat(tok, "你好", history=[], max_new_tokens=4, do_sample=False, bad_words_ids=[[greedy[0]]])
    assert _assistant_text(history[-1]).strip() == tok.decode(banned).strip()
    assert banned[0] != greedy[0]
    penalised = _greedy_reply_ids(model, tok, "你好", max_new_tokens=6, repetition_penalty=1.5)
    _, history = model.chat(tok, "你好", history=[], max_new_tokens=6, do_sample=False, repetition_penalty=1.5)
    assert _assistant_text(history[-1]).strip() == tok.decode(penalised).strip()


@pytest.mark.parametrize("pair", [tuple, list])
def test_chatglm2_history_of_pairs(glm2, pair):
    """ChatGLM2 demos: history is a list of (query, response) pairs, tuples or (after a JSON round trip) lists."""
    model, tok = glm2
    history = [pair(("你好", "你好！有什么可以帮你？"))]
    response, new_history = model.chat(tok, "再见", history=history, max_length=64, do_sample=False)
    assert isinstance(response, str)
    assert len(new_history) == 2 and list(new_history[0]) == ["你好", "你好！有什么可以帮你？"]
    assert list(new_history[-1]) == ["再见", response]
    assert history == [pair(("你好", "你好！有什么可以帮你？"))]  # the caller's list is not modified
    json.loads(json.dumps(new_history, ensure_ascii=False))


def test_chatglm3_tool_call_observation_and_empty_query(glm3):
    """tools_using_demo: system message with `tools`; a tool-call reply comes back as {"name", "parameters"}, the
    assistant turn keeps the raw text in `content` and the tool name in `metadata`; the result goes back with
    `role="observation"`; a server that already put the observation in the history calls with `query=""`."""
    model, tok = glm3
    system = {"role": "system", "content": "Answer the following questions as best as you can.", "tools": TOOLS}
    forced = _sp(tok, TOOL_REPLY) + [64797]
    response, history = model.chat(tok, "帮我查询股票10111的价格", history=[system], do_sample=False,
                                   logits_processor=[ForceReply(forced)])
    assert response == {"name": "track", "parameters": {"symbol": "10111"}}
    assert history[0] == system
    assert history[-1]["role"] == "assistant" and history[-1]["metadata"] == "track"
    assert "tool_call(symbol='10111')" in history[-1]["content"]
    json.dumps(history, ensure_ascii=False)

    result = json.dumps({"price": 12412}, ensure_ascii=False)
    response2, history2 = model.chat(tok, result, history=history, role="observation", max_new_tokens=4,
                                     do_sample=False)
    assert history2[len(history)] == {"role": "observation", "content": result}
    assert history2[-1]["role"] == "assistant"
    json.dumps(history2, ensure_ascii=False)

    with_observation = history + [{"role": "observation", "content": result}]
    response3, history3 = model.chat(tok, "", history=with_observation, max_new_tokens=4, do_sample=False)
    assert isinstance(response3, (str, dict))
    json.dumps(history3, ensure_ascii=False)


def test_chatglm3_metadata_without_tools(glm3):
    """A reply with a metadata line but no tools in the system message → {"name", "content"}."""
    model, tok = glm3
    forced = _sp(tok, "interpreter\n```python\nprint(1)\n```") + [64797]
    response, history = model.chat(tok, "算一下", history=[], do_sample=False, logits_processor=[ForceReply(forced)])
    assert isinstance(response, dict) and response["name"] == "interpreter"
    assert "print(1)" in response["content"]
    assert history[-1]["metadata"] == "interpreter"


def test_process_response(glm3):
    """`model.process_response(output, history)` (ChatGLM3 openai/composite demos)."""
    model, _ = glm3
    history = [{"role": "system", "content": "x", "tools": TOOLS}, {"role": "user", "content": "查询"}]
    response, new_history = model.process_response(TOOL_REPLY, copy.deepcopy(history))
    assert response == {"name": "track", "parameters": {"symbol": "10111"}}
    assert new_history[-1]["metadata"] == "track"
    plain, _ = model.process_response("\n 你好 ", [{"role": "user", "content": "hi"}])
    assert plain == "你好"


# ------------------------------------------------------------------------------------------------- stream_chat
def test_stream_chat_cli_demo_loop_with_cache(glm3):
    """ChatGLM3 cli_demo: `for response, history, past_key_values in model.stream_chat(tokenizer, query,
    history=history, top_p=1, temperature=0.01, past_key_values=past_key_values, return_past_key_values=True)`;
    passing the cache back continues the conversation with the same text as recomputing (greedy)."""
    model, tok = glm3
    past_key_values, history = None, []
    for query in ("你好", "再见"):
        steps = []
        for response, history, past_key_values in model.stream_chat(
                tok, query, history=history, top_p=1, temperature=0.01, past_key_values=past_key_values,
                return_past_key_values=True, do_sample=False, max_new_tokens=6):
            steps.append(response)
        assert steps and isinstance(steps[-1], (str, dict))
        assert past_key_values is not None and past_key_values.get_seq_length() > 0
    fresh = list(model.stream_chat(tok, "再见", history=history[:2], do_sample=False, max_new_tokens=6))
    assert fresh[-1][0] == steps[-1]
    assert fresh[-1][1] == history
    chatted = model.chat(tok, "再见", history=history[:2], do_sample=False, max_new_tokens=6)
    assert chatted == fresh[-1]


def test_stream_chat_web_demo_pairs(glm2):
    """ChatGLM2 web_demo: `for response, history in model.stream_chat(tokenizer, input, history,
    max_length=max_length, top_p=top_p, temperature=temperature)`; also with `past_key_values=...,
    return_past_key_values=True` (ChatGLM2 web_demo2)."""
    model, tok = glm2
    items = list(model.stream_chat(tok, "你好", [], max_length=40, top_p=0.8, temperature=0.8))
    assert items and all(len(item) == 2 for item in items)
    response, history = items[-1]
    assert list(history[-1]) == ["你好", response]
    past_key_values = None
    for response, history, past_key_values in model.stream_chat(tok, "再见", history, past_key_values=None,
                                                                return_past_key_values=True, max_length=80,
                                                                do_sample=False):
        pass
    assert past_key_values.get_seq_length() > 0


# ------------------------------------------------------------------------------------------------- stream_generate
def test_stream_generate_openai_api_demo(glm3):
    """openai_api_demo/utils.py generate_stream_chatglm3: `model.stream_generate(**inputs,
    eos_token_id=eos_token_id, **gen_kwargs)` yields the cumulative ids (prompt + new, stop token included)."""
    model, tok = glm3
    inputs = tok.build_chat_input("你好", history=[], role="user").to(model.device)
    input_echo_len = len(inputs["input_ids"][0])
    eos_token_id = [tok.eos_token_id, tok.get_command("<|user|>"), tok.get_command("<|observation|>")]
    gen_kwargs = {"max_new_tokens": 8, "do_sample": False, "top_p": 1.0, "repetition_penalty": 1.0,
                  "logits_processor": [InvalidScoreLogitsProcessor()]}
    yielded = [total_ids.clone() for total_ids in model.stream_generate(**inputs, eos_token_id=eos_token_id,
                                                                        **gen_kwargs)]
    assert yielded
    for i, total_ids in enumerate(yielded):
        assert total_ids.shape == (1, input_echo_len + i + 1)
        assert total_ids[0, :input_echo_len].tolist() == inputs["input_ids"][0].tolist()
    reference = model.generate(**inputs, eos_token_id=eos_token_id, max_new_tokens=8, do_sample=False)
    assert yielded[-1].tolist() == reference.tolist()
    response = tok.decode(yielded[-1].tolist()[0][input_echo_len:-1])
    assert isinstance(response, str)


@pytest.mark.parametrize("eos", ["missing", "int", "list", "none", "generation_config"])
def test_stream_generate_stops_at_the_stop_token(glm3, eos):
    """eos_token_id int | list | None; without it the eos_token_id of `generation_config` (argument, else the
    model's) applies."""
    from transformers import GenerationConfig

    model, tok = glm3
    inputs = tok.build_chat_input("你好")
    n = inputs["input_ids"].shape[1]
    stop = {"missing": 64797, "int": 2, "list": 64795, "none": 64795, "generation_config": 64796}[eos]
    kwargs = {"missing": {}, "int": {"eos_token_id": 2}, "list": {"eos_token_id": [2, 64795]},
              "none": {"eos_token_id": None},
              "generation_config": {"generation_config": GenerationConfig(eos_token_id=[64796], pad_token_id=0)}}[eos]
    forced = [30910, 30911, stop, 30912, 30913]
    last = None
    for last in model.stream_generate(**inputs, max_new_tokens=5, do_sample=False,
                                      logits_processor=[ForceReply(forced)], **kwargs):
        pass
    assert last[0, n:].tolist() == forced[:3], "must stop at the stop token and include it"


def test_stream_generate_ignores_unknown_kwargs_and_returns_the_cache(glm3):
    """FastChat/xinference pass settings of their own along; `return_past_key_values=True` yields (ids, cache)."""
    model, tok = glm3
    inputs = tok(["你好"], return_tensors="pt").to(model.device)  # FastChat: tokenizer([prompt]) incl. position_ids
    input_echo_len = len(inputs["input_ids"][0])
    gen_kwargs = {"max_length": input_echo_len + 4, "do_sample": False, "top_p": 0.7, "repetition_penalty": 1.0,
                  "logits_processor": [InvalidScoreLogitsProcessor()], "echo": False, "stream_interval": 2}
    outs = list(model.stream_generate(**inputs, **gen_kwargs))
    assert outs[-1].shape[1] <= input_echo_len + 4
    for total_ids, past_key_values in model.stream_generate(**inputs, max_new_tokens=3, do_sample=False,
                                                            return_past_key_values=True, unknown_flag=True):
        assert past_key_values.get_seq_length() >= total_ids.shape[1] - 1


def test_composite_demo_stream_with_cache_and_seq_length(glm3):
    """ChatGLM3 composite_demo's stream_chat around stream_generate, with the README's one-line change
    (`past_key_values.get_seq_length()` for `past_key_values[0][0].shape[0]`): the second turn reuses the
    returned cache, shifts position_ids, extends the attention mask, and gives the same ids as recomputing."""
    model, tok = glm3

    def stream(query, history, past_key_values):
        inputs = tok.build_chat_input(query, history=history, role="user").to(model.device)
        if past_key_values is not None:
            past_length = past_key_values.get_seq_length()
            if model.transformer.pre_seq_len is not None:
                past_length -= model.transformer.pre_seq_len
            inputs.position_ids += past_length
            attention_mask = inputs.attention_mask
            attention_mask = torch.cat((attention_mask.new_ones(1, past_length), attention_mask), dim=1)
            inputs["attention_mask"] = attention_mask
        for outputs in model.stream_generate(**inputs, past_key_values=past_key_values, eos_token_id=STOP3,
                                             return_past_key_values=True, max_new_tokens=5, do_sample=False):
            outputs, past_key_values = outputs
        return outputs.tolist()[0][len(inputs["input_ids"][0]):], past_key_values

    first, cache = stream("你好", [], None)
    # official quirk kept: with a cache the new turn is built without history (the cache holds the first turn,
    # up to but not including its last generated token) and starts with [gMASK] sop again
    cached = cache.get_seq_length()
    full = tok.build_chat_input("你好").input_ids[0].tolist() + first
    assert cached in (len(full) - 1, len(full))
    second, cache = stream("再见", None, cache)
    assert second and cache.get_seq_length() > cached

    ids = torch.tensor([full[:cached] + tok.build_chat_input("再见").input_ids[0].tolist()])
    reference = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=STOP3)
    assert second == reference[0, ids.shape[1]:].tolist()


# ------------------------------------------------------------------------------------------------- generate
def test_generate_with_the_tokenizer_output(glm3):
    """README / FastChat / batch clients: `model.generate(**tokenizer([...], return_tensors="pt", padding=True))`,
    position_ids included; each row as it would be alone. And `model.generate(**tokenizer.build_chat_input(...))`."""
    model, tok = glm3
    batch = tok(["你好", "hello there, how are you"], return_tensors="pt", padding=True)
    assert "position_ids" in batch
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    alone = model.generate(**tok(["你好"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out[0, -4:].tolist() == alone[0, -4:].tolist()
    chat_inputs = tok.build_chat_input("你好", history=[], role="user").to(model.device)
    out = model.generate(**chat_inputs, max_new_tokens=4, do_sample=False, eos_token_id=STOP3)
    assert out[0, :chat_inputs["input_ids"].shape[1]].tolist() == chat_inputs["input_ids"][0].tolist()
