"""int4 GEMV of the fused decode step in Gluon (Triton's explicit-layout dialect), fp16, batch <= 8, sm_80+.

The Triton GEMV of the fused step dequantizes int4 weights to fp16, stages them through shared memory and reloads
them as MMA operands; at batch 1 that path, not the memory, bounds it (~3.5 G weights per ms whatever the bytes;
docs/quantization.md). Here each thread loads 16 bytes of the official packed layout -- 32 consecutive columns of
one row -- with one 128-bit load straight into the registers of an ``mma.m16n8k16`` A fragment (the weights are the
16-row operand, the batch rows the 8-column one) and dequantizes them in place, exactly (the values are the int4
integers), with 4 LOP3 + 1 SHF + 2 HSUB2 + 2 HFMA2 per 8 weights. Nothing goes through shared memory.

The MMA sums over k in any order both operands agree on, so the checkpoint layout stays the official one and x is
permuted in registers to the order the nibbles land in. Per 8 columns 8c..8c+7 (4 bytes, 2 int16 words ``e``):
nibble ``j`` of word ``e`` is column 8c + 4e + (1, 0, 3, 2)[j]; nibbles 0/2 (odd columns) are read as
1024 + (q + 8), nibbles 1/3 (even columns) as 1024 + 16 (q + 8), both then mapped back to q.

`gluon_launch` says whether a GEMV goes here (`available()` and a shape this kernel takes); the fused step uses its
Triton GEMV otherwise. ``CHATGLM_GLUON_INT4=0`` turns this off.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

GLUON_ENV = "CHATGLM_GLUON_INT4"
CONFIG_ENV = "CHATGLM_GLUON_CONFIGS"  # optional JSON {"n,k,epilogue": [BLOCK_N, units, warps, prefetch, split]}
MAX_ROWS = 8  # batch rows: the 8 columns of the MMA's second operand
UNIT = 128  # columns per thread-row unit: 4 threads x 16 bytes x 2 nibbles

# (BLOCK_N, units per iteration, warps, prefetch 0/2, split-K) per (n, k, epilogue); epilogues as in
# decode_kernels_chatglm (0 store, 1 residual, 2 SwiGLU). Shapes not listed stay on the Triton GEMV.
# The fastest on both an H200 and an H100 (tools/int4_gemv_check.py --sweep; docs/quantization.md).
GLUON_CONFIGS: Dict[Tuple[int, int, int], Tuple[int, int, int, int, int]] = {
    (4096, 4096, 1): (64, 4, 4, 0, 8),  # dense
    (4096, 13696, 1): (64, 4, 4, 0, 8),  # 4h_to_h (107 units: the last split ends in a part-tile)
    (13696, 4096, 2): (64, 2, 4, 0, 2),  # h_to_4h (two 64-row tiles per program: gate and up)
}

_STATE: Dict[str, Any] = {}


def load_configs(path: Optional[str] = None) -> None:
    """Merge launch configurations from a JSON file (default: $CHATGLM_GLUON_CONFIGS) into GLUON_CONFIGS."""
    from .quantization import merge_launch_table

    merge_launch_table(GLUON_CONFIGS, path or os.environ.get(CONFIG_ENV))


ttgl = None
gluon = None


def available(device: torch.device) -> bool:
    """Whether the Gluon kernels can run on `device` (CUDA sm_80+, Triton with Gluon, not turned off)."""
    if os.environ.get(GLUON_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    key = ("sm80", device.index)
    if key not in _STATE:
        _STATE[key] = torch.cuda.get_device_capability(device) >= (8, 0)
    return _STATE[key] and _load()


def _load() -> bool:
    global ttgl, gluon
    if "ok" in _STATE:
        return _STATE["ok"]
    try:
        gluon = importlib.import_module("triton.experimental.gluon")
        ttgl = importlib.import_module("triton.experimental.gluon.language")
        _define_kernels()
        _STATE["ok"] = True
    except Exception as exc:  # no Triton, or one without (this) Gluon: the Triton GEMV serves
        logger.info("ChatGLM Gluon int4 GEMV unavailable (%s: %s)", type(exc).__name__, exc)
        _STATE["ok"] = False
    return _STATE["ok"]


@dataclass(frozen=True)
class GluonLaunch:
    """How one shape launches here: a (tiles, splits) grid, each program BLOCK_N outputs (x2 for SwiGLU) over
    `units_per_split` 128-column units."""

    block_n: int
    units: int
    warps: int
    prefetch: int
    splits: int
    units_per_split: int
    tiles: int


def gluon_launch(n: int, k: int, bits: int, epilogue: int, rows: int, dtype: torch.dtype, has_bias: bool,
                 device: torch.device) -> Optional[GluonLaunch]:
    """The launch of an n x k GEMV (n: outputs per half for SwiGLU) here, or None where the Triton GEMV serves."""
    config = GLUON_CONFIGS.get((n, k, epilogue))
    if config is None or bits != 4 or dtype != torch.float16 or rows > MAX_ROWS or has_bias or k % UNIT:
        return None
    block_n, units, warps, prefetch, splits = config
    total = k // UNIT
    per = -(-total // splits)
    per = -(-per // units) * units
    powers_of_two = (units, warps, block_n // (16 * warps))  # the register layouts are built from bit bases
    if n % block_n or block_n % (16 * warps) or any(v < 1 or v & (v - 1) for v in powers_of_two):
        return None
    if not available(device):
        return None
    return GluonLaunch(block_n, units, warps, prefetch, -(-total // per), per, n // block_n)


def _layouts(block_n: int, units: int, warps: int) -> Dict[str, Any]:
    """Register layouts: weights [BLOCK_N, 4 units, 8] int16, x [8, 4 units, 32] fp16, the MMA and its operands."""
    key = (block_n, units, warps)
    if key not in _STATE:
        log2 = lambda v: v.bit_length() - 1  # noqa: E731
        rows_per_thread = block_n // (16 * warps)
        # a lane (t, g): t = lane % 4 picks the 32-column quarter of a unit, g = lane // 4 the row (and g + 8)
        lanes = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
        weights = ttgl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [8, 0, 0]] + [[0, 4 << b, 0] for b in range(log2(units))]
            + [[16 * warps << b, 0, 0] for b in range(log2(rows_per_thread))],
            lane_bases=lanes, warp_bases=[[16 << b, 0, 0] for b in range(log2(warps))], block_bases=[],
            shape=[block_n, 4 * units, 8])
        x = ttgl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1 << b] for b in range(5)] + [[0, 4 << b, 0] for b in range(log2(units))],
            lane_bases=lanes, warp_bases=[[0, 0, 0] for _ in range(log2(warps))], block_bases=[],
            shape=[8, 4 * units, 32])
        mma = ttgl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8])
        _STATE[key] = dict(WL=weights, XL=x, MMA=mma, AL=ttgl.DotOperandLayout(0, mma, 2),
                           BL=ttgl.DotOperandLayout(1, mma, 2),
                           SL=ttgl.BlockedLayout([1, 4], [8, 4], [1, warps], [1, 0]))
    return _STATE[key]


def _define_kernels() -> None:
    @gluon.jit
    def _dequant(w):
        # w: int16 words, two per 32-bit register (pack=2). Nibble j of each word, as fp16 q: LOP3 puts the nibble
        # (+8) into the mantissa of 1024 (j even) or 1024 * 16 (j odd); HSUB2 / HFMA2 take the offset off exactly.
        return ttgl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, a, b, c, d, lo, hi_mul, hi_add;
            mov.b32 lo, 0x64086408;
            mov.b32 hi_mul, 0x2C002C00;
            mov.b32 hi_add, 0xD480D480;
            lop3.b32 a, $4, 0x000F000F, 0x64086408, 0x6a;
            lop3.b32 b, $4, 0x00F000F0, 0x64806480, 0x6a;
            shr.u32 t, $4, 8;
            lop3.b32 c, t, 0x000F000F, 0x64086408, 0x6a;
            lop3.b32 d, t, 0x00F000F0, 0x64806480, 0x6a;
            sub.f16x2 $0, a, lo;
            fma.rn.f16x2 $1, b, hi_mul, hi_add;
            sub.f16x2 $2, c, lo;
            fma.rn.f16x2 $3, d, hi_mul, hi_add;
            }""",
            constraints="=r,=r,=r,=r,r", args=[w], dtype=(ttgl.float16, ) * 4, is_pure=True, pack=2)

    @gluon.jit
    def _a_operand(o_a, o_b, BN: ttgl.constexpr, KU: ttgl.constexpr, AL: ttgl.constexpr):
        # [BN, 4KU, 8] x 2 -> [BN, 64KU] with k = 64u + 16c + 8j + 2t + e: thread t's registers of an A fragment
        a = ttgl.reshape(ttgl.permute(ttgl.reshape(ttgl.join(o_a, o_b), (BN, KU, 4, 4, 2, 2)), (0, 1, 3, 5, 2, 4)),
                         (BN, 64 * KU))
        return ttgl.convert_layout(a, AL, assert_trivial=True)

    @gluon.jit
    def _b_operand(x, KU: ttgl.constexpr, BL: ttgl.constexpr):
        return ttgl.convert_layout(ttgl.reshape(ttgl.permute(x, (1, 3, 4, 2, 5, 0)), (64 * KU, 8)), BL,
                                   assert_trivial=True)

    @gluon.jit
    def _mma_step(w, x_odd, x_even, acc_odd, acc_even, BN: ttgl.constexpr, KU: ttgl.constexpr,
                  AL: ttgl.constexpr, BL: ttgl.constexpr):
        o0, o1, o2, o3 = _dequant(w)  # odd columns (nibbles 0, 2), even columns (nibbles 1, 3)
        acc_odd = ttgl.nvidia.ampere.mma_v2(_a_operand(o0, o2, BN, KU, AL), _b_operand(x_odd, KU, BL), acc_odd)
        acc_even = ttgl.nvidia.ampere.mma_v2(_a_operand(o1, o3, BN, KU, AL), _b_operand(x_even, KU, BL), acc_even)
        return acc_odd, acc_even

    @gluon.jit
    def _x_tile(xp, nwp, rstd, KU: ttgl.constexpr, NORM: ttgl.constexpr, mask=None):
        # x [8, 4KU, 32] -> the odd / even columns of each 8, in the order the nibbles of a thread's words land in
        if mask is None:
            xt = ttgl.load(xp)
        else:
            xt = ttgl.load(xp, mask=mask, other=0.0)
        if NORM:
            if mask is None:
                nw = ttgl.load(nwp)
            else:
                nw = ttgl.load(nwp, mask=mask, other=0.0)
            xt = (xt.to(ttgl.float32) * rstd[:, None, None] * nw.to(ttgl.float32)).to(ttgl.float16)
        x7 = ttgl.permute(ttgl.reshape(xt, (8, KU, 4, 4, 2, 2, 2)), (0, 1, 2, 3, 5, 4, 6))
        x_even, x_odd = ttgl.split(x7)
        return x_odd, x_even

    # programmatic dependent launch, as in decode_kernels_chatglm
    @gluon.jit
    def _wait_for_predecessor():
        ttgl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=ttgl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _allow_successor():
        ttgl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=ttgl.int32,
                                    is_pure=False, pack=1)

    @gluon.jit
    def _gpu_fence():
        ttgl.inline_asm_elementwise("fence.acq_rel.gpu; // $0", "=r", [], dtype=ttgl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _int4_gemv_kernel(
            x_ptr, nw_ptr, w_ptr, s_ptr, r_ptr, y_ptr, ssq_in_ptr, ssq_out_ptr, part_ptr, count_ptr,
            M, N, K, K_WORDS, UNITS_PER_SPLIT, eps, stride_xm, stride_rm, stride_ym, PARTS_IN, SSQ_STRIDE,
            EPILOGUE: ttgl.constexpr, NORM: ttgl.constexpr, PDL: ttgl.constexpr, SPLIT: ttgl.constexpr,
            PREFETCH: ttgl.constexpr, TAIL: ttgl.constexpr, BN: ttgl.constexpr, KU: ttgl.constexpr,
            WL: ttgl.constexpr, XL: ttgl.constexpr, MMA: ttgl.constexpr, AL: ttgl.constexpr, BL: ttgl.constexpr,
            SL: ttgl.constexpr):
        # Program (pid, pid_k): outputs [pid*BN, +BN) (and N + those: the up half of SwiGLU) of the M <= 8 rows,
        # over units [pid_k * UNITS_PER_SPLIT, +UNITS_PER_SPLIT). Same contract as decode_kernels_chatglm's
        # _fused_gemv_kernel: split-K partials [SPLIT, M, 2N], last arriver sums them in a fixed order.
        pid = ttgl.program_id(0)
        pid_k = ttgl.program_id(1)
        u_lo = pid_k * UNITS_PER_SPLIT
        units_here = ttgl.minimum(u_lo + UNITS_PER_SPLIT, K // 128) - u_lo
        n_iter = units_here // KU
        tail = units_here - n_iter * KU  # only the last split can end in a part-tile
        if PDL:
            _wait_for_predecessor()
        # weight words [BN, 4KU, 8]: row n, (unit, quarter t) d, word i
        n1 = ttgl.arange(0, BN, layout=ttgl.SliceLayout(1, ttgl.SliceLayout(2, WL)))
        d1 = ttgl.arange(0, 4 * KU, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(2, WL)))
        i1 = ttgl.arange(0, 8, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(1, WL)))
        wp = (w_ptr + (pid * BN + n1)[:, None, None] * K_WORDS + d1[None, :, None] * 8 + i1[None, None, :]
              + u_lo * 32)
        up_rows = N * K_WORDS  # SwiGLU: the up half's rows
        # x [8, 4KU, 32]: rows past M re-read row M - 1 (unmasked loads); they only reach outputs never stored
        m1 = ttgl.arange(0, 8, layout=ttgl.SliceLayout(1, ttgl.SliceLayout(2, XL)))
        e1 = ttgl.arange(0, 4 * KU, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(2, XL)))
        r1 = ttgl.arange(0, 32, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(1, XL)))
        cols = e1[None, :, None] * 32 + r1[None, None, :] + u_lo * 128
        xp = x_ptr + ttgl.minimum(m1, M - 1)[:, None, None] * stride_xm + cols
        nwp = nw_ptr + cols
        wp0, xp0, nwp0 = wp, xp, nwp
        rstd = ttgl.zeros((8, ), ttgl.float32, ttgl.SliceLayout(1, ttgl.SliceLayout(2, XL)))
        if NORM:  # rmsnorm of x from the per-program partial sums of squares its producer left
            pm = ttgl.arange(0, 8, layout=ttgl.SliceLayout(1, SL))
            pp = ttgl.arange(0, 128, layout=ttgl.SliceLayout(0, SL))
            ss = ttgl.zeros((8, ), ttgl.float32, ttgl.SliceLayout(1, SL))
            for p0 in range(0, PARTS_IN, 128):
                sq = ttgl.load(ssq_in_ptr + pm[:, None] * SSQ_STRIDE + p0 + pp[None, :],
                               mask=(pm < M)[:, None] & (p0 + pp < PARTS_IN)[None, :], other=0.0)
                ss += ttgl.sum(sq, axis=1)
            # rows past M get 1/sqrt(eps): finite, and their outputs are never stored
            rstd = ttgl.convert_layout(1.0 / ttgl.sqrt(ss / K + eps), ttgl.SliceLayout(1, ttgl.SliceLayout(2, XL)))
        # Independent accumulators (odd / even columns, and the two tiles of the unrolled loop): a chain of MMAs
        # on one accumulator waits out each MMA's latency, and these GEMVs are latency-bound.
        z = ttgl.zeros((BN, 8), ttgl.float32, MMA)
        a0, a1, a2, a3, u0, u1, u2, u3 = z, z, z, z, z, z, z, z
        W_STEP: ttgl.constexpr = 32 * KU
        if PREFETCH == 2:  # two register buffers, 2x unrolled: the next tile's loads are in flight during the MMAs
            w_a = ttgl.load(wp)
            if EPILOGUE == 2:
                v_a = ttgl.load(wp + up_rows)
            for p in range(n_iter // 2):
                wp += W_STEP
                w_b = ttgl.load(wp)
                if EPILOGUE == 2:
                    v_b = ttgl.load(wp + up_rows)
                x_odd, x_even = _x_tile(xp, nwp, rstd, KU, NORM)
                a0, a1 = _mma_step(w_a, x_odd, x_even, a0, a1, BN, KU, AL, BL)
                if EPILOGUE == 2:
                    u0, u1 = _mma_step(v_a, x_odd, x_even, u0, u1, BN, KU, AL, BL)
                xp += 128 * KU
                nwp += 128 * KU
                wp += ttgl.where(2 * p + 2 < n_iter, W_STEP, 0)  # never past the split: re-read the last tile
                w_a = ttgl.load(wp)
                if EPILOGUE == 2:
                    v_a = ttgl.load(wp + up_rows)
                x_odd, x_even = _x_tile(xp, nwp, rstd, KU, NORM)
                a2, a3 = _mma_step(w_b, x_odd, x_even, a2, a3, BN, KU, AL, BL)
                if EPILOGUE == 2:
                    u2, u3 = _mma_step(v_b, x_odd, x_even, u2, u3, BN, KU, AL, BL)
                xp += 128 * KU
                nwp += 128 * KU
            if n_iter % 2 == 1:
                x_odd, x_even = _x_tile(xp, nwp, rstd, KU, NORM)
                a0, a1 = _mma_step(w_a, x_odd, x_even, a0, a1, BN, KU, AL, BL)
                if EPILOGUE == 2:
                    u0, u1 = _mma_step(v_a, x_odd, x_even, u0, u1, BN, KU, AL, BL)
        else:
            for it in range(n_iter):
                w = ttgl.load(wp)
                x_odd, x_even = _x_tile(xp, nwp, rstd, KU, NORM)
                a0, a1 = _mma_step(w, x_odd, x_even, a0, a1, BN, KU, AL, BL)
                if EPILOGUE == 2:
                    u0, u1 = _mma_step(ttgl.load(wp + up_rows), x_odd, x_even, u0, u1, BN, KU, AL, BL)
                wp += W_STEP
                xp += 128 * KU
                nwp += 128 * KU
        if TAIL and tail > 0:  # the last units of K: a masked tile, x zeroed past the end
            w_tail = wp0 + n_iter * W_STEP
            w = ttgl.load(w_tail, mask=(d1 // 4 < tail)[None, :, None], other=0)
            x_odd, x_even = _x_tile(xp0 + n_iter * 128 * KU, nwp0 + n_iter * 128 * KU, rstd, KU, NORM,
                                    (e1 // 4 < tail)[None, :, None])
            a0, a1 = _mma_step(w, x_odd, x_even, a0, a1, BN, KU, AL, BL)
            if EPILOGUE == 2:
                w = ttgl.load(w_tail + up_rows, mask=(d1 // 4 < tail)[None, :, None], other=0)
                u0, u1 = _mma_step(w, x_odd, x_even, u0, u1, BN, KU, AL, BL)
        acc = (a0 + a1) + (a2 + a3)
        acc_up = (u0 + u1) + (u2 + u3)
        if PDL == 2:
            _allow_successor()
        offs_n = pid * BN + ttgl.arange(0, BN, layout=ttgl.SliceLayout(1, MMA))
        offs_m = ttgl.arange(0, 8, layout=ttgl.SliceLayout(0, MMA))
        mask = (offs_m < M)[None, :] & (offs_n < N)[:, None]
        last = True
        if SPLIT > 1:
            parts = part_ptr + offs_m[None, :] * (2 * N) + offs_n[:, None]
            ttgl.store(parts + pid_k * M * 2 * N, acc, mask=mask)
            if EPILOGUE == 2:
                ttgl.store(parts + pid_k * M * 2 * N + N, acc_up, mask=mask)
            _gpu_fence()
            ttgl.thread_barrier()
            last = ttgl.atomic_add(count_ptr + pid, 1) == SPLIT - 1
            if last:
                _gpu_fence()
                acc = ttgl.zeros((BN, 8), ttgl.float32, MMA)
                acc_up = ttgl.zeros((BN, 8), ttgl.float32, MMA)
                for i in ttgl.static_range(SPLIT):
                    acc += ttgl.load(parts + i * M * 2 * N, mask=mask, other=0.0, cache_modifier=".cg")
                    if EPILOGUE == 2:
                        acc_up += ttgl.load(parts + i * M * 2 * N + N, mask=mask, other=0.0, cache_modifier=".cg")
                ttgl.store(count_ptr + pid, 0)  # ready for the next launch
        if last:
            acc = acc * ttgl.load(s_ptr + offs_n).to(ttgl.float32)[:, None]
            y_tile = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
            if EPILOGUE == 0:
                ttgl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=mask)
            elif EPILOGUE == 1:  # rounded to fp16 before the residual add, as unfused; sums of squares per tile
                res = ttgl.load(r_ptr + offs_m[None, :] * stride_rm + offs_n[:, None], mask=mask, other=0.0)
                out = (res.to(ttgl.float32) + acc.to(ttgl.float16).to(ttgl.float32)).to(ttgl.float16)
                ttgl.store(y_tile, out, mask=mask)
                sq = out.to(ttgl.float32)
                ttgl.store(ssq_out_ptr + offs_m * SSQ_STRIDE + pid, ttgl.sum(sq * sq, axis=0), mask=offs_m < M)
            else:
                up = acc_up * ttgl.load(s_ptr + N + offs_n).to(ttgl.float32)[:, None]
                gate = acc.to(ttgl.float16).to(ttgl.float32)
                up = up.to(ttgl.float16).to(ttgl.float32)
                ttgl.store(y_tile, (gate / (1.0 + ttgl.exp(-gate)) * up).to(ttgl.float16), mask=mask)

    globals().update(_dequant=_dequant, _a_operand=_a_operand, _b_operand=_b_operand, _mma_step=_mma_step,
                     _x_tile=_x_tile, _wait_for_predecessor=_wait_for_predecessor,
                     _allow_successor=_allow_successor, _gpu_fence=_gpu_fence)
    _STATE["gemv"] = _int4_gemv_kernel


def int4_gemv(launch: GluonLaunch, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
              epilogue: int, norm_weight: Optional[torch.Tensor], eps: float,
              ssq_in: Optional[Tuple[torch.Tensor, int]],
              residual: Optional[torch.Tensor], ssq_out: Optional[torch.Tensor], partial: torch.Tensor,
              counts: torch.Tensor, ssq_stride: int, pdl: int) -> torch.Tensor:
    """The `fused_linear` contract (decode_kernels_chatglm) for official int4 weights [n_out, k / 2] int8."""
    m, k = x.shape
    n = out.shape[1]
    dummy = weight
    _STATE["gemv"][(launch.tiles, launch.splits)](
        x, norm_weight if norm_weight is not None else dummy, weight.view(torch.int16), scale,
        residual if residual is not None else dummy, out, ssq_in[0] if ssq_in else dummy,
        ssq_out if ssq_out is not None else dummy, partial, counts,
        m, n, k, k // 4, launch.units_per_split, eps, x.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), ssq_in[1] if ssq_in else 0, ssq_stride,
        EPILOGUE=epilogue, NORM=norm_weight is not None, PDL=pdl, SPLIT=launch.splits, PREFETCH=launch.prefetch,
        TAIL=(k // UNIT) % launch.units != 0,
        BN=launch.block_n, KU=launch.units, num_warps=launch.warps,
        **_layouts(launch.block_n, launch.units, launch.warps), **({"launch_pdl": True} if pdl else {}))
    return out
