"""InfoNCE over groups against a per-query loop written from the definition."""

from __future__ import annotations

import math

import pytest
import torch

from bge_core.losses import DEFAULT_TEMPERATURE, info_nce


def _reference(q, p, group, temperature, inbatch, dropped=None):
    """-log softmax of the positive, one query at a time; `dropped[i]`: the candidate
    indices (of the candidates query i sees) left out of its softmax."""
    losses = []
    for i in range(q.shape[0]):
        cands = p if inbatch else p[i * group : (i + 1) * group]
        pos = i * group if inbatch else 0
        scores = [float(q[i] @ c) / temperature for j, c in enumerate(cands)
                  if j not in (dropped or {}).get(i, ())]
        pos -= sum(1 for j in (dropped or {}).get(i, ()) if j < pos)
        top = max(scores)
        log_z = top + math.log(sum(math.exp(s - top) for s in scores))
        losses.append(log_z - scores[pos])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("inbatch", [True, False])
@pytest.mark.parametrize("temperature", [0.01, 0.02, 1.0])
def test_info_nce_matches_definition(inbatch, temperature):
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(12, 8, dtype=torch.float64), dim=-1)
    got = info_nce(q, p, group_size=3, temperature=temperature, use_inbatch_neg=inbatch)
    assert float(got) == pytest.approx(_reference(q, p, 3, temperature, inbatch), rel=1e-9)


@pytest.mark.parametrize("inbatch", [True, False])
def test_listed_positives_leave_the_softmax(inbatch):
    torch.manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(9, 8, dtype=torch.float64), dim=-1)
    passage_keys = torch.tensor([10, 11, 12, 20, 21, 22, 30, 31, 32])  # group i: 10i..10i+2
    # query 0 lists passage 20 (query 1's positive) and 31; query 1 lists only its own;
    # query 2 lists 12, a passage of its own group (a negative also listed as positive),
    # and 99 (in no batch); rows padded with their own positive's key
    positive_keys = torch.tensor([[10, 20, 31], [20, 20, 20], [30, 12, 99]])
    got = info_nce(q, p, group_size=3, temperature=0.5, use_inbatch_neg=inbatch,
                   positive_keys=positive_keys, passage_keys=passage_keys)
    dropped = {0: {3, 7}, 2: {2}} if inbatch else {}  # in-group only: none of those meet
    assert float(got) == pytest.approx(_reference(q, p, 3, 0.5, inbatch, dropped), rel=1e-9)
    plain = info_nce(q, p, group_size=3, temperature=0.5, use_inbatch_neg=inbatch)
    assert abs(float(got) - float(plain)) > 1e-3 or not inbatch
    # a query's own target is never dropped, even when another row lists it
    own = info_nce(q, p, group_size=3, temperature=0.5, use_inbatch_neg=inbatch,
                   positive_keys=torch.tensor([[10], [20], [30]]), passage_keys=passage_keys)
    assert torch.equal(own, plain)


def test_listed_positive_in_own_group_is_dropped_without_in_batch():
    torch.manual_seed(3)
    q, p = torch.randn(2, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    keys = torch.tensor([1, 2, 3, 4])  # query 1 lists its own negative (key 4)
    got = info_nce(q, p, group_size=2, temperature=0.5, use_inbatch_neg=False,
                   positive_keys=torch.tensor([[1], [4]]), passage_keys=keys)
    assert float(got) == pytest.approx(_reference(q, p, 2, 0.5, False, {1: {1}}), rel=1e-9)


def test_cross_device_on_one_process_is_the_in_batch_loss():
    torch.manual_seed(1)
    q, p = torch.randn(3, 5), torch.randn(6, 5)
    plain = info_nce(q, p, group_size=2, use_inbatch_neg=True)
    gathered = info_nce(q, p, group_size=2, use_inbatch_neg=True, negatives_cross_device=True)
    assert torch.equal(plain, gathered)


def test_perfect_separation_gives_near_zero_loss_and_default_temperature():
    q = torch.eye(3)
    p = torch.zeros(6, 3)
    p[0::2] = torch.eye(3)  # positives equal their query, negatives are orthogonal (0)
    assert DEFAULT_TEMPERATURE == 0.02
    assert float(info_nce(q, p, group_size=2)) < 1e-10
    assert float(info_nce(q, p, group_size=2, temperature=1.0)) > 0.5  # softer at T = 1


def test_gradients_equal_cross_entropy_over_explicit_logits():
    torch.manual_seed(0)
    q = torch.randn(2, 4, requires_grad=True)
    p = torch.randn(4, 4, requires_grad=True)
    info_nce(q, p, group_size=2, temperature=0.05).backward()
    q_ref, p_ref = q.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    # query i's positive is passage i * group_size; every other passage is a negative
    torch.nn.functional.cross_entropy(q_ref @ p_ref.T / 0.05, torch.tensor([0, 2])).backward()
    torch.testing.assert_close(q.grad, q_ref.grad)
    torch.testing.assert_close(p.grad, p_ref.grad)
    assert bool(q.grad.any()) and bool(p.grad.any())


@pytest.mark.parametrize("kwargs, message", [
    ({"group_size": 3}, "passages"),
    ({"group_size": 2, "temperature": 0.0}, "temperature"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        info_nce(torch.randn(2, 4), torch.randn(4, 4), **kwargs)
