"""The fused Triton decode step (decode_kernels_chatglm) computes what the model's own forward computes.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors); with one they
run compiled on CUDA. Both steps start from the same prefilled cache and are fed the same tokens, so logits and the
cache entries they write can be compared step by step.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import tiny_model
from test_modeling import left_pad, random_prompts

pytest.importorskip("triton", reason="triton is not installed (pip install triton) -- the fused kernels need it")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it before triton is imported)",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    monkeypatch.delenv("CHATGLM_FUSED_DECODE", raising=False)


def _decoder(model, batch, capacity, fused):
    from chatglm.decoding_chatglm import CompiledDecoder

    previous = os.environ.get("CHATGLM_FUSED_DECODE")
    os.environ["CHATGLM_FUSED_DECODE"] = "1" if fused else "0"
    try:
        decoder = CompiledDecoder(model, batch, capacity, compile=DEVICE == "cuda")
    finally:
        if previous is None:
            del os.environ["CHATGLM_FUSED_DECODE"]
        else:
            os.environ["CHATGLM_FUSED_DECODE"] = previous
    assert (decoder.fused is not None) == fused
    return decoder


def _prefill(model, decoder, ids, mask):
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    prefix = model.config.pre_seq_len or 0
    if prefix:  # a P-tuning model's prefix in the first slots, where StaticCacheRun puts it
        prompt = model.transformer.get_prompt(ids.shape[0], ids.device, decoder.cache.keys[0].dtype)
        for layer, (keys, values) in enumerate(zip(decoder.cache.keys, decoder.cache.values)):
            keys[:, :, :prefix].copy_(prompt[2 * layer])
            values[:, :, :prefix].copy_(prompt[2 * layer + 1])
    decoder.cache.length = prefix
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=decoder.cache,
                   use_cache=True, return_last_logit=True).logits[:, -1].float()
    token = logits.argmax(-1, keepdim=True)
    decoder.start(token, positions[:, -1:] + 1, prefix + ids.shape[1],
                  torch.nn.functional.pad(mask.bool(), (prefix, 0), value=True))
    return token


def _relative(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# launch configurations forced on every GEMV of the tiny model (hidden 64, ffn 128): None keeps the defaults.
# (BLOCK_N, BLOCK_K, warps, stages, tensor cores, split-K)
CUDA_CORES = (16, 32, 4, 2, 0, 1)  # the one-row CUDA-core variant (batches of several rows keep tensor cores)
SPLIT_K = (16, 32, 4, 2, 1, 4)  # K = 64 in 2 splits, 128 in 4: the last program of a tile to finish reduces
CUDA_CORES_SPLIT_K = (16, 32, 4, 2, 0, 2)


@pytest.mark.parametrize("bits,config", [(16, None), (16, CUDA_CORES), (16, SPLIT_K), (16, CUDA_CORES_SPLIT_K),
                                         (8, None), (4, None), (4, SPLIT_K)],
                         ids=["fp16", "fp16-cuda-cores", "fp16-split-k", "fp16-cuda-cores-split-k", "int8", "int4",
                              "int4-split-k"])
@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded-batch"])
@torch.no_grad()
def test_fused_step_matches_model_forward(bits, config, padded, monkeypatch):
    from chatglm import decode_kernels_chatglm as kernels

    if config is not None:
        monkeypatch.setattr(kernels, "_default_config", lambda *shape: config)
    model = tiny_model(seed=5).half().to(DEVICE)
    if bits != 16:
        model.quantize(bits, backend="torch")
    _compare_steps(model, padded)


def _compare_steps(model, padded):
    """Fused and compiled steps from the same prefilled cache, fed the same tokens: same logits and cache writes."""
    prompts = random_prompts(seed=6) if padded else [random_prompts(seed=6)[0]]
    ids, mask = left_pad(prompts)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    prefix = model.config.pre_seq_len or 0
    batch, capacity, steps = ids.shape[0], prefix + ids.shape[1] + 24, 6
    fused, plain = _decoder(model, batch, capacity, True), _decoder(model, batch, capacity, False)
    token = _prefill(model, fused, ids, mask)
    assert torch.equal(token, _prefill(model, plain, ids, mask))
    for step in range(steps):
        got, want = fused.run("logits").clone(), plain.run("logits").clone()
        assert got.shape == want.shape == (batch, model.config.padded_vocab_size)
        assert _relative(got, want) < 2e-2, f"step {step}"
        slot = prefix + ids.shape[1] + step
        for layer in range(model.config.num_layers):
            assert _relative(fused.cache.keys[layer][:, :, slot], plain.cache.keys[layer][:, :, slot]) < 1e-2
            assert _relative(fused.cache.values[layer][:, :, slot], plain.cache.values[layer][:, :, slot]) < 1e-2
        token = want.argmax(-1, keepdim=True)  # both are fed the reference's choice
        fused.token.copy_(token)
        plain.token.copy_(token)
    assert torch.equal(fused.position, plain.position) and torch.equal(fused.slot, plain.slot)


@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded-batch"])
@torch.no_grad()
def test_fused_step_with_a_p_tuning_prefix(padded):
    """The prefix fills the first cache slots; positions count from the first token after it."""
    _compare_steps(tiny_model(seed=5, pre_seq_len=4).half().to(DEVICE), padded)


# (BLOCK_N, units, warps, prefetch, split-K) of the Gluon int4 GEMV for the model below: K = 256 is 2 units of 128
# columns, 384 is 3, so 2 units per step leave a part-tile at the end of K, and 2 splits of 384 an uneven split.
GLUON_CASES = [(64, 1, 4, 0, 1), (64, 2, 4, 2, 2), (128, 2, 8, 0, 3)]


@pytest.mark.skipif(DEVICE != "cuda", reason="the Gluon int4 GEMV runs compiled on CUDA only (no interpreter)")
@pytest.mark.parametrize("config", GLUON_CASES, ids=["one-unit", "part-tile-split-2", "8-warps-split-3"])
@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded-batch"])
@torch.no_grad()
def test_gluon_int4_step_matches_model_forward(config, padded, monkeypatch):
    from chatglm import decode_kernels_chatglm as kernels
    from chatglm import int4_kernels_chatglm as gluon

    if not gluon.available(torch.device(DEVICE)):
        pytest.skip("Triton without Gluon, or a GPU older than sm_80: the fused step keeps its Triton GEMV")
    hidden, ffn = 256, 384
    monkeypatch.setattr(gluon, "GLUON_CONFIGS", {(hidden, hidden, kernels.EPI_RESIDUAL): config,
                                                 (hidden, ffn, kernels.EPI_RESIDUAL): config,
                                                 (ffn, hidden, kernels.EPI_SWIGLU): config})
    model = tiny_model(seed=5, hidden_size=hidden, kv_channels=64, ffn_hidden_size=ffn).half().to(DEVICE)
    model.quantize(4, backend="torch")
    mlp = model.transformer.encoder.layers[0].mlp
    for linear, epilogue in ((mlp.dense_h_to_4h, kernels.EPI_SWIGLU), (mlp.dense_4h_to_h, kernels.EPI_RESIDUAL)):
        assert kernels.gemv_launch(kernels.LinearWeights.of(linear), epilogue, 1).gluon is not None
    _compare_steps(model, padded)


@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded-batch"])
@torch.no_grad()
def test_fused_greedy_step_feeds_back_the_argmax(padded):
    """The greedy step (per-tile maxima in the output GEMV, then a finishing kernel) picks each row's argmax of
    the same step's logits and advances position and slot once; so do logits steps."""
    model = tiny_model(seed=7).half().to(DEVICE)
    prompts = random_prompts(seed=8) if padded else [random_prompts(seed=8)[0]]
    ids, mask = left_pad(prompts)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    batch, capacity = ids.shape[0], ids.shape[1] + 8
    greedy, logits = _decoder(model, batch, capacity, True), _decoder(model, batch, capacity, True)
    _prefill(model, greedy, ids, mask)
    _prefill(model, logits, ids, mask)
    for _ in range(3):
        want = logits.run("logits").argmax(-1, keepdim=True)
        assert torch.equal(greedy.run("greedy"), want)
        logits.token.copy_(want)
        assert torch.equal(greedy.position, logits.position) and torch.equal(greedy.slot, logits.slot)
        assert torch.equal(greedy.key_valid, logits.key_valid)
    assert int(greedy.slot) == ids.shape[1] + 3
    # banned ids (each row's favourite, say) are never picked: the best of the rest is
    scores = logits.run("logits").clone()
    greedy.ban(scores.argmax(-1).tolist())
    assert torch.equal(greedy.run("greedy_banned"),
                       scores.index_fill(1, greedy.banned, float("-inf")).argmax(-1, keepdim=True))


