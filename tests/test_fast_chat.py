"""chat / batch_chat / stream_chat / stream_generate by our own decode loop (decoding_chatglm) give what they give
on transformers' generate(): the same replies (greedy, and sampled under the same seed), the same streamed steps,
and a cache to pass back that holds the same keys/values.

Each test runs both loops: "static" (CHATGLM_FAST_CHAT=1: the preallocated decoder, its eager step on CPU) and
"growing" (the default on CPU: a growing cache, the eager forward); CHATGLM_FAST_CHAT=0 gives generate(). The
float64 tiny model of test_chat makes greedy ties impossible, so they must agree exactly. The default on CUDA (the
fused static decoder) is checked on a GPU where there is one.
"""
from __future__ import annotations

from typing import List

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from conftest import tiny_model
from test_chat import _prompt, forward_lengths, history_for, model_for, unused_eos
from test_chat import family, tiny_toks  # noqa: F401  (fixtures)
from test_decoding import BanHalfTheIds
from test_tokenizer import tiny_model_file  # noqa: F401  (fixture)
from chatglm import chat_format as cf
from chatglm.chat_chatglm import CACHE_IDS_ATTR
from chatglm.compat_chatglm import cache_layer, cache_length
from chatglm.decoding_chatglm import (FAST_CHAT_ENV, FAST_GENERATE_ENV, DecodeRun, FastPathBusy, GrowingCacheRun, StaticCacheRun,
                                      chat_cache_kind)

GREEDY = dict(do_sample=False, max_new_tokens=7)
LOOPS = {"static": StaticCacheRun, "growing": GrowingCacheRun}


@pytest.fixture(params=sorted(LOOPS))
def loop(request) -> str:
    return request.param


def use(monkeypatch, loop: str) -> None:
    """Send chat requests to our `loop` ("static", "growing") or, for "generate", to transformers' generate()."""
    if loop == "growing":
        monkeypatch.delenv(FAST_CHAT_ENV, raising=False)  # the default on CPU
    else:
        monkeypatch.setenv(FAST_CHAT_ENV, "1" if loop == "static" else "0")


@pytest.fixture
def runs(monkeypatch) -> List[DecodeRun]:
    """Every fast-path run started during the test."""
    started: List[DecodeRun] = []
    original = DecodeRun.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(DecodeRun, "__init__", init)
    return started


def _ran(runs: List[DecodeRun], before: int, count: int, loop: str) -> bool:
    """`count` runs of `loop`'s kind started since there were `before`."""
    return len(runs) == before + count and all(type(run) is LOOPS[loop] for run in runs[before:])


def test_chat_and_batch_chat_match_generate(tiny_toks, family, loop, monkeypatch, runs):  # noqa: F811
    tok = tiny_toks[family]
    model = model_for(tok)
    queries = ["Hi", "What is the capital of France, and why is it famous?", "你好，请介绍一下你自己"]
    histories = [None, history_for(family), None]
    results = {}
    for path in ("generate", loop):
        use(monkeypatch, path)
        before = len(runs)
        results[path] = (model.chat(tok, "What is the weather like?", history_for(family), **GREEDY),
                         model.batch_chat(tok, queries, histories, do_sample=False, max_length=120),
                         model.chat(tok, "Hi", repetition_penalty=1.3, **GREEDY),
                         model.chat(tok, "Hi", logits_processor=[BanHalfTheIds()], **GREEDY),
                         [ids.tolist() for ids in model.stream_generate(
                             **_prompt(tok), logits_processor=[BanHalfTheIds()], **GREEDY)])
        assert _ran(runs, before, 0 if path == "generate" else 5, loop)
    assert results[loop] == results["generate"]
    # what the loop lacks goes to generate()
    before = len(runs)
    model.chat(tok, "Hi", no_repeat_ngram_size=2, **GREEDY)
    assert len(runs) == before


def test_sampled_chat_and_stream_chat_match_generate(tiny_toks, loop, monkeypatch, runs):  # noqa: F811
    """chat()'s own sampling (the variant's top_p / temperature, generate()'s default top_k 50), same seed → the
    same reply on both paths; also with a repetition penalty, streamed."""
    tok = tiny_toks[cf.CHATGLM3]
    model = model_for(tok)
    replies = {}
    for path in ("generate", loop):
        use(monkeypatch, path)
        before = len(runs)
        torch.manual_seed(11)
        said = model.chat(tok, "Hello", max_new_tokens=12)
        torch.manual_seed(12)
        streamed = list(model.stream_chat(tok, "Hello", max_new_tokens=12, repetition_penalty=1.2))
        assert _ran(runs, before, 0 if path == "generate" else 2, loop)
        replies[path] = said, streamed
    assert replies[loop] == replies["generate"]


