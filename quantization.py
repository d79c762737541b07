"""Weight-only INT8 / INT4 quantization of ChatGLM2/3 in the official checkpoint layout.

Format (SPEC §5, the layout of THUDM/chatglm2-6b-int4): in every encoder layer the four linears
``self_attention.query_key_value``, ``self_attention.dense``, ``mlp.dense_h_to_4h`` and ``mlp.dense_4h_to_h``
hold

* ``weight``: int8 ``[out, in * bits / 8]`` -- one value per byte for 8 bits; for 4 bits byte ``j`` of a row is
  ``(q[2j] << 4) | (q[2j+1] & 0xF)`` (both nibbles signed, range -8..7);
* ``weight_scale``: ``[out]`` in the model dtype, ``max|w_row| / (2**(bits-1) - 1)``;
* ``bias``: unchanged (only ``query_key_value`` has one).

The packed format lives in one pair of functions, :func:`pack` and :func:`unpack`. :class:`QuantizedLinear`
replaces ``torch.nn.Linear`` and computes ``x @ (q * scale).T + bias`` through one of several kernels
("backends"), chosen per call from the input's device:

* ``"triton"`` -- CUDA, fp16/bf16: fused dequantize-and-multiply kernels that read the packed weights directly
  (small batch, i.e. decode) or a one-pass dequantize kernel followed by cuBLAS (large batch, i.e. prefill).
* ``"cpm_kernels"`` -- CUDA: the official route. Dequantize kernels loaded through cpm_kernels' CUDA driver
  bindings (compiled for the running GPU with NVRTC, so newer GPUs such as Hopper get a kernel image),
  followed by ``F.linear``.
* ``"torch"`` -- any device: dequantize with torch ops, then ``F.linear``. fp16 on CPU is computed in fp32.

``"auto"`` (the default) tries triton, then cpm_kernels, then torch on CUDA, and torch elsewhere. Override per
model with ``quantize(..., backend=NAME)`` or :func:`set_backend`, per module with ``QuantizedLinear.backend``,
or per process with the environment variable ``CHATGLM_QUANT_BACKEND``. Triton and cpm_kernels are optional and
imported lazily; any failure to import, compile or launch them is logged once and the call falls back to the
next backend -- never a crash.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ALLOWED_BITS = (4, 8)
BACKEND_ENV = "CHATGLM_QUANT_BACKEND"
BACKEND_NAMES = ("auto", "triton", "cpm_kernels", "torch")
# The four linears of an encoder layer that the official format quantizes, as attribute paths.
QUANTIZED_LINEARS = (
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)
# Batch rows (tokens) up to which the Triton backend uses its fused kernels; above it dequantizes + cuBLAS.
TRITON_GEMV_MAX_M = 4
TRITON_FUSED_MAX_M = 32


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(
            f"quantization bits must be one of {ALLOWED_BITS} (weight-only int4 or int8), got {bits!r}"
        )
    return bits


# --------------------------------------------------------------------------------------------------------
# The packed format: pack / unpack / dequantize
# --------------------------------------------------------------------------------------------------------
def pack(weight: torch.Tensor, bits: int, scale_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight row-wise and pack it in the official layout (SPEC §5).

    Args:
        weight: float tensor ``[out, in]``.
        bits: 4 or 8.
        scale_dtype: dtype of the returned scale (default: ``weight.dtype``).

    Returns:
        ``(packed, scale)``: ``packed`` int8 ``[out, in * bits // 8]``; ``scale`` ``[out]`` with
        ``scale = max|w_row| / (2**(bits-1) - 1)``. ``q = round(w / scale)`` is computed in float32 against the
        scale as stored (so dequantization reproduces the nearest grid point), clamped to the int range; an
        all-zero row gets scale 0 and q 0.
    """
    bits = _check_bits(bits)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"pack() expects a 2-D float weight [out, in], got {tuple(weight.shape)} {weight.dtype}")
    if bits == 4 and weight.shape[1] % 2:
        raise ValueError(
            f"int4 packing stores two values per byte, so in_features must be even; got {weight.shape[1]}. "
            "Use bits=8 for this layer."
        )
    qmax = 2 ** (bits - 1) - 1
    w = weight.float()
    scale = (w.abs().amax(dim=1) / qmax).to(scale_dtype or weight.dtype)
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(w / safe[:, None]).clamp_(-qmax - 1, qmax).to(torch.int8)
    if bits == 8:
        return q, scale
    return pack_int4(q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in -8..7, ``[out, in]`` (in even), two per byte: ``(q[2j] << 4) | (q[2j+1] & 0xF)``."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int4() expects a 2-D int8 tensor, got {tuple(q.shape)} {q.dtype}")
    if q.shape[1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("int4 values must lie in -8..7")
    high = q[:, 0::2].to(torch.int16) << 4
    low = q[:, 1::2].to(torch.int16) & 0xF
    return (high | low).to(torch.int8)  # fits: high in -128..112 step 16, low in 0..15


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of the packing: int8 ``[out, in * bits // 8]`` -> int8 values ``[out, in]``.

    For 8 bits this is the tensor itself; for 4 bits the high nibble of byte ``j`` is value ``2j`` and the low
    nibble value ``2j + 1``, both sign-extended from 4 bits.
    """
    bits = _check_bits(bits)
    if packed.dtype != torch.int8 or packed.dim() != 2:
        raise ValueError(f"unpack() expects a 2-D int8 tensor, got {tuple(packed.shape)} {packed.dtype}")
    if bits == 8:
        return packed
    high = packed >> 4  # arithmetic shift: sign-extends the high nibble
    low = packed & 0xF
    low = low - ((low & 8) << 1)  # sign-extend the low nibble: 8..15 -> -8..-1
    return torch.stack((high, low), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, bits: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The float weight ``[out, in]`` that a packed weight stands for: ``unpack(packed) * scale[:, None]``.

    Computed in ``dtype`` (default ``scale.dtype``): the product of a small integer and the scale is rounded once.
    """
    dtype = dtype or scale.dtype
    return unpack(packed, bits).to(dtype) * scale.to(dtype)[:, None]


# --------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------
class Backend:
    """One way to compute ``y = x @ dequantize(weight, scale).T + bias``.

    ``linear`` takes ``x`` ``[M, in]`` (2-D, contiguous), ``weight`` int8 ``[out, in*bits/8]``, ``scale`` ``[out]``,
    ``bias`` ``[out]`` or None and returns ``[M, out]`` in ``x.dtype``. ``supports`` is a cheap check of device
    and dtype; ``load`` does the (lazy, possibly failing) one-time setup and returns whether the backend can run.
    """

    name = "base"

    def __init__(self) -> None:
        self._loaded: Optional[bool] = None
        self.error: Optional[str] = None

    def supports(self, x: torch.Tensor, bits: int) -> bool:
        return True

    def _load(self) -> None:
        """One-time setup; raise on failure."""

    def load(self) -> bool:
        if self._loaded is None:
            try:
                self._load()
                self._loaded = True
            except Exception as exc:  # any failure (ImportError, missing libraries, no GPU) -> fallback
                self.disable(exc)
        return bool(self._loaded)

    def disable(self, exc: BaseException) -> None:
        self._loaded = False
        self.error = f"{type(exc).__name__}: {exc}"
        logger.warning("ChatGLM quantization: backend %r unavailable, falling back (%s)", self.name, self.error)

    def available(self, x: torch.Tensor, bits: int) -> bool:
        return self.supports(x, bits) and self.load()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
               bits: int) -> torch.Tensor:
        raise NotImplementedError


class TorchBackend(Backend):
    """Dequantize with torch ops to the compute dtype, then ``F.linear``. Any device, differentiable in ``x``.

    CPU has no fp16 matmul on every build, so fp16 inputs on CPU are computed in fp32 and cast back.
    """

    name = "torch"

    def linear(self, x, weight, scale, bias, bits):
        dtype = x.dtype
        if x.device.type == "cpu" and dtype == torch.float16:
            dtype = torch.float32
        w = dequantize(weight, scale, bits, dtype)
        b = bias.to(dtype) if bias is not None else None
        return F.linear(x.to(dtype), w, b).to(x.dtype)


_triton = None
_tl = None
_TRITON_KERNELS: Dict[str, object] = {}


def _define_tc_helpers(triton, tl) -> Dict[str, object]:
    """Dequantize helpers of the tensor-core GEMV (fp16 activations, M <= 16 rows padded to one 16-row MMA tile)."""
    # Dequantizing costs about one instruction per weight: packed fp16 pairs are built with integer logic ops
    # (a nibble / byte put into the mantissa of 1024.0, the 0x6400 "magic number"), then one f16x2 subtract or
    # fma gives the exact integer value; the multiply-add runs on the tensor cores (mma, fp32 accumulation).
    # pack=4: one 32-bit register holds 4 packed bytes, which is how the MMA operand layout already holds them.
    @triton.jit
    def _i4_hi_f16(w):
        # high nibbles of 4 bytes -> 4 fp16: lop3 = (t & 0x00F000F0 ^ 0x0080..) | 0x6400.. = 1024 + 16*(v+8);
        # then * 1/16 - 72 = v, exactly.
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, k, c;
            prmt.b32 t0, $2, 0, 0x4140;
            prmt.b32 t1, $2, 0, 0x4342;
            lop3.b32 t0, t0, 0x00F000F0, 0x64806480, 0x6a;
            lop3.b32 t1, t1, 0x00F000F0, 0x64806480, 0x6a;
            mov.b32 k, 0x2C002C00;
            mov.b32 c, 0xD480D480;
            fma.rn.f16x2 $0, t0, k, c;
            fma.rn.f16x2 $1, t1, k, c;
            }""",
            constraints="=r,=r,r", args=[w], dtype=tl.float16, is_pure=True, pack=4)

    @triton.jit
    def _i4_lo_f16(w):
        # low nibbles of 4 bytes -> 4 fp16: 1024 + (v+8), minus 1032 = v, exactly.
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, k;
            prmt.b32 t0, $2, 0, 0x4140;
            prmt.b32 t1, $2, 0, 0x4342;
            lop3.b32 t0, t0, 0x000F000F, 0x64086408, 0x6a;
            lop3.b32 t1, t1, 0x000F000F, 0x64086408, 0x6a;
            mov.b32 k, 0x64086408;
            sub.rn.f16x2 $0, t0, k;
            sub.rn.f16x2 $1, t1, k;
            }""",
            constraints="=r,=r,r", args=[w], dtype=tl.float16, is_pure=True, pack=4)

    @triton.jit
    def _i8_f16(w):
        # 4 int8 -> 4 fp16: bytes ^ 0x80 into the low byte of 0x64xx = 1024 + (v+128), minus 1152 = v, exactly.
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, t0, t1, k;
            xor.b32 t, $2, 0x80808080;
            prmt.b32 t0, t, 0x64646464, 0x5140;
            prmt.b32 t1, t, 0x64646464, 0x5342;
            mov.b32 k, 0x64806480;
            sub.rn.f16x2 $0, t0, k;
            sub.rn.f16x2 $1, t1, k;
            }""",
            constraints="=r,=r,r", args=[w], dtype=tl.float16, is_pure=True, pack=4)

    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs no PTX: the same values in plain Triton
        @triton.jit
        def _i4_hi_f16(w):
            return (w.to(tl.int32) >> 4).to(tl.float16)

        @triton.jit
        def _i4_lo_f16(w):
            return ((w.to(tl.int32) << 28) >> 28).to(tl.float16)

        @triton.jit
        def _i8_f16(w):
            return w.to(tl.float16)

    return dict(_i4_hi_f16=_i4_hi_f16, _i4_lo_f16=_i4_lo_f16, _i8_f16=_i8_f16)


def _import_triton() -> None:
    """Set this module's `_triton` / `_tl` (the jit helpers and kernels resolve `triton.language` through them)."""
    global _triton, _tl
    _triton = importlib.import_module("triton")
    _tl = importlib.import_module("triton.language")


