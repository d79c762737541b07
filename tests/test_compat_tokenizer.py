"""Issue 6, Tokenizer: the tokenizer calls of existing ChatGLM client programs, made the way they make them.

The tokenizer is loaded from a tiny model folder with the real tokenizer.model (from ../shared: every test here
skips with the reason when it is absent), via `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`.
"""
from __future__ import annotations

import json
from types import MethodType

import pytest
import torch

from compat_util import build

from transformers import AutoTokenizer, DataCollatorForSeq2Seq  # noqa: E402
from transformers.tokenization_utils_base import BatchEncoding, PreTrainedTokenizerBase  # noqa: E402

GLM3_SPECIAL = {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793,
                "<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796, "<|observation|>": 64797}
GLM2_SPECIAL = {k: v for k, v in GLM3_SPECIAL.items() if v < 64794}
HELLO = [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]  # SPEC §4: one user turn "你好"


@pytest.fixture(scope="module")
def glm3_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("compat_tok"), "glm3_tok", "chatglm3-6b", tokenizer=True)


@pytest.fixture(scope="module")
def glm2_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("compat_tok"), "glm2_tok", "chatglm2-6b", tokenizer=True)


@pytest.fixture()
def tok3(glm3_dir):
    return AutoTokenizer.from_pretrained(str(glm3_dir), trust_remote_code=True)


@pytest.fixture()
def tok2(glm2_dir):
    return AutoTokenizer.from_pretrained(str(glm2_dir), trust_remote_code=True)


# ------------------------------------------------------------------------------------------------- chat inputs
def test_build_chat_input_is_a_batch_encoding_that_moves(tok3):
    """ChatGLM3 openai_api_demo / composite_demo: `tokenizer.build_chat_input(query, history=..., role=...)`
    then `.to(model.device)`, `inputs["input_ids"][0]`, `inputs.position_ids`, `inputs.attention_mask`."""
    inputs = tok3.build_chat_input("你好", history=[], role="user")
    assert isinstance(inputs, BatchEncoding)
    assert set(inputs) >= {"input_ids", "attention_mask", "position_ids"}
    inputs = inputs.to("cpu")
    assert isinstance(inputs, BatchEncoding)
    assert inputs["input_ids"][0].tolist() == HELLO
    assert inputs.attention_mask.tolist() == [[1] * len(HELLO)]
    assert inputs.position_ids.tolist() == [list(range(len(HELLO)))]
    assert tok3.build_chat_input("你好").input_ids.tolist() == [HELLO]  # history=None, role="user" defaults


def test_build_chat_input_with_tools_history_and_observation(tok3):
    """tool-use demo: a system message with `tools`, an assistant tool call (metadata), an observation turn."""
    tools = [{"name": "track", "description": "追踪指定股票的实时价格",
              "parameters": {"type": "object", "properties": {"symbol": {"type": "string"}}}}]
    history = [
        {"role": "system", "content": "Answer the following questions as best as you can.", "tools": tools},
        {"role": "user", "content": "帮我查询股票10111的价格"},
        {"role": "assistant", "metadata": "track", "content": " ```python\ntool_call(symbol='10111')\n```"},
    ]
    inputs = tok3.build_chat_input(json.dumps({"price": 12412}), history=history, role="observation")
    ids = inputs["input_ids"][0].tolist()
    system = tok3.build_single_message(
        "system", "", history[0]["content"] + "\n" + json.dumps(tools, indent=4, ensure_ascii=False))
    assert ids[:2 + len(system)] == [64790, 64792] + system
    assert ids.count(64797) == 1 and ids[-1] == 64796
    call = tok3.build_single_message("assistant", "track", history[2]["content"])
    start = ids.index(64796)
    assert ids[start:start + len(call)] == call


def test_build_single_message_as_the_finetune_demo_uses_it(tok3):
    """ChatGLM3 finetune_hf.py process_batch: `[get_command('[gMASK]'), get_command('sop')]` then
    `build_single_message(role, '', content)` per message, then `eos_token_id`."""
    conv = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，有什么可以帮你？"}]
    input_ids, loss_masks = [tok3.get_command("[gMASK]"), tok3.get_command("sop")], [False, False]
    for message in conv:
        new_input_ids = tok3.build_single_message(message["role"], "", message["content"])
        assert isinstance(new_input_ids, list) and all(isinstance(i, int) for i in new_input_ids)
        input_ids += new_input_ids
        loss_masks += [message["role"] == "assistant"] * len(new_input_ids)
    input_ids.append(tok3.eos_token_id)
    assert input_ids[:len(HELLO) - 1] == HELLO[:-1]
    assert input_ids[len(HELLO) - 1] == 64796 and input_ids[-1] == 2
    assert tok3.decode(input_ids[len(HELLO):-1]).strip() == "你好，有什么可以帮你？"


