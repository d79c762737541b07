"""tools/finetune.py and tools/cli_demo.py: what the loss covers, the data formats, and training runs on a tiny
model folder (LoRA, P-tuning v2, all weights) whose results load back for chat.

The label tests check the training text against what `chat()` builds (`build_chat_input`), so a fine-tuned model
learns exactly the layout it is later prompted with. They run with the tiny sentencepiece model always and with the
real tokenizer.model when ../shared is present."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from compat_util import skip_without
from conftest import TOKENIZER_MODEL, require_shared
from test_tokenizer import tiny_model_file  # noqa: F401  (fixture)
from chatglm.tokenization_chatglm import ChatGLMTokenizer

import cli_demo
import finetune
from finetune import IGNORE, build_examples, chatglm2_examples, chatglm3_example, read_conversations
from make_tiny_model import make_tiny_model

TOOLS = [{"name": "get_weather", "description": "weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant.", "tools": TOOLS},
    {"role": "user", "content": "Weather in Beijing?"},
    {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='Beijing')"},
    {"role": "observation", "content": '{"temperature": 12}'},
    {"role": "assistant", "content": "It is 12 degrees in Beijing."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome.", "loss": False},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye!"},
]
MEMORIZE = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello world"},
            {"role": "assistant", "content": "The quick brown fox."}]


@pytest.fixture(params=["tiny", "real"])
def model_file(request, tiny_model_file) -> Path:  # noqa: F811
    return tiny_model_file if request.param == "tiny" else require_shared(TOKENIZER_MODEL)


def learned_spans(labels: List[int]) -> List[tuple]:
    """[start, end) runs of positions whose label is not IGNORE."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


# ------------------------------------------------------------------------------------------------ labels
def test_chatglm3_example_learns_each_reply_and_the_token_that_ends_it(model_file):
    tok = ChatGLMTokenizer(vocab_file=str(model_file), chat_format="chatglm3")
    example = chatglm3_example(tok, TOOL_CONVERSATION)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    expected = []
    for k, message in enumerate(TOOL_CONVERSATION):
        if message["role"] != "assistant" or not message.get("loss", True):
            continue
        before = TOOL_CONVERSATION[k - 1]
        prompt = tok.build_chat_input(before["content"], TOOL_CONVERSATION[:k - 1], role=before["role"])
        prompt = prompt["input_ids"][0].tolist()
        assert ids[:len(prompt)] == prompt, f"the text before reply {k} is not what chat() would send"
        reply = (tok.encode(message.get("metadata", "") + "\n", add_special_tokens=False)
                 + tok.encode(message["content"], add_special_tokens=False))
        assert ids[len(prompt):len(prompt) + len(reply)] == reply
        ender = (tok.get_command(f"<|{TOOL_CONVERSATION[k + 1]['role']}|>") if k + 1 < len(TOOL_CONVERSATION)
                 else tok.eos_token_id)
        assert ids[len(prompt) + len(reply)] == ender
        expected.append((len(prompt), len(prompt) + len(reply) + 1))
    assert learned_spans(labels) == expected  # the reply marked "loss": false is not among them
    assert all(labels[i] == ids[i] for start, end in expected for i in range(start, end))
    assert ids[-1] == tok.eos_token_id


def test_chatglm2_examples_are_chat_prompts_then_reply_and_eos(model_file):
    tok = ChatGLMTokenizer(vocab_file=str(model_file), chat_format="chatglm2")
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "今天天气很好"}, {"role": "assistant", "content": "我们去公园散步吧。"}]
    examples = chatglm2_examples(tok, messages)
    assert len(examples) == 2
    for example, k in zip(examples, (1, 3)):
        history = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, k - 1, 2)]
        prompt = tok.build_chat_input(messages[k - 1]["content"], history)["input_ids"][0].tolist()
        reply = tok.encode(messages[k]["content"], add_special_tokens=False) + [tok.eos_token_id]
        assert example["input_ids"] == prompt + reply
        assert example["labels"] == [IGNORE] * len(prompt) + reply
    with pytest.raises(ValueError, match="alternate user and assistant"):
        chatglm2_examples(tok, TOOL_CONVERSATION)


