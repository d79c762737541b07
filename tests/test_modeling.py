"""Model behaviour beyond the golden cases: batching, caches, generation modes, training, loading, errors."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, tiny_model

from chatglm.compat_chatglm import as_cache, cache_layer, cache_length, crop_cache, new_dynamic_cache
from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

PROMPT_LENGTHS = (3, 7, 11)


def random_prompts(seed: int = 1, lengths=PROMPT_LENGTHS, vocab: int = 512) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (n,), generator=g) for n in lengths]


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def new_tokens(sequences: torch.Tensor, prompt_width: int) -> list[list[int]]:
    return [row[prompt_width:].tolist() for row in sequences]


@pytest.fixture(scope="module")
def model64():
    """Float64 tiny model: batched and single runs then differ by ~1e-15, so greedy ties cannot flip."""
    return tiny_model(seed=3).double()


GENERATION_MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(do_sample=False, num_beams=3),
    "sampling_top_k_1": dict(do_sample=True, top_k=1, temperature=0.7),
}


@pytest.mark.parametrize("mode", sorted(GENERATION_MODES))
@torch.no_grad()
def test_left_padded_batch_equals_single_prompts(model64, mode):
    prompts = random_prompts()
    kwargs = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0, **GENERATION_MODES[mode])
    ids, mask = left_pad(prompts)
    batched = new_tokens(model64.generate(input_ids=ids, attention_mask=mask, **kwargs), ids.shape[1])
    for row, prompt in zip(batched, prompts):
        alone = model64.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 **kwargs)
        assert row == new_tokens(alone, len(prompt))[0], f"{mode}: batched row differs from the prompt alone"


@torch.no_grad()
def test_use_cache_false_generates_the_same(model64):
    ids, mask = left_pad(random_prompts(seed=2))
    cached = model64.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    uncached = model64.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                eos_token_id=None, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_forward_padding_either_side_matches_unpadded(model64):
    """Left- and right-padded rows give the unpadded logits at their real tokens."""
    prompts = random_prompts(seed=4)
    width = max(len(p) for p in prompts)
    for side in ("left", "right"):
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
            ids[i, cols], mask[i, cols] = p, 1
        logits = model64(input_ids=ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            alone = model64(input_ids=p[None]).logits[0]
            torch.testing.assert_close(logits[i][mask[i].bool()], alone, rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_eager_and_sdpa_agree():
    model = tiny_model(seed=5)
    ids, mask = left_pad(random_prompts(seed=5))
    results = {}
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                     past_key_values=out.past_key_values)
        results[impl] = (out.logits[mask.bool()], step.logits)
    torch.testing.assert_close(results["eager"], results["sdpa"], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_legacy_tuple_cache_is_accepted(model64):
    ids = random_prompts(seed=6, lengths=(8,))[0][None]
    out = model64(input_ids=ids[:, :-1], use_cache=True)
    legacy = tuple((layer.keys, layer.values) if hasattr(layer, "keys") else tuple(layer)[:2]
                   for layer in getattr(out.past_key_values, "layers", out.past_key_values))
    with_legacy = model64(input_ids=ids[:, -1:], past_key_values=legacy).logits
    with_object = model64(input_ids=ids[:, -1:], past_key_values=out.past_key_values).logits
    full = model64(input_ids=ids).logits[:, -1:]
    torch.testing.assert_close(with_legacy, full)
    torch.testing.assert_close(with_object, full)
    assert as_cache(legacy).get_seq_length() == 7


@torch.no_grad()
def test_cache_continues_into_the_next_turn(model64):
    """A cache returned by generate() continues a conversation: same tokens as recomputing from scratch."""
    turn1 = random_prompts(seed=7, lengths=(6,))[0][None]
    cache = new_dynamic_cache()  # a caller-owned cache is filled in place on every transformers version
    sequences = model64.generate(input_ids=turn1, past_key_values=cache, max_new_tokens=4, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    assert cache.get_seq_length() == sequences.shape[1] - 1  # everything but the last generated token
    turn2 = torch.cat([sequences, random_prompts(seed=8, lengths=(3,))[0][None]], dim=1)
    mask = torch.ones_like(turn2)  # explicit: a generated id 0 (the pad id) must not be taken for padding
    continued = model64.generate(input_ids=turn2, attention_mask=mask, past_key_values=cache, max_new_tokens=4,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
    scratch = model64.generate(input_ids=turn2, attention_mask=mask, max_new_tokens=4, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert torch.equal(continued, scratch)


def prompt_in_pieces(model, ids: torch.Tensor, ends: tuple, cache_kind: str) -> list[torch.Tensor]:
    """Feed ids [1, n] into one cache ("dynamic", or our preallocated "static" one) in pieces ending at `ends`
    → [logits of every position] + every layer's keys and values for the n positions."""
    from chatglm.decoding_chatglm import StaticKVCache

    config, static, n = model.config, cache_kind == "static", ids.shape[1]
    cache = StaticKVCache(config.num_layers, 1, config.num_key_value_heads, config.kv_channels, n + 10,
                          next(model.parameters()).dtype, ids.device) if static else new_dynamic_cache()
    logits, start = [], 0
    for end in ends:
        logits.append(model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True).logits)
        if static:
            cache.length = end  # its filled length is the caller's to keep
        start = end
    layers = [(cache.keys[i], cache.values[i]) if static else cache_layer(cache, i) for i in range(config.num_layers)]
    return [torch.cat(logits, 1)] + [t[:, :, :n] for pair in layers for t in pair]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@torch.no_grad()
