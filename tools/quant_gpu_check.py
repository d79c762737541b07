#!/usr/bin/env python3
"""GPU check of quantization.py at the ChatGLM 6B linear shapes: correctness of every backend against a
dequantize-then-matmul reference, and decode-step timings (fp16 F.linear vs int8 / int4 per backend).

Usage (from the repo root, on a CUDA machine):
    python tools/quant_gpu_check.py [--out results.json] [--layers 28] [--model] [--backends triton]
    python tools/quant_gpu_check.py --sweep --configs-out tc_configs.json   # tune the tensor-core GEMV per shape

Prints one JSON document (also written to --out). Sections:
  correctness: relative L2 error vs float32 reference, shapes (N, K) in {(4608, 4096), (4096, 4096),
               (27392, 4096), (4096, 13696)}, fp16 and bf16, M in {1, 3, 8, 32, 512}, bits 4 and 8.
  decode:      one "token" = the four encoder linears of every layer (x28, distinct weights) at M = 1, timed as
               CUDA-graph replays (GPU time) and eagerly (with Python overhead), median of repeats.
  sweep:       (--sweep) every candidate launch configuration of the tensor-core GEMV (and the CUDA-core
               "legacy" GEMV) per shape and bits at M = 1: checked against the reference at M = 1 and 3, timed
               as CUDA-graph replays over enough distinct weight copies to defeat the L2; the fastest correct
               configuration per shape is written to --configs-out (the format of $CHATGLM_QUANT_TC_CONFIGS).
  model:       (--model) the real ChatGLMForConditionalGeneration at the 6B shape with random weights: peak memory
               and eager greedy decode tokens/s for fp16, int8 and int4 (quantized layout built with empty_init).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if "chatglm" not in sys.modules:  # import the flat remote-code modules as package 'chatglm', as the tests do
    _pkg = types.ModuleType("chatglm")
    _pkg.__path__ = [str(REPO)]
    sys.modules["chatglm"] = _pkg
from chatglm import quantization as Q  # noqa: E402

SHAPES = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)]  # (out N, in K): qkv, dense, h_to_4h, 4h_to_h
HAS_BIAS = [True, False, False, False]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_correctness(backends, dtypes=(torch.float16, torch.bfloat16), ms=(1, 3, 8, 32, 512)):
    rows = []
    torch.manual_seed(0)
    for (n, k), has_bias in zip(SHAPES, HAS_BIAS):
        w = torch.randn(n, k, device="cuda") * 0.02
        for bits in (4, 8):
            for dtype in dtypes:
                packed, scale = Q.pack(w, bits, scale_dtype=dtype)
                bias = (0.01 * torch.randn(n, device="cuda")).to(dtype) if has_bias else None
                wref = Q.dequantize(packed, scale, bits, torch.float32)
                for m in ms:
                    x = torch.randn(m, k, device="cuda").to(dtype)
                    ref = x.float() @ wref.T
                    if bias is not None:
                        ref += bias.float()
                    for name in backends:
                        row = dict(N=n, K=k, bits=bits, dtype=str(dtype).split(".")[-1], M=m, backend=name)
                        try:
                            y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                            y = Q.get_backend(name).linear(x, packed, scale, bias, bits)
                            torch.cuda.synchronize()
                            err = rel_err(y, ref)
                            row.update(rel_err=err, finite=bool(torch.isfinite(y).all()),
                                       ok=bool(torch.isfinite(y).all()) and err < (5e-3 if dtype == torch.float16 else 2e-2))
                        except Exception as exc:  # report, keep going
                            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
                        rows.append(row)
        del w
    # full nibble / byte range (-8..7, -128..127), as a checkpoint may hold, not just what pack() produces
    for bits in (4, 8):
        packed = torch.randint(-128, 128, (4096, 4096 * bits // 8), device="cuda", dtype=torch.int8)
        scale = (torch.rand(4096, device="cuda") * 1e-3).half()
        wref = Q.dequantize(packed, scale, bits, torch.float32)
        for m in (1, 8, 512):
            x = torch.randn(m, 4096, device="cuda").half()
            ref = x.float() @ wref.T
            for name in backends:
                y = Q.get_backend(name).linear(x, packed, scale, None, bits)
                err = rel_err(y, ref)
                rows.append(dict(N=4096, K=4096, bits=bits, dtype="float16-fullrange", M=m, backend=name,
                                 rel_err=err, ok=bool(torch.isfinite(y).all()) and err < 5e-3))
    return rows


def _median_ms(fn, reps=7, inner=10):
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def time_decode(backends, layers=28, dtype=torch.float16):
    torch.manual_seed(0)
    xs = {4096: torch.randn(1, 4096, device="cuda", dtype=dtype), 13696: torch.randn(1, 13696, device="cuda", dtype=dtype)}
    fp, q = [], {4: [], 8: []}
    for _ in range(layers):
        for (n, k), has_bias in zip(SHAPES, HAS_BIAS):
            w = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
            b = (0.01 * torch.randn(n, device="cuda")).to(dtype) if has_bias else None
            fp.append((w, b, k))
            for bits in (4, 8):
                packed, scale = Q.pack(w, bits)
                q[bits].append((packed, scale, b, k))
    weight_bytes = {"fp16": sum(w.numel() * w.element_size() for w, _, _ in fp),
                    "int8": sum(p.numel() + s.numel() * 2 for p, s, _, _ in q[8]),
                    "int4": sum(p.numel() + s.numel() * 2 for p, s, _, _ in q[4])}

    def step_fp():
        for w, b, k in fp:
            F.linear(xs[k], w, b)

    variants = {"fp16 F.linear": (step_fp, weight_bytes["fp16"])}
    for name in backends:
        be = Q.get_backend(name)
        for bits in (8, 4):
            def step(be=be, bits=bits):
                for p, s, b, k in q[bits]:
                    be.linear(xs[k], p, s, b, bits)
            variants[f"int{bits} {name}"] = (step, weight_bytes[f"int{bits}"])
            if name == "triton" and be.tc_enabled:
                def legacy(be=be, bits=bits):
                    be.tc_enabled = False
                    try:
                        for p, s, b, k in q[bits]:
                            be.linear(xs[k], p, s, b, bits)
                    finally:
                        be.tc_enabled = True
                variants[f"int{bits} triton-legacy"] = (legacy, weight_bytes[f"int{bits}"])

    results = {}
    for label, (fn, nbytes) in variants.items():
        row = {}
        try:
            for _ in range(3):
                fn()  # warm-up (Triton autotune / compile, cuBLAS handles)
            torch.cuda.synchronize()
            row["eager_ms"] = round(_median_ms(fn, reps=5, inner=3), 4)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            row["graph_ms"] = round(_median_ms(g.replay), 4)
            row["weight_GB"] = round(nbytes / 1e9, 3)
            row["GB_per_s"] = round(nbytes / 1e9 / (row["graph_ms"] / 1e3), 1)
            del g
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        results[label] = row
    base = results.get("fp16 F.linear", {}).get("graph_ms")
    if base:
        for row in results.values():
            if "graph_ms" in row:
                row["speedup_vs_fp16_graph"] = round(base / row["graph_ms"], 2)
        base_e = results["fp16 F.linear"]["eager_ms"]
        for row in results.values():
            if "eager_ms" in row:
                row["speedup_vs_fp16_eager"] = round(base_e / row["eager_ms"], 2)
    del fp, q
    torch.cuda.empty_cache()
    return results


# Candidate launch configurations of the tensor-core GEMV: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages).
SWEEP = {bits: [(32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (64, 128, 2, 4, 4), (64, 128, 4, 4, 4), (128, 128, 1, 4, 4),
                (128, 128, 2, 4, 4), (128, 128, 4, 4, 4), (128, 128, 8, 4, 4)] for bits in (4, 8)}


def graph_us(fn, calls):
    """Median GPU time of one call of fn(i) (i = 0..calls-1, captured in one CUDA graph), in microseconds."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    ms = _median_ms(g.replay, reps=5, inner=2)
    del g
    return ms * 1e3 / calls


