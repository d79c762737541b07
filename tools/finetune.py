"""Fine-tune ChatGLM2 / ChatGLM3 on JSON-lines conversations: LoRA, P-tuning v2, or every weight.

    python tools/finetune.py --model DIR --data train.jsonl --out OUT --method lora [--max-steps 1000]
    python tools/cli_demo.py --model DIR --finetuned OUT        # chat with the result

Each line of the data file is one conversation, in either form:

    {"conversations": [{"role": "system", "content": "...", "tools": [...]},
                       {"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "...", "history": [["earlier query", "earlier response"], ...]}

("messages" is read like "conversations".) The loss covers what the model writes when it chats: every assistant
message (its metadata line and content) and the token that ends it — the next role token, or eos after the last
message. An assistant message with "loss": false is context only. ChatGLM2 models (the [Round N] prompt) get one
example per assistant turn, with the turns before it as history, the layout their chat() builds.

Training is transformers' Trainer: mixed precision, gradient accumulation, and data parallel under `torchrun
--nproc_per_node N` (each GPU holds the whole model; the first process writes the result). With --fsdp a full
fine-tune shards the weights, gradients and Adam state over the N GPUs instead (FSDP, one unit per layer), for GPUs
that cannot each hold ~16 bytes per weight. OUT gets
finetune_args.json and, by method:
    lora     the PEFT adapter (needs `pip install peft`); with --merge also OUT/merged, a full model folder
    ptuning  prefix_encoder.safetensors, the only trained weights (pre_seq_len / prefix_projection in the args file)
    full     a full model folder
`load_finetuned(model_dir, out)` loads any of them for inference (LoRA merged into the weights, so the fast decode
path serves it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from full_shape_check import import_package  # noqa: E402

import_package()
from chatglm.chat_format import CHATGLM3, system_content, validate_chatglm2_history  # noqa: E402

IGNORE = -100  # label of a position the loss skips (transformers' convention)
ARGS_FILE = "finetune_args.json"
PREFIX_FILE = "prefix_encoder.safetensors"
METHODS = ("lora", "ptuning", "full")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

Example = Dict[str, List[int]]  # {"input_ids": [n], "labels": [n]}


# ---------------------------------------------------------------------------------------------------- data
def read_conversations(path: Path) -> List[List[Dict[str, Any]]]:
    """The conversations of a JSON-lines file, each a list of message dicts; ValueError names the bad line."""
    conversations = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from None
        try:
            conversations.append(_messages(record))
        except ValueError as err:
            raise ValueError(f"{path}:{number}: {err}") from None
    if not conversations:
        raise ValueError(f"{path} holds no conversations")
    return conversations


def _messages(record: Any) -> List[Dict[str, Any]]:
    if not isinstance(record, Mapping):
        raise ValueError(f"each line must be a JSON object, got {type(record).__name__}")
    messages = record.get("conversations", record.get("messages"))
    if messages is None and "prompt" in record and "response" in record:
        messages = []
        for query, response in validate_chatglm2_history(record.get("history")):
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        messages += [{"role": "user", "content": record["prompt"]},
                     {"role": "assistant", "content": record["response"]}]
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected {"conversations": [messages]} or {"prompt": ..., "response": ...}, got keys '
                         f"{sorted(record)}")
    if not any(m.get("role") == "assistant" for m in messages if isinstance(m, Mapping)):
        raise ValueError("the conversation has no assistant message, so nothing to learn")
    return messages


def chat_family(tokenizer: Any) -> str:
    """"chatglm3" or "chatglm2": ours says it; the official ChatGLM3 tokenizer is the one with build_single_message."""
    return getattr(tokenizer, "chat_format", None) or ("chatglm3" if hasattr(tokenizer, "build_single_message")
                                                       else "chatglm2")


def chatglm3_example(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> Example:
    """One ChatGLM3 conversation as ids and labels: labels equal the ids on what the assistant writes, else IGNORE.

    ids: [gMASK] sop, then per message ``<|role|> metadata \\n content`` (the ids chat() builds), then eos.
    """
    ids: List[int] = list(tokenizer.get_prefix_tokens())
    labels: List[int] = [IGNORE] * len(ids)
    reply_open = False  # the previous message is a reply to learn, so the token after it is learned too
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        message_ids = tokenizer.build_single_message(message["role"], message.get("metadata") or "",
                                                     system_content(message))
        learn = message["role"] == "assistant" and message.get("loss", True)
        labels += [message_ids[0] if reply_open else IGNORE]
        labels += message_ids[1:] if learn else [IGNORE] * (len(message_ids) - 1)
        ids += message_ids
        reply_open = learn
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id if reply_open else IGNORE)
    return {"input_ids": ids, "labels": labels}


def chatglm2_examples(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> List[Example]:
    """One example per assistant turn: the [Round N] prompt of its query after the earlier turns, then the reply and
    eos (labels on the reply and eos only)."""
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
    if roles != ["user", "assistant"] * (len(messages) // 2):
        raise ValueError(f"ChatGLM2 conversations alternate user and assistant messages, got roles {roles}")
    examples, history = [], []
    for query, reply in zip(messages[0::2], messages[1::2]):
        prompt = tokenizer.encode(tokenizer.build_prompt(query["content"], history))
        answer = tokenizer.encode(reply["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
        if reply.get("loss", True):
            examples.append({"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer})
        history.append((query["content"], reply["content"]))
    return examples


def build_examples(tokenizer: Any, conversations: Iterable[Sequence[Mapping[str, Any]]],
                   max_length: int) -> Tuple[List[Example], int]:
    """Examples in the tokenizer's chat format, cut to ``max_length`` tokens → (examples, how many were cut).

    An example left with no label after the cut is dropped."""
    examples, cut = [], 0
    for messages in conversations:
        if chat_family(tokenizer) == CHATGLM3:
            built = [chatglm3_example(tokenizer, messages)]
        else:
            built = chatglm2_examples(tokenizer, messages)
        for example in built:
            if len(example["input_ids"]) > max_length:
                cut += 1
                example = {key: value[:max_length] for key, value in example.items()}
            if any(label != IGNORE for label in example["labels"]):
                examples.append(example)
    return examples, cut


# --------------------------------------------------------------------------------------------------- model
def _load(source: str, torch_dtype: Optional[torch.dtype], **config_fields: Any) -> Tuple[Any, Any]:
    """(model, tokenizer) of a model folder, its config changed by ``config_fields``."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    config = AutoConfig.from_pretrained(source, trust_remote_code=True, **config_fields)
    model = AutoModel.from_pretrained(source, config=config, trust_remote_code=True, torch_dtype=torch_dtype)
    return model, tokenizer


