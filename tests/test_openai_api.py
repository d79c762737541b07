"""tools/openai_api.py: OpenAI chat-completion requests against a tiny model served on 127.0.0.1, compared with
`model.chat` on the same conversation; the message mapping (tools, tool calls, tool results) by hand."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any, Dict, List

import pytest

import openai_api
from make_tiny_model import make_tiny_model
from openai_api import ChatService, RequestError, chatglm2_conversation, chatglm3_conversation, message_for

WEATHER = {"name": "get_weather", "description": "weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
GREEDY = {"temperature": 0, "max_tokens": 12}


def load(folder):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    return AutoModel.from_pretrained(str(folder), trust_remote_code=True).eval(), tok


@pytest.fixture(scope="module", params=["chatglm3-6b", "chatglm2-6b"])
def served(request, tmp_path_factory) -> Dict[str, Any]:
    root = tmp_path_factory.mktemp("api")
    model, tok = load(make_tiny_model(root / "model", root / "no-tokenizer.model", variant=request.param))
    server = openai_api.make_server(ChatService(model, tok, "tiny"), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "model": model, "tok": tok,
           "family": tok.chat_format}
    server.shutdown()
    server.server_close()


def post(served, body: Any, raw: bytes = None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(served["url"] + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def events(text: str) -> List[Any]:
    lines = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def conversation(family: str) -> tuple:
    """OpenAI messages, and the history / query model.chat takes for the same conversation."""
    if family == "chatglm3":
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "The quick fox."},
                    {"role": "user", "content": [{"type": "text", "text": "今天天气"}, {"type": "text", "text": "很好"}]}]
        history = [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "The quick fox."}]
    else:
        messages = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "The quick fox."},
                    {"role": "user", "content": "今天天气很好"}]
        history = [["Hello world", "The quick fox."]]
    return messages, history, "今天天气很好"


def test_models_endpoint(served):
    with urllib.request.urlopen(served["url"] + "/v1/models", timeout=30) as reply:
        assert json.loads(reply.read())["data"][0]["id"] == "tiny"


def test_completion_equals_chat_and_counts_tokens(served):
    messages, history, query = conversation(served["family"])
    status, text = post(served, {"model": "tiny", "messages": messages, **GREEDY})
    assert status == 200, text
    body = json.loads(text)
    expected, _ = served["model"].chat(served["tok"], query, history=history, do_sample=False, max_new_tokens=12)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    prompt = served["tok"].build_chat_input(query, history)["input_ids"][0]
    generated = served["model"].generate(prompt[None], max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    stops = set(served["tok"].stop_token_ids)
    if any(t in stops for t in generated):
        generated = generated[:next(i for i, t in enumerate(generated) if t in stops) + 1]
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(generated),
                             "total_tokens": len(prompt) + len(generated)}
    assert choice["finish_reason"] == ("stop" if generated[-1] in stops else "length")


def test_stream_sends_the_same_text_in_pieces(served):
    messages, _, _ = conversation(served["family"])
    _, whole = post(served, {"messages": messages, **GREEDY})
    whole = json.loads(whole)
    status, text = post(served, {"messages": messages, "stream": True, "stream_options": {"include_usage": True},
                                 **GREEDY})
    assert status == 200
    chunks = events(text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert sum(1 for p in pieces if p) > 1  # streamed, not sent at the end
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_stop_strings_cut_the_reply(served):
    messages, _, _ = conversation(served["family"])
    full = json.loads(post(served, {"messages": messages, **GREEDY})[1])["choices"][0]["message"]["content"]
    assert len(full) >= 4, "the tiny model's reply is too short to cut"
    stop = full[2:4]
    body = json.loads(post(served, {"messages": messages, "stop": [stop], **GREEDY})[1])
    assert body["choices"][0]["message"]["content"] == full[:full.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "last message|ChatGLM2"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n must be 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": "abc"}, "seed must be a number"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "longer than|seq_length|max"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
])
def test_bad_requests_get_400_with_the_reason(served, body, message):
    import re

    status, text = post(served, body)
    assert status == 400, text
    assert re.search(message, json.loads(text)["error"]["message"])


def test_body_that_is_not_json_gets_400(served):
    status, text = post(served, None, raw=b"{nope")
    assert status == 400 and "not JSON" in json.loads(text)["error"]["message"]


# ------------------------------------------------------------------------------------------- mapping
def test_chatglm3_mapping_of_tools_calls_and_results():
    messages = [{"role": "user", "content": "Weather in Beijing?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Beijing", "days": 2}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 12}'}]
    query, role, history = chatglm3_conversation(messages, [{"type": "function", "function": WEATHER}])
    assert (query, role) == ('{"temperature": 12}', "observation")
    assert history == [
        {"role": "system", "content": openai_api.TOOLS_SYSTEM_PROMPT, "tools": [WEATHER]},
        {"role": "user", "content": "Weather in Beijing?"},
        {"role": "assistant", "metadata": "get_weather",
         "content": "```python\ntool_call(city='Beijing', days=2)\n```"},
    ]
    with pytest.raises(RequestError, match="tools\\[0\\]"):
        chatglm3_conversation(messages, [WEATHER])  # not wrapped in {"type": "function", ...}


def test_tool_call_reply_maps_to_tool_calls_and_round_trips():
    """The model's call, parsed by our process_response, becomes OpenAI tool_calls; sent back it is the same
    call text."""
    from chatglm.chat_format import process_chatglm3_response

    history = [{"role": "system", "content": "s", "tools": [WEATHER]}, {"role": "user", "content": "q"}]
    response, _ = process_chatglm3_response("get_weather\n```python\ntool_call(city='Beijing')\n```", history)
    message, finish = message_for(response)
    assert finish == "tool_calls" and message["content"] is None
    call = message["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Beijing"}'}
    _, _, replayed = chatglm3_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]},
         {"role": "tool", "content": "r"}], [{"type": "function", "function": WEATHER}])
    again, _ = process_chatglm3_response(replayed[-1]["metadata"] + "\n" + replayed[-1]["content"], history)
    assert again == response
    assert message_for("plain") == ({"role": "assistant", "content": "plain"}, None)


def test_chatglm2_mapping():
    assert chatglm2_conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "c"}], None) == ("c", "user", [["a", "b"]])
    with pytest.raises(RequestError, match="no system"):
        chatglm2_conversation([{"role": "system", "content": "s"}, {"role": "user", "content": "c"}], None)
    with pytest.raises(RequestError, match="ChatGLM3"):
        chatglm2_conversation([{"role": "user", "content": "c"}], [{"type": "function", "function": WEATHER}])


def test_seed_makes_sampling_repeatable_and_equal_to_chat(served):
    import torch

    messages, history, query = conversation(served["family"])
    body = {"messages": messages, "temperature": 0.9, "top_p": 0.95, "max_tokens": 12, "seed": 3}
    first, second = (json.loads(post(served, body)[1])["choices"][0]["message"]["content"] for _ in range(2))
    assert first == second
    torch.manual_seed(3)
    expected, _ = served["model"].chat(served["tok"], query, history=history, temperature=0.9, top_p=0.95,
                                       max_new_tokens=12)
    assert first == expected


def _replies(service: ChatService, requests: List[Dict[str, Any]]) -> List[Any]:
    """Each request's events, all sent at once from threads (a RequestError in place of the events)."""
    results: List[Any] = [None] * len(requests)

    def send(i: int) -> None:
        try:
            results[i] = list(service.complete(requests[i]))
        except RequestError as err:
            results[i] = err

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_concurrent_requests_decode_together_as_they_would_alone(served, monkeypatch):
    """Requests that arrive together with the same sampling settings decode as one batch, each with its own
    max_tokens, stop strings and tool setting, and get what they get one at a time (greedy); a bad one among them
    gets its error alone; seeded ones decode alone."""
    model, tok = served["model"], served["tok"]
    sizes: List[int] = []
    original = model.stream_batch_chat

    def spy(tokenizer, queries, *args, **kwargs):
        sizes.append(len(queries))
        return original(tokenizer, queries, *args, **kwargs)

    monkeypatch.setattr(model, "stream_batch_chat", spy)
    messages, _, _ = conversation(served["family"])
    full = json.loads(post(served, {"messages": messages, **GREEDY})[1])["choices"][0]["message"]["content"]
    requests = [{"messages": messages, "temperature": 0, "max_tokens": 12},
                {"messages": [{"role": "user", "content": "Hello world"}], "temperature": 0, "max_tokens": 5},
                {"messages": messages, "temperature": 0, "max_tokens": 9, "stop": [full[2:4]]},
                {"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 100000},
                {"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 7}]
    alone = [_replies(ChatService(model, tok, "tiny", max_batch=1), [r])[0] for r in requests]
    assert sizes == [1] * 6 and isinstance(alone[3], RequestError)
    sizes.clear()
    together = _replies(ChatService(model, tok, "tiny", max_batch=8, batch_wait=0.5), requests)
    assert sizes == [8, 1, 1, 1, 1, 1], f"one batch of the five (padded to 8), then each alone: {sizes}"
    assert [str(r) if isinstance(r, RequestError) else r for r in together] == \
        [str(r) if isinstance(r, RequestError) else r for r in alone]
    assert alone[2][-1][1][1] == "stop" and alone[1][-1][1][2]["completion_tokens"] <= 5
    sizes.clear()
    good = [0, 1, 2, 4]
    assert _replies(ChatService(model, tok, "tiny", batch_wait=0.5), [requests[i] for i in good]) == \
        [alone[i] for i in good]
    assert sizes == [4]
    sizes.clear()
    seeded = [{"messages": messages, "temperature": 0.9, "max_tokens": 8, "seed": 5}] * 2
    first, second = _replies(ChatService(model, tok, "tiny", batch_wait=0.5), seeded)
    assert sizes == [1, 1] and first == second
