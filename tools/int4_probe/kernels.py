"""int4 GEMV candidates (batch <= 8/16), weights in frag128 format (packing.py).

gemv_frag_tl : plain Triton twin (runs in the interpreter; on GPU Triton picks the layouts -> shuffles).
gemv_frag_gl : Gluon kernel, explicit layouts: the int16 words are loaded with LDG.128 straight into the
               registers of the mma.m16n8k16 A fragment; dequant = 4 LOP3 + 1 SHF per 8 weights; weights are the
               A operand (16 rows x 16 k per HMMA), x^T (8 tokens) is the B operand, loaded with LDG.128 from the
               un-permuted x.
Both compute y[m, n] = scale[n] * sum_k q[n, k] x[m, k] via the zero-point trick
    acc_lo = sum_{k%8<4} (q+1032) x,  acc_hi = sum_{k%8>=4} (16q+1152) x
    y = scale * ((acc_lo - 1032 S_lo) + (acc_hi - 1152 S_hi) / 16)
"""
import os
import sys
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from full_shape_check import import_package  # noqa: E402

import_package()
from chatglm.quantization import triton_dequant_helpers  # noqa: E402

# the step's dequantize helpers (_i4_hi_f16, _i4_lo_f16) as module globals, where the Triton compiler finds them
globals().update(triton_dequant_helpers())

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------- dequant
@triton.jit
def _deq4_asm(w):
    # w: int16 tensor; pack=2 -> $4 holds two int16 elements (elem0 low half, elem1 high half).
    # out j: b32 = (fp16(nibble j of elem0), fp16(nibble j of elem1)); j even: 1024+(v+8), j odd: 1024+16(v+8)
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t;
        lop3.b32 $0, $4, 0x000F000F, 0x64086408, 0x6a;
        lop3.b32 $1, $4, 0x00F000F0, 0x64806480, 0x6a;
        shr.u32 t, $4, 8;
        lop3.b32 $2, t, 0x000F000F, 0x64086408, 0x6a;
        lop3.b32 $3, t, 0x00F000F0, 0x64806480, 0x6a;
        }""",
        constraints="=r,=r,=r,=r,r", args=[w],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)


@triton.jit
def _deq4_int(w):
    wi = w.to(tl.int32)
    o0 = (((wi >> 0) & 0xF) ^ 8) + 1024
    o1 = (((wi >> 4) & 0xF) ^ 8) * 16 + 1024
    o2 = (((wi >> 8) & 0xF) ^ 8) + 1024
    o3 = (((wi >> 12) & 0xF) ^ 8) * 16 + 1024
    return o0.to(tl.float16), o1.to(tl.float16), o2.to(tl.float16), o3.to(tl.float16)


@triton.jit
def _deq4(w, USE_ASM: tl.constexpr):
    if USE_ASM:
        return _deq4_asm(w)
    else:
        return _deq4_int(w)


# ------------------------------------------------------------------------------------------ plain-Triton twin
@triton.jit
def gemv_frag_tl(w_ptr, x_ptr, s_ptr, y_ptr, M, N, K,
                 BN: tl.constexpr, KU: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr, USE_ASM: tl.constexpr,
                 EVEN: tl.constexpr = False):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    n_units = K // 128
    per = (n_units + SPLIT - 1) // SPLIT
    u_lo = sid * per
    u_hi = tl.minimum(u_lo + per, n_units)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    d1 = tl.arange(0, 4 * KU)
    wp = w_ptr + offs_n[:, None, None] * (K // 4) + d1[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    xp = x_ptr + offs_m[:, None, None] * K + d1[None, :, None] * 32 + tl.arange(0, 32)[None, None, :]
    mrow = (offs_m < M)[:, None, None]
    acc_lo = tl.zeros((BN, BM), dtype=tl.float32)
    acc_hi = tl.zeros((BN, BM), dtype=tl.float32)
    for u in range(u_lo, u_hi, KU):
        kv = (u + d1 // 4) < u_hi
        if EVEN:  # (u_hi - u_lo) % KU == 0 guaranteed by the host
            w = tl.load(wp + u * 32)
            xl = tl.load(xp + u * 128, mask=mrow, other=0.0)
        else:
            w = tl.load(wp + u * 32, mask=kv[None, :, None], other=0)
            xl = tl.load(xp + u * 128, mask=mrow & kv[None, :, None], other=0.0)
        o0, o1, o2, o3 = _deq4(w, USE_ASM)
        a_lo = tl.reshape(tl.permute(tl.reshape(tl.join(o0, o2), (BN, KU, 4, 4, 2, 2)), (0, 1, 3, 5, 2, 4)), (BN, 64 * KU))
        a_hi = tl.reshape(tl.permute(tl.reshape(tl.join(o1, o3), (BN, KU, 4, 4, 2, 2)), (0, 1, 3, 5, 2, 4)), (BN, 64 * KU))
        x7 = tl.permute(tl.reshape(xl, (BM, KU, 4, 4, 2, 2, 2)), (0, 1, 2, 3, 5, 6, 4))
        x_lo, x_hi = tl.split(x7)
        x_lo = tl.reshape(tl.permute(x_lo, (1, 3, 4, 2, 5, 0)), (64 * KU, BM))
        x_hi = tl.reshape(tl.permute(x_hi, (1, 3, 4, 2, 5, 0)), (64 * KU, BM))
        acc_lo = tl.dot(a_lo, x_lo, acc_lo)
        acc_hi = tl.dot(a_hi, x_hi, acc_hi)
    # zero-point correction: sums of x over this split's K range
    offs_k = tl.arange(0, 256)
    s_lo = tl.zeros((BM, ), dtype=tl.float32)
    s_hi = tl.zeros((BM, ), dtype=tl.float32)
    for k0 in range(u_lo * 128, u_hi * 128, 256):
        xs = tl.load(x_ptr + offs_m[:, None] * K + k0 + offs_k[None, :],
                     mask=(offs_m < M)[:, None] & (k0 + offs_k < u_hi * 128)[None, :], other=0.0).to(tl.float32)
        hi = ((offs_k % 8) >= 4)[None, :]
        s_lo += tl.sum(tl.where(hi, 0.0, xs), axis=1)
        s_hi += tl.sum(tl.where(hi, xs, 0.0), axis=1)
    sc = tl.load(s_ptr + offs_n).to(tl.float32)
    y = ((acc_lo - 1032.0 * s_lo[None, :]) + (acc_hi - 1152.0 * s_hi[None, :]) * 0.0625) * sc[:, None]
    yp = y_ptr + offs_m[None, :] * N + offs_n[:, None]
    ym = (offs_m < M)[None, :]
    if SPLIT == 1:
        tl.store(yp, y.to(y_ptr.dtype.element_ty), mask=ym)
    else:
        tl.atomic_add(yp, y, mask=ym)


# ---------------------------------------------------------------------------------------------- baseline pattern
@triton.jit
def _hi_int(w):
    return (w.to(tl.int32) >> 4).to(tl.float16)


@triton.jit
def _lo_int(w):
    return ((w.to(tl.int32) << 28) >> 28).to(tl.float16)


@triton.jit
def gemv_orig(w_ptr, x_ptr, s_ptr, y_ptr, M, N, K,
              BN: tl.constexpr, BK: tl.constexpr, USE_ASM: tl.constexpr):
    """Production pattern: x[16, BK] is the A operand, the official int8 [N, K/2] weights the B operand."""
    pid = tl.program_id(0)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, 16)
    acc = tl.zeros((16, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kp = k0 // 2 + tl.arange(0, BK // 2)
        w = tl.load(w_ptr + offs_n[None, :] * (K // 2) + kp[:, None])
        x = tl.load(x_ptr + offs_m[:, None] * K + k0 + tl.arange(0, BK)[None, :], mask=(offs_m < M)[:, None], other=0.0)
        xe, xo = tl.split(tl.reshape(x, (16, BK // 2, 2)))
        if USE_ASM:
            acc = tl.dot(xe, _i4_hi_f16(w), acc)  # noqa: F821  (from triton_dequant_helpers)
            acc = tl.dot(xo, _i4_lo_f16(w), acc)  # noqa: F821
        else:
            acc = tl.dot(xe, _hi_int(w), acc)
            acc = tl.dot(xo, _lo_int(w), acc)
    sc = tl.load(s_ptr + offs_n).to(tl.float32)
    y = acc * sc[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])
