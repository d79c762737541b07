"""The fast decoding path (static cache + compiled step) gives exactly what the eager generate() gives."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from conftest import tiny_model
from test_tokenizer import tiny3, tiny_model_file  # noqa: F401  (fixtures)
from test_modeling import left_pad, random_prompts

from chatglm import decoding_chatglm as decoding
from chatglm.compat_chatglm import GENERATE_BUILDS_STATIC_CACHE
from chatglm.decoding_chatglm import FAST_GENERATE_ENV, StaticKVCache, fast_path_supports, loop_serves


@pytest.fixture(scope="module")
def model64():
    return tiny_model(seed=31).double()


@pytest.mark.parametrize("compile", [False, True], ids=["eager-step", "compiled-step"])
@torch.no_grad()
def test_fast_generate_equals_generate(model64, compile):
    ids, mask = left_pad(random_prompts(seed=31))
    kwargs = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    reference = model64.generate(input_ids=ids, attention_mask=mask, eos_token_id=None, **kwargs)
    fast = model64.fast_generate(ids, attention_mask=mask, eos_token_id=None, compile=compile, **kwargs)
    assert torch.equal(fast, reference)


@torch.no_grad()
def test_fast_generate_stops_at_eos_like_generate(model64):
    ids, mask = left_pad(random_prompts(seed=32))
    free = model64.fast_generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None,
                                 compile=False)
    eos = int(free[0, ids.shape[1] + 2])  # a token row 0 emits third: a stop token for this test
    kwargs = dict(max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)
    reference = model64.generate(input_ids=ids, attention_mask=mask, **kwargs)
    fast = model64.fast_generate(ids, attention_mask=mask, compile=False, **kwargs)
    assert torch.equal(fast, reference)
    forced = model64.fast_generate(ids, attention_mask=mask, compile=False, min_new_tokens=10, **kwargs)
    assert not torch.isin(forced[:, ids.shape[1]:ids.shape[1] + 10], torch.tensor([eos])).any()
    # the end-of-sequence id is excluded inside the decode step ("greedy_banned"), as generate's logits processor
    assert torch.equal(forced, model64.generate(input_ids=ids, attention_mask=mask, min_new_tokens=10, **kwargs))


@torch.no_grad()
def test_fast_generate_sampling_is_seeded_and_respects_top_k_1(model64):
    ids, mask = left_pad(random_prompts(seed=33))
    greedy = model64.fast_generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                   compile=False)
    top1 = model64.fast_generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=1,
                                 eos_token_id=None, compile=False)
    assert torch.equal(top1, greedy)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(model64.fast_generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_p=0.9,
                                          temperature=1.5, eos_token_id=None, compile=False))
    assert torch.equal(runs[0], runs[1])


class BanHalfTheIds(LogitsProcessor):
    """A caller's processor that reads the ids so far: the half of the vocabulary that follows each row's last id
    (cyclically) is never picked."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        offset = (torch.arange(vocab, device=scores.device) - input_ids[:, -1:]) % vocab
        return scores.masked_fill((offset >= 1) & (offset <= vocab // 2), float("-inf"))


SAMPLED = [
    dict(do_sample=True, top_p=0.9, temperature=1.5),  # top_k unset: generate() applies its default of 50
    dict(do_sample=True, top_p=0.9, top_k=0),
    dict(do_sample=True, top_k=7, temperature=0.7),
    dict(do_sample=True, top_p=0.8, repetition_penalty=1.3),
    dict(do_sample=True, repetition_penalty=1.3, min_new_tokens=6, eos_token_id=[3, 9]),
    dict(do_sample=False, repetition_penalty=1.3),
    dict(do_sample=False, repetition_penalty=0.7, eos_token_id=[3, 9]),
    dict(do_sample=False, logits_processor=LogitsProcessorList([BanHalfTheIds()])),
    dict(do_sample=True, top_p=0.9, repetition_penalty=1.2, min_new_tokens=4, eos_token_id=[3, 9],
         logits_processor=LogitsProcessorList([BanHalfTheIds()])),
]


@pytest.mark.parametrize("settings", SAMPLED, ids=lambda s: ",".join(
    f"{k}={'[BanHalfTheIds]' if k == 'logits_processor' else v}" for k, v in s.items()))
@torch.no_grad()
def test_fast_generate_samples_what_generate_samples(model64, settings):
    """Same seed, same settings (unset ones as generate() fills them in) → the same tokens. Rows of equal length:
    transformers < 5.23 also penalizes left padding (see the next test)."""
    prompts = random_prompts(seed=34, lengths=[11, 11, 11])
    ids = torch.stack(prompts)
    settings = {"eos_token_id": None, **settings}
    out = []
    for generate in (model64.generate, model64.fast_generate):
        torch.manual_seed(5)
        extra = {} if generate == model64.generate else dict(compile=False)
        out.append(generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, pad_token_id=0,
                            **settings, **extra))
    assert torch.equal(out[1], out[0])


@torch.no_grad()
def test_repetition_penalty_on_the_fast_path_ignores_left_padding(model64):
    prompts = random_prompts(seed=35)
    ids, mask = left_pad(prompts)
    settings = dict(do_sample=False, repetition_penalty=1.5, eos_token_id=None, max_new_tokens=10, compile=False)
    batch = model64.fast_generate(ids, attention_mask=mask, **settings)[:, ids.shape[1]:]
    plain = model64.fast_generate(ids, attention_mask=mask, **{**settings, "repetition_penalty": 1.0})
    assert not torch.equal(batch, plain[:, ids.shape[1]:])  # the penalty changed something
    for row, prompt in zip(batch, prompts):
        alone = model64.fast_generate(prompt[None], **settings)[0, len(prompt):]
        assert torch.equal(row, alone)
    with pytest.raises(ValueError, match="repetition_penalty must be a positive"):
        model64.fast_generate(ids, attention_mask=mask, **{**settings, "repetition_penalty": 0.0})


def test_fast_path_only_takes_requests_it_serves(model64, monkeypatch):
    ids = torch.ones(1, 3, dtype=torch.long)
    static = dict(input_ids=ids, cache_implementation="static", max_new_tokens=3)
    assert loop_serves(model64, static) and loop_serves(model64, {**static, "logits_processor": []})
    assert loop_serves(model64, {**static, "stopping_criteria": StoppingCriteriaList()})
    for unsupported in (dict(num_beams=2), dict(stop_strings=["x"]), dict(num_return_sequences=2),
                        dict(output_scores=True, return_dict_in_generate=True)):
        assert not loop_serves(model64, {**static, **unsupported}), unsupported
    # on CPU, transformers >= 4.42 runs static requests on its own static cache, and plain ones on its own loop
    assert fast_path_supports(model64, static) == (not GENERATE_BUILDS_STATIC_CACHE)
    plain = dict(input_ids=ids, max_new_tokens=3)
    assert not fast_path_supports(model64, plain)
    monkeypatch.setattr(decoding, "_static_decoder_fits", lambda model, request: True)  # as on a GPU it serves
    monkeypatch.delenv(FAST_GENERATE_ENV, raising=False)
    assert fast_path_supports(model64, plain) and fast_path_supports(model64, {**plain, "max_length": 9})
    assert not fast_path_supports(model64, dict(input_ids=ids)), "no explicit length: version-dependent default"
    assert not fast_path_supports(model64, {**plain, "cache_implementation": "dynamic"})
    assert not fast_path_supports(model64, {**plain, "num_beams": 2})
    monkeypatch.setenv(FAST_GENERATE_ENV, "0")
    assert not fast_path_supports(model64, plain)


def test_loop_leaves_generation_configs_it_does_not_read_to_generate():
    model = tiny_model(seed=36)
    request = dict(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=3)
    model.generation_config.do_sample, model.generation_config.top_k = True, 3  # settings the loop reads
    assert loop_serves(model, request)
    for name, value in (("num_beams", 2), ("no_repeat_ngram_size", 2), ("max_new_tokens", 5), ("min_length", 4)):
        default = getattr(model.generation_config, name)
        setattr(model.generation_config, name, value)
        assert not loop_serves(model, request), name
        setattr(model.generation_config, name, default)
    assert loop_serves(model, request)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
@torch.no_grad()
def test_plain_generate_on_the_fast_path_equals_generate(model64, monkeypatch, do_sample):
    """Where the fused step would serve (patched in here: that needs a GPU), a plain generate() runs our loop and
    returns what transformers' loop returns."""
    from chatglm import modeling_chatglm

    ids, mask = left_pad(random_prompts(seed=37))
    request = dict(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=do_sample, top_p=0.8,
                   eos_token_id=None, pad_token_id=0)
    monkeypatch.setattr(decoding, "_static_decoder_fits", lambda model, request: True)
    calls = []
    monkeypatch.setattr(modeling_chatglm, "fast_generate",
                        lambda *args, **kwargs: calls.append(1) or decoding.fast_generate(*args, **kwargs))
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(FAST_GENERATE_ENV, setting)
        torch.manual_seed(7)
        results[setting] = model64.generate(**request)
    assert len(calls) == 1, "the first call ran our loop, the second transformers'"
    assert torch.equal(results["1"], results["0"])


# transformers >= 4.39 lets a stopping criterion end single rows (a bool tensor [b]); older ones take one bool
ROW_CRITERIA = isinstance(StoppingCriteriaList()(torch.ones(1, 1, dtype=torch.long), None), torch.Tensor)


class StopAfter(StoppingCriteria):
    """Ends a row once it has produced `token` after the prompt, or with `whole_batch` (a bool) every row once one
    has."""

    def __init__(self, prompt_len: int, token: int, whole_batch: bool):
        self.prompt_len, self.token, self.whole_batch = prompt_len, token, whole_batch

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs):
        hit = (input_ids[:, self.prompt_len:] == self.token).any(-1)
        return bool(hit.any()) if self.whole_batch else hit


