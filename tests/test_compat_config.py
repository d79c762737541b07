"""Issue 6, Config and files: what engines and converters read from our config files and model folders.

vLLM and chatglm.cpp's converter read config fields by name, with their own defaults when a field is missing
(often the wrong ones for ChatGLM), so our config.json files state every such field explicitly. The reads here
follow those programs: vLLM's ChatGLM model/ModelConfig and chatglm.cpp's `convert.py`.
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import torch

from compat_util import build
from conftest import REPO

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

CONFIG_FILES = [REPO / "config.json"] + sorted((REPO / "variants").glob("*/config.json"))
CHATGLM3_GENERATION = [REPO / "generation_config.json"] + sorted((REPO / "variants").glob("chatglm3*/generation_config.json"))
CHATGLM2_GENERATION = sorted((REPO / "variants").glob("chatglm2*/generation_config.json"))

# Fields engines read with defaults that are wrong for ChatGLM (issue 6), and their values in every variant.
EXPLICIT_FIELDS = {
    "add_qkv_bias": True,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "original_rope": True,
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "tie_word_embeddings": False,
    "kv_channels": 128,
    "padded_vocab_size": 65024,
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
}
VARIABLE_FIELDS = ("seq_length", "rope_ratio")
AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}
SEQ_LENGTH = {"chatglm2-6b": 32768, "chatglm2-6b-32k": 32768, "chatglm3-6b": 8192, "chatglm3-6b-32k": 32768,
              "chatglm3-6b-128k": 131072}


def _variant(path: Path) -> str:
    return path.parent.name if path.parent.name in SEQ_LENGTH else "chatglm3-6b"


# ------------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_config_json_states_every_field_explicitly(path):
    config = json.loads(path.read_text())
    for key, value in EXPLICIT_FIELDS.items():
        assert key in config, f"{path}: {key} missing"
        assert config[key] == value, f"{path}: {key} = {config[key]!r}, expected {value!r}"
    for key in VARIABLE_FIELDS:
        assert key in config, f"{path}: {key} missing"
    assert config["seq_length"] == SEQ_LENGTH[_variant(path)]
    assert config["auto_map"] == AUTO_MAP
    assert config["eos_token_id"] == 2 and config["pad_token_id"] == 0  # an int: converters pack it as "i"


@pytest.mark.parametrize("path", CHATGLM3_GENERATION, ids=lambda p: str(p.relative_to(REPO)))
def test_chatglm3_generation_config(path):
    config = json.loads(path.read_text())
    assert config["eos_token_id"] == [2, 64795, 64797]
    assert config["pad_token_id"] == 0


@pytest.mark.parametrize("path", CHATGLM2_GENERATION, ids=lambda p: str(p.relative_to(REPO)))
def test_chatglm2_generation_config(path):
    config = json.loads(path.read_text())
    assert config["eos_token_id"] in (2, [2])
    assert config["pad_token_id"] == 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat_config")
    return {v: build(root, v.replace("-", "_"), v) for v in ("chatglm3-6b", "chatglm2-6b-32k", "chatglm3-6b-128k")}


def test_saved_model_folder_keeps_the_fields(folders):
    """A folder written by save_pretrained (our tiny models, a fine-tuned export) still states the fields."""
    for variant, folder in folders.items():
        config = json.loads((folder / "config.json").read_text())
        for key in EXPLICIT_FIELDS:
            if key in ("kv_channels", "architectures"):
                continue  # tiny shapes; save_pretrained writes the class it saved
            assert config[key] == EXPLICIT_FIELDS[key], (variant, key)
        assert config["architectures"][0] in ("ChatGLMModel", "ChatGLMForConditionalGeneration")
        assert set(config["auto_map"]) == set(AUTO_MAP)
        assert {"seq_length", "rope_ratio", "rope_ratio_mode"} <= set(config)
        generation = json.loads((folder / "generation_config.json").read_text())
        assert generation["pad_token_id"] == 0
        assert generation["eos_token_id"] == ([2] if variant.startswith("chatglm2") else [2, 64795, 64797]) \
            or generation["eos_token_id"] == 2


# ------------------------------------------------------------------------------------------------- vLLM
def _vllm_read(config) -> dict:
    """The reads vLLM's ModelConfig and its ChatGLM model make (attribute names and fallbacks as vLLM has them)."""
    kv_heads = None
    for attr in ("n_head_kv", "num_kv_heads", "num_key_value_heads", "multi_query_group_num"):
        kv_heads = getattr(config, attr, None)
        if kv_heads is not None:
            break
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    lengths = [getattr(config, key) for key in ("max_position_embeddings", "n_positions", "max_seq_len",
                                                "seq_length", "model_max_length", "max_sequence_length",
                                                "max_seq_length", "seq_len") if getattr(config, key, None) is not None]
    dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    return {
        "architectures": config.architectures,
        "num_layers": getattr(config, "num_hidden_layers"),
        "hidden_size": config.hidden_size,
        "num_heads": config.num_attention_heads,
        "kv_heads": config.multi_query_group_num if config.multi_query_attention else config.num_attention_heads,
        "kv_heads_generic": kv_heads,
        "head_size": head_size,
        "max_model_len": min(lengths),
        "vocab_size": config.vocab_size,
        "padded_vocab_size": config.padded_vocab_size,
        "qkv_bias": config.add_bias_linear or config.add_qkv_bias,
        "dense_bias": config.add_bias_linear,
        "rope_theta": 10000 * getattr(config, "rope_ratio", 1.0),
        "max_positions": getattr(config, "seq_length", 8192),
        "is_neox_style": not config.original_rope,
        "ffn_hidden_size": config.ffn_hidden_size,
        "rmsnorm": config.rmsnorm,
        "eps": config.layernorm_epsilon,
        "post_layer_norm": config.post_layer_norm,
        "residual_post_ln": config.apply_residual_connection_post_layernorm,
        "fp32_residual": config.fp32_residual_connection,
        "tie": getattr(config, "tie_word_embeddings", True),
        "dtype": dtype,
    }


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_vllm_reads_the_shipped_configs(path, tmp_path):
    (tmp_path / "config.json").write_text(path.read_text())
    for name in ("configuration_chatglm.py",):
        (tmp_path / name).write_text((REPO / name).read_text())
    config = AutoConfig.from_pretrained(str(tmp_path), trust_remote_code=True)
    read = _vllm_read(config)
    variant = _variant(path)
    assert read["architectures"] == ["ChatGLMModel"]
    assert read["num_layers"] == 28 and read["hidden_size"] == 4096 and read["num_heads"] == 32
    assert read["kv_heads"] == read["kv_heads_generic"] == 2
    assert read["head_size"] == 128 == config.hidden_size // config.num_attention_heads
    assert read["max_model_len"] == read["max_positions"] == SEQ_LENGTH[variant]
    assert read["vocab_size"] == read["padded_vocab_size"] == 65024
    assert read["qkv_bias"] is True and read["dense_bias"] is False
    assert read["is_neox_style"] is False
    assert read["ffn_hidden_size"] == 13696 and read["eps"] == 1e-5
    assert read["rmsnorm"] and read["post_layer_norm"]
    assert not read["residual_post_ln"] and not read["fp32_residual"]
    assert read["tie"] is False
    assert str(read["dtype"]).replace("torch.", "") == "float16"
    if variant in ("chatglm3-6b-32k", "chatglm3-6b-128k"):
        assert read["rope_theta"] == config.rope_base  # vLLM's base scaling is right for the ChatGLM3 variants
    if variant == "chatglm3-6b":
        assert read["rope_theta"] == 10000


