"""Jobs: submit (with the datasets the spec names uploaded, as ``ptune
submit`` does), inspect, list, cancel, wait for and watch."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc

from . import errors
from . import spec as specs
from .errors import InvalidArgument, JobFailed, PtuneError, Timeout, from_rpc
from .spec import load as load_spec
from .spec import to_proto as spec_to_proto

CHUNK = 1 << 20
FINISHED = ("SUCCEEDED", "FAILED", "CANCELLED")


def state_name(job) -> str:
    """``QUEUED``, ``RUNNING``, ``SUCCEEDED``, ``FAILED`` or ``CANCELLED``."""
    from .v1 import types_pb2

    return types_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")


@dataclass
class Submitted:
    """What became of one spec of :meth:`Jobs.submit_many`: the stored
    job's id, or the error a single submit would have raised."""

    job_id: str | None
    error: PtuneError | None


@dataclass
class ProgressEvent:
    """A running job's progress: the step reached of ``total_steps``."""

    step: int
    total_steps: int


@dataclass
class MetricEvent:
    """A recorded metric (``kind`` ``train`` or ``eval``)."""

    step: int
    kind: str
    name: str
    value: float


@dataclass
class StateEvent:
    """A snapshot of the job, sent first and after every state change."""

    state: str
    job: object


