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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bge_core.distributed import all_gather_with_grad, get_rank

DEFAULT_TEMPERATURE = 0.02  # FlagEmbedding 1.0.x used 0.01; 0.02 is the BGE release default


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    *,
    group_size: int,
    temperature: float = DEFAULT_TEMPERATURE,
    use_inbatch_neg: bool = True,
    negatives_cross_device: bool = False,
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
        return F.cross_entropy(_at_least_fp32(logits), labels)
    offset = 0
    if negatives_cross_device:
        p = all_gather_with_grad(p)  # (W*B*G, D); W == 1 returns p itself
        offset = get_rank() * batch * group_size
    logits = q @ p.T / temperature  # (B, W*B*G) or (B, B*G)
    labels = offset + torch.arange(batch, device=q.device) * group_size  # (B,)
    return F.cross_entropy(_at_least_fp32(logits), labels)


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in fp32 even under bf16/fp16 autocast (fp64 stays fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
