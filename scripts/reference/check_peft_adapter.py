"""Loads a ptune export with Hugging Face PEFT and checks it on a JSONL file.

Usage (from the repository root, after `source scripts/env.sh`):
    python scripts/reference/check_peft_adapter.py --adapter OUT/adapter \
        --data ../shared/data/sst2/dev.jsonl [--predictions OUT/eval_predictions.jsonl]

Builds `AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=N)`,
loads the adapter with `PeftModel.from_pretrained`, predicts every example
(eval mode) and prints the accuracy. With `--predictions` (the file
`ptune-worker train` writes beside the adapter) it also prints how often PEFT
and the ptune engine predict the same label. The labels, text field and
truncation come from the adapter's ptune.json. Exits 1 if agreement is below
--min-agreement. Nothing is downloaded.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def label_text(value):
    """How ptune matches a JSON label to data.labels: strings as they are, numbers and booleans as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="folder with adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--data", required=True, help="JSONL file to predict")
    parser.add_argument("--predictions", help="eval_predictions.jsonl written by ptune-worker train")
    parser.add_argument("--model", default=os.environ.get("PTUNE_MINILM_DIR"), help="base model folder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--min-agreement", type=float, default=0.0)
    args = parser.parse_args()
    if not args.model:
        parser.error("set PTUNE_MINILM_DIR or pass --model")

    spec = json.loads((Path(args.adapter) / "ptune.json").read_text())["spec"]
    data = spec["data"]
    labels = data["labels"]
    rows = [json.loads(line) for line in open(args.data) if line.strip()]
    if data.get("max_eval_examples"):
        rows = rows[: data["max_eval_examples"]]
    texts = [row[data["text_field"]] for row in rows]
    gold = [labels.index(label_text(row[data["label_field"]])) for row in rows]

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(labels))
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(texts), args.batch_size):
            batch = tokenizer(
                texts[start : start + args.batch_size],
                truncation=True,
                max_length=data["max_seq_len"],
                padding=True,
                return_tensors="pt",
            )
            predictions += model(**batch).logits.argmax(-1).tolist()

    accuracy = sum(p == g for p, g in zip(predictions, gold)) / len(gold)
    print(f"peft: {len(gold)} examples, accuracy {accuracy:.4f}")
    if args.predictions:
        ours = [json.loads(line) for line in open(args.predictions) if line.strip()]
        ours = [labels.index(p["prediction"]) for p in sorted(ours, key=lambda p: p["index"])]
        if len(ours) != len(predictions):
            sys.exit(f"{args.predictions} has {len(ours)} predictions for {len(predictions)} examples")
        same = sum(a == b for a, b in zip(ours, predictions))
        ours_accuracy = sum(p == g for p, g in zip(ours, gold)) / len(gold)
        print(f"ptune: accuracy {ours_accuracy:.4f}; agreement with peft {same}/{len(ours)} = {same / len(ours):.2%}")
        if same / len(ours) < args.min_agreement:
            sys.exit(1)


if __name__ == "__main__":
    main()