def _same_cache(a, b, layers: int) -> None:
    assert cache_length(a) == cache_length(b) and getattr(a, CACHE_IDS_ATTR) == getattr(b, CACHE_IDS_ATTR)
    for layer_idx in range(layers):
        for x, y in zip(cache_layer(a, layer_idx), cache_layer(b, layer_idx)):
            torch.testing.assert_close(x, y)


def test_stream_chat_matches_generate_and_reuses_the_cache(tiny_toks, family, loop, monkeypatch, runs):  # noqa: F811
    tok = tiny_toks[family]
    model = model_for(tok)
    kwargs = dict(do_sample=False, max_new_tokens=8)
    seen = {}
    for fast in (False, True):
        use(monkeypatch, loop if fast else "generate")
        before = len(runs)
        first = list(model.stream_chat(tok, "Hello", return_past_key_values=True, **kwargs))
        lengths, handle = forward_lengths(model)
        try:
            second = list(model.stream_chat(tok, "Tell me more", first[-1][1], past_key_values=first[-1][2],
                                            return_past_key_values=True, **kwargs))
        finally:
            handle.remove()
        assert _ran(runs, before, 2 * fast, loop)
        seen[fast] = [item[:2] for item in first], [item[:2] for item in second], lengths[0], second[-1][2]
    assert seen[True][:3] == seen[False][:3], "same replies, and the second turn prefills the same new tokens"
    _same_cache(seen[True][3], seen[False][3], model.config.num_layers)

    # a stream closed early leaves a cache that holds every token but the last one it showed, and is reusable
    history, cache = seen[True][1][-1][1], seen[True][3]
    stream = model.stream_chat(tok, "Goodbye", history, past_key_values=cache, return_past_key_values=True, **kwargs)
    _, _, partial = next(stream)
    stream.close()
    assert cache_length(partial) == len(getattr(partial, CACHE_IDS_ATTR)) - 1
    *_, last = model.stream_chat(tok, "Goodbye", history, past_key_values=partial, return_past_key_values=True,
                                 **kwargs)
    use(monkeypatch, "generate")
    assert last[:2] == model.chat(tok, "Goodbye", history, **kwargs)


def test_stream_generate_by_our_loop(tiny_toks, loop, monkeypatch, runs):  # noqa: F811
    tok = tiny_toks[cf.CHATGLM3]
    model = model_for(tok)
    inputs = _prompt(tok)
    never = unused_eos(model, inputs, 6)
    request = dict(max_new_tokens=6, do_sample=False)
    expected = model.generate(**inputs, eos_token_id=never, pad_token_id=0, **request)
    use(monkeypatch, loop)
    steps = list(model.stream_generate(**inputs, eos_token_id=never, **request))
    assert _ran(runs, 0, 1, loop) and len(steps) == 6 and torch.equal(steps[-1], expected)
    # stops at (and includes) an end-of-sequence id
    eos = int(expected[0, -3])
    stopped = list(model.stream_generate(**inputs, eos_token_id=[never, eos], **request))
    assert torch.equal(stopped[-1], expected[:, :-2])
    # a batch whose rows end at different steps: pad after a row's end, as generate() gives
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    free = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=never, pad_token_id=0, **request)
    eos = int(free[0, 7])
    reference = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=eos, pad_token_id=0, **request)
    *_, (batch, cache) = model.stream_generate(input_ids=ids, attention_mask=mask, eos_token_id=eos, pad_token_id=0,
                                               return_past_key_values=True, **request)
    assert torch.equal(batch, reference) and cache_length(cache) == batch.shape[1] - 1
    # the cache handed out with every step holds every token but the last one at that step
    for ids, cache in model.stream_generate(**inputs, eos_token_id=never, return_past_key_values=True, **request):
        assert cache_length(cache) == ids.shape[1] - 1
    # a caller's stopping criteria end the stream where generate() ends (the whole batch: every version's kind)
    from test_decoding import StopAfter

    before = len(runs)
    stop = int(expected[0, -4])
    criteria = StoppingCriteriaList([StopAfter(inputs["input_ids"].shape[1], stop, whole_batch=True)])
    want = model.generate(**inputs, eos_token_id=never, pad_token_id=0, stopping_criteria=criteria, **request)
    assert want.shape[1] < expected.shape[1]
    steps = list(model.stream_generate(**inputs, eos_token_id=never, stopping_criteria=criteria, **request))
    assert _ran(runs, before, 1, loop) and torch.equal(steps[-1], want)


