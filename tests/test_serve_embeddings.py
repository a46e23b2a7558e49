"""The served endpoint end to end: Ray Serve on loopback, the real `openai` client, HTTP errors.

One Serve instance per module (two applications on one proxy): ``main`` requires an API key
and embeds with a tiny random BERT; ``tight`` (under /tight) takes one request at a time
and queues one more, to show overload answered with 429 instead of an unbounded queue.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest

from bge_core.model import Encoder
from pipelines.common.cli import make_config
from pipelines.serve.main import ServeConfig, start

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]
KEY = "test-key"
TEXTS = ["the cat sat on the mat", "blue sky over the city", "fish " * 40, "dog", ""]


@dataclass(frozen=True)
class Server:
    url: str
    cfg: ServeConfig
    encoder: Encoder  # in-process reference with the served settings


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tiny_bert_dir: Path) -> Iterator[Server]:
    from ray import serve

    port = _free_port()
    main = make_config(ServeConfig, model=str(tiny_bert_dir), served_model_name="tiny-bert",
                       port=port, cpus_per_replica=0.25, max_length=24,
                       max_inputs_per_request=16, app_name="main",
                       query_instruction_for_retrieval="search query: ")
    tight = make_config(ServeConfig, model=str(tiny_bert_dir), port=port,
                        cpus_per_replica=0.25, route_prefix="/tight", app_name="tight",
                        max_inputs_per_request=512, max_batch_tokens=64,
                        max_ongoing_requests=1, max_queued_requests=1)
    try:
        start(main, api_key=KEY)
        start(tight, api_key="")  # "" = no key, whatever the environment says
        encoder = Encoder.from_pretrained(tiny_bert_dir, device="cpu", **main.encoder_overrides())
        yield Server(f"http://127.0.0.1:{port}", main, encoder)
    finally:
        serve.shutdown()


def _call(url: str, body: object | None = None, key: str | None = KEY,
          raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"text": text.decode(errors="replace")}


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_client_gets_the_encoders_vectors(server: Server, encoding_format: str):
    client = _client(server)
    extra = {} if encoding_format == "base64" else {"encoding_format": "float"}  # base64 is
    # the client's own default: it asks for base64 and decodes it
    passages = client.embeddings.create(model="tiny-bert", input=TEXTS, **extra)
    queries = client.embeddings.create(model="tiny-bert", input=TEXTS, **extra,
                                       extra_body={"input_type": "query"})
    got_p = np.array([d.embedding for d in passages.data], dtype=np.float32)
    got_q = np.array([d.embedding for d in queries.data], dtype=np.float32)
    ref_p, ref_q = server.encoder.encode(TEXTS), server.encoder.encode_queries(TEXTS)
    assert _cosines(got_p, ref_p).min() >= 0.99999
    assert _cosines(got_q, ref_q).min() >= 0.99999
    # the instruction was applied (a random tiny BERT moves little, but far more than noise)
    assert np.abs(got_q - ref_p).max() > 100 * max(np.abs(got_q - ref_q).max(), 1e-7)
    ids, truncated = server.encoder.tokenize(TEXTS)
    assert passages.usage.prompt_tokens == sum(map(len, ids))
    assert passages.usage.model_extra["truncated_inputs"] == int(truncated.sum()) == 1
    assert passages.model == "tiny-bert"
    single = client.embeddings.create(model="tiny-bert", input="blue sky over the city")
    assert _cosines(np.array([single.data[0].embedding]), got_p[1:2])[0] >= 0.99999


def test_concurrent_callers_each_get_their_own_vectors(server: Server):
    """Requests gathered into one batch are split back to the right callers."""
    requests = [TEXTS[i:] + TEXTS[:i] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda texts: _call(f"{server.url}/v1/embeddings", {"input": texts}), requests))
    for texts, (status, body) in zip(requests, answers):
        assert status == 200
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        assert _cosines(got, server.encoder.encode(texts)).min() >= 0.99999


def test_health_is_open_and_models_need_the_key(server: Server):
    assert _call(f"{server.url}/health") == (200, {"status": "ok", "model": "tiny-bert"})
    assert _call(f"{server.url}/health", key=None) == (200, {"status": "ok", "model": "tiny-bert"})
    assert _call(f"{server.url}/v1/models", key=None)[0] == 401
    (model,) = _client(server).models.list().data
    assert model.id == "tiny-bert" and model.model_extra["dimensions"] == server.encoder.dim


def test_missing_or_wrong_key_is_401(server: Server):
    url = f"{server.url}/v1/embeddings"
    assert _call(url, {"input": "x"}, key=None)[0] == 401
    status, body = _call(url, {"input": "x"}, key="wrong")
    assert status == 401 and body["error"]["message"] == "invalid API key"
    bad_client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.embeddings.create(model="tiny-bert", input="x")


@pytest.mark.parametrize(("raw", "status", "message"), [
    (b'{"input": ["a",', 400, "not valid JSON"),
    (b'{"model": "tiny-bert"}', 400, "missing 'input'"),
    (b'{"input": ["a", 5]}', 400, "input[1] is int"),
    (b'{"input": ["a\\ud800"]}', 400, "input[0] is not valid Unicode"),
    (b'{"input": ' + json.dumps(["a"] * 17).encode() + b"}", 413, "limit is 16"),
])
def test_bad_input_is_a_4xx_naming_the_problem_and_serving_goes_on(
    server: Server, raw: bytes, status: int, message: str
):
    url = f"{server.url}/v1/embeddings"
    got_status, body = _call(url, raw=raw)
    assert got_status == status and message in body["error"]["message"]
    assert _call(url, {"input": ["still serving"]})[0] == 200


def test_openai_client_raises_bad_request_for_non_strings(server: Server):
    with pytest.raises(openai.BadRequestError, match="token ids are not accepted"):
        _client(server).embeddings.create(model="tiny-bert", input=[[1, 2, 3]])


def test_overload_is_answered_429_at_once_then_serving_resumes(server: Server):
    url = f"{server.url}/tight/v1/embeddings"
    heavy = {"input": ["the cat sat on the mat by the river " * 20] * 512}
    with ThreadPoolExecutor(16) as pool:
        statuses = [s for s, _ in pool.map(lambda _: _call(url, heavy, key=None), range(16))]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
    assert _call(url, {"input": "after the storm"}, key=None)[0] == 200
