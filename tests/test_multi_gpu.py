"""A model on a GPU other than the current one, a model split over two GPUs by a device map, and a full fine-tune
sharded over two GPUs (FSDP).

The official code fails with device mismatches in the cache when a 32K/128K model is split over GPUs (SPEC §7).
Here every path must give what the same model gives on one GPU: the forward pass, generate() with the dynamic
cache and with the static fast path, P-tuning prefixes, the fused long-prefill kernels, and quantized linears.
Triton launches on the *current* device, so a kernel of a layer on cuda:1 is only right if it is launched there.

These tests need two CUDA devices and skip elsewhere.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from test_modeling import left_pad, random_prompts

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs two CUDA devices (the model is put on cuda:1, or split over cuda:0 and cuda:1)")

LAYERS = 4
NEW = 8


def batch(device) -> dict:
    """Two left-padded prompts of different lengths."""
    ids, mask = left_pad(random_prompts(seed=2, lengths=(9, 5)))
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def long_ids(device, length: int = 37) -> torch.Tensor:
    return torch.randint(10, 500, (1, length), generator=torch.Generator().manual_seed(3)).to(device)


@pytest.fixture
def small_blocks(monkeypatch):
    """The long-prefill path (chunks, fused kernels, blocked cuDNN attention) at a length of a few dozen tokens;
    returns the list the merge kernel appends to when it runs."""
    import chatglm.modeling_chatglm as modeling
    from chatglm import prefill_kernels_chatglm as kernels

    monkeypatch.delenv("CHATGLM_FUSED_PREFILL", raising=False)
    monkeypatch.setattr(modeling, "PREFILL_CHUNK", 4)
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", 8)
    monkeypatch.setattr(kernels, "MIN_BLOCKED_LENGTH", 16)
    merges = []
    monkeypatch.setattr(kernels, "_merge", lambda parts, lses, out, f=kernels._merge: merges.append(out.device)
                        or f(parts, lses, out))
    return merges


def split(model, tail: int) -> torch.nn.Module:
    """`model` dispatched by accelerate over cuda:0 and cuda:1 (`two_gpu_device_map`)."""
    from accelerate import dispatch_model
    from multi_gpu_check import two_gpu_device_map  # tools/

    device_map = two_gpu_device_map(model.config.num_layers, tail)
    if getattr(model.transformer, "prefix_encoder", None) is not None:
        device_map["transformer.prefix_encoder"] = 0
    return dispatch_model(model, device_map=device_map)


def outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits and every layer's cached keys and values, on the CPU."""
    from chatglm.compat_chatglm import cache_layer

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return [t.float().cpu() for t in [out.logits] + [t for layer in range(model.config.num_layers)
                                                     for t in cache_layer(out.past_key_values, layer)]]


def greedy(model, inputs: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs).cpu()


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor], **tolerance) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)


