"""The Python client against a real coordinator and worker: every method
and task ptune exports is submitted from Python, watched to the end,
downloaded, loaded with ``ptune.hf.load`` and scored; the scores equal
``ptune-worker eval``'s on the same rows."""

from __future__ import annotations

import os
import stat
import time

import pytest

import ptune
import ptune.hf

from conftest import DATA, MINILM, TINY_GPT2
from scoring import causal_lm_scores, rows, sequence_scores, token_scores

TOLERANCE = 1e-4
# Tiny runs: a few steps on short sequences; the comparison needs the same rows, not many.
TRAINING = {"learning_rate": 3e-2, "head_learning_rate": 1e-1, "batch_size": 8, "max_steps": 3, "seed": 7}


def sst2(name, method, peft=None, pooling="mean", training=None):
    spec = {
        "name": name, "base_model": "all-MiniLM-L6-v2", "task": "sequence_classification", "method": method,
        "peft": peft or {},
        "data": {"train": str(DATA / "sst2" / "train.jsonl"), "eval": "EVAL", "labels": [0, 1], "max_seq_len": 32,
                 "max_train_examples": 48},
        "head": {"pooling": pooling},
        "training": {**TRAINING, **(training or {})},
    }
    return spec


def wnut(name, method, peft=None):
    tags = ["O", "B-corporation", "I-corporation", "B-creative-work", "I-creative-work", "B-group", "I-group",
            "B-location", "I-location", "B-person", "I-person", "B-product", "I-product"]
    return {
        "name": name, "base_model": "all-MiniLM-L6-v2", "task": "token_classification", "method": method,
        "peft": peft or {},
        "data": {"train": str(DATA / "ner" / "train.jsonl"), "eval": "EVAL", "text_field": "tokens",
                 "label_field": "tags", "labels": tags, "max_seq_len": 32, "max_train_examples": 48},
        "training": TRAINING,
    }


def e2e(name, method, peft=None, num_beams=1, training=None):
    return {
        "name": name, "base_model": "tiny-gpt2", "task": "causal_lm", "method": method, "peft": peft or {},
        "data": {"train": str(DATA / "e2e" / "train.jsonl"), "eval": "EVAL", "text_field": "source",
                 "label_field": "target", "max_seq_len": 24, "max_train_examples": 32},
        "generation": {"max_new_tokens": 8, "num_beams": num_beams},
        "training": {"learning_rate": 1e-2, "batch_size": 8, "max_steps": 3, "seed": 7, **(training or {})},
    }


