"""ChatGLM2 / ChatGLM3 configuration.

Reads the official `config.json` fields unchanged, validates them, and derives everything the model needs once:
rotary base and position scale, head counts, and the standard aliases generic tools read
(`num_hidden_layers`, `num_key_value_heads`, `max_position_embeddings`, `vocab_size`, `head_dim`).
"""
from __future__ import annotations

from typing import Any, Optional

from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# How `rope_ratio` changes the rotary embedding. The official configs carry only the number; the code that shipped
# with each checkpoint decided its meaning (SPEC §1), so our configs name it explicitly.
ROPE_RATIO_MODES = ("scale_base", "divide_positions")

# Saved configs point the auto classes at these modules, so any folder we write loads with trust_remote_code.
AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}


def _infer_rope_ratio_mode(name_or_path: str, auto_map: Optional[dict]) -> str:
    """Guess the rope_ratio meaning of an official config that does not state it.

    chatglm2-6b-32k interpolates positions; the ChatGLM3 long variants scale the base. The official chatglm2-6b-32k
    config is recognisable by its name and by its auto_map, which (unlike ChatGLM3's) has no sequence classifier.
    """
    name = name_or_path.lower()
    if "chatglm2" in name:
        return "divide_positions"
    if "chatglm3" in name:
        return "scale_base"
    if auto_map is not None and "AutoModelForSequenceClassification" not in auto_map:
        return "divide_positions"
    return "scale_base"


class ChatGLMConfig(PretrainedConfig):
    """Configuration of a ChatGLM2/ChatGLM3 model; field names are the official ones."""

    model_type = "chatglm"
    _auto_class = "AutoConfig"  # save_pretrained writes configuration_chatglm.py beside config.json
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "vocab_size": "padded_vocab_size",
        "max_position_embeddings": "seq_length",
        "head_dim": "kv_channels",
        "intermediate_size": "ffn_hidden_size",
        "rms_norm_eps": "layernorm_epsilon",
    }
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        num_layers: int = 28,
        padded_vocab_size: int = 65024,
        hidden_size: int = 4096,
        ffn_hidden_size: int = 13696,
        kv_channels: int = 128,
        num_attention_heads: int = 32,
        seq_length: int = 8192,
        hidden_dropout: float = 0.0,
        classifier_dropout: Optional[float] = None,
        attention_dropout: float = 0.0,
        layernorm_epsilon: float = 1e-5,
        rmsnorm: bool = True,
        apply_residual_connection_post_layernorm: bool = False,
        post_layer_norm: bool = True,
        add_bias_linear: bool = False,
        add_qkv_bias: bool = True,
        bias_dropout_fusion: bool = True,
        multi_query_attention: bool = True,
        multi_query_group_num: int = 2,
        rope_ratio: Optional[float] = None,
        rope_ratio_mode: Optional[str] = None,
        apply_query_key_layer_scaling: bool = True,
        attention_softmax_in_fp32: bool = True,
        fp32_residual_connection: bool = False,
        original_rope: bool = True,
        quantization_bit: int = 0,
        pre_seq_len: Optional[int] = None,
        prefix_projection: bool = False,
        use_cache: bool = True,
        **kwargs: Any,
    ):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.classifier_dropout = classifier_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.bias_dropout_fusion = bias_dropout_fusion
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.rope_ratio = rope_ratio
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.fp32_residual_connection = fp32_residual_connection
        self.original_rope = original_rope
        self.quantization_bit = quantization_bit
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.use_cache = use_cache
        if rope_ratio_mode is None and rope_ratio not in (None, 1, 1.0):
            rope_ratio_mode = _infer_rope_ratio_mode(
                str(kwargs.get("_name_or_path") or kwargs.get("name_or_path") or ""), kwargs.get("auto_map")
            )
            logger.info(f"rope_ratio={rope_ratio} without rope_ratio_mode: using {rope_ratio_mode!r}")
        self.rope_ratio_mode = rope_ratio_mode or "scale_base"
        # The checkpoints never tie the output layer to the embedding; newer transformers default to tying.
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("eos_token_id", 2)
        super().__init__(**kwargs)
        self.validate_chatglm()

    # ----- derived values (read-only views of the official fields) -----
    @property
    def num_key_value_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def rope_base(self) -> float:
        """Rotary base: 10000, times rope_ratio for the ChatGLM3 long variants."""
        if self.rope_ratio_mode == "scale_base" and self.rope_ratio:
            return 10000.0 * self.rope_ratio
        return 10000.0

    @property
    def rope_position_scale(self) -> float:
        """Positions are divided by this before rotation (rope_ratio for chatglm2-6b-32k, else 1)."""
        if self.rope_ratio_mode == "divide_positions" and self.rope_ratio:
            return float(self.rope_ratio)
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        """The saved fields; without `_attn_implementation_autoset`, the runtime flag transformers 4.46-4.47 write
        into a model's config.json, which makes the next `from_pretrained` fall back to eager attention."""
        output = super().to_dict()
        output.pop("_attn_implementation_autoset", None)
        return output

    def validate_chatglm(self) -> None:
        """Raise ValueError for values the model cannot be built from, naming the field and the fix."""
        positive = ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
                    "num_attention_heads", "seq_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ChatGLMConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by multi_query_group_num "
                f"({self.num_key_value_heads}): each key/value group serves a whole number of query heads"
            )
        if self.kv_channels % 4 != 0:
            raise ValueError(
                f"kv_channels ({self.kv_channels}) must be divisible by 4: rotary embedding rotates pairs in the "
                "first half of each head"
            )
        if self.rope_ratio_mode not in ROPE_RATIO_MODES:
            raise ValueError(f"rope_ratio_mode must be one of {ROPE_RATIO_MODES}, got {self.rope_ratio_mode!r}")
        if self.rope_ratio is not None and not self.rope_ratio > 0:
            raise ValueError(f"rope_ratio must be positive, got {self.rope_ratio!r}")
        if self.quantization_bit not in (0, 4, 8, None):
            raise ValueError(f"quantization_bit must be 0 (none), 4 or 8, got {self.quantization_bit!r}")
        if self.pre_seq_len is not None and (not isinstance(self.pre_seq_len, int) or self.pre_seq_len <= 0):
            raise ValueError(f"pre_seq_len must be a positive integer or None, got {self.pre_seq_len!r}")
        if not self.rmsnorm:
            raise ValueError("rmsnorm=False (LayerNorm) is not used by any ChatGLM2/3 checkpoint and is not supported")
        if self.apply_residual_connection_post_layernorm:
            raise ValueError("apply_residual_connection_post_layernorm=True is not used by any ChatGLM2/3 checkpoint "
                             "and is not supported")