def test_vllm_reads_a_saved_model_folder(folders):
    config = AutoConfig.from_pretrained(str(folders["chatglm3-6b-128k"]), trust_remote_code=True)
    read = _vllm_read(config)
    assert read["kv_heads"] == read["kv_heads_generic"] == 2
    assert read["head_size"] == 16 and read["num_layers"] == 2
    assert read["max_model_len"] == 131072 and read["rope_theta"] == 10000 * 500 == config.rope_base
    assert read["tie"] is False


# ------------------------------------------------------------------------------------------------- chatglm.cpp
def _dequantize_like_chatglm_cpp(state_dict: dict, name: str, quantization_bit) -> torch.Tensor:
    """chatglm.cpp convert.py dump_state_dict, step 1 (de-quantize int8/int4 weights back to float32)."""
    tensor = state_dict[name]
    if tensor.ndim == 2 and tensor.dtype == torch.int8:
        assert quantization_bit in [4, 8]
        scale = state_dict[f"{name}_scale"].float()
        if quantization_bit == 4:
            low_bits = ((tensor << 4) & 0xF0) >> 4
            high_bits = (tensor & 0xF0) >> 4
            tensor = torch.stack((high_bits, low_bits), dim=-1).view(tensor.shape[0], -1)
        tensor = tensor * scale[:, None]
    return tensor.float()


