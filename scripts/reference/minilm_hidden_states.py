"""Writes worker/tests/fixtures/minilm_hidden_states.json: reference outputs of
Hugging Face transformers (and PEFT prompt tuning) on all-MiniLM-L6-v2, which
worker/tests/engine_parity.rs compares the Rust engine against.

Usage (from the repository root, after `source scripts/env.sh`):
    python scripts/reference/minilm_hidden_states.py [--model DIR] [--out FILE]

The model folder defaults to $PTUNE_MINILM_DIR. Nothing is downloaded.
"""

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import peft
import torch
import transformers
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

SENTENCES = [
    "a gripping, moving film.",
    "the plot is thin and the jokes fall flat.",
    "an uneven but often charming portrait of two sisters growing up in paris.",
]
TRUNCATION_TEXT = "this sentence is long enough to be cut by a short maximum length"
TRUNCATION_MAX_LENGTH = 8
PROMPT_TOKENS = 5
PROMPT_LABELS = 3
PROMPT_BATCH_LABELS = [2, 0, 1]
OPTIM = {"lr": 3e-2, "head_lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 2, "steps": 8}
SEED = 1234


def rounded(tensor):
    """Nested lists of floats with 7 significant digits (keeps the file small)."""

    def walk(x):
        return [walk(v) for v in x] if isinstance(x, list) else float(f"{x:.7g}")

    return walk(tensor.detach().tolist())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parents[2]
    parser.add_argument("--model", default=os.environ.get("PTUNE_MINILM_DIR"))
    parser.add_argument("--out", default=root / "worker/tests/fixtures/minilm_hidden_states.json")
    args = parser.parse_args()
    if not args.model:
        parser.error("set PTUNE_MINILM_DIR or pass --model")

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()

    encoder = AutoModel.from_pretrained(args.model).eval()
    with torch.no_grad():
        out = encoder(**batch)
    hidden = [out.last_hidden_state[i, :n] for i, n in enumerate(lengths)]

    truncated = tokenizer(TRUNCATION_TEXT, truncation=True, max_length=TRUNCATION_MAX_LENGTH)["input_ids"]

    # A prompt-tuned classifier as PEFT builds it, with a random prompt and a
    # random (non-zero bias) head, evaluated in eval mode.
    classifier = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=PROMPT_LABELS)
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_CLS,
        num_virtual_tokens=PROMPT_TOKENS,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )
    model = get_peft_model(classifier, config).eval()
    head = model.base_model.classifier.modules_to_save["default"]
    with torch.no_grad():
        head.bias.normal_(0, 0.1)
    labels = torch.tensor(PROMPT_BATCH_LABELS)
    output = model(**batch, labels=labels)
    output.loss.backward()
    logits = output.logits
    prompt = model.prompt_encoder["default"].embedding.weight
    reference = {
        "prompt_embeddings": rounded(prompt),
        "classifier_weight": rounded(head.weight),
        "classifier_bias": rounded(head.bias),
        "logits": rounded(logits),
        # Mean cross-entropy against `labels` in eval mode, and its gradients.
        "labels": PROMPT_BATCH_LABELS,
        "loss": output.loss.item(),
        "prompt_embeddings_grad": rounded(prompt.grad),
        "classifier_weight_grad": rounded(head.weight.grad),
        "classifier_bias_grad": rounded(head.bias.grad),
    }

    # Eight AdamW steps from those weights on the same batch, without dropout:
    # two warmup steps, then linear decay; head with its own rate, bias
    # without weight decay (the groups the engine uses).
    optimizer = torch.optim.AdamW(
        [
            {"params": [prompt], "lr": OPTIM["lr"], "weight_decay": OPTIM["weight_decay"]},
            {"params": [head.weight], "lr": OPTIM["head_lr"], "weight_decay": OPTIM["weight_decay"]},
            {"params": [head.bias], "lr": OPTIM["head_lr"], "weight_decay": 0.0},
        ]
    )
    schedule = get_linear_schedule_with_warmup(optimizer, OPTIM["warmup_steps"], OPTIM["steps"])
    optimizer.zero_grad()
    losses = []
    for _ in range(OPTIM["steps"]):
        loss = model(**batch, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()

    weights = Path(args.model) / "model.safetensors"
    with safe_open(weights, "pt") as f:
        floats = [k for k in f.keys() if f.get_slice(k).get_dtype().startswith(("F", "BF"))]
        parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in floats)

    fixture = {
        "generator": "scripts/reference/minilm_hidden_states.py",
        "model_info": {"parameters": parameters, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "sentences": SENTENCES,
        "input_ids": batch["input_ids"].tolist(),
        "attention_mask": batch["attention_mask"].tolist(),
        "last_hidden_state": [rounded(h) for h in hidden],
        "pooler_output": rounded(out.pooler_output),
        "truncation": {"text": TRUNCATION_TEXT, "max_length": TRUNCATION_MAX_LENGTH, "input_ids": truncated},
        "prompt_tuning": {
            "num_virtual_tokens": PROMPT_TOKENS,
            "num_labels": PROMPT_LABELS,
            **reference,
            "training": {**OPTIM, "losses": losses},
        },
    }
    Path(args.out).write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
