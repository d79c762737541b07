"""GPU check at the real shape: a model split over two GPUs by an accelerate device map gives what it gives on one.

    python tools/multi_gpu_check.py --variant chatglm3-6b-128k --length 131072 --new 16

Random fp16 weights at the variant's shape. The model runs on cuda:0 alone, then (the same weights) with the
embedding and the first half of the layers on cuda:0 and the rest, the final norm and the output layer on cuda:1.
Each placement does one long prefill (last-position logits, what generate() runs; timed, with each GPU's peak
memory) and a greedy generate() of a 1024-token prompt with the dynamic cache and with the static fast path. Prints
one JSON line: the largest relative difference of the logits and of the first/middle/last layer's cache, and
whether the tokens agree. The dynamic-cache tokens must (the same kernels run, placed differently). The static
path's need not: on one GPU it is the fused Triton step, whose logits are ~1e-3 from the model's forward, and
random weights make near-ties common; a split model steps through the model's own forward.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from full_shape_check import import_package  # noqa: E402
from prefill_check import prefill, relative  # noqa: E402


def two_gpu_device_map(num_layers: int, tail: int = 1) -> dict:
    """Embedding and the first half of the layers on GPU 0, the rest on GPU 1, the final norm and output layer on
    GPU `tail` (0 as the official `auto_configure_device_map` places them, 1 as accelerate's "auto" does)."""
    return {"transformer.embedding": 0, "transformer.rotary_pos_emb": 0,
            "transformer.encoder.final_layernorm": tail, "transformer.output_layer": tail,
            **{f"transformer.encoder.layers.{i}": int(i >= num_layers // 2) for i in range(num_layers)}}


def run(model, ids: torch.Tensor, new: int) -> dict:
    """Prefill (timed after a warm-up, peak memory per GPU) and a greedy static-cache generate of `new` tokens."""
    devices = range(torch.cuda.device_count())
    prefill(model, ids, fused=True)  # warm-up: the kernels compile on first use
    for device in devices:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    logits, cache = prefill(model, ids, fused=True)
    for device in devices:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peaks = [round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in devices]
    request = dict(input_ids=ids[:, :1024], max_new_tokens=new, min_new_tokens=new, do_sample=False)
    with torch.no_grad():
        tokens = {cache: model.generate(**request, **kwargs).cpu()
                  for cache, kwargs in (("dynamic", {}), ("static", {"cache_implementation": "static"}))}
    return {"seconds": round(seconds, 3), "peak_gib": peaks, "logits": logits.cpu(), "cache": [t.cpu() for t in cache],
            "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="chatglm3-6b-128k")
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--new", type=int, default=16)
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two CUDA devices")
    import_package()
    from accelerate import dispatch_model
    from chatglm.configuration_chatglm import ChatGLMConfig
    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    config = ChatGLMConfig.from_pretrained(str(REPO / "variants" / args.variant))
    torch.manual_seed(0)
    with torch.device("cuda:0"):
        model = ChatGLMForConditionalGeneration(config).half().eval()
    ids = torch.randint(10, config.padded_vocab_size, (1, args.length), generator=torch.Generator().manual_seed(2))
    one = run(model, ids.cuda(0), args.new)

    model = dispatch_model(model, device_map=two_gpu_device_map(config.num_layers))
    two = run(model, ids.cuda(0), args.new)
    print(json.dumps({
        "variant": args.variant, "length": args.length, "gpu": torch.cuda.get_device_name(0),
        "one_gpu": {"seconds": one["seconds"], "peak_gib": one["peak_gib"]},
        "two_gpus": {"seconds": two["seconds"], "peak_gib": two["peak_gib"]},
        "logits_rel_diff": relative(two["logits"], one["logits"]),
        "cache_rel_diff": max(relative(a, b) for a, b in zip(two["cache"], one["cache"])),
        "same_tokens": {cache: bool(torch.equal(two["tokens"][cache], want)) for cache, want in one["tokens"].items()},
    }), flush=True)


if __name__ == "__main__":
    main()