def _chatglm_cpp_dump(model) -> bytes:
    """chatglm.cpp convert.py ChatGLM2Converter.dump_config + dump_model, without the ggml quantization."""
    f = io.BytesIO()
    config = model.config
    assert config.model_type == "chatglm" and hasattr(config, "multi_query_attention")
    assert config.add_bias_linear is False, "unimplemented: add_bias_linear must be false"
    assert config.add_qkv_bias is True, "unimplemented: add_qkv_bias must be true"
    assert config.apply_residual_connection_post_layernorm is False
    assert config.kv_channels * config.num_attention_heads == config.hidden_size, "unimplemented: invalid kv_channels"
    assert config.multi_query_attention is True
    assert config.original_rope is True
    assert config.post_layer_norm is True
    assert config.rmsnorm is True
    config_values = [
        0,
        config.padded_vocab_size,
        config.hidden_size,
        config.num_attention_heads,
        config.multi_query_group_num,
        config.num_layers,
        config.ffn_hidden_size,
        config.layernorm_epsilon,
        config.pre_seq_len if getattr(config, "pre_seq_len", None) is not None else 0,
        10000.0 * getattr(config, "rope_ratio", 1),
        config.seq_length,
        config.eos_token_id if config.eos_token_id is not None else -1,
        config.pad_token_id if config.pad_token_id is not None else -1,
    ]
    f.write(struct.pack("iiiiiiiififiii", 2, *config_values))

    state_dict = model.state_dict()
    names = []
    if getattr(config, "pre_seq_len", None) is not None and config.pre_seq_len > 0:
        prefix_tokens = torch.arange(config.pre_seq_len, dtype=torch.long)
        with torch.no_grad():
            past_key_values = model.transformer.prefix_encoder(prefix_tokens)
        past_key_values = (past_key_values.to(torch.half)
                           .view(config.pre_seq_len, config.num_layers * 2, config.multi_query_group_num,
                                 config.kv_channels)
                           .permute(1, 2, 0, 3).contiguous())
        state_dict["past_key_values"] = past_key_values
        names.append("past_key_values")
    names.append("transformer.embedding.word_embeddings.weight")
    for i in range(config.num_layers):
        names += [
            f"transformer.encoder.layers.{i}.input_layernorm.weight",
            f"transformer.encoder.layers.{i}.self_attention.query_key_value.weight",
            f"transformer.encoder.layers.{i}.self_attention.query_key_value.bias",
            f"transformer.encoder.layers.{i}.self_attention.dense.weight",
            f"transformer.encoder.layers.{i}.post_attention_layernorm.weight",
            f"transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight",
            f"transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight",
        ]
    names += ["transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight"]
    for name in names:
        tensor = _dequantize_like_chatglm_cpp(state_dict, name, getattr(config, "quantization_bit", None))
        f.write(struct.pack("i", len(name.encode())) + name.encode())
        f.write(struct.pack("i" * (2 + tensor.ndim), tensor.ndim, *tensor.shape, 0))
        f.write(tensor.numpy().tobytes())
    return f.getvalue()