class Jobs:
    def __init__(self, client):
        self._client = client
        self._stub = client._job_stub

    def upload_dataset(self, path, field: str = "dataset") -> str:
        """Uploads a JSON Lines file; returns its ``sha256:`` reference."""
        from .v1 import types_pb2

        path = Path(path)
        try:
            handle = open(path, "rb")
        except OSError as e:
            raise InvalidArgument(f"{field}: cannot open dataset {path}: {e}", field=field) from None

        def chunks():
            with handle:
                first = True
                while True:
                    data = handle.read(CHUNK)
                    if not data:
                        return
                    yield types_pb2.DatasetChunk(file_name=path.name if first else "", data=data)
                    first = False

        info = self._client._call(self._stub.UploadDataset, chunks(), f"{field}: upload of {path} failed", timeout=3600)
        return info.reference

    def _upload_referenced(self, value: str, base: Path, field: str) -> str:
        if value.startswith("sha256:"):
            return value
        if not value.strip():
            raise InvalidArgument(f"{field}: must name a JSON Lines file", field=field)
        path = Path(value)
        return self.upload_dataset(path if path.is_absolute() else base / path, field)

    def submit(self, spec, watch: bool = False):
        """Submits a job from a dict, a TOML file's path or a dataclass;
        uploads the local datasets it names (paths relative to the TOML
        file, or to the working directory). Returns the ``Job``; with
        ``watch``, follows it to the end first (see :meth:`wait`)."""
        from .v1 import job_service_pb2

        values, base = specs.load(spec)
        data = values.setdefault("data", {})
        for key in ("train", "eval"):
            data[key] = self._upload_referenced(str(data.get(key, "")), base, f"data.{key}")
        message = specs.to_proto(values)
        job = self._client._call(self._stub.SubmitJob, job_service_pb2.SubmitJobRequest(spec=message)).job
        if watch:
            for _ in self.watch(job.id):
                pass
            return self.get(job.id)
        return job

    def submit_many(self, specs, all_or_nothing: bool = False) -> list:
        """Submits many specs (dicts, TOML paths or dataclasses) in batches
        of up to 10,000 with one ``SubmitJobs`` call each; every local
        dataset they name is uploaded once. Returns one ``Submitted`` per
        spec, in order: ``job_id`` when stored, else ``error``, the typed
        error (``InvalidArgument`` with its ``field``, ...) a single submit
        would have raised. With ``all_or_nothing`` nothing of a batch is
        stored unless every spec in it is admitted."""
        from .v1 import job_service_pb2

        uploaded: dict = {}
        messages = []
        for spec in specs:
            values, base = load_spec(spec)
            data = values.setdefault("data", {})
            for key in ("train", "eval"):
                value = str(data.get(key, ""))
                cache_key = (str(base), value)
                if cache_key not in uploaded:
                    uploaded[cache_key] = self._upload_referenced(value, base, f"data.{key}")
                data[key] = uploaded[cache_key]
            messages.append(spec_to_proto(values))
        if all_or_nothing and len(messages) > 10_000:
            raise InvalidArgument("specs: all_or_nothing holds for one call of at most 10000 specs", field="specs")
        results = []
        for start in range(0, len(messages), 10_000):
            request = job_service_pb2.SubmitJobsRequest(specs=messages[start:start + 10_000],
                                                        all_or_nothing=all_or_nothing)
            reply = self._client._call(self._stub.SubmitJobs, request)
            for item in reply.results:
                error = None
                if item.HasField("error"):
                    error = errors.from_item(item.error.code, item.error.field, item.error.message)
                results.append(Submitted(job_id=item.job_id or None, error=error))
        return results

    def get(self, job_id: str):
        """One job (``ptune.v1.Job``)."""
        from .v1 import job_service_pb2

        return self._client._call(self._stub.GetJob, job_service_pb2.GetJobRequest(job_id=job_id))

    def list(self, state=None, base_model: str = "", method=None, name_prefix: str = "", owner: str = "",
             sweep_id: str = "", limit: int | None = None, page_size: int = 100) -> Iterator:
        """Jobs, newest first, through every page (at most ``limit``)."""
        from .v1 import job_service_pb2, types_pb2

        states = [state] if isinstance(state, (str, int)) else list(state or [])
        states = [s if isinstance(s, int) else types_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in states]
        method_value = 0
        if method is not None:
            method_value = method if isinstance(method, int) else types_pb2.Method.Value(f"METHOD_{method.upper()}")
        token, seen = "", 0
        while True:
            request = job_service_pb2.ListJobsRequest(
                states=states, base_model=base_model, method=method_value, name_prefix=name_prefix, owner=owner,
                sweep_id=sweep_id, page_size=page_size, page_token=token)
            page = self._client._call(self._stub.ListJobs, request)
            for job in page.jobs:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield job
            token = page.next_page_token
            if not token:
                return

    def cancel(self, job_id: str):
        """Cancels a job: a queued one at once, a running one at its next step."""
        from .v1 import job_service_pb2

        return self._client._call(self._stub.CancelJob, job_service_pb2.CancelJobRequest(job_id=job_id))

    def events(self, job_id: str) -> Iterator:
        """The job's events until it finishes: a :class:`StateEvent` first
        and at every state change, :class:`ProgressEvent` and
        :class:`MetricEvent` while it runs."""
        from .v1 import job_service_pb2

        stream = self._stub.WatchJob(job_service_pb2.WatchJobRequest(job_id=job_id))
        try:
            for event in stream:
                kind = event.WhichOneof("event")
                if kind == "job":
                    yield StateEvent(state_name(event.job), event.job)
                elif kind == "progress":
                    yield ProgressEvent(event.progress.step, event.progress.total_steps)
                elif kind == "metrics":
                    for m in event.metrics.metrics:
                        yield MetricEvent(m.step, m.kind, m.name, m.value)
        except grpc.RpcError as e:
            raise from_rpc(e, self._client.url, f"watching job {job_id}") from None
        finally:
            stream.cancel()

    def watch(self, job_id: str, progress: bool = True) -> Iterator:
        """A generator of the job's events (see :meth:`events`) that also
        draws a progress bar (tqdm, in notebooks and terminals, when
        installed and ``progress`` is true) with the step, the loss and the
        latest eval metric. Ends when the job finishes."""
        bar = _progress_bar(job_id) if progress else None
        latest = {}
        try:
            for event in self.events(job_id):
                if bar is not None:
                    if isinstance(event, ProgressEvent):
                        if event.total_steps and bar.total != event.total_steps:
                            bar.total = event.total_steps
                        bar.n = event.step
                        bar.refresh()
                    elif isinstance(event, MetricEvent):
                        if event.name == "loss" or event.kind == "eval":
                            latest[f"{'eval_' if event.kind == 'eval' else ''}{event.name}"] = round(event.value, 4)
                            bar.set_postfix(latest, refresh=True)
                    elif isinstance(event, StateEvent):
                        bar.set_description(f"{job_id[:8]} {event.state.lower()}")
                        if event.job.total_steps:
                            bar.total = event.job.total_steps
                            bar.n = event.job.step
                            bar.refresh()
                yield event
        finally:
            if bar is not None:
                bar.close()

    def wait(self, job_id: str, timeout: float | None = None, progress: bool = False, raise_on_failure: bool = True):
        """Waits for the job to finish and returns it; raises
        :class:`JobFailed` if it did not succeed (unless told not to) and
        :class:`Timeout` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if progress:
            for _ in self.watch(job_id):
                if deadline is not None and time.monotonic() > deadline:
                    raise Timeout(f"job {job_id} did not finish within {timeout:g} s")
            job = self.get(job_id)
        else:
            while True:
                job = self.get(job_id)
                if state_name(job) in FINISHED:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise Timeout(f"job {job_id} did not finish within {timeout:g} s ({state_name(job).lower()})")
                time.sleep(0.5)
        if raise_on_failure and state_name(job) != "SUCCEEDED":
            raise JobFailed(f"job {job_id} {state_name(job).lower()}: {job.error or 'no error recorded'}", job=job)
        return job

    def metrics(self, job_id: str, kind: str = ""):
        """Every recorded metric, ordered by step: a pandas DataFrame
        (columns step, kind, name, value) when pandas is installed, else a
        list of :class:`MetricEvent`."""
        from .v1 import job_service_pb2

        response = self._client._call(self._stub.GetMetrics, job_service_pb2.GetMetricsRequest(job_id=job_id, kind=kind))
        rows = [MetricEvent(m.step, m.kind, m.name, m.value) for m in response.metrics]
        try:
            import pandas as pd
        except ImportError:
            return rows
        return pd.DataFrame([vars(r) for r in rows], columns=["step", "kind", "name", "value"])


def _progress_bar(job_id: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=None, desc=job_id[:8], unit="step", leave=True)
