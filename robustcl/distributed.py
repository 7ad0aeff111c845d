"""Data-parallel phase 1 over torch.distributed (launched by torchrun): the job's ranks and its collectives.

One code path: a single process is a job of world size 1, where every collective here is a no-op,
so a run without torchrun is bit-identical to one before this module existed.

How a step is split (see `robustcl.train.pretrain.Pretrainer`): `train.batch_size` is the global
batch; every rank draws the same seeded permutation and takes a contiguous 1/world of the step's
rows (`Distributed.shard`), so the ranks' shards concatenated in rank order are the single-process
batch. Views and attack noise come from a per-rank generator (`rank_seed`).

Why the gradients are AVERAGED over ranks, and why that is exact. Every loss term on rank r is a
per-rank value L_r whose mean over ranks is the single-process term L on the global batch: per-row
means (the critic's loss, the divergence bound) over equal shards trivially, and InfoNCE with
gathered keys (`robustcl.objectives.infonce`) because it averages the global-batch loss over this
rank's query rows only. The cross-rank couplings are autograd collectives whose backward SUMS over
ranks (`all_gather_with_grad` for InfoNCE's keys, `all_reduce_with_grad` for the statistics of
`robustcl.models.dual_bn.CrossRankBatchNorm2d`): each rank receives d(sum_s L_s)/d(its activations).
Rank r's parameter gradient is therefore its share of d(sum_s L_s)/d theta; summed over ranks that
is d(sum_s L_s)/d theta = world * dL/d theta, so the MEAN all-reduce gives exactly the
single-process gradient (up to float summation order). A SUM all-reduce would be right only if
every rank computed the whole global loss (all 2n queries) with a gather whose backward did not sum.
PGD's input gradient on rank r is world * the single-process one (every term alike), so its sign
steps are unchanged.

Why no DistributedDataParallel: SAM takes `autograd.grad` of some terms, moves the weights and
back-propagates a second pass; DDP's reducer fires on every backward and cannot tell these apart.
`robustcl.methods.step.StepContext` all-reduces gradients explicitly, coalesced into buckets, just
before each optimiser step (and SAM's ascent gradient before it is used).
"""
from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from robustcl.config import ConfigError
from robustcl.runs import RunError

T = TypeVar("T")

