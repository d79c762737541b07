"""Issue 6, Model and Layouts: the model calls of existing ChatGLM client programs, made the way they make them.

Each test names the client whose call it repeats. The models are tiny random-weight folders written by
tools/make_tiny_model.py and loaded with `from_pretrained(dir, trust_remote_code=True)`; no tokenizer is involved,
so nothing here needs ../shared.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from compat_util import (
    OFFICIAL_DEVICE_MAP_MODULES,
    accepts_kwarg,
    build,
    cpu_half_matmul_works,
    left_padded_inputs,
    official_device_map,
    skip_without,
)
from conftest import REPO

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

PROMPTS = [[64790, 64792, 36474, 54591, 30910, 13], [64790, 64792, 24954, 627]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("compat_model"), "glm3_model")


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModel.from_pretrained(str(model_dir), trust_remote_code=True).eval()


def inputs():
    return left_padded_inputs(PROMPTS)


def logits_of(model, **kwargs):
    with torch.no_grad():
        return model(**inputs(), **kwargs).logits.float()


# ------------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("empty_init", [True, False])
def test_init_with_empty_init_and_device(model, empty_init):
    """quantization/conversion scripts: `ChatGLMForConditionalGeneration(config, empty_init=..., device=...)`."""
    cls = type(model)
    built = cls(model.config, empty_init=empty_init, device="cpu")
    assert all(p.device.type == "cpu" for p in built.parameters())
    on_meta = cls(model.config, empty_init=empty_init, device="meta")
    body = [n for n, p in on_meta.named_parameters() if p.device.type != "meta"]
    assert body == [], f"parameters not created on the requested device: {body}"
    # the inner model takes the official arguments too
    inner = type(model.transformer)(model.config, device="cpu", empty_init=empty_init)
    assert inner.encoder.layers[0].self_attention.query_key_value.weight.device.type == "cpu"


def test_from_pretrained_empty_init_false_use_cache_false(model_dir, model):
    """ChatGLM3 finetune_demo: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True,
    empty_init=False, use_cache=False)` loads the saved weights (no re-initialisation) with the cache off."""
    loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True, empty_init=False,
                                                  use_cache=False).eval()
    assert loaded.config.use_cache is False
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        out = loaded(**inputs())
    assert out.past_key_values is None
    torch.testing.assert_close(out.logits, logits_of(model))


def test_from_pretrained_torch_dtype_bfloat16(model_dir):
    """ChatGLM3 finetune_demo / LLaMA-Factory: `torch_dtype=torch.bfloat16`; RMSNorm weights upcast to float32
    afterwards (LLaMA-Factory's `upcast_layernorm`) still run."""
    loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True, empty_init=False,
                                                  torch_dtype=torch.bfloat16).eval()
    assert loaded.dtype == torch.bfloat16
    for name, param in loaded.named_parameters():
        if param.ndim == 1 and any(ln in name for ln in ("norm", "ln_f", "ln_attn", "ln_mlp")):
            param.data = param.data.to(torch.float32)
    with torch.no_grad():
        logits = loaded(**inputs()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_config_prefix_frozen_base_and_prefix_checkpoint(model_dir, tmp_path, projection):
    """ChatGLM2/3 P-tuning v2 (ptuning/main.py, finetune_demo): AutoConfig with pre_seq_len, from_pretrained with
    config=, only the prefix encoder trains, the trainer saves the trainable parameters and a later run loads
    them with `model.transformer.prefix_encoder.load_state_dict(...)`."""
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True, pre_seq_len=128)
    assert config.pre_seq_len == 128
    config.prefix_projection = projection
    model = AutoModel.from_pretrained(str(model_dir), config=config, trust_remote_code=True)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable), trainable
    assert all(not p.requires_grad for n, p in model.named_parameters() if "prefix_encoder" not in n)
    assert model.transformer.pre_seq_len == 128

    # one training step: gradients reach the prefix and nothing else
    model.train()
    batch = inputs()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in model.transformer.prefix_encoder.parameters():
            p.add_(torch.randn_like(p))

    # PrefixTrainer._save: {name: param for trainable params} → pytorch_model.bin
    state = {k: v for k, v in model.named_parameters() if v.requires_grad}
    torch.save(state, tmp_path / "pytorch_model.bin")

    # the loading snippet of ptuning/main.py and of the web/cli demos
    config2 = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True, pre_seq_len=128)
    config2.prefix_projection = projection
    reloaded = AutoModel.from_pretrained(str(model_dir), config=config2, trust_remote_code=True)
    prefix_state_dict = torch.load(os.path.join(tmp_path, "pytorch_model.bin"))
    new_prefix_state_dict = {}
    for k, v in prefix_state_dict.items():
        if k.startswith("transformer.prefix_encoder."):
            new_prefix_state_dict[k[len("transformer.prefix_encoder."):]] = v
    reloaded.transformer.prefix_encoder.load_state_dict(new_prefix_state_dict)
    model.eval()
    reloaded.eval()
    torch.testing.assert_close(logits_of(reloaded), logits_of(model))


# ------------------------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_before_moving_to_the_device(model_dir, model, bits):
    """ChatGLM2/3 cli/web demos: `AutoModel.from_pretrained(...).quantize(4).cuda()` (here: CPU), and the
    official signature `quantize(bits, empty_init=False, device=None)`; quantize returns the model."""
    fresh = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True)
    quantized = fresh.quantize(bits, empty_init=False, device=None)
    assert quantized is fresh
    quantized = quantized.to("cpu").eval()  # stands for .cuda(): no GPU here
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        quantized = quantized.cuda()
    weight = quantized.transformer.encoder.layers[0].self_attention.query_key_value.weight
    assert weight.dtype == torch.int8
    assert getattr(quantized.config, "quantization_bit", None) == bits
    device_inputs = {k: v.to(quantized.device) for k, v in inputs().items()}
    with torch.no_grad():
        logits = quantized(**device_inputs).logits.float().cpu()
    reference = logits_of(model)
    assert torch.isfinite(logits).all()
    rel = (logits - reference).norm() / reference.norm()
    assert rel < (0.2 if bits == 4 else 0.05), f"int{bits} logits off by {float(rel):.3f}"
    out = quantized.generate(**device_inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs()["input_ids"].shape[1] + 3)
    # second call is the quantize-on-load path of the int4 checkpoints: a no-op, still returns the model
    assert quantized.quantize(bits) is quantized


def test_ptuning_with_quantize_half_and_float_prefix(model_dir):
    """ChatGLM2 ptuning/main.py and ChatGLM3 finetune_chatmodel_demo: quantize, then `.half()`,
    `transformer.prefix_encoder.float()`, `gradient_checkpointing_enable()`, `enable_input_require_grads()`,
    then train. On CPU the half-precision step needs torch's CPU float16 kernels (present in current torch)."""
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True, pre_seq_len=16)
    model = AutoModel.from_pretrained(str(model_dir), config=config, trust_remote_code=True)
    model = model.quantize(4)
    half = torch.float16 if cpu_half_matmul_works() else torch.bfloat16
    model = model.half() if half == torch.float16 else model.bfloat16()
    model.transformer.prefix_encoder.float()
    assert model.transformer.prefix_encoder.embedding.weight.dtype == torch.float32
    assert model.transformer.embedding.word_embeddings.weight.dtype == half
    assert model.transformer.encoder.layers[0].self_attention.query_key_value.weight.dtype == torch.int8
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    before = model.transformer.prefix_encoder.embedding.weight.detach().clone()
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    grad = model.transformer.prefix_encoder.embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0, "the prefix gets no gradient under gradient checkpointing"
    optimizer.step()
    assert not torch.equal(before, model.transformer.prefix_encoder.embedding.weight)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "prefix_encoder" not in n)


def test_ptuning_with_gradient_checkpointing_matches_without(model_dir):
    """The prefix must take part in the checkpointed forward: same loss and prefix gradient as without."""
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True, pre_seq_len=4)
    results = []
    for checkpointing in (False, True):
        model = AutoModel.from_pretrained(str(model_dir), config=config, trust_remote_code=True)
        torch.manual_seed(0)
        with torch.no_grad():
            model.transformer.prefix_encoder.embedding.weight.normal_()
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()
        model.transformer.dropout.p = 0.0  # the prefix dropout would make the two runs differ
        batch = inputs()
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), model.transformer.prefix_encoder.embedding.weight.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert results[1][1] is not None, "no prefix gradient with gradient checkpointing"
    torch.testing.assert_close(results[1][1], results[0][1])


# ------------------------------------------------------------------------------------------------- dtypes, devices
def test_dtype_methods_eval_and_device(model_dir):
    """`.half() / .bfloat16() / .float() / .eval()` return the model; `.device` is a torch.device."""
    m = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True)
    assert m.eval() is m and not m.training
    assert m.device == torch.device("cpu")
    assert m.bfloat16() is m and m.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(m(**inputs()).logits.float()).all()
    assert m.half() is m and m.dtype == torch.float16
    if cpu_half_matmul_works():
        with torch.no_grad():
            assert torch.isfinite(m(**inputs()).logits.float()).all()
    assert m.float() is m and m.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(m(**inputs()).logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda(model_dir):  # pragma: no cover - GPU machines
    m = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True).half().cuda().eval()
    assert m.device.type == "cuda"
    batch = {k: v.cuda() for k, v in inputs().items()}
    assert m.generate(**batch, max_new_tokens=2, do_sample=False).device.type == "cuda"


def test_input_embeddings_and_enable_input_require_grads(model_dir):
    """PEFT/LLaMA-Factory: `get_input_embeddings()` and `enable_input_require_grads()` on a frozen model."""
    m = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True)
    assert m.get_input_embeddings() is m.transformer.embedding.word_embeddings
    assert m.get_output_embeddings() is m.transformer.output_layer
    for p in m.parameters():
        p.requires_grad_(False)
    m.enable_input_require_grads()
    captured = {}
    m.get_input_embeddings().register_forward_hook(lambda mod, inp, out: captured.setdefault("emb", out))
    m(**inputs())
    assert captured["emb"].requires_grad


def test_gradient_checkpointing_enable(model_dir):
    """`gradient_checkpointing_enable()` (and, where transformers takes it, with
    `gradient_checkpointing_kwargs={"use_reentrant": True}` as LLaMA-Factory passes it) gives the same loss and
    gradients as without."""
    losses, grads = [], []
    for mode in ("off", "default", "reentrant"):
        m = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True)
        if mode == "default":
            m.gradient_checkpointing_enable()
        elif mode == "reentrant":
            if not accepts_kwarg(m.gradient_checkpointing_enable, "gradient_checkpointing_kwargs"):
                continue  # transformers < 4.35 has no kwargs here
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            m.enable_input_require_grads()
        if mode != "off":
            assert m.is_gradient_checkpointing
        m.config.use_cache = False
        m.train()
        batch = inputs()
        loss = m(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(m.transformer.encoder.layers[0].self_attention.query_key_value.weight.grad)
    for loss, grad in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(loss, losses[0])
        torch.testing.assert_close(grad, grads[0])


# ------------------------------------------------------------------------------------------------- generation
def test_generation_mixin_is_explicit(model):
    """transformers >= 4.50 no longer mixes GenerationMixin into PreTrainedModel: the class must list it."""
    from transformers.generation.utils import GenerationMixin

    assert isinstance(model, GenerationMixin)
    assert GenerationMixin in type(model).__mro__
    assert model.can_generate()


def test_llama_factory_generate_patch_keeps_generate_working(model_dir):
    """LLaMA-Factory's patch_model (and projects copying it) replaces a model's own `generate`:
    `if "GenerationMixin" not in str(model.generate.__func__): model.generate = MethodType(PreTrainedModel.generate,
    model)`. `PreTrainedModel.generate` no longer exists on transformers >= 4.50, so generate must come from a
    GenerationMixin (or a class whose name says so) for that load to succeed; afterwards generate must work."""
    from types import MethodType

    from transformers import PreTrainedModel

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    if "GenerationMixin" not in str(m.generate.__func__):
        m.generate = MethodType(PreTrainedModel.generate, m)
    if getattr(m.config, "model_type", None) == "chatglm":
        setattr(m, "lm_head", m.transformer.output_layer)
        setattr(m, "_keys_to_ignore_on_save", ["lm_head.weight"])
    out = m.generate(**inputs(), max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs()["input_ids"].shape[1] + 2


def test_generate_with_position_ids_in_the_inputs(model):
    """Clients pass the tokenizer output unchanged: `model.generate(**inputs)` with `position_ids` in it."""
    batch = inputs()
    with_pos = model.generate(**batch, max_new_tokens=4, do_sample=False)
    without = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=4, do_sample=False)
    assert torch.equal(with_pos, without)
    # each row continues as it would alone
    alone = model.generate(**left_padded_inputs(PROMPTS[1:]), max_new_tokens=4, do_sample=False)
    assert with_pos[1, -4:].tolist() == alone[0, -4:].tolist()


def test_forward_return_last_logit(model):
    """The official `forward(..., return_last_logit=True)` gives the last position's logits only."""
    with torch.no_grad():
        full = model(**inputs()).logits
        last = model(**inputs(), return_last_logit=True).logits
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:])


# ------------------------------------------------------------------------------------------------- accelerate
def test_device_map_module_names(model):
    """The names the official `auto_configure_device_map` and accelerate's planner use exist as modules."""
    modules = dict(model.named_modules())
    for name in OFFICIAL_DEVICE_MAP_MODULES:
        assert name in modules, name
    for i in range(model.config.num_layers):
        assert f"transformer.encoder.layers.{i}" in modules
        assert type(modules[f"transformer.encoder.layers.{i}"]).__name__ == "GLMBlock"
    assert "GLMBlock" in model._no_split_modules


def test_infer_auto_device_map(model):
    """accelerate's `infer_auto_device_map` (what device_map="auto" runs) keeps GLMBlocks whole and uses only
    module names of the model; with a small budget per device it splits at encoder layers."""
    from accelerate import infer_auto_device_map

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = infer_auto_device_map(model, max_memory={0: int(size * 0.6), 1: int(size * 0.6), "cpu": size * 4},
                                       no_split_module_classes=model._no_split_modules)
    modules = dict(model.named_modules())
    assert set(device_map) and all(name in modules or name == "" for name in device_map), device_map
    assert not any(re.search(r"layers\.\d+\.", name) for name in device_map), f"a GLMBlock was split: {device_map}"
    assert len(set(device_map.values())) > 1, device_map


def test_official_device_map_with_dispatch_model(model_dir, model):
    """ChatGLM2/3 utils.load_model_on_gpus: `dispatch_model(model, device_map=auto_configure_device_map(n))`,
    whose map also names 'lm_head'; here every target is the CPU."""
    from accelerate import dispatch_model

    m = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True)
    m = dispatch_model(m, device_map=official_device_map(m.config.num_layers)).eval()
    torch.testing.assert_close(logits_of(m), logits_of(model))
    assert m.generate(**inputs(), max_new_tokens=2, do_sample=False).shape[1] == inputs()["input_ids"].shape[1] + 2


@pytest.mark.parametrize("device_map", ["auto", "names"])
def test_from_pretrained_with_device_map(model_dir, model, device_map):
    """ChatGLM3 demos: `AutoModel.from_pretrained(dir, trust_remote_code=True, device_map="auto")`, and a device
    map written with the official module names."""
    if device_map == "names":
        device_map = {k: "cpu" for k in official_device_map(model.config.num_layers) if k != "lm_head"}
    m = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True, device_map=device_map).eval()
    auto_gpu = device_map == "auto" and torch.cuda.is_available()  # "auto" uses the GPUs where there are some
    assert m.device.type == ("cuda" if auto_gpu else "cpu")
    with torch.no_grad():
        got = m(**{k: v.to(m.device) for k, v in inputs().items()}).logits.float().cpu()
    torch.testing.assert_close(got, logits_of(model), **(dict(rtol=1e-4, atol=1e-4) if auto_gpu else {}))


# ------------------------------------------------------------------------------------------------- PEFT LoRA
def _lora(model):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1,
                        target_modules=["query_key_value"])
    return get_peft_model(model, config)


def test_peft_lora_trains_saves_and_loads(model_dir, model, tmp_path):
    """ChatGLM3 finetune_hf.py / LLaMA-Factory: LoRA on `query_key_value`, a training step with gradient
    checkpointing and input grads, save_pretrained, then PeftModel.from_pretrained (and merge_and_unload, as
    chatglm.cpp's converter does) gives the trained model's outputs."""
    skip_without("peft")
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True, empty_init=False,
                                                use_cache=False)
    peft_model = _lora(base)
    peft_model.print_trainable_parameters()
    lora_names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert lora_names and all("lora_" in n and "query_key_value" in n for n in lora_names)
    base.gradient_checkpointing_enable()
    base.enable_input_require_grads()
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(2):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad and "lora_A" in n]
        assert all(g is not None for g in grads), "LoRA weights got no gradient"
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    trained = logits_of(peft_model)
    assert not torch.allclose(trained, logits_of(model)), "training changed nothing"

    fresh = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits_of(loaded), trained)
    out = loaded.generate(**inputs(), max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs()["input_ids"].shape[1] + 2
    merged = loaded.merge_and_unload().eval()
    torch.testing.assert_close(logits_of(merged), trained, rtol=1e-4, atol=1e-4)
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in merged.state_dict()


def test_peft_auto_peft_model_loads_with_trust_remote_code(model_dir, tmp_path):
    """ChatGLM3 finetune_demo inference: `AutoPeftModelForCausalLM.from_pretrained(adapter, trust_remote_code=True)`
    reads the base folder from the adapter config."""
    peft = skip_without("peft")
    if not hasattr(peft, "AutoPeftModelForCausalLM"):
        pytest.skip(f"peft {peft.__version__} has no AutoPeftModelForCausalLM (added in 0.5)")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True)
    peft_model = _lora(base)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), trust_remote_code=True)
    assert loaded.peft_config["default"].base_model_name_or_path == str(model_dir)
    with torch.no_grad():
        assert torch.isfinite(loaded(**inputs()).logits).all()


# ------------------------------------------------------------------------------------------------- layouts
def test_cached_length_and_batch_first_layouts(model):
    """Layouts: the cache length is `past_key_values.get_seq_length()` (official clients read
    `past_key_values[0][0].shape[0]`), hidden states are [batch, seq, hidden] (official: [seq, batch, hidden])."""
    batch = inputs()
    b, n = batch["input_ids"].shape
    with torch.no_grad():
        out = model(**batch, use_cache=True, output_hidden_states=True)
    assert out.past_key_values.get_seq_length() == n
    assert len(out.hidden_states) == model.config.num_layers + 1
    for h in out.hidden_states:
        assert h.shape == (b, n, model.config.hidden_size)
    from chatglm.compat_chatglm import cache_layer

    key, value = cache_layer(out.past_key_values, 0)
    assert key.shape == (b, model.config.multi_query_group_num, n, model.config.kv_channels)
    # one decode step grows it by one
    step = {"input_ids": torch.tensor([[5], [6]]), "position_ids": batch["position_ids"][:, -1:] + 1,
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones(b, 1, dtype=torch.long)], 1)}
    with torch.no_grad():
        out2 = model(**step, past_key_values=out.past_key_values, use_cache=True)
    assert out2.past_key_values.get_seq_length() == n + 1


def test_cached_length_with_a_prefix(model_dir):
    """ChatGLM3 composite_demo subtracts `model.transformer.pre_seq_len` from the cached length: the prefix
    counts in `get_seq_length()` as it did in the official tuple cache."""
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True, pre_seq_len=8)
    m = AutoModel.from_pretrained(str(model_dir), config=config, trust_remote_code=True).eval()
    batch = inputs()
    with torch.no_grad():
        out = m(**batch, use_cache=True)
    assert out.past_key_values.get_seq_length() - m.transformer.pre_seq_len == batch["input_ids"].shape[1]


def test_readme_migration_notes_name_the_layout_changes():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    notes = readme[readme.index("## Migration notes"):]
    notes = notes[:notes.index("\n## ", 4)]
    assert "past_key_values.get_seq_length()" in notes
    assert "past_key_values[0][0].shape[0]" in notes
    assert "transpose(0, 1)" in notes
    assert "batch-first" in notes
