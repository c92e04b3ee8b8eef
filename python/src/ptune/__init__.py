"""The Python client of ptune: submit, watch and sweep PEFT jobs on a ptune
coordinator, download their adapters, and load them into ``transformers``
exactly as they were trained (:func:`ptune.hf.load`).

    import ptune
    client = ptune.Client()                       # PTUNE_COORDINATOR / PTUNE_TOKEN / ptune login's config
    job = client.jobs.submit("examples/jobs/sst2-prompt-tuning.toml")
    for event in client.jobs.watch(job.id): pass  # progress bar
    model = ptune.hf.load(client.adapters.download(job.id, "adapter"), "models/all-MiniLM-L6-v2")
"""

from .client import Client
from .errors import (ConnectionError, FailedPrecondition, InvalidArgument, JobFailed, NotFound, PermissionDenied,
                     PtuneError, Timeout, UnsafeArchive)
from .jobs import MetricEvent, ProgressEvent, StateEvent, Submitted

__version__ = "0.1.0"

__all__ = [
    "Client", "PtuneError", "ConnectionError", "InvalidArgument", "NotFound", "FailedPrecondition",
    "PermissionDenied", "JobFailed", "Timeout", "UnsafeArchive", "MetricEvent", "ProgressEvent", "StateEvent",
    "Submitted", "hf",
]


def __getattr__(name):
    # ptune.hf imports torch and transformers: only when asked for.
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'ptune' has no attribute {name!r}")