def test_prompt_in_pieces_equals_one_forward(cache_kind, attn):
    """New tokens after a cache (a chunked prefill, the next turn of a chat) see the cache and, causally, each
    other: the same logits and cache as one forward over the whole prompt, with either cache kind."""
    model64 = tiny_model(seed=3).double()
    model64.config._attn_implementation = attn
    ids = random_prompts(seed=40, lengths=(20,))[0][None]
    full = model64(input_ids=ids, use_cache=True)
    want = [full.logits] + [t for layer in range(model64.config.num_layers)
                            for t in cache_layer(full.past_key_values, layer)]
    tolerance = dict(rtol=1e-5, atol=1e-5) if attn == "eager" else {}  # eager's scores are float32
    for got, expected in zip(prompt_in_pieces(model64, ids, (7, 8, 20), cache_kind), want, strict=True):
        torch.testing.assert_close(got, expected, **tolerance)


@torch.no_grad()
@pytest.mark.parametrize("beams", [1, 2])
def test_static_cache_generate_matches_dynamic(model64, beams):
    """On every version: transformers' static cache (>= 4.42), or where it builds none our decode loop's (greedy)
    or a growing cache (beams)."""
    ids, mask = left_pad(random_prompts(seed=9))
    kwargs = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0, num_beams=beams)
    dynamic = model64.generate(input_ids=ids, attention_mask=mask, **kwargs)
    static = model64.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic, static)