def test_examples_are_cut_to_max_length_and_dropped_without_labels(tiny_model_file):  # noqa: F811
    tok = ChatGLMTokenizer(vocab_file=str(tiny_model_file), chat_format="chatglm3")
    full = chatglm3_example(tok, MEMORIZE)
    first_label = learned_spans(full["labels"])[0][0]
    kept, cut = build_examples(tok, [MEMORIZE], max_length=first_label + 2)
    assert cut == 1 and kept[0]["input_ids"] == full["input_ids"][:first_label + 2]
    assert kept[0]["labels"] == full["labels"][:first_label + 2]
    dropped, cut = build_examples(tok, [MEMORIZE], max_length=first_label)
    assert (dropped, cut) == ([], 1)


def test_read_conversations_takes_both_record_forms_and_names_bad_lines(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([
        json.dumps({"conversations": MEMORIZE}),
        json.dumps({"messages": MEMORIZE[1:]}),
        "",
        json.dumps({"prompt": "q2", "response": "r2", "history": [["q1", "r1"]]}, ensure_ascii=False),
    ]), encoding="utf-8")
    conversations = read_conversations(data)
    assert conversations[0] == MEMORIZE and conversations[1] == MEMORIZE[1:]
    assert conversations[2] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"},
                                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "r2"}]
    for line, message in [("{not json", "2: not JSON"),
                          (json.dumps({"conversations": MEMORIZE[:2]}), "2: the conversation has no assistant"),
                          (json.dumps({"text": "hello"}), "2: expected"),
                          (json.dumps(["a"]), "2: each line must be a JSON object")]:
        data.write_text(json.dumps({"conversations": MEMORIZE}) + "\n" + line, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            read_conversations(data)


def test_unknown_role_is_a_value_error(tiny_model_file):  # noqa: F811
    tok = ChatGLMTokenizer(vocab_file=str(tiny_model_file), chat_format="chatglm3")
    with pytest.raises(ValueError, match="role"):
        chatglm3_example(tok, [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}])


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Dict[str, Path]:
    """A tiny random model folder (its own tiny tokenizer) and a data file of one conversation to memorize."""
    root = tmp_path_factory.mktemp("finetune")
    model = make_tiny_model(root / "model", root / "no-tokenizer.model")
    data = root / "data.jsonl"
    data.write_text(json.dumps({"conversations": MEMORIZE}) + "\n", encoding="utf-8")
    return {"root": root, "model": model, "data": data}


def run(folder: Dict[str, Path], name: str, *extra: str) -> tuple:
    out = folder["root"] / name
    args = finetune.parse_args(["--model", str(folder["model"]), "--data", str(folder["data"]), "--out", str(out),
                                "--logging-steps", "5", "--scheduler", "constant", "--dtype", "float32", *extra])
    model, summary = finetune.train(args)
    return model.eval(), summary, out


def logits(model, tok) -> torch.Tensor:
    """Logits of a chat prompt, on the CPU (Trainer leaves a trained model on the GPU where there is one)."""
    inputs = tok.build_chat_input("Hello world").to(model.device)
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits.float().cpu()


def base(folder):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder["model"]), trust_remote_code=True)
    return AutoModel.from_pretrained(str(folder["model"]), trust_remote_code=True).eval(), tok


def test_full_finetune_memorizes_the_reply_and_reloads(folder):
    trained, summary, out = run(folder, "full", "--method", "full", "--lr", "1e-2", "--max-steps", "60")
    assert summary["logged_losses"][-1] < 0.1 * summary["logged_losses"][0]
    model, tok = finetune.load_finetuned(str(folder["model"]), str(out))
    reply, _ = model.chat(tok, "Hello world", history=MEMORIZE[:1], do_sample=False)
    assert reply == MEMORIZE[-1]["content"]
    base_model, _ = base(folder)
    assert base_model.chat(tok, "Hello world", history=MEMORIZE[:1], do_sample=False)[0] != reply


