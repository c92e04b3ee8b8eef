"""The adapter archive checks of ``client.adapters.download``: only plain
files with plain names, at most the allowed bytes, into a new folder, with
a real modification time although the archive's entries carry zero."""

from __future__ import annotations

import io
import tarfile
import time

import pytest

from ptune import UnsafeArchive
from ptune.adapters import unpack_plain_files


def archive(path, entries):
    with tarfile.open(path, "w") as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_plain_files_unpack_and_everything_else_is_refused(tmp_path):
    good = archive(tmp_path / "good.tar", [("adapter_config.json", b"{}", tarfile.REGTYPE),
                                           ("adapter_model.safetensors", b"weights", tarfile.REGTYPE)])
    names = unpack_plain_files(good, tmp_path / "ok", 1 << 20)
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "ok" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert abs((tmp_path / "ok" / "adapter_config.json").stat().st_mtime - time.time()) < 3600, "not 1970"
    bad = {
        "link": [("d", b"", tarfile.SYMTYPE)],
        "folder": [("sub/file", b"x", tarfile.REGTYPE)],
        "parent": [("../escape", b"x", tarfile.REGTYPE)],
        "absolute": [("/tmp/escape", b"x", tarfile.REGTYPE)],
        "twice": [("a", b"x", tarfile.REGTYPE), ("a", b"y", tarfile.REGTYPE)],
        "too big": [("big", b"0" * 2000, tarfile.REGTYPE)],
    }
    for case, entries in bad.items():
        with pytest.raises(UnsafeArchive):
            unpack_plain_files(archive(tmp_path / f"{case}.tar", entries), tmp_path / case.replace(" ", "-"), 1000)
    assert not (tmp_path.parent / "escape").exists()
    with pytest.raises(FileExistsError):
        unpack_plain_files(good, tmp_path / "ok", 1 << 20)
