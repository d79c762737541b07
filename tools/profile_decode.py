"""Profile the fast decode path at the real shape: where each decode step's time goes (CUDA kernels, top N).
With --prefill N: where one N-token prefill (last-position logits, what generate() runs first) spends its time.

    TORCH_LOGS=perf_hints python tools/profile_decode.py --variant chatglm3-6b --prompt 1024 --new 64
    python tools/profile_decode.py --variant chatglm3-6b-128k --prefill 32768
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from full_shape_check import import_package  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="chatglm3-6b")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--prefill", type=int, default=0, help="profile one prefill of this many tokens instead")
    args = parser.parse_args()
    import_package()
    from chatglm.configuration_chatglm import ChatGLMConfig
    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    config = ChatGLMConfig.from_pretrained(str(REPO / "variants" / args.variant))
    with torch.device("cuda"):
        model = ChatGLMForConditionalGeneration(config).half().eval()
    ids = torch.randint(10, 60000, (args.batch, args.prefill or args.prompt), device="cuda")
    @torch.no_grad()
    def run(new: int):
        if args.prefill:
            return model(input_ids=ids, use_cache=True, return_last_logit=True)
        return model.fast_generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None)
    for _ in range(2):
        run(args.new)
    for new in (1, args.new):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(new)
        torch.cuda.synchronize()
        print(f"new={new}: {time.perf_counter() - start:.4f} s", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(args.new)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
