"""transformers' own GlmForCausalLM as a peer of our model: same function, renamed weights (SPEC §2).

Used by the benchmark (a peer measured in the same run) and by tests as a second oracle on transformers ≥ 4.46.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch


def glm_config_kwargs(config: Any) -> dict:
    """GlmConfig arguments computing the same function as a ChatGLMConfig."""
    from transformers import GlmConfig

    kwargs = dict(
        vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.kv_channels,
        max_position_embeddings=config.seq_length, rms_norm_eps=config.layernorm_epsilon, attention_bias=True,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=config.eos_token_id, attention_dropout=0.0,
    )
    rope = {"rope_type": "default", "rope_theta": config.rope_base, "partial_rotary_factor": 0.5}
    if config.rope_position_scale != 1.0:
        rope.update(rope_type="linear", factor=config.rope_position_scale)
    fields = getattr(GlmConfig, "__dataclass_fields__", None) or inspect.signature(GlmConfig.__init__).parameters
    if "rope_parameters" in fields:  # transformers 5.x
        kwargs["rope_parameters"] = rope
    else:  # 4.46 … 4.5x
        kwargs.update(rope_theta=rope.pop("rope_theta"), partial_rotary_factor=rope.pop("partial_rotary_factor"))
        kwargs["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    return kwargs


def glm_state_dict(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Rename an official-layout ChatGLM state dict to GlmForCausalLM's keys (query_key_value split by rows)."""
    q_size = config.num_attention_heads * config.kv_channels
    kv_size = config.num_key_value_heads * config.kv_channels
    out = {}
    for key, value in state.items():
        if key.endswith("rotary_pos_emb.inv_freq") or ".prefix_encoder." in key:
            continue
        key = key.replace("transformer.output_layer", "lm_head").replace("transformer.", "model.")
        key = key.replace("embedding.word_embeddings", "embed_tokens").replace("encoder.final_layernorm", "norm")
        key = key.replace("encoder.layers", "layers").replace("self_attention", "self_attn")
        key = key.replace("mlp.dense_h_to_4h", "mlp.gate_up_proj").replace("mlp.dense_4h_to_h", "mlp.down_proj")
        key = key.replace("self_attn.dense", "self_attn.o_proj")
        if "query_key_value" in key:
            q, k, v = value.split([q_size, kv_size, kv_size], dim=0)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[key.replace("query_key_value", name)] = part
        else:
            out[key] = value
    return out


def glm_peer(model: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A GlmForCausalLM holding `model`'s weights, same dtype and device, in eval mode."""
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig(**glm_config_kwargs(model.config))
    config._attn_implementation = attn_implementation
    param = next(model.parameters())
    with torch.device("meta"):
        peer = GlmForCausalLM(config)
    state = {k: v.to(device=param.device, dtype=param.dtype) for k, v in
             glm_state_dict(model.state_dict(), model.config).items()}
    peer.load_state_dict(state, strict=True, assign=True)
    # The rotary frequencies are a computed buffer, still on meta: build the module again on the real device.
    rotary = type(peer.model.rotary_emb)
    with torch.device(param.device):
        if "config" in inspect.signature(rotary.__init__).parameters:
            peer.model.rotary_emb = rotary(config=config)
        else:  # transformers 4.46-4.47 build it from numbers, and it has no position scaling
            if getattr(config, "rope_scaling", None):
                raise NotImplementedError("GlmForCausalLM of this transformers has no rope scaling (position "
                                          "interpolation, chatglm2-6b-32k); transformers >= 4.48 has it")
            peer.model.rotary_emb = rotary(dim=config.head_dim // 2,
                                           max_position_embeddings=config.max_position_embeddings,
                                           base=config.rope_theta)
    return peer.eval()
