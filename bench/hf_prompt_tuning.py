"""Hugging Face PEFT prompt tuning with the settings of ptune's SST-2 demo, to
compare accuracy and wall time with the Rust engine on the same machine.

Usage (from the repository root, after `source scripts/env.sh`):
    python bench/hf_prompt_tuning.py [--model DIR] [--data DIR] [--train-examples 4000] ...

Trains PEFT PROMPT_TUNING (SEQ_CLS, trained classifier head) on all-MiniLM-L6-v2
with AdamW and a linear schedule, padding each batch to its longest example,
then evaluates on the SST-2 dev set. Prints accuracy and seconds, measured from
before the model loads to after the evaluation (the same span `ptune-worker
train` reports), and the training loop's examples per second. With --bf16 the
forward passes run under `torch.autocast("cpu", torch.bfloat16)` (what the
Trainer's `bf16=True` does; parameters and optimizer state stay float32);
--max-steps stops training early (a throughput run). Nothing is downloaded.
"""

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup


def read_jsonl(path, limit):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit and len(rows) == limit:
                break
    return rows


class MeanPooler(torch.nn.Module):
    """Stands in for BERT's pooler: the mean of the last hidden state over the
    input's own tokens, the virtual tokens PEFT prepends excluded (ptune's
    `head.pooling = "mean"`, sentence-transformers' pooling). The attention
    mask comes from a hook on the encoder's call."""

    def __init__(self, encoder, num_virtual_tokens):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.mask = None
        encoder.register_forward_pre_hook(self.keep_mask, with_kwargs=True)

    def keep_mask(self, module, args, kwargs):
        self.mask = kwargs["attention_mask"]

    def forward(self, hidden_states):
        hidden = hidden_states[:, self.num_virtual_tokens :]
        mask = self.mask[:, self.num_virtual_tokens :].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def batches(encodings, labels, indices, batch_size, tokenizer):
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        features = [{"input_ids": encodings[i]} for i in chunk]
        batch = tokenizer.pad(features, return_tensors="pt")
        yield batch["input_ids"], batch["attention_mask"], torch.tensor([labels[i] for i in chunk])


def main():
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("PTUNE_MINILM_DIR"))
    parser.add_argument("--data", default=root.parent / "shared/data/sst2")
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--init", choices=["RANDOM", "SAMPLE_VOCAB", "TEXT"], default="RANDOM")
    parser.add_argument("--init-text", default=None)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--head-lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--pooling", choices=["cls", "mean"], default="cls",
                        help="cls: BERT's pooler over position 0 (PEFT's default); mean: over the input's tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--bf16", action="store_true", help="forward passes under CPU autocast to bfloat16")
    parser.add_argument("--max-steps", type=int, default=0, help="stop training after this many steps (0: the epochs)")
    args = parser.parse_args()
    if not args.model:
        parser.error("set PTUNE_MINILM_DIR or pass --model")

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train = read_jsonl(Path(args.data) / "train.jsonl", args.train_examples)
    dev = read_jsonl(Path(args.data) / "dev.jsonl", 0)
    encode = lambda rows: tokenizer([r["text"] for r in rows], truncation=True, max_length=args.max_seq_len)["input_ids"]
    train_ids, dev_ids = encode(train), encode(dev)
    train_labels, dev_labels = [r["label"] for r in train], [r["label"] for r in dev]

    base = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    if args.pooling == "mean":
        base.bert.pooler = MeanPooler(base.bert, args.virtual_tokens)
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_CLS,
        num_virtual_tokens=args.virtual_tokens,
        prompt_tuning_init=PromptTuningInit[args.init],
        prompt_tuning_init_text=args.init_text,
        tokenizer_name_or_path=args.model,
    )
    model = get_peft_model(base, config)
    head = model.base_model.classifier.modules_to_save["default"]
    head_lr = args.head_lr or args.lr
    optimizer = torch.optim.AdamW(
        [
            {"params": [model.prompt_encoder["default"].embedding.weight], "weight_decay": args.weight_decay},
            {"params": [head.weight], "lr": head_lr, "weight_decay": args.weight_decay},
            {"params": [head.bias], "lr": head_lr, "weight_decay": 0.0},
        ],
        lr=args.lr,
    )
    steps_per_epoch = -(-len(train) // args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = int(-(-total_steps * args.warmup_ratio // 1))
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)

    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    model.train()
    step = 0
    trained = 0
    train_started = time.perf_counter()
    for _ in range(args.epochs):
        order = list(range(len(train)))
        random.shuffle(order)
        for input_ids, mask, labels in batches(train_ids, train_labels, order, args.batch_size, tokenizer):
            if step == total_steps:
                break
            with autocast():
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            trained += len(labels)
            if step % 25 == 0 or step == total_steps:
                print(f"step {step}/{total_steps}  loss {loss.item():.4f}", flush=True)

    train_seconds = time.perf_counter() - train_started
    model.eval()
    correct = 0
    order = sorted(range(len(dev)), key=lambda i: -len(dev_ids[i]))
    with torch.no_grad():
        for input_ids, mask, labels in batches(dev_ids, dev_labels, order, 64, tokenizer):
            with autocast():
                logits = model(input_ids=input_ids, attention_mask=mask).logits
            correct += (logits.argmax(-1) == labels).sum().item()
    seconds = time.perf_counter() - started
    print(f"hf peft prompt tuning ({args.pooling} pooling): dev accuracy {correct / len(dev):.4f} in {seconds:.1f}s "
          f"({total_steps} steps, {args.threads} threads, torch {torch.__version__}{', bf16 autocast' if args.bf16 else ''})")
    print(f"train examples/s {trained / train_seconds:.1f}")


if __name__ == "__main__":
    main()
