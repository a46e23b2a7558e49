"""The OpenAI-compatible embeddings API without Ray: routes, request checks, tokens, responses.

`build_api` is the FastAPI app a replica serves (`pipelines/serve_embeddings.py` only adds
Ray Serve's cross-request batcher as its `encode`); everything here is plain Python, FastAPI
and the `Encoder`'s tokenizer, so the whole HTTP path is tested in-process without a
cluster. Every rejection is an `ApiError` carrying its HTTP status and a message naming the
problem, answered in OpenAI's error shape. ``GET /health`` is open (for probes); every
``/v1/*`` route needs the API key when one is set. Each embeddings answer carries a
``Server-Timing`` header with the replica's share of the request (parse, tokenize, queue,
encode, serialize, in ms), which `bench/serve_load.py` collects into a profile.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from bge_core.errors import InputError
from bge_core.model import Encoder

API_KEY_ENV = "BGE_SERVE_API_KEY"
EncodingFormat = Literal["float", "base64"]
InputType = Literal["query", "passage"]
ENCODING_FORMATS: tuple[str, ...] = ("float", "base64")
INPUT_TYPES: tuple[str, ...] = ("query", "passage")


class ApiError(Exception):
    """A request the server refuses: HTTP `status` and a message for the caller."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape, so its clients raise the matching exception class."""
        kind = {401: "authentication_error", 413: "invalid_request_error",
                429: "rate_limit_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.status}}


@dataclass(frozen=True, kw_only=True)
class EmbeddingRequest:
    """A checked `POST /v1/embeddings` body."""

    texts: list[str]
    input_type: InputType = "passage"
    encoding_format: EncodingFormat = "float"
    model: str | None = None


@dataclass(frozen=True, kw_only=True)
class TokenizedRequest:
    """Token ids ready for the encoder, and what the response reports about them."""

    rows: list[list[int]]
    prompt_tokens: int
    truncated: int


_STAGES: ContextVar[dict[str, float] | None] = ContextVar("serve_stages", default=None)


def note_stage(stage: str, seconds: float) -> None:
    """Add `seconds` to `stage` of the request being answered (no-op outside one)."""
    stages = _STAGES.get()
    if stages is not None:
        stages[stage] = stages.get(stage, 0.0) + seconds


def server_timing(stages: Mapping[str, float]) -> str:
    """The W3C ``Server-Timing`` header value of `stages` (seconds → ms)."""
    return ", ".join(f"{name};dur={1000 * sec:.2f}" for name, sec in stages.items())


def resolve_api_key(explicit: str | None = None) -> str | None:
    """The key requests must present: `explicit`, else ``$BGE_SERVE_API_KEY``; None = open."""
    key = explicit if explicit is not None else os.environ.get(API_KEY_ENV)
    return key or None


def check_auth(authorization: str | None, api_key: str | None) -> None:
    """Raise 401 unless `api_key` is unset or the header is ``Bearer <api_key>``."""
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing 'Authorization: Bearer <key>' header")
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "invalid API key")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_exposure(host: str | None, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to serve a non-loopback `host` (None: unknown) openly unless asked to on purpose.

    Raises:
        InputError: `host` is not loopback, no API key is set and `allow_unauthenticated`
            is off; the one line names both ways out.
    """
    if api_key or allow_unauthenticated or (host is not None and is_loopback(host)):
        return
    where = f"on {host}" if host else "on an address that may not be loopback"
    raise InputError(f"refusing to serve {where} without an API key: set {API_KEY_ENV} "
                     "(clients then send 'Authorization: Bearer <key>'), or pass "
                     "--allow-unauthenticated (allow_unauthenticated: true in a Serve "
                     "config) to serve it open on purpose")


def check_declared_size(content_length: str | None, max_bytes: int) -> None:
    """Refuse a body by its ``Content-Length`` header before reading it (413)."""
    try:
        declared = int(content_length or 0)
    except ValueError:
        raise ApiError(400, f"bad Content-Length header {content_length!r}") from None
    if declared > max_bytes:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {max_bytes}")


async def read_body(chunks: AsyncIterator[bytes], max_bytes: int) -> bytes:
    """The body, read chunk by chunk; 413 as soon as it passes `max_bytes`, declared or not
    (a chunked body has no ``Content-Length``), so an endless body is never held whole."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"request body is over the limit of {max_bytes} bytes")
    return bytes(body)


def parse_request(
    body: bytes, *, max_inputs: int, max_bytes: int, dim: int | None = None
) -> EmbeddingRequest:
    """Check a request body; raise `ApiError` (400, or 413 when too large) naming the problem.

    Args:
        body: the raw HTTP body.
        max_inputs: most strings one request may carry (413 beyond).
        max_bytes: largest body accepted (413 beyond).
        dim: the model's dimension; a `dimensions` field must equal it.
    """
    if len(body) > max_bytes:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {max_bytes}")
    try:
        payload = json.loads(body)
    # ValueError: also an integer of over 4,300 digits; RecursionError: deep nesting
    except (ValueError, RecursionError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(payload, Mapping):
        raise ApiError(400, f"request body must be a JSON object, got {type(payload).__name__}")
    texts = _texts(payload, max_inputs)
    encoding_format = _choice(payload, "encoding_format", ENCODING_FORMATS, "float")
    input_type = _choice(payload, "input_type", INPUT_TYPES, "passage")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    dimensions = payload.get("dimensions")
    if dimensions is not None and dim is not None and dimensions != dim:
        raise ApiError(400, f"'dimensions' must be {dim} (this model's size) or left out, "
                            f"got {dimensions!r}", "dimensions")
    return EmbeddingRequest(texts=texts, input_type=cast(InputType, input_type),
                            encoding_format=cast(EncodingFormat, encoding_format), model=model)


def _texts(payload: Mapping[str, Any], max_inputs: int) -> list[str]:
    if "input" not in payload:
        raise ApiError(400, "missing 'input': a string or a list of strings", "input")
    raw = payload["input"]
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise ApiError(400, f"'input' must be a string or a list of strings, got "
                            f"{type(raw).__name__}", "input")
    if not items:
        raise ApiError(400, "'input' is an empty list", "input")
    if len(items) > max_inputs:
        raise ApiError(413, f"'input' has {len(items)} items; the limit is {max_inputs} per "
                            "request (split it into several requests)", "input")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            hint = (" (token ids are not accepted; send text — LangChain: "
                    "check_embedding_ctx_length=False)" if isinstance(item, (int, list)) else "")
            raise ApiError(400, f"input[{i}] is {type(item).__name__}, expected a string{hint}",
                           "input")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800" from JSON escapes
            raise ApiError(400, f"input[{i}] is not valid Unicode text", "input") from None
    return items


def _choice(payload: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = payload.get(key)
    if value is None:
        return default
    if value not in allowed:
        raise ApiError(400, f"'{key}' must be one of {list(allowed)}, got {value!r}", key)
    return value


def tokenize_request(encoder: Encoder, request: EmbeddingRequest) -> TokenizedRequest:
    """Token ids exactly as `encode` (passages) / `encode_queries` (queries) make them."""
    if request.input_type == "query":
        prefix = encoder.config.query_instruction or ""
        texts = [prefix + t for t in request.texts]
        rows, truncated = encoder.tokenize(texts, encoder.config.effective_query_max_length)
    else:
        rows, truncated = encoder.tokenize(request.texts)
    return TokenizedRequest(rows=rows, prompt_tokens=sum(len(r) for r in rows),
                            truncated=int(truncated.sum()))


def embedding_body(
    vectors: np.ndarray, tokens: TokenizedRequest, *, model: str, encoding_format: str
) -> bytes:
    """OpenAI's embeddings response for (n, D) float32 `vectors`, as JSON bytes.

    ``base64`` is the little-endian float32 bytes of each vector, as OpenAI sends it,
    encoded straight from the array: one `b64encode` of the whole (n, D) buffer, cut per
    vector when a vector's bytes are a multiple of 3 (D divisible by 3: 384, 768, 1,536),
    else one per vector; no lists of Python floats. ``usage.truncated_inputs`` (ours)
    counts inputs cut at the token limit.
    """
    vectors = np.ascontiguousarray(vectors, dtype="<f4")  # (n, D)
    if encoding_format == "base64":
        items = _base64_rows(vectors)
    else:
        items = [json.dumps(row).encode() for row in vectors.tolist()]
    data = b",".join(b'{"object":"embedding","index":%d,"embedding":%s}' % (i, e)
                     for i, e in enumerate(items))
    usage = {"prompt_tokens": tokens.prompt_tokens, "total_tokens": tokens.prompt_tokens,
             "truncated_inputs": tokens.truncated}
    return (b'{"object":"list","data":[' + data + b'],"model":' + json.dumps(model).encode()
            + b',"usage":' + json.dumps(usage).encode() + b"}")


def _base64_rows(vectors: np.ndarray) -> list[bytes]:
    """Quoted base64 of each row of a C-contiguous little-endian float32 (n, D) array."""
    row_bytes = vectors.shape[1] * 4
    if row_bytes % 3:  # base64 of a row would end mid-group: encode row by row
        return [b'"' + base64.b64encode(row) + b'"' for row in vectors]
    text = base64.b64encode(vectors.data)  # no padding inside: every row is whole groups
    step = row_bytes // 3 * 4
    return [b'"' + text[i:i + step] + b'"' for i in range(0, len(text), step)]


def models_response(model: str, created: int, dim: int) -> dict[str, Any]:
    """`GET /v1/models`: the one model this server embeds with."""
    entry = {"id": model, "object": "model", "created": created, "owned_by": "bge-ray",
             "dimensions": dim}
    return {"object": "list", "data": [entry]}


Encode = Callable[[list[list[int]]], Awaitable[np.ndarray]]  # token rows → (n, D) vectors


@dataclass(frozen=True, kw_only=True)
class ServedModel:
    """What a replica's routes need: the encoder, its public name, the key and the limits."""

    encoder: Encoder
    encode: Encode  # Serve's cross-request batcher in a replica, or any coroutine in tests
    name: str
    created: int
    api_key: str | None = None
    max_inputs: int = 512
    max_bytes: int = 8_000_000


def build_api(served: ServedModel) -> FastAPI:
    """The replica's HTTP app: ``GET /health`` open; ``/v1/models`` and ``/v1/embeddings``
    behind the key. Refusals (`ApiError`) answer in OpenAI's error shape."""
    api = FastAPI(title="bge-ray embeddings", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_exception_handler(ApiError, _refusal)  # type: ignore[arg-type]

    async def authorized(request: Request) -> None:
        check_auth(request.headers.get("authorization"), served.api_key)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @api.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": served.name})

    @v1.get("/models")
    async def models() -> JSONResponse:
        return JSONResponse(models_response(served.name, served.created, served.encoder.dim))

    def prepare(body: bytes) -> tuple[EmbeddingRequest, TokenizedRequest]:
        t0 = time.perf_counter()
        req = parse_request(body, max_inputs=served.max_inputs, max_bytes=served.max_bytes,
                            dim=served.encoder.dim)
        t1 = time.perf_counter()
        tokens = tokenize_request(served.encoder, req)
        note_stage("parse", t1 - t0)
        note_stage("tokenize", time.perf_counter() - t1)
        return req, tokens

    @v1.post("/embeddings")
    async def embeddings(request: Request) -> Response:
        stages: dict[str, float] = {}
        _STAGES.set(stages)  # this request's task only
        check_declared_size(request.headers.get("content-length"), served.max_bytes)
        body = await read_body(request.stream(), served.max_bytes)
        # parse + tokenise on a worker thread: the event loop keeps taking requests and the
        # encode thread keeps encoding (the tokenizer releases the GIL)
        # (to_thread copies this context, so its stages land in `stages`)
        req, tokens = await asyncio.to_thread(prepare, body)
        vectors = await served.encode(tokens.rows)  # (n, D)
        t0 = time.perf_counter()
        content = embedding_body(vectors, tokens, model=served.name,
                                 encoding_format=req.encoding_format)
        note_stage("serialize", time.perf_counter() - t0)
        return Response(content, media_type="application/json",
                        headers={"server-timing": server_timing(stages)})

    api.include_router(v1)
    return api


async def _refusal(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)