def test_a_cache_changed_during_a_fast_stream_is_not_overwritten(tiny_toks, monkeypatch):  # noqa: F811
    tok = tiny_toks[cf.CHATGLM3]
    model = model_for(tok)
    monkeypatch.setenv(FAST_CHAT_ENV, "1")
    kwargs = dict(do_sample=False, max_new_tokens=8)
    *_, (_, history, cache) = model.stream_chat(tok, "Hello", return_past_key_values=True, **kwargs)
    stream = model.stream_chat(tok, "More", history, past_key_values=cache, return_past_key_values=True, **kwargs)
    next(stream)
    held = cache_length(cache)
    model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)  # someone else extends it
    stream.close()
    assert cache_length(cache) == held + 3


def test_a_busy_static_decoder_sends_other_requests_to_a_growing_cache(tiny_toks, monkeypatch, runs):  # noqa: F811
    tok = tiny_toks[cf.CHATGLM3]
    model = model_for(tok)
    inputs = _prompt(tok)
    never = unused_eos(model, inputs, 6)
    request = dict(max_new_tokens=6, do_sample=False, eos_token_id=never)
    use(monkeypatch, "static")
    stream = model.stream_generate(**inputs, **request)
    next(stream)
    with pytest.raises(FastPathBusy):
        model.fast_generate(inputs["input_ids"], **request)
    reply = model.chat(tok, "Hi", **GREEDY)  # while the stream holds the decoder
    other = list(model.stream_generate(**inputs, **request))
    assert _ran(runs, 1, 2, "growing")
    rest = list(stream)
    expected = model.generate(**inputs, pad_token_id=0, **request)
    assert torch.equal(rest[-1], expected) and torch.equal(other[-1], expected)
    use(monkeypatch, "generate")
    assert reply == model.chat(tok, "Hi", **GREEDY)
    model.fast_generate(inputs["input_ids"], **request)  # free again once the stream ended
    assert _ran(runs, 3, 1, "static")


def test_p_tuning_chat_matches_generate(tiny_toks, loop, monkeypatch, runs):  # noqa: F811
    """A P-tuning model's cache starts with its prefix: chat, and stream_chat with the cache passed back, give on
    our loop what they give on generate(), and leave the same cache."""
    tok = tiny_toks[cf.CHATGLM3]
    model = tiny_model(7, padded_vocab_size=512, seq_length=1024, pre_seq_len=4).double().eval()
    kwargs = dict(do_sample=False, max_new_tokens=6)
    seen = {}
    for path in ("generate", loop):
        use(monkeypatch, path)
        before = len(runs)
        reply = model.chat(tok, "Hello", **kwargs)
        *_, (response, history, cache) = model.stream_chat(tok, "Hello", return_past_key_values=True, **kwargs)
        lengths, handle = forward_lengths(model)
        try:
            *_, second = model.stream_chat(tok, "More", history, past_key_values=cache, return_past_key_values=True,
                                           **kwargs)
        finally:
            handle.remove()
        assert _ran(runs, before, 0 if path == "generate" else 3, loop)
        seen[path] = reply, (response, history), second[:2], lengths[0], second[2]
    assert seen[loop][:4] == seen["generate"][:4]
    _same_cache(seen[loop][4], seen["generate"][4], model.config.num_layers)
    assert seen[loop][0] == seen[loop][1], "chat and stream_chat agree"