# ------------------------------------------------------------------------------------------ one GPU, not cuda:0
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_model_on_second_gpu_matches_first(dtype, small_blocks):
    """On cuda:1 (cuda:0 current): forward, the fused long prefill, and the static fast path (fused Triton step
    in a CUDA graph) give exactly what the model gives on cuda:0."""
    first = tiny_model(seed=4, num_layers=LAYERS).to("cuda:0", dtype)
    second = copy.deepcopy(first).to("cuda:1")
    assert torch.cuda.current_device() == 0
    with torch.no_grad():
        torch.testing.assert_close(second(**batch("cuda:1")).logits.cpu(), first(**batch("cuda:0")).logits.cpu(),
                                   rtol=0, atol=0)
    assert_same(outputs(second, long_ids("cuda:1")), outputs(first, long_ids("cuda:0")), rtol=0, atol=0)
    assert torch.device("cuda:1") in small_blocks, "the blocked attention should have run on cuda:1"
    want = greedy(first, batch("cuda:0"), cache_implementation="static")
    got = greedy(second, batch("cuda:1"), cache_implementation="static")
    assert second._chatglm_decoder.fused is not None and second._chatglm_decoder.use_graphs
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(greedy(second, batch("cuda:1")), greedy(first, batch("cuda:0")), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_on_second_gpu_matches_first(bits):
    """Quantized linears (Triton kernels) on cuda:1: the same logits and fast-path tokens as on cuda:0."""
    first = tiny_model(seed=4, num_layers=LAYERS).half().to("cuda:0").quantize(bits)
    second = copy.deepcopy(first).to("cuda:1")
    with torch.no_grad():
        torch.testing.assert_close(second(**batch("cuda:1")).logits.cpu(), first(**batch("cuda:0")).logits.cpu(),
                                   rtol=0, atol=0)
    torch.testing.assert_close(greedy(second, batch("cuda:1"), cache_implementation="static"),
                               greedy(first, batch("cuda:0"), cache_implementation="static"), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ split over two GPUs
@pytest.mark.parametrize("tail", [0, 1], ids=["norm_on_cuda0", "norm_on_cuda1"])
def test_split_model_matches_one_gpu(tail):
    """float32 model over cuda:0 + cuda:1: logits, and generate() with the dynamic cache, with
    cache_implementation="static" (the fast path, stepping eagerly) and through fast_generate, as on one GPU."""
    single = tiny_model(seed=4, num_layers=LAYERS).to("cuda:0")
    model = split(copy.deepcopy(single).cpu(), tail)
    assert {p.device.index for p in model.parameters()} == {0, 1}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch("cuda:0")).logits.cpu(), single(**batch("cuda:0")).logits.cpu(),
                                   rtol=1e-5, atol=1e-5)
    want = greedy(single, batch("cuda:0"))
    torch.testing.assert_close(greedy(model, batch("cuda:0")), want, rtol=0, atol=0)
    torch.testing.assert_close(greedy(model, batch("cuda:0"), cache_implementation="static"), want, rtol=0, atol=0)
    decoder = model._chatglm_decoder
    assert [k.device.index for k in decoder.cache.keys] == [0] * (LAYERS // 2) + [1] * (LAYERS // 2)
    assert not decoder.use_graphs
    with torch.no_grad():
        fast = model.fast_generate(**batch("cuda:0"), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    torch.testing.assert_close(fast.cpu(), want, rtol=0, atol=0)


def test_model_moved_or_split_after_a_first_generate():
    """The static fast path of a model that was used on cuda:0, then moved to cuda:1, then split over both, follows
    the model (a new cache and step for each placement) and gives the same tokens each time."""
    model = tiny_model(seed=4, num_layers=LAYERS).to("cuda:0")
    want = greedy(model, batch("cuda:0"))
    torch.testing.assert_close(greedy(model, batch("cuda:0"), cache_implementation="static"), want, rtol=0, atol=0)
    model.to("cuda:1")
    torch.testing.assert_close(greedy(model, batch("cuda:1"), cache_implementation="static"), want, rtol=0, atol=0)
    assert {k.device.index for k in model._chatglm_decoder.cache.keys} == {1}
    model = split(model.cpu(), 1)
    torch.testing.assert_close(greedy(model, batch("cuda:0"), cache_implementation="static"), want, rtol=0, atol=0)
    assert [k.device.index for k in model._chatglm_decoder.cache.keys] == [0] * (LAYERS // 2) + [1] * (LAYERS // 2)


@pytest.mark.parametrize("tail", [0, 1], ids=["norm_on_cuda0", "norm_on_cuda1"])
def test_split_model_long_prefill_matches_one_gpu(tail, small_blocks):
    """fp16 over two GPUs, long input: the chunked prefill with the fused kernels and the blocked attention runs
    on each layer's GPU and gives exactly the single-GPU logits and cache."""
    single = tiny_model(seed=4, num_layers=LAYERS).to("cuda:0", torch.float16)
    model = split(copy.deepcopy(single).cpu(), tail)
    want = outputs(single, long_ids("cuda:0"))
    small_blocks.clear()
    assert_same(outputs(model, long_ids("cuda:0")), want, rtol=0, atol=0)
    assert set(small_blocks) == {torch.device("cuda:0"), torch.device("cuda:1")}, small_blocks


def test_split_p_tuning_model_matches_one_gpu():
    """A P-tuning v2 model (prefix keys/values for every layer) split over two GPUs: each layer gets its prefix
    on its own device; logits and generated tokens as on one GPU."""
    single = tiny_model(seed=4, num_layers=LAYERS, pre_seq_len=3).to("cuda:0")
    model = split(copy.deepcopy(single).cpu(), 1)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch("cuda:0")).logits.cpu(), single(**batch("cuda:0")).logits.cpu(),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(greedy(model, batch("cuda:0")), greedy(single, batch("cuda:0")), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_split_quantized_model_matches_one_gpu(bits):
    """int4/int8 (official format) over two GPUs: the quantized kernels run on each layer's GPU."""
    single = tiny_model(seed=4, num_layers=LAYERS).half().to("cuda:0").quantize(bits)
    model = split(copy.deepcopy(single).cpu(), 1)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch("cuda:0")).logits.cpu(), single(**batch("cuda:0")).logits.cpu(),
                                   rtol=0, atol=0)
    torch.testing.assert_close(greedy(model, batch("cuda:0")), greedy(single, batch("cuda:0")), rtol=0, atol=0)


def test_from_pretrained_with_a_two_gpu_device_map(tmp_path):
    """`AutoModel.from_pretrained(dir, trust_remote_code=True, device_map={...: 0 / 1})`, as the ChatGLM demos'
    multi-GPU loader does: the layers land on both GPUs and generate() gives the single-GPU tokens."""
    from compat_util import build
    from multi_gpu_check import two_gpu_device_map  # tools/
    from transformers import AutoModel

    folder = build(tmp_path, "two_gpus")
    single = AutoModel.from_pretrained(str(folder), trust_remote_code=True).to("cuda:0").eval()
    device_map = two_gpu_device_map(single.config.num_layers, tail=0)  # the official layout
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, device_map=device_map).eval()
    assert {p.device.index for p in model.parameters()} == {0, 1}
    torch.testing.assert_close(greedy(model, batch("cuda:0")), greedy(single, batch("cuda:0")), rtol=0, atol=0)
    torch.testing.assert_close(greedy(model, batch("cuda:0"), cache_implementation="static"),
                               greedy(single, batch("cuda:0")), rtol=0, atol=0)


