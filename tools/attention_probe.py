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


def run(length: int, backend: str, mode: str, layout: str) -> dict:
    """mode: 'gqa' (enable_gqa), 'expand' (k/v repeated to 32 heads), 'groups' (one call per kv group, its 16
    query heads against that group's k/v repeated); layout: 'bhsd' contiguous or 'bshd' (transposed views, as a
    fused qkv projection leaves them)."""
    shape = (1, length, 32, 128) if layout == "bshd" else (1, 32, length, 128)
    q = torch.randn(shape, dtype=torch.float16, device="cuda")
    k = torch.randn(shape[:2] + (2, 128) if layout == "bshd" else (1, 2, length, 128), dtype=torch.float16,
                    device="cuda")
    v = torch.randn_like(k)
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    result = {"length": length, "backend": backend, "mode": mode, "layout": layout}

    def attend(qq, kk, vv, gqa):
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=gqa)

    def call():
        if mode == "gqa":
            return attend(q, k, v, True)
        if mode == "expand":
            return attend(q, k.repeat_interleave(16, 1), v.repeat_interleave(16, 1), False)
        return torch.cat([attend(q[:, 16 * g:16 * (g + 1)], k[:, g:g + 1].expand(-1, 16, -1, -1).contiguous(),
                                 v[:, g:g + 1].expand(-1, 16, -1, -1).contiguous(), False) for g in range(2)], 1)
    try:
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


def blocked(length: int, block: int) -> dict:
    """The causal triangle as square blocks of `block` queries x keys (off-diagonal blocks unmasked), each an SDPA
    call whose keys/values fit in L2; times the calls only (merging the blocks' outputs is not included)."""
    q = torch.randn(1, 32, length, 128, dtype=torch.float16, device="cuda")
    k = torch.randn(1, 2, length, 128, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    result = {"length": length, "mode": "blocks", "block": block}
    n = length // block

    def call():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            for i in range(n):
                qi = q[:, :, i * block:(i + 1) * block]
                for j in range(i + 1):
                    kj, vj = k[:, :, j * block:(j + 1) * block], v[:, :, j * block:(j + 1) * block]
                    F.scaled_dot_product_attention(qi, kj, vj, is_causal=i == j, enable_gqa=True)
    try:
        call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        result.update(seconds=round(seconds, 4), tflops=round(4 * length * length * 128 * 32 / 2 / seconds / 1e12, 1))
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"[:200]
    try:  # does the private cuDNN op give the log-sum-exp a merge would need, with grouped kv heads?
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q[:, :16, :block], k[:, :1, :block].expand(-1, 16, -1, -1),
                                                                 v[:, :1, :block].expand(-1, 16, -1, -1), None, True,
                                                                 0.0, True, False)
        result["private_lse_shape"] = list(out[1].shape)
    except Exception as error:
        result["private_error"] = f"{type(error).__name__}: {error}"[:200]
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--backends", nargs="+", default=["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"])
    parser.add_argument("--modes", nargs="+", default=["gqa", "expand", "groups"])
    parser.add_argument("--layouts", nargs="+", default=["bhsd", "bshd"])
    parser.add_argument("--blocks", type=int, nargs="*", default=[],
                        help="instead: time the causal triangle as square SDPA calls of this many tokens")
    args = parser.parse_args()
    if args.blocks:
        for length in args.lengths:
            for block in args.blocks:
                blocked(length, block)
                torch.cuda.empty_cache()
        return
    for length in args.lengths:
        for backend in args.backends:
            for mode in args.modes:
                for layout in args.layouts:
                    run(length, backend, mode, layout)
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