def test_chat_cache_kind_policy(monkeypatch):
    model = tiny_model(seed=3).double()
    request = dict(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, do_sample=False)
    sampled = {**request, "do_sample": True, "top_p": 0.8, "repetition_penalty": 1.1}
    monkeypatch.delenv(FAST_CHAT_ENV, raising=False)
    assert chat_cache_kind(model, request) == chat_cache_kind(model, sampled) == "growing", "CPU: a growing cache"
    for setting, kind in (("1", "static"), ("static", "static"), ("growing", "growing")):
        monkeypatch.setenv(FAST_CHAT_ENV, setting)
        assert chat_cache_kind(model, request) == chat_cache_kind(model, sampled) == kind
    for setting in ("1", ""):
        monkeypatch.setenv(FAST_CHAT_ENV, setting)
        assert chat_cache_kind(model, {**request, "logits_processor": LogitsProcessorList()}) is not None
        assert chat_cache_kind(model, {**request, "stopping_criteria": StoppingCriteriaList()}) is not None
        for unsupported in (dict(no_repeat_ngram_size=3), dict(num_beams=2),
                            dict(output_scores=True, return_dict_in_generate=True)):
            assert chat_cache_kind(model, {**request, **unsupported}) is None, unsupported
    prefixed = tiny_model(seed=3, pre_seq_len=4)
    assert chat_cache_kind(prefixed, request) == "growing", "P-tuning on CPU"
    monkeypatch.setenv(FAST_CHAT_ENV, "1")
    assert chat_cache_kind(prefixed, request) == "static", "the static cache holds the prefix in its first slots"
    monkeypatch.setenv(FAST_CHAT_ENV, "0")
    assert chat_cache_kind(model, request) is None
    with pytest.raises(ValueError, match="cache_kind must be one of"):
        model.fast_generate(request["input_ids"], cache_kind="paged")


def _holds_what_a_plain_forward_computes(model, cache) -> None:
    """`cache` (from stream_chat) holds what a plain forward over the ids it records computes (fp16: to rounding)."""
    ids = torch.tensor([getattr(cache, CACHE_IDS_ATTR)[:-1]], device=model.device)
    plain = model(input_ids=ids, use_cache=True).past_key_values
    assert cache_length(cache) == cache_length(plain)
    for layer_idx in range(model.config.num_layers):
        for x, y in zip(cache_layer(cache, layer_idx), cache_layer(plain, layer_idx)):
            torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the default policy)")