def _convert_load(folder: Path):
    """convert.py: AutoConfig → pick the auto class from auto_map → from_pretrained(low_cpu_mem_usage=True)."""
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    if "AutoModel" in config.auto_map:
        auto_model_class = AutoModel
    elif "AutoModelForCausalLM" in config.auto_map:
        auto_model_class = AutoModelForCausalLM
    else:
        raise RuntimeError(f"Cannot find auto model class to load {folder}")
    model = auto_model_class.from_pretrained(str(folder), trust_remote_code=True, low_cpu_mem_usage=True)
    return model.eval()


def test_chatglm_cpp_converter_reads_config_and_weights(folders):
    for variant, folder in folders.items():
        model = _convert_load(folder)
        blob = _chatglm_cpp_dump(model)
        header = struct.unpack("iiiiiiiififiii", blob[:56])
        assert header[0] == 2 and header[2:8] == (65024, 64, 4, 2, 2, 96)
        assert header[8] == pytest.approx(1e-5)
        assert header[11] == model.config.seq_length and header[12:] == (2, 0)
        rope_theta = header[10]
        assert rope_theta == pytest.approx(10000.0 * (model.config.rope_ratio or 1))
        assert b"transformer.encoder.layers.1.mlp.dense_4h_to_h.weight" in blob


@pytest.mark.parametrize("bits", [8, 4])
def test_chatglm_cpp_dequantizes_our_quantized_weights(folders, bits):
    """A model quantized with `quantize(bits)` (the int4/int8 checkpoint layout): the converter's own
    de-quantization of `weight` / `weight_scale` gives back the weights within the quantization error."""
    model = _convert_load(folders["chatglm3-6b"])
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model.quantize(bits)
    state = model.state_dict()
    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    assert state[name].dtype == torch.int8 and f"{name}_scale" in state
    assert model.config.quantization_bit == bits
    for layer in range(model.config.num_layers):
        for part in ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                     "mlp.dense_4h_to_h"):
            key = f"transformer.encoder.layers.{layer}.{part}.weight"
            restored = _dequantize_like_chatglm_cpp(state, key, model.config.quantization_bit)
            scale = state[f"{key}_scale"].float()[:, None]
            assert restored.shape == reference[key].shape
            assert ((restored - reference[key]).abs() <= scale * 0.5 + 1e-6).all(), key
    _chatglm_cpp_dump(model)


def test_chatglm_cpp_dumps_a_ptuning_prefix(folders):
    """convert.py of a P-tuning model: `model.transformer.prefix_encoder(torch.arange(pre_seq_len))` viewed as
    [pre_seq_len, num_layers * 2, groups, kv_channels]."""
    folder = folders["chatglm3-6b"]
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True, pre_seq_len=8)
    model = AutoModel.from_pretrained(str(folder), config=config, trust_remote_code=True).eval()
    blob = _chatglm_cpp_dump(model)
    assert struct.unpack("iiiiiiiififiii", blob[:56])[9] == 8
    assert b"past_key_values" in blob


def test_chatglm_cpp_tokenizer_part(tmp_path):
    """convert.py: `"<|system|>" in tokenizer.tokenizer.special_tokens` picks ChatGLM3, and the tokenizer is dumped
    from `tokenizer.tokenizer.sp_model.serialized_model_proto()`."""
    from transformers import AutoTokenizer

    for variant, is_glm3 in (("chatglm3-6b", True), ("chatglm2-6b", False)):
        folder = build(tmp_path, variant.replace("-", "_"), variant, tokenizer=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
        assert ("<|system|>" in tokenizer.tokenizer.special_tokens) is is_glm3
        proto = tokenizer.tokenizer.sp_model.serialized_model_proto()
        assert isinstance(proto, bytes) and len(proto) > 100000
