"""Gluon int4 GEMV: frag128 int16 words loaded (LDG.128) straight into mma.m16n8k16 A-fragment registers."""
import math
from triton.experimental import gluon
from triton.experimental.gluon import language as ttgl
from kernels import _deq4_asm


@gluon.jit
def _deq8_asm(w):
    # w: int32 tensor (= two frag128 int16: e=0 low half, e=1 high half); 8 fp16 outputs o[j][e]
    return ttgl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, a, b, c, d;
        lop3.b32 a, $8, 0x000F000F, 0x64086408, 0x6a;
        lop3.b32 b, $8, 0x00F000F0, 0x64806480, 0x6a;
        shr.u32 t, $8, 8;
        lop3.b32 c, t, 0x000F000F, 0x64086408, 0x6a;
        lop3.b32 d, t, 0x00F000F0, 0x64806480, 0x6a;
        mov.b32 {$0, $1}, a;
        mov.b32 {$2, $3}, b;
        mov.b32 {$4, $5}, c;
        mov.b32 {$6, $7}, d;
        }""",
        constraints="=h,=h,=h,=h,=h,=h,=h,=h,r", args=[w],
        dtype=(ttgl.float16, ) * 8, is_pure=True, pack=1)


@gluon.jit
def _deq(w, W32: ttgl.constexpr):
    if W32:
        a0, a1, b0, b1, c0, c1, d0, d1 = _deq8_asm(w)
        return ttgl.join(a0, a1), ttgl.join(b0, b1), ttgl.join(c0, c1), ttgl.join(d0, d1)
    else:
        return _deq4_asm(w)


def _lg(v):
    return int(math.log2(v))


def make_layouts(BN, KU, nw, W32=False):
    """W tile [BN, 4KU, 8] int16 (W32: [BN, 4KU, 4] int32), X tile [8, 4KU, 32] fp16, MMA [BN, 8]."""
    R = BN // (16 * nw)
    assert R >= 1 and BN == 16 * nw * R
    wl = ttgl.DistributedLinearLayout(
        reg_bases=([[0, 0, 1], [0, 0, 2]] if W32 else [[0, 0, 1], [0, 0, 2], [0, 0, 4]]) + [[8, 0, 0]] + [[0, 4 << b, 0] for b in range(_lg(KU))]
        + [[16 * nw << b, 0, 0] for b in range(_lg(R))],
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16 << b, 0, 0] for b in range(_lg(nw))], block_bases=[], shape=[BN, 4 * KU, 4 if W32 else 8])
    xl = ttgl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1 << b] for b in range(5)] + [[0, 4 << b, 0] for b in range(_lg(KU))],
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[0, 0, 0] for b in range(_lg(nw))], block_bases=[], shape=[8, 4 * KU, 32])
    mma = ttgl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[nw, 1], instr_shape=[16, 8])
    return dict(WL=wl, XL=xl, MMA=mma, AL=ttgl.DotOperandLayout(0, mma, 2), BL=ttgl.DotOperandLayout(1, mma, 2),
                SL=ttgl.BlockedLayout([8], [32], [nw], [0]))


@gluon.jit
def _a_op(o_a, o_b, BN: ttgl.constexpr, KU: ttgl.constexpr, AL: ttgl.constexpr, TRIV: ttgl.constexpr):
    a = ttgl.reshape(ttgl.permute(ttgl.reshape(ttgl.join(o_a, o_b), (BN, KU, 4, 4, 2, 2)), (0, 1, 3, 5, 2, 4)), (BN, 64 * KU))
    return ttgl.convert_layout(a, AL, assert_trivial=TRIV)


@gluon.jit
def _b_op(x, KU: ttgl.constexpr, BL: ttgl.constexpr, TRIV: ttgl.constexpr):
    return ttgl.convert_layout(ttgl.reshape(ttgl.permute(x, (1, 3, 4, 2, 5, 0)), (64 * KU, 8)), BL, assert_trivial=TRIV)


@gluon.jit
def _step(w, xp, acc_lo, acc_hi, KU: ttgl.constexpr, AL: ttgl.constexpr, BL: ttgl.constexpr,
          TRIV: ttgl.constexpr, W32: ttgl.constexpr):
    xt = ttgl.load(xp)  # rows m >= M re-read row M-1; they only reach y[:, m >= M]
    BN: ttgl.constexpr = w.shape[0]
    o0, o1, o2, o3 = _deq(w, W32)
    x7 = ttgl.permute(ttgl.reshape(xt, (8, KU, 4, 4, 2, 2, 2)), (0, 1, 2, 3, 5, 6, 4))
    x_lo, x_hi = ttgl.split(x7)
    acc_lo = ttgl.nvidia.ampere.mma_v2(_a_op(o0, o2, BN, KU, AL, TRIV), _b_op(x_lo, KU, BL, TRIV), acc_lo)
    acc_hi = ttgl.nvidia.ampere.mma_v2(_a_op(o1, o3, BN, KU, AL, TRIV), _b_op(x_hi, KU, BL, TRIV), acc_hi)
    return acc_lo, acc_hi


@gluon.jit
def gemv_frag_gl(w_ptr, x_ptr, s_ptr, y_ptr, M, N, K, K4,
                 BN: ttgl.constexpr, KU: ttgl.constexpr, SPLIT: ttgl.constexpr,
                 WL: ttgl.constexpr, XL: ttgl.constexpr, MMA: ttgl.constexpr, AL: ttgl.constexpr,
                 BL: ttgl.constexpr, SL: ttgl.constexpr, TRIV: ttgl.constexpr, PREFETCH: ttgl.constexpr,
                 W32: ttgl.constexpr):
    # PREFETCH 0: load-then-use; 1: next tile loaded before this one is used (loop-carried copy);
    # 2: 2x unrolled ping-pong buffers (no copies).  Split s covers units [s*per, min((s+1)*per, K/128));
    # the host guarantees that each split's unit count is a multiple of KU.
    pid = ttgl.program_id(0)
    sid = ttgl.program_id(1)
    n_units = K // 128
    per = (n_units + SPLIT - 1) // SPLIT
    u_lo = sid * per
    u_hi = ttgl.minimum(u_lo + per, n_units)
    n_it = (u_hi - u_lo) // KU
    # weight pointers [BN, 4KU, EW]
    n1 = ttgl.arange(0, BN, layout=ttgl.SliceLayout(1, ttgl.SliceLayout(2, WL)))
    d1 = ttgl.arange(0, 4 * KU, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(2, WL)))
    EW: ttgl.constexpr = 4 if W32 else 8        # elements per 16 bytes
    i1 = ttgl.arange(0, EW, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(1, WL)))
    woff = (pid * BN + n1)[:, None, None] * (K4 * EW // 8) + d1[None, :, None] * EW + i1[None, None, :]
    wp = w_ptr + woff + u_lo * (4 * EW)
    WSTEP: ttgl.constexpr = 4 * EW * KU
    # x pointers [8, 4KU, 32]
    m1 = ttgl.arange(0, 8, layout=ttgl.SliceLayout(1, ttgl.SliceLayout(2, XL)))
    e1 = ttgl.arange(0, 4 * KU, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(2, XL)))
    r1 = ttgl.arange(0, 32, layout=ttgl.SliceLayout(0, ttgl.SliceLayout(1, XL)))
    xp = x_ptr + ttgl.minimum(m1, M - 1)[:, None, None] * K + e1[None, :, None] * 32 + r1[None, None, :] + u_lo * 128
    acc_lo = ttgl.zeros((BN, 8), ttgl.float32, MMA)
    acc_hi = ttgl.zeros((BN, 8), ttgl.float32, MMA)
    if PREFETCH == 2:
        w_a = ttgl.load(wp)
        for p in range(n_it // 2):
            wp += WSTEP
            w_b = ttgl.load(wp)
            acc_lo, acc_hi = _step(w_a, xp, acc_lo, acc_hi, KU, AL, BL, TRIV, W32)
            xp += 128 * KU
            wp += ttgl.where(2 * p + 2 < n_it, WSTEP, 0)   # no read past the split: re-read the last tile
            w_a = ttgl.load(wp)
            acc_lo, acc_hi = _step(w_b, xp, acc_lo, acc_hi, KU, AL, BL, TRIV, W32)
            xp += 128 * KU
        if n_it % 2 == 1:
            acc_lo, acc_hi = _step(w_a, xp, acc_lo, acc_hi, KU, AL, BL, TRIV, W32)
    elif PREFETCH == 1:
        w = ttgl.load(wp)
        for it in range(n_it):
            wp += ttgl.where(it + 1 < n_it, WSTEP, 0)
            w_nxt = ttgl.load(wp)
            acc_lo, acc_hi = _step(w, xp, acc_lo, acc_hi, KU, AL, BL, TRIV, W32)
            xp += 128 * KU
            w = w_nxt
    else:
        for it in range(n_it):
            w = ttgl.load(wp)
            wp += WSTEP
            acc_lo, acc_hi = _step(w, xp, acc_lo, acc_hi, KU, AL, BL, TRIV, W32)
            xp += 128 * KU
    # zero-point correction sums over this split's K range, one token row at a time (M is small)
    ks = ttgl.arange(0, 1024, layout=SL)
    hi_sel = (ks % 8) >= 4
    mcol = ttgl.arange(0, 8, layout=ttgl.SliceLayout(0, MMA))
    s_lo_v = ttgl.zeros((8, ), ttgl.float32, ttgl.SliceLayout(0, MMA))
    s_hi_v = ttgl.zeros((8, ), ttgl.float32, ttgl.SliceLayout(0, MMA))
    for m in range(M):
        a_lo = ttgl.zeros((1024, ), ttgl.float32, SL)
        a_hi = ttgl.zeros((1024, ), ttgl.float32, SL)
        for k0 in range(u_lo * 128, u_hi * 128, 1024):
            xs = ttgl.load(x_ptr + m * K + k0 + ks, mask=k0 + ks < u_hi * 128, other=0.0).to(ttgl.float32)
            a_lo += ttgl.where(hi_sel, 0.0, xs)
            a_hi += ttgl.where(hi_sel, xs, 0.0)
        s_lo_v = ttgl.where(mcol == m, ttgl.sum(a_lo, axis=0), s_lo_v)
        s_hi_v = ttgl.where(mcol == m, ttgl.sum(a_hi, axis=0), s_hi_v)
    nr = pid * BN + ttgl.arange(0, BN, layout=ttgl.SliceLayout(1, MMA))
    sc = ttgl.load(s_ptr + nr).to(ttgl.float32)
    y = ((acc_lo - 1032.0 * s_lo_v[None, :]) + (acc_hi - 1152.0 * s_hi_v[None, :]) * 0.0625) * sc[:, None]
    yp = y_ptr + mcol[None, :] * N + nr[:, None]
    ym = (mcol < M)[None, :] & (nr >= 0)[:, None]
    if SPLIT == 1:
        ttgl.store(yp, y.to(y_ptr.dtype.element_ty), mask=ym)
    else:
        ttgl.atomic_add(yp, y, mask=ym)
