"""Fused one-token decode step for CUDA: five Triton launches per layer instead of about seventeen.

At batch 1 the weights take ~2.8 ms to read on an H200, and the compiled step spent another ~1.2 ms launching
the small kernels around them (norms, rotary, cache writes, three attention kernels, split-K reductions, residual
adds; docs/performance.md). Here every small operation rides along with a weight read:

  1. ``qkv``    rmsnorm(h) -> query_key_value (+bias) -> rotary on q and k; q to a buffer, k and v into the cache
  2. ``attend`` q against the cache, split over keys; the last split of a head group to finish merges them
  3. ``dense``  h2 = h + dense(context)
  4. ``h_to_4h`` rmsnorm(h2) -> dense_h_to_4h -> silu(gate) * up
  5. ``4h_to_h`` h = h2 + dense_4h_to_h(act)

then one more GEMV (final norm + output layer, float32 logits). Weights may be fp16/bf16 ``nn.Linear`` or
``QuantizedLinear`` int8/int4 in the official packed layout (dequantized in registers, the same helpers as the
quantization module's tensor-core GEMV). The products run on tensor cores with the batch rows (<= 16) padded to
one 16-row tile, accumulating in float32. int4 fp16 GEMVs of the shapes in int4_kernels_chatglm's table (up to 8
rows) go to its Gluon kernel instead; `gemv_launch` decides, and `fused_linear` runs either with one contract.

`FusedDecodeStep.build` returns None where this does not apply (CPU, no Triton, batch > 16, LoRA or other wrapped
linears, odd shapes); the caller then runs the compiled torch step. Set ``CHATGLM_FUSED_DECODE=0``
to turn it off. The kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how the tests check them.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .compat_chatglm import kernel_device
from .int4_kernels_chatglm import GluonLaunch, gluon_launch, int4_gemv
from .int4_kernels_chatglm import load_configs as load_gluon_configs

logger = logging.getLogger(__name__)

FUSED_ENV = "CHATGLM_FUSED_DECODE"
CONFIG_ENV = "CHATGLM_FUSED_CONFIGS"  # optional JSON {"N,K,bits,epilogue": [BLOCK_N, BLOCK_K, warps, stages, dot]}
MAX_ROWS = 16  # batch rows per step: one tensor-core tile
# Weight kinds the step takes (with split-K, fused int4 beats the compiled step: docs/performance.md).
FUSED_BITS = (16, 8, 4)
EPI_STORE, EPI_RESIDUAL, EPI_SWIGLU, EPI_QKV = 0, 1, 2, 3
ATTN_BLOCKS = (32, 64, 128)  # keys per inner step of the attention kernel: the largest a split fills
MAX_SPLITS = 64  # key splits per (row, kv group); the merge kernel loads them all at once
SSQ_STRIDE = 1024  # partial sums of squares per row: at least the programs of any residual GEMV
# Programmatic dependent launch (sm_90+): 0 off; 1 each kernel lets its successor launch at once; 2 after its
# main loop. The successor's launch and setup then overlap this kernel's tail. CHATGLM_FUSED_PDL overrides.
PDL_MODE = 0


def _pdl_launch() -> Dict[str, Any]:
    return {"launch_pdl": True} if PDL_MODE else {}

_KERNELS: Dict[str, Any] = {}
triton = None
tl = None


def _load_triton() -> bool:
    """Import Triton and define the kernels once; False (logged) where that fails."""
    global triton, tl, PDL_MODE
    if _KERNELS:
        return True
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    hopper = not interpreted and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
    PDL_MODE = int(os.environ.get("CHATGLM_FUSED_PDL", "2" if hopper else "0")) if not interpreted else 0
    try:
        triton = importlib.import_module("triton")
        tl = importlib.import_module("triton.language")
        _define_kernels()
    except Exception as exc:  # no Triton, or one too old for these kernels: the caller uses the torch step
        logger.info("ChatGLM fused decode unavailable (%s: %s)", type(exc).__name__, exc)
        return False
    return True


def _define_kernels() -> None:
    from .quantization import triton_dequant_helpers

    # Helpers are module globals, not closures, so that the Triton compiler and interpreter both find them.
    globals().update(triton_dequant_helpers())
    globals().update(_define_helpers())
    _define_main_kernels()


def _define_helpers() -> Dict[str, Any]:
    @triton.jit
    def _dot_tile(acc, x, w_rows, k0, mask_n, K, BITS: tl.constexpr, IS_FP16: tl.constexpr,
                  BLOCK_K: tl.constexpr):
        # acc[16, BN] += x[16, BLOCK_K] @ W[rows, k0:k0 + BLOCK_K]^T; w_rows: each output row's start [1, BN].
        # BITS 16: W in the activation dtype; 8: one int8 per value; 4: two nibbles per byte (high = even column).
        if BITS == 4:
            kp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            w = tl.load(w_rows + kp[:, None], mask=mask_n & (kp < K // 2)[:, None], other=0)
            xe, xo = tl.split(tl.reshape(x, (16, BLOCK_K // 2, 2)))
            if IS_FP16:
                acc = tl.dot(xe, _i4_hi_f16(w), acc)
                acc = tl.dot(xo, _i4_lo_f16(w), acc)
            else:
                wi = w.to(tl.int32)
                acc = tl.dot(xe, (wi >> 4).to(x.dtype), acc)
                acc = tl.dot(xo, ((wi << 28) >> 28).to(x.dtype), acc)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_rows + kk[:, None], mask=mask_n & (kk < K)[:, None], other=0)
            if BITS == 16:
                acc = tl.dot(x, w, acc)
            elif IS_FP16:
                acc = tl.dot(x, _i8_f16(w), acc)
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
        return acc

    # Programmatic dependent launch: a kernel may be launched while its predecessor drains, and waits here
    # (griddepcontrol.wait: the predecessor finished and its writes are visible) before touching anything the
    # predecessor wrote -- or anything it reads, since the kernel after this one may already be running.
    @triton.jit
    def _wait_for_predecessor():
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _allow_successor():
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)

    # Split-K: a program publishes its partial sums, then counts itself in; the partials must be visible GPU-wide
    # before the count (release), and the last program must see all of them after it (acquire).
    @triton.jit
    def _gpu_fence():
        tl.inline_asm_elementwise("fence.acq_rel.gpu; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)

    if os.environ.get("TRITON_INTERPRET") == "1":  # one program at a time: nothing to wait for
        @triton.jit
        def _wait_for_predecessor():
            pass

        @triton.jit
        def _allow_successor():
            pass

        @triton.jit
        def _gpu_fence():
            pass

    return dict(_dot_tile=_dot_tile, _wait_for_predecessor=_wait_for_predecessor, _allow_successor=_allow_successor, _gpu_fence=_gpu_fence)


def _define_main_kernels() -> None:
    @triton.jit
    def _fused_gemv_kernel(
            x_ptr, nw_ptr, w_ptr, s_ptr, b_ptr, r_ptr, y_ptr, ssq_in_ptr, ssq_out_ptr,
            cos_ptr, sin_ptr, pos_ptr, slot_ptr, kc_ptr, vc_ptr, part_ptr, count_ptr, best_ptr, best_at_ptr, ban_ptr,
            M, N, K, K_SPLIT, eps, stride_xm, stride_wn, stride_rm, stride_ym, PARTS_IN, SSQ_STRIDE, Q_SIZE, KV_SIZE,
            stride_cb, stride_cg, stride_cs,
            BITS: tl.constexpr, IS_FP16: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
            EPILOGUE: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, USE_DOT: tl.constexpr,
            PDL: tl.constexpr, SPLIT: tl.constexpr, ARGMAX: tl.constexpr, BANNED: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program (pid, pid_k): y[m, n] for m < M <= 16 and this program's BLOCK_N outputs n < N, summed over inputs
        # [pid_k * K_SPLIT, +K_SPLIT). With SPLIT > 1 the programs of one output tile leave their partial sums in
        # part_ptr [SPLIT, M, 2N] and the last of them to finish adds them up in a fixed order (deterministic) and
        # runs the epilogue. EPI_SWIGLU: rows n (gate) and N + n (up) of W, y = silu(gate) * up.
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        k_lo = pid_k * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        if PDL:
            _wait_for_predecessor()
        if PDL == 1:
            _allow_successor()
        offs_m = tl.arange(0, 16)
        mask_m = offs_m < M
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        dt = x_ptr.dtype.element_ty
        if NORM:  # rmsnorm: the producer of x left per-program partial sums of squares (ssq_in [m, parts])
            ss = tl.zeros((16,), dtype=tl.float32)
            offs_p = tl.arange(0, 128)
            for p0 in range(0, PARTS_IN, 128):
                sq = tl.load(ssq_in_ptr + offs_m[:, None] * SSQ_STRIDE + p0 + offs_p[None, :],
                             mask=mask_m[:, None] & (p0 + offs_p < PARTS_IN)[None, :], other=0.0)
                ss += tl.sum(sq, axis=1)
            rstd = 1.0 / tl.sqrt(ss / K + eps)
        w_rows = w_ptr + offs_n[None, :] * stride_wn
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        if USE_DOT:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + offs_k
                x = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)
                if NORM:
                    nw = tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                    x = (x.to(tl.float32) * rstd[:, None] * nw[None, :]).to(dt)
                acc = _dot_tile(acc, x, w_rows, k0, mask_n[None, :], K, BITS, IS_FP16, BLOCK_K)
                if EPILOGUE == 2:
                    acc_up = _dot_tile(acc_up, x, w_rows + N * stride_wn, k0, mask_n[None, :], K, BITS, IS_FP16,
                                       BLOCK_K)
        else:  # one row (M == 1), model-dtype weights, CUDA cores: products summed over K at the end
            part = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            part_up = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            if NORM:
                rstd0 = tl.sum(tl.where(offs_m == 0, rstd, 0.0), axis=0)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + offs_k
                x1 = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
                if NORM:
                    nw = tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                    x1 = (x1.to(tl.float32) * rstd0 * nw).to(dt)
                x1 = x1.to(tl.float32)[:, None]
                wmask = mask_n[None, :] & (kk < K)[:, None]
                part += tl.load(w_rows + kk[:, None], mask=wmask, other=0.0).to(tl.float32) * x1
                if EPILOGUE == 2:
                    part_up += tl.load(w_rows + N * stride_wn + kk[:, None], mask=wmask, other=0.0).to(
                        tl.float32) * x1
            first_row = (offs_m == 0)[:, None]
            acc = tl.where(first_row, tl.sum(part, axis=0)[None, :], 0.0)
            if EPILOGUE == 2:
                acc_up = tl.where(first_row, tl.sum(part_up, axis=0)[None, :], 0.0)
        if PDL == 2:
            _allow_successor()
        mask = mask_m[:, None] & mask_n[None, :]
        last = True
        if SPLIT > 1:
            parts = part_ptr + offs_m[:, None] * (2 * N) + offs_n[None, :]
            tl.store(parts + pid_k * M * 2 * N, acc, mask=mask)
            if EPILOGUE == 2:
                tl.store(parts + pid_k * M * 2 * N + N, acc_up, mask=mask)
            _gpu_fence()
            tl.debug_barrier()
            last = tl.atomic_add(count_ptr + pid, 1) == SPLIT - 1
            if last:
                _gpu_fence()
                acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
                acc_up = tl.zeros((16, BLOCK_N), dtype=tl.float32)
                for i in tl.static_range(SPLIT):
                    acc += tl.load(parts + i * M * 2 * N, mask=mask, other=0.0, cache_modifier=".cg")
                    if EPILOGUE == 2:
                        acc_up += tl.load(parts + i * M * 2 * N + N, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(count_ptr + pid, 0)  # ready for the next launch
        if last:
            if BITS < 16:
                acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                if EPILOGUE == 2:
                    acc_up = acc_up * tl.load(s_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                if EPILOGUE == 2:
                    acc_up += tl.load(b_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            y_tile = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
            if EPILOGUE == 0:
                tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=mask)
                if ARGMAX:  # this tile's largest output per row (first on ties), for _step_finish_kernel
                    scores = tl.where(mask_n[None, :], acc.to(y_ptr.dtype.element_ty).to(tl.float32), float("-inf"))
                    if BANNED:  # outputs never to pick (end-of-sequence ids before min_new_tokens)
                        ban = tl.load(ban_ptr + tl.arange(0, BANNED))
                        hit = tl.max((offs_n[None, :] == ban[:, None]).to(tl.int32), axis=0) > 0
                        scores = tl.where(hit[None, :], float("-inf"), scores)
                    best, best_at = tl.max(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
                    tl.store(best_ptr + offs_m * SSQ_STRIDE + pid, best, mask=mask_m)
                    tl.store(best_at_ptr + offs_m * SSQ_STRIDE + pid, pid * BLOCK_N + best_at, mask=mask_m)
            elif EPILOGUE == 1:  # the branch is rounded to the model dtype before the residual add, as unfused
                res = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
                out = (res.to(tl.float32) + acc.to(dt).to(tl.float32)).to(dt)
                tl.store(y_tile, out, mask=mask)
                # this tile's share of the next rmsnorm: sum of squares of its columns, one slot per tile
                # (summed in a fixed order by the consumer, so the result does not depend on scheduling)
                sq = out.to(tl.float32)
                tl.store(ssq_out_ptr + offs_m * SSQ_STRIDE + pid, tl.sum(sq * sq, axis=1), mask=mask_m)
            elif EPILOGUE == 2:
                gate = acc.to(dt).to(tl.float32)
                up = acc_up.to(dt).to(tl.float32)
                tl.store(y_tile, (gate / (1.0 + tl.exp(-gate)) * up).to(dt), mask=mask)
            else:  # EPI_QKV: rotary on interleaved pairs of the first 2*ROT_PAIRS dims of each q and k head
                out = acc.to(dt).to(tl.float32)
                even, odd = tl.split(tl.reshape(out, (16, BLOCK_N // 2, 2)))
                n_even = pid * BLOCK_N + 2 * tl.arange(0, BLOCK_N // 2)
                pair = (n_even % HEAD_DIM) // 2
                rotates = (pair < ROT_PAIRS) & (n_even < Q_SIZE + KV_SIZE)
                pos = tl.load(pos_ptr + offs_m, mask=mask_m, other=0)
                table = pos[:, None] * ROT_PAIRS + pair[None, :]
                tmask = mask_m[:, None] & rotates[None, :]
                cos = tl.load(cos_ptr + table, mask=tmask, other=1.0)
                sin = tl.load(sin_ptr + table, mask=tmask, other=0.0)
                out = tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (16, BLOCK_N))
                out = out.to(dt)
                tl.store(y_tile, out, mask=mask & (offs_n < Q_SIZE)[None, :])
                slot = tl.load(slot_ptr)
                kv = offs_n - Q_SIZE
                is_v = kv >= KV_SIZE
                kv = tl.where(is_v, kv - KV_SIZE, kv)
                kv = tl.where(kv < 0, 0, kv)
                cache_off = (offs_m[:, None] * stride_cb + (kv // HEAD_DIM)[None, :] * stride_cg + slot * stride_cs
                             + (kv % HEAD_DIM)[None, :])
                is_k = (offs_n >= Q_SIZE) & (offs_n < Q_SIZE + KV_SIZE)
                tl.store(kc_ptr + cache_off, out, mask=mask & is_k[None, :])
                tl.store(vc_ptr + cache_off, out, mask=mask & is_v[None, :])

    @triton.jit
    def _decode_attention_kernel(
            q_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, part_ptr, stat_ptr,
            GROUPS, SPLITS, scale, stride_qb, stride_cb, stride_cg, stride_cs, stride_vb,
            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
            PDL: tl.constexpr):
        # Program (b * GROUPS + g, split): the GROUP query heads of key/value group g of row b against cache slots
        # [split * chunk, (split + 1) * chunk) up to the current one, the chunk being the filled slots spread over
        # the SPLITS programs in whole BLOCK_S blocks: a short context in a large cache still gets many programs.
        # Partial results (max, sum, weighted values) go to scratch for _attention_merge_kernel (a split past the
        # current slot leaves max -1e30, sum 0).
        if PDL:
            _wait_for_predecessor()
            _allow_successor()
        bg = tl.program_id(0)
        split = tl.program_id(1)
        b = bg // GROUPS
        g = bg % GROUPS
        length = tl.load(slot_ptr) + 1
        offs_h = tl.arange(0, GROUP_PAD)
        mask_h = offs_h < GROUP
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + (g * GROUP + offs_h)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=mask_h[:, None], other=0.0)
        m_i = tl.full((GROUP_PAD,), -1e30, dtype=tl.float32)
        l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_S) * BLOCK_S
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        k_base = k_ptr + b * stride_cb + g * stride_cg
        v_base = v_ptr + b * stride_cb + g * stride_cg
        for s0 in range(start, end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            in_range = offs_s < end
            k = tl.load(k_base + offs_s[None, :] * stride_cs + offs_d[:, None], mask=in_range[None, :], other=0.0)
            v = tl.load(v_base + offs_s[:, None] * stride_cs + offs_d[None, :], mask=in_range[:, None], other=0.0)
            scores = tl.dot(q, k) * scale
            valid = tl.load(valid_ptr + b * stride_vb + offs_s, mask=in_range, other=0) != 0
            scores = tl.where(valid[None, :], scores, -1e30)
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        index = bg * SPLITS + split
        tl.store(part_ptr + index * GROUP_PAD * HEAD_DIM + offs_h[:, None] * HEAD_DIM + offs_d[None, :], acc)
        tl.store(stat_ptr + index * 2 * GROUP_PAD + offs_h, m_i)
        tl.store(stat_ptr + index * 2 * GROUP_PAD + GROUP_PAD + offs_h, l_i)

    @triton.jit
    def _attention_merge_kernel(part_ptr, stat_ptr, out_ptr, GROUPS, SPLITS, stride_ob,
                                GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                                SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
        # Program (b, g, h): one query head's splits combined: one load of all their partial results.
        if PDL:
            _wait_for_predecessor()
            _allow_successor()
        pid = tl.program_id(0)
        h = pid % GROUP
        bg = pid // GROUP
        b = bg // GROUPS
        g = bg % GROUPS
        offs_t = tl.arange(0, SPLITS_PAD)
        live = offs_t < SPLITS
        rows = bg * SPLITS + offs_t
        offs_d = tl.arange(0, HEAD_DIM)
        m = tl.load(stat_ptr + rows * 2 * GROUP_PAD + h, mask=live, other=-1e30)
        l = tl.load(stat_ptr + rows * 2 * GROUP_PAD + GROUP_PAD + h, mask=live, other=0.0)
        o = tl.load(part_ptr + (rows[:, None] * GROUP_PAD + h) * HEAD_DIM + offs_d[None, :], mask=live[:, None],
                    other=0.0)
        weight = tl.exp(m - tl.max(m, axis=0))
        out = tl.sum(o * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
        tl.store(out_ptr + b * stride_ob + (g * GROUP + h) * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _step_start_kernel(token_ptr, emb_ptr, hidden_ptr, ssq_ptr, valid_ptr, slot_ptr, H, stride_eb, stride_vb,
                           SSQ_STRIDE, BLOCK_H: tl.constexpr):
        # Program b: hidden[b] = embedding[token[b]], its sum of squares (the first norm's), key_valid[b, slot] = 1.
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK_H)
        row = tl.load(emb_ptr + tl.load(token_ptr + b) * stride_eb + offs, mask=offs < H, other=0.0)
        tl.store(hidden_ptr + b * H + offs, row, mask=offs < H)
        sq = row.to(tl.float32)
        tl.store(ssq_ptr + b * SSQ_STRIDE, tl.sum(sq * sq, axis=0))
        tl.store(valid_ptr + b * stride_vb + tl.load(slot_ptr), 1)

    @triton.jit
    def _step_finish_kernel(best_ptr, best_at_ptr, token_ptr, pos_ptr, slot_ptr, TILES, SSQ_STRIDE,
                            GREEDY: tl.constexpr, BLOCK_T: tl.constexpr):
        # Program b: (GREEDY) token[b] = the first index of the largest logit, from the output GEMV's per-tile
        # maxima; then position[b] += 1, and program 0 moves the cache slot on.
        b = tl.program_id(0)
        if GREEDY:
            offs = tl.arange(0, BLOCK_T)
            best = tl.load(best_ptr + b * SSQ_STRIDE + offs, mask=offs < TILES, other=float("-inf"))
            tile = tl.argmax(best, axis=0, tie_break_left=True)
            tl.store(token_ptr + b, tl.load(best_at_ptr + b * SSQ_STRIDE + tile).to(tl.int64))
        tl.store(pos_ptr + b, tl.load(pos_ptr + b) + 1)
        if b == 0:
            tl.store(slot_ptr, tl.load(slot_ptr) + 1)

    _KERNELS.update(gemv=_fused_gemv_kernel, attention=_decode_attention_kernel, merge=_attention_merge_kernel,
                    start=_step_start_kernel, finish=_step_finish_kernel)


# ---------------------------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------------------------
# (BLOCK_N, BLOCK_K, num_warps, num_stages, tensor cores 0/1, split-K) per (N, K, bits, epilogue); shapes not listed
# use `_default_config`, a missing split-K entry means 1. The CUDA-core variant (tensor cores 0) serves one row of
# fp16/bf16 weights only. Fixed per shape (no run-time autotuning) so launches are deterministic inside CUDA graphs.
# Measured on an H200 with tools/fused_decode_check.py --sweep (docs/performance.md).
GEMV_CONFIGS: Dict[Tuple[int, ...], Tuple[int, ...]] = {
    (4608, 4096, 16, EPI_STORE): (16, 128, 4, 4, 0, 4),  # qkv
    (4608, 4096, 16, EPI_QKV): (16, 128, 4, 4, 0, 4),  # qkv
    (4096, 4096, 16, EPI_RESIDUAL): (32, 256, 4, 4, 1, 1),  # dense
    (4096, 13696, 16, EPI_RESIDUAL): (64, 256, 4, 4, 1, 2),  # 4h_to_h
    (13696, 4096, 16, EPI_SWIGLU): (64, 256, 4, 3, 1, 1),  # h_to_4h
    (65024, 4096, 16, EPI_STORE): (128, 256, 4, 3, 1, 1),  # output
    (4608, 4096, 8, EPI_STORE): (64, 256, 4, 3, 1, 4),  # qkv
    (4608, 4096, 8, EPI_QKV): (64, 256, 4, 3, 1, 4),  # qkv
    (4096, 4096, 8, EPI_RESIDUAL): (64, 256, 4, 3, 1, 4),  # dense
    (4096, 13696, 8, EPI_RESIDUAL): (64, 256, 4, 3, 1, 8),  # 4h_to_h
    (13696, 4096, 8, EPI_SWIGLU): (64, 256, 4, 3, 1, 1),  # h_to_4h
    (4608, 4096, 4, EPI_STORE): (64, 256, 4, 3, 1, 4),  # qkv
    (4608, 4096, 4, EPI_QKV): (64, 256, 4, 3, 1, 4),  # qkv
    (4096, 4096, 4, EPI_RESIDUAL): (32, 256, 4, 3, 1, 4),  # dense
    (4096, 13696, 4, EPI_RESIDUAL): (64, 256, 4, 3, 1, 8),  # 4h_to_h
    (13696, 4096, 4, EPI_SWIGLU): (64, 256, 4, 3, 1, 1),  # h_to_4h
}


def _default_config(n: int, k: int, bits: int, epilogue: int) -> Tuple[int, ...]:
    block_k = 256 if bits == 16 else 512
    block_n = 64 if n >= 16384 else 32
    return block_n, block_k, 4, 3, 1, 1


def load_configs(path: Optional[str] = None) -> None:
    """Merge launch configurations from a JSON file (default: $CHATGLM_FUSED_CONFIGS) into GEMV_CONFIGS."""
    from .quantization import merge_launch_table

    merge_launch_table(GEMV_CONFIGS, path or os.environ.get(CONFIG_ENV))
    load_gluon_configs()


@dataclass
class GemvLaunch:
    """How `fused_linear` launches one shape: a (tiles, splits) grid, each program BLOCK_N of the n outputs by
    k_split inputs."""

    n: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    use_dot: bool
    splits: int
    k_split: int
    tiles: int
    gluon: Optional[GluonLaunch] = None  # int4 fp16 shapes the Gluon GEMV serves (int4_kernels_chatglm)


def gemv_config(n: int, k: int, bits: int, epilogue: int, rows: int) -> GemvLaunch:
    """Launch configuration of `fused_linear` for an output of n, input k, `rows` batch rows."""
    block_n, block_k, warps, stages, dot, *rest = GEMV_CONFIGS.get((n, k, bits, epilogue)) or \
        _default_config(n, k, bits, epilogue)
    block_k = max(32, min(block_k, triton.next_power_of_2(k)))
    block_n = max(16, min(block_n, triton.next_power_of_2(n)))
    k_split = triton.cdiv(triton.cdiv(k, rest[0] if rest else 1), block_k) * block_k
    return GemvLaunch(n, block_n, block_k, warps, stages, bool(dot) or rows > 1 or bits != 16,
                      triton.cdiv(k, k_split), k_split, triton.cdiv(n, block_n))


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LinearWeights:
    """One linear as the kernels read it: weight [out, in] (bits 16) or packed int8 [out, in * bits / 8]."""

    weight: torch.Tensor
    scale: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    bits: int
    in_features: int
    out_features: int

    @classmethod
    def of(cls, module: nn.Module) -> Optional["LinearWeights"]:
        if type(module) is nn.Linear:
            return cls(module.weight, None, module.bias, 16, module.in_features, module.out_features)
        if getattr(module, "is_chatglm_quantized", False) and module.weight.is_contiguous():
            return cls(module.weight, module.weight_scale, module.bias, module.bits, module.in_features,
                       module.out_features)
        return None  # LoRA wrappers, other quantizers, ...: not ours to read


@dataclass
class RotaryCache:
    """What the qkv epilogue needs: cos/sin tables [positions, rot_pairs] fp32, per-row positions [b] and the
    cache slot [1] (device tensors), and this layer's key/value cache buffers [b, groups, capacity, head_dim]."""

    cos: torch.Tensor
    sin: torch.Tensor
    position: torch.Tensor
    slot: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    q_size: int
    kv_size: int
    head_dim: int