@pytest.mark.parametrize("pre_seq_len", [None, 3], ids=["full", "p_tuning"])
def test_split_model_trains_like_one_gpu(pre_seq_len):
    """Fine-tuning a model split over two GPUs, with gradient checkpointing (and a P-tuning prefix): the loss and
    every gradient equal the single-GPU ones."""
    single = tiny_model(seed=4, num_layers=LAYERS, pre_seq_len=pre_seq_len).to("cuda:0")
    model = split(copy.deepcopy(single).cpu(), 1)
    inputs = batch("cuda:0")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    losses = []
    for m in (single, model):
        m.train()
        if pre_seq_len:
            m.transformer.dropout.p = 0.0  # the prefix dropout would draw different masks on the two models
        m.gradient_checkpointing_enable()
        loss = m(**inputs, labels=labels).loss
        loss.backward()
        losses.append(loss.detach().cpu())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = [(name, p.grad) for name, p in single.named_parameters() if p.grad is not None]
    assert grads, "nothing was trained"
    split_grads = dict(model.named_parameters())
    for name, grad in grads:
        torch.testing.assert_close(split_grads[name].grad.cpu(), grad.cpu(), rtol=1e-4, atol=1e-6, msg=name)


def test_data_parallel_ptuning_model_matches_one_gpu():
    """torch.nn.DataParallel (what Trainer uses on a multi-GPU host without torchrun) over a P-tuning model: its
    replicas hold weights as plain tensors, and the prefix must still find each layer's device."""
    model = tiny_model(seed=4, num_layers=LAYERS, pre_seq_len=3).to("cuda:0")
    ids = torch.randint(10, 500, (4, 7), generator=torch.Generator().manual_seed(6)).to("cuda:0")
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = torch.nn.DataParallel(model, device_ids=[0, 1])(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ FSDP fine-tuning
@pytest.fixture
def memorize(tmp_path):
    """A tiny model folder and a data file of one conversation."""
    import json

    from make_tiny_model import make_tiny_model
    from test_finetune import MEMORIZE

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"conversations": MEMORIZE}) + "\n", encoding="utf-8")
    return make_tiny_model(tmp_path / "model", tmp_path / "no-tokenizer.model"), data


