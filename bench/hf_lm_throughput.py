"""Hugging Face PEFT training throughput of a causal-LM job, to compare with
ptune's engine on the same machine, model and rows (bench/lm_vs_peft.sh runs
both sides; `TASK=causal_lm bench/precision.sh` runs it in float32 and with
--bf16 next to ptune's fp32 and bf16 rows).

Usage (from the repository root, after `source scripts/env.sh`):
    python bench/hf_lm_throughput.py --model DIR --train E2E_TRAIN.jsonl --method lora|prompt_tuning|p_tuning_v2
        [--steps 20] [--batch-size 8] [--max-seq-len 64] [--r 8] [--num-virtual-tokens 20] [--bf16]
        [--head-on-targets] [--device cpu]

Rows are built as ptune builds them: `source + " ||" + " " + target` and the
end-of-sequence token, truncated to --max-seq-len, with labels -100 over the
source and separator; batches take the file's rows in order and are padded
on the right to their longest row (labels -100 at padding). The model is
`AutoModelForCausalLM` in float32 on the CPU with PEFT's LORA (r, alpha 2r,
dropout 0.05 on q_proj and v_proj) or PROMPT_TUNING (random init, the
virtual tokens prepended to each row), trained with torch's AdamW at 2e-4.
With --bf16 the forward pass and loss run under
`torch.autocast("cpu", dtype=torch.bfloat16)` (what the Trainer's
`bf16=True` does on a CPU): weights, gradients and optimizer state stay
float32, and autocast casts the weights to bfloat16 in every forward. Each
of --steps steps, after 2 untimed warm-up steps, is timed from taking its
batch to reading its loss, as ptune's `examples_per_second` metric is.
Prints one JSON line (mean_padded_len: the timed batches' mean padded
width in tokens, virtual tokens not counted).
"""

import argparse
import json
import time

import peft
import torch
import transformers
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

WARMUP_STEPS = 2


def rows(tokenizer, path, count, max_len, eos):
    out = []
    with open(path) as f:
        for line in f:
            if len(out) == count:
                break
            row = json.loads(line)
            prompt = tokenizer.encode(row["source"] + " ||").ids
            ids = tokenizer.encode(row["source"] + " || " + row["target"]).ids + [eos]
            shared = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
            labels = [-100] * shared + ids[shared:]
            out.append((ids[:max_len], labels[:max_len]))
    return out


def batch(chunk, pad):
    longest = max(len(ids) for ids, _ in chunk)
    ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids, _ in chunk])
    mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in chunk])
    labels = torch.tensor([labels + [-100] * (longest - len(labels)) for _, labels in chunk])
    return ids, mask, labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--method", choices=["lora", "prompt_tuning", "p_tuning_v2"], required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--head-on-targets", action="store_true",
                        help="(lora) run the LM head on target positions only, as ptune does, instead of "
                             "transformers' logits at every position: shows how much of a gap that is")
    parser.add_argument("--bf16", action="store_true",
                        help="forward pass and loss under autocast to bfloat16 (weights stay float32)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda:N")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(1)
    tokenizer = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    eos = base.config.eos_token_id
    total = WARMUP_STEPS + args.steps
    data = rows(tokenizer, args.train, total * args.batch_size, args.max_seq_len, eos)
    if args.method == "lora":
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05,
                            target_modules=["q_proj", "v_proj"])
    elif args.method == "p_tuning_v2":
        # P-tuning v2 is PEFT's prefix tuning without the reparameterization.
        config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens)
    else:
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens)
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    timed = 0.0
    widths = []
    for step in range(total):
        started = time.perf_counter()
        ids, mask, labels = (t.to(device) for t in batch(data[step * args.batch_size:(step + 1) * args.batch_size], eos))
        with autocast():
            if args.head_on_targets and args.method == "lora":
                # The LoRA-injected decoder body, then the head where a label is.
                hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
                targets = labels[:, 1:].reshape(-1)
                keep = (targets != -100).nonzero().squeeze(1)
                predicting = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
                logits = model.base_model.model.lm_head(predicting)
                loss = torch.nn.functional.cross_entropy(logits, targets.index_select(0, keep))
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.item()
        if step >= WARMUP_STEPS:
            timed += time.perf_counter() - started
            widths.append(ids.shape[1])
    print(json.dumps({
        "method": args.method,
        "examples_per_second": round(args.steps * args.batch_size / timed, 2),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "mean_padded_len": round(sum(widths) / len(widths), 1),
        "head_on_targets": args.head_on_targets and args.method == "lora",
        "bf16_autocast": args.bf16,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }))


if __name__ == "__main__":
    main()