def test_lora_trains_saves_and_merges(folder):
    skip_without("peft")
    trained, summary, out = run(folder, "lora", "--method", "lora", "--lr", "1e-2", "--max-steps", "20",
                                "--lora-targets", "all", "--lora-dropout", "0", "--merge")
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert summary["logged_losses"][-1] < summary["logged_losses"][0]
    base_model, tok = base(folder)
    expected = logits(trained, tok)
    assert (expected - logits(base_model, tok)).abs().max() > 1e-3  # the adapter changed the model
    model, tok = finetune.load_finetuned(str(folder["model"]), str(out))
    assert not any("lora_" in n for n, _ in model.named_parameters())  # merged into the weights
    torch.testing.assert_close(logits(model, tok), expected, rtol=1e-4, atol=1e-4)
    from transformers import AutoModel

    merged = AutoModel.from_pretrained(str(out / "merged"), trust_remote_code=True).eval()
    torch.testing.assert_close(logits(merged, tok), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantization", [[], ["--quantization-bit", "8"]], ids=["float", "int8"])
def test_ptuning_trains_only_the_prefix_and_reloads(folder, quantization):
    name = "ptuning" + "".join(quantization[1:])
    trained, summary, out = run(folder, name, "--method", "ptuning", "--pre-seq-len", "4", "--lr", "5e-2",
                                "--max-steps", "20", "--gradient-checkpointing", *quantization)
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert names == ["transformer.prefix_encoder.embedding.weight"]
    assert summary["logged_losses"][-1] < summary["logged_losses"][0]
    assert sorted(p.name for p in out.iterdir()) == [finetune.ARGS_FILE, finetune.PREFIX_FILE]
    model, tok = finetune.load_finetuned(str(folder["model"]), str(out))
    if quantization:
        model = model.quantize(8)
    torch.testing.assert_close(logits(model, tok), logits(trained, tok), rtol=1e-4, atol=1e-4)


def test_gradient_accumulation_equals_the_larger_batch(folder, tmp_path):
    """Two conversations with equally many labelled tokens: one batch of 2, or 2 accumulated batches of 1, is the
    same optimizer step, so the logged losses and the trained weights agree. Trainer ≥ 4.49 passes the model a token
    count and leaves the scaling to it; a loss that ignored the count was logged (and back-propagated) twice over."""
    data = tmp_path / "two.jsonl"
    second = [MEMORIZE[0], {"role": "user", "content": "a longer question about the lazy dog, please"}, MEMORIZE[2]]
    data.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in (MEMORIZE, second)), encoding="utf-8")
    runs = {}
    for name, shape in {"batch": ["--batch-size", "2"], "accumulated": ["--grad-accum", "2"]}.items():
        runs[name] = run({**folder, "data": data}, name, "--method", "full", "--lr", "1e-2", "--max-steps", "3",
                         "--logging-steps", "1", *shape)
    (batch, batch_summary, _), (accumulated, accumulated_summary, _) = runs["batch"], runs["accumulated"]
    assert len(batch_summary["logged_losses"]) == 3
    torch.testing.assert_close(torch.tensor(accumulated_summary["logged_losses"]),
                               torch.tensor(batch_summary["logged_losses"]), rtol=1e-4, atol=1e-5)
    _, tok = base(folder)  # logits, not weights: Adam turns the rounding noise of the key bias's zero gradient into steps
    torch.testing.assert_close(logits(accumulated, tok), logits(batch, tok), rtol=1e-3, atol=1e-4)


def test_method_errors_name_the_fix(folder, tmp_path):
    with pytest.raises(ValueError, match="--method ptuning"):
        run(folder, "bad", "--method", "lora", "--quantization-bit", "4")
    with pytest.raises(ValueError, match="use --method full"):
        run(folder, "bad", "--method", "lora", "--fsdp")
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N"):  # one process, and no GPUs on CI
        run(folder, "bad", "--method", "full", "--fsdp")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="finetune_args.json is missing"):
        finetune.load_finetuned(str(folder["model"]), str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------- cli demo
def test_cli_demo_streams_replies_and_clears(folder):
    model, tok = base(folder)
    lines = io.StringIO("Hello world\nmore please\nclear\nHello world\nstop\nnever read\n")
    out = io.StringIO()
    replies = cli_demo.converse(model, tok, lines, out, system=MEMORIZE[0]["content"], do_sample=False,
                                max_new_tokens=6)
    assert replies == 3
    history = MEMORIZE[:1]
    first, history = model.chat(tok, "Hello world", history=history, do_sample=False, max_new_tokens=6)
    second, _ = model.chat(tok, "more please", history=history, do_sample=False, max_new_tokens=6)
    shown = out.getvalue().split("ChatGLM: ")[1:]
    assert [s.split("\n")[0] for s in shown] == [first, second, first]
    assert "(new conversation)" in out.getvalue()


def test_cli_demo_main_loads_a_finetuned_result(folder):
    out = folder["root"] / "full"
    if not (out / finetune.ARGS_FILE).exists():
        run(folder, "full", "--method", "full", "--lr", "1e-2", "--max-steps", "60")
    text = io.StringIO()
    replies = cli_demo.main(["--model", str(folder["model"]), "--finetuned", str(out), "--greedy",
                             "--system", MEMORIZE[0]["content"]], lines=io.StringIO("Hello world\n"), out=text)
    assert replies == 1
    assert f"ChatGLM: {MEMORIZE[-1]['content']}\n" in text.getvalue()
