"""Full 6B shape on a GPU with random weights: save in the official .bin layout, load with from_pretrained, generate.

    python tools/full_shape_check.py --out results.json [--variants chatglm3-6b chatglm2-6b-32k chatglm3-6b-128k]

The weights are random (nothing here is a real checkpoint); the check is that the official layout loads through
the public remote-code path in float16/bfloat16 on CUDA and generates, and how long/how much memory that takes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CODE_FILES = sorted(p.name for p in REPO.glob("*.py"))  # the remote-code modules


def import_package():
    """Our flat modules as package 'chatglm' (how tests import them)."""
    import types

    if "chatglm" not in sys.modules:
        package = types.ModuleType("chatglm")
        package.__path__ = [str(REPO)]
        sys.modules["chatglm"] = package


def save_official_layout(model: torch.nn.Module, folder: Path, shards: int = 7) -> None:
    """pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json, with the rotary inv_freq buffer."""
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    rot = model.config.kv_channels // 2
    state["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot)).half()
    names = list(state)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        keys = names[i * per:(i + 1) * per]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in keys}, folder / file)
        weight_map.update({k: file for k in keys})
        total += sum(state[k].numel() * state[k].element_size() for k in keys)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def install_variant(folder: Path, variant: str) -> None:
    for name in CODE_FILES:
        shutil.copy(REPO / name, folder / name)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(REPO / "variants" / variant / name, folder / name)


def load_and_generate(folder: Path, dtype: torch.dtype) -> dict:
    from transformers import AutoModel

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, torch_dtype=dtype).cuda().eval()
    load_s = time.perf_counter() - start
    prompt = torch.randint(10, 60000, (1, 16), device="cuda")
    start = time.perf_counter()
    out = model.generate(input_ids=prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.cuda.synchronize()
    result = {"dtype": str(dtype), "class": type(model).__name__, "param_dtype": str(next(model.parameters()).dtype),
              "device": str(next(model.parameters()).device), "load_s": round(load_s, 1),
              "generated": out.shape[1] - 16, "generate_s": round(time.perf_counter() - start, 2),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "finite_logits": bool(torch.isfinite(model(input_ids=prompt).logits).all())}
    del model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["chatglm3-6b", "chatglm2-6b-32k", "chatglm3-6b-128k"])
    parser.add_argument("--bf16-variants", nargs="*", default=["chatglm3-6b"])
    parser.add_argument("--workdir", default="/tmp/chatglm_full_shape")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import_package()
    import transformers

    from chatglm.configuration_chatglm import ChatGLMConfig
    from chatglm.modeling_chatglm import ChatGLMForConditionalGeneration

    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "runs": []}
    config = ChatGLMConfig.from_pretrained(str(REPO / "variants" / args.variants[0]))
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda"):
        model = ChatGLMForConditionalGeneration(config).half()
    save_official_layout(model, folder)
    results["save_s"] = round(time.perf_counter() - start, 1)
    del model
    for variant in args.variants:
        install_variant(folder, variant)
        dtypes = [torch.float16] + ([torch.bfloat16] if variant in args.bf16_variants else [])
        for dtype in dtypes:
            run = {"variant": variant, **load_and_generate(folder, dtype)}
            print(json.dumps(run), flush=True)
            results["runs"].append(run)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
