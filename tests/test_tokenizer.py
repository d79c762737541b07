"""ChatGLMTokenizer: golden replay with the real tokenizer.model (when ../shared is present) and logic tests on a
tiny sentencepiece model trained here (always run). Runs on transformers 4.30.2 and 5.x."""
from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import types
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from conftest import ASSETS, GOLDEN, REPO, TOKENIZER_MODEL, require_shared
from chatglm import chat_format as cf
from chatglm.tokenization_chatglm import BASE_HAS_CHAT_TEMPLATE, ChatGLMTokenizer
from make_tiny_model import train_tiny_tokenizer  # tools/ (on sys.path through conftest)

spm = pytest.importorskip("sentencepiece")

CODE_FILES = ["tokenization_chatglm.py", "chat_format.py"]
NO_CHAT_TEMPLATE = "transformers %s has no apply_chat_template (added in 4.34)" % transformers.__version__
CASES_PATH = GOLDEN / "tokenizer" / "cases.json"
OFFICIAL = ASSETS / "official"


# ------------------------------------------------------------------------------------------------ helpers
def make_dir(root: Path, model_file: Path, config: Dict[str, Any]) -> Path:
    """A Hub-style folder: our .py files + tokenizer.model + tokenizer_config.json."""
    root.mkdir(parents=True, exist_ok=True)
    for name in CODE_FILES:
        shutil.copy(REPO / name, root / name)
    shutil.copy(model_file, root / "tokenizer.model")
    (root / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return root


def our_config(family: str) -> Dict[str, Any]:
    name = "chatglm3-6b" if family == "chatglm3" else "chatglm2-6b"
    return json.loads((REPO / "variants" / name / "tokenizer_config.json").read_text(encoding="utf-8"))


def ids_of(encoding) -> List[int]:
    """input_ids of apply_chat_template's result, whatever the version returns (list or BatchEncoding)."""
    if hasattr(encoding, "keys"):
        encoding = encoding["input_ids"]
    if isinstance(encoding, torch.Tensor):
        encoding = encoding.tolist()
    if encoding and isinstance(encoding[0], list):
        assert len(encoding) == 1
        encoding = encoding[0]
    return list(encoding)


def conversation_ids(tok: ChatGLMTokenizer, messages: List[Dict[str, Any]], add_generation_prompt: bool) -> List[int]:
    """The ChatGLM3 ids of a conversation built from build_single_message (the reference for templates)."""
    ids = tok.get_prefix_tokens()
    for m in messages:
        ids += tok.build_single_message(m["role"], m.get("metadata", ""), cf.system_content(m))
    if add_generation_prompt:
        ids.append(tok.get_command("<|assistant|>"))
    return ids


def render_like_transformers(template: str, messages, add_generation_prompt: bool, **extra) -> str:
    """Render a chat template the way transformers does (sandboxed, trim/lstrip blocks, tojson, raise_exception)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


# ------------------------------------------------------------------------------------------------ tiny model
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "def add(a, b):\n    return a + b\n",
    "你好，我是一个人工智能助手。很高兴认识你！",
    "今天天气很好，我们去公园散步吧。",
    "Tokenizers split text into pieces; pieces map to ids.",
    "Please call the weather tool for Beijing and Shanghai.",
    "模型参数约为六十亿，支持中英双语对话。",
    "JSON: {\"name\": \"get_weather\", \"parameters\": {\"city\": \"北京\"}}",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols ! ? . , : ; ( ) [ ] { } < > | = + - * /",
    "A user asks a question and the assistant answers it politely.",
    "Observation results come back from tools as text.",
]


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    """A ~480-piece BPE sentencepiece model shaped like the real one (byte fallback, identity normaliser)."""
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_sp") / "tokenizer.model", CORPUS)


@pytest.fixture(scope="session")
def tiny3(tiny_model_file) -> ChatGLMTokenizer:
    return ChatGLMTokenizer(vocab_file=str(tiny_model_file), chat_format="chatglm3")


@pytest.fixture(scope="session")
def tiny2(tiny_model_file) -> ChatGLMTokenizer:
    return ChatGLMTokenizer(vocab_file=str(tiny_model_file), chat_format="chatglm2")


@pytest.fixture(scope="session")
def tiny3_auto(tiny_model_file, tmp_path_factory):
    root = make_dir(tmp_path_factory.mktemp("tiny3_repo"), tiny_model_file, our_config("chatglm3"))
    return AutoTokenizer.from_pretrained(str(root), trust_remote_code=True)


# ------------------------------------------------------------------------------------------------ real model
@pytest.fixture(scope="session")
def cases() -> Dict[str, Any]:
    require_shared(CASES_PATH)
    return json.loads(CASES_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def real_model_file() -> Path:
    return require_shared(TOKENIZER_MODEL)


@pytest.fixture(scope="session")
def real_dirs(real_model_file, tmp_path_factory) -> Dict[str, Path]:
    """Folders for AutoTokenizer: ours (chatglm3/chatglm2) and the unchanged official configs."""
    dirs = {}
    for family in ("chatglm3", "chatglm2"):
        dirs[f"ours-{family}"] = make_dir(tmp_path_factory.mktemp(f"ours_{family}"), real_model_file, our_config(family))
    for variant in ("chatglm3-6b", "chatglm3-6b-128k", "chatglm2-6b", "chatglm2-6b-32k", "chatglm2-6b-int4"):
        config = json.loads((OFFICIAL / variant / "tokenizer_config.json").read_text(encoding="utf-8"))
        dirs[f"official-{variant}"] = make_dir(
            tmp_path_factory.mktemp(f"official_{variant.replace('-', '_')}"), real_model_file, config
        )
    return dirs


_loaded: Dict[Any, Any] = {}


def load(path: Path, **kwargs):
    key = (str(path), tuple(sorted(kwargs.items())))
    if key not in _loaded:
        _loaded[key] = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, **kwargs)
    return _loaded[key]


@pytest.fixture(scope="session", params=["ours-chatglm3", "official-chatglm3-6b"])
def real3(request, real_dirs):
    """The ChatGLM3 tokenizer, loaded from our config and from the official one (new transformers registers
    its added_tokens_decoder: the results must not change)."""
    return load(real_dirs[request.param])


@pytest.fixture(scope="session", params=["ours-chatglm3", "official-chatglm3-6b"])
def real3_special(request, real_dirs):
    return load(real_dirs[request.param], encode_special_tokens=True)


@pytest.fixture(scope="session", params=["ours-chatglm2", "official-chatglm2-6b"])
def real2(request, real_dirs):
    return load(real_dirs[request.param])


# ================================================================================================ golden replay
def test_model_file_is_the_official_one(real_model_file, cases):
    digest = hashlib.sha256(real_model_file.read_bytes()).hexdigest()
    assert digest == cases["tokenizer_model_sha256"]["chatglm3-6b"] == cases["tokenizer_model_sha256"]["chatglm2-6b"]


@pytest.mark.parametrize("family", ["chatglm3", "chatglm2"])
def test_golden_tokenizer_facts(family, cases, real3, real2):
    tok, facts = (real3 if family == "chatglm3" else real2), cases["tokenizers"][family]
    assert tok.chat_format == family
    assert tok.vocab_size == facts["vocab_size"] and len(tok) == facts["len"]
    assert tok.tokenizer.sp_model.vocab_size() == facts["sp_vocab_size"]
    assert (tok.eos_token_id, tok.pad_token_id) == (facts["eos_token_id"], facts["pad_token_id"])
    assert (tok.eos_token, tok.pad_token, tok.unk_token) == (facts["eos_token"], facts["pad_token"], facts["unk_token"])
    assert tok.padding_side == facts["padding_side"]
    assert tok.tokenizer.special_tokens == facts["special_token_ids"]
    assert tok.tokenizer.index_special_tokens == {v: k for k, v in facts["special_token_ids"].items()}
    for token, index in facts["special_token_ids"].items():
        assert tok.convert_tokens_to_ids(token) == index == tok.get_command(token)
    assert tok.special_tokens == {"<bos>": 1, "<eos>": 2, "<unk>": 0, "<pad>": 0}
    assert Path(tok.vocab_file).name == "tokenizer.model"


@pytest.mark.parametrize("family", ["chatglm3", "chatglm2"])
def test_golden_encode(cases, real3, real2, family):
    tok = real3 if family == "chatglm3" else real2
    for case in cases["encode"]["cases"]:
        text, want = case["text"], case[family]
        ids = tok.encode(text)
        ids_plain = tok.encode(text, add_special_tokens=False)
        assert ids == want["encode"], text
        assert ids_plain == want["encode_no_special"], text
        assert tok.tokenize(text) == want["tokenize"], text
        assert tok.decode(ids) == want["decode_encode"], text
        assert tok.decode(ids_plain) == want["decode_encode_no_special"], text


def test_golden_encode_special_tokens(cases, real3_special, real3):
    for case in cases["encode"]["cases"]:
        text, want = case["text"], case["chatglm3_encode_special_tokens"]
        assert real3_special.encode(text) == want["encode"], text
        assert real3_special.encode(text, add_special_tokens=False) == want["encode_no_special"], text
        assert real3_special.tokenize(text) == want["tokenize"], text
    # the attribute set after loading and the per-call keyword do the same
    text = "<|user|>\n你好<|assistant|>"
    want = next(c for c in cases["encode"]["cases"] if c["text"] == text)["chatglm3_encode_special_tokens"]
    assert real3.tokenize(text, encode_special_tokens=True) == want["tokenize"]
    real3.encode_special_tokens = True
    try:
        assert real3.encode(text) == want["encode"]
    finally:
        real3.encode_special_tokens = False
    assert real3.encode(text) != want["encode"]


@pytest.mark.parametrize("family", ["chatglm3", "chatglm2"])
def test_golden_padding(family, cases, real3, real2):
    tok, want = (real3 if family == "chatglm3" else real2), cases["padding"][family]
    out = tok(cases["padding"]["texts"], padding=True)
    assert out["input_ids"] == want["input_ids"]
    assert out["attention_mask"] == want["attention_mask"]
    assert out["position_ids"] == want["position_ids"]


def test_golden_build_chat_input(cases, real3):
    for case in cases["build_chat_input"]["cases"]:
        out = real3.build_chat_input(case["query"], history=case["history"], role=case["role"])
        for key in ("input_ids", "attention_mask", "position_ids"):
            assert isinstance(out[key], torch.Tensor) and out[key].shape[0] == 1
            assert out[key].tolist() == case["result"][key], (case["name"], key)
        assert out.to("cpu")["input_ids"].device.type == "cpu"


def test_golden_apply_chat_template_rendering(cases, real3, real3_special):
    """The golden renders the official template with jinja2 and encodes with add_special_tokens=False."""
    official = json.loads((OFFICIAL / "chatglm3-6b" / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = official["chat_template"]
    assert hashlib.sha256(template.encode()).hexdigest() == cases["apply_chat_template"]["chat_template_sha256"]
    for case in cases["apply_chat_template"]["cases"]:
        rendered = render_like_transformers(template, case["messages"], case["add_generation_prompt"])
        assert rendered == case["rendered"]
        assert real3_special.encode(rendered, add_special_tokens=False) == case["ids_encode_special_tokens"]
        assert real3.encode(rendered, add_special_tokens=False) == case["ids_default"]


@pytest.mark.skipif(not BASE_HAS_CHAT_TEMPLATE, reason=NO_CHAT_TEMPLATE)
def test_golden_conversations_through_our_template(cases, real3):
    """Deviation: loading the official config swaps its template for ours, whose ids equal build_chat_input."""
    for case in cases["apply_chat_template"]["cases"]:
        got = ids_of(real3.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"]))
        assert got == conversation_ids(real3, case["messages"], case["add_generation_prompt"])
    for case in cases["build_chat_input"]["cases"]:
        messages = case["history"] + [{"role": case["role"], "content": case["query"]}]
        got = ids_of(real3.apply_chat_template(messages, add_generation_prompt=True))
        assert got == case["result"]["input_ids"][0], case["name"]


def test_golden_chatglm2_prompts(cases, real2):
    for case in cases["chatglm2_prompts"]["cases"]:
        history = [tuple(pair) for pair in case["history"]]
        prompt = real2.build_prompt(case["query"], history)
        assert prompt == case["prompt"]
        assert real2.build_prompt(case["query"], [list(p) for p in history]) == prompt
        for out in (real2([prompt], return_tensors="pt"), real2.build_chat_input(case["query"], history=history)):
            for key in ("input_ids", "attention_mask", "position_ids"):
                assert out[key].tolist() == case["build_inputs"][key]
        # build_stream_inputs (model side) continues a cached prompt: text of the new round without its first
        # piece (the dummy-prefix "▁"); with no history it is the whole prompt
        if history:
            tail = "\n\n[Round {}]\n\n问：{}\n\n答：".format(len(history) + 1, case["query"])
            ids = real2.encode(tail, add_special_tokens=False)[1:]
            assert [ids] == case["build_stream_inputs"]["input_ids"]
        else:
            assert case["build_stream_inputs"]["input_ids"] == case["build_inputs"]["input_ids"]
    for case in cases["chatglm2_prompts"]["process_response"]:
        assert cf.process_chatglm2_response(case["response"]) == case["result"]


def _skip_ids(tok, ids):
    return [i for i in ids if i not in tok.tokenizer.index_special_tokens and i not in (0, 1, 2)]


@pytest.mark.parametrize("family", ["chatglm3", "chatglm2"])
def test_golden_decode(family, cases, real3, real2):
    tok = real3 if family == "chatglm3" else real2
    for case in cases["decode"]["cases"]:
        ids, want = case["ids"], case[family]
        if isinstance(want["decode"], dict):  # the official code raised IndexError: ids outside the vocabulary
            known = [i for i in ids if 0 <= i < tok.vocab_size]
            assert tok.decode(ids) == tok.decode(known), case["name"]
            assert tok.convert_ids_to_tokens(ids) == [tok.convert_ids_to_tokens(i) if i < tok.vocab_size else ""
                                                      for i in ids]
        else:
            assert tok.decode(ids) == want["decode"], case["name"]
            assert tok.convert_ids_to_tokens(ids) == want["convert_ids_to_tokens"], case["name"]
            # Deviation: skip_special_tokens=True drops control tokens (the official ChatGLM3 code ignored it)
            assert tok.decode(ids, skip_special_tokens=True) == tok.decode(_skip_ids(tok, ids)), case["name"]
            if want["decode_skip_special_tokens"] == want["decode"] and family == "chatglm2":
                assert tok.decode(ids, skip_special_tokens=True) == want["decode_skip_special_tokens"]
        sp_want = want["sp_tokenizer_decode"]
        if isinstance(sp_want, dict):
            known = [i for i in ids if 0 <= i < tok.vocab_size]
            assert tok.tokenizer.decode(ids) == tok.tokenizer.decode(known)
        else:
            assert tok.tokenizer.decode(ids) == sp_want, case["name"]
    assert "<|user|>" not in real3.decode([64790, 64792, 64795, 36474, 64796], skip_special_tokens=True)
    assert real3.batch_decode([[64795, 36474], [64796, 13755]]) == ["<|user|> 你", "<|assistant|> Hello"]


def test_golden_process_response_cases_exist(cases):
    # replayed in test_chat_format.py; here only a guard that the section is where we expect it
    assert len(cases["process_response"]["cases"]) >= 10


# ================================================================================================ loading
@pytest.mark.parametrize(
    "name,family",
    [
        ("ours-chatglm3", "chatglm3"),
        ("ours-chatglm2", "chatglm2"),
        ("official-chatglm3-6b", "chatglm3"),
        ("official-chatglm3-6b-128k", "chatglm3"),
        ("official-chatglm2-6b", "chatglm2"),
        ("official-chatglm2-6b-32k", "chatglm2"),
        ("official-chatglm2-6b-int4", "chatglm2"),
    ],
)
def test_load_every_config(name, family, real_dirs):
    tok = load(real_dirs[name])
    assert tok.chat_format == family
    assert tok.encode("你好") == [64790, 64792, 36474, 54591]
    assert tok.padding_side == "left"
    # plain text stays plain text, whatever the config registered
    for text in ("<|user|>", "sop", "[gMASK]", "<|assistant|>hi", "isopropyl"):
        assert not set(tok.encode(text, add_special_tokens=False)) & set(range(64789, 64798)), (name, text)
    assert cf.markup_dialect(tok.chat_template) == family
    assert tok.stop_token_ids == ([2, 64795, 64797] if family == "chatglm3" else [2])


@pytest.mark.parametrize("variant", ["chatglm2-6b", "chatglm2-6b-32k", "chatglm3-6b", "chatglm3-6b-32k", "chatglm3-6b-128k"])
def test_variant_configs(variant, real_model_file, tmp_path):
    config = json.loads((REPO / "variants" / variant / "tokenizer_config.json").read_text(encoding="utf-8"))
    family = "chatglm3" if variant.startswith("chatglm3") else "chatglm2"
    assert config["chat_format"] == family and config["padding_side"] == "left"
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_chatglm.ChatGLMTokenizer"
    assert config["chat_template"] == cf.chat_template(family)
    tok = AutoTokenizer.from_pretrained(str(make_dir(tmp_path / variant, real_model_file, config)), trust_remote_code=True)
    assert tok.chat_format == family and tok.vocab_size == (64798 if family == "chatglm3" else 64794)
    top = json.loads((REPO / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert top == json.loads((REPO / "variants" / "chatglm3-6b" / "tokenizer_config.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("family", ["chatglm3", "chatglm2"])
def test_save_pretrained_round_trip(family, tiny_model_file, tmp_path):
    first = AutoTokenizer.from_pretrained(
        str(make_dir(tmp_path / "a", tiny_model_file, our_config(family))), trust_remote_code=True,
        padding_side="right",
    )
    first.save_pretrained(str(tmp_path / "b"))
    assert (tmp_path / "b" / "tokenizer.model").read_bytes() == tiny_model_file.read_bytes()
    second = AutoTokenizer.from_pretrained(str(tmp_path / "b"), trust_remote_code=True)
    assert second.chat_format == family and second.padding_side == "right"
    assert second.chat_template == first.chat_template
    for text in ("Hello world", "你好 <|user|> sop", ""):
        assert second.encode(text) == first.encode(text)
    if family == "chatglm3":
        history = [{"role": "system", "content": "s", "tools": [{"name": "t"}]}, {"role": "user", "content": "q"}]
        assert second.build_chat_input("x", history).input_ids.tolist() == first.build_chat_input("x", history).input_ids.tolist()


def test_save_pretrained_official_config(real_dirs, tmp_path):
    tok = load(real_dirs["official-chatglm2-6b-int4"])
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert again.chat_format == "chatglm2" and again.encode("你好") == [64790, 64792, 36474, 54591]


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.model"):
        ChatGLMTokenizer(vocab_file=str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="not found"):
        ChatGLMTokenizer(vocab_file=None)
    root = tmp_path / "repo"
    root.mkdir()
    for name in CODE_FILES:
        shutil.copy(REPO / name, root / name)
    (root / "tokenizer_config.json").write_text(json.dumps(our_config("chatglm3")), encoding="utf-8")
    with pytest.raises((ValueError, OSError), match="tokenizer.model|vocab"):
        AutoTokenizer.from_pretrained(str(root), trust_remote_code=True)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises((ValueError, RuntimeError, OSError)):
        ChatGLMTokenizer(vocab_file=str(bad))


def test_default_family_without_config_is_chatglm2(tiny_model_file):
    # the official ChatGLM2 configs carry no hint, so "no hint" means chatglm2 (docs/tokenizer.md)
    assert ChatGLMTokenizer(vocab_file=str(tiny_model_file)).chat_format == "chatglm2"
    assert ChatGLMTokenizer(vocab_file=str(tiny_model_file), name_or_path="THUDM/chatglm3-6b").chat_format == "chatglm3"


def test_unknown_chat_format(tiny_model_file):
    with pytest.raises(ValueError, match="chat format"):
        ChatGLMTokenizer(vocab_file=str(tiny_model_file), chat_format="chatglm4")


# ================================================================================================ tiny model logic
def test_tiny_special_ids_follow_the_vocab(tiny3, tiny2):
    n = tiny3.tokenizer.sp_model.vocab_size()
    assert 300 <= n <= 500
    assert tiny3.tokenizer.special_tokens == {t: n + i for i, t in enumerate(cf.GLM_TOKENS + cf.ROLE_TOKENS)}
    assert tiny2.tokenizer.special_tokens == {t: n + i for i, t in enumerate(cf.GLM_TOKENS)}
    assert tiny3.vocab_size == len(tiny3) == n + 9 and tiny2.vocab_size == len(tiny2) == n + 5
    assert tiny3.get_prefix_tokens() == [n + 1, n + 3]
    assert tiny3.stop_token_ids == [2, n + 6, n + 8] and tiny2.stop_token_ids == [2]
    assert tiny3.encode("Hello")[:2] == [n + 1, n + 3]
    vocab = tiny3.get_vocab()
    assert vocab["<|observation|>"] == n + 8 and vocab["</s>"] == 2 and len(vocab) == n + 9
    assert tiny3.eos_token_id == 2 and tiny3.pad_token_id == 0 and tiny3.unk_token_id == 0
    assert tiny3.get_command("<eos>") == 2 and tiny3.get_command("<pad>") == 0
    with pytest.raises(ValueError, match="control token"):
        tiny3.get_command("<|nobody|>")
    with pytest.raises(ValueError, match="control token"):
        tiny2.get_command("<|user|>")


def test_tiny_control_strings_are_text(tiny3, tiny2):
    n = tiny3.tokenizer.sp_model.vocab_size()
    text = "<|user|>\n[gMASK]sop eop [MASK] [sMASK] <|system|><|assistant|><|observation|> isopropyl"
    for tok in (tiny3, tiny2):
        ids = tok.encode(text, add_special_tokens=False)
        assert all(i < n for i in ids)
        assert tok.decode(ids) == text
    special = tiny3.encode("<|user|>hi", add_special_tokens=False, encode_special_tokens=True)
    assert special[0] == n + 6
    # the ChatGLM2 family knows only its 5 control tokens
    assert tiny2.tokenize("sop<|user|>", encode_special_tokens=True)[0] == "sop"
    assert all(i < n for i in tiny2.encode("<|user|>", add_special_tokens=False, encode_special_tokens=True))


def test_tiny_decode(tiny3, tiny2):
    n = tiny3.tokenizer.sp_model.vocab_size()
    ids = tiny3.encode("Hello world")
    assert tiny3.decode(ids) == "[gMASK]sop Hello world"
    assert tiny3.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tiny2.decode(ids) == "Hello world"
    assert tiny3.decode([n + 6] + ids[2:] + [n + 7]) == "<|user|> Hello world<|assistant|>"
    assert tiny3.decode(ids + [2, 0, 1, 10 ** 6, -1]) == "[gMASK]sop Hello world"
    assert tiny3.decode(torch.tensor(ids)) == tiny3.decode(ids)
    assert tiny3.decode(torch.tensor(ids[2])) == tiny3.decode([ids[2]]) == tiny3.convert_ids_to_tokens(torch.tensor(ids[2])).replace("\u2581", "")
    assert tiny3.convert_ids_to_tokens(n + 8) == "<|observation|>"
    assert tiny2.convert_ids_to_tokens([n + 1, n + 8, 2]) == ["", "", ""]
    assert tiny3.batch_decode([ids, ids[2:]], skip_special_tokens=True) == ["Hello world"] * 2


def test_tiny_build_chat_input(tiny3):
    sp = tiny3.tokenizer
    role = sp.special_tokens
    history = [
        {"role": "system", "content": "Be brief.", "tools": [{"name": "weather", "params": ["city"]}]},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "metadata": "weather", "content": " ```python\ntool_call(city='Beijing')\n```"},
        {"role": "observation", "content": "{\"temp\": 20}"},
    ]
    out = tiny3.build_chat_input("", history=history, role="observation")
    ids = out["input_ids"][0].tolist()
    tools_json = json.dumps(history[0]["tools"], indent=4, ensure_ascii=False)
    want = tiny3.get_prefix_tokens()
    want += [role["<|system|>"]] + sp.encode("\n") + sp.encode("Be brief.\n" + tools_json)
    want += [role["<|user|>"]] + sp.encode("\n") + sp.encode("Weather?")
    want += [role["<|assistant|>"]] + sp.encode("weather\n") + sp.encode(history[2]["content"])
    want += [role["<|observation|>"]] + sp.encode("\n") + sp.encode("{\"temp\": 20}")
    want += [role["<|observation|>"]] + sp.encode("\n") + [role["<|assistant|>"]]
    assert ids == want
    assert out["attention_mask"].tolist() == [[1] * len(ids)]
    assert out["position_ids"].tolist() == [list(range(len(ids)))]
    assert tiny3.build_single_message("user", "", "hi") == [role["<|user|>"]] + sp.encode("\n") + sp.encode("hi")
    # history=None and an empty history are the same; the input history is not modified
    snapshot = json.dumps(history)
    tiny3.build_chat_input("q", history=history)
    assert json.dumps(history) == snapshot
    assert tiny3.build_chat_input("q").input_ids.tolist() == tiny3.build_chat_input("q", []).input_ids.tolist()


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.build_chat_input("hi", role="robot"),
        lambda t: t.build_chat_input(123),
        lambda t: t.build_chat_input("hi", history=[{"role": "user"}]),
        lambda t: t.build_chat_input("hi", history=[("q", "a")]),
        lambda t: t.build_chat_input("hi", history="not a list"),
        lambda t: t.build_chat_input("hi", history=[{"role": "user", "content": None}]),
        lambda t: t.build_chat_input("hi", history=[{"role": "user", "content": "x", "tools": []}]),
        lambda t: t.build_chat_input("hi", history=[{"role": "assistant", "metadata": "a\nb", "content": "x"}]),
        lambda t: t.build_single_message("wizard", "", "x"),
        lambda t: t.build_single_message("user", "", ["x"]),
    ],
)
def test_tiny_chat_input_errors(tiny3, call):
    with pytest.raises(ValueError):
        call(tiny3)


def test_tiny_chatglm2_prompts(tiny2):
    history = [("hi", "hello"), ["how are you", "fine"]]
    prompt = tiny2.build_prompt("bye", history)
    assert prompt == "[Round 1]\n\n问：hi\n\n答：hello\n\n[Round 2]\n\n问：how are you\n\n答：fine\n\n[Round 3]\n\n问：bye\n\n答："
    ids = tiny2.build_chat_input("bye", history=history)["input_ids"][0].tolist()
    assert ids == tiny2.encode(prompt)
    for bad in ([("only one",)], [{"role": "user", "content": "x"}], [("q", 5)], "text"):
        with pytest.raises(ValueError):
            tiny2.build_prompt("x", bad)
    with pytest.raises(ValueError):
        tiny2.build_chat_input("x", role="observation")
    with pytest.raises(ValueError):
        tiny2.build_single_message("user", "", "x")


def test_tiny_padding(tiny3):
    texts = ["Hello", "Hello world, this is longer", ""]
    left = tiny3(texts, padding="longest")
    width = max(len(row) for row in left["input_ids"])
    for row, mask, pos in zip(left["input_ids"], left["attention_mask"], left["position_ids"]):
        n = sum(mask)
        assert len(row) == len(mask) == len(pos) == width
        assert row[: width - n] == [0] * (width - n) and mask == [0] * (width - n) + [1] * n
        assert pos == [0] * (width - n) + list(range(n))
    for right in (tiny3(texts, padding=True, padding_side="right"), tiny3.pad(
            {"input_ids": [tiny3.encode(t) for t in texts]}, padding_side="right")):
        for row, mask, pos, text in zip(right["input_ids"], right["attention_mask"], right["position_ids"], texts):
            n = len(tiny3.encode(text))
            assert row[:n] == tiny3.encode(text) and row[n:] == [0] * (width - n)
            assert mask == [1] * n + [0] * (width - n) and pos == list(range(n)) + [0] * (width - n)
    assert tiny3.padding_side == "left"
    tensors = tiny3(texts, padding="max_length", max_length=width + 3, return_tensors="pt")
    assert tensors["input_ids"].shape == tensors["position_ids"].shape == (3, width + 3)
    multiple = tiny3(texts, padding=True, pad_to_multiple_of=8)
    assert len(multiple["input_ids"][0]) % 8 == 0
    # pad() of features that already carry position_ids (a collator)
    feats = [tiny3("Hello"), tiny3("Hello world, this is longer")]
    padded = tiny3.pad(feats, return_tensors="pt")
    assert padded["position_ids"][0].tolist()[-1] == len(feats[0]["input_ids"]) - 1
    assert padded["position_ids"][0].tolist()[0] == 0 and padded["attention_mask"][0, 0] == 0
    with pytest.raises(ValueError):
        tiny3(texts, padding=True, padding_side="middle")


def test_tiny_right_padding_from_init(tiny_model_file):
    tok = ChatGLMTokenizer(vocab_file=str(tiny_model_file), padding_side="right")
    out = tok(["Hello", "Hello world"], padding=True)
    assert out["attention_mask"][0][-1] == 0 and out["input_ids"][0][-1] == 0
    assert out["position_ids"][0][:3] == [0, 1, 2] and out["position_ids"][0][-1] == 0


def test_tiny_base_pad_swapped_in(tiny_model_file):
    """Trainers (e.g. LLaMA-Factory) replace _pad with the base class one; padding must stay correct."""
    tok = ChatGLMTokenizer(vocab_file=str(tiny_model_file))
    tok._pad = types.MethodType(PreTrainedTokenizerBase._pad, tok)
    for side in ("left", "right"):
        tok.padding_side = side
        out = tok(["Hello", "Hello world, this is longer"], padding=True)
        short = tok.encode("Hello")
        width = len(out["input_ids"][1])
        pad = [0] * (width - len(short))
        assert out["input_ids"][0] == (pad + short if side == "left" else short + pad)
        ones = [1] * len(short)
        assert out["attention_mask"][0] == (pad + ones if side == "left" else ones + pad)
        batch = tok.pad([{"input_ids": short}, {"input_ids": out["input_ids"][1]}], return_tensors="pt")
        assert batch["input_ids"].shape == (2, width)


def test_tiny_encode_api(tiny3):
    ids = tiny3.encode(text="Hello world, this is a tiny corpus", add_special_tokens=True, truncation=True, max_length=5)
    assert len(ids) == 5 and ids[:2] == tiny3.get_prefix_tokens()
    out = tiny3(text="Hello", text_target="world")
    assert out["labels"] == tiny3.encode("world")
    pair = tiny3.encode("Hello", "world")
    assert pair == tiny3.get_prefix_tokens() + tiny3.encode("Hello", add_special_tokens=False) + \
        tiny3.encode("world", add_special_tokens=False) + [2]
    mask = tiny3(["Hello"], return_special_tokens_mask=True)["special_tokens_mask"][0]
    assert mask[:2] == [1, 1] and set(mask[2:]) == {0}
    assert tiny3.get_special_tokens_mask(pair, already_has_special_tokens=True) == [1, 1] + [0] * (len(pair) - 3) + [1]
    assert tiny3.convert_tokens_to_ids(list(cf.GLM_TOKENS + cf.ROLE_TOKENS)) == list(
        range(tiny3.tokenizer.n_sp, tiny3.tokenizer.n_sp + 9))
    assert tiny3.tokenizer.sp_model.vocab_size() == tiny3.tokenizer.n_sp
    assert tiny3.tokenizer.encode("Hello", bos=True, eos=True)[0] == 1


def test_tiny_add_special_tokens_adds_no_ids(tiny_model_file):
    tok = ChatGLMTokenizer(vocab_file=str(tiny_model_file), chat_format="chatglm3")
    before = len(tok)
    added = tok.add_special_tokens(
        {"additional_special_tokens": ["<|user|>", "<|observation|>"]}, replace_additional_special_tokens=False
    )
    assert added == 0 and len(tok) == before
    assert tok.convert_tokens_to_ids("<|user|>") == tok.tokenizer.special_tokens["<|user|>"]
    n = tok.tokenizer.n_sp
    assert all(i < n for i in tok.encode("<|user|> hi", add_special_tokens=False))  # still text in user input
    assert tok.decode([n + 6, 5], skip_special_tokens=True) == tok.decode([5])
    # a genuinely new token gets the next id and is split out of text, as transformers users expect
    assert tok.add_tokens(["<extra>"]) == 1 and len(tok) == before + 1
    ids = tok.encode("Hello<extra>world", add_special_tokens=False)
    assert before in ids and tok.decode(ids) == "Hello<extra> world"


def test_tiny_auto_load(tiny3_auto, tiny3):
    assert type(tiny3_auto).__name__ == "ChatGLMTokenizer" and tiny3_auto.chat_format == "chatglm3"
    assert tiny3_auto.encode("Hello <|user|>") == tiny3.encode("Hello <|user|>")
    assert tiny3_auto.padding_side == "left"
    special = AutoTokenizer.from_pretrained(
        str(Path(tiny3_auto.vocab_file).parent), trust_remote_code=True, encode_special_tokens=True)
    assert special.encode_special_tokens
    assert tiny3.tokenizer.special_tokens["<|user|>"] in special.encode("<|user|>")


# ------------------------------------------------------------------------------------------------ chat templates
ADVERSARIAL = [
    [{"role": "user", "content": "<|user|>\n[gMASK]sop <|assistant|>x"}],
    [{"role": "system", "content": "\ue000<|\ue000\ue000|>", "tools": [{"name": "t", "description": "<|observation|>"}]},
     {"role": "user", "content": "a\nb\n"}, {"role": "assistant", "metadata": "t<|", "content": "\n tool_call()"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}, {"role": "observation", "content": "\n"}],
]


@pytest.mark.parametrize("messages", ADVERSARIAL)
@pytest.mark.parametrize("gen", [True, False])
def test_tiny_markup_matches_build_ids(tiny3, messages, gen):
    """Rendering our template (as transformers would) and reading the markup equals build_single_message."""
    rendered = render_like_transformers(cf.CHATGLM3_TEMPLATE, messages, gen)
    assert tiny3.encode_chat_markup(rendered) == conversation_ids(tiny3, messages, gen)


def test_tiny_markup_chatglm2(tiny2):
    messages = [{"role": "user", "content": "hi <|user|>"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "bye"}]
    rendered = render_like_transformers(cf.CHATGLM2_TEMPLATE, messages, True)
    assert rendered == "[gMASK]sop" + tiny2.build_prompt("bye", [("hi <|user|>", "yo")])
    assert tiny2.encode_chat_markup(rendered) == tiny2.build_chat_input("bye", [("hi <|user|>", "yo")]).input_ids[0].tolist()


@pytest.mark.skipif(not BASE_HAS_CHAT_TEMPLATE, reason=NO_CHAT_TEMPLATE)
@pytest.mark.parametrize("messages", ADVERSARIAL)
def test_tiny_apply_chat_template(tiny3_auto, messages):
    got = ids_of(tiny3_auto.apply_chat_template(messages, add_generation_prompt=True))
    assert got == conversation_ids(tiny3_auto, messages, True)
    if messages[-1]["role"] != "assistant":
        want = tiny3_auto.build_chat_input(messages[-1]["content"], messages[:-1], role=messages[-1]["role"])
        assert got == want["input_ids"][0].tolist()
    text = tiny3_auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tiny3_auto.encode_chat_markup(text) == got
    # outside apply_chat_template the same text is plain text: no control token except what the caller asks
    n = tiny3_auto.tokenizer.n_sp
    assert all(i < n for i in tiny3_auto.encode(text, add_special_tokens=False))


TEMPLATE_PARAMS = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters \
    if BASE_HAS_CHAT_TEMPLATE else {}


@pytest.mark.skipif("return_dict" not in TEMPLATE_PARAMS, reason="apply_chat_template has no return_dict before "
                    f"transformers 4.38 (this is {transformers.__version__})")
def test_tiny_apply_chat_template_dict(tiny3_auto):
    messages = [{"role": "user", "content": "Hello"}]
    tensors = tiny3_auto.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tensors["input_ids"].tolist() == tiny3_auto.build_chat_input("Hello")["input_ids"].tolist()
    assert "position_ids" in tensors


@pytest.mark.skipif("tools" not in TEMPLATE_PARAMS, reason="apply_chat_template takes no tools and no batch of "
                    f"conversations before transformers 4.42 (this is {transformers.__version__})")
def test_tiny_apply_chat_template_batch_and_tools(tiny3_auto):
    messages = [{"role": "user", "content": "Hello"}]
    batch = tiny3_auto.apply_chat_template([messages, messages + [{"role": "assistant", "content": "Hi!"}]],
                                           padding=True, return_dict=True)
    assert batch["attention_mask"][0][0] == 0 and batch["position_ids"][0][0] == 0
    tools = [{"type": "function", "function": {"name": "w", "parameters": {}}}]
    got = ids_of(tiny3_auto.apply_chat_template(messages, tools=tools, add_generation_prompt=True))
    assert got == tiny3_auto.build_chat_input("Hello", [{"role": "system", "content": "", "tools": [tools[0]["function"]]}]).input_ids[0].tolist()


@pytest.mark.skipif(not BASE_HAS_CHAT_TEMPLATE, reason=NO_CHAT_TEMPLATE)
def test_tiny_apply_chat_template_api(tiny3_auto, tiny_model_file, tmp_path):
    messages = [{"role": "user", "content": "Hello"}]
    tensors = tiny3_auto.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = tensors["input_ids"] if hasattr(tensors, "keys") else tensors  # transformers 5 returns a dict by default
    assert ids.tolist() == tiny3_auto.build_chat_input("Hello")["input_ids"].tolist()
    for bad in ([{"role": "robot", "content": "x"}], [{"role": "user", "content": ["x"]}]):
        with pytest.raises(Exception, match="role|string"):
            tiny3_auto.apply_chat_template(bad)
    chatglm2 = AutoTokenizer.from_pretrained(
        str(make_dir(tmp_path / "t2", tiny_model_file, our_config("chatglm2"))), trust_remote_code=True)
    convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert ids_of(chatglm2.apply_chat_template(convo, add_generation_prompt=True)) == chatglm2.encode(
        chatglm2.build_prompt("c", [("a", "b")]))


@pytest.mark.skipif(not BASE_HAS_CHAT_TEMPLATE, reason=NO_CHAT_TEMPLATE)
def test_foreign_template_is_plain_text(tiny3_auto):
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    ids = ids_of(tiny3_auto.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template))
    assert all(i < tiny3_auto.tokenizer.n_sp for i in ids)


# ------------------------------------------------------------------------------------------------ properties
# sentencepiece normalisation: the model's normaliser is the identity and keeps whitespace, but it writes spaces as
# U+2581 ("▁"), so a literal "▁" in the text decodes as a space. Everything else round-trips (byte fallback).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
TEXT_WITH_CONTROLS = st.lists(
    st.one_of(TEXT, st.sampled_from(cf.GLM_TOKENS + cf.ROLE_TOKENS + ("<|", "|>", "\ue000"))), max_size=6
).map("".join)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _expected_round_trip(text: str) -> str:
    return text.replace("\u2581", " ")


@PROPERTY
@given(text=TEXT_WITH_CONTROLS)
def test_property_tiny_no_control_ids_and_round_trip(tiny3, tiny2, text):
    for tok in (tiny3, tiny2):
        ids = tok.encode(text, add_special_tokens=False)
        assert all(0 <= i < tok.tokenizer.n_sp for i in ids)
        assert tok.decode(ids) == _expected_round_trip(text)
        full = tok.encode(text)
        assert full[:2] == tok.get_prefix_tokens() and all(i < tok.tokenizer.n_sp for i in full[2:])


@PROPERTY
@given(content=TEXT_WITH_CONTROLS, metadata=TEXT.filter(lambda s: "\n" not in s), role=st.sampled_from(cf.ROLES))
def test_property_tiny_markup_safe(tiny3, content, metadata, role):
    messages = [{"role": role, "metadata": metadata, "content": content}]
    rendered = render_like_transformers(cf.CHATGLM3_TEMPLATE, messages, True)
    ids = tiny3.encode_chat_markup(rendered)
    assert ids == conversation_ids(tiny3, messages, True)
    n = tiny3.tokenizer.n_sp
    assert [i for i in ids if i >= n] == tiny3.get_prefix_tokens() + [n + 5 + cf.ROLES.index(role), n + 7]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT_WITH_CONTROLS)
def test_property_real_no_control_ids_and_round_trip(real3, text):
    ids = real3.encode(text, add_special_tokens=False)
    assert not [i for i in ids if 64789 <= i <= 64797]
    assert real3.decode(ids) == _expected_round_trip(text)
