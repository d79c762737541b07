"""Fused kernels for long prefills on CUDA (inference, fp16/bf16): the position-wise work between the matmuls.

A 131072-token prefill spends ~9 s in attention and the linears, and in eager torch another ~1.2 s in the small
operations between them, each a separate pass over activations (an RMSNorm alone is seven kernels through float32
temporaries; docs/performance.md). Here each is one pass:

  ``rms_norm``         x [rows, hidden] -> weight * (x * rsqrt(mean(x²) + eps)), float32 inside
  ``rotary_split``     fused qkv output [b, s, q + 2·kv] -> rotated q, rotated k, v written into their buffers
  ``swiglu``           [rows, 2·ffn] -> silu(gate) * up
  ``long_causal_attention``  the causal triangle (and the keys of a cache before it) as cuDNN calls on L2-sized
                             blocks, merged by log-sum-exp

Rounding follows the torch code they replace (products rounded to the model dtype where torch rounds them), so
the fused and unfused prefill agree to the last bit or nearly. `enabled(x)` says whether they apply; set
``CHATGLM_FUSED_PREFILL=0`` to turn them off. They also run under ``TRITON_INTERPRET=1`` on CPU tensors (tests).
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Callable, Dict, Optional

import torch

from .compat_chatglm import kernel_device

logger = logging.getLogger(__name__)

FUSED_PREFILL_ENV = "CHATGLM_FUSED_PREFILL"
# The square blocks of the causal triangle: keys and values of one block (32768 x 128 x 2 x 2 bytes = 16 MiB per
# kv head) stay in L2 while its 16 query heads read them (docs/performance.md: 584 vs 556 TFLOP/s at 131072 tokens).
ATTENTION_BLOCK = 32768
MIN_BLOCKED_LENGTH = 2 * ATTENTION_BLOCK

_KERNELS: Dict[str, Any] = {}
_STATE: Dict[str, Optional[bool]] = {"triton": None, "lse_attention": None}
triton = None
tl = None


def enabled(x: torch.Tensor) -> bool:
    """Whether the fused prefill kernels apply to activations like `x` (CUDA sm_80+ or the Triton interpreter,
    fp16/bf16, no grad)."""
    if os.environ.get(FUSED_PREFILL_ENV, "1") == "0" or torch.is_grad_enabled():
        return False
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if x.is_cuda:
        if torch.cuda.get_device_capability(x.device) < (8, 0):  # Triton's bf16 and these tiles want sm_80+
            return False
    elif not (interpreted and x.device.type == "cpu"):
        return False
    return _load_triton()


def _load_triton() -> bool:
    global triton, tl
    if _STATE["triton"] is None:
        try:
            triton = importlib.import_module("triton")
            tl = importlib.import_module("triton.language")
            _define_kernels()
            _STATE["triton"] = True
        except Exception as exc:  # no Triton, or one too old: the torch code runs instead
            logger.info("ChatGLM fused prefill kernels unavailable (%s: %s)", type(exc).__name__, exc)
            _STATE["triton"] = False
    return bool(_STATE["triton"])


def _kernel(name: str) -> Any:
    if not _load_triton():
        raise RuntimeError("the fused prefill kernels need Triton (pip install triton); check enabled() first")
    return _KERNELS[name]


def _define_kernels() -> None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, eps, BLOCK: tl.constexpr):
        # One row per program; the whole row in registers (hidden <= BLOCK).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, (w * (x * rstd)).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_kernel(h_ptr, y_ptr, F, stride_h, stride_y, BLOCK: tl.constexpr):
        # y[row, c] = silu(h[row, c]) * h[row, F + c]; silu and the product each rounded, as in torch.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < F
        dt = y_ptr.dtype.element_ty
        gate = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + F + offs, mask=mask, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, (act * up).to(dt), mask=mask)

    @triton.jit
    def _rotary_split_kernel(src_ptr, cos_ptr, sin_ptr, dst_ptr, n_rows, S, n_heads, stride_src_b, stride_src_s,
                             stride_cos_b, stride_cos_s, stride_dst_b, stride_dst_h, stride_dst_s,
                             HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, ROTATE: tl.constexpr,
                             ROWS: tl.constexpr):
        # Rows are (batch, position, head) triples, HEAD_DIM contiguous values each in src (a slice of the fused
        # projection) and in dst ([b, heads, s, d]). The first ROT_PAIRS interleaved pairs of each head rotate:
        # (e, o) -> (e·cos - o·sin, o·cos + e·sin), float32 math rounded to the model dtype after each product and
        # sum, as torch computes it in that dtype.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = (rows < n_rows)[:, None]
        head = rows % n_heads
        pos = (rows // n_heads) % S
        b = rows // (n_heads * S)
        offs_d = tl.arange(0, HEAD_DIM)
        src = src_ptr + (b * stride_src_b + pos * stride_src_s + head * HEAD_DIM)[:, None] + offs_d[None, :]
        x = tl.load(src, mask=rmask, other=0.0)
        if ROTATE:
            dt = x.dtype
            even, odd = tl.split(tl.reshape(x, (ROWS, HEAD_DIM // 2, 2)))
            pairs = tl.arange(0, HEAD_DIM // 2)
            rot = (pairs < ROT_PAIRS)[None, :]
            table = (b * stride_cos_b + pos * stride_cos_s)[:, None] + pairs[None, :]
            c = tl.load(cos_ptr + table, mask=rmask & rot, other=1.0).to(tl.float32)
            s = tl.load(sin_ptr + table, mask=rmask & rot, other=0.0).to(tl.float32)
            e = even.to(tl.float32)
            o = odd.to(tl.float32)
            new_even = ((e * c).to(dt).to(tl.float32) - (o * s).to(dt).to(tl.float32)).to(dt)
            new_odd = ((o * c).to(dt).to(tl.float32) + (e * s).to(dt).to(tl.float32)).to(dt)
            x = tl.reshape(tl.join(tl.where(rot, new_even, even), tl.where(rot, new_odd, odd)), (ROWS, HEAD_DIM))
        dst = dst_ptr + (b * stride_dst_b + head * stride_dst_h + pos * stride_dst_s)[:, None] + offs_d[None, :]
        tl.store(dst, x, mask=rmask)

    @triton.jit
    def _lse_merge_kernel(parts_ptr, lses_ptr, out_ptr, n_parts, T, H, stride_pb, stride_ph, stride_ps,
                          stride_lb, stride_lh, stride_ls, stride_ob, stride_oh, stride_os,
                          HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
        # out[b, h, t] = sum_j w_j o_j[b, h, t] / sum_j w_j, w_j = exp(lse_j - max_j lse_j), over n_parts partial
        # attention outputs o_j and their log-sum-exps lse_j, given as address tables (all parts share strides).
        pid_t = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        offs_d = tl.arange(0, HEAD_DIM)
        lse_at = b * stride_lb + h * stride_lh + offs_t * stride_ls
        tile = b * stride_pb + h * stride_ph + offs_t[:, None] * stride_ps + offs_d[None, :]
        top = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        for j in range(n_parts):
            lse = tl.load(lses_ptr + j).to(tl.pointer_type(tl.float32))
            top = tl.maximum(top, tl.load(lse + lse_at, mask=tmask, other=0.0))
        total = tl.zeros((BLOCK_T,), tl.float32)
        acc = tl.zeros((BLOCK_T, HEAD_DIM), tl.float32)
        for j in range(n_parts):
            lse = tl.load(lses_ptr + j).to(tl.pointer_type(tl.float32))
            part = tl.load(parts_ptr + j).to(tl.pointer_type(out_ptr.dtype.element_ty))
            weight = tl.exp(tl.load(lse + lse_at, mask=tmask, other=0.0) - top)
            total += weight
            acc += weight[:, None] * tl.load(part + tile, mask=tmask[:, None], other=0.0).to(tl.float32)
        out = out_ptr + b * stride_ob + h * stride_oh + offs_t[:, None] * stride_os + offs_d[None, :]
        tl.store(out, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=tmask[:, None])

    _KERNELS.update(rms_norm=_rms_norm_kernel, swiglu=_swiglu_kernel, rotary_split=_rotary_split_kernel,
                    lse_merge=_lse_merge_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm of x [b, s, hidden] → [b, s, hidden] in x's dtype (into `out` if given)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    hidden = x.shape[-1]
    with kernel_device(x):
        for b in range(x.shape[0]):  # rows of one sequence are equally spaced; batches need not be
            _kernel("rms_norm")[(x.shape[1],)](x[b], weight, out[b], hidden, x.stride(1), out.stride(1), eps,
                                                BLOCK=triton.next_power_of_2(hidden), num_warps=8)
    return out


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h [b, s, 2·ffn] → silu(h[..., :ffn]) * h[..., ffn:], [b, s, ffn]."""
    ffn = h.shape[-1] // 2
    out = h.new_empty(*h.shape[:-1], ffn)
    block = 1024
    with kernel_device(h):
        for b in range(h.shape[0]):
            _kernel("swiglu")[(h.shape[1], triton.cdiv(ffn, block))](h[b], out[b], ffn, h.stride(1), out.stride(1),
                                                                     BLOCK=block, num_warps=4)
    return out