def _prefix_fields(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """The config fields a P-tuning run sets (pre_seq_len, prefix_projection), from its arguments; else none."""
    if settings.get("method") != "ptuning":
        return {}
    return {name: settings[name] for name in ("pre_seq_len", "prefix_projection")}


def load_for_training(args: argparse.Namespace) -> Tuple[Any, Any]:
    """(model, tokenizer) with exactly the parameters of ``args.method`` trainable, those in float32."""
    if args.quantization_bit and args.method != "ptuning":
        raise ValueError("--quantization-bit trains a prefix over a quantized model: use it with --method ptuning")
    model, tokenizer = _load(args.model, DTYPES[args.dtype], use_cache=False, **_prefix_fields(vars(args)))
    if args.quantization_bit:
        model = model.quantize(args.quantization_bit)
    if args.method == "lora":
        model = _with_lora(model, args)
    elif args.method == "ptuning":  # the model froze everything but its prefix encoder when pre_seq_len was set
        model.transformer.prefix_encoder.float()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if args.method != "full":  # frozen embeddings: checkpointed layers need an input that asks for gradients
            model.enable_input_require_grads()
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # the optimizer and the fp16 grad scaler want float32 master weights
    return model, tokenizer


def _with_lora(model: Any, args: argparse.Namespace) -> Any:
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise ValueError("--method lora needs the peft package: pip install peft") from None
    targets = list(LORA_TARGETS) if args.lora_targets == "all" else args.lora_targets.split(",")
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"--lora-targets: unknown modules {unknown}; choose from {list(LORA_TARGETS)} or 'all'")
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets)
    return get_peft_model(model, config)


