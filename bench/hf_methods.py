"""Hugging Face PEFT, method by method, with the settings of a ptune job spec,
to compare dev accuracy and training throughput with ptune's engine on the
same machine.

Usage (from the repository root, after `source scripts/env.sh`; bench/methods.sh
runs every method on both sides and picks the Python each method needs):
    python bench/hf_methods.py --spec examples/jobs/sst2-lora.toml [--mode accuracy]
        [--max-train-examples N] [--max-eval-examples N]
    python bench/hf_methods.py --spec examples/jobs/sst2-lora.toml --mode throughput
        [--steps 20] [--batch-size 32] [--seq-len 64] [--num-virtual-tokens 20] [--train-file FILE]
    python bench/hf_methods.py --spec examples/jobs/sst2-lora.toml --mode prepare --out DIR [...]

The spec's method becomes the equivalent PEFT model over
AutoModelForSequenceClassification (task SEQ_CLS, so PEFT trains the
`classifier` head through modules_to_save): prompt_tuning is PROMPT_TUNING
(init "vocab" is SAMPLE_VOCAB), p_tuning is P_TUNING (PromptEncoderConfig, MLP
or LSTM encoder), prefix_tuning is PREFIX_TUNING (with or without
prefix_projection), p_tuning_v2 is PREFIX_TUNING without projection plus
dropout on the prefixes (PEFT has none; see PrefixDropout), lora is LORA, and
full trains every weight of the model without PEFT. Optimisation follows
ptune's engine: AdamW (betas 0.9/0.999, eps 1e-8) with the `classifier`
parameters at training.head_learning_rate (learning_rate when absent), every
other trainable parameter at learning_rate, no weight decay on biases and
LayerNorm weights, a linear schedule with ceil(warmup_ratio * steps) warmup
steps, a seeded shuffle per epoch and the last batch of an epoch kept.

Modes:
  accuracy    trains with the spec's budget (max_train_examples, epochs or
              max_steps, batch_size, learning rates, warmup, seed), padding
              each batch to its longest example, and evaluates on the spec's
              eval file (max_eval_examples, 0: all). Seconds run from before
              the model loads to after the evaluation, the span `ptune-worker
              train` reports.
  throughput  times --steps optimizer steps, after 2 untimed warm-up steps, on
              batches of exactly --batch-size rows of exactly --seq-len tokens
              (truncated, and padded to max_length so every batch has the same
              shape; with the file `prepare` writes no row needs padding), with
              num_virtual_tokens set to --num-virtual-tokens for the prompt and
              prefix methods. A step is timed from taking its batch to reading
              its loss, as ptune's `examples_per_second` metric is.
  prepare     writes the inputs of ptune's side of the throughput run into
              --out: train-<seq-len>.jsonl, the first training texts joined
              in runs until each row reaches --seq-len tokens (its label is
              that of its first text), and <spec stem>-throughput.toml, the
              spec with those rows, batch_size, max_seq_len, num_virtual_tokens
              and a budget of exactly 2 + --steps full batches, no periodic
              evaluation and a small final one; and <spec stem>-accuracy.toml,
              the spec with absolute data paths and the --max-*-examples
              overrides.

accuracy and throughput print one JSON line on stdout (progress goes to
stderr) with the versions of torch, transformers and peft. Threads stay at
torch's default. Nothing is downloaded.
"""

import argparse
import json
import os
import random
import sys
import time
import tomllib
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from hf_prompt_tuning import read_jsonl

WARMUP_STEPS = 2
MIN_EVAL_BATCH_SIZE = 64  # as ptune's engine: evaluation batches are max(batch_size, 64)
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2")
PREFIX_METHODS = ("prefix_tuning", "p_tuning_v2")


def log(message):
    print(message, file=sys.stderr, flush=True)


def label_text(value):
    """A label as ptune matches it against data.labels: strings as they are,
    numbers and booleans in their JSON spelling."""
    return value if isinstance(value, str) else json.dumps(value)


def load_spec(path):
    path = Path(path)
    spec = tomllib.loads(path.read_text())
    spec.setdefault("peft", {})
    data = spec["data"]
    for key in ("train", "eval"):
        data[key] = str((path.parent / data[key]).resolve())
    data.setdefault("text_field", "text")
    data.setdefault("label_field", "label")
    data.setdefault("max_seq_len", 128)
    data.setdefault("max_train_examples", 0)
    data.setdefault("max_eval_examples", 0)
    t = spec["training"]
    t.setdefault("batch_size", 32)
    t.setdefault("epochs", 1.0)
    t.setdefault("max_steps", 0)
    t.setdefault("warmup_ratio", 0.0)
    t.setdefault("weight_decay", 0.0)
    t.setdefault("seed", 42)
    return spec