def triton_dequant_helpers() -> Dict[str, object]:
    """The dequantize helpers above as Triton functions, for kernels in other modules (decode_kernels_chatglm)."""
    _import_triton()
    return _define_tc_helpers(_triton, _tl)


def _define_triton_kernels() -> None:
    """Define the Triton kernels (module globals ``triton``/``tl`` must be set first)."""
    triton, tl = _triton, _tl

    gemv_configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
        for bn, bk, nw, ns in [
            (4, 512, 4, 2), (8, 256, 4, 2), (8, 512, 4, 3), (16, 256, 4, 2), (16, 512, 8, 2), (4, 1024, 4, 2),
        ]
    ]

    @triton.autotune(configs=gemv_configs, key=["N", "KP", "BITS"])
    @triton.jit
    def _wo_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, KP, stride_xm, stride_wn, stride_ym,
                        BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # One program: one row m of x, BLOCK_N outputs; weight tile [BLOCK_N, BLOCK_K] packed bytes.
        # (A split-K variant with fp32 atomics measured slower on an H200: the extra zero-fill and cast launches
        # cost more than the added parallelism gave; docs/quantization.md.)
        # Decode is memory-bound only if dequantizing costs a few full-rate ALU ops per byte, so no int->float
        # conversions (quarter rate): a value v (offset to unsigned: u = v + 2**(BITS-1)) is written into the
        # mantissa of 1.0, f = 1 + u / 2**BITS, exactly; then sum(v * x) = 2**BITS * sum(f * x) - c * sum(x)
        # with c = 2**BITS + 2**(BITS-1). f is in [1, 2), so the fp32 accumulation loses only a few bits.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_K,), dtype=tl.float32)
        x_row = x_ptr + pid_m * stride_xm
        w_rows = w_ptr + offs_n[:, None] * stride_wn
        for k0 in range(0, KP, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < KP
            w = tl.load(w_rows + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.int32)
            if BITS == 4:
                xe = tl.load(x_row + 2 * kk, mask=mask_k, other=0.0).to(tl.float32)
                xo = tl.load(x_row + 2 * kk + 1, mask=mask_k, other=0.0).to(tl.float32)
                u = w ^ 0x88  # both nibbles to offset binary 0..15
                hi = (((u << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                lo = (((u << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                acc += hi * xe[None, :] + lo * xo[None, :]
                xsum += xe + xo
            else:
                xv = tl.load(x_row + kk, mask=mask_k, other=0.0).to(tl.float32)
                f = ((((w ^ 0x80) << 15) & 0x7F8000) | 0x3F800000).to(tl.float32, bitcast=True)
                acc += f * xv[None, :]
                xsum += xv
        if BITS == 4:
            dot = 16.0 * tl.sum(acc, axis=1) - 24.0 * tl.sum(xsum, axis=0)
        else:
            dot = 256.0 * tl.sum(acc, axis=1) - 384.0 * tl.sum(xsum, axis=0)
        out = dot * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_m * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)

    mm_configs = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
        for bn, bk, nw, ns in [(32, 128, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (32, 256, 4, 2)]
    ] + [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3)]

    @triton.autotune(configs=mm_configs, key=["M_BUCKET", "N", "KP", "BITS"])
    @triton.jit
    def _wo_mm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, KP, stride_xm, stride_wn, stride_ym, M_BUCKET,
                      BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Tensor-core tile kernel: acc[BLOCK_M, BLOCK_N] += x[:, k] @ w[k, :], w dequantized in registers.
        # For int4 the even / odd input columns meet the high / low nibbles: two dots, no interleave.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        dt = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, KP, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < KP
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + kk[:, None],
                        mask=mask_k[:, None] & mask_n[None, :], other=0).to(tl.int32)  # [BLOCK_K, BLOCK_N]
            xm = mask_m[:, None] & mask_k[None, :]
            if BITS == 4:
                xe = tl.load(x_ptr + offs_m[:, None] * stride_xm + 2 * kk[None, :], mask=xm, other=0.0)
                xo = tl.load(x_ptr + offs_m[:, None] * stride_xm + 2 * kk[None, :] + 1, mask=xm, other=0.0)
                acc = tl.dot(xe, (w >> 4).to(dt), acc)
                acc = tl.dot(xo, ((w << 28) >> 28).to(dt), acc)
            else:
                xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=xm, other=0.0)
                acc = tl.dot(xv, w.to(dt), acc)
        acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, KP, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
        # One pass: packed [N, KP] int8 -> out [N, KP * 8 // BITS] in out's dtype (value * scale, rounded once).
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (offs_n < N)[:, None] & (offs_k < KP)[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * KP + offs_k[None, :], mask=mask, other=0).to(tl.int32)
        s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        dt = out_ptr.dtype.element_ty
        if BITS == 4:
            base = out_ptr + offs_n[:, None] * (2 * KP) + 2 * offs_k[None, :]
            tl.store(base, ((w >> 4).to(tl.float32) * s).to(dt), mask=mask)
            tl.store(base + 1, (((w << 28) >> 28).to(tl.float32) * s).to(dt), mask=mask)
        else:
            tl.store(out_ptr + offs_n[:, None] * KP + offs_k[None, :], (w.to(tl.float32) * s).to(dt), mask=mask)

    # ---- tensor-core decode GEMV (fp16 activations): see _define_tc_helpers. The helpers are module globals
    # (not closures) so that the Triton interpreter finds them too.
    globals().update(_define_tc_helpers(triton, tl))

    @triton.jit
    def _wo_tc_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, p_ptr, M, N, KP, K_SPLIT, stride_xm, stride_wn, stride_ym,
                      BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # acc[16, BLOCK_N] = x[16 (rows >= M masked), K] @ W^T over this program's K range (K_SPLIT packed bytes,
        # a multiple of BLOCK_K; the last range is cut at KP unless EVEN_K). W tiles [BLOCK_K, BLOCK_N] of packed bytes are pipelined through shared memory
        # (cp.async, num_stages) and dequantized in registers. int4: even input columns meet the high nibbles,
        # odd ones the low nibbles (x loaded contiguously, then split). SPLIT_K > 1 writes fp32 partial sums
        # p[pid_k, m, n] for _tc_reduce_kernel (fixed order: deterministic); else scale (+bias) and store y.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_m = tl.arange(0, 16)
        mask_m = offs_m < M
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        w_cols = w_ptr + offs_n[None, :] * stride_wn
        k_lo = pid_k * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, KP)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            if EVEN_K:
                w = tl.load(w_cols + kk[:, None], mask=mask_n[None, :], other=0)  # [BLOCK_K, BLOCK_N]
            else:
                w = tl.load(w_cols + kk[:, None], mask=mask_n[None, :] & (kk < k_hi)[:, None], other=0)
            if BITS == 4:
                k2 = 2 * k0 + tl.arange(0, 2 * BLOCK_K)
                if EVEN_K:
                    xmask = mask_m[:, None]
                else:
                    xmask = mask_m[:, None] & (k2 < 2 * k_hi)[None, :]
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k2[None, :], mask=xmask, other=0.0)
                xe, xo = tl.split(tl.reshape(x, (16, BLOCK_K, 2)))
                acc = tl.dot(xe, _i4_hi_f16(w), acc)
                acc = tl.dot(xo, _i4_lo_f16(w), acc)
            else:
                if EVEN_K:
                    xmask = mask_m[:, None]
                else:
                    xmask = mask_m[:, None] & (kk < k_hi)[None, :]
                xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=xmask, other=0.0)
                acc = tl.dot(xv, _i8_f16(w), acc)
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            out = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(p_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)

    @triton.jit
    def _tc_reduce_kernel(p_ptr, s_ptr, b_ptr, y_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.load(p_ptr + m * N + offs, mask=mask, other=0.0)
        for i in tl.static_range(1, SPLIT_K):
            acc += tl.load(p_ptr + (i * M + m) * N + offs, mask=mask, other=0.0)
        out = acc * tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs, out.to(y_ptr.dtype.element_ty), mask=mask)

    _TRITON_KERNELS.update(gemv=_wo_gemv_kernel, mm=_wo_mm_kernel, dequant=_dequant_kernel, tc=_wo_tc_kernel,
                           tc_reduce=_tc_reduce_kernel)


