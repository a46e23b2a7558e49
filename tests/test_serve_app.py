"""The replica's HTTP app in-process (no Ray): routes, the key, the body limit, and fuzzing.

`build_api` is exactly what a Serve replica serves; here its `encode` is the tiny BERT's
`encode_tokenized` on a thread, and requests go straight to the ASGI app
(`tests/asgi_client.py`). The property tests throw random JSON, wrong types, unicode
(lone surrogates included), random bytes, paths, methods and headers at it: every answer
must be a 200 exactly when the request is valid, a 4xx naming the problem otherwise, and
never a 500 or a hang.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bge_core.errors import InputError
from bge_core.model import Encoder
from pipelines.serve.api import (
    API_KEY_ENV,
    ServedModel,
    build_api,
    check_exposure,
    is_loopback,
)
from tests.asgi_client import Answer, call

KEY = "k3y"
AUTH = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
MAX_INPUTS, MAX_BYTES = 8, 50_000
FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: Path) -> Encoder:
    return Encoder.from_pretrained(tiny_bert_dir, device="cpu", max_length=16,
                                   query_instruction="search query: ")


def _app(encoder: Encoder, key: str | None, max_inputs: int, max_bytes: int) -> FastAPI:
    async def encode(rows: list[list[int]]) -> np.ndarray:
        return await asyncio.to_thread(encoder.encode_tokenized, rows)

    return build_api(ServedModel(encoder=encoder, encode=encode, name="tiny", created=1,
                                 api_key=key, max_inputs=max_inputs, max_bytes=max_bytes))


@pytest.fixture(scope="module")
def app(encoder: Encoder) -> FastAPI:
    return _app(encoder, KEY, MAX_INPUTS, MAX_BYTES)


@pytest.fixture(scope="module")
def default_app(encoder: Encoder) -> FastAPI:
    """The server's own limits: 512 inputs, 8,000,000 bytes."""
    return _app(encoder, KEY, 512, 8_000_000)


def _post(app: FastAPI, payload: Any, **kwargs: Any) -> Answer:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return call(app, "POST", "/v1/embeddings", body=body, headers=AUTH, **kwargs)


def _assert_refusal(answer: Answer, *statuses: int) -> None:
    assert answer.crashed is None, repr(answer.crashed)
    assert answer.status in statuses, (answer.status, answer.body)
    error = answer.body["error"]
    assert error["code"] == answer.status and error["message"]


# ----------------------------------------------------------------------------- routes


def test_health_is_open_and_every_v1_route_needs_the_key(app: FastAPI):
    assert call(app, "GET", "/health").body == {"status": "ok", "model": "tiny"}
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/embeddings")]:
        answer = call(app, method, path, body=b'{"input": "x"}')
        _assert_refusal(answer, 401)
        wrong = call(app, method, path, body=b'{"input": "x"}',
                     headers={"authorization": "Bearer nope"})
        assert wrong.status == 401 and wrong.body["error"]["message"] == "invalid API key"
    (model,) = call(app, "GET", "/v1/models", headers=AUTH).body["data"]
    assert model["id"] == "tiny"
    for path in ("/openapi.json", "/docs", "/redoc"):  # no schema or docs served
        assert call(app, "GET", path).status == 404


def test_the_app_answers_what_encode_and_encode_queries_give(app: FastAPI, encoder: Encoder):
    texts = ["the cat sat", "blue sky", "fish " * 40]
    passages = _post(app, {"input": texts})
    queries = _post(app, {"input": texts, "input_type": "query", "encoding_format": "base64"})
    assert passages.status == queries.status == 200
    got_p = np.array([d["embedding"] for d in passages.body["data"]], dtype=np.float32)
    got_q = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                      for d in queries.body["data"]])
    np.testing.assert_allclose(got_p, encoder.encode(texts), atol=1e-5)
    np.testing.assert_allclose(got_q, encoder.encode_queries(texts), atol=1e-5)
    assert passages.body["usage"]["truncated_inputs"] == 1


# ----------------------------------------------------------------------------- body limit


def _endless(chunk: int = 1 << 16) -> Iterator[bytes]:
    yield b'{"input": ["'
    while True:
        yield b"a" * chunk