@pytest.mark.parametrize("whole_batch", [True, False], ids=["bool", "per_row"])
@pytest.mark.parametrize("eos", [False, True], ids=["no_eos", "eos"])
@pytest.mark.parametrize("cache_kind", ["static", "growing"])
@torch.no_grad()
def test_stopping_criteria_end_rows_as_in_generate(model64, monkeypatch, cache_kind, eos, whole_batch):
    """A caller's stopping criteria on our loop: rows end (or the batch does) where generate() ends them; a row that
    met a criterion goes on producing tokens unless there is an eos id (then pad), as in generate()."""
    if not whole_batch and not ROW_CRITERIA:
        pytest.skip("transformers < 4.39: stopping criteria answer for the whole batch")
    ids, mask = left_pad(random_prompts(seed=39))
    free = model64.fast_generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 compile=False)
    n = ids.shape[1]
    stop = int(free[0, n + 2])  # row 0 meets the criterion at its third token at the latest
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    if eos:  # an id row 1 meets late, if at all
        kwargs["eos_token_id"] = int(free[1, n + 9])
    else:  # (an explicit eos_token_id=None means the configured one on some transformers versions, none on others)
        monkeypatch.setattr(model64.generation_config, "eos_token_id", None)
        monkeypatch.setattr(model64.config, "eos_token_id", None)
    want = model64.generate(input_ids=ids, stopping_criteria=StoppingCriteriaList([StopAfter(n, stop, whole_batch)]),
                            **kwargs)
    got = model64.fast_generate(ids, cache_kind=cache_kind, compile=False,
                                stopping_criteria=StoppingCriteriaList([StopAfter(n, stop, whole_batch)]), **kwargs)
    assert torch.equal(got, want)
    assert want.shape[1] <= n + 3 or not whole_batch, "the criterion ended the batch early"


