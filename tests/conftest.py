"""Shared fixtures: tiny random models (no downloads), one Ray session per test run, and a
loopback S3 server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipelines.common.cli import NO_DASHBOARD_ENV
from tests.tiny_models import make_tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A loaded 2-core machine can take longer than Ray's default to register a raylet.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain Hugging Face folder holding a random 2-layer, 32-wide BERT and its tokenizer."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def mean_bert_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with mean pooling: its CLS vectors are near-identical (cosines ~0.99999),
    so retrieval tests need mean-pooled vectors to tell documents apart."""
    folder = tmp_path_factory.mktemp("mean_bert") / "model"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "bge_config.json").write_text(json.dumps({"pooling": "mean", "normalize": True}))
    return folder


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the Ray session is a `ray` test (`make test-fast` skips them)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


NODE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@contextmanager
def monkeypatch_env(values: dict[str, str]) -> Iterator[None]:
    """`values` set in this process's environment (where unset) for the block only."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole test session (2 CPUs, no dashboard) and stop it after.

    The node holds the loopback S3's (fake) credentials in its own environment, as a real
    node would: tasks never carry credentials, only the endpoint (`storage_runtime_env`).
    """
    import ray

    if not ray.is_initialized():
        # NO_DASHBOARD_ENV: without it, another Ray's dashboard on this machine (a job
        # run by a test beside this one) can make Ray Train remove a live run's workers
        env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **NO_DASHBOARD_ENV}
        with monkeypatch_env(NODE_CREDENTIALS):  # the raylet (and its workers) inherit them
            # address="local": never join a cluster another test (or process) left behind
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (a real endpoint for s3fs / pyarrow); yields its URL."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture()
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """This process pointed at the loopback S3 (the standard AWS settings), with a bucket
    ``bucket`` made; yields an `s3fs.S3FileSystem` on it."""
    import s3fs

    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, **NODE_CREDENTIALS,
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("bucket")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