def test_a_chunked_body_is_refused_at_the_limit_not_read_whole(app: FastAPI):
    """No Content-Length and a body that never ends: 413 once the limit is passed."""
    answer = call(app, "POST", "/v1/embeddings", body=_endless(), headers=AUTH, timeout_s=30)
    _assert_refusal(answer, 413)
    assert "over the limit of 50000 bytes" in answer.body["error"]["message"]
    assert answer.chunks_read <= MAX_BYTES // (1 << 16) + 2
    pieces = [b'{"input": ', b'["a chunked', b' body"]}']  # under the limit: served
    assert call(app, "POST", "/v1/embeddings", body=pieces, headers=AUTH).status == 200


def test_a_declared_length_over_the_limit_is_refused_before_reading(app: FastAPI):
    answer = call(app, "POST", "/v1/embeddings", body=_endless(), timeout_s=30,
                  headers={**AUTH, "content-length": str(MAX_BYTES + 1)})
    _assert_refusal(answer, 413)
    assert answer.chunks_read == 0


@pytest.mark.parametrize("chunked", [False, True])
def test_a_10mb_string_is_413_declared_or_chunked(default_app: FastAPI, chunked: bool):
    body = json.dumps({"input": "x" * 10_000_000}).encode()
    parts = [body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)]
    started = time.monotonic()
    answer = call(default_app, "POST", "/v1/embeddings", headers=AUTH, timeout_s=30,
                  body=parts if chunked else body)
    _assert_refusal(answer, 413)
    assert answer.chunks_read <= (8 if chunked else 0) and time.monotonic() - started < 10


def test_a_1mb_string_under_the_limit_is_embedded_truncated(default_app: FastAPI):
    answer = _post(default_app, {"input": ["word " * 200_000]}, timeout_s=60)
    assert answer.status == 200 and answer.body["usage"]["truncated_inputs"] == 1


@pytest.mark.parametrize(("payload", "message"), [
    ({"input": ["a"] * 100_000}, "has 100000 items; the limit is 512"),
    ({"input": [0] * 1_000_000}, "has 1000000 items; the limit is 512"),
    ({"input": [[1, 2]] * 512}, "input[0] is list"),
    ({"input": "1" * 5000}, None),  # a long digit string is text: fine
])
def test_huge_arrays_are_413_or_400(default_app: FastAPI, payload: dict, message: str | None):
    answer = _post(default_app, payload)
    if message is None:
        assert answer.status == 200
    else:
        _assert_refusal(answer, 400, 413)
        assert message in answer.body["error"]["message"]


def test_an_integer_of_5000_digits_is_400_not_500(app: FastAPI):
    """Python refuses to parse it (a ValueError that is not a JSONDecodeError)."""
    answer = _post(app, b'{"input": "x", "dimensions": ' + b"9" * 5000 + b"}")
    _assert_refusal(answer, 400)
    assert "not valid JSON" in answer.body["error"]["message"]


# ----------------------------------------------------------------------------- exposure


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
    ("my-host.internal", False),
])
def test_loopback_hosts(host: str, loopback: bool):
    assert is_loopback(host) is loopback


def test_an_open_host_needs_a_key_or_an_explicit_opt_in():
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "k3y", False)
    check_exposure("0.0.0.0", None, True)
    for host in ("0.0.0.0", None):  # None: the host is unknown, so it may be open
        with pytest.raises(InputError, match=f"{API_KEY_ENV}.*--allow-unauthenticated") as err:
            check_exposure(host, None, False)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- fuzzing

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=6),
    max_leaves=25)
# every code point, lone surrogates included (sent as JSON \\u escapes)
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)
INPUT = st.one_of(
    TEXT, st.lists(TEXT, max_size=MAX_INPUTS + 3), st.lists(st.integers(), max_size=5),
    st.lists(st.lists(st.integers(), max_size=4), max_size=3),
    st.lists(st.one_of(TEXT, st.none(), st.integers(), st.floats(), st.booleans()), max_size=4),
    JSON)
PAYLOAD = st.fixed_dictionaries({}, optional={
    "input": INPUT,
    "model": st.one_of(st.text(max_size=20), JSON),
    "encoding_format": st.one_of(st.sampled_from(["float", "base64", "FLOAT", ""]), JSON),
    "input_type": st.one_of(st.sampled_from(["query", "passage", "document"]), JSON),
    "dimensions": st.one_of(st.just(32), st.integers(), JSON),
    "user": JSON,
})


