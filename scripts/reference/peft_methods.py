"""Reference adapters for every PEFT method ptune trains, built with Hugging
Face PEFT on the tiny random BERT classifier in worker/tests/fixtures/tiny-bert/
(made by scripts/reference/tiny_bert.py) or, with `--arch roberta`, the tiny
RoBERTa classifier in worker/tests/fixtures/tiny-roberta/ (made by
scripts/reference/tiny_roberta.py), and a loader that checks ptune's exports
with `PeftModel.from_pretrained`.

`generate` writes worker/tests/fixtures/peft-methods/ (peft-methods-roberta/
for RoBERTa): one folder per case
with PEFT's own `save_pretrained` output (adapter_config.json,
adapter_model.safetensors) and, for methods with trainable weights PEFT does
not save (P-tuning encoders, the prefix projection) or to check gradients,
`trainable.safetensors` with every trainable tensor under the engine's
variable names; and reference.json with the inputs, each case's logits (eval
mode), loss, and gradients of the trainable tensors. worker/tests/engine_methods.rs
loads every adapter into the engine and compares.

Versions. Prompt tuning, P-tuning (MLP and LSTM encoders), LoRA and the full
model use the project's .venv (torch 2.13.0, transformers 5.24.0, peft 0.21.2).
BERT (and RoBERTa) do not take PEFT's key/value prefixes in transformers 5.x, so prefix
tuning (with and without the projection) and P-tuning v2 (prefix tuning
without projection, as PEFT exports it) are made with transformers 4.46.3 and
peft 0.12.0 (0.13.2 cannot build SEQ_CLS models: its add_adapter rejects
low_cpu_mem_usage) in a separate environment, .venv-ref4 (ignored by git; it
reuses .venv's torch and the other dependencies through a .pth file, so pip
installs with --no-deps and never touches .venv):

    python3 -m venv .venv-ref4
    .venv-ref4/bin/pip install --no-deps transformers==4.46.3 peft==0.12.0 tokenizers==0.20.3 \
        huggingface-hub==0.26.5 requests urllib3 charset-normalizer certifi
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-ref4/lib/python3.11/site-packages/zz-main-venv.pth

The exact versions used are recorded per case in reference.json.

Usage (from the repository root, after `source scripts/env.sh`):
    python scripts/reference/peft_methods.py generate
    python scripts/reference/peft_methods.py --arch roberta generate
    python scripts/reference/peft_methods.py check --model DIR --inputs INPUTS.json EXPORT_DIR
`check` prints `{"logits": [[...], ...]}` for the ids and masks in INPUTS.json
(keys input_ids, attention_mask): a PEFT adapter folder is loaded with
`PeftModel.from_pretrained` over `AutoModelForSequenceClassification` of
--model; a folder with config.json (a full fine-tuning export) is loaded as a
model by itself.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
# --arch -> (tiny model, fixture folder, padding id)
ARCHES = {
    "bert": (ROOT / "worker/tests/fixtures/tiny-bert", ROOT / "worker/tests/fixtures/peft-methods", 0),
    "roberta": (ROOT / "worker/tests/fixtures/tiny-roberta", ROOT / "worker/tests/fixtures/peft-methods-roberta", 1),
}
TINY, OUT, PAD_ID = ARCHES["bert"]
REF4_PYTHON = ROOT / ".venv-ref4/bin/python"
SEED = 11
SENTENCES = [
    "the film was very good",
    "a dull plot and bad acting",
    "it is not fun",
    "great fun but the acting was awful and very dull",
]
LABELS = [1, 0, 0, 1]

# name -> (ptune method, ptune [peft] settings, PEFT config, made with transformers 4.x)
CASES = {
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 4}, ("PromptTuningConfig", {"num_virtual_tokens": 4}), False),
    "p_tuning_mlp": (
        "p_tuning",
        {"num_virtual_tokens": 5, "encoder_reparameterization_type": "mlp", "encoder_hidden_size": 24},
        ("PromptEncoderConfig", {"num_virtual_tokens": 5, "encoder_reparameterization_type": "MLP", "encoder_hidden_size": 24}),
        False,
    ),
    "p_tuning_lstm": (
        "p_tuning",
        {"num_virtual_tokens": 4, "encoder_reparameterization_type": "lstm", "encoder_hidden_size": 12},
        ("PromptEncoderConfig", {"num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 12}),
        False,
    ),
    "lora": (
        "lora",
        {"r": 4, "lora_alpha": 8},
        ("LoraConfig", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}),
        False,
    ),
    "lora_all_linears": (
        "lora",
        {"r": 2, "lora_alpha": 6, "target_modules": ["query", "key", "value", "output.dense", "intermediate.dense"]},
        ("LoraConfig", {"r": 2, "lora_alpha": 6, "target_modules": ["query", "key", "value", "output.dense", "intermediate.dense"]}),
        False,
    ),
    "prefix_tuning": ("prefix_tuning", {"num_virtual_tokens": 3}, ("PrefixTuningConfig", {"num_virtual_tokens": 3}), True),
    "prefix_projection": (
        "prefix_tuning",
        {"num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 16},
        ("PrefixTuningConfig", {"num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 16}),
        True,
    ),
    "p_tuning_v2": ("p_tuning_v2", {"num_virtual_tokens": 6}, ("PrefixTuningConfig", {"num_virtual_tokens": 6}), True),
}


def versions():
    import peft

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def batch(tokenizer_path, sentences):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    encodings = [tokenizer.encode(s).ids for s in sentences]
    longest = max(len(e) for e in encodings)
    ids = [e + [PAD_ID] * (longest - len(e)) for e in encodings]
    mask = [[1] * len(e) + [0] * (longest - len(e)) for e in encodings]
    return torch.tensor(ids), torch.tensor(mask)


def engine_name(method, peft_name):
    """The engine's variable name of a trainable PEFT parameter."""
    name = peft_name.replace(".default.", ".").replace(".modules_to_save.", ".")
    if name.endswith(".default"):
        name = name[: -len(".default")]
    for head in ("base_model.model.classifier.", "base_model.classifier."):
        if name.startswith(head):
            return "classifier." + name[len(head):]
    if method == "prompt_tuning" and name == "prompt_encoder.embedding.weight":
        return "prompt_embeddings"
    return name