def row_sum_squares(x: torch.Tensor) -> torch.Tensor:
    """x [m, k] → the `ssq` argument of fused_linear for a norm of x computed here: [m, SSQ_STRIDE] float32 (one
    part)."""
    ssq = torch.zeros(x.shape[0], SSQ_STRIDE, dtype=torch.float32, device=x.device)
    ssq[:, 0] = x.float().pow(2).sum(-1)
    return ssq


def gemv_launch(linear: LinearWeights, epilogue: int, rows: int) -> GemvLaunch:
    n = linear.out_features // 2 if epilogue == EPI_SWIGLU else linear.out_features
    launch = gemv_config(n, linear.in_features, linear.bits, epilogue, rows)
    if linear.bits == 4:
        gluon = gluon_launch(n, linear.in_features, linear.bits, epilogue, rows, linear.scale.dtype,
                             linear.bias is not None, linear.weight.device)
        if gluon is not None:
            launch = replace(launch, splits=gluon.splits, tiles=gluon.tiles, gluon=gluon)
    return launch


class SplitScratch:
    """Split-K scratch shared by the GEMV launches of one step: fp32 partial sums [splits, rows, out] and one
    arrival counter per output tile (each launch leaves its counters at zero)."""

    def __init__(self, partial_floats: int, tiles: int, device: torch.device):
        self.partial = torch.empty(max(partial_floats, 1), dtype=torch.float32, device=device)
        self.counts = torch.zeros(max(tiles, 1), dtype=torch.int32, device=device)

    @staticmethod
    def size_for(linear: LinearWeights, epilogue: int, rows: int) -> Tuple[int, int]:
        """(partial floats, tiles) one launch of `linear` needs."""
        launch = gemv_launch(linear, epilogue, rows)
        if launch.splits == 1:
            return 0, 0
        return launch.splits * rows * 2 * launch.n, launch.tiles


