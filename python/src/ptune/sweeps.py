"""Sweeps: create from a dict or a TOML definition (uploading the datasets
its template names, as ``ptune sweep create`` does), follow the leaderboard,
get the best trial, wait, extend, cancel, export and plot."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from . import spec as specs
from .errors import InvalidArgument, JobFailed, Timeout

FINISHED = ("COMPLETED", "CANCELLED", "FAILED")


def sweep_state(sweep) -> str:
    from .v1 import sweep_service_pb2

    return sweep_service_pb2.SweepState.Name(sweep.state).removeprefix("SWEEP_STATE_")


def trial_row(trial) -> dict:
    """A leaderboard row: rank, index, job, state, objective, steps, then one key per parameter."""
    from .v1 import sweep_service_pb2

    state = sweep_service_pb2.TrialState.Name(trial.state).removeprefix("TRIAL_STATE_").lower()
    row = {
        "rank": trial.rank or None,
        "index": trial.index,
        "job_id": trial.job_id,
        "state": state,
        "stopped_rung": trial.stopped_rung if trial.HasField("stopped_rung") else None,
        "objective": trial.objective if trial.HasField("objective") else None,
        "objective_step": trial.objective_step,
        "step": trial.step,
        "total_steps": trial.total_steps,
        "failure_reason": trial.failure_reason or None,
        "adapter_sha256": trial.adapter_sha256 or None,
    }
    row.update(json.loads(trial.params_json or "{}"))
    return row


class Sweep:
    """A sweep as last fetched: the ``ptune.v1.Sweep`` message as ``.raw``,
    the leaderboard as rows (:meth:`rows`, :meth:`dataframe`), and
    :meth:`plot`."""

    def __init__(self, sweeps, raw):
        self._sweeps = sweeps
        self.raw = raw

    id = property(lambda self: self.raw.id)
    name = property(lambda self: self.raw.name)
    state = property(lambda self: sweep_state(self.raw))

    def rows(self) -> list[dict]:
        """The leaderboard, best first, one dict per trial."""
        return [trial_row(t) for t in self.raw.leaderboard]

    def dataframe(self):
        """The leaderboard as a pandas DataFrame (pandas must be installed)."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def refresh(self) -> "Sweep":
        self.raw = self._sweeps.status(self.id).raw
        return self

    def plot(self, x: str = "peft.num_virtual_tokens", y: str = "training.learning_rate", metric: str | None = None):
        """With matplotlib: a heatmap of the objective over two parameters
        (prompt length x learning rate by default; the best value where
        several trials share a cell), and every trial's curve of the
        objective metric over steps. Returns the figure."""
        from .plots import plot_sweep

        return plot_sweep(self, x, y, metric or self.raw.objective_metric)

    def __repr__(self):
        return f"Sweep({self.id}, {self.name!r}, {self.state.lower()}, {self.raw.trials_created}/{self.raw.trial_budget} trials)"


class Sweeps:
    def __init__(self, client):
        self._client = client
        self._stub = client._sweep_stub

    def create(self, definition) -> Sweep:
        """Creates a sweep from a dict or a TOML definition's path (see
        ``examples/sweeps/``); local datasets in ``template.data`` (and
        dataset values in ``space``) are uploaded first."""
        from .v1 import sweep_service_pb2

        values, base = specs.load(definition)
        template = values.get("template")
        if not isinstance(template, dict):
            raise InvalidArgument("template: a sweep needs a job spec template", field="template")
        data = template.get("data") or {}
        if "labels" in data:
            data["labels"] = [specs._label(v) for v in data["labels"]]
        space = values.get("space") or {}
        for key in ("train", "eval"):
            if key in data:
                data[key] = self._client.jobs._upload_referenced(str(data[key]), base, f"template.data.{key}")
            for holder in ((space.get("data") or {}).get(key), space.get(f"data.{key}")):
                if isinstance(holder, dict) and isinstance(holder.get("values"), list):
                    holder["values"] = [self._client.jobs._upload_referenced(str(v), base, f"space.data.{key}")
                                        for v in holder["values"]]
        request = sweep_service_pb2.CreateSweepRequest(definition_json=json.dumps(values))
        return Sweep(self, self._client._call(self._stub.CreateSweep, request))

    def status(self, sweep_id: str) -> Sweep:
        """The sweep with its leaderboard."""
        from .v1 import sweep_service_pb2

        return Sweep(self, self._client._call(self._stub.GetSweep, sweep_service_pb2.GetSweepRequest(sweep_id=sweep_id)))

    get = status

    def list(self, limit: int | None = None):
        """Sweeps, newest first, through every page."""
        from .v1 import sweep_service_pb2

        token, seen = "", 0
        while True:
            page = self._client._call(self._stub.ListSweeps, sweep_service_pb2.ListSweepsRequest(page_size=100, page_token=token))
            for sweep in page.sweeps:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield Sweep(self, sweep)
            token = page.next_page_token
            if not token:
                return

    def best(self, sweep_id: str, download: str | Path | None = None):
        """The best trial that has an adapter, as a leaderboard row (``None``
        while there is none); with ``download``, its adapter is written there
        too and the row gets ``dir``."""
        sweep = self.status(sweep_id)
        if not sweep.raw.HasField("best_trial"):
            return None
        row = trial_row(sweep.raw.best_trial)
        if download is not None:
            row["dir"] = self._client.adapters.download(row["job_id"], download)
        return row

    def wait(self, sweep_id: str, timeout: float | None = None, poll: float = 2.0, raise_on_failure: bool = True) -> Sweep:
        """Waits for the sweep to finish; raises :class:`JobFailed` unless it completed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sweep = self.status(sweep_id)
            if sweep.state in FINISHED:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"sweep {sweep_id} did not finish within {timeout:g} s")
            time.sleep(poll)
        if raise_on_failure and sweep.state != "COMPLETED":
            raise JobFailed(f"sweep {sweep_id} {sweep.state.lower()}: {sweep.raw.error or 'no error recorded'}", job=sweep.raw)
        return sweep

    def extend(self, sweep_id: str, trials: int) -> Sweep:
        from .v1 import sweep_service_pb2

        return Sweep(self, self._client._call(self._stub.ExtendSweep, sweep_service_pb2.ExtendSweepRequest(sweep_id=sweep_id, trials=trials)))

    def update(self, sweep_id: str, max_concurrent_trials: int) -> Sweep:
        from .v1 import sweep_service_pb2

        request = sweep_service_pb2.UpdateSweepRequest(sweep_id=sweep_id, max_concurrent_trials=max_concurrent_trials)
        return Sweep(self, self._client._call(self._stub.UpdateSweep, request))

    def cancel(self, sweep_id: str) -> Sweep:
        from .v1 import sweep_service_pb2

        return Sweep(self, self._client._call(self._stub.CancelSweep, sweep_service_pb2.CancelSweepRequest(sweep_id=sweep_id)))

    def export(self, sweep_id: str, format: str = "rows", path: str | Path | None = None):
        """Every trial with one column per parameter: ``rows`` (a list of
        dicts), ``json`` or ``csv`` (text); with ``path`` the text is also
        written there."""
        rows = self.status(sweep_id).rows()
        if format == "rows":
            return rows
        if format == "json":
            text = json.dumps(rows, indent=2, default=str) + "\n"
        elif format == "csv":
            columns = []
            for row in rows:
                columns += [k for k in row if k not in columns]
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            text = buffer.getvalue()
        else:
            raise ValueError(f"format must be rows, json or csv, got {format!r}")
        if path is not None:
            Path(path).write_text(text)
        return text