def train(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any]]:
    """Run the fine-tuning ``args`` describe and save the result in ``args.out`` → (the trained model, a summary:
    losses, counts)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    sharding = _sharding(args)  # its errors before the model loads
    model, tokenizer = load_for_training(args)
    examples, cut = build_examples(tokenizer, read_conversations(args.data), args.max_length)
    if not examples:
        raise ValueError(f"{args.data}: no example keeps a label within --max-length {args.max_length}")
    tokenizer.padding_side = "right"  # training batches: pad after the text; positions then need no mask
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)
    cuda = torch.cuda.is_available()
    training_args = TrainingArguments(**sharding,
        output_dir=str(args.out), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, weight_decay=args.weight_decay,
        max_steps=args.max_steps, num_train_epochs=args.epochs, warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.scheduler, logging_steps=args.logging_steps, report_to="none",
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        seed=args.seed, remove_unused_columns=False, dataloader_num_workers=0, optim="adamw_torch",
        fp16=cuda and args.dtype == "float16", bf16=cuda and args.dtype == "bfloat16")
    trainer = Trainer(model=model, args=training_args, train_dataset=examples, data_collator=collator,
                      callbacks=[_ModelCodeInCheckpoints(args.model)] if sharding else None)
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    main_process = trainer.is_world_process_zero()  # under torchrun, one process writes the result
    # sharded weights are gathered onto the first process; every process takes part
    full_state = trainer.accelerator.get_state_dict(trainer.model) if sharding else None
    if main_process:
        save(model, tokenizer, args, full_state)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"examples": len(examples), "cut_to_max_length": cut, "steps": result.global_step,
               "train_loss": result.training_loss, "logged_losses": losses,
               "train_seconds": result.metrics.get("train_runtime"), "out": str(args.out)}
    if cuda:
        summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if main_process:
        print(json.dumps(summary))
    return model, summary


def _sharding(args: argparse.Namespace) -> Dict[str, Any]:
    """The TrainingArguments of --fsdp: FSDP full sharding, one unit per GLMBlock; else none."""
    if not args.fsdp:
        return {}
    if args.method != "full":
        raise ValueError("--fsdp shards a full fine-tune; LoRA and P-tuning train a few weights of a frozen model "
                         "that each GPU holds: drop --fsdp, or use --method full")
    if not torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("--fsdp needs several CUDA GPUs, one process each: "
                         "torchrun --nproc_per_node N tools/finetune.py ... --fsdp")
    # the "fsdp_" spelling of the key is the one 4.30 reads; later releases strip the prefix
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": ["GLMBlock"]}}


def save(model: Any, tokenizer: Any, args: argparse.Namespace,
         full_state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write the result of ``args.method`` to ``args.out``; ``full_state``: the model's gathered state dict where
    the model itself is sharded (--fsdp)."""
    args.out.mkdir(parents=True, exist_ok=True)
    if args.method == "lora":
        model.save_pretrained(str(args.out))
    elif args.method == "ptuning":
        from safetensors.torch import save_file

        state = {k: v.detach().float().cpu().contiguous()
                 for k, v in model.transformer.prefix_encoder.state_dict().items()}
        save_file(state, str(args.out / PREFIX_FILE))
    else:
        model.config.use_cache = True
        writer = model if full_state is None else _meta_twin(model)
        writer.save_pretrained(str(args.out), state_dict=full_state)
        tokenizer.save_pretrained(str(args.out))
    record = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    (args.out / ARGS_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False))
    if args.method == "lora" and args.merge:  # from the saved adapter, on CPU: the trained model stays as it is
        merged, tokenizer = load_finetuned(args.model, str(args.out), torch_dtype=DTYPES[args.dtype])
        merged.save_pretrained(str(args.out / "merged"))
        tokenizer.save_pretrained(str(args.out / "merged"))


