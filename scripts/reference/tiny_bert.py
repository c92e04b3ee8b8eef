"""Writes a tiny random BERT checkpoint as `BertForSequenceClassification`
saves it (weights under `bert.`, plus a classifier) into
worker/tests/fixtures/tiny-bert/, with a small WordPiece tokenizer, and its
transformers outputs into worker/tests/fixtures/tiny_bert_outputs.json.
worker/tests/engine_parity.rs checks that the engine loads such checkpoints
and computes the same hidden states, with dimensions unlike MiniLM's.

Usage (from the repository root, after `source scripts/env.sh`):
    python scripts/reference/tiny_bert.py
"""

import hashlib
import json
import math
from pathlib import Path

import tokenizers
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification

SEED = 7
WORDS = "the a film movie is was good bad great awful plot acting fun dull not very and but it".split()
SENTENCES = ["the film was very good", "a dull plot and bad acting", "it is not fun"]


def build_tokenizer():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + WORDS + ["##s", "##ly"])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    # Like MiniLM's tokenizer.json: a fixed padding the engine must switch off.
    tokenizer.enable_padding(length=16, pad_id=vocab["[PAD]"], pad_token="[PAD]")
    return tokenizer, len(vocab)


def save_with_nontrivial_biases(model, folder):
    """Shifts every bias and norm weight by noise (they start at 0 and 1), then
    saves the model as safetensors into `folder`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)


def main():
    root = Path(__file__).resolve().parents[2] / "worker/tests/fixtures"
    folder = root / "tiny-bert"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokenizer, vocab_size = build_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        hidden_act="gelu_new",
        max_position_embeddings=40,
        layer_norm_eps=1e-7,
        num_labels=2,
    )
    model = BertForSequenceClassification(config).eval()
    save_with_nontrivial_biases(model, folder)

    unpadded = tokenizer.encode_batch(SENTENCES)
    longest = max(sum(e.attention_mask) for e in unpadded)
    ids = torch.tensor([e.ids[:longest] for e in unpadded])
    mask = torch.tensor([e.attention_mask[:longest] for e in unpadded])
    with torch.no_grad():
        out = model.bert(input_ids=ids, attention_mask=mask)
    lengths = mask.sum(1).tolist()
    weights = folder / "model.safetensors"
    with safe_open(weights, "pt") as f:
        parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    outputs = {
        "generator": "scripts/reference/tiny_bert.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "sentences": SENTENCES,
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "last_hidden_state": [out.last_hidden_state[i, :n].tolist() for i, n in enumerate(lengths)],
        "pooler_output": out.pooler_output.tolist(),
        "parameters": parameters,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (root / "tiny_bert_outputs.json").write_text(json.dumps(outputs) + "\n")
    print(f"wrote {folder} and {root / 'tiny_bert_outputs.json'}")


if __name__ == "__main__":
    main()