BUCKET_BYTES = 32 * 2**20   # at most this much of one dtype flattened per collective
VIEW_SEED_STRIDE = 104_729  # rank r's view generator is seeded with seed + r * this (rank 0: the seed itself)
ENV_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's (equal-shaped) tensor along dim 0; the backward returns this rank's rows
    of the gradient summed over ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total[ctx.rows]


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """sum_r x_r on every rank, differentiable: rank r's input receives the gradient summed over ranks,
    d(sum_s L_s)/d x_r (cross-rank batch norm's statistics)."""
    return _AllReduceSum.apply(x) if dist.is_available() and dist.is_initialized() else x


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[x_0; x_1; ...] (rank order) on every rank, differentiable: rank r's input receives its rows of
    the gradient summed over ranks, d(sum_s L_s)/d x_r (InfoNCE's keys)."""
    return _AllGatherRows.apply(x) if dist.is_available() and dist.is_initialized() else x


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order), keeping the gradient to the local rows.

    The backward sums, over ranks, the gradient each rank's loss sends to a slice and hands it to the
    slice's owner: rank r receives d(sum_s L_s)/d x_r, where L_s is rank s's loss. See
    `robustcl.objectives.infonce.info_nce` for how that sum is scaled. A single process gets `x` back.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return all_gather_with_grad(x)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s view/attack generator: the run seed on rank 0, distinct streams elsewhere."""
    return seed + rank * VIEW_SEED_STRIDE


def _buckets(tensors: Sequence[torch.Tensor], cap: int = BUCKET_BYTES) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of same-device, same-dtype tensors of at most `cap` bytes (one tensor may exceed it)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > cap:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            yield bucket


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (rank, world size, local rank) and the collectives training needs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> "Distributed":
        """The initialised default process group's view of this process, or a single process."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank = dist.get_rank()
        return cls(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, checkpoints and exports."""
        return self.rank == 0

    @property
    def gather(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """InfoNCE's key gather across ranks (None for a single process)."""
        return gather_with_grad if self.world > 1 else None

    def device(self, device: torch.device) -> torch.device:
        """Under several ranks, a CUDA device becomes this rank's GPU (cuda:LOCAL_RANK); others unchanged."""
        if self.world == 1 or device.type != "cuda":
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise RunError(f"local rank {self.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                           "start at most one process per GPU (torchrun --nproc_per_node)")
        return torch.device("cuda", self.local_rank)

    def shard(self, batch_size: int) -> slice:
        """This rank's contiguous rows of a global batch of `batch_size` (which the world size must divide)."""
        if batch_size % self.world:
            raise ConfigError(f"config value train.batch_size={batch_size} is not divisible by the {self.world} "
                              f"ranks of this job; use a multiple of {self.world}")
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    # ------------------------------------------------------------------ tensor collectives
    def _coalesced(self, tensors: Iterable[torch.Tensor | None], op: Callable[[torch.Tensor], None]) -> None:
        """Apply the in-place collective `op` to `tensors` (None skipped), flattened bucket by bucket."""
        present = [t for t in tensors if t is not None]
        for bucket in _buckets(present):
            flat = _flatten_dense_tensors(bucket)
            op(flat)
            for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(synced)

    @torch.no_grad()
    def all_reduce_mean_(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Replace each tensor by its mean over ranks, in place (None entries skipped; same layout on every rank)."""
        if self.world == 1:
            return

        def mean(flat: torch.Tensor) -> None:
            dist.all_reduce(flat)
            flat.div_(self.world)

        self._coalesced(tensors, mean)

    def all_reduce_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Average `.grad` of `params` over ranks (parameters without a gradient are skipped on every rank alike)."""
        if self.world > 1:
            self.all_reduce_mean_([p.grad for p in params])

    @torch.no_grad()
    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite `tensors` in place with rank 0's values."""
        if self.world > 1:
            self._coalesced(tensors, lambda flat: dist.broadcast(flat, src=0))

    # ------------------------------------------------------------------ control
    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; every rank returns its result or raises its error (no rank left waiting)."""
        if self.world == 1:
            return fn()
        outcome: tuple[str, Any] | None = None
        error: Exception | None = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = exc
                try:
                    pickle.dumps(exc)
                    outcome = ("error", exc)
                except Exception:  # noqa: BLE001
                    outcome = ("error", RuntimeError(f"{type(exc).__name__}: {exc}"))
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]  # type: ignore[misc]
        if kind == "error":
            raise (error if error is not None else value)
        return value


@contextlib.contextmanager
def job_from_env(device: torch.device) -> Iterator[Distributed]:
    """The job this process belongs to, for the duration of phase 1.

    An already initialised process group is used as it is (and left open). Otherwise torchrun's
    environment (WORLD_SIZE > 1 with RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) starts one: nccl
    when training on CUDA (each rank on cuda:LOCAL_RANK), gloo on CPU; it is destroyed on exit.
    Without WORLD_SIZE (or with 1) nothing distributed happens: a single process.
    """
    if dist.is_available() and dist.is_initialized():
        yield Distributed.current()
        return
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield Distributed()
        return
    missing = [k for k in ENV_VARS if k not in os.environ]
    if missing:
        raise RunError(f"WORLD_SIZE={world} is set but not {', '.join(missing)}; launch with "
                       "torchrun --nproc_per_node=N -m robustcl pretrain ... (or unset WORLD_SIZE)")
    if not dist.is_available():
        raise RunError("this torch build has no torch.distributed; run in one process (without torchrun)")
    job = Distributed(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(job.device(device))
        backend = "nccl"
    import_before_the_group()
    dist.init_process_group(backend, init_method="env://", rank=job.rank, world_size=world)
    try:
        yield job
    finally:
        dist.destroy_process_group()


def import_before_the_group() -> None:
    """Import torch._dynamo before a process group exists. The first torch.optim optimiser imports it, and it
    imports torch.distributed._shard, which keeps a reference to the default group when imported while one is
    open (torch 2.13): destroy_process_group then leaves gloo's worker threads running, and one that frees a
    finished broadcast's tensors during interpreter exit aborts the process (`terminate called without an
    active exception`, SIGABRT, ~3-8% of 2-rank torchrun runs here). Imported first, the group is truly
    destroyed on exit from `job_from_env`."""
    import torch._dynamo  # noqa: F401
