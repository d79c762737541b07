"""Times one causal self-attention over a long sequence with each SDPA backend (GQA: 32 query heads, 2 kv heads).

    python tools/attention_probe.py --lengths 32768 131072
    python tools/attention_probe.py --decode --lengths 1280 8191 32767 131001 --batches 1 4
Used to choose the long-prefill attention kernel; prints JSON lines (seconds, peak GiB, TFLOP/s). `--decode` times
one-token steps over a cache instead: the two matmuls over folded heads (`decode_attention`) against SDPA with
shared kv heads, without a mask and with a left-padding mask, in microseconds per call (host launch included).
"""
from __future__ import annotations

import argparse
import json
import time

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_shape_check import import_package  # noqa: E402


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
    """The causal triangle as square blocks of `block` queries x keys (off-diagonal blocks unmasked), each a cuDNN
    call whose keys/values fit in L2, merged by log-sum-exp: the package's `blocked_causal_attention`, timed with
    its merges, and its largest difference from one cuDNN call."""
    from chatglm.prefill_kernels_chatglm import _lse_attention_works, blocked_causal_attention

    q = torch.randn(1, length, 32, 128, dtype=torch.float16, device="cuda").transpose(1, 2)  # as the model lays it
    k = torch.randn(1, 2, length, 128, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    result = {"length": length, "mode": "blocks", "block": block, "lse_check": _lse_attention_works(q)}
    try:
        with torch.no_grad():
            out = blocked_causal_attention(q, k, v, block)
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = blocked_causal_attention(q, k, v, block)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                whole = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        result.update(seconds=round(seconds, 4), tflops=round(4 * length * length * 128 * 32 / 2 / seconds / 1e12, 1),
                      max_abs_diff=float((out.float() - whole.float()).abs().max()),
                      out_stride=list(out.stride()), whole_stride=list(whole.stride()))
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"[:200]
    print(json.dumps(result), flush=True)
    return result


def single_calls(length: int, reps: int) -> None:
    """One cuDNN call (with log-sum-exp, as the blocked path makes them) per shape: causal and unmasked squares, an
    unmasked rectangle of 3x the keys; 16 query heads on one stride-0 kv head vs 32 heads on copied k/v."""
    from chatglm.prefill_kernels_chatglm import _attention_with_lse

    for heads, keys, causal in [(16, length, True), (16, length, False), (16, 3 * length, False),
                                (32, length, True), (32, length, False)]:
        q = torch.randn(1, length, heads, 128, dtype=torch.float16, device="cuda").transpose(1, 2)
        k, v = (torch.randn(1, 1, keys, 128, dtype=torch.float16, device="cuda").expand(1, heads, keys, 128)
                for _ in range(2))
        if heads == 32:
            k, v = k.contiguous(), v.contiguous()
        _attention_with_lse(q, k, v, causal)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            _attention_with_lse(q, k, v, causal)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / reps
        flops = 4 * length * keys * 128 * heads / (2 if causal else 1)
        print(json.dumps({"queries": length, "keys": keys, "heads": heads, "causal": causal, "reps": reps,
                          "seconds": round(seconds, 5), "tflops": round(flops / seconds / 1e12, 1)}), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


def decode_steps(length: int, batch: int, reps: int = 30) -> None:
    """One query token per row against `length` cached keys: the matmuls vs SDPA (GQA), max error vs float32."""
    from chatglm.compat_chatglm import sdpa
    from chatglm.modeling_chatglm import decode_attention

    q = torch.randn(batch, 32, 1, 128, dtype=torch.float16, device="cuda")
    k, v = (torch.randn(batch, 2, length, 128, dtype=torch.float16, device="cuda") for _ in range(2))
    padded = torch.ones(batch, 1, 1, length, dtype=torch.bool, device="cuda")
    for row in range(batch):
        padded[row, ..., :37 * row] = False  # row i is left-padded by 37·i positions
    for mask in (None, padded):
        want = decode_attention(q.float(), k.float(), v.float(), mask)
        result = {"keys": length, "batch": batch, "mask": mask is not None}
        for name, attend in (("matmuls", decode_attention), ("sdpa", lambda *a: sdpa(*a, False, 0.0))):
            got = attend(q, k, v, mask)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                attend(q, k, v, mask)
            torch.cuda.synchronize()
            result[f"{name}_us"] = round((time.perf_counter() - start) / reps * 1e6, 1)
            result[f"{name}_max_error"] = float(f"{(got.float() - want).abs().max():.2e}")
        print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--backends", nargs="+", default=["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"])
    parser.add_argument("--modes", nargs="+", default=["gqa", "expand", "groups"])
    parser.add_argument("--layouts", nargs="+", default=["bhsd", "bshd"])
    parser.add_argument("--blocks", type=int, nargs="*", default=[],
                        help="instead: time the causal triangle as square cuDNN calls of this many tokens, merged")
    parser.add_argument("--single-calls", action="store_true", help="instead: time single cuDNN calls per shape")
    parser.add_argument("--reps", type=int, default=3, help="--single-calls: back-to-back repetitions timed")
    parser.add_argument("--decode", action="store_true", help="instead: time one-token steps over a cache")
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="--decode: batch sizes")
    args = parser.parse_args()
    import_package()
    if args.decode:
        for batch in args.batches:
            for length in args.lengths:
                decode_steps(length, batch)
        return
    if args.single_calls:
        for length in args.lengths:
            single_calls(length, args.reps)
        return
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