# Launch configurations of the tensor-core GEMV, per (out N, packed in KP, bits):
# (BLOCK_N, BLOCK_K packed bytes, SPLIT_K, num_warps, num_stages), or all zeros for "use the CUDA-core GEMV".
# Fixed per shape (no autotuning at run time, so
# the launch is deterministic inside torch.compile / CUDA graphs). Shapes not listed use _tc_default_config.
# Measured on an H200 (tools/quant_gpu_check.py --sweep, M = 1, CUDA graphs; docs/quantization.md): at the two
# small ChatGLM-6B shapes (qkv 4608x4096, dense 4096x4096) both GEMVs sit at the same ~9 us launch/latency floor
# and the CUDA-core one is a hair faster; the tensor-core one wins at dense_h_to_4h (27392x4096) and, split along
# K, at dense_4h_to_h (4096x13696).
_LEGACY = (0, 0, 0, 0, 0)
TC_CONFIGS: Dict[Tuple[int, int, int], Tuple[int, int, int, int, int]] = {
    (4608, 2048, 4): _LEGACY, (4096, 2048, 4): _LEGACY,
    (27392, 2048, 4): (128, 128, 1, 4, 4), (4096, 6848, 4): (128, 128, 8, 4, 4),
    (4608, 4096, 8): _LEGACY, (4096, 4096, 8): _LEGACY,
    (27392, 4096, 8): (64, 128, 1, 4, 4), (4096, 13696, 8): (64, 128, 4, 4, 4),
}
TC_CONFIG_ENV = "CHATGLM_QUANT_TC_CONFIGS"  # optional JSON file {"N,KP,bits": [BN, BK, SPLIT, warps, stages]}


