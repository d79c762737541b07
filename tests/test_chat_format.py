"""chat_format: prompts, reply parsing (no eval), validation, family rules, templates. No tokenizer needed except
where noted; the golden process_response cases need ../shared."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ASSETS, GOLDEN, REPO, require_shared
from chatglm import chat_format as cf

CASES_PATH = GOLDEN / "tokenizer" / "cases.json"
TOOLS = [{"name": "track", "description": "price", "parameters": {"type": "object"}}]
SYSTEM_WITH_TOOLS = {"role": "system", "content": "Use tools:", "tools": TOOLS}


@pytest.fixture(scope="module")
def cases():
    require_shared(CASES_PATH)
    return json.loads(CASES_PATH.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ golden
def test_golden_process_response(cases):
    for case in cases["process_response"]["cases"]:
        history = json.loads(json.dumps(case["history"]))
        content, new_history = cf.process_chatglm3_response(case["output"], history)
        assert content == case["result"]["content"], case["name"]
        assert new_history == case["result"]["history"], case["name"]
        assert history == case["history"], "the input history must not be modified"
        json.dumps(new_history)  # JSON-serialisable


def test_golden_chatglm2(cases):
    for case in cases["chatglm2_prompts"]["cases"]:
        assert cf.build_chatglm2_prompt(case["query"], case["history"]) == case["prompt"]
    for case in cases["chatglm2_prompts"]["process_response"]:
        assert cf.process_chatglm2_response(case["response"]) == case["result"]


def test_golden_special_ids_and_stop_ids(cases):
    for family in ("chatglm3", "chatglm2"):
        assert cf.special_token_ids(family) == cases["tokenizers"][family]["special_token_ids"]
    assert cf.stop_token_ids("chatglm3") == [2, 64795, 64797]
    assert cf.stop_token_ids("chatglm2") == [2]
    assert cf.stop_token_ids("chatglm3", sp_vocab_size=100) == [2, 106, 108]


# ------------------------------------------------------------------------------------------------ tool calls
@pytest.mark.parametrize(
    "content,params",
    [
        (" ```python\ntool_call(location='北京', unit='celsius')\n```", {"location": "北京", "unit": "celsius"}),
        ("```python\ntool_call(a=1, b='x', c=-2.5, d=True, e=None, f=[1, (2, 3)], g={'k': [None]})\n```",
         {"a": 1, "b": "x", "c": -2.5, "d": True, "e": None, "f": [1, [2, 3]], "g": {"k": [None]}}),
        ("tool_call(a=1)", {"a": 1}),
        ("```\ntool_call()\n```", {}),
        ('```json\n{"city": "Beijing", "days": 3}\n```', {"city": "Beijing", "days": 3}),
        ('{"city": "Beijing"}', {"city": "Beijing"}),
        ('tool_call({"city": "Beijing", "flag": true})', {"city": "Beijing", "flag": True}),
        ('tool_call(**{"city": "Beijing"}, n=+2)', {"city": "Beijing", "n": 2}),
        ("```python\ntool_call(text='''多行\n文本''')\n```", {"text": "多行\n文本"}),
    ],
)
def test_parse_tool_call_accepts(content, params):
    assert cf.parse_tool_call(content) == params
    reply, history = cf.process_chatglm3_response("track\n" + content, [SYSTEM_WITH_TOOLS])
    assert reply == {"name": "track", "parameters": params}
    assert history[-1] == {"role": "assistant", "metadata": "track", "content": content}


@pytest.mark.parametrize(
    "content",
    [
        "```python\ntool_call(a=__import__('os').system('echo pwned'))\n```",
        "```python\ntool_call(a=open('/etc/passwd').read())\n```",
        "```python\nprint(1)\n```",
        "```python\ntool_call(a=1 + 1)\n```",
        "```python\ntool_call(a=[x for x in range(3)])\n```",
        "```python\ntool_call(a=lambda: 1)\n```",
        "```python\ntool_call(1, 2)\n```",
        "```python\ntool_call(a={1, 2})\n```",
        "```python\ntool_call(a=b'x')\n```",
        "```python\ntool_call(a=1, a=2)\n```",
        "```python\ntool_call(a=\n```",
        "```python\nos.system('x')\n```",
        "```python\n\n```",
        "",
        "[1, 2]",
        "{not json}",
        "tool_call(a=" + "[" * 500 + "]" * 500 + ")",
        "tool_call(a='" + "x" * 200_000 + "')",
    ],
)
def test_parse_tool_call_rejects_without_raising(content):
    with pytest.raises(cf.ToolCallError):
        cf.parse_tool_call(content)
    reply, history = cf.process_chatglm3_response("track\n" + content, [SYSTEM_WITH_TOOLS])
    assert reply["name"] == "track" and reply["content"] == content and reply["parse_error"]
    assert history[-1]["content"] == content


def test_parse_never_evaluates(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    code = f"tool_call(a=open({str(marker)!r}, 'w').write('x'))"
    reply, _ = cf.process_chatglm3_response("t\n" + code, [SYSTEM_WITH_TOOLS])
    assert "parse_error" in reply and not marker.exists()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_property_process_response_never_raises(text):
    for history in ([], [SYSTEM_WITH_TOOLS], [{"role": "user", "content": "x"}]):
        reply, new_history = cf.process_chatglm3_response(text, history)
        assert isinstance(reply, (str, dict))
        assert len(new_history) == len(history) + text.count("<|assistant|>") + 1
        json.dumps(new_history)


def test_process_response_shapes():
    # metadata without tools -> {"name", "content"}; plain -> stripped text with the placeholder replaced
    reply, _ = cf.process_chatglm3_response("interpreter\n ```python\nprint(1)\n```", [{"role": "user", "content": "x"}])
    assert reply == {"name": "interpreter", "content": " ```python\nprint(1)\n```"}
    reply, history = cf.process_chatglm3_response("\n 截止[[训练时间]] ", [])
    assert reply == "截止2023年" and history[-1]["content"] == "截止[[训练时间]]"
    # tools on any system message count (the official code looked at history[0] only)
    reply, _ = cf.process_chatglm3_response("track\ntool_call(a=1)", [{"role": "user", "content": "x"}, SYSTEM_WITH_TOOLS])
    assert reply == {"name": "track", "parameters": {"a": 1}}
    with pytest.raises(ValueError):
        cf.process_chatglm3_response(None, [])
    with pytest.raises(ValueError):
        cf.process_chatglm2_response(b"bytes")


# ------------------------------------------------------------------------------------------------ building
def fake_encode(text: str):
    """A stand-in for sentencepiece: one id per character, plus a dummy-prefix id 9 for non-empty text."""
    return [9] + [ord(c) for c in text] if text else []


ROLE_IDS = {f"<|{r}|>": 1000 + i for i, r in enumerate(cf.ROLES)}


def test_build_chatglm3_ids():
    ids = cf.build_chatglm3_ids(
        "q", [SYSTEM_WITH_TOOLS, {"role": "assistant", "metadata": "m", "content": "c"}], "observation",
        encode=fake_encode, role_ids=ROLE_IDS, prefix_ids=[7, 8],
    )
    tools_text = "Use tools:\n" + json.dumps(TOOLS, indent=4, ensure_ascii=False)
    want = [7, 8, 1000] + fake_encode("\n") + fake_encode(tools_text)
    want += [1002] + fake_encode("m\n") + fake_encode("c")
    want += [1003] + fake_encode("\n") + fake_encode("q") + [1002]
    assert ids == want
    assert cf.system_content({"role": "user", "content": "x", "tools": TOOLS}) == "x"


@pytest.mark.parametrize(
    "history,role,query,match",
    [
        (None, "wizard", "q", "unknown role"),
        (None, "user", 5, "must be a str"),
        ([{"role": "boss", "content": "x"}], "user", "q", "unknown role"),
        ([{"content": "x"}], "user", "q", "'role' and 'content'"),
        ([("q", "a")], "user", "q", "dict"),
        ({"role": "user", "content": "x"}, "user", "q", "list"),
        ([{"role": "user", "content": 1}], "user", "q", "must be a str"),
        ([{"role": "user", "content": "x", "metadata": 3}], "user", "q", "must be a str"),
        ([{"role": "system", "content": "x", "tools": {1, 2}}], "user", "q", "JSON"),
    ],
)
def test_build_chatglm3_errors(history, role, query, match):
    with pytest.raises(ValueError, match=match):
        cf.build_chatglm3_ids(query, history, role, encode=fake_encode, role_ids=ROLE_IDS, prefix_ids=[])


def test_chatglm2_prompt_and_errors():
    assert cf.build_chatglm2_prompt("q") == "[Round 1]\n\n问：q\n\n答："
    assert cf.build_chatglm2_prompt("q", [["a", "b"]]) == "[Round 1]\n\n问：a\n\n答：b\n\n[Round 2]\n\n问：q\n\n答："
    for bad in ([("a",)], [("a", "b", "c")], [{"role": "user", "content": "x"}], [("a", None)], "ab"):
        with pytest.raises(ValueError):
            cf.build_chatglm2_prompt("q", bad)
    with pytest.raises(ValueError):
        cf.build_chatglm2_prompt(None)


# ------------------------------------------------------------------------------------------------ families, defaults
@pytest.mark.parametrize(
    "variant,family",
    [("chatglm3-6b", "chatglm3"), ("chatglm3-6b-128k", "chatglm3"), ("chatglm2-6b", "chatglm2"),
     ("chatglm2-6b-32k", "chatglm2"), ("chatglm2-6b-int4", "chatglm2")],
)
def test_family_of_official_configs(variant, family):
    path = require_shared(ASSETS / "official" / variant / "tokenizer_config.json")
    assert cf.family_from_tokenizer_config(json.loads(path.read_text(encoding="utf-8"))) == family


def test_family_rule():
    assert cf.family_from_tokenizer_config({}) == "chatglm2"
    assert cf.family_from_tokenizer_config({"chat_format": "chatglm2", "chat_template": "x"}) == "chatglm2"
    assert cf.family_from_tokenizer_config({"chat_template": "x"}) == "chatglm3"
    assert cf.family_from_tokenizer_config({"name_or_path": "/models/ChatGLM3-6B"}) == "chatglm3"
    assert cf.family_from_tokenizer_config({"added_tokens_decoder": {"64795": {"content": "<|user|>"}}}) == "chatglm3"
    with pytest.raises(ValueError, match="chat format"):
        cf.family_from_tokenizer_config({"chat_format": "glm4"})


def test_our_configs_state_the_family():
    for path in [REPO / "tokenizer_config.json", *sorted((REPO / "variants").glob("*/tokenizer_config.json"))]:
        config = json.loads(path.read_text(encoding="utf-8"))
        family = "chatglm2" if "chatglm2" in str(path) else "chatglm3"
        assert config["chat_format"] == family, path
        assert cf.markup_dialect(config["chat_template"]) == family


def test_chat_defaults():
    assert cf.chat_defaults("chatglm3-6b-128k") == cf.ChatDefaults(131072, 0.7, 0.95)
    assert cf.chat_defaults("THUDM/chatglm2-6b-32k").max_length == 32768
    assert cf.chat_defaults("chatglm3") == cf.ChatDefaults(8192, 0.8, 0.8)
    with pytest.raises(ValueError):
        cf.chat_defaults("llama")


# ------------------------------------------------------------------------------------------------ markup
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(["<", "|", ">", "\ue000", "a", "\n"]), max_size=40) | st.text(max_size=40))
def test_property_escape(text):
    escaped = cf.escape_markup(text)
    assert "<|" not in escaped
    assert cf.unescape_markup(escaped) == text


def test_markup_dialect():
    assert cf.markup_dialect(cf.CHATGLM3_TEMPLATE) == "chatglm3"
    assert cf.markup_dialect(cf.CHATGLM2_TEMPLATE) == "chatglm2"
    assert cf.markup_dialect("{{ messages }}") is None and cf.markup_dialect(None) is None
    assert cf.chat_template("chatglm2") == cf.CHATGLM2_TEMPLATE
