"""Write a tiny RANDOM-weight ChatGLM model folder (code, configs, weights, tokenizer) that loads with
`from_pretrained(dir, trust_remote_code=True)` — for demos, client-program tests and CI. Its output is gibberish.

    python tools/make_tiny_model.py --out /tmp/tiny-chatglm3 [--tokenizer path/to/tokenizer.model] [--variant chatglm2-6b]

Without the real tokenizer.model (e.g. on a fresh machine) a ~480-piece sentencepiece model is trained on a few
built-in sentences instead, so the whole path runs offline; the control tokens then follow its vocabulary.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from full_shape_check import CODE_FILES, import_package  # noqa: E402

SAMPLE_CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "你好，我是一个人工智能助手。很高兴认识你！",
    "今天天气很好，我们去公园散步吧。",
    "Please call the weather tool for Beijing and Shanghai.",
    "A user asks a question and the assistant answers it politely.",
]

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
            ffn_hidden_size=96, padded_vocab_size=65024, torch_dtype="float32")


def train_tiny_tokenizer(path: Path, corpus: list[str] = SAMPLE_CORPUS, vocab_size: int = 480) -> Path:
    """Train a small BPE sentencepiece model shaped like ChatGLM's (byte fallback, identity normaliser, unk/bos/eos
    0/1/2) on `corpus` and write it to `path`."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def make_tiny_model(out: Path, tokenizer_model: Path | None, variant: str = "chatglm3-6b", seed: int = 0) -> Path:
    import_package()
    from chatglm.configuration_chatglm import ChatGLMConfig
    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    source = REPO / "variants" / variant
    config_dict = {**json.loads((source / "config.json").read_text()), **TINY}
    if tokenizer_model is not None and tokenizer_model.is_file():
        shutil.copy(tokenizer_model, out / "tokenizer.model")
    elif tokenizer_model is not None:  # asked for one that is not here: train a stand-in (None: no tokenizer)
        print(f"no tokenizer model at {tokenizer_model}: training a tiny sentencepiece model instead")
        train_tiny_tokenizer(out / "tokenizer.model")
        import sentencepiece as spm

        pieces = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).get_piece_size()
        config_dict["padded_vocab_size"] = -(-(pieces + 9) // 64) * 64  # pieces + the 9 control ids, rounded up
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**config_dict))
    model.save_pretrained(str(out))
    for name in CODE_FILES:
        shutil.copy(REPO / name, out / name)
    for name in ("generation_config.json", "tokenizer_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared" / "assets" / "tokenizer" / "tokenizer.model")
    parser.add_argument("--variant", default="chatglm3-6b", choices=sorted(p.name for p in (REPO / "variants").iterdir()))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = make_tiny_model(args.out, args.tokenizer, args.variant, args.seed)
    print(f"wrote a tiny random-weight {args.variant} model to {folder}")


if __name__ == "__main__":
    main()
