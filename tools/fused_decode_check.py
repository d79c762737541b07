"""GPU check and tuning of the fused decode kernels (decode_kernels_chatglm) at the real ChatGLM-6B shapes.

    python tools/fused_decode_check.py --out fused_check.json --configs-out fused_configs.json [--sweep]

1. Correctness: every launch kind (qkv + rotary + cache write, attention, residual GEMV, SwiGLU GEMV, logits GEMV)
   for fp16/bf16 and plain/int8/int4 weights, against torch on the same (dequantized) weights.
2. --sweep: launch configurations per GEMV shape, each timed as CUDA-graph replays over 28 weight copies (so the L2
   holds none of them); the fastest goes to --configs-out (load it with CHATGLM_FUSED_CONFIGS=that file).
3. Whole decode step (random 6B weights, batch 1, 1280 cache slots): fused vs the compiled torch step, ms per token.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from full_shape_check import import_package  # noqa: E402

import_package()
import chatglm.decode_kernels_chatglm as D  # noqa: E402
import chatglm.quantization as Q  # noqa: E402
from quant_gpu_check import graph_us  # noqa: E402  (the same CUDA-graph timer as the quantization sweep)

HIDDEN, FFN, HEADS, GROUPS, HEAD_DIM, VOCAB, LAYERS = 4096, 13696, 32, 2, 128, 65024, 28


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


def make_linear(K, n_out, bits, dtype, bias=False):
    weight = (torch.randn(n_out, K, device="cuda") * 0.02).to(dtype)
    b = (torch.randn(n_out, device="cuda") * 0.1).to(dtype) if bias else None
    if bits == 16:
        return D.LinearWeights(weight, None, b, 16, K, n_out), weight
    packed, scale = Q.pack(weight, bits)
    return D.LinearWeights(packed, scale, b, bits, K, n_out), Q.dequantize(packed, scale, bits, dtype)


def rmsnorm(x, w, eps=1e-5):
    h = x.float()
    return (w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def check_correctness(results):
    assert D._load_triton()
    torch.manual_seed(0)
    table, default = dict(D.GEMV_CONFIGS), D._default_config
    # the launch table as committed, then every GEMV forced to split-K on tensor cores / on CUDA cores (fp16, one row)
    forced = (None, (32, 256, 4, 3, 1, 4), (32, 256, 4, 3, 0, 2))
    for config, dtype, bits, m in itertools.product(forced, (torch.float16, torch.bfloat16), (16, 8, 4), (1, 4)):
        tag = f"{str(dtype)[6:]} bits={bits} m={m} config={config}"
        D.GEMV_CONFIGS.clear()
        D.GEMV_CONFIGS.update(table if config is None else {})
        D._default_config = default if config is None else lambda *shape, config=config: config
        x = torch.randn(m, HIDDEN, device="cuda", dtype=dtype)
        nw = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(dtype)
        # residual GEMV (dense / 4h_to_h shape)
        lin, w = make_linear(FFN, HIDDEN, bits, dtype)
        act = torch.randn(m, FFN, device="cuda", dtype=dtype)
        out = torch.empty(m, HIDDEN, device="cuda", dtype=dtype)
        D.fused_linear(act, lin, out, D.EPI_RESIDUAL, residual=x)
        results[f"residual {tag}"] = rel(out, x + F.linear(act, w))
        # SwiGLU GEMV with the norm prologue
        lin, w = make_linear(HIDDEN, 2 * FFN, bits, dtype)
        out = torch.empty(m, FFN, device="cuda", dtype=dtype)
        D.fused_linear(x, lin, out, D.EPI_SWIGLU, nw)
        gate, up = F.linear(rmsnorm(x, nw), w).chunk(2, -1)
        results[f"swiglu {tag}"] = rel(out, F.silu(gate) * up)
        # qkv + rotary + cache write
        lin, w = make_linear(HIDDEN, HEADS * HEAD_DIM + 2 * GROUPS * HEAD_DIM, bits, dtype, bias=True)
        capacity, slot = 64, 37
        keys = torch.zeros(m, GROUPS, capacity, HEAD_DIM, device="cuda", dtype=dtype)
        values = torch.zeros_like(keys)
        position = torch.arange(30, 30 + m, device="cuda")
        angles = position[:, None].float() * (1.0 / 10000 ** (torch.arange(0, 64, 2, device="cuda") / 64))
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        table_cos = torch.zeros(capacity, 32, device="cuda")
        table_sin = torch.zeros(capacity, 32, device="cuda")
        table_cos[position], table_sin[position] = cos.float(), sin.float()
        rot = D.RotaryCache(table_cos, table_sin, position, torch.tensor([slot], device="cuda"), keys, values,
                            HEADS * HEAD_DIM, GROUPS * HEAD_DIM, HEAD_DIM)
        q = torch.empty(m, HEADS * HEAD_DIM, device="cuda", dtype=dtype)
        D.fused_linear(x, lin, q, D.EPI_QKV, nw, rotary=rot)
        ref = F.linear(rmsnorm(x, nw), w, lin.bias).view(m, HEADS + 2 * GROUPS, HEAD_DIM).float()
        pairs = ref[:, :HEADS + GROUPS, :64].unflatten(-1, (32, 2))  # q and k heads rotate, v does not
        e, o = pairs[..., 0], pairs[..., 1]
        c, s = cos.float()[:, None], sin.float()[:, None]
        ref[:, :HEADS + GROUPS, :64] = torch.stack((e * c - o * s, o * c + e * s), -1).flatten(-2)
        results[f"qkv q {tag}"] = rel(q.view(m, HEADS, HEAD_DIM), ref[:, :HEADS])
        results[f"qkv k {tag}"] = rel(keys[:, :, slot], ref[:, HEADS:HEADS + GROUPS])
        results[f"qkv v {tag}"] = rel(values[:, :, slot], ref[:, HEADS + GROUPS:])
    D.GEMV_CONFIGS.clear()
    D.GEMV_CONFIGS.update(table)
    D._default_config = default
    bad = {k: v for k, v in results.items() if v > 2e-2}
    print(json.dumps({"correctness_max": max(results.values()), "failures": bad}), flush=True)
    return not bad


SHAPES = {  # name: (K, linear out features, epilogue)
    "qkv": (HIDDEN, 4608, D.EPI_STORE), "dense": (HIDDEN, HIDDEN, D.EPI_RESIDUAL),
    "h_to_4h": (HIDDEN, 2 * FFN, D.EPI_SWIGLU), "4h_to_h": (FFN, HIDDEN, D.EPI_RESIDUAL),
    "logits": (HIDDEN, VOCAB, D.EPI_STORE)}


def sweep_candidates(bits, name):
    """(BLOCK_N, BLOCK_K, warps, stages, tensor cores, split-K) to try for one shape."""
    splits = (1,) if name in ("logits", "h_to_4h") else (1, 2, 4) if name in ("qkv", "dense") else (1, 2, 4, 8)
    block_ns = (32, 64, 128) if name in ("logits", "h_to_4h") else (16, 32, 64)
    if bits == 16:
        candidates = [(bn, bk, 4, st, 1, sp) for bn, bk, st, sp in itertools.product(block_ns, (128, 256), (3, 4),
                                                                                         splits)]
        if name not in ("logits", "h_to_4h"):  # the CUDA-core variant for one row
            candidates += [(bn, 128, 4, 4, 0, sp) for bn, sp in itertools.product((16, 32), splits)]
        return candidates
    # quantized weights: compute-bound at batch 1, so more warps per tile and split-K on h_to_4h are worth a try
    splits = (1, 2, 4) if name == "h_to_4h" else splits
    block_ns = (64, 128) if name == "h_to_4h" else (32, 64)
    return [(bn, 256, w, st, 1, sp) for bn, w, st, sp in itertools.product(block_ns, (4, 8), (3, 4), splits)]


def sweep(configs_out, bits_list, names):
    """Time every candidate launch per GEMV shape (CUDA-graph replays over 28 weight copies, with the PDL mode in
    force); the fastest go to `configs_out`."""
    assert D._load_triton()
    best, rows = {}, []
    for bits in bits_list:
        for name in names:
            K, n_out, epi = SHAPES[name]
            if name == "logits" and bits != 16:
                continue
            copies = 1 if name == "logits" else LAYERS
            lins = [make_linear(K, n_out, bits, torch.float16)[0] for _ in range(copies)]
            n = n_out // 2 if epi == D.EPI_SWIGLU else n_out
            x = torch.randn(1, K, device="cuda", dtype=torch.float16)
            res = torch.randn(1, n, device="cuda", dtype=torch.float16)
            out = torch.empty(1, n, device="cuda", dtype=torch.float32 if name == "logits" else torch.float16)
            key = (n, K, bits, epi)
            # qkv, h_to_4h and the output layer run with the rmsnorm prologue in the model
            norm = torch.ones(K, device="cuda", dtype=torch.float16) if name in ("qkv", "h_to_4h", "logits") else None
            ssq = (D.row_sum_squares(x), 1) if norm is not None else None
            scratch = D.SplitScratch(8 * 2 * n, 4096, torch.device("cuda"))
            timings = []
            for cfg in sweep_candidates(bits, name):
                D.GEMV_CONFIGS[key] = cfg
                try:
                    us = graph_us(lambda i: D.fused_linear(x, lins[i % copies], out, epi, norm, residual=res,
                                                           ssq_in=ssq, scratch=scratch), copies * 2)
                except Exception:  # out of shared memory etc.
                    continue
                timings.append((us, cfg))
            timings.sort()
            us, cfg = timings[0]
            D.GEMV_CONFIGS[key] = cfg
            best[",".join(map(str, key))] = list(cfg)
            if name == "qkv":  # timed without the rotary epilogue; the same weight read
                D.GEMV_CONFIGS[(n, K, bits, D.EPI_QKV)] = cfg
                best[",".join(map(str, (n, K, bits, D.EPI_QKV)))] = list(cfg)
            nbytes = lins[0].weight.numel() * lins[0].weight.element_size()
            if bits == 16:  # cuBLAS on the same weights, for scale
                weights = [lin.weight for lin in lins]
                xin = x.expand(1, K)
                cublas = graph_us(lambda i: F.linear(xin, weights[i % copies]), copies * 2)
            else:
                cublas = None
            row = {"shape": name, "bits": bits, "best": cfg, "us": round(us, 2), "GB_per_s": round(nbytes / us / 1e3),
                   "cublas_us": cublas and round(cublas, 2),
                   "runner_up": [(round(t, 2), c) for t, c in timings[1:4]],
                   "no_split_best": min(([round(t, 2), c] for t, c in timings if c[5] == 1), default=None)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del lins
            torch.cuda.empty_cache()
    if configs_out:
        Path(configs_out).write_text(json.dumps(best, indent=1))
    return rows


def attention_blocks(text: str) -> tuple:
    """"32x64x128" → (32, 64, 128): a choice of the decode attention's inner block sizes (D.ATTN_BLOCKS)."""
    return tuple(int(b) for b in text.split("x"))