def fused_linear(x: torch.Tensor, linear: LinearWeights, out: torch.Tensor, epilogue: int = EPI_STORE,
                 norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-5,
                 ssq_in: Optional[Tuple[torch.Tensor, int]] = None, residual: Optional[torch.Tensor] = None,
                 ssq_out: Optional[torch.Tensor] = None, rotary: Optional[RotaryCache] = None,
                 scratch: Optional[SplitScratch] = None,
                 argmax: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 banned: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out [m, n] = epilogue(linear(rmsnorm(x) if norm_weight is given else x)) for x [m <= 16, in].

    The norm takes x's sums of squares from `ssq_in` = (partials [m, SSQ_STRIDE], how many), as an EPI_RESIDUAL
    launch leaves them in its `ssq_out` (default: computed here with torch). Epilogues: EPI_STORE (out may be
    float32), EPI_RESIDUAL (out = residual + linear; partial sums of squares of out into ssq_out), EPI_SWIGLU (the
    linear's two halves are gate and up: out [m, out_features / 2] = silu(gate) * up), EPI_QKV (out = rotated
    queries; keys and values go into `rotary`'s cache at its slot). Split-K launches use `scratch` (default: a new
    one). `argmax` (EPI_STORE): buffers [m, SSQ_STRIDE] float32 / int32 for each output tile's row maximum and its
    index (first on ties), leaving out the ids in `banned` (int64, a power-of-two count).
    """
    m, k = x.shape
    launch = gemv_launch(linear, epilogue, m)
    if norm_weight is not None and ssq_in is None:
        ssq_in = (row_sum_squares(x), 1)
    if epilogue == EPI_RESIDUAL and ssq_out is None:
        ssq_out = torch.empty(m, SSQ_STRIDE, dtype=torch.float32, device=x.device)
    if launch.splits > 1 and scratch is None:
        scratch = SplitScratch(*SplitScratch.size_for(linear, epilogue, m), x.device)
    if launch.gluon is not None:
        if scratch is None:
            scratch = SplitScratch(0, 0, x.device)
        return int4_gemv(launch.gluon, x, linear.weight, linear.scale, out, epilogue, norm_weight, eps, ssq_in,
                         residual, ssq_out, scratch.partial, scratch.counts, SSQ_STRIDE, PDL_MODE)
    dummy = linear.weight
    rot = rotary
    _KERNELS["gemv"][(launch.tiles, launch.splits)](
        x, norm_weight if norm_weight is not None else dummy, linear.weight,
        linear.scale if linear.scale is not None else dummy, linear.bias if linear.bias is not None else dummy,
        residual if residual is not None else dummy, out, ssq_in[0] if ssq_in else dummy,
        ssq_out if ssq_out is not None else dummy,
        rot.cos if rot else dummy, rot.sin if rot else dummy, rot.position if rot else dummy,
        rot.slot if rot else dummy, rot.keys if rot else dummy, rot.values if rot else dummy,
        scratch.partial if scratch else dummy, scratch.counts if scratch else dummy,
        argmax[0] if argmax else dummy, argmax[1] if argmax else dummy, banned if banned is not None else dummy,
        m, launch.n, k, launch.k_split, eps, x.stride(0), linear.weight.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), ssq_in[1] if ssq_in else 0, SSQ_STRIDE,
        rot.q_size if rot else 0, rot.kv_size if rot else 0,
        rot.keys.stride(0) if rot else 0, rot.keys.stride(1) if rot else 0, rot.keys.stride(2) if rot else 0,
        BITS=linear.bits, IS_FP16=x.dtype == torch.float16, NORM=norm_weight is not None,
        HAS_BIAS=linear.bias is not None, EPILOGUE=epilogue, HEAD_DIM=rot.head_dim if rot else 16,
        ROT_PAIRS=rot.head_dim // 4 if rot else 1, USE_DOT=launch.use_dot, PDL=PDL_MODE, SPLIT=launch.splits,
        ARGMAX=argmax is not None, BANNED=banned.numel() if argmax and banned is not None else 0,
        BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, num_warps=launch.warps,
        num_stages=launch.stages, **_pdl_launch())
    return out


class AttentionScratch:
    """Split-K scratch of the decode attention for one batch size and cache capacity."""

    def __init__(self, batch: int, groups: int, group: int, head_dim: int, capacity: int, device: torch.device):
        self.groups, self.group, self.head_dim = groups, group, head_dim
        self.group_pad = max(16, triton.next_power_of_2(group))
        # Keys per split when the cache is full: as few as make MAX_SPLITS splits, in whole inner blocks of the
        # largest size that fits. Each split is a program, so short caches get many short programs (1280 slots:
        # 40 splits of 32 keys, 4.1 us per layer against 6.2 for 10 of 128 on an H200); long ones take 128 keys
        # per inner step (32768 slots: 14.3 us against 18.4 with 64). Measured with tools/fused_decode_check.py.
        # The kernel spreads the slots filled so far over the same number of splits.
        per_split = -(-capacity // MAX_SPLITS)
        self.block = max([ATTN_BLOCKS[0]] + [b for b in ATTN_BLOCKS if b <= per_split])
        self.chunk = -(-per_split // self.block) * self.block
        self.splits = -(-capacity // self.chunk)
        rows = batch * groups * self.splits
        self.partial = torch.empty(rows, self.group_pad, head_dim, dtype=torch.float32, device=device)
        self.stats = torch.empty(rows, 2, self.group_pad, dtype=torch.float32, device=device)


def fused_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_valid: torch.Tensor,
                    slot: torch.Tensor, scratch: AttentionScratch, out: torch.Tensor) -> torch.Tensor:
    """query [b, heads * d] at cache slot `slot` against keys/values [b, groups, capacity, d] (slots <= slot where
    key_valid [b, capacity] (uint8) is set) → out [b, heads * d]."""
    batch = query.shape[0]
    _KERNELS["attention"][(batch * scratch.groups, scratch.splits)](
        query, keys, values, key_valid, slot, scratch.partial, scratch.stats, scratch.groups, scratch.splits,
        scratch.head_dim ** -0.5, query.stride(0), keys.stride(0), keys.stride(1), keys.stride(2), key_valid.stride(0),
        GROUP=scratch.group, GROUP_PAD=scratch.group_pad, HEAD_DIM=scratch.head_dim,
        BLOCK_S=scratch.block, PDL=PDL_MODE, num_warps=4, num_stages=2, **_pdl_launch())
    _KERNELS["merge"][(batch * scratch.groups * scratch.group,)](
        scratch.partial, scratch.stats, out, scratch.groups, scratch.splits, out.stride(0), GROUP=scratch.group,
        GROUP_PAD=scratch.group_pad, HEAD_DIM=scratch.head_dim, SPLITS_PAD=triton.next_power_of_2(scratch.splits),
        PDL=PDL_MODE, num_warps=4, **_pdl_launch())
    return out


# ---------------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: LinearWeights
    dense: LinearWeights
    post_norm: torch.Tensor
    h_to_4h: LinearWeights
    h4h_to_h: LinearWeights


def unsupported_reason(model: nn.Module, batch: int) -> Optional[str]:
    """Why the fused step cannot serve this model and batch, or None if it can."""
    config = model.config
    param = next(model.parameters())
    if os.environ.get(FUSED_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{FUSED_ENV} is off"
    if param.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "not on CUDA"
    if param.device.type == "cuda" and torch.cuda.get_device_capability(param.device) < (8, 0):
        return "needs sm_80 or newer"
    if param.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {param.dtype} (fp16/bf16 only)"
    if batch > MAX_ROWS:
        return f"batch {batch} > {MAX_ROWS}"
    head_dim = config.kv_channels
    if head_dim < 16 or head_dim & (head_dim - 1) or config.num_attention_heads % config.num_key_value_heads:
        return f"head_dim {head_dim} (a power of two >= 16 is needed)"
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        return "parameters on several devices"
    for layer in model.transformer.encoder.layers:
        for module in (layer.self_attention.query_key_value, layer.self_attention.dense, layer.mlp.dense_h_to_4h,
                       layer.mlp.dense_4h_to_h):
            weights = LinearWeights.of(module)
            if weights is None:
                return f"{type(module).__name__} linears"
            if weights.bits not in FUSED_BITS:
                return f"int{weights.bits} weights (the compiled step is faster for them)"
    if type(model.transformer.output_layer) is not nn.Linear:
        return "output layer is not a plain Linear"
    if not _load_triton():
        return "Triton unavailable"
    return None


class FusedDecodeStep:
    """One model's fused decode step over a StaticKVCache-like object (per-layer `keys`/`values` lists)."""

    def __init__(self, model: nn.Module, keys: List[torch.Tensor], values: List[torch.Tensor], batch: int,
                 capacity: int):
        config = model.config
        transformer = model.transformer
        weight = transformer.output_layer.weight
        device, dtype = weight.device, weight.dtype
        self.eps = config.layernorm_epsilon
        self.keys, self.values = keys, values
        self.embedding = transformer.embedding.word_embeddings.weight
        self.layers = [
            LayerWeights(layer.input_layernorm.weight, LinearWeights.of(layer.self_attention.query_key_value),
                         LinearWeights.of(layer.self_attention.dense), layer.post_attention_layernorm.weight,
                         LinearWeights.of(layer.mlp.dense_h_to_4h), LinearWeights.of(layer.mlp.dense_4h_to_h))
            for layer in transformer.encoder.layers]
        self.final_norm = transformer.encoder.final_layernorm.weight if config.post_layer_norm else None
        self.output = LinearWeights.of(transformer.output_layer)
        heads, groups, head_dim = config.num_attention_heads, config.num_key_value_heads, config.kv_channels
        self.q_size, self.kv_size, self.head_dim = heads * head_dim, groups * head_dim, head_dim
        # the unfused path's cos/sin, in the model dtype, for every position a cache slot can hold
        cos, sin = transformer.rotary_pos_emb(torch.arange(capacity, device=device)[None], dtype)
        self.cos = cos.reshape(capacity, -1).float().contiguous()
        self.sin = sin.reshape(capacity, -1).float().contiguous()
        self.scratch = AttentionScratch(batch, groups, heads // groups, head_dim, capacity, device)
        hidden, ffn = config.hidden_size, config.ffn_hidden_size
        new = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=device)  # noqa: E731
        self.hidden, self.hidden2 = new(batch, hidden), new(batch, hidden)
        self.query, self.context, self.act = new(batch, self.q_size), new(batch, self.q_size), new(batch, ffn)
        self.logits = new(batch, self.output.out_features, dt=torch.float32)
        # greedy steps: each output tile's largest logit and its index, per row
        self.output_tiles = gemv_launch(self.output, EPI_STORE, batch).tiles
        self.best = new(batch, SSQ_STRIDE, dt=torch.float32)
        self.best_at = new(batch, SSQ_STRIDE, dt=torch.int32)
        # partial sums of squares left by the residual GEMVs for the next norm (hidden: 4h_to_h; hidden2: dense)
        self.ssq = torch.zeros(batch, SSQ_STRIDE, dtype=torch.float32, device=device)
        self.ssq2 = torch.zeros(batch, SSQ_STRIDE, dtype=torch.float32, device=device)
        self.parts_dense = gemv_launch(self.layers[0].dense, EPI_RESIDUAL, batch).tiles
        self.parts_mlp = gemv_launch(self.layers[0].h4h_to_h, EPI_RESIDUAL, batch).tiles
        layer = self.layers[0]
        sizes = [SplitScratch.size_for(linear, epilogue, batch) for linear, epilogue in (
            (layer.qkv, EPI_QKV), (layer.dense, EPI_RESIDUAL), (layer.h_to_4h, EPI_SWIGLU),
            (layer.h4h_to_h, EPI_RESIDUAL), (self.output, EPI_STORE))]
        self.split_scratch = SplitScratch(max(f for f, _ in sizes), max(t for _, t in sizes), device)

    @classmethod
    def build(cls, model: nn.Module, keys: List[torch.Tensor], values: List[torch.Tensor], batch: int,
              capacity: int) -> Optional["FusedDecodeStep"]:
        reason = unsupported_reason(model, batch)
        if reason is not None:
            logger.info("ChatGLM fused decode not used: %s", reason)
            return None
        load_configs()
        return cls(model, keys, values, batch, capacity)

    def __call__(self, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor, key_valid: torch.Tensor,
                 greedy: bool = False, banned: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One decode step: feed token [b, 1] at position [b, 1] into cache slot [1] (marked in key_valid
        [b, capacity] bool), write its keys/values into the cache, then advance position and slot by one.
        → logits [b, vocab] float32; with `greedy`, the argmax (first on ties; never an id in `banned`, a
        power-of-two count) is also written into `token`, which is returned."""
        with kernel_device(self.hidden):
            return self._step(token, position, slot, key_valid, greedy, banned)

    def _step(self, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor, key_valid: torch.Tensor,
              greedy: bool, banned: Optional[torch.Tensor]) -> torch.Tensor:
        batch, hidden = self.hidden.shape
        valid = key_valid.view(torch.uint8)
        _KERNELS["start"][(batch,)](token, self.embedding, self.hidden, self.ssq, valid, slot, hidden,
                                    self.embedding.stride(0), valid.stride(0), SSQ_STRIDE,
                                    BLOCK_H=triton.next_power_of_2(hidden))
        parts = 1
        split = self.split_scratch
        for i, layer in enumerate(self.layers):
            rotary = RotaryCache(self.cos, self.sin, position.view(-1), slot, self.keys[i], self.values[i],
                                 self.q_size, self.kv_size, self.head_dim)
            fused_linear(self.hidden, layer.qkv, self.query, EPI_QKV, layer.input_norm, self.eps,
                         ssq_in=(self.ssq, parts), rotary=rotary, scratch=split)
            fused_attention(self.query, self.keys[i], self.values[i], valid, slot, self.scratch, self.context)
            fused_linear(self.context, layer.dense, self.hidden2, EPI_RESIDUAL, residual=self.hidden,
                         ssq_out=self.ssq2, scratch=split)
            fused_linear(self.hidden2, layer.h_to_4h, self.act, EPI_SWIGLU, layer.post_norm, self.eps,
                         ssq_in=(self.ssq2, self.parts_dense), scratch=split)
            fused_linear(self.act, layer.h4h_to_h, self.hidden, EPI_RESIDUAL, residual=self.hidden2,
                         ssq_out=self.ssq, scratch=split)
            parts = self.parts_mlp
        argmax = (self.best, self.best_at) if greedy and self.output_tiles <= SSQ_STRIDE else None
        fused_linear(self.hidden, self.output, self.logits, EPI_STORE, self.final_norm, self.eps,
                     ssq_in=(self.ssq, parts), scratch=split, argmax=argmax, banned=banned)
        if greedy and argmax is None:
            logits = self.logits if banned is None else self.logits.index_fill(1, banned, float("-inf"))
            token.copy_(greedy_token(logits))
        _KERNELS["finish"][(batch,)](self.best, self.best_at, token, position, slot, self.output_tiles, SSQ_STRIDE,
                                     GREEDY=argmax is not None,
                                     BLOCK_T=triton.next_power_of_2(min(self.output_tiles, SSQ_STRIDE)))
        return token if greedy else self.logits


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary [b, v] → [b, 1] (the first maximum, as torch.argmax), in two short passes:
    torch's one-pass argmax of a 65k row runs in a single block (~20 µs on an H200)."""
    b, v = logits.shape
    if v % 256:
        return logits.argmax(-1, keepdim=True)
    values, index = logits.view(b, v // 256, 256).max(-1)
    block = values.argmax(-1, keepdim=True)
    return block * 256 + index.gather(-1, block)
