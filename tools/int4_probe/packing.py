"""Load-time repack of the official int4 format into the 'mma-fragment' format used by the new kernels.

Official: int8 [N, K/2]; byte j = (q[2j] << 4) | (q[2j+1] & 0xF), q signed in -8..7.
New ("frag128"): int16 [N, K/4] (same bytes).  K is cut into 128-column units u; unit u of a row is 32 int16
(64 bytes) ordered [t=0..3][i=0..7], i = 2c + e.  Nibble j = 2*j1 + j0 (bits 4j..4j+3) of int16 (u, t, i) holds
    q[n, 128u + 32t + 8c + 4j0 + 2j1 + e]            (two's complement nibble, as in the official format)
So thread-lane t of an mma fragment reads 16 contiguous bytes per row per unit (one LDG.128) and its x values
x[128u + 32t : 128u + 32t + 32] are contiguous too.  Requires K % 128 == 0.
Nibbles with j0 == 0 ("lo", columns k % 8 < 4) are dequantised as 1024 + (v + 8); j0 == 1 ("hi", k % 8 >= 4)
as 1024 + 16 (v + 8).  (j0 is the 4-column bit so that the lo/hi x values of a thread are adjacent registers,
as the mma B operand wants.)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from full_shape_check import import_package  # noqa: E402

import_package()
from chatglm.quantization import pack_int4, unpack  # noqa: E402


def unpack_official(wp: torch.Tensor) -> torch.Tensor:
    """int8 [N, K/2] -> int8 [N, K] values in -8..7 (the package's unpack)."""
    return unpack(wp, 4)


def pack_official(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] values in -8..7 -> the official int8 [N, K/2] (the package's pack_int4)."""
    return pack_int4(q)


def repack_frag128(wp: torch.Tensor) -> torch.Tensor:
    """official int8 [N, K/2] -> int16 [N, K/4] in the frag128 order (see module doc)."""
    q = unpack_official(wp).to(torch.int32)
    N, K = q.shape
    assert K % 128 == 0
    U = K // 128
    # k = 128u + 32t + 8c + 4j0 + 2j1 + e  -> dims [N, U, t, c, j0, j1, e]
    q = q.reshape(N, U, 4, 4, 2, 2, 2)
    q = q.permute(0, 1, 2, 3, 6, 5, 4)            # [N, U, t, c, e, j1, j0]
    nib = (q & 0xF).reshape(N, U, 4, 4, 2, 4)      # last dim j = 2*j1 + j0
    word = torch.zeros(nib.shape[:-1], dtype=torch.int32, device=q.device)
    for j in range(4):
        word |= nib[..., j] << (4 * j)
    word = torch.where(word >= 32768, word - 65536, word)
    return word.to(torch.int16).reshape(N, K // 4).contiguous()


def x_sums(x: torch.Tensor):
    """S_lo, S_hi per row of x (fp32): sums over columns k % 8 < 4 / >= 4."""
    xf = x.float().reshape(x.shape[0], -1, 8)
    return xf[:, :, 0:4].sum((1, 2)), xf[:, :, 4:8].sum((1, 2))