def test_cuda_chat_takes_the_fused_fast_path_by_default(tiny_toks, monkeypatch, runs):  # noqa: F811
    pytest.importorskip("triton")
    monkeypatch.delenv(FAST_CHAT_ENV, raising=False)
    tok = tiny_toks[cf.CHATGLM3]
    model = tiny_model(seed=7, padded_vocab_size=512, seq_length=1024).half().cuda()
    kwargs = dict(do_sample=False, max_new_tokens=12)
    reply = model.chat(tok, "Hello", **kwargs)
    assert len(runs) == 1 and model._chatglm_decoder.fused is not None
    *_, (response, history, cache) = model.stream_chat(tok, "Hello", return_past_key_values=True, **kwargs)
    assert (response, history) == reply and len(runs) == 2
    _holds_what_a_plain_forward_computes(model, cache)
    # a P-tuning model takes the fused static decoder too; its cache starts with the prefix
    tuned = tiny_model(seed=7, padded_vocab_size=512, seq_length=1024, pre_seq_len=4).half().cuda()
    *_, (_, _, tuned_cache) = tuned.stream_chat(tok, "Hello", return_past_key_values=True, **kwargs)
    assert type(runs[-1]) is StaticCacheRun and tuned._chatglm_decoder.fused is not None
    _holds_what_a_plain_forward_computes(tuned, tuned_cache)
    *_, (response2, _, _) = model.stream_chat(tok, "More", history, past_key_values=cache,
                                              return_past_key_values=True, **kwargs)
    assert len(runs) == 4 and isinstance(response2, (str, dict))
    # the growing loop on CUDA runs the eager forward as transformers' generate() does: the same tokens greedy in a
    # padded batch, and sampled under one seed (one row: transformers < 5.23 also penalizes left padding)
    monkeypatch.setenv(FAST_GENERATE_ENV, "0")
    batch = tok(["Hello", "Count to ten, slowly"], return_tensors="pt", padding=True).to("cuda")
    one = tok(["Count to ten, slowly"], return_tensors="pt").to("cuda")
    for inputs, settings in ((batch, dict(do_sample=False)),
                             (one, dict(do_sample=True, top_p=0.8, repetition_penalty=1.2))):
        out = []
        for generate in (model.generate, lambda **kw: model.fast_generate(cache_kind="growing", **kw)):
            torch.manual_seed(3)
            out.append(generate(**inputs, max_new_tokens=10, eos_token_id=None, pad_token_id=0, **settings))
        assert torch.equal(out[1], out[0]), settings


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the default policy)")
@torch.no_grad()
def test_cuda_plain_generate_takes_the_fused_fast_path_by_default(tiny_toks, monkeypatch, runs):  # noqa: F811
    pytest.importorskip("triton")
    monkeypatch.delenv(FAST_GENERATE_ENV, raising=False)
    tok = tiny_toks[cf.CHATGLM3]
    model = tiny_model(seed=7, padded_vocab_size=512, seq_length=1024).half().cuda()
    batch = tok(["Hello", "Count to ten, slowly"], return_tensors="pt", padding=True).to("cuda")
    kwargs = dict(max_new_tokens=10, eos_token_id=None, pad_token_id=0, do_sample=False)
    plain = model.generate(**batch, **kwargs)
    assert len(runs) == 1 and type(runs[0]) is StaticCacheRun and model._chatglm_decoder.fused is not None
    assert torch.equal(plain, model.generate(**batch, cache_implementation="static", **kwargs)) and len(runs) == 2
    monkeypatch.setenv(FAST_GENERATE_ENV, "0")
    assert torch.equal(plain, model.generate(**batch, **kwargs)), "transformers' loop: the same greedy tokens"
    assert len(runs) == 2
    monkeypatch.delenv(FAST_GENERATE_ENV)
    model.generate(**batch, num_beams=2, **kwargs)  # what the loop lacks stays on transformers' generate()
    model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # no explicit length
    assert len(runs) == 2
    # a TextIteratorStreamer read while generate() runs in another thread, the usual web-demo pattern
    from threading import Thread

    from transformers import TextIteratorStreamer

    one = {name: tensor[1:] for name, tensor in batch.items()}
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    result = {}
    thread = Thread(target=lambda: result.update(ids=model.generate(**one, streamer=streamer, **kwargs)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert len(runs) == 3 and type(runs[2]) is StaticCacheRun
    assert torch.equal(result["ids"], model.generate(**one, **kwargs))
    assert text == tok.decode(result["ids"][0, one["input_ids"].shape[1]:])
    # stopping criteria on the fused path end the batch where transformers' loop ends it
    from test_decoding import StopAfter

    width = batch["input_ids"].shape[1]
    criteria = StoppingCriteriaList([StopAfter(width, int(plain[0, width + 3]), whole_batch=True)])
    fast = model.generate(**batch, stopping_criteria=criteria, **kwargs)
    assert type(runs[-1]) is StaticCacheRun and fast.shape[1] <= width + 4
    monkeypatch.setenv(FAST_GENERATE_ENV, "0")
    assert torch.equal(fast, model.generate(**batch, stopping_criteria=criteria, **kwargs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
@pytest.mark.parametrize("case", ["float32", "17_rows"])
@torch.no_grad()
def test_cuda_plain_generate_replays_the_eager_step_where_the_fused_one_does_not_serve(tiny_toks, monkeypatch,
                                                                                        runs, case):  # noqa: F811
    """float32 weights, or more rows than the fused step takes: a plain generate() runs the model's own forward as
    the step, captured in a CUDA graph (no torch.compile), and gives transformers' greedy tokens; so does chat."""
    monkeypatch.delenv(FAST_GENERATE_ENV, raising=False)
    monkeypatch.delenv(FAST_CHAT_ENV, raising=False)
    tok = tiny_toks[cf.CHATGLM3]
    model = tiny_model(seed=7, padded_vocab_size=512, seq_length=1024).cuda()
    if case == "17_rows":
        model = model.half()
    texts = ["Hello", "Count to ten, slowly"] * (1 if case == "float32" else 9)
    batch = tok(texts[:17] if case == "17_rows" else texts, return_tensors="pt", padding=True).to("cuda")
    kwargs = dict(max_new_tokens=10, eos_token_id=None, pad_token_id=0, do_sample=False)
    fast = model.generate(**batch, **kwargs)
    decoder = model._chatglm_decoder
    assert len(runs) == 1 and type(runs[0]) is StaticCacheRun
    assert decoder.fused is None and not decoder.compiled and decoder.use_graphs and decoder.graphs
    monkeypatch.setenv(FAST_GENERATE_ENV, "0")
    assert torch.equal(fast, model.generate(**batch, **kwargs)), "transformers' loop: the same greedy tokens"
    assert len(runs) == 1
    reply, _ = model.chat(tok, "Hello", history=[], do_sample=False, max_new_tokens=6)
    assert len(runs) == 2 and type(runs[1]) is StaticCacheRun
    monkeypatch.setenv(FAST_CHAT_ENV, "0")
    assert model.chat(tok, "Hello", history=[], do_sample=False, max_new_tokens=6)[0] == reply
