"""Job specs as Python values: a dict shaped like a ``ptune submit`` TOML
file (``name``, ``base_model``, ``task``, ``method``, ``[peft]``, ``[data]``,
``[head]``, ``[generation]``, ``[training]``), a path to such a file, or a
dataclass whose fields have those names. Fields left out get the
coordinator's defaults; validation is the coordinator's, whose errors name
the field (:class:`ptune.errors.InvalidArgument`)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import InvalidArgument

SECTIONS = ("peft", "data", "training", "generation", "head")


def load(spec) -> tuple[dict, Path]:
    """The spec as a plain dict, and the folder its relative dataset paths
    are read from (the TOML file's, else the working directory)."""
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        try:
            text = path.read_text()
        except OSError as e:
            raise InvalidArgument(f"cannot read job spec {path}: {e}") from e
        try:
            return tomllib.loads(text), path.resolve().parent
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"{path}: {e}") from e
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return _drop_none(dataclasses.asdict(spec)), Path.cwd()
    if isinstance(spec, dict):
        return json.loads(json.dumps(spec, default=str)), Path.cwd()
    raise TypeError(f"a job spec is a dict, a TOML path or a dataclass, got {type(spec).__name__}")


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _enum(prefix: str, value, field: str, enum) -> int:
    if isinstance(value, int):
        return value
    name = f"{prefix}_{str(value).upper()}"
    try:
        return enum.Value(name)
    except ValueError:
        allowed = ", ".join(n[len(prefix) + 1 :].lower() for n in enum.keys() if not n.endswith("UNSPECIFIED"))
        raise InvalidArgument(f"{field}: unknown value {value!r}; expected one of {allowed}", field=field) from None


def _label(value) -> str:
    """How ptune matches labels: strings as they are, numbers and booleans as JSON text."""
    return value if isinstance(value, str) else json.dumps(value)


def to_proto(spec: dict):
    """The ``ptune.v1.JobSpec`` of a spec dict (dataset fields as given)."""
    from google.protobuf import json_format

    from .v1 import types_pb2

    spec = dict(spec)
    known = {"name", "base_model", "task", "method", "max_attempts", "owner", *SECTIONS}
    for key in spec:
        if key not in known:
            raise InvalidArgument(f"{key}: unknown field; expected one of {', '.join(sorted(known))}", field=key)
    message = types_pb2.JobSpec()
    if "task" in spec:
        message.task = _enum("TASK", spec.pop("task"), "task", types_pb2.Task)
    if "method" in spec:
        message.method = _enum("METHOD", spec.pop("method"), "method", types_pb2.Method)
    peft = dict(spec.pop("peft", {}) or {})
    if "init" in peft:
        message.peft.init = _enum("PROMPT_INIT", peft.pop("init"), "peft.init", types_pb2.PromptInit)
    data = dict(spec.pop("data", {}) or {})
    if "labels" in data:
        data["labels"] = [_label(v) for v in data["labels"]]
    rest = {**spec, "peft": peft, "data": data}
    for section in ("training", "generation", "head"):
        if section in spec:
            rest[section] = spec[section]
    try:
        json_format.ParseDict(rest, message, ignore_unknown_fields=False)
    except json_format.ParseError as e:
        text = str(e).splitlines()[0]
        unknown = re.search(r'has no field named "(\w+)" at "JobSpec(?:\.(\w+))?"', text)
        if unknown:
            field = ".".join(p for p in (unknown.group(2), unknown.group(1)) if p)
            raise InvalidArgument(f"{field}: unknown field", field=field) from None
        where = re.search(r'at "JobSpec\.([\w.\[\]]+)"', text)
        field = where.group(1) if where else None
        raise InvalidArgument(f"{field or 'spec'}: {text}", field=field) from None
    return message