@pytest.mark.parametrize("cache_kind", ["static", "growing"])
@torch.no_grad()
def test_stop_strings_end_where_generate_ends(cache_kind, tiny3):
    """generate(stop_strings=[...], tokenizer=tok) on our loop stops where transformers' loop stops (transformers
    builds the same StopStringCriteria); without the tokenizer the request stays with generate() and its error."""
    from chatglm.compat_chatglm import StopStringCriteria

    if StopStringCriteria is None:
        pytest.skip("transformers < 4.42 has no stop_strings")
    tok = tiny3
    model = tiny_model(seed=7, padded_vocab_size=512)
    ids = tok(["Hello world"], return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    free = model.fast_generate(ids, compile=False, **kwargs)
    stop = tok.decode(free[0, ids.shape[1]:])[6:9]  # text the reply reaches a few tokens in
    want = model.generate(input_ids=ids, stop_strings=[stop], tokenizer=tok, **kwargs)
    assert want.shape[1] < free.shape[1]
    got = model.fast_generate(ids, cache_kind=cache_kind, compile=False, stop_strings=[stop], tokenizer=tok, **kwargs)
    assert torch.equal(got, want)
    assert loop_serves(model, dict(input_ids=ids, stop_strings=[stop], tokenizer=tok))
    assert not loop_serves(model, dict(input_ids=ids, stop_strings=[stop]))


class RecordingStreamer:
    """What generate() hands a streamer: every put() value, and how often end() was called."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.tolist())

    def end(self) -> None:
        self.ends += 1


@pytest.mark.parametrize("rows", [1, 2])
@torch.no_grad()
def test_streamer_gets_from_the_fast_path_what_generate_gives_it(model64, monkeypatch, rows):
    """generate(streamer=...) on our loop (the fused-step condition patched in, as on a GPU) feeds the streamer
    what transformers' loop feeds it: the prompt, each step's tokens (pad for a row that ended), one end()."""
    from chatglm import modeling_chatglm

    ids, mask = left_pad(random_prompts(seed=38)[:rows])
    free = model64.fast_generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 compile=False)
    eos = int(free[0, ids.shape[1] + 3])  # row 0 ends at its fourth token; another row, if any, later or never
    monkeypatch.setattr(decoding, "_static_decoder_fits", lambda model, request: True)
    calls = []
    monkeypatch.setattr(modeling_chatglm, "fast_generate",
                        lambda *args, **kwargs: calls.append(1) or decoding.fast_generate(*args, **kwargs))
    streamers, results = {}, {}
    for setting in ("1", "0"):
        monkeypatch.setenv(FAST_GENERATE_ENV, setting)
        streamers[setting] = RecordingStreamer()
        results[setting] = model64.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                            eos_token_id=eos, pad_token_id=0, streamer=streamers[setting])
    assert len(calls) == 1, "the first call ran our loop, the second transformers'"
    assert torch.equal(results["1"], results["0"])
    assert streamers["1"].puts == streamers["0"].puts and streamers["1"].ends == streamers["0"].ends == 1
    assert len(streamers["1"].puts) > 2 and streamers["1"].puts[0] == ids.tolist()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@torch.no_grad()
def test_adapter_switches_and_hooks_rebuild_the_decoder(device):
    """A captured step replays the branches its capture took: turning a PEFT LoRA adapter off (or a hook added after
    a first call) must give a new decoder and the output of the model as it now is. On CUDA the step is a CUDA graph,
    where a stale decoder would keep adding the adapter."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CUDA graphs)")
    from compat_util import skip_without

    skip_without("peft")
    from peft import LoraConfig, get_peft_model

    base = tiny_model(seed=41).to(device)
    ids = torch.randint(10, 500, (1, 6), generator=torch.Generator().manual_seed(9)).to(device)
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0, compile=False)
    plain = base.fast_generate(ids, **kwargs)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["query_key_value", "dense_h_to_4h"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5, generator=torch.Generator(device=device).manual_seed(1))
    model = peft_model.eval().get_base_model()
    adapted = model.fast_generate(ids, **kwargs)
    assert not torch.equal(adapted, plain), "the adapter changes the output"
    first = model._chatglm_decoder
    with peft_model.disable_adapter():
        assert torch.equal(model.fast_generate(ids, **kwargs), plain)
        assert model._chatglm_decoder is not first
    assert torch.equal(model.fast_generate(ids, **kwargs), adapted)
    again = model._chatglm_decoder
    handle = model.transformer.output_layer.register_forward_hook(lambda module, args, out: out * 0.0)
    try:
        zeroed = model.fast_generate(ids, **kwargs)
        assert model._chatglm_decoder is not again and not torch.equal(zeroed, adapted)
    finally:
        handle.remove()


