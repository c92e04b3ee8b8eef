"""Writes a randomly initialised Llama-shaped decoder for speed benchmarks.

No pretrained decoder is available offline, and a step's time depends on
the model's shape, not on its weights: this writes `LlamaForCausalLM` with
the given shape (float32 safetensors, as transformers saves it) and a
byte-level BPE tokenizer trained on the E2E training sources and targets,
so that examples have realistic token lengths. Accuracy figures from such a
model mean nothing; only throughput and memory do.

Usage (from the repository root, after `source scripts/env.sh`):
    python bench/random_decoder.py OUT_DIR [--hidden 512] [--layers 8] [--heads 8]
        [--kv-heads 4] [--intermediate 1376] [--vocab 32000]
"""

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

SPECIALS = ["<unk>", "<s>", "</s>"]


def e2e_texts(path):
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            yield row["source"]
            yield row["target"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokenizer-vocab", type=int, default=8000)
    parser.add_argument("--e2e", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/e2e/train.jsonl")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.tokenizer_vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(e2e_texts(args.e2e), trainer)
    tokenizer.save(str(args.out / "tokenizer.json"))

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=SPECIALS.index("<s>"), eos_token_id=SPECIALS.index("</s>"), pad_token_id=SPECIALS.index("</s>"),
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(args.out, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {params / 1e6:.1f}M parameters, tokenizer of {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
