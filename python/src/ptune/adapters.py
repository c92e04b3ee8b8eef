"""Adapter downloads with the CLI's safety: the archive streams to a
temporary file beside the target (nothing is sized by what the server
announces), its sha256 and size are checked, and it is unpacked into a
temporary folder that takes the target's place only once every entry was
accepted: plain files with plain names, at most ``max_bytes`` in all;
links, devices, folders, absolute paths and ``..`` are refused. Unpacked
files get the time they were written as their modification time (the
archive's entries carry none)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
from pathlib import Path

import grpc

from .errors import UnsafeArchive, from_rpc

# The largest adapter archive accepted unless told otherwise, as `ptune adapter get`.
DEFAULT_MAX_BYTES = 4 << 30


class Adapters:
    def __init__(self, client):
        self._client = client
        self._stub = client._job_stub

    def download(self, job_id: str, dir, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
        """Downloads a succeeded job's adapter into ``dir`` (replaced if it
        exists) and returns its path."""
        from .v1 import job_service_pb2

        out = Path(dir)
        parent = out.parent if str(out.parent) else Path(".")
        parent.mkdir(parents=True, exist_ok=True)
        unique = f"{os.getpid()}-{time.time_ns()}"
        archive = parent / f".{out.name}.{unique}.tar"
        staging = parent / f".{out.name}.{unique}.unpacking"
        hasher = hashlib.sha256()
        expected, announced, received = "", 0, 0
        stream = self._stub.DownloadAdapter(job_service_pb2.DownloadAdapterRequest(job_id=job_id))
        try:
            with open(archive, "wb") as f:
                for chunk in stream:
                    if chunk.sha256:
                        expected, announced = chunk.sha256, chunk.total_size
                        if announced > max_bytes:
                            raise UnsafeArchive(f"the adapter of job {job_id} is {announced} bytes, more than max_bytes {max_bytes}")
                    received += len(chunk.data)
                    if received > max_bytes or (announced and received > announced):
                        raise UnsafeArchive(
                            f"the adapter download of job {job_id} sent more than it announced ({announced} bytes, at most {max_bytes})")
                    hasher.update(chunk.data)
                    f.write(chunk.data)
            actual = hasher.hexdigest()
            if received != announced or actual != expected:
                raise UnsafeArchive(
                    f"adapter download of job {job_id} is corrupt: got {received} bytes with sha256 {actual}, "
                    f"expected {announced} bytes with sha256 {expected}")
            try:
                unpack_plain_files(archive, staging, max_bytes)
            except UnsafeArchive as e:
                raise UnsafeArchive(f"refusing the adapter archive of job {job_id}: {e}") from None
        except grpc.RpcError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise from_rpc(e, self._client.url, f"downloading the adapter of job {job_id}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            stream.cancel()
            archive.unlink(missing_ok=True)
        old = parent / f".{out.name}.{unique}.replaced"
        if out.exists():
            os.rename(out, old)
        try:
            os.rename(staging, out)
        except OSError:
            if old.exists():
                os.rename(old, out)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return out


def unpack_plain_files(archive: Path, dir: Path, max_bytes: int) -> list[str]:
    """Unpacks a tar into ``dir`` (which must not exist): regular files with
    single-component names only, at most ``max_bytes`` in all."""
    dir.mkdir()
    names, total = [], 0
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    kind = "folder" if member.isdir() else "link" if (member.issym() or member.islnk()) else "special"
                    raise UnsafeArchive(f"the archive holds a {kind} entry {member.name!r}; only plain files are allowed")
                name = member.name
                if (not name or "/" in name or "\\" in name or name in (".", "..")
                        or any(ord(c) < 32 or ord(c) == 127 for c in name)):
                    raise UnsafeArchive(f"the archive entry {name!r} is not a plain file name (no folders, absolute paths or ..)")
                total += member.size
                if total > max_bytes:
                    raise UnsafeArchive(f"the archive unpacks to more than {max_bytes} bytes")
                target = dir / name
                source = tar.extractfile(member)
                try:
                    with open(target, "xb") as out:
                        # Copies at most the declared size: a header that lies cannot make it write more.
                        shutil.copyfileobj(_Limited(source, member.size), out)
                        out.flush()
                        os.fsync(out.fileno())
                except FileExistsError:
                    raise UnsafeArchive(f"the archive names {name!r} twice") from None
                names.append(name)
    except tarfile.TarError as e:
        raise UnsafeArchive(f"not a tar archive: {e}") from None
    return names


class _Limited:
    def __init__(self, f, size):
        self._f, self._left = f, size

    def read(self, n=-1):
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data