@torch.no_grad()
def test_release_decoder_frees_it_and_the_next_call_builds_one():
    model = tiny_model(seed=40)
    ids = torch.randint(10, 500, (2, 5), generator=torch.Generator().manual_seed(8))
    kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, compile=False)
    first = model.fast_generate(ids, **kwargs)
    decoder = model._chatglm_decoder
    assert decoder is not None and model.release_decoder() and model._chatglm_decoder is None
    assert not model.release_decoder(), "nothing left to release"
    assert torch.equal(model.fast_generate(ids, **kwargs), first) and model._chatglm_decoder is not decoder
    stream = decoding.fast_stream(model, ids, **kwargs)
    next(stream)  # a run holds the decoder until its stream ends
    with pytest.raises(decoding.FastPathBusy):
        model.release_decoder()
    stream.close()
    assert model.release_decoder()


@pytest.mark.parametrize("compile", [False, True], ids=["eager-step", "compiled-step"])
@torch.no_grad()
def test_fast_path_in_and_out_of_inference_mode(compile):
    """The decoder outlives a call and is updated in place: one made under torch.inference_mode() must still serve
    a call outside it (in-place updates of inference tensors are errors there), and the reverse."""
    model = tiny_model(seed=38).double()
    ids = torch.randint(5, 100, (1, 6))
    expected = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    for inference in (True, False, True):
        with torch.inference_mode(inference):
            out = model.fast_generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, compile=compile)
        assert torch.equal(out, expected), f"inference_mode={inference}"