def rotary_split(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> None:
    """qkv [b, s, (heads + 2·kv_heads)·d] (the fused projection) → rotary applied, written into query
    [b, heads, s, d], key and value [b, kv_heads, s, d] (any strides, d contiguous). cos/sin [b|1, 1, s, pairs]."""
    b, s, _ = qkv.shape
    head_dim = query.shape[-1]
    cos_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    rows = 32
    offsets = (0, query.shape[1] * head_dim, (query.shape[1] + key.shape[1]) * head_dim)
    with kernel_device(qkv):
        for dst, rotate, offset in zip((query, key, value), (True, True, False), offsets):
            n_rows = b * s * dst.shape[1]
            _kernel("rotary_split")[(triton.cdiv(n_rows, rows),)](
                qkv[..., offset:], cos, sin, dst, n_rows, s, dst.shape[1], qkv.stride(0), qkv.stride(1), cos_b,
                cos.stride(2), dst.stride(0), dst.stride(1), dst.stride(2), HEAD_DIM=head_dim,
                ROT_PAIRS=cos.shape[-1], ROTATE=rotate, ROWS=rows, num_warps=4,
                enable_fp_fusion=False)  # no fma: torch rounds each product


def _attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN attention that also returns the log-sum-exp of each query row: [b, h, q, d], [b, h, q, 1] (float32).
    A private torch op (its signature is torch 2.5+'s); `_lse_attention_works` checks it before any use."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, causal, False)
    return out[0], out[1]


def _merge(parts: list[torch.Tensor], lses: list[torch.Tensor], out: torch.Tensor) -> None:
    """out [b, h, t, d] ← the log-sum-exp weighted mean of the partial outputs (same shape as out)."""
    b, h, t, d = out.shape
    if any(p.stride() != parts[0].stride() for p in parts) or any(x.stride() != lses[0].stride() for x in lses):
        parts, lses = [p.contiguous() for p in parts], [x.contiguous() for x in lses]
    # Address tables. From pinned memory, so the copy does not wait for the GPU to drain (a pageable copy syncs);
    # the caching allocators reuse freed memory in stream order, so nothing needs keeping alive by hand.
    table = torch.tensor([p.data_ptr() for p in parts] + [x.data_ptr() for x in lses], dtype=torch.int64)
    if out.is_cuda:
        table = table.pin_memory().to(out.device, non_blocking=True)
    addresses, lse_addresses = table[:len(parts)], table[len(parts):]
    block_t = 64
    with kernel_device(out):
        _kernel("lse_merge")[(triton.cdiv(t, block_t), b * h)](
            addresses, lse_addresses, out, len(parts), t, h, parts[0].stride(0), parts[0].stride(1),
            parts[0].stride(2), lses[0].stride(0), lses[0].stride(1), lses[0].stride(2), out.stride(0),
            out.stride(1), out.stride(2), HEAD_DIM=d, BLOCK_T=block_t, num_warps=4)


def blocked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block: int,
                             attend: Optional[Callable] = None) -> torch.Tensor:
    """Causal attention as blocks of `block` queries x keys, merged by log-sum-exp.

    query [b, heads, s, d] (the last s positions), key/value [b, kv_heads, past + s, d] → [b, heads, s, d] in
    query's memory layout. A query block sees the past in unmasked blocks, the earlier query blocks' keys unmasked
    and its own square causally. Each kv head serves its group of query heads through a stride-0 expand (no copy).
    `attend(q, k, v, causal)` → (output, log-sum-exp [b, h, q, 1]); default: cuDNN's."""
    attend = attend or _attention_with_lse
    b, heads, s, d = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    past = total - s
    group = heads // kv_heads
    out = torch.empty_like(query)
    past_blocks = [slice(start, min(start + block, past)) for start in range(0, past, block)]
    blocks = [slice(start, min(start + block, s)) for start in range(0, s, block)]
    for g in range(kv_heads):
        heads_g = slice(g * group, (g + 1) * group)
        k_g = key[:, g:g + 1].expand(b, group, total, d)
        v_g = value[:, g:g + 1].expand(b, group, total, d)
        for i, rows in enumerate(blocks):
            q = query[:, heads_g, rows]
            parts, lses = [], []
            key_blocks = past_blocks + [slice(past + cols.start, past + cols.stop) for cols in blocks[:i + 1]]
            for j, cols in enumerate(key_blocks):
                part, lse = attend(q, k_g[:, :, cols], v_g[:, :, cols], causal=j == len(key_blocks) - 1)
                parts.append(part)
                lses.append(lse)
            _merge(parts, lses, out[:, heads_g, rows])
    return out


def long_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Optional[torch.Tensor]:
    """Causal attention of s new positions ([b, heads, s, d]) over a cache's keys and theirs ([b, kv_heads,
    past + s, d]) as L2-sized cuDNN blocks. None where that does not apply (no CUDA, no working cuDNN log-sum-exp,
    or a short input without a past, which one SDPA call does best): the caller runs SDPA. With a past, SDPA would
    need a dense [s, past + s] mask, so the blocks are used at any length."""
    s, past = query.shape[2], key.shape[2] - query.shape[2]
    if past < 0 or (past == 0 and s < MIN_BLOCKED_LENGTH) or not enabled(query):
        return None
    if not _lse_attention_works(query):
        return None
    return blocked_causal_attention(query, key, value, ATTENTION_BLOCK)


def _lse_attention_works(like: torch.Tensor) -> bool:
    """Once per process: does the private cuDNN op run here and give log-sum-exps the merge gets right?"""
    if _STATE["lse_attention"] is None:
        try:
            generator = torch.Generator(device=like.device).manual_seed(0)
            shape, past = (1, 4, 384, like.shape[-1]), 200  # a past too: unmasked blocks of other lengths
            query = torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
            key, value = (torch.randn((1, 2, past + shape[2], shape[3]), generator=generator, device=like.device,
                                      dtype=like.dtype) for _ in range(2))
            got = blocked_causal_attention(query, key, value, 128)
            allowed = torch.ones(shape[2], past + shape[2], dtype=torch.bool, device=like.device).tril(past)
            want = torch.nn.functional.scaled_dot_product_attention(
                query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=allowed)
            error = (got.float() - want.float()).abs().max().item()
            _STATE["lse_attention"] = error < 2e-2
            if error >= 2e-2:
                logger.info("ChatGLM blocked attention off: merged blocks differ from SDPA by %.3g", error)
        except Exception as exc:  # no such op in this torch, another signature, no cuDNN kernel: one SDPA call
            logger.info("ChatGLM blocked attention off (%s: %s)", type(exc).__name__, str(exc)[:200])
            _STATE["lse_attention"] = False
    return bool(_STATE["lse_attention"])