class _ModelCodeInCheckpoints(TrainerCallback):
    """A Trainer callback for --fsdp runs: FSDP2 saves each checkpoint-N through the sharded model's class, which
    torch defines, so save_pretrained copies torch's source files there, and names them in the config's auto_map,
    instead of this model's code. After each save the first process puts the base folder's code and auto_map back,
    so a checkpoint loads as a model folder."""

    def __init__(self, model_dir: str):
        self.code = sorted(Path(model_dir).glob("*.py"))
        self.auto_map = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))["auto_map"]

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for stray in folder.glob("_fsdp*.py"):
            stray.unlink()
        for source in self.code:
            shutil.copy(source, folder / source.name)
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config_file.write_text(json.dumps({**config, "auto_map": self.auto_map}, indent=2) + "\n", encoding="utf-8")


def _meta_twin(model: Any) -> Any:
    """The model's own class built on the meta device, to write a gathered state dict: FSDP2 turns a sharded model
    into a subclass (FSDPChatGLM...) defined in torch, whose code save_pretrained would copy instead of ours."""
    own_class = next(cls for cls in type(model).__mro__ if not cls.__name__.startswith("FSDP"))
    with torch.device("meta"):
        return own_class(model.config)


def load_finetuned(model_dir: str, finetuned_dir: str, torch_dtype: Optional[torch.dtype] = None) -> Tuple[Any, Any]:
    """(model, tokenizer) of a fine-tuning result for inference: the base model in ``model_dir`` with the LoRA
    adapter merged into its weights, or with the trained P-tuning prefix; a full fine-tune loads from its folder."""
    args_file = Path(finetuned_dir) / ARGS_FILE
    if not args_file.is_file():
        raise ValueError(f"{finetuned_dir} is not a fine-tuning result: {ARGS_FILE} is missing")
    recorded = json.loads(args_file.read_text(encoding="utf-8"))
    method = recorded.get("method")
    model, tokenizer = _load(finetuned_dir if method == "full" else model_dir, torch_dtype, **_prefix_fields(recorded))
    if method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, finetuned_dir).merge_and_unload()
    elif method == "ptuning":
        from safetensors.torch import load_file

        model.transformer.prefix_encoder.load_state_dict(load_file(str(Path(finetuned_dir) / PREFIX_FILE)))
    elif method != "full":
        raise ValueError(f"{args_file}: unknown method {method!r}, expected one of {list(METHODS)}")
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the base model folder (weights, configs, code, tokenizer)")
    parser.add_argument("--data", required=True, type=Path, help="JSON-lines conversations")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--method", choices=METHODS, default="lora")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16" if torch.cuda.is_available()
                        else "float32", help="of the frozen weights (trained ones are float32)")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per example; longer ones are cut")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None, help="default: 2e-4 LoRA, 2e-2 P-tuning, 1e-5 full")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--scheduler", default="linear", help="transformers' lr_scheduler_type")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=0, help="write OUT/checkpoint-N every N steps (0: never)")
    parser.add_argument("--resume", action="store_true", help="continue from the last OUT/checkpoint-N")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--fsdp", action="store_true",
                        help="--method full under torchrun: shard weights, gradients and Adam state over the GPUs")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--lora-targets", default="query_key_value",
                        help=f"comma-separated, from {', '.join(LORA_TARGETS)}; or 'all'")
    parser.add_argument("--merge", action="store_true", help="LoRA: also write OUT/merged, a full model folder")
    parser.add_argument("--pre-seq-len", type=int, default=128, help="P-tuning: prefix length")
    parser.add_argument("--prefix-projection", action="store_true", help="P-tuning: the prefix through an MLP")
    parser.add_argument("--quantization-bit", type=int, choices=(4, 8), default=None,
                        help="P-tuning: quantize the frozen weights first (the official int4/int8 format)")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = {"lora": 2e-4, "ptuning": 2e-2, "full": 1e-5}[args.method]
    if args.max_length < 2 or args.batch_size < 1 or args.grad_accum < 1 or not math.isfinite(args.lr):
        parser.error("--max-length must be ≥ 2, --batch-size and --grad-accum ≥ 1, --lr finite")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    return train(parse_args(argv))[1]


if __name__ == "__main__":
    main()