def attention_time(results, block_sets=None):
    """The decode attention (both kernels) per cache capacity, for each set of inner block sizes (D.ATTN_BLOCKS)."""
    assert D._load_triton()
    defaults = D.ATTN_BLOCKS
    block_sets = block_sets or [defaults]
    for capacity, slot in ((1280, 1100), (8192, 8000), (32768, 32000)):
        keys = torch.randn(1, GROUPS, capacity, HEAD_DIM, device="cuda", dtype=torch.float16)
        values = torch.randn_like(keys)
        query = torch.randn(1, HEADS * HEAD_DIM, device="cuda", dtype=torch.float16)
        valid = torch.ones(1, capacity, dtype=torch.uint8, device="cuda")
        out = torch.empty_like(query)
        slot_t = torch.tensor([slot], device="cuda")
        for blocks in block_sets:
            D.ATTN_BLOCKS = blocks
            scratch = D.AttentionScratch(1, GROUPS, HEADS // GROUPS, HEAD_DIM, capacity, torch.device("cuda"))
            us = graph_us(lambda i: D.fused_attention(query, keys, values, valid, slot_t, scratch, out), 28)
            name = f"attention capacity={capacity}" + (f" blocks={blocks}" if len(block_sets) > 1 else "")
            results[name] = {"us": round(us, 2), "splits": scratch.splits, "keys_per_split": scratch.chunk,
                             "block": scratch.block}
            print(json.dumps({name: results[name]}), flush=True)
    D.ATTN_BLOCKS = defaults


def whole_step(results, profile, variants):
    """ms per decode step of the whole model (random 6B weights, batch 1, 1024 cached tokens), per variant
    "bits,pdl" (fused, with that PDL mode) or "bits,unfused" (the compiled torch step)."""
    from chatglm.configuration_chatglm import ChatGLMConfig
    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration
    from chatglm.decoding_chatglm import CompiledDecoder

    config = ChatGLMConfig.from_pretrained(str(REPO / "variants" / "chatglm3-6b"))
    D.FUSED_BITS = (16, 8, 4)
    defaults = (D.PDL_MODE, D.ATTN_BLOCKS)
    by_bits = {}
    for variant in variants:
        by_bits.setdefault(int(variant.split(",")[0]), []).append(variant)
    for bits, wanted in by_bits.items():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = ChatGLMForConditionalGeneration(copy.deepcopy(config)).half().eval()  # quantize edits config
        if bits != 16:
            model.quantize(bits)
        for variant in wanted:
            fields = variant.split(",")
            fused = fields[1] != "unfused"
            os.environ["CHATGLM_FUSED_DECODE"] = "1" if fused else "0"
            if fused:  # "bits,pdl[,attention inner blocks]", e.g. 16,2,64 or 16,2,32x64x128
                D.PDL_MODE = int(fields[1])
                if len(fields) > 2:
                    D.ATTN_BLOCKS = attention_blocks(fields[2])
            decoder = CompiledDecoder(model, 1, 1280, compile=True)
            ids = torch.randint(0, 60000, (1, 1024), device="cuda")
            with torch.no_grad():
                model(input_ids=ids, past_key_values=decoder.cache, use_cache=True, return_last_logit=True)
                decoder.start(ids[:, -1:], torch.tensor([[1024]], device="cuda"), 1024,
                              torch.ones(1, 1024, dtype=torch.bool, device="cuda"))
                decoder.run("greedy")
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(200):
                    decoder.run("greedy")
                end.record()
                end.synchronize()
            ms = start.elapsed_time(end) / 200
            if profile and fused:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        decoder.run("greedy")
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
            name = f"step {variant}" + ("" if decoder.fused is not None or not fused else " (NOT fused)")
            results[name] = {"ms": round(ms, 4), "tok_s": round(1000 / ms, 1)}
            print(json.dumps({name: results[name]}), flush=True)
            del decoder
            D.PDL_MODE, D.ATTN_BLOCKS = defaults
        del model
        torch.cuda.empty_cache()
    os.environ.pop("CHATGLM_FUSED_DECODE", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--configs-out", default=None)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--profile", action="store_true", help="kernel table of 20 steps of each fused variant")
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4], help="weight kinds to sweep")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="GEMV shapes to sweep")
    parser.add_argument("--steps", nargs="+", default=["16,2", "16,unfused", "8,2", "4,2", "4,unfused"],
                        help='whole-step variants: "bits,pdl[,attention inner blocks]" (fused) or "bits,unfused"')
    parser.add_argument("--attention", nargs="+", default=["x".join(map(str, D.ATTN_BLOCKS))],
                        help="decode attention inner block sizes to try, e.g. 32x64x128 (the default) or 64")
    parser.add_argument("--configs-in", default=None, help="launch table (JSON) to load before anything else")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    assert D._load_triton()
    if args.configs_in:
        D.load_configs(args.configs_in)
    if not args.skip_check:
        report["correct"] = check_correctness(report.setdefault("errors", {}))
    if args.sweep:
        report["sweep"] = sweep(args.configs_out, args.bits, args.shapes)
    attention_time(report.setdefault("attention", {}), [attention_blocks(a) for a in args.attention])
    if not args.skip_steps:
        whole_step(report.setdefault("steps", {}), args.profile, args.steps)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
