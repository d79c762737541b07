"""Interpreter check of the probe's plain-Triton kernels and the frag128 repack against torch (CPU):
    python tools/int4_probe/check_tl.py"""
import os, sys, torch
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packing import pack_official, repack_frag128, unpack_official
from kernels import gemv_frag_tl, gemv_orig
torch.manual_seed(0)
for (N, K, M) in [(32, 256, 1), (64, 384, 3), (32, 512, 16)]:
    q = torch.randint(-8, 8, (N, K), dtype=torch.int8)
    wp = pack_official(q)
    assert torch.equal(unpack_official(wp), q)
    x = torch.randn(M, K).half()
    sc = (torch.rand(N) * 0.02 + 0.01).half()
    ref = (x.float() @ q.float().T) * sc.float()[None, :]
    w16 = repack_frag128(wp)
    for BN, KU, SPLIT in [(32, 1, 1), (16, 2, 1), (32, 1, 2), (16, 2, 3)]:
        y = torch.zeros(M, N, dtype=torch.float32 if SPLIT > 1 else torch.float16)
        gemv_frag_tl[(N // BN, SPLIT)](w16, x, sc, y, M, N, K, BN=BN, KU=KU, BM=16, SPLIT=SPLIT, USE_ASM=False)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        print("frag_tl", N, K, M, BN, KU, SPLIT, f"{err:.2e}")
    y = torch.zeros(M, N, dtype=torch.float16)
    gemv_orig[(N // 32,)](wp, x, sc, y, M, N, K, BN=32, BK=128, USE_ASM=False)
    print("orig", N, K, M, f"{((y.float() - ref).abs().max() / ref.abs().max()).item():.2e}")