def test_build_prompt_chatglm2(tok2):
    """ChatGLM2 ptuning/main.py and web demo: `tokenizer.build_prompt(query, history)`, history as tuples or lists."""
    history_tuples = [("你好", "你好！")]
    history_lists = [["你好", "你好！"]]
    expected = "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：再见\n\n答："
    assert tok2.build_prompt("再见", history_tuples) == expected
    assert tok2.build_prompt("再见", history_lists) == expected
    assert tok2.build_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："
    ids = tok2.build_chat_input("再见", history=history_tuples)["input_ids"][0].tolist()
    assert ids == tok2.encode(expected)


def test_get_command_and_convert_tokens_to_ids_of_every_special_token(tok3, tok2):
    """openai_api_demo: `get_command("<|user|>")`; LLaMA-Factory templates: `convert_tokens_to_ids("[gMASK]")`."""
    for tok, table in ((tok3, GLM3_SPECIAL), (tok2, GLM2_SPECIAL)):
        for token, index in table.items():
            assert tok.get_command(token) == index, token
            assert tok.convert_tokens_to_ids(token) == index, token
        assert tok.convert_tokens_to_ids(list(table)) == list(table.values())
        assert tok.convert_tokens_to_ids("</s>") == 2 and tok.convert_tokens_to_ids("<unk>") == 0
        assert tok.convert_tokens_to_ids("<s>") == 1
        assert tok.get_command("<eos>") == 2 and tok.get_command("<pad>") == 0


def test_llama_factory_chatglm3_template_ids(tok3):
    """LLaMA-Factory's chatglm3 template: token slots through convert_tokens_to_ids, text through
    `encode(text, add_special_tokens=False)`: the same ids as build_chat_input."""
    ids = [tok3.convert_tokens_to_ids("[gMASK]"), tok3.convert_tokens_to_ids("sop")]
    ids += [tok3.convert_tokens_to_ids("<|user|>")] + tok3.encode("\n", add_special_tokens=False)
    ids += tok3.encode("你好", add_special_tokens=False) + [tok3.convert_tokens_to_ids("<|assistant|>")]
    assert ids == HELLO


# ------------------------------------------------------------------------------------------------- internals
def test_inner_tokenizer_attributes(tok3, tok2, glm3_dir):
    """chatglm.cpp's converter: `tokenizer.tokenizer.sp_model.serialized_model_proto()` and
    `"<|system|>" in tokenizer.tokenizer.special_tokens`; `index_special_tokens`; `vocab_file`."""
    import sentencepiece

    assert isinstance(tok3.tokenizer.sp_model, sentencepiece.SentencePieceProcessor)
    proto = tok3.tokenizer.sp_model.serialized_model_proto()
    assert proto == (glm3_dir / "tokenizer.model").read_bytes() or len(proto) > 100000
    assert tok3.tokenizer.special_tokens == GLM3_SPECIAL
    assert tok3.tokenizer.index_special_tokens == {v: k for k, v in GLM3_SPECIAL.items()}
    assert "<|system|>" in tok3.tokenizer.special_tokens
    assert "<|system|>" not in tok2.tokenizer.special_tokens  # how chatglm.cpp tells ChatGLM3 from ChatGLM2
    assert tok2.tokenizer.special_tokens == GLM2_SPECIAL
    with open(tok3.vocab_file, "rb") as f:
        assert f.read() == (glm3_dir / "tokenizer.model").read_bytes()
    assert tok3.tokenizer.sp_model.vocab_size() == 64789
    assert tok3.tokenizer.n_words == len(GLM3_SPECIAL) + 64789


def test_encode_special_tokens_init_kwarg(glm3_dir):
    """xinference: `AutoTokenizer.from_pretrained(dir, trust_remote_code=True, encode_special_tokens=True)`
    makes control strings in text become control ids."""
    tok = AutoTokenizer.from_pretrained(str(glm3_dir), trust_remote_code=True, encode_special_tokens=True)
    assert tok.encode_special_tokens is True
    ids = tok.encode("<|user|>\n你好<|assistant|>", add_special_tokens=False)
    assert ids[0] == 64795 and ids[-1] == 64796
    assert tok("<|observation|>", add_special_tokens=False)["input_ids"] == [64797]


