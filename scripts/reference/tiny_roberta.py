"""Writes a tiny random RoBERTa checkpoint as `RobertaForSequenceClassification`
saves it (weights under `roberta.`, plus its classification head with a dense
layer and an output projection, and no pooler) into
worker/tests/fixtures/tiny-roberta/, with a small byte-level BPE tokenizer
(RoBERTa's special tokens: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4).
Position ids start at pad_token_id + 1, as in every RoBERTa checkpoint.
scripts/reference/peft_methods.py --arch roberta builds the PEFT references
on it; worker/tests/engine_methods.rs checks the engine against them.

Usage (from the repository root, after `source scripts/env.sh`):
    python scripts/reference/tiny_roberta.py
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import RobertaConfig, RobertaForSequenceClassification

from tiny_bert import save_with_nontrivial_biases

SEED = 5
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
CORPUS = [
    "the film was very good",
    "a dull plot and bad acting",
    "it is not fun",
    "great fun but the acting was awful and very dull",
    "the movie is a great film",
    "not a good plot",
]


def build_tokenizer():
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return tokenizer


def main():
    folder = Path(__file__).resolve().parents[2] / "worker/tests/fixtures/tiny-roberta"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    assert [tokenizer.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    tokenizer.save(str(folder / "tokenizer.json"))

    config = RobertaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        hidden_act="gelu",
        # RoBERTa's table holds pad_token_id + 1 unused rows before the first position.
        max_position_embeddings=42,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=2,
    )
    model = RobertaForSequenceClassification(config).eval()
    save_with_nontrivial_biases(model, folder)
    print(f"wrote {folder} ({config.vocab_size} tokens)")


if __name__ == "__main__":
    main()
