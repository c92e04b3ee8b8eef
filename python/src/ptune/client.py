"""The connection to a coordinator: one gRPC channel whose calls carry the
token, and the three parts of the API as attributes (``jobs``, ``sweeps``,
``adapters``)."""

from __future__ import annotations

import os

import grpc

from . import config
from .errors import ConnectionError, PtuneError, from_rpc

# Largest answer accepted (a big sweep's leaderboard, adapter chunks), as the CLI.
MAX_MESSAGE_BYTES = 64 << 20


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = list(details.metadata or []) + [self._metadata]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class Client:
    """A client of one coordinator.

    ``url``, ``token`` and ``ca_cert`` default as the ``ptune`` CLI's do: the
    environment (``PTUNE_COORDINATOR``, ``PTUNE_TOKEN``, ``PTUNE_CA_CERT``),
    then the config file ``ptune login`` saved, then
    ``http://127.0.0.1:50051``. ``timeout`` bounds the connection (raising
    :class:`ptune.errors.ConnectionError`) and every unary call, in seconds.
    The connection is made when the client is created."""

    def __init__(self, url: str | None = None, token: str | None = None, ca_cert: str | os.PathLike | None = None,
                 timeout: float = 10.0, connect: bool = True):
        settings = config.resolve(url, token, ca_cert)
        self.url = settings.url
        self.timeout = timeout
        self._raw = _open_channel(settings)
        self._channel = grpc.intercept_channel(self._raw, _Bearer(settings.token)) if settings.token else self._raw
        self.has_token = bool(settings.token)
        if connect:
            try:
                grpc.channel_ready_future(self._raw).result(timeout=timeout)
            except grpc.FutureTimeoutError:
                self.close()
                raise ConnectionError(
                    f"cannot reach the coordinator at {self.url} within {timeout:g} s; is ptune-coordinator running? "
                    "(pass url= or set PTUNE_COORDINATOR)"
                ) from None
        from .v1 import job_service_pb2_grpc, sweep_service_pb2_grpc

        from .adapters import Adapters
        from .jobs import Jobs
        from .sweeps import Sweeps

        self._job_stub = job_service_pb2_grpc.JobServiceStub(self._channel)
        self._sweep_stub = sweep_service_pb2_grpc.SweepServiceStub(self._channel)
        self.jobs = Jobs(self)
        self.sweeps = Sweeps(self)
        self.adapters = Adapters(self)

    def _call(self, method, request, context: str = "", timeout: float | None = None):
        """One unary call, its failure as a typed error."""
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise from_rpc(e, self.url, context) from None

    def close(self):
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"ptune.Client({self.url!r})"


def _open_channel(settings: config.Settings):
    url = settings.url
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if url.startswith("https://"):
        target = url[len("https://"):].rstrip("/")
        root = None
        if settings.ca_cert:
            try:
                root = settings.ca_cert.read_bytes()
            except OSError as e:
                raise PtuneError(f"cannot read the CA certificate {settings.ca_cert}: {e}") from e
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root), options=options)
    elif url.startswith("http://"):
        channel = grpc.insecure_channel(url[len("http://"):].rstrip("/"), options=options)
    else:
        raise PtuneError(f"coordinator address {url!r} must start with http:// or https://")
    return channel