@torch.no_grad()
def test_each_decoder_compiles_its_own_step(model64):
    """torch.compile counts recompilations per code object; a decoder for a new batch size means new shapes, so
    decoders sharing their step's code would, after `recompile_limit` of them, run it uncompiled (and fail inside
    a CUDA graph capture). With the limit at 1, every decoder must still compile its own step."""
    from torch._dynamo import config as dynamo_config
    from torch._dynamo.utils import counters

    from chatglm.decoding_chatglm import CompiledDecoder

    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    with dynamo_config.patch(**{limit: 1}):
        for batch in (1, 2):
            decoder = CompiledDecoder(model64, batch, 32, compile=True)
            decoder.start(torch.full((batch, 1), 5), torch.zeros(batch, 1, dtype=torch.long), 0,
                          torch.ones(batch, 0, dtype=torch.bool))
            compiled = counters["frames"]["ok"]
            logits = decoder.run("logits")
            assert counters["frames"]["ok"] == compiled + 1, f"batch {batch}: the step ran uncompiled"
            assert logits.shape == (batch, model64.config.padded_vocab_size)


@torch.no_grad()
def test_fast_generate_prefill_attends_to_the_prompt_slots_only(model64, monkeypatch):
    """The prompt goes into a cache preallocated for prompt + new tokens; its attention reads the written slots
    only, causally and without a mask (not a [prompt, capacity] mask over the whole allocation)."""
    import chatglm.modeling_chatglm as modeling

    calls = []
    backend = modeling.ATTENTION_BACKENDS["sdpa"]
    monkeypatch.setitem(modeling.ATTENTION_BACKENDS, "sdpa", lambda q, k, v, mask, causal, p: calls.append(
        (q.shape[2], k.shape[2], mask, causal)) or backend(q, k, v, mask, causal, p))
    ids = random_prompts(seed=35, lengths=(9,))[0][None]
    model64.fast_generate(ids, max_new_tokens=2, do_sample=False, compile=False)
    layers = model64.config.num_layers  # (the last layer's prefill computes its last position only)
    assert calls[:layers] == [(9, 9, None, True)] * (layers - 1) + [(1, 9, None, False)], calls[:layers]


@torch.no_grad()
def test_static_kv_cache_in_a_plain_forward(model64):
    """Our preallocated cache works with forward() directly: prefill, then steps, equal to the full forward."""
    ids = random_prompts(seed=34, lengths=(9,))[0][None]
    config = model64.config
    cache = StaticKVCache(config.num_layers, 1, config.num_key_value_heads, config.kv_channels, 16, torch.float64,
                          "cpu")
    out = model64(input_ids=ids[:, :6], past_key_values=cache)
    cache.length = 6
    steps = []
    for i in range(6, 9):
        steps.append(model64(input_ids=ids[:, i:i + 1], past_key_values=cache).logits)
        cache.length = i + 1
    full = model64(input_ids=ids).logits
    torch.testing.assert_close(torch.cat([out.logits] + steps, dim=1), full)


@torch.no_grad()
def test_fast_generate_follows_the_model_after_dtype_change_and_quantize():
    """A decoder is built for one placement of the weights: after `.to(dtype)` or `quantize()` (new parameter
    tensors) the next call builds a new one, whose tokens are those of the changed model's own generate()."""
    model = tiny_model(seed=35)
    ids, mask = left_pad(random_prompts(seed=36, lengths=(7, 4)))
    request = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None)
    model.fast_generate(ids, compile=False, **request)
    first = model._chatglm_decoder
    model.double()
    torch.testing.assert_close(model.fast_generate(ids, compile=False, **request), model.generate(ids, **request))
    assert model._chatglm_decoder is not first and model._chatglm_decoder.cache.keys[0].dtype == torch.float64
    second = model._chatglm_decoder
    model.quantize(8)
    torch.testing.assert_close(model.fast_generate(ids, compile=False, **request), model.generate(ids, **request))
    assert model._chatglm_decoder is not second
