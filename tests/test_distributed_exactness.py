"""W = 2 real gloo processes under DDP equal one process on the concatenated global batch.

Each rank embeds its half of the global batch, gathers candidates with gradients
(`negatives_cross_device`), and back-propagates; DDP averages the gradients. The loss
(mean over ranks) and every parameter gradient must equal the single-process loss and
gradients on the whole batch. Dropout is off (eval mode) so both sides are deterministic.
"""

from __future__ import annotations

import datetime
import functools
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bge_core.batching import pad_batch
from bge_core.data import text_key
from bge_core.grad_cache import TokenBatch, contrastive_step
from bge_core.losses import info_nce
from bge_core.model import Encoder
from tests.tiny_models import WORDS

WORLD, LOCAL_B, GROUP = 2, 3, 3
CASES = (  # (use_inbatch_neg, gradient_cache_chunk_size, mask listed positives)
    (True, None, False), (False, None, False), (True, 2, False), (True, None, True),
    (True, 2, True),
)


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) for _ in range(n)]


def _batch(encoder: Encoder, texts: list[str]) -> TokenBatch:
    ids, _ = encoder.tokenize(texts, 32)
    return TokenBatch(*pad_batch(ids, encoder.tokenizer.pad_token_id))


def _listed(passages: list[str], rows: slice, p_rows: slice) -> dict[str, torch.Tensor]:
    """Query i lists its own positive, the next query's positive and a negative of the
    query after that (so a rank's queries list passages of the other rank)."""
    n, keys = WORLD * LOCAL_B, [text_key(t) for t in passages]
    listed = [[keys[i * GROUP], keys[(i + 1) % n * GROUP], keys[(i + 2) % n * GROUP + 1]]
              for i in range(n)]
    return {"positive_keys": torch.tensor(listed[rows]),
            "passage_keys": torch.tensor(keys[p_rows])}


def _loss_and_grads(model, encoder: Encoder, rows: slice, inbatch: bool, chunk: int | None,
                    masked: bool):
    queries, passages = _texts(WORLD * LOCAL_B, 1), _texts(WORLD * LOCAL_B * GROUP, 2)
    p_rows = slice(rows.start * GROUP, rows.stop * GROUP)
    loss_fn = functools.partial(info_nce, group_size=GROUP, temperature=0.01,
                                use_inbatch_neg=inbatch, negatives_cross_device=True,
                                **(_listed(passages, rows, p_rows) if masked else {}))
    encoder.zero_grad(set_to_none=True)
    loss = contrastive_step(model, _batch(encoder, queries[rows]),
                            _batch(encoder, passages[p_rows]), loss_fn, chunk)
    grads = {n: p.grad.detach().clone() for n, p in encoder.named_parameters()
             if p.grad is not None}
    return float(loss), grads


def _worker(rank: int, model_dir: str, store: str, out_dir: str) -> None:
    # a bounded wait: a stuck rendezvous or collective raises instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=45))
    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(model_dir, device="cpu", pooling="mean")  # eval()
    model = torch.nn.parallel.DistributedDataParallel(encoder)
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    results = [_loss_and_grads(model, encoder, rows, *case) for case in CASES]
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_gloo_ranks_equal_one_process_on_global_batch(tiny_bert_dir, tmp_path):
    # Once in ~10 full-suite runs on the 2-core VM a gloo process stalled (never alone, in
    # dozens of runs; no wrong result was ever seen). A stall times out above and the two
    # processes run once more on a fresh store; the equivalence checks below are unchanged.
    for attempt in range(2):
        try:
            mp.spawn(_worker, args=(str(tiny_bert_dir), str(tmp_path / f"store{attempt}"),
                                    str(tmp_path)), nprocs=WORLD, join=True)
            break
        except mp.ProcessRaisedException:
            if attempt:
                raise
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert per_rank[0][3][0] != pytest.approx(per_rank[0][0][0], rel=1e-6)  # the mask acts
    encoder = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling="mean")
    for case_index, (inbatch, chunk, masked) in enumerate(CASES):
        ref_loss, ref_grads = _loss_and_grads(encoder, encoder, slice(0, WORLD * LOCAL_B),
                                              inbatch, None, masked)
        rank_losses = [results[case_index][0] for results in per_rank]
        assert sum(rank_losses) / WORLD == pytest.approx(ref_loss, rel=1e-5), (inbatch, chunk)
        assert rank_losses[0] != pytest.approx(rank_losses[1], rel=1e-6)  # ranks differ
        assert ref_grads, "no gradients reached the parameters"
        for name, ref in ref_grads.items():
            for results in per_rank:  # DDP leaves the averaged gradient on every rank
                got = results[case_index][1][name]
                # 1e-9 floor: e.g. attention key biases get an analytically zero gradient.
                bound = 1e-5 * ref.abs().max() + 1e-9
                assert (got - ref).abs().max() <= bound, (name, inbatch, chunk)
