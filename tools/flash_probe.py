"""Can a Triton causal attention kernel beat cuDNN on long ChatGLM prefills (32 query heads, 2 kv heads,
head_dim 128)? Times each kernel over back-to-back calls (sustained load, as in a prefill), with the SM clock and
board power they ran at, and prints JSON lines: seconds per call, TFLOP/s, and energy per FLOP.

    python tools/flash_probe.py --lengths 131072 --calls 10

A probe, not a kernel the model uses. The Triton kernel loads q/k/v tiles through TMA descriptors (Triton ≥ 3.4,
sm_90+), runs the unmasked key blocks in one loop and the diagonal block in another, and is checked against SDPA
on a short input first. On an H200 every kernel here runs at the 700 W board limit, so what decides the time is
energy per FLOP (docs/performance.md has the numbers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_shape_check import import_package  # noqa: E402
from gpu_telemetry import GpuTelemetry  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg): 128 registers let two 98 KB programs share an SM
CONFIGS = [(128, 64, 8, 2, 128), (128, 128, 8, 3, None), (64, 64, 4, 3, None)]


@triton.jit
def _attend_key_block(q, k_desc, v_desc, kv, start_n, rows, m_i, l_i, acc, qk_scale, BLOCK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N); m_i is the base-2 scaled running max."""
    k = k_desc.load([kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    s = tl.dot(q, k.T)
    if MASKED:  # the diagonal block: keys after the query row (and past s, which TMA zero-fills) are dropped
        s = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] <= rows[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])  # scale and subtract in one FMA
    alpha = tl.math.exp2(m_i - m_new)
    v = v_desc.load([kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _causal_attention_kernel(q_desc, k_desc, v_desc, o_desc, qk_scale, HEADS: tl.constexpr, GROUP: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (m block, b * HEADS + h), longest rows first; descriptors over [b·heads, s, d] / [b·kv_heads, s, d].
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    kv = (bh // HEADS) * (HEADS // GROUP) + (bh % HEADS) // GROUP
    start_m = pid_m * BLOCK_M
    q = q_desc.load([bh, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    rows = start_m + tl.arange(0, BLOCK_M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start_n in tl.range(0, start_m, BLOCK_N):  # wholly below the diagonal: no mask
        m_i, l_i, acc = _attend_key_block(q, k_desc, v_desc, kv, start_n, rows, m_i, l_i, acc, qk_scale, BLOCK_N,
                                          HEAD_DIM, MASKED=False)
    for start_n in tl.range(start_m, start_m + BLOCK_M, BLOCK_N):
        m_i, l_i, acc = _attend_key_block(q, k_desc, v_desc, kv, start_n, rows, m_i, l_i, acc, qk_scale, BLOCK_N,
                                          HEAD_DIM, MASKED=True)
    out = acc / l_i[:, None]
    o_desc.store([bh, start_m, 0], out.to(o_desc.dtype).reshape(1, BLOCK_M, HEAD_DIM))


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: tuple) -> torch.Tensor:
    """q [b, heads, s, d], k/v [b, kv_heads, s, d] (contiguous) → causal attention [b, heads, s, d]."""
    block_m, block_n, warps, stages, maxnreg = config
    b, heads, s, d = q.shape
    out = torch.empty_like(q)

    def desc(t: torch.Tensor, rows: int) -> TensorDescriptor:
        return TensorDescriptor.from_tensor(t.view(-1, s, d), [1, rows, d])
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    _causal_attention_kernel[(triton.cdiv(s, block_m), b * heads)](
        desc(q, block_m), desc(k, block_n), desc(v, block_n), desc(out, block_m), d ** -0.5 * 1.4426950408889634,
        HEADS=heads, GROUP=heads // k.shape[1], HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        num_stages=stages, **extra)
    return out


def sustained(fn, calls: int) -> tuple[float, dict]:
    """Seconds per call over `calls` back-to-back calls (after one warm-up), and the GPU telemetry meanwhile."""
    fn()
    torch.cuda.synchronize()
    with GpuTelemetry() as telemetry:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / calls
    return seconds, telemetry.summary()


def cudnn_attention(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    import_package()
    from chatglm.prefill_kernels_chatglm import long_causal_attention

    def randn(heads: int, length: int) -> torch.Tensor:
        return torch.randn(1, heads, length, 128, dtype=torch.float16, device="cuda")
    short = (randn(32, 8192), randn(2, 8192), randn(2, 8192))
    want = cudnn_attention(*short)
    for length in args.lengths:
        q, k, v = randn(32, length), randn(2, length), randn(2, length)
        flops = 4 * length * length * 128 * 32 / 2
        kernels = [("cudnn (one call)", cudnn_attention)]
        if long_causal_attention(q, k, v) is not None:
            kernels.append(("cudnn blocked (the model's)", long_causal_attention))
        kernels += [(f"triton {list(c)}", lambda q, k, v, c=c: triton_attention(q, k, v, c)) for c in CONFIGS]
        for name, attend in kernels:
            row = {"length": length, "kernel": name}
            try:
                if name.startswith("triton"):
                    row["max_err_8192"] = float((attend(*short).float() - want.float()).abs().max())
                seconds, gpu = sustained(lambda: attend(q, k, v), args.calls)
                row.update(seconds=round(seconds, 4), tflops=round(flops / seconds / 1e12, 1), gpu=gpu)
                if gpu:
                    row["pj_per_flop"] = round(gpu["power_w_mean"] * seconds / flops * 1e12, 3)
            except Exception as error:  # out of resources, no TMA on this GPU, ...
                row["error"] = f"{type(error).__name__}: {error}"[:200]
            print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
