"""The demo job as a new user runs it from Python: the TOML file submitted
as it is, its adapter loaded with ``ptune.hf.load`` and scored on the SST-2
dev set, where it scores what ``ptune-worker eval`` scores; a plain
``PeftModel.from_pretrained`` does not, and ``needs_helper`` says why."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

import ptune
import ptune.jobs
import ptune.hf

from conftest import DATA, MINILM, ROOT
from scoring import sequence_scores

DEMO = ROOT / "examples" / "jobs" / "sst2-prompt-tuning.toml"


@pytest.mark.skipif(os.environ.get("PTUNE_PYTHON_DEMO") == "0", reason="PTUNE_PYTHON_DEMO=0")
def test_demo_job_loads_as_trained(client, cluster, tmp_path):
    job = client.jobs.submit(DEMO)
    assert job.spec.name == "sst2-prompt-tuning" and job.spec.head.pooling == "mean"
    job = client.jobs.wait(job.id, timeout=1800, progress=True)
    adapter = client.adapters.download(job.id, tmp_path / "demo-adapter")
    dev = DATA / "sst2" / "dev.jsonl"
    model = ptune.hf.load(adapter, MINILM)
    ours = sequence_scores(model, MINILM, dev)
    reference = cluster.eval(adapter, dev)["metrics"]
    print(f"demo: python {ours} eval {({k: reference[k] for k in ours})}")
    assert abs(ours["loss"] - reference["loss"]) < 1e-4 and abs(ours["accuracy"] - reference["accuracy"]) < 1e-4
    assert "mean" in ptune.hf.needs_helper(adapter)

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    plain = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2), adapter)
    plain.ptune = model.ptune
    naive = sequence_scores(plain.eval(), MINILM, dev)
    print(f"demo: plain PeftModel.from_pretrained {naive}")
    assert abs(naive["loss"] - reference["loss"]) > 1e-2


@dataclass
class Peft:
    num_virtual_tokens: int = 2


@dataclass
class Data:
    train: str
    eval: str
    labels: list = field(default_factory=lambda: ["0", "1"])
    max_seq_len: int = 16
    max_train_examples: int = 8


@dataclass
class Training:
    learning_rate: float = 1e-2
    batch_size: int = 4
    max_steps: int = 1


@dataclass
class Spec:
    name: str
    data: Data
    base_model: str = "all-MiniLM-L6-v2"
    task: str = "sequence_classification"
    method: str = "prompt_tuning"
    peft: Peft = field(default_factory=Peft)
    training: Training = field(default_factory=Training)
    owner: str | None = None


def test_dataclass_spec_and_cancel(client, data_dir):
    spec = Spec("py-dataclass", Data(str(DATA / "sst2" / "train.jsonl"), str(data_dir / "sst2-eval.jsonl")))
    job = client.jobs.submit(spec)
    assert job.spec.data.max_seq_len == 16 and job.spec.peft.num_virtual_tokens == 2
    assert client.jobs.get(job.id).id == job.id
    cancelled = client.jobs.cancel(job.id)
    finished = client.jobs.wait(job.id, timeout=300, raise_on_failure=False)
    assert ptune.jobs.state_name(finished) in ("CANCELLED", "SUCCEEDED"), cancelled
    with ptune_raises(ptune.NotFound):
        client.jobs.get("00000000-0000-0000-0000-000000000000")


class ptune_raises:
    def __init__(self, kind):
        self.kind = kind

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        assert kind is not None and issubclass(kind, self.kind), f"expected {self.kind.__name__}, got {kind}"
        return True
