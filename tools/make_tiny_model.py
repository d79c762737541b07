"""Write a tiny RANDOM-weight ChatGLM model folder (code, configs, weights, tokenizer) that loads with
`from_pretrained(dir, trust_remote_code=True)` — for demos, client-program tests and CI. Its output is gibberish.

    python tools/make_tiny_model.py --out /tmp/tiny-chatglm3 --tokenizer path/to/tokenizer.model [--variant chatglm2-6b]
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

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
            ffn_hidden_size=96, padded_vocab_size=65024, torch_dtype="float32")


def make_tiny_model(out: Path, tokenizer_model: Path | None, variant: str = "chatglm3-6b", seed: int = 0) -> Path:
    import_package()
    from chatglm.configuration_chatglm import ChatGLMConfig
    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    source = REPO / "variants" / variant
    config_dict = {**json.loads((source / "config.json").read_text()), **TINY}
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**config_dict))
    model.save_pretrained(str(out))
    for name in CODE_FILES:
        shutil.copy(REPO / name, out / name)
    for name in ("generation_config.json", "tokenizer_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    if tokenizer_model is not None:
        if not tokenizer_model.is_file():
            raise FileNotFoundError(f"tokenizer model {tokenizer_model} not found: pass --tokenizer path/to/tokenizer.model")
        shutil.copy(tokenizer_model, out / "tokenizer.model")
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