def sweep(configs_out=None, bits_list=(4, 8)):
    be = Q.get_backend("triton")
    if not be.load():
        return {"error": be.error}
    rows, best = [], {}
    torch.manual_seed(0)
    for bits in bits_list:
        for (n, k), has_bias in zip(SHAPES, HAS_BIAS):
            kp = k * bits // 8
            nbytes = n * kp + 2 * n
            copies = max(2, -(-200_000_000 // nbytes))
            ws = [torch.randint(-128, 128, (n, kp), device="cuda", dtype=torch.int8) for _ in range(copies)]
            ss = [(torch.rand(n, device="cuda") * 1e-3 + 1e-4).half() for _ in range(copies)]
            bias = None  # bias costs nothing measurable; leaving it out halves the kernels to compile
            xs = {m: torch.randn(m, k, device="cuda").half() for m in (1, 3)}
            wref = Q.dequantize(ws[0], ss[0], bits, torch.float32)
            refs = {m: x.float() @ wref.T + (bias.float() if bias is not None else 0) for m, x in xs.items()}
            del wref
            ys = {m: torch.empty(m, n, device="cuda", dtype=torch.float16) for m in (1, 3)}
            cands = [("legacy", None)] + [("tc", c) for c in SWEEP[bits]]
            for kind, cfg in cands:
                row = dict(N=n, K=k, bits=bits, kind=kind, cfg=list(cfg) if cfg else None)
                try:
                    if kind == "legacy":
                        def call(i, m=1):
                            be.tc_enabled = False
                            try:
                                return be.linear(xs[m], ws[i % copies], ss[i % copies], bias, bits)
                            finally:
                                be.tc_enabled = True
                    else:

                        def call(i, m=1, cfg=cfg):
                            return be.tc_linear(xs[m], ws[i % copies], ss[i % copies], bias, bits, cfg, ys[m])
                    errs = [rel_err(call(0, m), refs[m]) for m in (1, 3)]
                    row["rel_err"] = max(errs)
                    row["ok"] = row["rel_err"] < 5e-3
                    us = graph_us(call, copies * max(1, 24 // copies))
                    row["us"] = round(us, 2)
                    row["GB_s"] = round(nbytes / us / 1e3, 1)
                except Exception as exc:
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
                rows.append(row)
                print(json.dumps(row), flush=True)
            good = [r for r in rows if r["N"] == n and r["K"] == k and r["bits"] == bits and r.get("ok")
                    and r.get("us")]
            if good:  # the legacy CUDA-core GEMV is written as [0, 0, 0, 0, 0] (TC_CONFIGS' "use legacy")
                b = min(good, key=lambda r: r["us"])
                best[f"{n},{kp},{bits}"] = b["cfg"] or [0, 0, 0, 0, 0]
                if configs_out:  # after every shape, so that a run cut short keeps what it found
                    Path(configs_out).write_text(json.dumps(best, indent=1))
            del ws, ss
            torch.cuda.empty_cache()
    if configs_out:
        Path(configs_out).write_text(json.dumps(best, indent=1))
        Q.TC_CONFIGS.update({tuple(int(v) for v in key.split(",")): tuple(cfg) for key, cfg in best.items()})
    summary = {}
    for r in rows:
        key = f"int{r['bits']} {r['N']}x{r['K']}"
        leg = summary.setdefault(key, {})
        if r["kind"] == "legacy":
            leg["legacy_us"] = r.get("us")
        elif r.get("ok") and (leg.get("tc_us") is None or r["us"] < leg["tc_us"]):
            leg.update(tc_us=r["us"], tc_GB_s=r["GB_s"], tc_cfg=r["cfg"])
    return {"best": best, "summary": summary, "rows": rows}


def time_quantize():
    w = torch.randn(27392, 4096, device="cuda", dtype=torch.float16) * 0.02
    out = {}
    for bits in (4, 8):
        Q.pack(w, bits)
        torch.cuda.synchronize()
        t = time.perf_counter()
        Q.pack(w, bits)
        torch.cuda.synchronize()
        out[f"pack_int{bits}_27392x4096_ms"] = round((time.perf_counter() - t) * 1e3, 2)
    return out


def model_decode(prompt=256, new=64, backend="auto"):
    from chatglm.configuration_chatglm import ChatGLMConfig
    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    results = {}
    for bits in (0, 8, 4):
        row = {}
        try:
            cfg = ChatGLMConfig(torch_dtype="float16", quantization_bit=bits)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.set_default_dtype(torch.float16)
            try:
                with torch.device("cuda"):
                    model = ChatGLMForConditionalGeneration(cfg)
            finally:
                torch.set_default_dtype(torch.float32)
            model.eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dtype == torch.int8:
                        p.copy_(torch.randint(-128, 128, p.shape, device="cuda", dtype=torch.int8))
                    elif name.endswith("weight_scale"):
                        p.fill_(0.02 / (7 if bits == 4 else 127))
                    elif name.endswith("layernorm.weight"):
                        p.fill_(1.0)
                    else:
                        p.normal_(0, 0.02)
            if bits:
                Q.set_backend(model, backend)
            row["weights_GB"] = round(torch.cuda.memory_allocated() / 1e9, 2)
            ids = torch.randint(100, 60000, (1, prompt), device="cuda")
            kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

            def gen(n):
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, **kw)
                torch.cuda.synchronize()
                return time.perf_counter() - t

            gen(4)
            torch.cuda.reset_peak_memory_stats()
            t1 = statistics.median(gen(1) for _ in range(3))
            tn = gen(new + 1)
            row["decode_tok_s"] = round(new / (tn - t1), 1)
            row["prefill_ms"] = round(t1 * 1e3, 1)
            row["peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            del model
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        results[f"int{bits}" if bits else "fp16"] = row
        torch.cuda.empty_cache()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--model", action="store_true", help="also time the real model at the 6B shape")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="tune the tensor-core GEMV per shape (see above)")
    ap.add_argument("--configs-out", default=None, help="where --sweep writes the best configurations (JSON)")
    ap.add_argument("--backends", nargs="*", default=None, help="only these backends (default: all that load)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("CUDA is required")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "capability": list(torch.cuda.get_device_capability())}
    try:
        import triton
        report["triton"] = triton.__version__
    except Exception as exc:
        report["triton"] = f"unavailable: {exc}"
    backends = Q.available_backends("cuda", torch.float16)
    if args.backends:
        backends = [b for b in backends if b in args.backends]
    report["backends"] = backends
    if args.sweep:
        report["sweep"] = sweep(args.configs_out)
        print(json.dumps({"sweep_summary": report["sweep"].get("summary"), "best": report["sweep"].get("best")},
                         indent=1), flush=True)
    report["backend_errors"] = {n: b.error for n, b in Q._BACKENDS.items() if b.error}
    if not args.skip_correctness:
        rows = check_correctness(backends)
        report["correctness_all_ok"] = all(r.get("ok") for r in rows)
        report["correctness_failures"] = [r for r in rows if not r.get("ok")]
        report["correctness_max_err"] = {}
        for r in rows:
            key = f"{r['backend']} int{r['bits']} {r['dtype']}"
            report["correctness_max_err"][key] = max(report["correctness_max_err"].get(key, 0), r.get("rel_err", 1.0))
        report["correctness"] = rows
    report["tc_configs"] = {f"{n},{kp},{b}": list(Q.tc_config(n, kp, b) or ()) for (n, k) in SHAPES
                            for b in (4, 8) for kp in (k * b // 8,)}
    if not args.skip_decode:
        report["quantize_time"] = time_quantize()
        report["decode_linears_x%d_fp16" % args.layers] = time_decode(backends, args.layers)
    if args.model:
        report["model"] = model_decode()
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    summary = {k: v for k, v in report.items() if k not in ("correctness", "sweep")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
