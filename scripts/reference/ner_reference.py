"""Writes the token-classification fixtures that worker/src/engine/data/ner.rs
and worker/src/engine/tasks/token_classification/ are tested against:

- worker/tests/fixtures/ner_scores.json: seqeval's entity extraction and its
  default-mode (conlleval) precision, recall, F1 and accuracy on hand-made tag
  sequences, including the edge cases (an I- tag that starts an entity, a type
  change inside an entity, entities at the end of a sentence, sentence
  boundaries, IOBES tags, no entities at all);
- worker/tests/fixtures/ner_alignment.json: all-MiniLM-L6-v2 tokenization of
  pre-split WNUT-17 sentences (transformers, `is_split_into_words=True`) and
  the labels of the Hugging Face token-classification recipe (run_ner.py with
  label_all_tokens=False): the tag at the first sub-token of each word, -100
  at every other sub-token and at special tokens.

Usage (from the repository root, after `source scripts/env.sh`; needs
`pip install seqeval` in .venv, which only this script uses):
    python scripts/reference/ner_reference.py [--model DIR] [--data DIR]

The model folder defaults to $PTUNE_MINILM_DIR, the data folder to
../shared/data/ner beside the checkout. Nothing is downloaded.
"""

import argparse
import importlib.metadata
import json
import os
import warnings
from pathlib import Path

import tokenizers
import transformers
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities
from transformers import AutoTokenizer

# Hand-made (truth, prediction) pairs; each is a list of sentences.
SCORE_CASES = {
    "exact_match": (
        [["B-person", "I-person", "O", "B-location"]],
        [["B-person", "I-person", "O", "B-location"]],
    ),
    "i_after_o_starts_an_entity": (
        [["O", "B-person", "I-person", "O"]],
        [["O", "I-person", "I-person", "O"]],
    ),
    "i_at_sentence_start": (
        [["I-location", "O", "O"]],
        [["B-location", "O", "O"]],
    ),
    "type_change_inside_an_entity": (
        [["B-person", "I-person", "I-person", "O"]],
        [["B-person", "I-location", "I-person", "O"]],
    ),
    "i_after_b_of_another_type": (
        [["B-group", "I-group", "O"]],
        [["B-corporation", "I-group", "O"]],
    ),
    "b_after_b_of_the_same_type": (
        [["B-group", "B-group", "I-group", "O"]],
        [["B-group", "I-group", "I-group", "O"]],
    ),
    "entity_at_end_of_sentence": (
        [["O", "O", "B-product"], ["O", "B-creative-work", "I-creative-work"]],
        [["O", "O", "B-product"], ["O", "B-creative-work", "O"]],
    ),
    "sentence_boundary_ends_an_entity": (
        [["O", "B-person"], ["I-person", "O"]],
        [["O", "B-person"], ["B-person", "O"]],
    ),
    "no_predicted_entities": (
        [["B-person", "O", "B-location", "I-location"]],
        [["O", "O", "O", "O"]],
    ),
    "no_entities_at_all": (
        [["O", "O"], ["O"]],
        [["O", "O"], ["O"]],
    ),
    "only_predicted_entities": (
        [["O", "O", "O"]],
        [["B-product", "I-product", "O"]],
    ),
    "iobes_tags": (
        [["S-person", "O", "B-location", "I-location", "E-location", "O"]],
        [["S-person", "O", "B-location", "E-location", "I-location", "O"]],
    ),
    "mixed_sentences": (
        [
            ["B-person", "I-person", "O", "O", "B-location", "O", "B-group"],
            ["O", "B-corporation", "O", "B-product", "I-product", "I-product"],
            ["I-creative-work", "I-creative-work", "O", "B-person", "B-person"],
            ["O", "O", "O"],
        ],
        [
            ["B-person", "I-person", "O", "B-location", "I-location", "O", "I-group"],
            ["O", "B-group", "O", "B-product", "I-product", "O"],
            ["B-creative-work", "I-creative-work", "O", "B-person", "I-person"],
            ["B-person", "O", "I-location"],
        ],
    ),
}

# Sentences of the training file whose alignment is recorded (0-based lines),
# at the data's usual length limit and at a limit that cuts a word.
ALIGNMENT_LINES = [0, 1, 2, 3, 4, 5]
ALIGNMENT_MAX_LENGTH = 128
TRUNCATION_LINE = 0
TRUNCATION_MAX_LENGTH = 12


