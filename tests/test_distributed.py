"""Data-parallel phase 1 (robustcl.distributed): 2 gloo ranks on CPU against one process on the global batch.

One `mp.spawn` of two ranks (module fixture `ranks`) runs every multi-rank case and saves its
tensors; the single-process references are computed here, in the test process, on the
concatenated global batch. The torchrun tests launch `python -m torch.distributed.run` for real.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from robustcl import load_encoder
from robustcl.config import ConfigError, load_config
from robustcl.distributed import Distributed, gather_with_grad, import_before_the_group, job_from_env, rank_seed
from robustcl.methods import StepContext
from robustcl.methods.add_on_terms import step_with_add_on_terms
from robustcl.methods.step_inputs import fixed_embedding
from robustcl.methods.gbrcl import Gbrcl
from robustcl.models.dual_bn import CrossRankBatchNorm2d, DualBatchNorm2d, cross_rank_batch_norm, frozen_bn_stats
from robustcl.objectives import SAM, info_nce, multi_positive_nce
from robustcl.objectives.infonce import current_gather, default_gather
from robustcl.runs import RunDir, RunError
from robustcl.methods.factory import build_method
from robustcl.train.pretrain import Pretrainer, pretrain

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]
# every distributed run here: CPU/gloo, one thread per rank (two ranks share the test machine's cores)
RUN_OVERRIDES = ["train.max_steps=4", "train.checkpoint_every=2", "train.threads=1", "train.device=cpu"]


def _rows(rank: int, n: int) -> slice:
    return Distributed(rank, WORLD).shard(n)


# ---------------------------------------------------------------------- the cases (inputs shared with the references)
def _nce_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(shape, generator=g) for shape in ((8, 6), (8, 6), (8, 6), (6, 5)))


def _nce_losses(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
                w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return info_nce(x @ w, y @ w, 0.5), multi_positive_nce([x @ w, y @ w, z @ w], 0.3)


def _bn_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 5, 5, generator=g) * 2 + 3  # far from zero mean: catches a one-pass variance
    return x, torch.randn(8, 3, 5, 5, generator=g)


def _dual_bn() -> DualBatchNorm2d:
    torch.manual_seed(3)
    bn = DualBatchNorm2d(3)
    with torch.no_grad():
        for p in bn.parameters():
            p.uniform_(0.5, 1.5)
    return bn


def _bn_run(bn: DualBatchNorm2d, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two train-mode forwards (the second under frozen_bn_stats), a backward, then eval mode."""
    x = x.clone().requires_grad_(True)
    y = bn(x, "adversarial")
    (y * w).sum().backward()
    with frozen_bn_stats(bn):
        bn(x.detach() * 0.5, "adversarial")  # SAM's second pass: batch statistics, running ones untouched
    bn.eval()
    return {"y": y.detach(), "x_grad": x.grad, "eval": bn(x.detach(), "adversarial"),
            **{k: v.clone() for k, v in bn.adversarial.state_dict().items()},
            "weight_grad": bn.adversarial.weight.grad, "bias_grad": bn.adversarial.bias.grad}


def _smoke(*extra: str):
    return load_config("smoke", ["method.attack.random_start=false", *extra])