@pytest.mark.parametrize("capacity,block,slot", [(1500, 32, 1450), (5000, 64, 4950), (9000, 128, 8950),
                                                 (9000, 128, 300)])
@torch.no_grad()
def test_fused_attention_merges_splits_over_a_long_cache(capacity, block, slot):
    """Many key splits merged, padded keys ignored, slots past the current one ignored even when they hold stale
    values; each inner block size the cache length picks; a short context in a large cache (spread over splits by
    its own length)."""
    from chatglm.decode_kernels_chatglm import AttentionScratch, _load_triton, fused_attention

    assert _load_triton()
    torch.manual_seed(0)
    batch, groups, group, d = 2, 2, 3, 16
    keys = torch.randn(batch, groups, capacity, d, device=DEVICE).half()
    values = torch.randn(batch, groups, capacity, d, device=DEVICE).half()
    query = torch.randn(batch, groups * group * d, device=DEVICE).half()
    valid = torch.ones(batch, capacity, dtype=torch.bool, device=DEVICE)
    valid[1, :37] = False  # left padding of row 1
    scratch = AttentionScratch(batch, groups, group, d, capacity, torch.device(DEVICE))
    assert scratch.splits > 4 and scratch.block == block and scratch.chunk % block == 0
    out = torch.empty_like(query)
    fused_attention(query, keys, values, valid.view(torch.uint8), torch.tensor([slot], device=DEVICE), scratch, out)

    q = query.float().view(batch, groups, group, d)
    k, v = keys[:, :, :slot + 1].float(), values[:, :, :slot + 1].float()
    scores = torch.einsum("bghd,bgsd->bghs", q, k) / d ** 0.5
    scores = scores.masked_fill(~valid[:, None, None, :slot + 1], float("-inf"))
    want = torch.einsum("bghs,bgsd->bghd", scores.softmax(-1), v).reshape(batch, -1)
    assert _relative(out, want) < 5e-3