def bench_name(spec_path):
    stem = Path(spec_path).stem
    return stem[len("sst2-"):] if stem.startswith("sst2-") else stem


def examples(spec, path, limit):
    data = spec["data"]
    labels = [label_text(l) for l in data["labels"]]
    rows = read_jsonl(path, limit)
    return [r[data["text_field"]] for r in rows], [labels.index(label_text(r[data["label_field"]])) for r in rows]


class PrefixDropout:
    """P-tuning v2's dropout on the key/value prefixes in training, which
    PEFT's PREFIX_TUNING lacks: a forward hook on the prefix encoder, whose
    output is already expanded to the batch, so each example draws its own
    mask, as in ptune's engine."""

    def __init__(self, p):
        self.p = p

    def __call__(self, module, inputs, output):
        return torch.nn.functional.dropout(output, self.p, module.training)


def build_model(spec, model_dir):
    """The PEFT model of the spec (the plain model for method full) and notes
    on what differs from ptune's engine."""
    import peft

    method, settings = spec["method"], spec["peft"]
    num_labels = len(spec["data"]["labels"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels).float()
    hidden = model.config.hidden_size
    notes = []
    common = {"task_type": peft.TaskType.SEQ_CLS}
    if method in PROMPT_METHODS:
        common["num_virtual_tokens"] = settings.get("num_virtual_tokens", 20)
    if method == "prompt_tuning":
        init = settings.get("init", "random")
        config = peft.PromptTuningConfig(
            **common,
            prompt_tuning_init={"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[init],
            prompt_tuning_init_text=settings.get("init_text"),
            tokenizer_name_or_path=str(model_dir),
        )
    elif method == "p_tuning":
        kind = settings.get("encoder_reparameterization_type", "mlp").upper()
        extra = {}
        if kind == "LSTM":
            extra = {"encoder_num_layers": settings.get("encoder_num_layers", 2),
                     "encoder_dropout": settings.get("encoder_dropout", 0.0)}
        config = peft.PromptEncoderConfig(
            **common,
            encoder_reparameterization_type=kind,
            encoder_hidden_size=settings.get("encoder_hidden_size", hidden),
            **extra,
        )
    elif method == "prefix_tuning":
        projection = settings.get("prefix_projection", False)
        extra = {"encoder_hidden_size": settings.get("encoder_hidden_size", hidden)} if projection else {}
        config = peft.PrefixTuningConfig(**common, prefix_projection=projection, **extra)
    elif method == "p_tuning_v2":
        config = peft.PrefixTuningConfig(**common, prefix_projection=False)
    elif method == "lora":
        config = peft.LoraConfig(
            **common,
            r=settings.get("r", 8),
            lora_alpha=settings.get("lora_alpha", 8),
            lora_dropout=settings.get("lora_dropout", 0.0),
            target_modules=settings.get("target_modules", ["query", "value"]),
        )
    elif method == "full":
        return model, notes
    else:
        raise SystemExit(f"unknown method {method!r}")
    model = peft.get_peft_model(model, config)
    prefix_dropout = settings.get("prefix_dropout", 0.0) if method == "p_tuning_v2" else 0.0
    if prefix_dropout > 0:
        model.prompt_encoder["default"].register_forward_hook(PrefixDropout(prefix_dropout))
        notes.append(f"prefix_dropout {prefix_dropout} added as a forward hook on PEFT's prefix encoder")
    return model, notes


def optimizer_for(model, spec):
    """AdamW as ptune's engine builds it: `classifier` parameters at the head
    rate, the rest at the main rate; no decay on biases and LayerNorm weights."""
    t = spec["training"]
    head_lr = t.get("head_learning_rate", t["learning_rate"])
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = head_lr if "classifier" in name.split(".") else t["learning_rate"]
        decay = 0.0 if name.endswith("bias") or "LayerNorm" in name else t["weight_decay"]
        groups.setdefault((lr, decay), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()],
        lr=t["learning_rate"],
    )


def schedule_for(optimizer, spec, total_steps):
    warmup = int(-(-total_steps * spec["training"]["warmup_ratio"] // 1))
    return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def versions():
    import peft

    return {
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def padded(tokenizer, ids, labels, indices, **pad):
    batch = tokenizer.pad([{"input_ids": ids[i]} for i in indices], return_tensors="pt", **pad)
    return batch["input_ids"], batch["attention_mask"], torch.tensor([labels[i] for i in indices])


def accuracy_run(args, spec, model_dir):
    data, t = spec["data"], spec["training"]
    max_train = args.max_train_examples if args.max_train_examples is not None else data["max_train_examples"]
    max_eval = args.max_eval_examples if args.max_eval_examples is not None else data["max_eval_examples"]
    started = time.perf_counter()
    random.seed(t["seed"])
    torch.manual_seed(t["seed"])

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_texts, train_labels = examples(spec, args.train_file or data["train"], max_train)
    dev_texts, dev_labels = examples(spec, data["eval"], max_eval)
    encode = lambda texts: tokenizer(texts, truncation=True, max_length=data["max_seq_len"])["input_ids"]
    train_ids, dev_ids = encode(train_texts), encode(dev_texts)

    model, notes = build_model(spec, model_dir)
    optimizer = optimizer_for(model, spec)
    batch_size = t["batch_size"]
    per_epoch = -(-len(train_ids) // batch_size)
    total_steps = t["max_steps"] or max(1, int(-(-per_epoch * t["epochs"] // 1)))
    schedule = schedule_for(optimizer, spec, total_steps)

    # Batches as ptune's EpochBatches draws them: a new seeded shuffle each
    # epoch, the last batch of an epoch possibly smaller.
    order_rng = random.Random(t["seed"])
    order, cursor = [], 0
    model.train()
    for step in range(1, total_steps + 1):
        if cursor >= len(order):
            order, cursor = list(range(len(train_ids))), 0
            order_rng.shuffle(order)
        chunk, cursor = order[cursor : cursor + batch_size], cursor + batch_size
        input_ids, mask, labels = padded(tokenizer, train_ids, train_labels, chunk)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 25 == 0 or step == total_steps:
            log(f"step {step}/{total_steps}  loss {loss.item():.4f}")

    model.eval()
    correct = 0
    dev_order = sorted(range(len(dev_ids)), key=lambda i: -len(dev_ids[i]))
    eval_batch = max(batch_size, MIN_EVAL_BATCH_SIZE)
    with torch.no_grad():
        for start in range(0, len(dev_order), eval_batch):
            input_ids, mask, labels = padded(tokenizer, dev_ids, dev_labels, dev_order[start : start + eval_batch])
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            correct += (logits.argmax(-1) == labels).sum().item()
    seconds = time.perf_counter() - started
    return {
        "method": bench_name(args.spec),
        "mode": "accuracy",
        "accuracy": round(correct / len(dev_ids), 4),
        "seconds": round(seconds, 1),
        "train_examples": len(train_ids),
        "eval_examples": len(dev_ids),
        "steps": total_steps,
        **versions(),
        "notes": notes,
    }


def throughput_spec(spec, args):
    """The spec as the throughput run trains it (both sides)."""
    spec["data"]["max_seq_len"] = args.seq_len
    spec["training"]["batch_size"] = args.batch_size
    if spec["method"] in PROMPT_METHODS:
        spec["peft"]["num_virtual_tokens"] = args.num_virtual_tokens
    return spec


def throughput_run(args, spec, model_dir):
    spec = throughput_spec(spec, args)
    t = spec["training"]
    random.seed(t["seed"])
    torch.manual_seed(t["seed"])
    total_steps = WARMUP_STEPS + args.steps
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts, labels = examples(spec, args.train_file or spec["data"]["train"], total_steps * args.batch_size)
    if len(texts) < total_steps * args.batch_size:
        raise SystemExit(f"{total_steps * args.batch_size} training rows needed, {len(texts)} found")
    # Every batch [batch_size, seq_len]: truncated, and padded to max_length
    # when a row is shorter (none is in the file `prepare` writes).
    encoded = tokenizer(texts, truncation=True, max_length=args.seq_len, padding="max_length", return_tensors="pt")
    ids, mask, labels = encoded["input_ids"], encoded["attention_mask"], torch.tensor(labels)
    padding = 1.0 - mask.float().mean().item()

    model, notes = build_model(spec, model_dir)
    device = torch.device(args.device)
    model = model.to(device)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    optimizer = optimizer_for(model, spec)
    schedule = schedule_for(optimizer, spec, total_steps)
    model.train()
    timed = 0.0
    for step in range(total_steps):
        started = time.perf_counter()
        rows = slice(step * args.batch_size, (step + 1) * args.batch_size)
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        loss = loss.item()
        seconds = time.perf_counter() - started
        log(f"step {step + 1}/{total_steps}  loss {loss:.4f}  {args.batch_size / seconds:.1f} examples/s")
        if step >= WARMUP_STEPS:
            timed += seconds
    return {
        "method": bench_name(args.spec),
        "mode": "throughput",
        "examples_per_second": round(args.steps * args.batch_size / timed, 2),
        "steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "num_virtual_tokens": spec["peft"].get("num_virtual_tokens") if spec["method"] in PROMPT_METHODS else None,
        "padding_fraction": round(padding, 4),
        "device": args.device,
        **versions(),
        "notes": notes,
    }


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_toml(path, spec):
    lines = [f"{k} = {toml_value(v)}" for k, v in spec.items() if not isinstance(v, dict)]
    for table, values in spec.items():
        if isinstance(values, dict) and values:
            lines += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    Path(path).write_text("\n".join(lines) + "\n")


def prepare(args, spec, model_dir):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.spec).stem

    accuracy = json.loads(json.dumps(spec))
    if args.max_train_examples is not None:
        accuracy["data"]["max_train_examples"] = args.max_train_examples
    if args.max_eval_examples is not None:
        accuracy["data"]["max_eval_examples"] = args.max_eval_examples
    write_toml(out / f"{stem}-accuracy.toml", accuracy)

    # Rows of at least seq_len tokens (special tokens included), so that the
    # engine, which pads each batch to its longest row, sees the same
    # [batch_size, seq_len] batches as the throughput mode here.
    rows_needed = (WARMUP_STEPS + args.steps) * args.batch_size
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    field, label_field = spec["data"]["text_field"], spec["data"]["label_field"]
    long_rows, parts, label = [], [], None
    with open(args.train_file or spec["data"]["train"]) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if not parts:
                label = row[label_field]
            parts.append(row[field])
            text = " ".join(parts)
            if len(tokenizer(text)["input_ids"]) >= args.seq_len:
                long_rows.append({field: text, label_field: label})
                parts = []
                if len(long_rows) == rows_needed:
                    break
    if len(long_rows) < rows_needed:
        raise SystemExit(f"only {len(long_rows)} rows of {args.seq_len} tokens could be made")
    train_file = out / f"train-{args.seq_len}.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in long_rows))

    throughput = throughput_spec(json.loads(json.dumps(spec)), args)
    throughput["name"] = f"{spec['name']}-throughput"
    throughput["data"].update(train=str(train_file.resolve()), max_train_examples=rows_needed,
                              max_eval_examples=args.batch_size)
    t = throughput["training"]
    t.update(epochs=1, max_steps=0, eval_every=0)
    write_toml(out / f"{stem}-throughput.toml", throughput)
    log(f"wrote {train_file}, {out / f'{stem}-accuracy.toml'} and {out / f'{stem}-throughput.toml'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="ptune job spec (TOML)")
    parser.add_argument("--mode", choices=["accuracy", "throughput", "prepare"], default="accuracy")
    parser.add_argument("--model", default=os.environ.get("PTUNE_MINILM_DIR"))
    parser.add_argument("--train-file", help="training JSONL instead of the spec's data.train")
    parser.add_argument("--max-train-examples", type=int, help="accuracy: overrides data.max_train_examples")
    parser.add_argument("--max-eval-examples", type=int, help="accuracy: overrides data.max_eval_examples")
    parser.add_argument("--steps", type=int, default=20, help="throughput: timed steps")
    parser.add_argument("--batch-size", type=int, default=32, help="throughput")
    parser.add_argument("--seq-len", type=int, default=64, help="throughput")
    parser.add_argument("--num-virtual-tokens", type=int, default=20, help="throughput, prompt and prefix methods")
    parser.add_argument("--out", help="prepare: output folder")
    parser.add_argument("--device", default="cpu", help="throughput: torch device, cpu or cuda:N")
    args = parser.parse_args()
    if not args.model:
        parser.error("set PTUNE_MINILM_DIR or pass --model")
    if args.mode == "prepare" and not args.out:
        parser.error("--mode prepare needs --out")
    spec = load_spec(args.spec)
    if args.mode == "prepare":
        return prepare(args, spec, args.model)
    run = accuracy_run if args.mode == "accuracy" else throughput_run
    print(json.dumps(run(args, spec, args.model)), flush=True)


if __name__ == "__main__":
    main()
