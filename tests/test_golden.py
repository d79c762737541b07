"""Replays every model case of ../shared/golden (official outputs on tiny random models), float32, rel. tol 1e-4."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import GOLDEN, copy_code, require_shared

safetensors_torch = pytest.importorskip("safetensors.torch")

VARIANTS = ["chatglm2-6b", "chatglm2-6b-32k", "chatglm3-6b", "chatglm3-6b-128k"]
RTOL = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, where: str, mask: torch.Tensor | None = None) -> None:
    """|a - b| <= 1e-4 * max|b| over the compared entries (the golden README's acceptance rule)."""
    actual, expected = actual.detach().float(), expected.float()
    assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if mask is not None:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= RTOL * scale, f"{where}: max |diff| {err:.3e} > {RTOL} * {scale:.3e}"


def variant_dir(variant: str) -> Path:
    return require_shared(GOLDEN / variant)


def load_tensors(variant: str, name: str) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(variant_dir(variant) / name))


def build(variant: str, kind: str = "base"):
    """Our model for a golden model kind ('base', 'prefix', 'prefix_proj', 'classify'), loaded strictly."""
    from chatglm.configuration_chatglm import ChatGLMConfig
    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration, ChatGLMForSequenceClassification

    folder = variant_dir(variant)
    config_name = {"base": "config.json"}.get(kind, f"{kind}_config.json")
    config = ChatGLMConfig.from_pretrained(str(folder / config_name))
    if kind == "classify":
        model = ChatGLMForSequenceClassification(config)
        state = load_tensors(variant, "classify_model.safetensors")
    else:
        model = ChatGLMForConditionalGeneration(config)
        state = load_tensors(variant, "model.safetensors")
        if kind != "base":
            state.update(load_tensors(variant, f"{kind}_model.safetensors"))
    state.pop("transformer.rotary_pos_emb.inv_freq")
    model.load_state_dict(state, strict=True)
    return model.float().eval()


@pytest.fixture(scope="module", params=VARIANTS)
def golden(request):
    variant = request.param
    cases = load_tensors(variant, "cases.safetensors")
    meta = json.loads((variant_dir(variant) / "cases.json").read_text())
    return variant, build(variant), cases, meta


@torch.no_grad()
def test_forward_and_hidden_states(golden):
    variant, model, T, _ = golden
    out = model(input_ids=T["forward.input_ids"], output_hidden_states=True)
    assert_close(out.logits, T["forward.logits"], f"{variant} forward.logits")
    assert_close(torch.stack(out.hidden_states), T["forward.hidden_states"], f"{variant} forward.hidden_states")


@torch.no_grad()
def test_padded(golden):
    variant, model, T, _ = golden
    out = model(input_ids=T["padded.input_ids"], attention_mask=T["padded.attention_mask"],
                position_ids=T["padded.position_ids"])
    assert_close(out.logits, T["padded.logits"], f"{variant} padded", mask=T["padded.attention_mask"])


@torch.no_grad()
def test_padded_positions_derived_from_mask(golden):
    """Without position_ids the model derives the tokenizer's positions from the mask."""
    variant, model, T, _ = golden
    out = model(input_ids=T["padded.input_ids"], attention_mask=T["padded.attention_mask"])
    assert_close(out.logits, T["padded.logits"], f"{variant} padded (derived positions)",
                 mask=T["padded.attention_mask"])


@torch.no_grad()
@pytest.mark.parametrize("case", ["decode", "padded_decode"])
def test_cached_decode(golden, case):
    variant, model, T, _ = golden
    kwargs = {k: T[f"{case}.prefill.{k}"] for k in ("input_ids", "attention_mask", "position_ids")
              if f"{case}.prefill.{k}" in T}
    out = model(**kwargs, use_cache=True)
    mask = T.get(f"{case}.prefill.attention_mask")
    assert_close(out.logits, T[f"{case}.prefill.logits"], f"{variant} {case} prefill", mask=mask)
    past = out.past_key_values
    for step in range(3):
        kwargs = {k: T[f"{case}.step{step}.{k}"] for k in ("input_ids", "attention_mask", "position_ids")
                  if f"{case}.step{step}.{k}" in T}
        out = model(**kwargs, past_key_values=past, use_cache=True)
        assert_close(out.logits, T[f"{case}.step{step}.logits"], f"{variant} {case} step{step}")
        past = out.past_key_values


@torch.no_grad()
def test_generate(golden):
    variant, model, T, _ = golden
    out = model.generate(input_ids=T["generate.input_ids"], attention_mask=T["generate.attention_mask"],
                         position_ids=T["generate.position_ids"], max_new_tokens=8, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, eos_token_id=2, pad_token_id=0)
    assert torch.equal(out.sequences, T["generate.sequences"]), f"{variant} generate: tokens differ"
    assert_close(torch.stack(out.scores), T["generate.scores"], f"{variant} generate.scores")


@torch.no_grad()
def test_generate_without_position_ids(golden):
    """generate(**tokenizer_output) style minus position_ids: derived from the mask, same tokens."""
    variant, model, T, _ = golden
    out = model.generate(input_ids=T["generate.input_ids"], attention_mask=T["generate.attention_mask"],
                         max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert torch.equal(out, T["generate.sequences"]), f"{variant} generate (derived positions): tokens differ"


@torch.no_grad()
def test_long_positions(golden):
    variant, model, T, _ = golden
    out = model(input_ids=T["long_positions.input_ids"], position_ids=T["long_positions.position_ids"])
    assert_close(out.logits, T["long_positions.logits"], f"{variant} long_positions")


@torch.no_grad()
def test_loss(golden):
    variant, model, T, _ = golden
    out = model(input_ids=T["loss.input_ids"], labels=T["loss.labels"])
    assert_close(out.loss, T["loss.loss"], f"{variant} loss")
    assert_close(out.logits, T["loss.logits"], f"{variant} loss.logits")


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["prefix", "prefix_proj"])
def test_prefix(variant, kind):
    T = load_tensors(variant, "cases.safetensors")
    model = build(variant, kind)
    out = model(input_ids=T["prefix.input_ids"], attention_mask=T["prefix.attention_mask"])
    assert_close(out.logits, T[f"{kind}.logits"], f"{variant} {kind}")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_classify(variant):
    T = load_tensors(variant, "cases.safetensors")
    if "classify.logits" not in T:
        pytest.skip(f"{variant}: the official code has no sequence classifier, so there is no golden case")
    model = build(variant, "classify")
    kwargs = {k: T[f"classify.{k}"] for k in ("input_ids", "attention_mask", "position_ids")}
    out = model(**kwargs)
    assert_close(out.logits, T["classify.logits"], f"{variant} classify.logits")
    out = model(**kwargs, labels=T["classify.labels"])
    assert_close(out.loss, T["classify.loss"], f"{variant} classify.loss")


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_remote_code_from_pretrained(variant, tmp_path):
    """The public path: a folder with our code, the official (tiny) config.json unchanged and the weights."""
    from transformers import AutoModel

    copy_code(tmp_path)
    shutil.copy(variant_dir(variant) / "config.json", tmp_path / "config.json")
    shutil.copy(variant_dir(variant) / "model.safetensors", tmp_path / "model.safetensors")
    model = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True).float().eval()
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    T = load_tensors(variant, "cases.safetensors")
    out = model(input_ids=T["long_positions.input_ids"], position_ids=T["long_positions.position_ids"])
    assert_close(out.logits, T["long_positions.logits"], f"{variant} remote-code long_positions")
    out = model(input_ids=T["forward.input_ids"])
    assert_close(out.logits, T["forward.logits"], f"{variant} remote-code forward")
