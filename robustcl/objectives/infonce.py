"""InfoNCE / NT-Xent (SimCLR) over two stacked views, with an optional cross-rank gather."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, keeping the gradient to the local rows.

    `torch.distributed.nn.all_gather` back-propagates to each rank's own slice, so the loss on the
    gathered batch equals the single-process loss on the concatenated global batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def info_nce(u: torch.Tensor, v: torch.Tensor, temperature: float = 0.5,
             gather: Gather | None = None) -> torch.Tensor:
    """NT-Xent over the 2N rows [u; v]: row i's positive is its twin, the other 2N-2 rows are negatives.

    `u`, `v` are (N, d) embeddings (normalised here, in fp32). The loss is averaged over the 2N rows.
    With `gather` (e.g. `gather_with_grad`) the negatives come from the global batch across ranks
    and the result equals the single-process loss on the concatenated global batch.
    """
    if u.shape != v.shape or u.dim() != 2:
        raise ValueError(f"info_nce needs two (N, d) tensors of equal shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    u = F.normalize(u.float(), dim=1)
    v = F.normalize(v.float(), dim=1)
    n_local = u.shape[0]
    offset = 0
    if gather is not None:
        u_all, v_all = gather(u), gather(v)
        if dist.is_available() and dist.is_initialized():
            offset = dist.get_rank() * n_local
    else:
        u_all, v_all = u, v
    n = u_all.shape[0]
    keys = torch.cat([u_all, v_all], dim=0)                      # (2n, d)
    queries = torch.cat([u, v], dim=0)                           # (2N_local, d): this rank's rows
    logits = queries @ keys.T / temperature                      # (2N_local, 2n)
    local = torch.arange(n_local, device=u.device) + offset
    rows = torch.cat([local, local + n])                         # each query's own index in keys
    positives = torch.cat([local + n, local])                    # its twin's index
    logits = logits.masked_fill(F.one_hot(rows, 2 * n).bool(), float("-inf"))
    loss = F.cross_entropy(logits, positives, reduction="sum") / (2 * n_local)
    return loss