def test_gradient_checkpointing_matches_and_training_lowers_loss():
    torch.manual_seed(0)
    model = tiny_model(seed=10).train()
    ids = torch.randint(10, 512, (4, 12))
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.gradient_checkpointing_enable()
    assert model.transformer.encoder.gradient_checkpointing
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for a, b in zip(plain, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.1, f"loss did not go down: {losses}"


@torch.no_grad()
def test_loss_is_the_token_mean_or_the_sum_over_num_items_in_batch(model64):
    """The loss is cross-entropy of each position's logits against the next label (-100 skipped): their mean, or,
    with Trainer's `num_items_in_batch` (the labelled tokens of a whole optimizer step), their sum over it."""
    ids = torch.randint(10, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model64(input_ids=ids, labels=labels)
    log_probs = torch.log_softmax(out.logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    kept = targets != -100
    per_token = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[kept]
    torch.testing.assert_close(out.loss.double(), per_token.mean(), rtol=1e-5, atol=1e-6)
    for count in (40, torch.tensor(40)):
        loss = model64(input_ids=ids, labels=labels, num_items_in_batch=count).loss
        torch.testing.assert_close(loss.double(), per_token.sum() / 40, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["safetensors", "bin_shards"])
def test_save_and_load_round_trip(tmp_path, fmt):
    from transformers import AutoModel

    from conftest import copy_code

    model = tiny_model(seed=11)
    ids, mask = left_pad(random_prompts(seed=11))
    expected = model(input_ids=ids, attention_mask=mask).logits
    if fmt == "safetensors":
        model.save_pretrained(str(tmp_path))
    else:  # the official layout: pytorch_model-0000N-of-0000M.bin + index, with the rotary inv_freq buffer
        model.config.save_pretrained(str(tmp_path))
        state = model.state_dict()
        state["transformer.rotary_pos_emb.inv_freq"] = torch.ones(4)
        names = sorted(state)
        shards = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for i, keys in enumerate(shards, 1):
            file = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
            torch.save({k: state[k].clone() for k in keys}, tmp_path / file)
            weight_map.update({k: file for k in keys})
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    copy_code(tmp_path)
    loaded = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


# ----- errors at the edge -----
def test_too_long_input_names_both_numbers():
    model = tiny_model(seq_length=16)
    with pytest.raises(ValueError, match=r"20 tokens.*seq_length 16"):
        model(input_ids=torch.randint(10, 512, (1, 20)))


def test_generation_past_seq_length_is_a_clear_error():
    model = tiny_model(seq_length=16)
    with pytest.raises(ValueError, match="seq_length 16"):
        model.generate(input_ids=torch.randint(10, 512, (1, 12)), max_new_tokens=10, do_sample=False,
                       eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("bad", [-1, 512, 70000])
def test_out_of_vocabulary_ids(bad):
    model = tiny_model()
    ids = torch.tensor([[5, 6, bad]])
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        model(input_ids=ids)


def test_right_padded_generation_is_refused():
    model = tiny_model()
    ids = torch.tensor([[11, 12, 13], [11, 12, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="padding_side='left'"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)


def test_mask_length_mismatch_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="attention_mask has 3 columns"):
        model(input_ids=torch.tensor([[11, 12, 13, 14]]), attention_mask=torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize("overrides, message", [
    (dict(num_attention_heads=3), "divisible by multi_query_group_num"),
    (dict(rope_ratio_mode="ntk"), "rope_ratio_mode"),
    (dict(quantization_bit=3), "quantization_bit"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_inconsistent_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_rope_ratio_mode_of_official_configs():
    """Official configs do not say how rope_ratio applies: chatglm2-6b-32k divides positions, ChatGLM3 scales base."""
    v2 = tiny_config(rope_ratio=16, _name_or_path="THUDM/chatglm2-6b-32k")
    v3 = tiny_config(rope_ratio=500, _name_or_path="THUDM/chatglm3-6b-128k")
    assert (v2.rope_position_scale, v2.rope_base) == (16.0, 10000.0)
    assert (v3.rope_position_scale, v3.rope_base) == (1.0, 5_000_000.0)
    explicit = tiny_config(rope_ratio=16, rope_ratio_mode="scale_base", _name_or_path="THUDM/chatglm2-6b-32k")
    assert explicit.rope_base == 160000.0


def test_standard_aliases():
    config = tiny_config()
    assert (config.num_hidden_layers, config.num_key_value_heads, config.max_position_embeddings,
            config.vocab_size, config.head_dim) == (2, 2, 256, 512, 16)


def test_module_paths_downstream_tools_use():
    model = tiny_model()
    names = dict(model.named_modules())
    for path in ("transformer.embedding.word_embeddings", "transformer.rotary_pos_emb",
                 "transformer.encoder.layers.0.self_attention.query_key_value", "transformer.encoder.final_layernorm",
                 "transformer.output_layer"):
        assert path in names, path
    assert type(names["transformer.encoder.layers.1"]).__name__ == "GLMBlock"
    assert isinstance(model, ChatGLMForConditionalGeneration)


@torch.no_grad()
def test_long_input_chunked_path_matches(monkeypatch, model64):
    """Inputs longer than PREFILL_CHUNK take the chunked block path: same logits and cache as the plain path."""
    import chatglm.modeling_chatglm as modeling

    ids, mask = left_pad(random_prompts(seed=12, lengths=(5, 13)))
    plain = model64(input_ids=ids, attention_mask=mask, use_cache=True)
    monkeypatch.setattr(modeling, "PREFILL_CHUNK", 4)
    chunked = model64(input_ids=ids, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(chunked.logits, plain.logits, rtol=1e-12, atol=1e-12)
    step = torch.tensor([[17], [23]])
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    torch.testing.assert_close(model64(input_ids=step, attention_mask=step_mask, past_key_values=chunked.past_key_values).logits,
                               model64(input_ids=step, attention_mask=step_mask, past_key_values=plain.past_key_values).logits)


@pytest.mark.parametrize("flag", [dict(return_last_logit=True), dict(logits_to_keep=1)],
                         ids=["return_last_logit", "logits_to_keep"])
@pytest.mark.parametrize("chunk", [None, 4], ids=["plain", "chunked"])
@torch.no_grad()
def test_last_logit_prefill_computes_the_last_layer_for_the_last_position_only(monkeypatch, model64, chunk, flag):
    """return_last_logit (what generate's prefill asks; logits_to_keep=1 in transformers' terms) runs the last layer
    on the last position only: the same last logits and the same cache (every layer's keys and values) as the full
    forward, left padding included."""
    import chatglm.modeling_chatglm as modeling

    if chunk:
        monkeypatch.setattr(modeling, "PREFILL_CHUNK", chunk)
    ids, mask = left_pad(random_prompts(seed=14, lengths=(6, 11)))
    full = model64(input_ids=ids, attention_mask=mask, use_cache=True)
    calls = []
    last = model64.transformer.encoder.layers[-1]
    monkeypatch.setattr(last.mlp, "forward", lambda x, f=last.mlp.forward: calls.append(x.shape[1]) or f(x))
    fast = model64(input_ids=ids, attention_mask=mask, use_cache=True, **flag)
    assert calls == [1], "the last layer's MLP should see one position"
    assert fast.logits.shape == (2, 1, full.logits.shape[-1])
    torch.testing.assert_close(fast.logits[:, 0], full.logits[:, -1], rtol=1e-10, atol=1e-10)
    for layer in range(model64.config.num_layers):
        for got, want in zip(cache_layer(fast.past_key_values, layer), cache_layer(full.past_key_values, layer)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@torch.no_grad()
def test_saved_folder_carries_the_code(tmp_path):
    """save_pretrained writes the remote-code modules too (transformers 4.30 only does for registered classes), so
    the folder loads with trust_remote_code and nothing else, and the auto_map keeps every entry."""
    from transformers import AutoModel

    model = tiny_model(seed=13)
    model.save_pretrained(str(tmp_path))
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "compat_chatglm.py", "decoding_chatglm.py",
                 "quantization.py", "chat_chatglm.py", "chat_format.py", "prefill_kernels_chatglm.py",
                 "decode_kernels_chatglm.py", "int4_kernels_chatglm.py"):
        assert (tmp_path / name).is_file(), f"{name} not saved"
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_chatglm.ChatGLMForSequenceClassification"
    ids = torch.tensor([[11, 12, 13, 14]])
    loaded = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_sequence_first_legacy_cache_is_refused_with_the_fix():
    model = tiny_model()
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    out = model(input_ids=ids[:, :4], use_cache=True)
    cache = out.past_key_values
    layers = [(layer.keys, layer.values) if hasattr(layer, "keys") else tuple(layer)[:2]
              for layer in getattr(cache, "layers", cache)]
    official = tuple((k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)) for k, v in layers)  # [seq, b, groups, d]
    with pytest.raises(ValueError, match="permute"):
        model(input_ids=ids[:, 4:], past_key_values=official)
    converted = tuple((k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)) for k, v in official)
    torch.testing.assert_close(model(input_ids=ids[:, 4:], past_key_values=converted).logits,
                               model(input_ids=ids).logits[:, -1:])


@torch.no_grad()
def test_return_dict_false_gives_the_same_values_as_a_tuple():
    model = tiny_model(seed=14)
    ids = torch.tensor([[11, 12, 13, 14]])
    as_dict = model(input_ids=ids, labels=ids, use_cache=True)
    as_tuple = model(input_ids=ids, labels=ids, use_cache=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    assert as_tuple[2].get_seq_length() == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-decoding through SDPA is the CUDA path")
@pytest.mark.parametrize("padded", [False, True], ids=["one-prompt", "left-padded"])
@torch.no_grad()
def test_cuda_decode_step_runs_sdpa(monkeypatch, padded):
    """An eager one-token step over a cache goes to SDPA on CUDA (flash-decoding without padding, a [b, 1, 1, k]
    mask with it), here with key counts that are not a multiple of 8, and gives the float32 model's logits."""
    import chatglm.modeling_chatglm as modeling

    calls = []
    monkeypatch.setattr(modeling, "sdpa", lambda q, k, v, mask, *a, f=modeling.sdpa:
                        calls.append((q.shape[2], None if mask is None else tuple(mask.shape))) or f(q, k, v, mask, *a))
    ids, mask = left_pad(random_prompts(seed=41, lengths=(38, 30) if padded else (38,)))
    step = torch.full((ids.shape[0], 1), 77)
    step_mask = torch.cat([mask, torch.ones_like(step)], 1)
    reference = tiny_model(seed=9)
    want = reference(input_ids=torch.cat([ids, step], 1), attention_mask=step_mask).logits[:, -1]
    model = tiny_model(seed=9).to("cuda", torch.float16)
    out = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), use_cache=True)
    got = model(input_ids=step.cuda(), attention_mask=step_mask.cuda(), past_key_values=out.past_key_values)
    got = got.logits[:, -1].float().cpu()
    if modeling.SDPA_ENABLE_GQA:
        expected = (1, (ids.shape[0], 1, 1, 39)) if padded else (1, None)
        assert expected in calls, f"the step should run SDPA: {calls}"
    assert float((got - want).abs().max() / want.abs().max()) < 1e-2


@torch.no_grad()
def test_logits_to_keep_keeps_the_asked_positions(model64):
    """transformers' `logits_to_keep`: the last n positions, or the listed ones (also as `num_logits_to_keep`)."""
    ids = random_prompts(seed=42, lengths=(9,))[0][None]
    full = model64(input_ids=ids).logits
    torch.testing.assert_close(model64(input_ids=ids, logits_to_keep=3).logits, full[:, -3:])
    torch.testing.assert_close(model64(input_ids=ids, num_logits_to_keep=2).logits, full[:, -2:])
    positions = torch.tensor([0, 4, 8])
    torch.testing.assert_close(model64(input_ids=ids, logits_to_keep=positions).logits, full[:, positions])
    assert model64(input_ids=ids, logits_to_keep=0).logits.shape == full.shape


@pytest.mark.parametrize("flag", [dict(return_last_logit=True), dict(logits_to_keep=2)])
def test_labels_with_kept_logits_are_refused(model64, flag):
    """A loss needs every position's logits; with only the last ones it would be NaN or wrong, silently."""
    ids = random_prompts(seed=43, lengths=(6,))[0][None]
    with pytest.raises(ValueError, match="labels need the logits of every position"):
        model64(input_ids=ids, labels=ids, **flag)


class _ListCache:
    """transformers 4.36-4.38's DynamicCache as crop_cache sees it: key/value lists and a count, no crop()."""

    def __init__(self, keys, values):
        self.key_cache, self.value_cache, self.seen_tokens = list(keys), list(values), keys[0].shape[-2]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key_cache[layer_idx].shape[-2]


@pytest.mark.parametrize("kind", ["current", "lists without crop()"])
def test_crop_cache_keeps_the_first_positions(kind):
    keys = [torch.randn(2, 2, 9, 4) for _ in range(3)]
    values = [torch.randn(2, 2, 9, 4) for _ in range(3)]
    if kind == "current":
        cache = as_cache(tuple(zip(keys, values)))
    else:
        cache = _ListCache(keys, values)
    assert crop_cache(cache, 5)
    assert cache_length(cache) == 5
    for layer in range(3):
        key, value = cache_layer(cache, layer)
        assert torch.equal(key, keys[layer][:, :, :5]) and torch.equal(value, values[layer][:, :, :5])
    if kind != "current":
        assert cache.seen_tokens == 5


def test_classifier_under_trainer_gradient_accumulation_logs_the_batch_loss(tmp_path):
    """The classifier's loss is a per-batch mean, so Trainer must scale it for accumulation itself: 2 accumulated
    batches of 1 log what one batch of 2 logs (≥ 4.49 would otherwise pass a token count and not divide)."""
    from transformers import Trainer, TrainingArguments

    from chatglm.modeling_chatglm import ChatGLMForSequenceClassification
    from compat_util import CPU_TRAINING

    ids = torch.randint(10, 512, (2, 6), generator=torch.Generator().manual_seed(7))
    examples = [{"input_ids": ids[i], "labels": torch.tensor(i)} for i in range(2)]
    logged = {}
    for name, (batch, accumulation) in {"batch": (2, 1), "accumulated": (1, 2)}.items():
        torch.manual_seed(0)
        model = ChatGLMForSequenceClassification(tiny_config(num_labels=2))
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, max_steps=1, logging_steps=1,
                                 learning_rate=1e-3, report_to="none", save_strategy="no", **CPU_TRAINING,
                                 dataloader_num_workers=0, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=examples)
        trainer.train()
        logged[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged["batch"]) == 1
    torch.testing.assert_close(torch.tensor(logged["accumulated"]), torch.tensor(logged["batch"]), rtol=1e-4, atol=1e-5)
