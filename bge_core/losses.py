"""InfoNCE over query groups (BGE / FlagEmbedding contrastive finetuning).

Each query owns a group of ``G`` passages: its positive first, then ``G - 1`` negatives.
Paper: van den Oord et al., "Representation Learning with Contrastive Predictive Coding"
(2018); the BGE recipe: Xiao et al., "C-Pack: Packaged Resources To Advance General Chinese
Embedding" (2023).

World-size scaling (``negatives_cross_device=True``). Let W ranks hold B queries each, so
the global batch has N = W·B queries and N·G candidates. Rank r gathers every candidate
WITH gradients, keeps its own B queries as anchors and computes a B × (W·B·G) logit block
with labels offset by ``r·B·G``. Its loss L_r = (1/B) Σ_{i∈r} ℓ_i, where ℓ_i is exactly
the cross-entropy query i has in the single-process loss on the global batch,
L = (1/N) Σ_i ℓ_i. Hence L = (1/W) Σ_r L_r: the global loss is the MEAN of the rank
losses. For gradients, rank r's backward gives ∂L_r/∂q_r for its queries and, through the
gather's backward (a sum over ranks), Σ_s ∂L_s/∂p_r for its passages; summed over ranks
that is ∂(Σ_s L_s)/∂θ = W · ∂L/∂θ. DDP averages gradients (÷W), so every rank ends the
step with exactly ∂L/∂θ of the single-process global batch: no rescaling by W is needed
(and none must be added). ``tests/test_distributed_exactness.py`` checks this with W = 2.

Without cross-device negatives each rank's loss only involves its own candidates, so the
same mean-of-ranks identity holds with the per-rank candidate set.

Listed positives (``positive_keys``, ``passage_keys``): a candidate whose text is listed
among a query's positives is not one of its negatives; its logit is left out of the
softmax (set to the dtype's minimum), except the query's own target. With in-batch
negatives a batch often holds such passages: another query's positive or negative that is
judged relevant to this one too (on NFCorpus train, 26% of the queries in a batch of 32
with group 2 meet one of their own listed positives among their negatives). The keys are
text hashes (`bge_core.data.text_key`); they are gathered with the candidates, so the
mean-of-ranks identity above is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bge_core.distributed import all_gather_with_grad, all_gather_without_grad, get_rank

DEFAULT_TEMPERATURE = 0.02  # FlagEmbedding 1.0.x used 0.01; 0.02 is the BGE release default


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    *,
    group_size: int,
    temperature: float = DEFAULT_TEMPERATURE,
    use_inbatch_neg: bool = True,
    negatives_cross_device: bool = False,
    positive_keys: torch.Tensor | None = None,
    passage_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss of the local queries.

    Args:
        q: (B, D) query embeddings of this rank.
        p: (B*G, D) passage embeddings; rows ``i*G .. i*G+G-1`` are query i's group,
            positive first.
        group_size: G, passages per query (1 positive + G-1 negatives).
        temperature: logits are ``q·p / temperature``.
        use_inbatch_neg: score each query against every passage of the batch (B·G
            candidates) instead of only its own group (G candidates).
        negatives_cross_device: with in-batch negatives, gather the candidates of all
            ranks (with gradients): B × (W·B·G) logits per rank.
        positive_keys: optional (B, P) int64 keys of each query's listed positives (pad a
            row by repeating one of its keys); with `passage_keys`, candidates whose key is
            in a query's row are masked out of its softmax (its own target kept).
        passage_keys: (B*G,) int64 keys of `p`'s rows.

    Returns:
        Scalar loss (mean over the B local queries).
    """
    batch = q.shape[0]
    if p.shape[0] != batch * group_size:
        raise ValueError(f"expected {batch}*{group_size} passages, got {p.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not use_inbatch_neg:
        groups = p.view(batch, group_size, -1)  # (B, G, D)
        logits = torch.einsum("bd,bgd->bg", q, groups) / temperature  # (B, G)
        labels = torch.zeros(batch, dtype=torch.long, device=q.device)  # positive first
        if positive_keys is not None and passage_keys is not None:
            candidates = passage_keys.view(batch, group_size)  # each query its own group
            return _masked_cross_entropy(logits, labels, positive_keys, candidates)
        return F.cross_entropy(_at_least_fp32(logits), labels)
    offset = 0
    if negatives_cross_device:
        p = all_gather_with_grad(p)  # (W*B*G, D); W == 1 returns p itself
        if passage_keys is not None:
            passage_keys = all_gather_without_grad(passage_keys)  # (W*B*G,), same order
        offset = get_rank() * batch * group_size
    logits = q @ p.T / temperature  # (B, W*B*G) or (B, B*G)
    labels = offset + torch.arange(batch, device=q.device) * group_size  # (B,)
    if positive_keys is not None and passage_keys is not None:
        return _masked_cross_entropy(logits, labels, positive_keys, passage_keys)
    return F.cross_entropy(_at_least_fp32(logits), labels)


def listed_positive_mask(positive_keys: torch.Tensor, candidate_keys: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
    """(B, C) True where candidate c is one of query b's listed positives but not its target.

    Args:
        positive_keys: (B, P) keys of each query's listed positives.
        candidate_keys: (C,) keys of the candidates every query is scored against, or
            (B, C): each query its own.
        labels: (B,) each query's target column.
    """
    batch = positive_keys.shape[0]
    if candidate_keys.dim() == 1:
        # compare only the columns listed by some query: B × C × P would not fit at scale
        mask = torch.zeros(batch, candidate_keys.shape[0], dtype=torch.bool,
                           device=candidate_keys.device)
        columns = torch.isin(candidate_keys, positive_keys).nonzero().squeeze(1)  # (K,)
        listed = candidate_keys[columns][None, :, None] == positive_keys[:, None, :]
        mask[:, columns] = listed.any(dim=2)  # (B, K)
    else:
        mask = (candidate_keys[:, :, None] == positive_keys[:, None, :]).any(dim=2)
    mask[torch.arange(batch, device=mask.device), labels] = False
    return mask


def _masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                          positive_keys: torch.Tensor,
                          candidate_keys: torch.Tensor) -> torch.Tensor:
    logits = _at_least_fp32(logits)
    mask = listed_positive_mask(positive_keys.to(logits.device),
                               candidate_keys.to(logits.device), labels)
    return F.cross_entropy(logits.masked_fill(mask, torch.finfo(logits.dtype).min), labels)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in fp32 even under bf16/fp16 autocast (fp64 stays fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
