"""Whole-model GPU check of quantization: at the real shape, each backend's logits (prefill and fast-path decode)
against the pure-torch backend on the same packed weights, fp16, int8 and int4.

    python3 tools/quant_model_check.py --variant chatglm3-6b
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from full_shape_check import import_package  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="chatglm3-6b")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    args = parser.parse_args()
    import_package()
    from chatglm.configuration_chatglm import ChatGLMConfig
    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration
    from chatglm.quantization import available_backends, set_backend

    ids = torch.randint(10, 60000, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for bits in args.bits:
        torch.manual_seed(0)
        config = ChatGLMConfig.from_pretrained(str(REPO / "variants" / args.variant))  # quantize() records bits in it
        with torch.device("cuda"):
            model = ChatGLMForConditionalGeneration(config).half().eval()
        model.quantize(bits)
        results = {}
        with torch.no_grad():
            for backend in ["torch"] + [b for b in available_backends("cuda") if b != "torch"]:
                set_backend(model, backend)
                out = model(input_ids=ids[:, :-1], use_cache=True)
                step = model(input_ids=ids[:, -1:], past_key_values=out.past_key_values).logits.float()
                greedy = model.fast_generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
                results[backend] = (out.logits.float(), step, greedy)
        ref = results["torch"]
        for backend, (prefill, step, greedy) in results.items():
            scale = ref[1].abs().max().item()
            print(json.dumps({"bits": bits, "backend": backend,
                              "prefill_max_rel": round((prefill - ref[0]).abs().max().item() / scale, 5),
                              "decode_max_rel": round((step - ref[1]).abs().max().item() / scale, 5),
                              "greedy_equal_torch": bool(torch.equal(greedy, ref[2])),
                              "finite": bool(torch.isfinite(step).all())}), flush=True)
        del model, results
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
