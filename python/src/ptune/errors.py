"""Typed errors of the ptune client. Every error the coordinator returns
becomes a :class:`PtuneError` subclass that carries the gRPC status code, the
server's message and, where the message starts with one (``data.labels: ...``),
the spec field the server named."""

from __future__ import annotations

import builtins
import re

import grpc

# A message that names a field starts with its dotted path and a colon:
# "training.learning_rate: must be > 0, got 0", "space.peft.num_virtual_tokens: ...".
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:[.\[][A-Za-z0-9_\]\"]+)*):\s")


class PtuneError(Exception):
    """An error of the ptune client or of the coordinator.

    ``code`` is the gRPC status code (``None`` for errors raised by the
    client itself), ``details`` the server's message and ``field`` the spec
    field it named, if any."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = "", field: str | None = None):
        super().__init__(message)
        self.code = code
        self.details = details or message
        self.field = field


class ConnectionError(PtuneError, builtins.ConnectionError):  # noqa: A001 - also caught as the builtin
    """The coordinator cannot be reached (wrong address, not running, TLS mismatch)."""


class InvalidArgument(PtuneError):
    """A spec or request the coordinator refused; ``field`` names what is wrong."""


class NotFound(PtuneError):
    """No such job, sweep or adapter."""


class FailedPrecondition(PtuneError):
    """The request does not fit the object's state (e.g. cancelling a finished job)."""


class PermissionDenied(PtuneError):
    """The token is missing, unknown, expired or lacks the role."""


class JobFailed(PtuneError):
    """A job (or sweep) the client waited for ended without succeeding."""

    def __init__(self, message: str, job=None):
        super().__init__(message)
        self.job = job


class Timeout(PtuneError, builtins.TimeoutError):
    """Waiting took longer than the timeout given."""


class UnsafeArchive(PtuneError):
    """A downloaded adapter archive was corrupt or held something other than plain files."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: ConnectionError,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
}


def from_item(code_name: str, field: str, message: str) -> PtuneError:
    """The typed error of one refused item of a batch (``ptune.v1.ItemError``)."""
    code = getattr(grpc.StatusCode, code_name, None)
    cls = _BY_CODE.get(code, PtuneError)
    if cls is ConnectionError:
        cls = PtuneError
    details = f"{field}: {message}" if field else message
    return cls(f"{code_name.lower().replace('_', ' ')}: {details}", code=code, details=details, field=field or None)


def field_of(message: str) -> str | None:
    """The spec field a server message starts with, if any."""
    match = _FIELD.match(message or "")
    return match.group(1) if match else None


def from_rpc(error: grpc.RpcError, url: str = "", context: str = "") -> PtuneError:
    """The typed error of a failed call."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, PtuneError)
    prefix = f"{context}: " if context else ""
    if cls is ConnectionError:
        message = f"{prefix}cannot reach the coordinator at {url}: {details}; is ptune-coordinator running? (set url or PTUNE_COORDINATOR)"
    elif cls is Timeout and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"{prefix}the coordinator at {url} did not answer in time: {details}"
    else:
        name = code.name.lower().replace("_", " ") if code else "error"
        message = f"{prefix}{name}: {details}"
    return cls(message, code=code, details=details, field=field_of(details))
