"""Can a Triton causal attention kernel beat cuDNN's SDPA on long ChatGLM prefills (32 query heads, 2 kv heads,
head_dim 128)? Times both at the given lengths, checks the Triton output against SDPA, prints JSON lines.

    python tools/flash_probe.py --lengths 32768 131072

A probe, not a kernel the model uses: the 131072-token prefill spends ~7 s in cuDNN's attention at ~555 TFLOP/s
(docs/performance.md), and a faster kernel is the only way under 9 s.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel


@triton.jit
def _causal_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, S, qk_scale, GROUP: tl.constexpr, HEADS: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (m block, b * HEADS + h); q/o [b, HEADS, S, D], k/v [b, HEADS / GROUP, S, D], all contiguous.
    # Longest rows first (the causal triangle makes late blocks the slowest), online softmax in base 2.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    kv = b * (HEADS // GROUP) + h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (bh * S + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < S, other=0.0)
    k_base = k_ptr + kv * S * HEAD_DIM
    v_base = v_ptr + kv * S * HEAD_DIM
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    full_end = pid_m * BLOCK_M  # key blocks wholly below the diagonal: no mask
    for start_n in tl.range(0, full_end, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[None, :] * HEAD_DIM + offs_d[:, None])
        s = tl.dot(q, k) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * HEAD_DIM + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    for start_n in tl.range(full_end, tl.minimum((pid_m + 1) * BLOCK_M, S), BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[None, :] * HEAD_DIM + offs_d[:, None], mask=cols[None, :] < S, other=0.0)
        s = tl.dot(q, k) * qk_scale
        s = tl.where(cols[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=cols[:, None] < S, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + (bh * S + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=offs_m[:, None] < S)


def triton_attention(q, k, v, block_m, block_n, warps, stages):
    b, heads, s, d = q.shape
    out = torch.empty_like(q)
    grid = (triton.cdiv(s, block_m), b * heads)
    _causal_attention_kernel[grid](q, k, v, out, s, d ** -0.5 * 1.4426950408889634, GROUP=heads // k.shape[1],
                                   HEADS=heads, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                   num_stages=stages)
    return out


def timed(fn, repeat=3):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    args = parser.parse_args()
    for length in args.lengths:
        torch.manual_seed(0)
        q = torch.randn(1, 32, length, 128, dtype=torch.float16, device="cuda")
        k = torch.randn(1, 2, length, 128, dtype=torch.float16, device="cuda")
        v = torch.randn_like(k)
        flops = 4 * length * length * 128 * 32 / 2

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        want = cudnn()
        seconds = timed(cudnn)
        print(json.dumps({"length": length, "kernel": "cudnn", "seconds": round(seconds, 4),
                          "tflops": round(flops / seconds / 1e12, 1)}), flush=True)
        for block_m, block_n, warps, stages in itertools.product((128,), (64, 128), (4, 8), (2, 3)):
            row = {"length": length, "kernel": "triton", "config": [block_m, block_n, warps, stages]}
            try:
                got = triton_attention(q, k, v, block_m, block_n, warps, stages)
                row["max_err"] = float((got.float() - want.float()).abs().max())
                seconds = timed(lambda: triton_attention(q, k, v, block_m, block_n, warps, stages))
                row.update(seconds=round(seconds, 4), tflops=round(flops / seconds / 1e12, 1))
            except Exception as error:  # out of resources etc.
                row["error"] = f"{type(error).__name__}: {error}"[:160]
            print(json.dumps(row), flush=True)
        del q, k, v, want
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
