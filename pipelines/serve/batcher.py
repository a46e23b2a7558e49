"""Cross-request batching by tokens: what one replica encodes in one `encode_tokenized` call.

Concurrent requests put their token rows on one FIFO queue; a single loop takes from its
front as many rows as fit a token budget (``max_tokens``, real tokens, not padded) and
encodes them in one call on a dedicated thread, so the event loop keeps reading, parsing
and answering requests meanwhile. A request with more tokens than the budget is split into
pieces that ride in consecutive batches, so one huge request neither fails nor holds a
batch of short queries behind it for long; a request that arrives while a batch encodes
waits at most ``wait_s`` past its arrival for company. Counting requests instead (Serve's
``max_batch_size``) made 32 one-line queries and 32 long passages the same batch size.

Ray-free: the replica (`pipelines.serve.main.Embedder`) owns one; tests drive it directly.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipelines.serve.api import note_stage

EncodeFn = Callable[[list[list[int]]], np.ndarray]  # token rows → (n, D) float32


@dataclass(eq=False)
class _Piece:
    """Consecutive rows of one request, as queued."""

    rows: list[list[int]]
    tokens: int
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its batch began encoding
    ended: float = 0.0


def split_by_tokens(rows: Sequence[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """`rows` in order, cut into runs of at most `max_tokens` tokens (a longer row alone)."""
    pieces: list[list[list[int]]] = []
    current: list[list[int]] = []
    size = 0
    for row in rows:
        if current and size + len(row) > max_tokens:
            pieces.append(current)
            current, size = [], 0
        current.append(row)
        size += len(row)
    if current:
        pieces.append(current)
    return pieces


class TokenBatcher:
    """One encode loop fed by many requests, batches bounded by tokens.

    Args:
        encode: the encoder call (blocking), run on the batcher's own thread.
        max_tokens: tokens (without padding) of one encoder call; the batch closes early
            when the queue holds this many.
        wait_s: how long a batch waits past its oldest piece's arrival for more.
    """

    def __init__(self, encode: EncodeFn, *, max_tokens: int, wait_s: float) -> None:
        if max_tokens < 1 or wait_s < 0:
            raise ValueError(f"max_tokens must be >= 1 and wait_s >= 0, got {max_tokens}, "
                             f"{wait_s}")
        self._encode = encode
        self.max_tokens = max_tokens
        self.wait_s = wait_s
        self._queue: deque[_Piece] = deque()
        self._queued_tokens = 0
        self._arrived = asyncio.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="encode")
        self._loop_task: asyncio.Task | None = None
        self.batches = 0  # encoder calls made (for tests and logs)

    async def encode(self, rows: list[list[int]]) -> np.ndarray:
        """Vectors (n, D) of one request's `rows`, encoded among other requests' rows."""
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._run())
        pieces = [_Piece(rows=chunk, tokens=sum(map(len, chunk)), future=loop.create_future())
                  for chunk in split_by_tokens(rows, self.max_tokens)]
        for piece in pieces:
            self._queue.append(piece)
            self._queued_tokens += piece.tokens
        self._arrived.set()
        try:
            parts = await asyncio.gather(*(p.future for p in pieces))
        except asyncio.CancelledError:  # the caller went away: its queued pieces are skipped
            for piece in pieces:
                piece.future.cancel()
            raise
        note_stage("queue", pieces[0].started - pieces[0].queued)
        note_stage("encode", sum(p.ended - p.started for p in pieces))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]  # (n, D)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            rows = [row for piece in batch for row in piece.rows]
            started = time.perf_counter()
            try:
                vectors = await loop.run_in_executor(self._thread, self._encode, rows)
            except Exception as err:  # every caller of the batch gets the error (a 500)
                for piece in batch:
                    if not piece.future.done():
                        piece.future.set_exception(err)
                continue
            ended = time.perf_counter()
            self.batches += 1
            offset = 0
            for piece in batch:
                piece.started, piece.ended = started, ended
                if not piece.future.done():
                    piece.future.set_result(vectors[offset:offset + len(piece.rows)])
                offset += len(piece.rows)

    async def _next_batch(self) -> list[_Piece]:
        """The front of the queue up to the token budget, once full or its wait is over."""
        while True:
            self._drop_cancelled()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            remaining = self._queue[0].queued + self.wait_s - time.perf_counter()
            if self._queued_tokens >= self.max_tokens or remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        batch, size = [], 0
        while self._queue and (not batch or size + self._queue[0].tokens <= self.max_tokens):
            piece = self._queue.popleft()
            self._queued_tokens -= piece.tokens
            if not piece.future.done():
                batch.append(piece)
                size += piece.tokens
        return batch or await self._next_batch()

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queued_tokens -= self._queue.popleft().tokens