def load_tc_configs(path: Optional[str] = None) -> None:
    """Merge launch configurations from a JSON file (default: $CHATGLM_QUANT_TC_CONFIGS) into TC_CONFIGS.
    Called once when the Triton backend loads (eagerly, never inside a compiled region)."""
    merge_launch_table(TC_CONFIGS, path or os.environ.get(TC_CONFIG_ENV))


def merge_launch_table(table: Dict[tuple, tuple], path: Optional[str]) -> None:
    """Merge a JSON tuning file {"a,b,...": [v, ...]} into a launch table keyed by int tuples (also used by
    decode_kernels_chatglm). No path: nothing to do; a bad file is logged and ignored, never fatal."""
    if not path:
        return
    try:
        import json
        with open(path) as fh:
            for key, val in json.load(fh).items():
                table[tuple(int(v) for v in key.split(","))] = tuple(int(v) for v in val)
    except Exception as exc:
        logger.warning("ChatGLM: ignoring tuning file %s (%s)", path, exc)


def _tc_default_config(n: int, kp: int, bits: int) -> Tuple[int, int, int, int, int]:
    """Shapes not in TC_CONFIGS: what measured best at the nearest 6B shape (few rows: split K; many: don't)."""
    if n <= 8192:
        return (64, 128, 4, 4, 4)
    return (128, 128, 1, 4, 4) if bits == 4 else (64, 128, 1, 4, 4)