def _step_setup(distributed: Distributed) -> tuple[Gbrcl, StepContext]:
    """gbrcl of the smoke preset (ASAM on the benign term, critic on) with Pretrainer's optimisers."""
    cfg = _smoke()
    torch.manual_seed(0)
    method = build_method(cfg, 1, (0.5,), (0.25,))
    if distributed.world > 1:
        cross_rank_batch_norm(method)
    opt = torch.optim.SGD(method.encoder_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    copt = torch.optim.SGD(method.critic.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
    sam = SAM(method.encoder_parameters(), 1.0, adaptive=True)
    ctx = StepContext(method, opt, copt, sam, ("benign",), torch.Generator(), contextlib.nullcontext,
                      distributed=distributed)
    return method, ctx  # type: ignore[return-value]


def _step_inputs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    return torch.rand(16, 1, 16, 16, generator=g), torch.rand(16, 1, 16, 16, generator=g)


def _step_run(distributed: Distributed, steps: int = 2) -> dict[str, Any]:
    """`steps` gbrcl steps (attack, critic step, ASAM encoder step) on fixed views, this rank's rows."""
    method, ctx = _step_setup(distributed)
    rows = _rows(distributed.rank, 16) if distributed.world > 1 else slice(None)
    out: dict[str, Any] = {"q_adv": [], "stats": []}
    for step in range(steps):
        p, q = (v[rows] for v in _step_inputs(step))
        with default_gather(distributed.gather):
            q_adv = method.attack(p, q, ctx, fixed_embedding(method, p, "benign", ctx))
            stats = step_with_add_on_terms(method, lambda: q_adv, q,
                                           lambda qa, only: method.loss_terms(p, q, qa, only),
                                           {"adversarial": 1.0}, ctx)
        values = torch.stack([stats[k].float() for k in sorted(stats)])
        distributed.all_reduce_mean_([values])
        out["q_adv"].append(q_adv)
        out["stats"].append(dict(zip(sorted(stats), values.tolist())))
    out["state"] = {k: v.clone() for k, v in method.state_dict().items()}
    return out


# ---------------------------------------------------------------------- the spawned ranks
def _worker_collectives(job: Distributed, rank: int, result: dict[str, Any]) -> None:
    """InfoNCE with gathered keys, cross-rank BN, broadcast and on_main, on this rank, into `result`."""
    # InfoNCE / multi-positive NCE with keys gathered from both ranks (the default_gather hook)
    x, y, z, w = _nce_inputs()
    w = w.clone().requires_grad_(True)
    rows = _rows(rank, 8)
    with default_gather(job.gather):
        nce, multi = _nce_losses(x[rows], y[rows], z[rows], w)
    (nce + multi).backward()
    losses = torch.stack([nce.detach(), multi.detach()])
    job.all_reduce_mean_([losses])
    job.all_reduce_grads([w])
    result["nce"] = {"losses": losses, "w_grad": w.grad}

    # cross-rank BN inside a DualBatchNorm2d
    bn = _dual_bn()
    params = [id(p) for p in bn.parameters()]
    cross_rank_batch_norm(bn)
    assert isinstance(bn.benign, CrossRankBatchNorm2d) and isinstance(bn.adversarial, CrossRankBatchNorm2d)
    assert [id(p) for p in bn.parameters()] == params  # the optimiser's parameters survive the conversion
    x, w = _bn_inputs()
    bn_out = _bn_run(bn, x[rows], w[rows])
    summed = [bn_out["weight_grad"].clone(), bn_out["bias_grad"].clone()]
    for t in summed:
        dist.all_reduce(t)
    bn_out["weight_grad_sum"], bn_out["bias_grad_sum"] = summed
    result["bn"] = bn_out

    # control: broadcast from rank 0, rank 0's result or error on every rank
    values = [torch.full((3,), float(rank + 1)), torch.tensor([10 * (rank + 1)])]
    job.broadcast_(values)
    result["broadcast"] = values
    result["on_main"] = job.on_main(lambda: 41 + rank)
    def failing() -> None:
        raise RunError(f"bad run dir on rank {rank}")

    try:
        job.on_main(failing)
    except RunError as exc:
        result["on_main_error"] = str(exc)


def _worker_pretrain(out: str, result: dict[str, Any]) -> None:
    """The smoke pretrain straight to step 4, then again interrupted after step 3 (checkpoint at step 2)."""
    pretrain(load_config("smoke", RUN_OVERRIDES), RunDir(Path(out) / "straight"), progress=False)
    original = Gbrcl.training_step
    seen: list[dict[str, torch.Tensor]] = []

    def stopping(self, images, ctx):
        result["gather_in_step"] = current_gather() is gather_with_grad
        if len(seen) == 3:
            seen.append({k: v.clone() for k, v in self.state_dict().items()})
            raise KeyboardInterrupt
        seen.append({})
        return original(self, images, ctx)

    Gbrcl.training_step = stopping  # type: ignore[method-assign]
    try:
        pretrain(load_config("smoke", RUN_OVERRIDES), RunDir(Path(out) / "killed"), progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        Gbrcl.training_step = original  # type: ignore[method-assign]
    result["after_3_steps"] = seen[-1]


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    import_before_the_group()  # so destroy_process_group below releases gloo's threads (no abort at exit)
    dist.init_process_group("gloo", init_method=f"file://{out}/init", rank=rank, world_size=WORLD)
    job = Distributed.current()
    result: dict[str, Any] = {"rank": job.rank, "world": job.world}
    _worker_collectives(job, rank, result)
    result["step"] = _step_run(job)  # two gbrcl steps on fixed views
    _worker_pretrain(out, result)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) | {"dir": out} for r in range(WORLD)]


# ---------------------------------------------------------------------- tests
def test_gathered_infonce_matches_one_process_on_the_global_batch(ranks):
    x, y, z, w = _nce_inputs()
    w = w.clone().requires_grad_(True)
    nce, multi = _nce_losses(x, y, z, w)
    (nce + multi).backward()
    for r in ranks:
        assert r["world"] == WORLD
        # mean over ranks of the per-rank losses is the global loss; the averaged gradient the global one
        torch.testing.assert_close(r["nce"]["losses"], torch.stack([nce, multi]).detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["nce"]["w_grad"], w.grad, rtol=1e-5, atol=1e-7)


def test_cross_rank_batch_norm_matches_batch_norm_on_the_concatenated_batch(ranks):
    x, w = _bn_inputs()
    ref = _bn_run(_dual_bn(), x, w)
    for r in ranks:
        rows, got = _rows(r["rank"], 8), r["bn"]
        for key in ("y", "x_grad", "eval"):  # outputs, input gradient (through the other rank's rows too)
            torch.testing.assert_close(got[key], ref[key][rows], rtol=1e-5, atol=1e-5, msg=key)
        for key in ("running_mean", "running_var"):  # unbiased over the global count; frozen pass left out
            torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-6, msg=key)
        assert int(got["num_batches_tracked"]) == int(ref["num_batches_tracked"]) == 1
        torch.testing.assert_close(got["weight_grad_sum"], ref["weight_grad"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["bias_grad_sum"], ref["bias_grad"], rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread for a reference computed here (the ranks use one each); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_two_rank_gbrcl_steps_match_one_process_on_the_global_batch(ranks):
    with _one_thread():
        ref = _step_run(Distributed())
    for step in range(2):
        q_adv = torch.cat([r["step"]["q_adv"][step] for r in ranks])  # the attack (critic term, gathered NCE)
        torch.testing.assert_close(q_adv, ref["q_adv"][step], rtol=0, atol=1e-6)
        for r in ranks:  # critic loss/accuracy and every encoder term, global-batch values
            assert r["step"]["stats"][step].keys() == ref["stats"][step].keys()
            for k, v in ref["stats"][step].items():
                assert r["step"]["stats"][step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)
    for key, value in ref["state"].items():  # encoder, projector, critic, BN running statistics
        for r in ranks:
            torch.testing.assert_close(r["step"]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_parameters_and_buffers_are_identical_on_every_rank(ranks):
    assert all(r["gather_in_step"] for r in ranks)  # Pretrainer's steps take InfoNCE keys from both ranks
    state0, state1 = ranks[0]["after_3_steps"], ranks[1]["after_3_steps"]  # smoke pretrain, 3 steps, bitwise
    assert state0.keys() == state1.keys() and state0
    for k in state0:
        assert torch.equal(state0[k], state1[k]), k
    at_step_2 = torch.load(RunDir(ranks[0]["dir"] / "killed").checkpoint, weights_only=True)["model"]
    assert any(not torch.equal(state0[k], at_step_2[k]) for k in state0)  # step 3 did train


def test_rank_zero_broadcasts_and_its_errors_reach_every_rank(ranks):
    for r in ranks:
        assert torch.equal(r["broadcast"][0], torch.ones(3)) and r["broadcast"][1].tolist() == [10]
        assert r["on_main"] == 41
        assert r["on_main_error"] == "bad run dir on rank 0"


def test_every_rank_takes_its_contiguous_shard_of_the_same_global_batch(tmp_path):
    trainer = Pretrainer(load_config("smoke", RUN_OVERRIDES), RunDir(tmp_path / "unused"))
    for step in (0, 3, trainer.steps_per_epoch + 1):  # a new epoch draws a new (seeded) permutation
        full = trainer.batch(step)
        shards = []
        for rank in range(WORLD):
            trainer.dist = Distributed(rank, WORLD)
            shards.append(trainer.batch(step))
        trainer.dist = Distributed()
        assert len(shards[0]) == len(full) // WORLD and torch.equal(torch.cat(shards), full)
    assert not (tmp_path / "unused").exists()


def test_interrupted_two_rank_run_checkpoints_every_rank_random_state(ranks):
    run = RunDir(ranks[0]["dir"] / "killed")
    state = torch.load(run.checkpoint, weights_only=True)
    assert state["step"] == 2 and state["world_size"] == WORLD
    views = [s["views"] for s in state["rng_ranks"]]
    assert len(views) == WORLD and not torch.equal(views[0], views[1])  # each rank its own view stream
    assert torch.equal(state["rng"]["views"], views[0])
    assert [r["step"] for r in run.iter_metrics("pretrain")] == [2]  # rank 0 alone logs
    assert not run.encoder.exists()


def test_resume_with_another_number_of_processes_is_refused(ranks, tmp_path):
    copy = tmp_path / "killed"
    shutil.copytree(ranks[0]["dir"] / "killed", copy)
    with pytest.raises(RunError, match=r"written by 2 process\(es\) and this job has 1; .*--nproc_per_node=2"):
        pretrain(load_config(str(copy / "config.yaml")), RunDir(copy), resume=True, progress=False)


def test_batch_the_ranks_cannot_split_is_a_config_error():
    assert Distributed(1, 4).shard(32) == slice(8, 16)
    with pytest.raises(ConfigError, match=r"train.batch_size=30 is not divisible by the 4 ranks.*multiple of 4"):
        Distributed(0, 4).shard(30)


def test_rank_zero_keeps_the_single_process_seed():
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(8)}) == 8


def test_without_torchrun_environment_the_job_is_one_process(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with job_from_env(torch.device("cpu")) as job:
        assert (job.rank, job.world) == (0, 1) and job.gather is None and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    missing = "WORLD_SIZE=2 is set but not RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; launch with torchrun"
    with pytest.raises(RunError, match=missing):
        with job_from_env(torch.device("cpu")):
            pass


def test_cross_rank_batch_norm_is_plain_batch_norm_in_one_process():
    x, _ = _bn_inputs()
    plain, converted = nn.BatchNorm2d(3), cross_rank_batch_norm(nn.Sequential(nn.BatchNorm2d(3)))[0]
    assert isinstance(converted, CrossRankBatchNorm2d)
    torch.testing.assert_close(converted(x), plain(x), rtol=0, atol=0)


# ---------------------------------------------------------------------- torchrun, end to end
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    # an explicit loopback rendezvous: --standalone needs a resolvable host name, which test machines may lack
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "robustcl", "pretrain", *args, "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


GROUP_RELEASED = """
import os, sys, torch
from robustcl.distributed import job_from_env
with job_from_env(torch.device("cpu")) as job:
    torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)  # the first optimiser imports torch._dynamo
    job.broadcast_([torch.ones(3)])
gloo = [t for t in os.listdir("/proc/self/task") if "gloo" in open(f"/proc/self/task/{t}/comm").read()]
print(f"<rank {job.rank}: {len(gloo)} gloo threads>", flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc")
def test_torchrun_job_releases_the_group_on_exit(tmp_path):
    """Leaving `job_from_env` destroys the process group for real (gloo's threads joined), even after an
    optimiser was built inside it: a group kept alive let a gloo thread abort the process at exit (SIGABRT)."""
    script = tmp_path / "job.py"
    script.write_text(GROUP_RELEASED)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(re.findall(r"<(rank .*?)>", proc.stdout)) == [f"rank {r}: 0 gloo threads" for r in range(WORLD)], proc.stdout


def test_torchrun_resume_continues_exactly(ranks, tmp_path):
    """`torchrun --nproc_per_node=2 -m robustcl pretrain --resume` finishes the interrupted 2-rank run
    bit-identically to the 2-rank run that was never interrupted."""
    straight = RunDir(ranks[0]["dir"] / "straight")
    killed = RunDir(tmp_path / "killed")
    shutil.copytree(ranks[0]["dir"] / "killed", killed.root)  # stopped after step 3 by the spawned ranks
    proc = _torchrun("--resume", "--out", str(killed.root))
    assert proc.stdout.count("4 steps") == 1, proc.stdout  # rank 0 alone reports
    a, b = (torch.load(run.checkpoint, weights_only=True) for run in (straight, killed))
    assert a["step"] == b["step"] == 4 and a["world_size"] == b["world_size"] == WORLD
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in ("views", "torch"):  # every rank's random state continued exactly
        for ra, rb in zip(a["rng_ranks"], b["rng_ranks"]):
            assert torch.equal(ra[key], rb[key]), key
    for run in (straight, killed):
        assert run.pretrain_done.read_text() == "4\n"
        load_encoder(run.root)  # cross-rank BN exports under BatchNorm2d's names: a plain encoder loads it
        assert [r["step"] for r in run.iter_metrics("pretrain")] == [2, 4]  # one writer, no duplicates
