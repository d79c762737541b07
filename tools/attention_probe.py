"""Times one causal self-attention over a long sequence with each SDPA backend (GQA: 32 query heads, 2 kv heads).

    python tools/attention_probe.py --lengths 32768 131072
Used to choose the long-prefill attention kernel; prints JSON lines (seconds, peak GiB, TFLOP/s).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def run(length: int, backend: str, expand: bool) -> dict:
    q = torch.randn(1, 32, length, 128, dtype=torch.float16, device="cuda")
    k = torch.randn(1, 2, length, 128, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    result = {"length": length, "backend": backend, "expand_kv": expand}
    try:
        def call():
            kk, vv = (k.repeat_interleave(16, 1), v.repeat_interleave(16, 1)) if expand else (k, v)
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not expand)
        call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = call()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        flops = 4 * length * length * 128 * 32 / 2
        result.update(seconds=round(seconds, 4), tflops=round(flops / seconds / 1e12, 1),
                      extra_gib=round((torch.cuda.max_memory_allocated() - base) / 2**30, 2))
        del out
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"[:200]
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    args = parser.parse_args()
    for length in args.lengths:
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            for expand in (False, True):
                run(length, backend, expand)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