def generate_case(name):
    import peft
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    method, settings, (config_class, config_kwargs), _ = CASES[name]
    ids, mask = batch(TINY / "tokenizer.json", SENTENCES)
    labels = torch.tensor(LABELS)
    torch.manual_seed(SEED)
    base = AutoModelForSequenceClassification.from_pretrained(TINY)
    config = getattr(peft, config_class)(task_type="SEQ_CLS", **config_kwargs)
    model = get_peft_model(base, config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # LoRA's B and the head start at zero or near it: make every update visible
        for n, p in trainable.items():
            if "lora_B" in n or "classifier" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    model.eval()
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()

    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].base_model_name_or_path = TINY.name
    model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)
    save_file({engine_name(method, n): p.detach().contiguous() for n, p in trainable.items()}, folder / "trainable.safetensors")

    # The saved adapter, loaded the way users load it, gives the same logits.
    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(TINY), folder).eval()
    with torch.no_grad():
        reloaded = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(reloaded, logits, atol=1e-5), f"{name}: the saved adapter gives other logits"

    return {
        "method": method,
        "peft": settings,
        "versions": versions(),
        "logits": logits.tolist(),
        "loss": loss.item(),
        "grads": {engine_name(method, n): p.grad.flatten().tolist() for n, p in trainable.items()},
    }


def full_case():
    """The tiny checkpoint itself as a sequence classifier: what full fine-tuning starts from."""
    from transformers import AutoModelForSequenceClassification

    ids, mask = batch(TINY / "tokenizer.json", SENTENCES)
    model = AutoModelForSequenceClassification.from_pretrained(TINY).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return {"method": "full", "peft": {}, "versions": versions(), "logits": logits.tolist()}


def generate(args):
    if args.cases:
        cases = {name: generate_case(name) for name in args.cases.split(",")}
        Path(args.json_out).write_text(json.dumps(cases))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    main_cases = [n for n, c in CASES.items() if not c[3]]
    ref4_cases = [n for n, c in CASES.items() if c[3]]
    cases = {name: generate_case(name) for name in main_cases}
    cases["full"] = full_case()
    if not REF4_PYTHON.exists():
        sys.exit(f"{REF4_PYTHON} not found; see this script's docstring for the environment prefix tuning needs")
    partial = OUT / "ref4.partial.json"
    subprocess.run(
        [str(REF4_PYTHON), __file__, "--arch", args.arch, "generate", "--cases", ",".join(ref4_cases),
         "--json-out", str(partial)],
        check=True,
    )
    cases.update(json.loads(partial.read_text()))
    partial.unlink()
    ids, mask = batch(TINY / "tokenizer.json", SENTENCES)
    reference = {
        "generator": "scripts/reference/peft_methods.py",
        "model": str(TINY.relative_to(ROOT)),
        "sentences": SENTENCES,
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "labels": LABELS,
        "cases": cases,
    }
    (OUT / "reference.json").write_text(json.dumps(reference) + "\n")
    print(f"wrote {len(cases)} cases into {OUT}")


def check(args):
    from transformers import AutoModelForSequenceClassification

    inputs = json.loads(Path(args.inputs).read_text())
    ids = torch.tensor(inputs["input_ids"])
    mask = torch.tensor(inputs["attention_mask"])
    export = Path(args.export)
    if (export / "adapter_config.json").exists():
        from peft import PeftModel

        num_labels = len(json.loads((export / "ptune.json").read_text())["spec"]["data"]["labels"])
        base = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels)
        model = PeftModel.from_pretrained(base, export)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(export)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    print(json.dumps({"logits": logits.tolist(), "versions": versions()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHES), default="bert", help="the tiny model: BERT or RoBERTa")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write the fixture")
    gen.add_argument("--cases", help=argparse.SUPPRESS)
    gen.add_argument("--json-out", help=argparse.SUPPRESS)
    chk = commands.add_parser("check", help="print the logits of an export loaded with PEFT or transformers")
    chk.add_argument("--model", help="base model folder of an adapter export (default: the tiny model of --arch)")
    chk.add_argument("--inputs", required=True, help="json with input_ids and attention_mask")
    chk.add_argument("export", help="export folder")
    args = parser.parse_args()
    global TINY, OUT, PAD_ID
    TINY, OUT, PAD_ID = ARCHES[args.arch]
    if args.command == "check" and args.model is None:
        args.model = str(TINY)
    generate(args) if args.command == "generate" else check(args)


if __name__ == "__main__":
    main()
