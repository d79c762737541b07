"""GPU check and tuning of the Gluon int4 GEMV (int4_kernels_chatglm) at the ChatGLM-6B shapes it serves.

    python tools/int4_gemv_check.py --out int4_gemv.json --configs-out gluon_configs.json [--sweep]

1. Correctness: each served shape (dense / 4h_to_h with the residual epilogue, h_to_4h with the norm prologue and
   SwiGLU), batch rows 1, 3 and 8, split 1 / 4, 1 / 4 units per step (with a part-tile where K needs one), prefetch
   0 / 2, against float32 torch on the dequantized weights, next to the Triton GEMV it replaces.
2. --sweep: launch configurations per shape, timed as CUDA-graph replays over 28 weight copies (so the L2 holds
   none of them), next to the Triton GEMV on the same weights; the fastest go to --configs-out (load it with
   CHATGLM_GLUON_CONFIGS=that file).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_decode_check import FFN, HIDDEN, LAYERS, make_linear, rel, rmsnorm  # noqa: E402
from quant_gpu_check import graph_us  # noqa: E402

import chatglm.decode_kernels_chatglm as D  # noqa: E402  (imported by fused_decode_check)
import chatglm.int4_kernels_chatglm as G  # noqa: E402

SHAPES = {  # name: (K, linear out features, epilogue, norm prologue)
    "dense": (HIDDEN, HIDDEN, D.EPI_RESIDUAL, False), "4h_to_h": (FFN, HIDDEN, D.EPI_RESIDUAL, False),
    "h_to_4h": (HIDDEN, 2 * FFN, D.EPI_SWIGLU, True)}


def run(name, lin, x, out, res, nw, scratch):
    K, n_out, epi, norm = SHAPES[name]
    return D.fused_linear(x, lin, out, epi, nw if norm else None, residual=res, scratch=scratch)


def setup(name, m, copies=1):
    K, n_out, epi, norm = SHAPES[name]
    n = n_out // 2 if epi == D.EPI_SWIGLU else n_out
    lins = [make_linear(K, n_out, 4, torch.float16) for _ in range(copies)]
    x = torch.randn(m, K, device="cuda", dtype=torch.float16)
    res = torch.randn(m, n, device="cuda", dtype=torch.float16)
    nw = (1 + 0.1 * torch.randn(K, device="cuda")).half()
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    scratch = D.SplitScratch(8 * 8 * 2 * n, 4096, torch.device("cuda"))
    return (n, K, epi), lins, x, res, nw, out, scratch


def reference(name, w, x, res, nw):
    K, n_out, epi, norm = SHAPES[name]
    if epi == D.EPI_SWIGLU:
        gate, up = F.linear(rmsnorm(x, nw).float(), w.float()).chunk(2, -1)
        return F.silu(gate) * up
    return res.float() + F.linear(x.float(), w.float())


def check(results):
    torch.manual_seed(0)
    table = dict(G.GLUON_CONFIGS)
    worst = 0.0
    for name, m, split, units, prefetch in itertools.product(SHAPES, (1, 3, 8), (1, 4), (1, 4), (0, 2)):
        key, lins, x, res, nw, out, scratch = setup(name, m)
        (lin, w), = lins
        bn, _, warps, _, _ = table[key]
        G.GLUON_CONFIGS[key] = (bn, units, warps, prefetch, split)
        assert D.gemv_launch(lin, key[2], m).gluon is not None, "the Gluon GEMV does not serve this shape here"
        gluon = run(name, lin, x, out, res, nw, scratch).clone()
        del G.GLUON_CONFIGS[key]
        triton_ = run(name, lin, x, out, res, nw, scratch).clone()
        G.GLUON_CONFIGS[key] = table[key]
        ref = reference(name, w, x, res, nw)
        row = {"gluon_vs_f32": rel(gluon, ref), "triton_vs_f32": rel(triton_, ref),
               "gluon_vs_triton": rel(gluon, triton_)}
        tag = f"{name} m={m} split={split} units={units} prefetch={prefetch}"
        results[tag] = row
        worst = max(worst, row["gluon_vs_f32"] / max(row["triton_vs_f32"], 1e-3))
        print(json.dumps({tag: row}), flush=True)
    G.GLUON_CONFIGS.clear()
    G.GLUON_CONFIGS.update(table)
    return worst


def candidates(name):
    splits = (1, 2) if name == "h_to_4h" else (4, 8)
    for (bn, warps), units, prefetch, split in itertools.product(((64, 4), (128, 4), (128, 8)), (1, 2, 4),
                                                                 (0, 2), splits):
        yield bn, units, warps, prefetch, split


def sweep(configs_out):
    best, rows = {}, []
    for name in SHAPES:
        key, lins, x, res, nw, out, scratch = setup(name, 1, LAYERS)
        table_entry = G.GLUON_CONFIGS.pop(key)
        triton_us = graph_us(lambda i: run(name, lins[i % LAYERS][0], x, out, res, nw, scratch), 2 * LAYERS)
        timings = []
        for cfg in candidates(name):
            G.GLUON_CONFIGS[key] = cfg
            if D.gemv_launch(lins[0][0], key[2], 1).gluon is None:
                continue
            try:
                us = graph_us(lambda i: run(name, lins[i % LAYERS][0], x, out, res, nw, scratch), 2 * LAYERS)
            except Exception as exc:  # a config that does not compile or fit: skip it
                print(json.dumps({"shape": name, "config": cfg, "error": f"{type(exc).__name__}: {exc}"[:300]}))
                continue
            timings.append((round(us, 2), cfg))
        timings.sort()
        G.GLUON_CONFIGS[key] = timings[0][1] if timings else table_entry
        best[",".join(map(str, key))] = list(G.GLUON_CONFIGS[key])
        row = {"shape": name, "triton_us": round(triton_us, 2), "best": timings[:5], "committed": table_entry,
               "committed_us": next((t for t, c in timings if c == table_entry), None)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del lins
        torch.cuda.empty_cache()
    if configs_out:
        Path(configs_out).write_text(json.dumps(best, indent=1))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--configs-out")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    assert D._load_triton() and G.available(torch.device("cuda")), "needs CUDA sm_80+ and Triton with Gluon"
    report = {"device": torch.cuda.get_device_name(), "correctness": {}}
    report["worst_error_over_triton"] = check(report["correctness"])
    if args.sweep:
        report["sweep"] = sweep(args.configs_out)
    print(json.dumps({"worst_error_over_triton": report["worst_error_over_triton"]}))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