def test_greedy_token_is_the_first_maximum():
    from chatglm.decode_kernels_chatglm import greedy_token

    logits = torch.randn(3, 512)
    logits[1, 300] = logits[1, 5] = 100.0  # a tie across blocks: the first index wins, as in torch.argmax
    logits[2, 7] = logits[2, 9] = 100.0  # a tie inside a block
    assert torch.equal(greedy_token(logits), logits.argmax(-1, keepdim=True))
    assert greedy_token(logits)[:, 0].tolist()[1:] == [5, 7]


def test_fused_step_declines_what_it_cannot_serve(monkeypatch):
    from chatglm import decode_kernels_chatglm as kernels
    from chatglm.decode_kernels_chatglm import unsupported_reason

    model = tiny_model(seed=5).half().to(DEVICE)
    assert unsupported_reason(model, 1) is None
    assert "batch" in unsupported_reason(model, 17)
    assert "dtype" in unsupported_reason(tiny_model(seed=5).to(DEVICE), 1)
    monkeypatch.setenv("CHATGLM_FUSED_DECODE", "0")
    assert "CHATGLM_FUSED_DECODE" in unsupported_reason(model, 1)
    monkeypatch.delenv("CHATGLM_FUSED_DECODE")
    quantized = model.quantize(4, backend="torch")
    assert unsupported_reason(quantized, 1) is None
    monkeypatch.setattr(kernels, "FUSED_BITS", (16, 8))  # a weight kind switched off is declined by name
    assert "int4" in unsupported_reason(quantized, 1)