def finetune_run(memorize, out, *extra: str, processes: int = 1) -> dict:
    """tools/finetune.py --method full in float32 on `processes` GPUs (torchrun when more than one) → its summary."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    model_dir, data = memorize
    command = [str(REPO / "tools" / "finetune.py"), "--model", str(model_dir), "--data", str(data), "--out", str(out),
               "--method", "full", "--dtype", "float32", "--lr", "1e-3", "--max-steps", "6", "--scheduler",
               "constant", "--logging-steps", "1", *extra]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29513"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(processes))}
    done = subprocess.run([sys.executable, *(launcher if processes > 1 else []), *command], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"examples"')]
    assert len(summaries) == 1, f"one process prints the summary\n{done.stdout[-2000:]}"
    return summaries[0]


def test_fsdp_full_finetune_matches_one_gpu(memorize, tmp_path):
    """`torchrun --nproc_per_node 2 finetune.py --method full --fsdp` in float32 on copies of one example: each
    process's gradient is the one-GPU gradient, so the losses and the gathered result must be the one-GPU ones, and
    the result must load as a model folder of its own (FSDP2 changes the model's class; the code saved is ours)."""
    from finetune import load_finetuned
    from test_finetune import base, logits

    one = finetune_run(memorize, tmp_path / "one")
    sharded = finetune_run(memorize, tmp_path / "fsdp", "--fsdp", processes=2)
    assert len(one["logged_losses"]) == 6
    torch.testing.assert_close(torch.tensor(sharded["logged_losses"]), torch.tensor(one["logged_losses"]),
                               rtol=1e-4, atol=1e-5)
    assert not any(path.name.startswith("_fsdp") for path in (tmp_path / "fsdp").iterdir())
    model_dir = str(memorize[0])
    one_model, tok = load_finetuned(model_dir, str(tmp_path / "one"))
    sharded_model, _ = load_finetuned(model_dir, str(tmp_path / "fsdp"))
    assert sharded_model.config.architectures == ["ChatGLMForConditionalGeneration"]
    torch.testing.assert_close(logits(sharded_model, tok), logits(one_model, tok), rtol=1e-4, atol=1e-4)
    assert (logits(sharded_model, tok) - logits(base({"model": memorize[0]})[0], tok)).abs().max() > 1e-3


def test_fsdp_checkpoint_loads_and_resumes(memorize, tmp_path):
    """--fsdp --save-steps 3: checkpoint-3 loads as a model folder (our code in it, not torch's FSDP files), and a
    run resumed from it logs the losses and ends with the weights of the run that went through."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModel

    through = finetune_run(memorize, tmp_path / "through", "--fsdp", "--save-steps", "3", processes=2)
    checkpoint = tmp_path / "through" / "checkpoint-3"
    assert not list(checkpoint.glob("_fsdp*.py")) and (checkpoint / "modeling_chatglm.py").is_file()
    AutoModel.from_pretrained(str(checkpoint), trust_remote_code=True)
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-3")
    resumed = finetune_run(memorize, tmp_path / "resumed", "--fsdp", "--save-steps", "3", "--resume", processes=2)
    torch.testing.assert_close(torch.tensor(resumed["logged_losses"]), torch.tensor(through["logged_losses"]),
                               rtol=1e-4, atol=1e-5)
    want, got = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("through", "resumed"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
