"""GPU check of the fused long prefill at the real shape: the same prefill with the fused kernels and blocked
attention (default) and with plain torch (CHATGLM_FUSED_PREFILL=0), compared on the last logits and the cache.

    python tools/prefill_check.py --variant chatglm3-6b-128k --lengths 65536 131072 [--dtype bfloat16]
    python tools/prefill_check.py --lengths 16384 --chunk 2048 --block 4096 --reference   # + float32 reference

    python tools/prefill_check.py --lengths 131072 --piece 8192 --generate 16   # + a chunked prefill, generate()

Differences are relative (max |diff| over the largest value), plus whether the greedy token agrees. Two roundings
of a 28-layer random network drift apart with the context length, so `--reference` also runs the model in float32
(shorter inputs: --chunk / --block shrink the chunk and attention block so every fused path still runs) and gives
each path's distance from it. `--piece` also feeds the input that many tokens at a time into one cache and compares
it with the one-call prefill (timed, peak memory). `--generate` runs generate() on the whole input with the dynamic
cache and with the static fast path (timed after a warm-up, peak memory, how many leading tokens agree: the fast
path's fused step is ~1e-3 from the forward, so random weights may flip a near-tie). Prints one JSON line per length.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from full_shape_check import import_package  # noqa: E402


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@torch.no_grad()
def prefill(model, ids: torch.Tensor, fused: bool, piece: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Last-position logits [b, vocab] and the keys/values of the first, middle and last layer (`piece`: the
    input fed that many tokens at a time into one cache)."""
    from bench import prefill_fn
    from chatglm.compat_chatglm import cache_layer

    os.environ["CHATGLM_FUSED_PREFILL"] = "1" if fused else "0"
    out = prefill_fn(model, ids, piece)()
    layers = (0, model.config.num_layers // 2, model.config.num_layers - 1)
    cache = [t.clone() for i in layers for t in cache_layer(out.past_key_values, i)]
    return out.logits[:, -1].float(), cache


def timed_on_gpu(fn):
    """→ ((seconds, peak GiB), fn()) for one call after the caches are emptied."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        value = fn()
    torch.cuda.synchronize()
    return (round(time.perf_counter() - start, 3), round(torch.cuda.max_memory_allocated() / 2**30, 2)), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="chatglm3-6b-128k")
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--reference", action="store_true", help="also run a float32 copy of the model")
    parser.add_argument("--chunk", type=int, default=None, help="PREFILL_CHUNK for this run")
    parser.add_argument("--block", type=int, default=None, help="ATTENTION_BLOCK (blocked from 2 blocks on)")
    parser.add_argument("--piece", type=int, default=0, help="also prefill this many tokens at a time")
    parser.add_argument("--generate", type=int, default=0, help="also generate this many tokens, both caches")
    args = parser.parse_args()
    import_package()
    import chatglm.modeling_chatglm as modeling
    import chatglm.prefill_kernels_chatglm as kernels
    from chatglm.configuration_chatglm import ChatGLMConfig

    if args.chunk:
        modeling.PREFILL_CHUNK = args.chunk
    if args.block:
        kernels.ATTENTION_BLOCK, kernels.MIN_BLOCKED_LENGTH = args.block, 2 * args.block
    config = ChatGLMConfig.from_pretrained(str(REPO / "variants" / args.variant))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = modeling.ChatGLMForConditionalGeneration(config).eval()
    reference = model if args.reference else None
    model = (copy.deepcopy(model) if args.reference else model).to(getattr(torch, args.dtype))
    for length in args.lengths:
        ids = torch.randint(10, 60000, (1, length), generator=torch.Generator().manual_seed(length)).cuda()
        fused_logits, fused_cache = prefill(model, ids, fused=True)
        plain_logits, plain_cache = prefill(model, ids, fused=False)
        result = {
            "length": length, "dtype": args.dtype, "blocked_attention": kernels._STATE["lse_attention"],
            "logits_rel_diff": round(relative(fused_logits, plain_logits), 6),
            "same_greedy_token": bool((fused_logits.argmax(-1) == plain_logits.argmax(-1)).all()),
            "cache_rel_diff_max": round(max(relative(a, b) for a, b in zip(fused_cache, plain_cache)), 6),
        }
        if reference is not None:
            ref_logits, ref_cache = prefill(reference, ids, fused=False)
            for name, logits, cache in (("fused", fused_logits, fused_cache), ("torch", plain_logits, plain_cache)):
                result[f"{name}_vs_float32_logits"] = round(relative(logits, ref_logits), 6)
                result[f"{name}_vs_float32_cache"] = round(max(relative(a, b) for a, b in zip(cache, ref_cache)), 6)
            del ref_cache
        if args.piece:
            (seconds, peak), (logits, cache) = timed_on_gpu(lambda: prefill(model, ids, fused=True, piece=args.piece))
            result.update(piece=args.piece, pieces_seconds=seconds, pieces_peak_gib=peak,
                          pieces_vs_one_logits=round(relative(logits, fused_logits), 6),
                          pieces_vs_one_cache=round(max(relative(a, b) for a, b in zip(cache, fused_cache)), 6))
            del cache
        if args.generate:
            prompt = ids[:, :min(length, config.seq_length - args.generate)]  # room for the new tokens
            request = dict(input_ids=prompt, max_new_tokens=args.generate, min_new_tokens=args.generate,
                           do_sample=False)
            tokens = {}
            os.environ["CHATGLM_FUSED_PREFILL"] = "1"
            for name, kwargs in (("dynamic", {}), ("static", {"cache_implementation": "static"})):
                with torch.no_grad():
                    model.generate(**request, **kwargs)  # warm-up: the fast path compiles and captures its step
                (seconds, peak), tokens[name] = timed_on_gpu(
                    lambda: model.generate(**request, **kwargs)[0, prompt.shape[1]:])
                result.update({f"generate_{name}_seconds": seconds, f"generate_{name}_peak_gib": peak})
            agree = (tokens["dynamic"] == tokens["static"]).long().cumprod(0).sum()
            result.update(generate_prompt=prompt.shape[1],
                          generate_leading_tokens_agree=f"{int(agree)}/{args.generate}")
        print(json.dumps(result), flush=True)
        del fused_cache, plain_cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
