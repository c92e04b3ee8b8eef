"""Where the client's settings come from, as the ``ptune`` CLI reads them:
an explicit argument, else the environment (``PTUNE_COORDINATOR``,
``PTUNE_TOKEN``, ``PTUNE_CA_CERT``), else the config file ``ptune login``
writes (``$PTUNE_CONFIG``, else ``$XDG_CONFIG_HOME/ptune/config.toml``, else
``~/.config/ptune/config.toml``), else ``http://127.0.0.1:50051``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import PtuneError

DEFAULT_COORDINATOR = "http://127.0.0.1:50051"


@dataclass
class Settings:
    url: str
    token: str | None
    ca_cert: Path | None


def config_path() -> Path | None:
    """The CLI's config file path (it need not exist)."""
    if os.environ.get("PTUNE_CONFIG"):
        return Path(os.environ["PTUNE_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME")
    if base:
        return Path(base) / "ptune" / "config.toml"
    home = os.environ.get("HOME")
    return Path(home) / ".config" / "ptune" / "config.toml" if home else None


def saved() -> dict:
    """The saved settings (empty when there is no file)."""
    path = config_path()
    if path is None or not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PtuneError(f"{path} is not a valid config file: {e}") from e


def resolve(url: str | None = None, token: str | None = None, ca_cert: str | os.PathLike | None = None) -> Settings:
    """Arguments first, then the environment, then the config file."""
    file = None

    def from_file(key):
        nonlocal file
        if file is None:
            file = saved()
        return file.get(key)

    url = url or os.environ.get("PTUNE_COORDINATOR") or from_file("coordinator") or DEFAULT_COORDINATOR
    token = token or os.environ.get("PTUNE_TOKEN") or from_file("token")
    ca = ca_cert or os.environ.get("PTUNE_CA_CERT") or from_file("ca_cert")
    return Settings(url=url, token=token.strip() if token else None, ca_cert=Path(ca) if ca else None)