# name -> (spec, eval file, scorer, base model folder)
CASES = {
    "prompt-mean": (sst2("py-prompt-mean", "prompt_tuning", {"num_virtual_tokens": 4, "init": "vocab"}), "sst2"),
    "prompt-cls": (sst2("py-prompt-cls", "prompt_tuning", {"num_virtual_tokens": 4}, pooling="cls"), "sst2"),
    "p-tuning": (sst2("py-p-tuning", "p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 32}), "sst2"),
    "prefix": (sst2("py-prefix", "prefix_tuning", {"num_virtual_tokens": 4, "prefix_projection": True,
                                                   "encoder_hidden_size": 32}), "sst2"),
    "p-tuning-v2": (sst2("py-p-tuning-v2", "p_tuning_v2", {"num_virtual_tokens": 4}), "sst2"),
    "lora": (sst2("py-lora", "lora", {"r": 4, "lora_alpha": 8}, training={"learning_rate": 1e-3}), "sst2"),
    "full": (sst2("py-full", "full", pooling="cls", training={"learning_rate": 1e-4}), "sst2"),
    "ner-prompt": (wnut("py-ner-prompt", "prompt_tuning", {"num_virtual_tokens": 4}), "ner"),
    "ner-p-tuning-v2": (wnut("py-ner-p-tuning-v2", "p_tuning_v2", {"num_virtual_tokens": 4}), "ner"),
    "lm-lora": (e2e("py-lm-lora", "lora", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}), "e2e"),
    "lm-prompt": (e2e("py-lm-prompt", "prompt_tuning", {"num_virtual_tokens": 3}), "e2e"),
    "lm-prefix": (e2e("py-lm-prefix", "prefix_tuning", {"num_virtual_tokens": 3}), "e2e"),
    "lm-full": (e2e("py-lm-full", "full", training={"learning_rate": 1e-3}), "e2e"),
    "lm-lora-beams": (e2e("py-lm-lora-beams", "lora", {"r": 4, "lora_alpha": 8}, num_beams=3), "e2e"),
}
SCORERS = {"sst2": (sequence_scores, MINILM), "ner": (token_scores, MINILM), "e2e": (causal_lm_scores, TINY_GPT2)}


@pytest.fixture(scope="session")
def jobs(client, data_dir):
    """Every case submitted at once (the worker trains them while tests run)."""
    submitted = {}
    for name, (spec, data) in CASES.items():
        spec["data"]["eval"] = str(data_dir / f"{data}-eval.jsonl")
        submitted[name] = client.jobs.submit(spec).id
    return submitted


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_loads_as_trained(case, client, cluster, jobs, data_dir, tmp_path):
    job_id = jobs[case]
    events = list(client.jobs.watch(job_id, progress=True))
    assert isinstance(events[0], ptune.StateEvent)
    job = client.jobs.wait(job_id, timeout=900)
    assert any(isinstance(e, ptune.MetricEvent) and e.kind == "eval" for e in events) or job.latest_metrics
    adapter = client.adapters.download(job_id, tmp_path / "adapter")
    for f in adapter.iterdir():
        assert abs(f.stat().st_mtime - time.time()) < 3600, f"{f.name} has modification time {f.stat().st_mtime}"
        assert stat.S_ISREG(f.stat().st_mode)
    data = data_dir / f"{CASES[case][1]}-eval.jsonl"
    scorer, base = SCORERS[CASES[case][1]]
    model = ptune.hf.load(adapter, None if CASES[case][0]["method"] == "full" else base)
    ours = scorer(model, base, data)
    reference = cluster.eval(adapter, data, tmp_path / "predictions.jsonl")["metrics"]
    print(f"{case}: python {ours} eval {({k: reference[k] for k in ours})}")
    for metric, value in ours.items():
        assert abs(value - reference[metric]) < TOLERANCE, f"{case} {metric}: python {value}, ptune-worker eval {reference[metric]}"
    if CASES[case][1] == "sst2":
        assert model.config.id2label == {0: "0", 1: "1"}
    if CASES[case][1] == "e2e":
        assert model.generation_config.max_new_tokens == 8
        assert model.generation_config.num_beams == CASES[case][0]["generation"]["num_beams"]
        expected = [r["prediction"] for r in rows(tmp_path / "predictions.jsonl")]
        assert generate(model, base, data) == expected


def generate(model, base, data):
    """Greedy outputs of ``model.generate`` with the job's settings, decoded."""
    import torch
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    outputs = []
    for row in rows(data):
        ids = tokenizer.encode(ptune.hf.causal_lm_prompt(row["source"]), add_special_tokens=False).ids
        with torch.no_grad():
            generated = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        new = generated[0, len(ids):].tolist() if generated.shape[1] > len(ids) else []
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        new = [t for t in new if t not in eos and t != model.generation_config.pad_token_id]
        outputs.append(tokenizer.decode(new).strip())
    return outputs


def test_metrics_list_and_export(client, jobs):
    job_id = jobs["prompt-mean"]
    client.jobs.wait(job_id, timeout=900)
    metrics = client.jobs.metrics(job_id)
    records = metrics.to_dict("records") if hasattr(metrics, "to_dict") else [vars(m) for m in metrics]
    assert any(m["kind"] == "eval" and m["name"] == "accuracy" for m in records)
    listed = [j.id for j in client.jobs.list(page_size=2)]
    assert set(jobs.values()) <= set(listed), "paging reaches every job"


def test_bad_spec_names_the_field(client, data_dir):
    spec = sst2("py-bad", "prompt_tuning", {"num_virtual_tokens": 0})
    spec["data"]["eval"] = str(data_dir / "sst2-eval.jsonl")
    with pytest.raises(ptune.InvalidArgument) as error:
        client.jobs.submit(spec)
    assert error.value.field == "peft.num_virtual_tokens", str(error.value)
    spec = sst2("py-bad", "prompt_tuning", training={"learning_rat": 1.0})
    spec["data"]["eval"] = str(data_dir / "sst2-eval.jsonl")
    with pytest.raises(ptune.InvalidArgument) as error:
        client.jobs.submit(spec)
    assert error.value.field == "training.learning_rat"


def test_submit_many_answers_each_spec(client, data_dir):
    good = sst2("py-many", "prompt_tuning", {"num_virtual_tokens": 10})
    good["data"]["eval"] = str(data_dir / "sst2-eval.jsonl")
    bad = sst2("py-many-bad", "prompt_tuning", {"num_virtual_tokens": 0})
    bad["data"]["eval"] = str(data_dir / "sst2-eval.jsonl")
    results = client.jobs.submit_many([good, bad, dict(good, name="py-many-2")])
    assert [r.job_id is not None for r in results] == [True, False, True]
    assert isinstance(results[1].error, ptune.InvalidArgument)
    assert results[1].error.field == "peft.num_virtual_tokens", str(results[1].error)
    assert client.jobs.get(results[2].job_id).spec.name == "py-many-2"
    held = client.jobs.submit_many([good, bad], all_or_nothing=True)
    assert isinstance(held[0].error, ptune.FailedPrecondition) and held[0].job_id is None
    for result in results:
        if result.job_id:
            client.jobs.cancel(result.job_id)


def test_unreachable_coordinator_fails_fast():
    start = time.monotonic()
    with pytest.raises(ptune.ConnectionError) as error:
        ptune.Client("http://127.0.0.1:9", token="x", timeout=2)
    assert time.monotonic() - start < 5
    assert "cannot reach the coordinator at http://127.0.0.1:9" in str(error.value)


def test_settings_come_from_the_cli_config(tmp_path, monkeypatch):
    from ptune import config

    path = tmp_path / "config.toml"
    path.write_text('coordinator = "http://10.0.0.1:5"\ntoken = "ptk_saved"\n')
    monkeypatch.setenv("PTUNE_CONFIG", str(path))
    monkeypatch.delenv("PTUNE_COORDINATOR", raising=False)
    monkeypatch.delenv("PTUNE_TOKEN", raising=False)
    assert config.resolve() == config.Settings("http://10.0.0.1:5", "ptk_saved", None)
    monkeypatch.setenv("PTUNE_TOKEN", "ptk_env")
    assert config.resolve().token == "ptk_env"
    assert config.resolve(token="ptk_arg").token == "ptk_arg"


def test_cli_adapter_get_names_the_loader(cluster, client, jobs, tmp_path):
    """`ptune adapter get` says when a plain PeftModel.from_pretrained would
    differ, and its files carry a real modification time."""
    import subprocess

    from conftest import BIN

    def get(case):
        client.jobs.wait(jobs[case], timeout=900)
        out = tmp_path / case
        run = subprocess.run([str(BIN / "ptune"), "--coordinator", cluster.url, "adapter", "get", jobs[case], "-o", str(out)],
                             env={**os.environ, "PTUNE_TOKEN": cluster.admin_token}, capture_output=True, text=True, check=True)
        return out, run.stderr

    out, stderr = get("prompt-mean")
    assert "ptune.hf.load(" in stderr and "mean of the tokens" in stderr, stderr
    assert all(abs(f.stat().st_mtime - time.time()) < 3600 for f in out.iterdir())
    _, stderr = get("full")
    assert "ptune.hf.load" not in stderr, "a full fine-tuning export with cls pooling loads with transformers alone"
