"""Standalone H200 benchmark: batch-1 int4 weight-only GEMV, baseline vs frag128 candidates.

    python bench_int4.py                 # full run on the GPU (~2-3 min), one JSON line per (kernel, shape, config)
    python bench_int4.py --m 4           # other batch size (<= 8 for frag_gl, <= 16 for the others)
    TRITON_INTERPRET=1 python bench_int4.py --tiny   # logic check on CPU (orig + frag_tl only, no timing)

Kernels
  orig     : production pattern (x[16,BK] A operand, official int8 [N,K/2] weights as B, PRMT-based dequant).
  frag_tl  : plain Triton, weights repacked to frag128 (packing.py) -> HGMMA with A from registers (Triton picks).
  frag_gl  : Gluon, frag128 words loaded with LDG.128 straight into mma.m16n8k16 A-fragment registers, x^T (8
             tokens) as B; dequant 4 LOP3 + 1 SHF per 8 weights; zero-point correction in the epilogue.
Timing: triton.testing.do_bench_cudagraph (falls back to do_bench).  Split-K configs (SPLIT > 1) accumulate fp32
with atomics into a zeroed buffer; the zeroing is inside the timed region.
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import triton
from packing import pack_official, repack_frag128
import kernels as KN

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERP:
    import gkernels as GK

SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "h_to_4h": (27392, 4096), "4h_to_h": (4096, 13696)}


def _time(fn):
    if INTERP:
        fn()
        return float("nan")
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=40) * 1e3
    except Exception:
        return triton.testing.do_bench(fn, warmup=10, rep=40) * 1e3


def run_orig(wp, x, sc, M, N, K, BN, BK, nw, ns):
    if K % BK or N % BN:
        return None
    y = torch.empty(M, N, dtype=torch.float16, device=x.device)
    f = lambda: KN.gemv_orig[(N // BN,)](wp, x, sc, y, M, N, K, BN=BN, BK=BK, USE_ASM=not INTERP,
                                          num_warps=nw, num_stages=ns)
    return f, y


def _splits(U, split, KU):
    per = -(-U // split)
    s_eff = -(-U // per)
    counts = [min(per, U - s * per) for s in range(s_eff)]
    return s_eff, all(c % KU == 0 for c in counts)


def run_tl(w16, x, sc, M, N, K, BN, KU, nw, ns, split):
    U = K // 128
    s_eff, even = _splits(U, split, KU)
    if N % BN or (KU > 1 and not even):
        return None
    y = torch.zeros(M, N, dtype=torch.float32 if s_eff > 1 else torch.float16, device=x.device)

    def f():
        if s_eff > 1:
            y.zero_()
        KN.gemv_frag_tl[(N // BN, s_eff)](w16, x, sc, y, M, N, K, BN=BN, KU=KU, BM=16, SPLIT=s_eff,
                                          USE_ASM=not INTERP, EVEN=even, num_warps=nw, num_stages=ns)
    return f, y


_LAYOUTS = {}


def run_gl(w16, x, sc, M, N, K, BN, KU, nw, pf, split):
    U = K // 128
    s_eff, even = _splits(U, split, KU)
    if N % BN or not even or BN % (16 * nw) or M > 8:
        return None
    key = (BN, KU, nw)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = GK.make_layouts(BN, KU, nw)
    L = _LAYOUTS[key]
    y = torch.zeros(M, N, dtype=torch.float32 if s_eff > 1 else torch.float16, device=x.device)

    def f():
        if s_eff > 1:
            y.zero_()
        GK.gemv_frag_gl[(N // BN, s_eff)](w16, x, sc, y, M, N, K, K // 4, BN=BN, KU=KU, SPLIT=s_eff, TRIV=True,
                                          PREFETCH=pf, W32=False, num_warps=nw, **L)
    return f, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", default="", help="comma list of kernels: orig,frag_tl,frag_gl")
    args = ap.parse_args()
    dev = "cpu" if INTERP else "cuda"
    shapes = {"tiny_a": (128, 512), "tiny_b": (64, 1152)} if args.tiny else SHAPES
    only = set(args.only.split(",")) if args.only else {"orig", "frag_tl", "frag_gl"}
    if INTERP:
        only.discard("frag_gl")   # Gluon does not run in the interpreter (see check_gl_interp.py)
    torch.manual_seed(0)
    t_start = time.time()
    for sname, (N, K) in shapes.items():
        M = args.m
        q = torch.randint(-8, 8, (N, K), dtype=torch.int8, device=dev)
        wp = pack_official(q).contiguous()
        w16 = repack_frag128(wp)          # load-time transform (same bytes)
        del q
        x = torch.randn(M, K, dtype=torch.float16, device=dev)
        sc = (torch.rand(N, device=dev) * 0.02 + 0.005).half()
        from packing import unpack_official
        ref = (x.float() @ unpack_official(wp).float().T) * sc.float()[None, :]
        cands = []
        if "orig" in only:
            cfgs = [(16, 256, 4, 3), (32, 256, 4, 3), (64, 256, 4, 3), (16, 512, 4, 3), (32, 512, 4, 4)]
            if args.tiny: cfgs = [(32, 128, 4, 2)]
            for BN, BK, nw, ns in cfgs:
                cands.append(("orig", dict(BN=BN, BK=BK, num_warps=nw, num_stages=ns),
                              lambda BN=BN, BK=BK, nw=nw, ns=ns: run_orig(wp, x, sc, M, N, K, BN, BK, nw, ns)))
        if "frag_tl" in only:
            cfgs = [(64, 2, 4, 3, 1), (128, 1, 4, 4, 1), (128, 2, 4, 3, 1), (128, 1, 4, 4, 4), (64, 2, 4, 3, 2),
                    (256, 1, 4, 3, 1)]
            if args.tiny: cfgs = [(32, 1, 4, 2, 1), (32, 1, 4, 2, 3)]
            for BN, KU, nw, ns, sp in cfgs:
                cands.append(("frag_tl", dict(BN=BN, KU=KU, num_warps=nw, num_stages=ns, SPLIT=sp),
                              lambda BN=BN, KU=KU, nw=nw, ns=ns, sp=sp: run_tl(w16, x, sc, M, N, K, BN, KU, nw, ns, sp)))
        if "frag_gl" in only:
            cfgs = [(64, 1, 4, 0, 1), (64, 1, 4, 2, 1), (128, 1, 4, 0, 1), (128, 1, 4, 2, 1), (128, 2, 4, 0, 1),
                    (128, 1, 4, 2, 2), (128, 1, 4, 2, 4), (64, 1, 4, 2, 2), (64, 1, 4, 2, 4), (256, 1, 8, 2, 1),
                    (256, 1, 4, 0, 1), (128, 1, 8, 2, 1), (32, 1, 2, 2, 1), (128, 1, 4, 1, 1), (64, 1, 4, 2, 8), (128, 1, 4, 2, 8)]
            for BN, KU, nw, pf, sp in cfgs:
                cands.append(("frag_gl", dict(BN=BN, KU=KU, num_warps=nw, PREFETCH=pf, SPLIT=sp),
                              lambda BN=BN, KU=KU, nw=nw, pf=pf, sp=sp: run_gl(w16, x, sc, M, N, K, BN, KU, nw, pf, sp)))
        for name, cfg, mk in cands:
            rec = dict(kernel=name, shape=sname, N=N, K=K, M=M, **cfg)
            try:
                r = mk()
                if r is None:
                    continue
                f, y = r
                f()
                if not INTERP:
                    torch.cuda.synchronize()
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                us = _time(f)
                rec.update(max_rel_err=float(f"{err:.3e}"), us=round(us, 2),
                           gw_per_ms=round(N * K / (us * 1e-3) / 1e9, 3) if us == us else None,
                           ok=bool(err < 2e-3))
            except Exception as e:  # keep going: one bad config must not kill the sweep
                rec.update(error=f"{type(e).__name__}: {str(e)[:200]}")
            print(json.dumps(rec), flush=True)
    print(json.dumps(dict(total_s=round(time.time() - t_start, 1))), flush=True)


if __name__ == "__main__":
    main()
