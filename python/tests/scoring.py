"""Scores a model loaded with ``ptune.hf.load`` the way ``ptune-worker eval``
scores an export: the same rows, the same tokenization, the same metrics'
definitions (mean cross-entropy and accuracy for sequences; loss over
first sub-tokens and tag accuracy for tokens; loss on the first reference
for causal LM)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def label_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def sequence_scores(model, base_dir: Path, data: Path) -> dict:
    from transformers import AutoTokenizer

    spec = model.ptune["spec"]["data"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = rows(data)
    texts = [r[spec.get("text_field", "text")] for r in examples]
    gold = torch.tensor([spec["labels"].index(label_text(r[spec.get("label_field", "label")])) for r in examples])
    logits = []
    with torch.no_grad():
        for start in range(0, len(texts), 8):
            batch = tokenizer(texts[start:start + 8], truncation=True, max_length=spec["max_seq_len"], padding=True,
                              return_tensors="pt")
            logits.append(model(**batch).logits)
    logits = torch.cat(logits)
    return {"loss": F.cross_entropy(logits, gold).item(), "accuracy": (logits.argmax(-1) == gold).float().mean().item()}


def token_scores(model, base_dir: Path, data: Path) -> dict:
    from transformers import AutoTokenizer

    spec = model.ptune["spec"]["data"]
    tags = spec["labels"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    total, labelled, correct = 0.0, 0, 0
    with torch.no_grad():
        for row in rows(data):
            words, word_tags = row[spec.get("text_field", "tokens")], row[spec.get("label_field", "tags")]
            encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=spec["max_seq_len"],
                                 return_tensors="pt")
            labels, previous = [], None
            for word in encoding.word_ids():
                labels.append(-100 if word is None or word == previous else tags.index(word_tags[word]))
                previous = word
            labels = torch.tensor([labels])
            logits = model(**encoding).logits
            mask = labels != -100
            total += F.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
            labelled += int(mask.sum())
            correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
    return {"loss": total / labelled, "accuracy": correct / labelled}


def causal_lm_scores(model, base_dir: Path, data: Path) -> dict:
    """Loss on each input's first reference: ``source + " ||" + " " +
    target`` and EOS, labelled on the target and EOS, as ptune formats it."""
    from tokenizers import Tokenizer

    import ptune.hf

    spec = model.ptune["spec"]
    tokenizer = Tokenizer.from_file(str(Path(base_dir) / "tokenizer.json"))
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    max_len = spec["data"]["max_seq_len"]

    def leading_specials_only(text):
        full = tokenizer.encode(text, add_special_tokens=True).ids
        plain = tokenizer.encode(text, add_special_tokens=False).ids
        for k in range(len(full) - len(plain) + 1):
            if plain and full[k:k + len(plain)] == plain:
                return full[:k + len(plain)]
        return full

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows(data):
            references = row.get("references") or [row["target"]]
            prompt = leading_specials_only(ptune.hf.causal_lm_prompt(row["source"]))
            ids = leading_specials_only(f"{ptune.hf.causal_lm_prompt(row['source'])} {references[0]}") + [eos]
            shared = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
            labels = [-100] * shared + ids[shared:]
            ids, labels = ids[:max_len], labels[:max_len]
            logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
            logits = logits[0, -len(ids):]  # prompt methods return the virtual tokens' positions too
            targets = torch.tensor(labels[1:])
            mask = targets != -100
            total += F.cross_entropy(logits[:-1][mask], targets[mask], reduction="sum").item()
            count += int(mask.sum())
    return {"loss": total / count}
