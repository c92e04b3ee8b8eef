"""Loads a causal-LM adapter exported by ptune with PEFT (or a full fine-tuning
export with transformers alone) and prints its logits.

Usage (from the repository root, after `source scripts/env.sh`):
    python scripts/reference/lm_export_check.py --model MODEL_DIR --inputs INPUTS.json EXPORT_DIR

INPUTS.json holds `input_ids` and `attention_mask` ([batch, seq] lists). An
adapter export is loaded with `PeftModel.from_pretrained` over
`AutoModelForCausalLM.from_pretrained(MODEL_DIR)`, a model folder (no
`adapter_config.json`) with `AutoModelForCausalLM.from_pretrained(EXPORT_DIR)`,
in eval mode, in float32 on the CPU; stdout gets `{"logits": [batch][positions][vocab], "versions": {...}}`
(prompt methods return the prompt's positions too, as PEFT does).
"""

import argparse
import json
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="base model folder")
    parser.add_argument("--inputs", required=True, help="json with input_ids and attention_mask")
    parser.add_argument("export", help="PEFT export folder")
    args = parser.parse_args()

    inputs = json.loads(Path(args.inputs).read_text())
    ids = torch.tensor(inputs["input_ids"])
    mask = torch.tensor(inputs["attention_mask"])
    if (Path(args.export) / "adapter_config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, args.export).eval()
    else:
        # A full fine-tuning export is a model folder of its own.
        model = AutoModelForCausalLM.from_pretrained(args.export, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    print(json.dumps({"logits": logits.tolist(), "versions": versions}))


if __name__ == "__main__":
    main()
