"""The replica's token batcher (`pipelines.serve.batcher`) without Ray: batches bounded by
tokens, big requests split across batches and answered in order, callers that leave skipped,
errors reaching every caller of the failed batch."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from pipelines.serve.api import _STAGES
from pipelines.serve.batcher import TokenBatcher, split_by_tokens


class FakeEncoder:
    """Records each call's rows; a row's vector is (first token id, row length)."""

    def __init__(self, gate: threading.Event | None = None, fail_on: int | None = None) -> None:
        self.calls: list[list[list[int]]] = []
        self.gate = gate
        self.fail_on = fail_on

    def __call__(self, rows: list[list[int]]) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(rows)
        if any(r[0] == self.fail_on for r in rows):
            raise RuntimeError("encoder failed")
        return np.array([[r[0], len(r)] for r in rows], dtype=np.float32)  # (n, 2)


def _rows(first: int, count: int, length: int) -> list[list[int]]:
    return [[first + i] + [0] * (length - 1) for i in range(count)]


def test_split_keeps_order_and_the_budget():
    rows = _rows(0, 5, 3) + _rows(10, 1, 9) + _rows(20, 2, 2)
    pieces = split_by_tokens(rows, 7)
    assert [r for p in pieces for r in p] == rows
    assert [sum(map(len, p)) for p in pieces] == [6, 6, 3, 9, 4]  # the 9-token row alone


def test_concurrent_requests_share_calls_bounded_by_tokens():
    async def main() -> tuple[FakeEncoder, list[np.ndarray]]:
        encoder = FakeEncoder()
        batcher = TokenBatcher(encoder, max_tokens=40, wait_s=0.05)
        requests = [_rows(100 * k, 4, 5) for k in range(6)]  # 20 tokens each
        answers = await asyncio.gather(*(batcher.encode(r) for r in requests))
        return encoder, answers

    encoder, answers = asyncio.run(main())
    for k, vectors in enumerate(answers):
        np.testing.assert_array_equal(vectors[:, 0], [100 * k + i for i in range(4)])
    assert [sum(map(len, call)) for call in encoder.calls] == [40, 40, 40]


def test_a_request_over_the_budget_is_split_and_reassembled_in_order():
    async def main() -> tuple[FakeEncoder, np.ndarray, dict[str, float]]:
        encoder = FakeEncoder()
        batcher = TokenBatcher(encoder, max_tokens=10, wait_s=0.0)
        stages: dict[str, float] = {}
        _STAGES.set(stages)
        vectors = await batcher.encode(_rows(0, 9, 4))  # 36 tokens, 2 rows per call
        return encoder, vectors, stages

    encoder, vectors, stages = asyncio.run(main())
    np.testing.assert_array_equal(vectors[:, 0], np.arange(9))
    assert [len(call) for call in encoder.calls] == [2, 2, 2, 2, 1]
    assert set(stages) == {"queue", "encode"} and min(stages.values()) >= 0


def test_requests_arriving_during_an_encode_join_the_next_call():
    async def main() -> FakeEncoder:
        gate = threading.Event()
        encoder = FakeEncoder(gate)
        batcher = TokenBatcher(encoder, max_tokens=1000, wait_s=0.0)
        first = asyncio.ensure_future(batcher.encode(_rows(0, 1, 3)))
        await asyncio.sleep(0.05)  # the first call is running (held at the gate)
        later = [asyncio.ensure_future(batcher.encode(_rows(10 * k, 2, 3))) for k in (1, 2, 3)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *later)
        return encoder

    encoder = asyncio.run(main())
    assert [len(call) for call in encoder.calls] == [1, 6]


def test_a_caller_that_left_is_skipped_and_errors_reach_the_whole_batch():
    async def main() -> tuple[FakeEncoder, list[object]]:
        gate = threading.Event()
        encoder = FakeEncoder(gate, fail_on=7)
        batcher = TokenBatcher(encoder, max_tokens=1000, wait_s=0.0)
        busy = asyncio.ensure_future(batcher.encode(_rows(0, 1, 2)))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.encode(_rows(50, 1, 2)))
        doomed = [asyncio.ensure_future(batcher.encode(_rows(f, 1, 2))) for f in (7, 8)]
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.set()
        results = await asyncio.gather(busy, *doomed, return_exceptions=True)
        after = await batcher.encode(_rows(9, 1, 2))  # the loop survived the error
        return encoder, [*results, after]

    encoder, (busy, failed_a, failed_b, after) = asyncio.run(main())
    assert isinstance(busy, np.ndarray) and isinstance(after, np.ndarray)
    assert isinstance(failed_a, RuntimeError) and isinstance(failed_b, RuntimeError)
    assert [[r[0] for r in call] for call in encoder.calls] == [[0], [7, 8], [9]]  # no 50


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBatcher(FakeEncoder(), max_tokens=0, wait_s=0.0)
