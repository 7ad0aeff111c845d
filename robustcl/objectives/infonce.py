"""InfoNCE / NT-Xent (SimCLR) over two stacked views, with an optional cross-rank gather."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]

_DEFAULT_GATHER: contextvars.ContextVar[Gather | None] = contextvars.ContextVar("robustcl_gather", default=None)


@contextlib.contextmanager
def default_gather(gather: Gather | None) -> Iterator[None]:
    """Inside the block, `info_nce` / `multi_positive_nce` calls that pass no `gather` use this one.

    Phase-1 training enters it with `robustcl.distributed.gather_with_grad` when the job has more than
    one rank, so every method's contrastive terms (and its attack's) take their negatives from the
    global batch without each method threading a `gather` argument through; None (a single process)
    changes nothing.
    """
    token = _DEFAULT_GATHER.set(gather)
    try:
        yield
    finally:
        _DEFAULT_GATHER.reset(token)


def current_gather() -> Gather | None:
    """The gather set by the innermost `default_gather` block (None outside one): for losses written elsewhere."""
    return _DEFAULT_GATHER.get()


def info_nce(u: torch.Tensor, v: torch.Tensor, temperature: float = 0.5,
             gather: Gather | None = None) -> torch.Tensor:
    """NT-Xent over the 2N rows [u; v]: row i's positive is its twin, the other 2N-2 rows are negatives.

    `u`, `v` are (N, d) embeddings (normalised here, in fp32). The loss is averaged over the 2N rows.
    With `gather` (e.g. `robustcl.distributed.gather_with_grad`; default: the one set by
    `default_gather`) the keys, hence the negatives, are the global batch of all ranks (rank-order
    concatenation, equal N per rank), while the queries stay this rank's 2N rows: rank r returns
    L_r, the mean over its own rows of the global-batch loss, so mean_r L_r equals the
    single-process loss on the concatenated batch, and (the gather's backward summing over ranks)
    the MEAN over ranks of the parameter gradients equals the single-process gradient.
    `robustcl.distributed` relies on exactly this.
    """
    if u.shape != v.shape or u.dim() != 2:
        raise ValueError(f"info_nce needs two (N, d) tensors of equal shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    u = F.normalize(u.float(), dim=1)
    v = F.normalize(v.float(), dim=1)
    n_local = u.shape[0]
    offset = 0
    gather = gather if gather is not None else current_gather()
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


def multi_positive_nce(views: list[torch.Tensor] | tuple[torch.Tensor, ...], temperature: float = 0.5,
                       gather: Gather | None = None) -> torch.Tensor:
    """NT-Xent with V views per image (SupCon's "out" form): every other view of a row's image is a positive.

    Rows are the V*N stacked embeddings; for row i with positives P(i) (the V-1 other views of its
    image) the loss is mean_{p in P(i)} -log( exp(s_ip/tau) / sum_{k != i} exp(s_ik/tau) ),
    averaged over all rows. With V = 2 it equals `info_nce`. `gather` (and its default from
    `default_gather`) works as in `info_nce`: queries are this rank's rows, keys the global batch.
    """
    views = list(views)
    if len(views) < 2 or any(v.dim() != 2 or v.shape != views[0].shape for v in views):
        shapes = [tuple(v.shape) for v in views]
        raise ValueError(f"multi_positive_nce needs >= 2 (N, d) tensors of equal shape, got {shapes}")
    zs = [F.normalize(v.float(), dim=1) for v in views]
    n_views, n_local = len(zs), zs[0].shape[0]
    offset = 0
    gather = gather if gather is not None else current_gather()
    if gather is not None:
        key_views = [gather(z) for z in zs]
        if dist.is_available() and dist.is_initialized():
            offset = dist.get_rank() * n_local
    else:
        key_views = zs
    n = key_views[0].shape[0]
    keys, queries = torch.cat(key_views), torch.cat(zs)             # (V n, d), (V N_local, d)
    logits = queries @ keys.T / temperature
    local = torch.arange(n_local, device=queries.device) + offset
    rows = torch.cat([local + a * n for a in range(n_views)])      # each query's own index in keys
    self_mask = F.one_hot(rows, n_views * n).bool()
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    key_image = torch.arange(n, device=queries.device).repeat(n_views)
    positive = (local.repeat(n_views)[:, None] == key_image[None, :]) & ~self_mask
    per_row = log_prob.masked_fill(~positive, 0.0).sum(1) / (n_views - 1)
    return -per_row.mean()
