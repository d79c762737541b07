"""Benchmark: prefill tok/s, decode tok/s and peak memory of our model and of a peer measured in the same run.

    python tools/bench.py --variant chatglm3-6b --dtype float16 --batch 1 --prompt 1024 --new 256 --out bench.json
    python tools/bench.py --tiny --device cpu --dtype float32 --prompt 64 --new 32      # 2-core CPU, small shape

The peer is transformers' GlmForCausalLM with our weights renamed (the same function, SPEC §2); ratios are ours
over the peer's. Weights are random at the variant's real shape unless --tiny. Decode rate = batch · (new − 1) /
(t(generate new) − t(generate 1)), so prefill is excluded; each system is warmed up first (compilation included).
Long prefills (--long-prefill) also report the mean SM clock and board power while they ran (`gpu`): at 131072
tokens an H200 runs at its power limit, so the clock, not the kernels' peak rate, sets the time. With
--prefill-piece the long prefill is fed in pieces into one cache (a chunked prefill). --chat times replies through
chat() and stream_chat() (needs the real tokenizer.model: --tokenizer), by our own decode loop (`cache_kind`: the
static decoder on CUDA, a growing cache on CPU) and on generate().
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from full_shape_check import import_package  # noqa: E402
from gpu_telemetry import GpuTelemetry  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 1) -> float:
    """Best wall time of `repeat` runs of fn()."""
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def build_ours(args):
    from chatglm.configuration_chatglm import ChatGLMConfig
    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    if args.tiny:  # (--chat: a vocabulary that covers the real tokenizer's ids)
        config = ChatGLMConfig(num_layers=4, hidden_size=256, num_attention_heads=8, kv_channels=32,
                               multi_query_group_num=2, ffn_hidden_size=512,
                               padded_vocab_size=65024 if args.chat else 4096, seq_length=4096)
    else:
        config = ChatGLMConfig.from_pretrained(str(REPO / "variants" / args.variant))
    config.pre_seq_len = args.pre_seq_len or None  # a P-tuning v2 model (random prefix encoder)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = ChatGLMForConditionalGeneration(config).to(getattr(torch, args.dtype)).eval()
    if args.quant:
        model.quantize(args.quant)
    return model


def generate_fn(model, ids, new: int, cache: str):
    """A greedy generate() of `new` tokens after ids. cache "static": `cache_implementation="static"`; "plain": no
    cache argument, as most callers write it (ours: the fast path on CUDA where it serves); "dynamic": transformers'
    own loop on a growing cache (ours: with CHATGLM_FAST_GENERATE=0)."""
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    mask = torch.ones_like(ids)
    if cache != "dynamic":
        return lambda: model.generate(input_ids=ids, attention_mask=mask, **kwargs)

    def on_transformers_loop():
        from chatglm.decoding_chatglm import FAST_GENERATE_ENV

        before = os.environ.get(FAST_GENERATE_ENV)
        os.environ[FAST_GENERATE_ENV] = "0"
        try:
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        finally:
            os.environ.pop(FAST_GENERATE_ENV) if before is None else os.environ.update({FAST_GENERATE_ENV: before})
    return on_transformers_loop


def measure(name: str, model, args, cache: str, peer: bool) -> dict:
    vocab = model.config.vocab_size if peer else model.config.padded_vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (args.batch, args.prompt), generator=g).to(args.device)
    result = {"system": name, "cache": cache}
    try:
        with torch.no_grad():
            prefill = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), args.device, repeat=3)
            result["prefill_tok_s"] = round(args.batch * args.prompt / prefill, 1)
            if args.capacity and cache == "static" and not peer:  # what chat() preallocates for max_length
                from chatglm.decoding_chatglm import _decoder_for

                _decoder_for(model, args.batch, args.capacity, compile=args.device.startswith("cuda"))
            # warm-up (builds the fast path's decoder: its kernels, or its compile, and CUDA graphs)
            result["first_call_s"] = round(timed(generate_fn(model, ids, args.new, cache), args.device), 2)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t_one = timed(generate_fn(model, ids, 1, cache), args.device, repeat=2)
            t_all = timed(generate_fn(model, ids, args.new, cache), args.device, repeat=args.repeat)
            result["decode_tok_s"] = round(args.batch * (args.new - 1) / (t_all - t_one), 1)
            result["decode_ms_per_step"] = round(1000 * (t_all - t_one) / (args.new - 1), 3)
            if args.device.startswith("cuda"):
                result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if cache != "dynamic" and not peer:  # which decode step served the fast path, and why
                from chatglm.decode_kernels_chatglm import unsupported_reason

                decoder = getattr(model, "_chatglm_decoder", None)
                result["fused_step"] = bool(decoder is not None and decoder.fused is not None)
                result["fused_step_reason"] = unsupported_reason(model, args.batch)
    except Exception as error:  # a peer or cache kind the running versions lack: report, keep going
        result["error"] = f"{type(error).__name__}: {error}"[:300]
    print(json.dumps(result), flush=True)
    return result


def prefill_fn(model, ids: torch.Tensor, piece: int = 0):
    """One prefill of ids [b, n] into a fresh cache, last-position logits only (what generate() runs); with
    `piece`, fed that many tokens at a time into the same cache (a chunked prefill: every later piece attends to
    the cache's keys as well as its own)."""
    piece = piece or ids.shape[1]

    def run():
        out = None
        for start in range(0, ids.shape[1], piece):
            out = model(input_ids=ids[:, start:start + piece], use_cache=True,
                        past_key_values=None if out is None else out.past_key_values, logits_to_keep=1)
        return out
    return run


def measure_long_prefill(name: str, model, args, length: int, peer: bool) -> dict:
    vocab = model.config.vocab_size if peer else model.config.padded_vocab_size
    ids = torch.randint(10, vocab, (1, length), generator=torch.Generator().manual_seed(2)).to(args.device)
    result = {"system": name, "prefill_tokens": length, "piece": args.prefill_piece or length}
    run = prefill_fn(model, ids, args.prefill_piece)
    try:
        with torch.no_grad():
            run()  # warm-up at full length: the first call compiles kernels
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with GpuTelemetry() as telemetry:
                seconds = timed(run, args.device, args.repeat)
        result.update(seconds=round(seconds, 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      gpu=telemetry.summary())
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"[:300]
    torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


CHAT_SAMPLING = dict(do_sample=True, top_p=0.8, temperature=0.8)  # chat()'s defaults for chatglm3-6b


def nan_guard(input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
    """A logits processor like the one the official demos pass with every request (--nan-guard): scores that hold a
    NaN or an infinity are replaced by a fixed distribution. Its check synchronises with the GPU every token."""
    if bool(torch.isfinite(scores).all()):
        return scores
    guarded = torch.zeros_like(scores)
    guarded[..., 5] = 5e4
    return guarded


def load_tokenizer(path: str):
    """ChatGLMTokenizer (ChatGLM3 format) from a tokenizer.model file or a folder holding one."""
    from chatglm.tokenization_chatglm import ChatGLMTokenizer

    file = Path(path)
    file = file / "tokenizer.model" if file.is_dir() else file
    if not file.is_file():
        raise SystemExit(f"--chat needs the real tokenizer.model: {file} not found (pass --tokenizer PATH)")
    return ChatGLMTokenizer(vocab_file=str(file))


def chat_query(tok, tokens: int) -> str:
    """A user message whose chat prompt is about `tokens` tokens long."""
    sentence = "请讲一个关于大海和星空的长故事。"
    per = len(tok.encode(sentence, add_special_tokens=False))
    return sentence * max(1, tokens // per)


def measure_chat(name: str, model, tok, args, kind: str) -> dict:
    """Decode tok/s of a chat reply of --new tokens (sampled, chat()'s defaults), excluding prefill: kind "chat" or
    "stream_chat" (ours; our loop or generate() by CHATGLM_FAST_CHAT), "generate" (the peer, same prompt ids)."""
    query = chat_query(tok, args.prompt)
    ids = tok.build_chat_input(query)["input_ids"].to(args.device)
    sampling = {**CHAT_SAMPLING, "repetition_penalty": args.repetition_penalty}
    if args.nan_guard:
        from transformers import LogitsProcessorList

        sampling["logits_processor"] = LogitsProcessorList([nan_guard])
    result = {"system": name, "kind": kind, "prompt_tokens": ids.shape[1]}
    if name == "ours":  # which decoding serves it: "static", "growing", or None (generate())
        from chatglm.decoding_chatglm import chat_cache_kind

        result["cache_kind"] = chat_cache_kind(model, dict(input_ids=ids, max_new_tokens=args.new, **sampling))

    def run(new: int):
        budget = dict(max_new_tokens=new, min_new_tokens=new, **sampling)
        if kind == "chat":
            return lambda: model.chat(tok, query, **budget)
        if kind == "stream_chat":
            return lambda: list(model.stream_chat(tok, query, **budget))
        return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=tok.stop_token_ids,
                                      pad_token_id=0, **budget)
    try:
        with torch.no_grad():
            run(args.new)()  # warm-up: kernels, graphs
            t_one = timed(run(1), args.device, repeat=2)
            t_all = timed(run(args.new), args.device, repeat=args.repeat)
        result["decode_tok_s"] = round((args.new - 1) / (t_all - t_one), 1)
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"[:300]
    print(json.dumps(result), flush=True)
    return result


def bench_chat(model, args, report: dict) -> None:
    """--chat: ours through chat() and stream_chat() by our own loop and on generate(), the peer's generate()."""
    from chatglm.decoding_chatglm import FAST_CHAT_ENV
    from glm_peer import glm_peer

    tok = load_tokenizer(args.tokenizer)
    results = report["results"]
    paths = [("loop", None)] + ([("growing", "growing")] if args.device.startswith("cuda") else []) + \
        [("generate", "0")]
    for path, setting in paths:
        if setting is None:
            os.environ.pop(FAST_CHAT_ENV, None)
        else:
            os.environ[FAST_CHAT_ENV] = setting
        for kind in ("chat", "stream_chat"):
            results.append({**measure_chat("ours", model, tok, args, kind), "path": path})
    os.environ.pop(FAST_CHAT_ENV, None)
    if not args.no_peer:
        results.append(measure_chat("GlmForCausalLM", glm_peer(model), tok, args, "generate"))
    rates = {(r["system"], r["kind"], r.get("path")): r.get("decode_tok_s") for r in results}
    peer = rates.get(("GlmForCausalLM", "generate", None))
    report["ratios"] = {f"ours {kind} [{path}] / peer generate": round(rate / peer, 2)
                        for (system, kind, path), rate in rates.items() if system == "ours" and rate and peer}
    if not peer:  # (--no-peer, a P-tuning model): each path against the same method on transformers' generate()
        for (system, kind, path), rate in rates.items():
            base = rates.get(("ours", kind, "generate"))
            if path != "generate" and rate and base:
                report["ratios"][f"ours {kind} [{path}] / ours {kind} [generate]"] = round(rate / base, 2)


def bench_long_prefill(model, args, report: dict) -> None:
    """--long-prefill: ours and the peer, one prefill of each length."""
    from glm_peer import glm_peer

    peer = None if args.no_peer else glm_peer(model)
    for length in args.long_prefill:
        report["results"].append(measure_long_prefill("ours", model, args, length, peer=False))
        if peer is not None:
            report["results"].append(measure_long_prefill("GlmForCausalLM", peer, args, length, peer=True))
    seconds = {(r["system"], r["prefill_tokens"]): r.get("seconds") for r in report["results"]}
    report["ratios"] = {f"peer/ours prefill {n}": round(seconds[("GlmForCausalLM", n)] / seconds[("ours", n)], 2)
                        for n in args.long_prefill if seconds.get(("ours", n)) and seconds.get(("GlmForCausalLM", n))}


def bench_decode(model, args, report: dict) -> None:
    """Default: prefill and decode of ours and the peer with each cache kind, ratios of every pair."""
    from glm_peer import glm_peer

    for cache in args.caches:
        report["results"].append(measure("ours", model, args, cache, peer=False))
    if not args.no_peer and not args.quant:
        peer = glm_peer(model)
        del model
        for cache in args.caches:
            if cache != "plain" or "dynamic" not in args.caches:  # (the peer's plain call is its dynamic one)
                report["results"].append(measure("GlmForCausalLM", peer, args, cache, peer=True))
    ours = {r["cache"]: r for r in report["results"] if r["system"] == "ours"}
    report["ratios"] = {}
    for r in report["results"]:
        if r["system"] != "ours" and "decode_tok_s" in r:
            for cache, mine in ours.items():
                if "decode_tok_s" in mine:
                    report["ratios"][f"ours[{cache}]/peer[{r['cache']}] decode"] = round(
                        mine["decode_tok_s"] / r["decode_tok_s"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="chatglm3-6b")
    parser.add_argument("--tiny", action="store_true", help="small shape for CPU runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--quant", type=int, default=0, choices=[0, 4, 8])
    parser.add_argument("--caches", nargs="+", default=["plain", "dynamic", "static"],
                        choices=["plain", "dynamic", "static"], help="plain: generate() with no cache argument; dynamic: transformers' own loop; static: "
                             "cache_implementation='static' (see generate_fn)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--long-prefill", type=int, nargs="*", default=[],
                        help="instead of decode: time one prefill of each length (CUDA), e.g. 32768 131072")
    parser.add_argument("--prefill-piece", type=int, default=0,
                        help="with --long-prefill: feed it this many tokens at a time into one cache")
    parser.add_argument("--chat", action="store_true",
                        help="instead of generate(): chat() and stream_chat() replies of --new sampled tokens")
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "assets" / "tokenizer"),
                        help="with --chat: the real tokenizer.model, or a folder holding it")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="with --chat: sample with this repetition penalty (ours and the peer)")
    parser.add_argument("--nan-guard", action="store_true",
                        help="with --chat: pass a NaN-guard logits processor, as the official demos do")
    parser.add_argument("--pre-seq-len", type=int, default=0,
                        help="a P-tuning v2 model with a prefix of this length (no peer: it has no prefix)")
    parser.add_argument("--capacity", type=int, default=0,
                        help="fast path: preallocate its cache for this many positions first (chat() preallocates "
                             "prompt + budget, up to the variant's max_length)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.no_peer = args.no_peer or bool(args.pre_seq_len)
    import_package()
    import transformers

    report = {"args": vars(args), "torch": torch.__version__, "transformers": transformers.__version__,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "results": []}
    model = build_ours(args)
    mode = bench_chat if args.chat else bench_long_prefill if args.long_prefill else bench_decode
    mode(model, args, report)
    print(json.dumps(report["ratios"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))

if __name__ == "__main__":
    main()