def _valid(payload: Any, dim: int) -> bool:
    """The API's contract, written from the docs: what must be served (200)."""
    if not isinstance(payload, dict) or "input" not in payload:
        return False
    raw = payload["input"]
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_INPUTS:
        return False
    for item in items:
        if not isinstance(item, str) or any(0xD800 <= ord(c) <= 0xDFFF for c in item):
            return False
    model = payload.get("model")
    return (payload.get("encoding_format") in (None, "float", "base64")
            and payload.get("input_type") in (None, "query", "passage")
            and (model is None or isinstance(model, str))
            and payload.get("dimensions") in (None, dim))


def _check(answer: Answer, payload: Any, size: int, dim: int) -> None:
    event(f"status {answer.status}")  # pytest --hypothesis-show-statistics tallies them
    assert answer.crashed is None, repr(answer.crashed)
    if size <= MAX_BYTES and _valid(payload, dim):
        assert answer.status == 200, answer.body
        raw = payload["input"]
        assert len(answer.body["data"]) == (1 if isinstance(raw, str) else len(raw))
    else:
        _assert_refusal(answer, 400, 413)
        items = payload.get("input") if isinstance(payload, dict) else None
        if answer.status == 413:  # only for size or count
            assert size > MAX_BYTES or (isinstance(items, list) and len(items) > MAX_INPUTS)


@FUZZ
@given(payload=PAYLOAD)
def test_fuzz_request_fields(app: FastAPI, encoder: Encoder, payload: dict):
    body = json.dumps(payload).encode()  # ensure_ascii: lone surrogates travel as escapes
    _check(_post(app, body), payload, len(body), encoder.dim)


@FUZZ
@given(payload=JSON)
def test_fuzz_any_json_body(app: FastAPI, encoder: Encoder, payload: Any):
    body = json.dumps(payload).encode()
    _check(_post(app, body), payload, len(body), encoder.dim)


@FUZZ
@given(body=st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
def test_fuzz_raw_bytes(app: FastAPI, encoder: Encoder, body: bytes):
    try:
        payload: Any = json.loads(body)
    except (ValueError, RecursionError):
        payload = None  # not JSON: must be refused
    _check(_post(app, body), payload, len(body), encoder.dim)


@FUZZ
@given(chunks=st.lists(st.binary(max_size=20_000), max_size=8))
def test_fuzz_chunked_bodies(app: FastAPI, encoder: Encoder, chunks: list[bytes]):
    body = b"".join(chunks)
    try:
        payload: Any = json.loads(body)
    except (ValueError, RecursionError):
        payload = None
    answer = call(app, "POST", "/v1/embeddings", body=chunks, headers=AUTH)
    _check(answer, payload, len(body), encoder.dim)


LATIN1 = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)


ROUTES = ["/health", "/v1/models", "/v1/embeddings", "/v1/", "/v1", "/", "/v2/embeddings",
          "/v1/embeddings/x", None]  # None: a random path


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.sampled_from(ROUTES).flatmap(
           lambda p: st.just(p) if p else st.text(max_size=30).map(lambda r: "/" + r)),
       auth=st.one_of(st.none(), st.just(f"Bearer {KEY}"), LATIN1),
       length=st.one_of(st.none(), LATIN1, st.integers(-10, 10**12).map(str)),
       body=st.binary(max_size=200))
def test_fuzz_paths_methods_and_headers(app: FastAPI, method: str, path: str, auth: str | None,
                                        length: str | None, body: bytes):
    headers = {k: v for k, v in {"authorization": auth, "content-length": length}.items()
               if v is not None}
    answer = call(app, method, path, body=body, headers=headers, chunked=True)
    event(f"status {answer.status}")
    assert answer.crashed is None, repr(answer.crashed)
    assert answer.status < 500, (answer.status, answer.body)
    keyed = auth is not None and auth.strip() == f"Bearer {KEY}"
    if path == "/health" and method == "GET":
        assert answer.status == 200
    elif path in ("/v1/models", "/v1/embeddings") and not keyed:
        assert answer.status in (401, 405)  # the wrong method is refused before the key