def test_encode_special_tokens_attribute_after_loading(tok3):
    """ChatGLM3 demos set `tokenizer.encode_special_tokens = True` after loading; by default it is text."""
    plain = tok3.encode("<|user|>", add_special_tokens=False)
    assert 64795 not in plain
    tok3.encode_special_tokens = True
    assert tok3.encode("<|user|>", add_special_tokens=False) == [64795]
    tok3.encode_special_tokens = False
    assert tok3.encode("<|user|>", add_special_tokens=False) == plain


# ------------------------------------------------------------------------------------------------- encode / call / pad
def test_encode_with_keyword_text_truncation_and_max_length(tok2):
    """ChatGLM2 ptuning/main.py preprocess_function_train:
    `tokenizer.encode(text=prompt, add_special_tokens=True, truncation=True, max_length=max_source_length)` and
    `tokenizer.encode(text=answer, add_special_tokens=False, truncation=True, max_length=max_target_length)`."""
    prompt = tok2.build_prompt("请写一首很长很长的诗" * 10, [])
    a_ids = tok2.encode(text=prompt, add_special_tokens=True, truncation=True, max_length=16)
    b_ids = tok2.encode(text="好的" * 30, add_special_tokens=False, truncation=True, max_length=8)
    assert len(a_ids) == 16 and a_ids[:2] == [64790, 64792]
    assert len(b_ids) == 8 and 64790 not in b_ids
    full = tok2.encode(text=prompt, add_special_tokens=True)
    assert full[:2] == [64790, 64792] and len(full) > 16
    context_length = len(a_ids)
    input_ids = a_ids + b_ids + [tok2.eos_token_id]
    labels = [tok2.pad_token_id] * context_length + b_ids + [tok2.eos_token_id]
    pad_len = 32 - len(input_ids)
    input_ids = input_ids + [tok2.pad_token_id] * pad_len
    labels = [(lb if lb != tok2.pad_token_id else -100) for lb in labels + [tok2.pad_token_id] * pad_len]
    assert len(input_ids) == len(labels) == 32 and labels[:context_length] == [-100] * context_length


def test_call_with_text_target_and_padding(tok2):
    """ChatGLM2 ptuning/main.py preprocess_function_eval:
    `tokenizer(inputs, max_length=..., truncation=True, padding=True)` and
    `tokenizer(text_target=targets, max_length=..., truncation=True)`."""
    inputs = [tok2.build_prompt(q, []) for q in ("你好", "今天天气怎么样")]
    model_inputs = tok2(inputs, max_length=64, truncation=True, padding=True)
    labels = tok2(text_target=["你好！", "晴天"], max_length=8, truncation=True)
    widths = {len(r) for r in model_inputs["input_ids"]}
    assert len(widths) == 1
    first = model_inputs["input_ids"][0]
    assert first[0] == 0 and model_inputs["attention_mask"][0][0] == 0  # left padded
    assert [r[:2] for r in labels["input_ids"]] == [[64790, 64792]] * 2
    assert all(len(r) <= 8 for r in labels["input_ids"])


def test_padding_longest_returns_positions(tok3):
    """FastChat / README: `tokenizer([prompt, ...], return_tensors="pt", padding="longest")`: left padding with
    position_ids 0 on pads and 0..n-1 on tokens."""
    batch = tok3(["你好", "hello there, how are you"], return_tensors="pt", padding="longest")
    assert set(batch) >= {"input_ids", "attention_mask", "position_ids"}
    short = tok3("你好")["input_ids"]
    row = batch["input_ids"][0].tolist()
    pad = len(row) - len(short)
    assert pad > 0 and row == [0] * pad + short
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * len(short)
    assert batch["position_ids"][0].tolist() == [0] * pad + list(range(len(short)))
    assert batch["position_ids"][1].tolist() == list(range(batch["input_ids"].shape[1]))


def test_pad(tok3):
    """`tokenizer.pad(features, padding="longest")` as collators call it."""
    features = [{"input_ids": [64790, 64792, 5, 6]}, {"input_ids": [64790, 64792]}]
    out = tok3.pad(features, padding="longest", return_tensors="pt")
    assert out["input_ids"].tolist() == [[64790, 64792, 5, 6], [0, 0, 64790, 64792]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]


def test_data_collator_for_seq2seq(tok3):
    """ChatGLM3 finetune_hf.py: `DataCollatorForSeq2Seq(tokenizer=tokenizer, padding='longest',
    return_tensors='pt')`; labels padded with -100."""
    collator = DataCollatorForSeq2Seq(tokenizer=tok3, padding="longest", return_tensors="pt")
    features = [{"input_ids": [64790, 64792, 5, 6, 7], "labels": [-100, -100, 5, 6, 7]},
                {"input_ids": [64790, 64792, 5], "labels": [-100, -100, 5]}]
    batch = collator(features)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 5)
    assert batch["input_ids"][1].tolist() == [0, 0, 64790, 64792, 5]
    assert batch["attention_mask"][1].tolist() == [0, 0, 1, 1, 1]
    assert batch["labels"][1].tolist() == [-100, -100, -100, -100, 5]  # left, like the inputs