def tc_config(n: int, kp: int, bits: int) -> Optional[Tuple[int, int, int, int, int]]:
    """The launch configuration of the tensor-core GEMV for a packed weight [n, kp], or None if none fits."""
    cfg = TC_CONFIGS.get((n, kp, bits)) or _tc_default_config(n, kp, bits)
    block_n, block_k, split, warps, stages = cfg
    if block_n == 0 or kp % 16:  # BLOCK_N 0: the CUDA-core GEMV is faster for this shape  # rows must stay 16-byte aligned for the vector loads
        return None
    while split > 1 and split * block_k > kp:
        split //= 2
    return (block_n, block_k, split, warps, stages)


class TritonBackend(Backend):
    """CUDA fp16/bf16. Small M: fused kernels reading packed weights. M <= TRITON_GEMV_MAX_M (decode): with fp16
    inputs on sm_80+ the tensor-core GEMV (``_wo_tc_kernel``, launch configuration per shape from TC_CONFIGS),
    else / where TC_CONFIGS says so the CUDA-core GEMV; up to TRITON_FUSED_MAX_M a tensor-core tile kernel.
    Larger M: one-pass Triton dequantize + cuBLAS."""

    name = "triton"

    def supports(self, x, bits):
        return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)

    def _load(self):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        _import_triton()
        if not _TRITON_KERNELS:
            _define_triton_kernels()
        self.tc_enabled = (torch.cuda.get_device_capability() >= (8, 0)
                           and os.environ.get(self.GEMV_ENV, "tc").strip().lower() != "legacy")
        load_tc_configs()

    # The tensor-core GEMV (fp16 only: its dequantization builds fp16 bit patterns; sm_80+ for mma and the
    # f16x2 ops). "legacy" in $CHATGLM_QUANT_GEMV selects the CUDA-core GEMV instead (used for bf16 anyway).
    GEMV_ENV = "CHATGLM_QUANT_GEMV"
    tc_enabled = False  # set in _load: sm_80+ and not $CHATGLM_QUANT_GEMV=legacy

    def use_tc(self, x: torch.Tensor) -> bool:
        return self.tc_enabled and x.dtype == torch.float16

    def tc_linear(self, x, weight, scale, bias, bits, cfg, y):
        m = x.shape[0]
        n, kp = weight.shape
        block_n, block_k, split, warps, stages = cfg
        b = bias if bias is not None else scale
        k_split = -(-kp // (split * block_k)) * block_k  # packed bytes per split, a multiple of block_k
        split = -(-kp // k_split)
        partial = torch.empty(split * m, n, dtype=torch.float32, device=x.device) if split > 1 else y
        _TRITON_KERNELS["tc"][(_triton.cdiv(n, block_n), split)](
            x, weight, scale, b, y, partial, m, n, kp, k_split, x.stride(0), weight.stride(0), y.stride(0),
            BITS=bits, HAS_BIAS=bias is not None, SPLIT_K=split, EVEN_K=kp % k_split == 0, BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=warps, num_stages=stages)
        if split > 1:
            _TRITON_KERNELS["tc_reduce"][(_triton.cdiv(n, 1024), m)](
                partial, scale, b, y, m, n, y.stride(0), SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=1024,
                num_warps=4)
        return y

    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
        n, kp = weight.shape
        out = torch.empty(n, kp * 8 // bits, dtype=dtype, device=weight.device)
        grid = (_triton.cdiv(n, 32), _triton.cdiv(kp, 128))
        _TRITON_KERNELS["dequant"][grid](weight, scale, out, n, kp, BITS=bits, BLOCK_N=32, BLOCK_K=128)
        return out

    def linear(self, x, weight, scale, bias, bits):
        m = x.shape[0]
        n, kp = weight.shape
        if m > TRITON_FUSED_MAX_M:
            return F.linear(x, self.dequantize(weight, scale, bits, x.dtype), bias)
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        b = bias if bias is not None else scale
        if m <= TRITON_GEMV_MAX_M and self.use_tc(x):
            cfg = tc_config(n, kp, bits)
            if cfg is not None:
                return self.tc_linear(x, weight, scale, bias, bits, cfg, y)
        if m <= TRITON_GEMV_MAX_M:
            grid = lambda meta: (m, _triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
            _TRITON_KERNELS["gemv"][grid](x, weight, scale, b, y, m, n, kp, x.stride(0), weight.stride(0),
                                          y.stride(0), BITS=bits, HAS_BIAS=bias is not None)
            return y
        grid = lambda meta: (_triton.cdiv(m, meta["BLOCK_M"]), _triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _TRITON_KERNELS["mm"][grid](x, weight, scale, b, y, m, n, kp, x.stride(0), weight.stride(0),
                                    y.stride(0), 16 if m <= 16 else 32, BITS=bits, HAS_BIAS=bias is not None)
        return y


# CUDA C source of the dequantize kernels for the cpm_kernels route. No headers: fp16/bf16 conversions via PTX.
_CPM_SOURCE = r"""
__device__ __forceinline__ float ld_f32(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld_f16(const unsigned short* p, long i) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i])); return f; }
__device__ __forceinline__ float ld_bf16(const unsigned short* p, long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16); }
__device__ __forceinline__ void st_f32(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st_f16(unsigned short* p, long i, float v) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); p[i] = h; }
__device__ __forceinline__ void st_bf16(unsigned short* p, long i, float v) {
#if __CUDA_ARCH__ >= 800
    unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); p[i] = h;
#else
    unsigned int u = __float_as_uint(v); u += 0x7fffu + ((u >> 16) & 1u); p[i] = (unsigned short)(u >> 16);
#endif
}
#define DEQUANT(T, SUF)                                                                              \
extern "C" __global__ void chatglm_dequant_int4_##SUF(const signed char* __restrict__ w,                \
        const T* __restrict__ s, T* __restrict__ out, int rows, int packed_cols) {                    \
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;                                              \
    if (i >= (long)rows * packed_cols) return;                                                         \
    float sc = ld_##SUF(s, i / packed_cols);                                                           \
    int b = w[i];                                                                                      \
    st_##SUF(out, 2 * i, (float)(b >> 4) * sc);                                                        \
    st_##SUF(out, 2 * i + 1, (float)((b << 28) >> 28) * sc);                                           \
}                                                                                                      \
extern "C" __global__ void chatglm_dequant_int8_##SUF(const signed char* __restrict__ w,                \
        const T* __restrict__ s, T* __restrict__ out, int rows, int cols) {                           \
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;                                              \
    if (i >= (long)rows * cols) return;                                                                \
    st_##SUF(out, i, (float)w[i] * ld_##SUF(s, i / cols));                                             \
}
DEQUANT(float, f32)
DEQUANT(unsigned short, f16)
DEQUANT(unsigned short, bf16)
"""
_CPM_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class CpmKernelsBackend(Backend):
    """CUDA, the official route: dequantize kernels run through cpm_kernels' CUDA bindings, then ``F.linear``.

    The official package ships precompiled kernels that have no image for newer GPUs ("no kernel image is
    available for execution on the device" on Hopper); here the same kind of kernels are compiled for the running
    GPU with cpm_kernels' NVRTC binding, loaded with its driver bindings, and launched on torch's current stream.
    """

    name = "cpm_kernels"

    def __init__(self) -> None:
        super().__init__()
        self._cuda = None
        self._functions: Dict[Tuple[int, str], object] = {}

    def supports(self, x, bits):
        return x.is_cuda and x.dtype in _CPM_SUFFIX

    def _load(self):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        # Importing cpm_kernels imports pkg_resources (setuptools < 81); any failure lands in Backend.load.
        importlib.import_module("cpm_kernels")
        self._nvrtc = importlib.import_module("cpm_kernels.library.nvrtc")
        self._cuda = importlib.import_module("cpm_kernels.library.cuda")

    def _compile(self, device_index: int) -> bytes:
        nvrtc = self._nvrtc
        major, minor = torch.cuda.get_device_capability(device_index)
        prog = nvrtc.nvrtcProgram()
        nvrtc.nvrtcCreateProgram(prog, _CPM_SOURCE, "chatglm_quant.cu", 0, [], [])
        try:
            try:  # a real machine-code image for this GPU when NVRTC knows it, else PTX for the driver to JIT
                nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture=sm_{major}{minor}"])
                buf = ctypes.create_string_buffer(nvrtc.nvrtcGetCUBINSize(prog))
                nvrtc.nvrtcGetCUBIN(prog, buf)
                return buf.raw
            except Exception:
                nvrtc.nvrtcDestroyProgram(prog)
                prog = nvrtc.nvrtcProgram()
                nvrtc.nvrtcCreateProgram(prog, _CPM_SOURCE, "chatglm_quant.cu", 0, [], [])
                nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture=compute_{major}{minor}"])
                buf = ctypes.create_string_buffer(nvrtc.nvrtcGetPTXSize(prog))
                nvrtc.nvrtcGetPTX(prog, buf)
                return buf.raw
        finally:
            nvrtc.nvrtcDestroyProgram(prog)

    def _function(self, device_index: int, name: str):
        key = (device_index, name)
        if key not in self._functions:
            module_key = (device_index, "__module__")
            if module_key not in self._functions:
                self._functions[module_key] = self._cuda.cuModuleLoadData(self._compile(device_index))
            self._functions[key] = self._cuda.cuModuleGetFunction(self._functions[module_key], name)
        return self._functions[key]

    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
        rows, cols = weight.shape
        out = torch.empty(rows, cols * 8 // bits, dtype=dtype, device=weight.device)
        scale = scale.to(dtype).contiguous()
        with torch.cuda.device(weight.device):
            func = self._function(weight.device.index or 0, f"chatglm_dequant_int{bits}_{_CPM_SUFFIX[dtype]}")
            params = [ctypes.c_void_p(weight.data_ptr()), ctypes.c_void_p(scale.data_ptr()),
                      ctypes.c_void_p(out.data_ptr()), ctypes.c_int32(rows), ctypes.c_int32(cols)]
            threads = 256
            self._cuda.cuLaunchKernel(func, (rows * cols + threads - 1) // threads, 1, 1, threads, 1, 1, 0,
                                      torch.cuda.current_stream(weight.device).cuda_stream,
                                      [ctypes.addressof(p) for p in params])
        return out

    def linear(self, x, weight, scale, bias, bits):
        w = self.dequantize(weight, scale, bits, x.dtype)
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


_BACKENDS: Dict[str, Backend] = {b.name: b for b in (TritonBackend(), CpmKernelsBackend(), TorchBackend())}
_AUTO_ORDER = ("triton", "cpm_kernels", "torch")


def _check_backend_name(name: Optional[str]) -> str:
    name = (name or "auto").strip().lower()
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown quantization backend {name!r}; choose one of {BACKEND_NAMES}")
    return name


def get_backend(name: str) -> Backend:
    """The backend object registered under ``name`` ("triton", "cpm_kernels" or "torch")."""
    return _BACKENDS[_check_backend_name(name)]


def available_backends(device: "torch.device | str" = "cpu", dtype: torch.dtype = torch.float16) -> List[str]:
    """Names of the backends that load and accept inputs of ``dtype`` on ``device`` (tries to load them)."""
    probe = torch.empty(1, 2, dtype=dtype, device=device)
    return [n for n in _AUTO_ORDER if _BACKENDS[n].available(probe, 4)]


def resolve_backend(x: torch.Tensor, bits: int, requested: Optional[str] = None) -> Backend:
    """The backend that will run for input ``x``: the requested one (module attribute, else $CHATGLM_QUANT_BACKEND)
    if it can run on ``x``'s device and dtype, else the first of triton, cpm_kernels, torch that can."""
    name = _check_backend_name(requested if requested not in (None, "auto") else os.environ.get(BACKEND_ENV))
    if name != "auto":
        backend = _BACKENDS[name]
        if backend.available(x, bits):
            return backend
        if not backend.supports(x, bits):
            logger.debug("quantization backend %r does not take %s %s inputs", name, x.device.type, x.dtype)
    for candidate in _AUTO_ORDER:
        backend = _BACKENDS[candidate]
        if backend.available(x, bits):
            return backend
    return _BACKENDS["torch"]


# --------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding a weight-only quantized weight in the official layout.

    Parameters (all ``requires_grad=False``, as in the official code):
        weight: int8 ``[out_features, in_features * bits // 8]``
        weight_scale: ``[out_features]`` in the model dtype
        bias: ``[out_features]`` or None

    ``forward`` takes ``[..., in_features]`` and returns ``[..., out_features]`` in the input dtype.
    ``backend`` ("auto", "triton", "cpm_kernels", "torch") picks the kernel; see the module docstring.
    """

    is_chatglm_quantized = True

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True,
                 dtype: torch.dtype = torch.float16, device: "torch.device | str | None" = None,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        bits = _check_bits(bits)
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 needs an even in_features, got {in_features}; use bits=8 for this layer")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.backend = _check_backend_name(backend)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features * bits // 8, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, empty_init: bool = False,
                    device: "torch.device | str | None" = None, backend: Optional[str] = None) -> "QuantizedLinear":
        """Quantize ``linear`` (or, with ``empty_init``, only allocate the quantized tensors). The bias keeps its
        values (moved to ``device`` if given) and is frozen like the quantized weight."""
        w = linear.weight
        device = torch.device(device) if device is not None else w.device
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.bits = _check_bits(bits)
        module.backend = _check_backend_name(backend)
        if module.bits == 4 and linear.in_features % 2:
            raise ValueError(
                f"int4 needs an even in_features, got {linear.in_features}; use bits=8 for this layer")
        if empty_init:
            packed = torch.empty(linear.out_features, linear.in_features * bits // 8, dtype=torch.int8, device=device)
            scale = torch.empty(linear.out_features, dtype=w.dtype, device=device)
        else:
            with torch.no_grad():
                packed, scale = pack(w.detach().to(device), bits, scale_dtype=w.dtype)
        module.weight = nn.Parameter(packed, requires_grad=False)
        module.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
        else:
            module.register_parameter("bias", None)
        return module

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight ``[out, in]`` this module multiplies by."""
        return dequantize(self.weight, self.weight_scale, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(shape)}")
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            backend: Backend = _BACKENDS["torch"]  # only the torch backend is differentiable
        else:
            backend = resolve_backend(x2, self.bits, self.backend)
        if backend.name != "torch":
            x2 = x2.contiguous()
            try:
                # Triton launches on the current GPU, not x's (compat_chatglm.kernel_device; this module stays
                # importable on its own). CPU tensors: Triton's interpreter
                with torch.cuda.device(x2.device) if x2.is_cuda else contextlib.nullcontext():
                    y = backend.linear(x2, self.weight, self.weight_scale, self.bias, self.bits)
            except Exception as exc:  # a kernel that fails at its first launch: log once, fall back for good
                backend.disable(exc)
                y = _BACKENDS["torch"].linear(x2, self.weight, self.weight_scale, self.bias, self.bits)
        else:
            y = backend.linear(x2, self.weight, self.weight_scale, self.bias, self.bits)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


# --------------------------------------------------------------------------------------------------------
# Model-level entry points
# --------------------------------------------------------------------------------------------------------
def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("transformer.encoder.layers", "encoder.layers"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj  # type: ignore[return-value]
    raise ValueError(
        f"{type(model).__name__} has no encoder layers at 'transformer.encoder.layers' or 'encoder.layers'; "
        "quantize() expects a ChatGLMForConditionalGeneration, ChatGLMModel or ChatGLMForSequenceClassification")


def _quantized_targets(model: nn.Module) -> Iterator[Tuple[nn.Module, str, nn.Module]]:
    """(parent module, attribute name, module) for each of the four linears of every encoder layer."""
    for layer in _encoder_layers(model):
        for path in QUANTIZED_LINEARS:
            parent_path, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            yield parent, attr, getattr(parent, attr)


def quantized_bits(model: nn.Module) -> Optional[int]:
    """The bit width the model's encoder linears are quantized to, or None when they are float."""
    bits = {getattr(m, "bits", None) for _, _, m in _quantized_targets(model) if getattr(m, "is_chatglm_quantized", False)}
    return bits.pop() if len(bits) == 1 else (None if not bits else -1)


def quantize(model: nn.Module, bits: int, *, empty_init: bool = False, device: "torch.device | str | None" = None,
             backend: Optional[str] = None) -> nn.Module:
    """Replace the four linears of every encoder layer with :class:`QuantizedLinear` (weight-only int4/int8).

    Args:
        model: ChatGLMForConditionalGeneration / ChatGLMForSequenceClassification (layers at
            ``transformer.encoder.layers``) or ChatGLMModel (``encoder.layers``).
        bits: 4 or 8.
        empty_init: only allocate the quantized tensors (to be filled by ``load_state_dict`` / ``from_pretrained``
            from a checkpoint in the official quantized layout).
        device: where to quantize and keep the quantized layers (default: where each layer's weight is). Quantizing
            on a GPU is much faster than on the CPU.
        backend: kernel choice stored on every quantized layer ("auto", "triton", "cpm_kernels", "torch").

    Quantizing a model that is already quantized to the same ``bits`` does nothing (with a logged message); to
    other bits it raises ValueError. Sets ``model.config.quantization_bit = bits``. Returns ``model``.
    """
    bits = _check_bits(bits)
    backend = _check_backend_name(backend)
    current = quantized_bits(model)
    if current == -1:
        raise ValueError("model is partly quantized with mixed bit widths; load the float checkpoint and quantize it once")
    if current is not None:
        if current == bits:
            logger.warning("ChatGLM model is already quantized to %d bits; quantize(%d) does nothing", bits, bits)
            if backend != "auto":
                set_backend(model, backend)
            return model
        raise ValueError(
            f"model is already quantized to {current} bits and cannot be re-quantized to {bits} bits "
            "(the float weights are gone): load the float checkpoint and quantize it once")
    for parent, attr, linear in list(_quantized_targets(model)):
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"expected torch.nn.Linear at {attr}, found {type(linear).__name__}")
        setattr(parent, attr, QuantizedLinear.from_linear(linear, bits, empty_init=empty_init, device=device,
                                                          backend=backend))
        del linear
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_bit = bits
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set the kernel choice of every quantized layer of ``model`` ("auto", "triton", "cpm_kernels", "torch")."""
    name = _check_backend_name(backend)
    for module in model.modules():
        if getattr(module, "is_chatglm_quantized", False):
            module.backend = name
    return model
