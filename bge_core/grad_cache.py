"""One contrastive training step, plain or with a gradient cache (GradCache).

The gradient cache computes the loss of a batch far larger than activation memory allows
(Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
2021) in three phases:

1. embed every chunk WITHOUT a graph, remembering each chunk's RNG state;
2. compute the loss on the detached embeddings and its gradient w.r.t. them;
3. re-embed chunk by chunk WITH a graph, replaying the saved RNG state (so dropout draws
   the same masks as in phase 1), and back-propagate the cached embedding gradients.

The result equals the plain step's loss and parameter gradients for the same dropout masks.
Under DDP, all chunks but the last run inside ``no_sync()`` so gradients are all-reduced
once, after the last chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AutocastFactory = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch of token ids: (N, T) `input_ids` and `attention_mask`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device, non_blocking=True),
                          self.attention_mask.to(device, non_blocking=True))

    def chunks(self, size: int) -> list[TokenBatch]:
        """Consecutive row chunks of at most `size` rows, each trimmed to its longest row."""
        out = []
        for start in range(0, self.input_ids.shape[0], size):
            mask = self.attention_mask[start : start + size]  # (c, T)
            width = max(int(mask.sum(dim=1).max()), 1)
            out.append(TokenBatch(self.input_ids[start : start + size, :width], mask[:, :width]))
        return out


class RngState:
    """The CPU and CUDA random states at one moment, to replay dropout later."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.cuda_device else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the saved state, restoring the current state afterwards."""
        devices = [self.cuda_device] if self.cuda_device else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda_device is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (phase 1 needs no gradient synchronisation)."""
    return getattr(model, "module", model)


def plain_step(
    model: nn.Module, queries: TokenBatch, passages: TokenBatch, loss_fn: LossFn,
    autocast: AutocastFactory = contextlib.nullcontext,
) -> torch.Tensor:
    """Embed queries and passages with a graph, compute the loss, back-propagate it.

    Returns:
        The detached scalar loss.
    """
    with autocast():
        q = model(queries.input_ids, queries.attention_mask)  # (B, D)
        p = model(passages.input_ids, passages.attention_mask)  # (B*G, D)
    loss = loss_fn(q.float(), p.float())
    loss.backward()
    return loss.detach()


def cached_step(
    model: nn.Module, queries: TokenBatch, passages: TokenBatch, loss_fn: LossFn,
    chunk_size: int, autocast: AutocastFactory = contextlib.nullcontext,
) -> torch.Tensor:
    """The gradient-cache step: same loss and gradients as `plain_step`, fixed memory.

    Args:
        model: the encoder (or its DDP wrapper): `model(ids, mask)` → (N, D).
        queries: (B, Tq) query tokens; passages: (B*G, Tp) passage tokens.
        loss_fn: `(q (B, D), p (B*G, D))` → scalar loss.
        chunk_size: rows embedded at once in phases 1 and 3.
        autocast: factory of the autocast context for the forward passes.

    Returns:
        The detached scalar loss.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = queries.input_ids.device
    q_chunks, p_chunks = queries.chunks(chunk_size), passages.chunks(chunk_size)
    chunks = q_chunks + p_chunks

    # Phase 1: embed without a graph, saving the RNG state before each chunk.
    states, embeddings = [], []
    inner = _unwrap(model)
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState(device))
            with autocast():
                embeddings.append(inner(chunk.input_ids, chunk.attention_mask).float())

    # Phase 2: loss on detached embeddings; cache its gradient w.r.t. each embedding.
    q = torch.cat(embeddings[: len(q_chunks)]).requires_grad_()  # (B, D)
    p = torch.cat(embeddings[len(q_chunks) :]).requires_grad_()  # (B*G, D)
    loss = loss_fn(q, p)
    loss.backward()
    grads = list(q.grad.split([c.input_ids.shape[0] for c in q_chunks]))
    grads += list(p.grad.split([c.input_ids.shape[0] for c in p_chunks]))

    # Phase 3: re-embed with a graph under the replayed RNG state; back-propagate the
    # cached gradients. Gradients are synchronised (DDP) only on the last chunk.
    sync_off = getattr(model, "no_sync", contextlib.nullcontext)
    for i, (chunk, state, grad) in enumerate(zip(chunks, states, grads, strict=True)):
        last = i == len(chunks) - 1
        with contextlib.nullcontext() if last else sync_off(), state.replay():
            with autocast():
                emb = model(chunk.input_ids, chunk.attention_mask).float()  # (c, D)
            emb.backward(grad)
    return loss.detach()


def contrastive_step(
    model: nn.Module, queries: TokenBatch, passages: TokenBatch, loss_fn: LossFn,
    chunk_size: int | None = None, autocast: AutocastFactory = contextlib.nullcontext,
) -> torch.Tensor:
    """`cached_step` when `chunk_size` is set, else `plain_step`."""
    if chunk_size:
        return cached_step(model, queries, passages, loss_fn, chunk_size, autocast)
    return plain_step(model, queries, passages, loss_fn, autocast)
