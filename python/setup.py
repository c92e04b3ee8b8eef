"""Generates the gRPC stubs of the ptune API from the repository's `proto/`
folder when the package is built, into `ptune/v1/` of the build: nothing
generated is committed. The proto folder is `$PTUNE_PROTO_DIR`, else
`../proto` beside this folder (a checkout), else `proto/` inside it (an
sdist)."""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def proto_root():
    candidates = [os.environ.get("PTUNE_PROTO_DIR"), HERE.parent / "proto", HERE / "proto"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "ptune" / "v1" / "types.proto").is_file():
            return Path(candidate)
    raise SystemExit("cannot find ptune's proto files: set PTUNE_PROTO_DIR to the repository's proto/ folder")


def generate(out_dir):
    from grpc_tools import protoc

    root = proto_root()
    protos = sorted(str(p.relative_to(root)) for p in (root / "ptune" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main(args + protos) != 0:
        raise SystemExit(f"protoc failed on {root}")
    for package in (out_dir / "ptune", out_dir / "ptune" / "v1"):
        init = package / "__init__.py"
        if package.name == "v1" and not init.exists():
            init.write_text('"""gRPC stubs generated from proto/ptune/v1 at build time."""\n')


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        generate(Path(self.build_lib))


setup(cmdclass={"build_py": BuildWithStubs})