@pytest.mark.parametrize("side", ["right", "left"])
def test_base_class_pad_swapped_in_by_a_trainer(glm3_dir, side):
    """LLaMA-Factory's patch_tokenizer replaces `_pad` with `PreTrainedTokenizerBase._pad` (the official one broke
    on newer transformers) and loads with `padding_side="right"`: padding is still correct."""
    tok = AutoTokenizer.from_pretrained(str(glm3_dir), trust_remote_code=True, use_fast=True,
                                        split_special_tokens=False, padding_side=side)
    if "PreTrainedTokenizerBase" not in str(tok._pad.__func__):
        tok._pad = MethodType(PreTrainedTokenizerBase._pad, tok)
    assert tok.padding_side == side
    collator = DataCollatorForSeq2Seq(tokenizer=tok, padding=True, label_pad_token_id=-100,
                                      pad_to_multiple_of=8, return_tensors="pt")
    features = [{"input_ids": [64790, 64792, 5, 6, 7], "attention_mask": [1] * 5, "labels": [-100, -100, 5, 6, 7]},
                {"input_ids": [64790, 64792, 5], "attention_mask": [1] * 3, "labels": [-100, -100, 5]}]
    batch = collator(features)
    assert batch["input_ids"].shape == (2, 8)
    row = [64790, 64792, 5]
    expected = row + [0] * 5 if side == "right" else [0] * 5 + row
    assert batch["input_ids"][1].tolist() == expected
    assert batch["attention_mask"][1].tolist() == ([1] * 3 + [0] * 5 if side == "right" else [0] * 5 + [1] * 3)
    assert batch["labels"][1].tolist().count(-100) == 7


# ------------------------------------------------------------------------------------------------- decode
def test_decode_keeps_role_tokens_unless_skipped(tok3):
    """FastChat/openai_api_demo decode replies with `tokenizer.decode(ids)` and look for `<|observation|>`;
    `skip_special_tokens=True` drops the control tokens."""
    ids = tok3.build_chat_input("你好")["input_ids"][0].tolist() + [64797]
    text = tok3.decode(ids)
    assert "<|user|>" in text and "<|assistant|>" in text and text.endswith("<|observation|>")
    skipped = tok3.decode(ids, skip_special_tokens=True)
    assert "<|" not in skipped and "[gMASK]" not in skipped and "你好" in skipped
    batch = tok3.batch_decode([ids, ids[:4]])
    assert batch[0] == text and "<|user|>" in batch[1]
    assert tok3.batch_decode(torch.tensor([ids]), skip_special_tokens=True) == [skipped]


def test_add_special_tokens_adds_no_ids(tok3):
    """LLaMA-Factory registers the stop words:
    `add_special_tokens({"additional_special_tokens": ["<|user|>", "<|observation|>"]},
    replace_additional_special_tokens=False)`: no new ids (no vocabulary resize), same ids as before."""
    size = len(tok3)
    vocab = tok3.get_vocab()
    added = tok3.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|observation|>"]},
                                    replace_additional_special_tokens=False)
    assert added == 0
    assert len(tok3) == size and tok3.get_vocab() == vocab
    assert tok3.convert_tokens_to_ids(["<|user|>", "<|observation|>"]) == [64795, 64797]
    assert tok3.eos_token_id == 2 and tok3.pad_token_id == 0
    assert tok3.build_chat_input("你好")["input_ids"][0].tolist() == HELLO
    assert len(tok3) <= 65024  # no embedding resize needed (padded_vocab_size)


def test_eos_and_pad_ids(tok3, tok2):
    for tok in (tok3, tok2):
        assert tok.eos_token_id == 2 and tok.pad_token_id == 0
        assert tok.eos_token == "</s>"
    assert tok3.padding_side == "left"


def test_save_pretrained_and_reload(tok3, tmp_path):
    """LLaMA-Factory export / Trainer checkpoints save the tokenizer; the saved folder loads again with
    trust_remote_code and encodes the same."""
    tok3.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.model").exists()
    again = AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert again.build_chat_input("你好")["input_ids"][0].tolist() == HELLO
    assert again.encode("hello") == tok3.encode("hello")
