"""The embeddings API without Ray: auth, bad input, token counts, response encoding.

The HTTP path of a replica is `check_auth` → `parse_request` → `tokenize_request` →
`Encoder.encode_tokenized` → `embedding_body`; here each step is checked on its own and
the whole chain against `Encoder.encode` / `encode_queries`.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bge_core.model import Encoder
from pipelines.serve.api import (
    API_KEY_ENV,
    ApiError,
    EmbeddingRequest,
    TokenizedRequest,
    check_auth,
    check_declared_size,
    embedding_body,
    parse_request,
    resolve_api_key,
    tokenize_request,
)

LIMITS = {"max_inputs": 4, "max_bytes": 10_000}


def _parse(payload: object, **limits: int) -> EmbeddingRequest:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_request(body, **{**LIMITS, **limits})


def _refusal(payload: object, **limits: int) -> ApiError:
    with pytest.raises(ApiError) as caught:
        _parse(payload, **limits)
    return caught.value


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: Path) -> Encoder:
    return Encoder.from_pretrained(tiny_bert_dir, device="cpu", max_length=16,
                                   query_instruction="search query: ")


# ----------------------------------------------------------------------------- auth


def test_no_key_means_open_and_a_key_needs_the_bearer_header():
    check_auth(None, None)
    check_auth("Bearer anything", None)
    check_auth("Bearer s3cret", "s3cret")
    check_auth("bearer s3cret", "s3cret")
    for header, reason in [(None, "missing"), ("s3cret", "missing"), ("Basic s3cret", "missing"),
                           ("Bearer ", "missing"), ("Bearer wrong", "invalid"),
                           ("Bearer s3cret2", "invalid")]:
        with pytest.raises(ApiError, match=reason) as caught:
            check_auth(header, "s3cret")
        assert caught.value.status == 401
        assert caught.value.body()["error"]["type"] == "authentication_error"


def test_api_key_comes_from_the_environment_unless_given(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_key() is None
    monkeypatch.setenv(API_KEY_ENV, "")
    assert resolve_api_key() is None  # empty = no key, not a key that is ""
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key() == "from-env"
    assert resolve_api_key("explicit") == "explicit"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("payload", "status", "message"), [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[" * 4_000 + b"]" * 4_000, 400, "not valid JSON"),
    ([1, 2], 400, "must be a JSON object, got list"),
    ({"model": "m"}, 400, "missing 'input'"),
    ({"input": None}, 400, "must be a string or a list of strings, got NoneType"),
    ({"input": {"a": 1}}, 400, "got dict"),
    ({"input": []}, 400, "empty list"),
    ({"input": ["ok", None]}, 400, r"input\[1\] is NoneType"),
    ({"input": ["ok", "fine", 3]}, 400, r"input\[2\] is int.*check_embedding_ctx_length"),
    ({"input": [[101, 102]]}, 400, r"input\[0\] is list.*token ids"),
    (b'{"input": ["ok", "a\\ud800"]}', 400, r"input\[1\] is not valid Unicode"),
    ({"input": ["a"] * 5}, 413, "has 5 items; the limit is 4"),
    ({"input": "a", "encoding_format": "int8"}, 400, "'encoding_format' must be one of"),
    ({"input": "a", "input_type": "document"}, 400, "'input_type' must be one of"),
    ({"input": "a", "model": 7}, 400, "'model' must be a string"),
    ({"input": "a", "dimensions": 16}, 400, "'dimensions' must be 32"),
])
def test_bad_requests_name_the_problem(payload: object, status: int, message: str):
    error = _refusal(payload, dim=32)
    assert error.status == status
    assert error.body()["error"]["message"] == error.message
    assert re.search(message, error.message), error.message


def test_a_body_over_the_byte_limit_is_413_declared_or_not():
    error = _refusal({"input": "x" * 200}, max_bytes=100)
    assert error.status == 413 and "limit is 100" in error.message
    check_declared_size(None, 100)
    check_declared_size("100", 100)
    for header, status in [("101", 413), ("lots", 400)]:
        with pytest.raises(ApiError) as caught:
            check_declared_size(header, 100)
        assert caught.value.status == status


def test_good_requests_and_defaults():
    single = _parse({"input": "one text", "model": "m"})
    assert single == EmbeddingRequest(texts=["one text"], model="m")
    assert single.input_type == "passage" and single.encoding_format == "float"
    many = _parse({"input": ["a", ""], "input_type": "query", "encoding_format": "base64",
                   "dimensions": 32, "user": "ignored"}, dim=32)
    assert many.texts == ["a", ""] and many.input_type == "query"
    assert many.encoding_format == "base64"


# ----------------------------------------------------------------------------- vectors


def _served(encoder: Encoder, payload: dict) -> tuple[np.ndarray, dict]:
    request = _parse(payload, max_inputs=100)
    tokens = tokenize_request(encoder, request)
    vectors = encoder.encode_tokenized(tokens.rows)
    body = json.loads(embedding_body(vectors, tokens, model="tiny",
                                     encoding_format=request.encoding_format))
    items = [item["embedding"] for item in body["data"]]
    if request.encoding_format == "base64":
        decoded = [np.frombuffer(base64.b64decode(s), dtype="<f4") for s in items]
        return np.stack(decoded), body
    return np.asarray(items, dtype=np.float32), body


TEXTS = ["the cat sat on the mat", "blue sky", "a dog and a cat in the river " * 4, "fish"]


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_passages_equal_encode_and_queries_equal_encode_queries(
    encoder: Encoder, encoding_format: str
):
    passages, body = _served(encoder, {"input": TEXTS, "encoding_format": encoding_format})
    np.testing.assert_array_equal(passages, encoder.encode(TEXTS))
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    queries, _ = _served(encoder, {"input": TEXTS, "input_type": "query",
                                   "encoding_format": encoding_format})
    np.testing.assert_array_equal(queries, encoder.encode_queries(TEXTS))
    assert not np.allclose(queries, passages)  # the instruction was applied


def test_usage_counts_tokens_and_truncated_inputs(encoder: Encoder):
    _, body = _served(encoder, {"input": TEXTS})
    ids, truncated = encoder.tokenize(TEXTS)
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids)) == body["usage"]["total_tokens"]
    assert body["usage"]["truncated_inputs"] == int(truncated.sum()) == 1  # the long text
    assert max(map(len, ids)) == encoder.config.max_length
    assert body["model"] == "tiny" and body["object"] == "list"


@pytest.mark.parametrize("dim", [384, 32, 10, 1])  # a row's bytes a multiple of 3 or not
def test_base64_cut_from_the_whole_array_equals_one_encoding_per_vector(dim: int):
    vectors = np.random.default_rng(dim).standard_normal((7, dim)).astype(np.float32)
    tokens = TokenizedRequest(rows=[[1, 2]] * 7, prompt_tokens=14, truncated=0)
    body = json.loads(embedding_body(vectors, tokens, model='m"x', encoding_format="base64"))
    expected = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    assert [d["embedding"] for d in body["data"]] == expected
    assert [d["index"] for d in body["data"]] == list(range(7)) and body["model"] == 'm"x'
    floats = json.loads(embedding_body(vectors, tokens, model="m", encoding_format="float"))
    assert np.array_equal(np.array([d["embedding"] for d in floats["data"]], np.float32), vectors)