def score_case(truth, predicted):
    with warnings.catch_warnings():
        # seqeval warns when a precision or recall divides by zero (it returns 0).
        warnings.simplefilter("ignore")
        report = classification_report(truth, predicted, output_dict=True)
        return {
            "truth": truth,
            "predicted": predicted,
            "truth_entities": [[list(e) for e in get_entities(s)] for s in truth],
            "predicted_entities": [[list(e) for e in get_entities(s)] for s in predicted],
            "precision": precision_score(truth, predicted),
            "recall": recall_score(truth, predicted),
            "f1": f1_score(truth, predicted),
            "accuracy": accuracy_score(truth, predicted),
            "by_type": {
                name: {k: float(v) for k, v in scores.items()}
                for name, scores in report.items()
                if not name.endswith(" avg")
            },
        }


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tag_list(rows):
    """`O` first, then every other tag of the file, sorted: the engine's order."""
    tags = {tag for row in rows for tag in row["tags"]}
    return ["O"] + sorted(tags - {"O"})


def align(tokenizer, words, tags, label_to_id, max_length):
    """The run_ner.py recipe: the tag at each word's first sub-token."""
    encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    word_ids = encoding.word_ids()
    labels = []
    previous = None
    for word in word_ids:
        if word is None or word == previous:
            labels.append(-100)
        else:
            labels.append(label_to_id[tags[word]])
        previous = word
    return {
        "words": words,
        "tags": tags,
        "max_length": max_length,
        "input_ids": encoding["input_ids"],
        "word_ids": word_ids,
        "labels": labels,
    }


def vanishing_word_sentence(rows, tokenizer):
    """First sentence with a word that tokenizes to no sub-token (a lone
    variation selector in WNUT-17 dev)."""
    for row in rows:
        for word in row["tokens"]:
            if not tokenizer.tokenize(word):
                return row
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parents[2]
    parser.add_argument("--model", default=os.environ.get("PTUNE_MINILM_DIR"))
    parser.add_argument("--data", default=root.parent / "shared/data/ner")
    parser.add_argument("--fixtures", default=root / "worker/tests/fixtures")
    args = parser.parse_args()
    if not args.model:
        parser.error("set PTUNE_MINILM_DIR or pass --model")
    fixtures = Path(args.fixtures)

    scores = {
        "versions": {"seqeval": importlib.metadata.version("seqeval")},
        "cases": {name: score_case(truth, predicted) for name, (truth, predicted) in SCORE_CASES.items()},
    }
    out = fixtures / "ner_scores.json"
    out.write_text(json.dumps(scores, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")

    rows = read_jsonl(Path(args.data) / "train.jsonl")
    labels = tag_list(rows)
    label_to_id = {tag: i for i, tag in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    raw = tokenizers.Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    raw.no_padding()

    cases = [align(tokenizer, rows[i]["tokens"], rows[i]["tags"], label_to_id, ALIGNMENT_MAX_LENGTH) for i in ALIGNMENT_LINES]
    row = rows[TRUNCATION_LINE]
    cases.append(align(tokenizer, row["tokens"], row["tags"], label_to_id, TRUNCATION_MAX_LENGTH))
    dev_rows = read_jsonl(Path(args.data) / "dev.jsonl")
    vanishing = vanishing_word_sentence(rows + dev_rows, tokenizer)
    if vanishing is not None:
        cases.append(align(tokenizer, vanishing["tokens"], vanishing["tags"], label_to_id, ALIGNMENT_MAX_LENGTH))
    for case in cases:
        # The tokenizers library alone (what the Rust crate wraps) gives the same ids and words.
        raw.enable_truncation(case["max_length"])
        encoding = raw.encode(case["words"], is_pretokenized=True)
        assert encoding.ids == case["input_ids"], case["words"]
        assert encoding.word_ids == case["word_ids"], case["words"]

    alignment = {
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "labels": labels,
        "cases": cases,
    }
    out = fixtures / "ner_alignment.json"
    out.write_text(json.dumps(alignment) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes); vanishing-word case: {vanishing is not None}")


if __name__ == "__main__":
    main()
