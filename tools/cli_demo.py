"""Chat with a ChatGLM2 / ChatGLM3 model in the terminal, the reply streamed as it is written.

    python tools/cli_demo.py --model /path/to/chatglm3-6b [--quantize 4] [--system "You are ..."]
    python tools/cli_demo.py --model /path/to/chatglm3-6b --finetuned OUT      # a tools/finetune.py result

Type a message and press Enter. `clear` starts a new conversation, `stop` (or end of input) quits. Each turn passes
the previous turn's keys/values back to `stream_chat`, so only the new text is run through the model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, TextIO

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import DTYPES, chat_family, load_finetuned  # noqa: E402

CLEAR, STOP = "clear", "stop"


def load(args: argparse.Namespace) -> tuple:
    """(model, tokenizer) on the chosen device, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    if args.finetuned:
        model, tokenizer = load_finetuned(args.model, args.finetuned, torch_dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True, torch_dtype=dtype)
    if args.quantize:
        model = model.quantize(args.quantize)
    return model.to(args.device).eval(), tokenizer


def new_history(tokenizer: Any, system: Optional[str]) -> List[Any]:
    """An empty conversation; ChatGLM3 starts with the system message when one is given."""
    if system is None:
        return []
    if chat_family(tokenizer) != "chatglm3":
        raise ValueError("--system needs a ChatGLM3 model: ChatGLM2 prompts have no system message")
    return [{"role": "system", "content": system}]


def show(response: Any) -> str:
    """A reply as text: a tool call (a dict) as JSON."""
    return response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)


def converse(model: Any, tokenizer: Any, lines: TextIO, out: TextIO, system: Optional[str] = None,
             **chat_kwargs: Any) -> int:
    """Read user messages from ``lines`` and write the streamed replies to ``out`` → how many replies were given."""
    history, cache, replies = new_history(tokenizer, system), None, 0
    out.write(f"Type a message; '{CLEAR}' starts over, '{STOP}' quits.\n")
    while True:
        out.write("\nUser: ")
        out.flush()
        line = lines.readline()
        if not line or line.strip() == STOP:
            return replies
        query = line.strip()
        if query == CLEAR:
            history, cache = new_history(tokenizer, system), None
            out.write("(new conversation)\n")
            continue
        if not query:
            continue
        out.write("\nChatGLM: ")
        shown = ""
        for response, history, cache in model.stream_chat(tokenizer, query, history, past_key_values=cache,
                                                          return_past_key_values=True, **chat_kwargs):
            text = show(response)
            out.write(text[len(shown):] if text.startswith(shown) else "\n" + text)
            out.flush()
            shown = text
        out.write("\n")
        replies += 1


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments `load` reads: --model, --finetuned, --device, --dtype, --quantize."""
    parser.add_argument("--model", required=True, help="model folder (weights, configs, code, tokenizer)")
    parser.add_argument("--finetuned", default=None, help="a tools/finetune.py output folder to apply")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float16 on CUDA, else float32")
    parser.add_argument("--quantize", type=int, choices=(4, 8), default=None, help="int4/int8 weight-only")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="ChatGLM3 system message")
    parser.add_argument("--max-length", type=int, default=None, help="conversation tokens (default: the variant's)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--greedy", action="store_true", help="no sampling: the most likely token each step")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, lines: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    model, tokenizer = load(args)
    return converse(model, tokenizer, lines, out, system=args.system, max_length=args.max_length,
                    temperature=args.temperature, top_p=args.top_p, do_sample=not args.greedy)


if __name__ == "__main__":
    main()
