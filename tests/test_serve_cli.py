"""`python pipelines/serve_embeddings.py ...` starts a local Ray, serves, and stops on Ctrl-C.

Runs the script as a user would (its own Ray, `BGE_SERVE_API_KEY` from the environment),
with one request at a time and one queued per replica, so a burst at the replica's own
port (no proxy in front) shows its backpressure: 429 with Retry-After, then serving goes on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bge_core.model import Encoder

ROOT = Path(__file__).resolve().parents[1]


def _post(url: str, body: dict | None, key: str) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, {}
    except (urllib.error.URLError, OSError):  # not up yet: refused, reset or timed out
        return 0, {}


def _status_and_retry_after(url: str, body: dict, key: str) -> tuple[int, str | None]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, None
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Retry-After")


def _logged_direct_url(proc: subprocess.Popen, deadline: float) -> str:
    """The first replica URL of the server's "replicas answer directly" log line."""
    marker = "replicas answer directly"
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return line.rsplit(": ", 1)[1].split(",")[0].strip()
    raise AssertionError(f"no {marker!r} line in the log:\n" + "".join(lines[-40:]))


@pytest.mark.e2e
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_script_serves_with_the_key_from_the_environment_until_ctrl_c(tiny_bert_dir: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_ADDRESS": "local", "BGE_SERVE_API_KEY": "k3y",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "pipelines/serve_embeddings.py", "--model", str(tiny_bert_dir),
               "--host", "127.0.0.1", "--port", str(port), "--cpus-per-replica", "0.5",
               "--max-ongoing-requests", "1", "--max-queued-requests", "1",
               "--max-batch-tokens", "64"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 200
        while _post(f"{base}/health", None, "k3y")[0] != 200:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(1)
        assert _post(f"{base}/health", None, "wrong")[0] == 200  # open, for probes
        assert _post(f"{base}/v1/models", None, "wrong")[0] == 401
        status, body = _post(f"{base}/v1/embeddings", {"input": ["the cat", "blue sky"]}, "k3y")
        assert status == 200
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        expected = Encoder.from_pretrained(tiny_bert_dir, device="cpu").encode(
            ["the cat", "blue sky"])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        # the replica's own port (direct ingress), named in the log: same routes, same key
        direct = _logged_direct_url(proc, deadline)
        assert direct.startswith("http://127.0.0.1:") and direct != base, direct
        assert _post(f"{direct}/health", None, "wrong")[0] == 200
        assert _post(f"{direct}/v1/models", None, "wrong")[0] == 401
        status, body = _post(f"{direct}/v1/embeddings", {"input": ["the cat", "blue sky"]},
                             "k3y")
        assert status == 200
        np.testing.assert_allclose([d["embedding"] for d in body["data"]], expected, atol=1e-5)
        # a burst at the replica's port: past one running and one queued, 429 + Retry-After
        heavy = {"input": ["the cat sat on the mat by the river " * 20] * 512}
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: _status_and_retry_after(
                f"{direct}/v1/embeddings", heavy, "k3y"), range(16)))
        statuses = [status for status, _ in answers]
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 1, statuses
        assert statuses.count(429) >= 1, statuses
        assert {after for status, after in answers if status == 429} == {"1"}, answers
        assert _post(f"{direct}/v1/embeddings", {"input": ["after the burst"]}, "k3y")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
