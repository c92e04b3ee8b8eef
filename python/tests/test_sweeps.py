"""Sweeps from Python against the real cluster: create a small random sweep
over prompt length x learning rate, follow it, extend it, read the
leaderboard and the best trial, export and plot it."""

from __future__ import annotations

import csv
import io
import json

import pytest

import ptune

from conftest import DATA


def definition(eval_file):
    return {
        "name": "py-sweep",
        "max_concurrent_trials": 2,
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "algorithm": {"type": "random", "num_trials": 2, "seed": 3},
        "template": {
            "base_model": "all-MiniLM-L6-v2", "task": "sequence_classification", "method": "prompt_tuning",
            "head": {"pooling": "mean"},
            "data": {"train": str(DATA / "sst2" / "train.jsonl"), "eval": str(eval_file), "labels": [0, 1],
                     "max_seq_len": 24, "max_train_examples": 32},
            "training": {"learning_rate": 3e-2, "batch_size": 8, "max_steps": 2, "seed": 5},
        },
        "space": {
            "peft.num_virtual_tokens": {"values": [2, 4]},
            "training.learning_rate": {"values": [1e-2, 3e-2]},
        },
    }


def test_sweep_lifecycle(client, data_dir, tmp_path):
    sweep = client.sweeps.create(definition(data_dir / "sst2-eval.jsonl"))
    assert sweep.state == "RUNNING"
    sweep = client.sweeps.wait(sweep.id, timeout=900)
    assert sweep.state == "COMPLETED"
    sweep = client.sweeps.extend(sweep.id, 1)
    assert sweep.raw.trial_budget == 3
    sweep = client.sweeps.wait(sweep.id, timeout=900)
    rows = sweep.rows()
    assert len(rows) == 3 and [r["rank"] for r in rows] == [1, 2, 3]
    assert all(r["state"] == "succeeded" and r["objective"] is not None for r in rows)
    assert {(r["peft.num_virtual_tokens"], r["training.learning_rate"]) for r in rows} <= {
        (n, lr) for n in (2, 4) for lr in (1e-2, 3e-2)}
    best = client.sweeps.best(sweep.id, download=tmp_path / "best")
    assert best["job_id"] == rows[0]["job_id"] and (best["dir"] / "adapter_model.safetensors").is_file()
    exported = list(csv.DictReader(io.StringIO(client.sweeps.export(sweep.id, "csv"))))
    assert [r["job_id"] for r in exported] == [r["job_id"] for r in rows]
    assert json.loads(client.sweeps.export(sweep.id, "json"))[0]["job_id"] == rows[0]["job_id"]
    with pytest.raises(ptune.FailedPrecondition):
        client.sweeps.cancel(sweep.id)
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    figure = sweep.plot()
    heatmap, curves = figure.axes[:2]
    assert heatmap.get_xlabel() == "peft.num_virtual_tokens" and len(curves.get_lines()) == 3
    figure.savefig(tmp_path / "sweep.png")


def test_invalid_sweep_names_the_field(client, data_dir):
    bad = definition(data_dir / "sst2-eval.jsonl")
    bad["space"]["training.learning_rate"] = {"type": "log_uniform", "min": 0, "max": 1e-2}
    with pytest.raises(ptune.InvalidArgument) as error:
        client.sweeps.create(bad)
    assert error.value.field == "space.training.learning_rate", str(error.value)
