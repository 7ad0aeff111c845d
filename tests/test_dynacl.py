"""DynACL and DynACL++ (robustcl/methods/dynacl.py, robustcl/train/lp_aff.py): the two schedules against the authors' formulas, the strong
view they anneal, the loss against a row-by-row computation, k-means, and LP-AFF run by finetune."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from robustcl.config import ConfigError, load_config
from robustcl.methods import METHODS, StepContext
from robustcl.methods.step import weighted_sum
from robustcl.methods.dynacl import Dynacl, augmentation_strength, dynamic_weights, strong_view_at
from robustcl.data import DatasetInfo
from robustcl.methods.factory import build_training
from robustcl.objectives import f_divergence_bound
from robustcl.methods.factory import build_method
from robustcl.splits import load_split
from robustcl.train.lp_aff import kmeans, lp_aff
from robustcl.views import StrongViewConfig

AUTHORS_VIEW = StrongViewConfig(crop_scale=(0.1, 1.0), blur_p=0.0)  # train_DynACL.py's view at strength 1


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --------------------------------------------------------------------------------- the schedules
def authors_strengths(epochs: int, reload_frequency: int) -> list[float]:
    """train_DynACL.py's loop over 1-based epochs: the data (and strength) is reloaded when epoch % K == 1."""
    out, strength = [], None
    for epoch in range(1, epochs + 1):
        if epoch % reload_frequency == 1 or reload_frequency == 1:
            strength = 1 - (epoch - 1) / epochs
        out.append(strength)
    return out


def test_strength_follows_the_authors_reload_loop_at_every_epoch():
    for epochs, k in ((1000, 50), (100, 10), (7, 1)):
        ours = [augmentation_strength(e, epochs, k) for e in range(epochs)]
        assert ours == pytest.approx(authors_strengths(epochs, k), abs=1e-12)


def test_strength_at_chosen_epochs_of_the_paper_schedule():
    # s = 1 - floor(e / 50) * 50 / 1000: 20 stages of 50 epochs, from 1 down to 0.05
    for epoch, s in ((0, 1.0), (49, 1.0), (50, 0.95), (99, 0.95), (100, 0.9), (525, 0.5), (999, 0.05)):
        assert augmentation_strength(epoch, 1000, 50) == pytest.approx(s, abs=1e-12)
    # fractional epochs and periods (a CPU run shorter than an epoch): 0.15 / 0.05 is stage 3, not 2
    assert augmentation_strength(0.15, 1.0, 0.05) == pytest.approx(1 - 3 * 0.05, abs=1e-12)
    assert augmentation_strength(0.149, 1.0, 0.05) == pytest.approx(1 - 2 * 0.05, abs=1e-12)
    assert augmentation_strength(30, 10, 5) == 0.0  # past the end: never negative
    with pytest.raises(ValueError, match="period > 0"):
        augmentation_strength(1, 10, 0)


def test_dynamic_weights_are_the_benchmark_formula():
    # RCS's DynACL.py: loss = ((1 - w) NCE(benign) + (1 + w) NCE(adv)) / 2 with w = 2/3 (1 - s)
    assert dynamic_weights(0, 1000, 50, 2 / 3) == {"natural": 0.5, "adversarial": 0.5}  # ACL at the start
    w = 2 / 3 * (1 - 0.05)
    last = dynamic_weights(999, 1000, 50, 2 / 3)
    assert last["natural"] == pytest.approx((1 - w) / 2) and last["adversarial"] == pytest.approx((1 + w) / 2)
    assert last["natural"] == pytest.approx(0.18333333333333)  # hand: (1 - 0.63333) / 2
    for e in range(0, 1000, 37):
        weights = dynamic_weights(e, 1000, 50, 2 / 3)
        assert sum(weights.values()) == pytest.approx(1.0)


def test_strong_view_at_full_strength_is_the_view_and_at_zero_is_crop_and_flip_only():
    assert strong_view_at(1.0, AUTHORS_VIEW) == AUTHORS_VIEW
    assert strong_view_at(1.0, StrongViewConfig()) == StrongViewConfig()
    zero = strong_view_at(0.0, StrongViewConfig())
    assert zero.crop_scale == (1.0, 1.0) and zero.jitter == (0.0, 0.0, 0.0, 0.0)
    assert (zero.jitter_p, zero.gray_p, zero.blur_p) == (0.0, 0.0, 0.0)
    assert (zero.flip_p, zero.crop_ratio, zero.blur_sigma) == (0.5, (3 / 4, 4 / 3), (0.1, 2.0))  # not scaled
    half = strong_view_at(0.5, AUTHORS_VIEW)  # the authors' reload(0.5)
    assert half.crop_scale == pytest.approx((1 - 0.9 * 0.5, 1.0))
    assert half.jitter == pytest.approx((0.2, 0.2, 0.2, 0.05)) and half.jitter_p == pytest.approx(0.4)
    assert half.gray_p == pytest.approx(0.1)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        strong_view_at(1.5, AUTHORS_VIEW)


# ------------------------------------------------------------------------------------ the method
def smoke(*overrides: str):
    return load_config("smoke", ["method.name=dynacl", "method.attack.steps=1", *overrides])


def build(cfg) -> tuple[Dynacl, StepContext]:
    """Method + context from the trainer's factory; the context remembers, as `weights`, its last encoder step's."""
    training = build_training(cfg, DatasetInfo("synthetic", 2, 1, 16, 16, (0.5,), (0.25,)), torch.device("cpu"))
    ctx, encoder_step = training.ctx, training.ctx.encoder_step

    def recording(terms_fn, weights):  # noqa: ANN001, ANN202
        ctx.weights = dict(weights)  # type: ignore[attr-defined]
        return encoder_step(terms_fn, weights)

    ctx.encoder_step = recording  # type: ignore[method-assign]
    return training.method, ctx  # type: ignore[return-value]


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def nt_xent_loop(u: torch.Tensor, v: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Row by row, fp64: -log exp(s_i,twin / tau) / sum_{k != i} exp(s_ik / tau), averaged over the 2N rows."""
    z = F.normalize(torch.cat([u, v]).double(), dim=1)
    n, total = u.shape[0], 0.0
    for i in range(2 * n):
        denom = torch.logsumexp(torch.stack([z[i] @ z[k] / tau for k in range(2 * n) if k != i]), 0)
        total += -(z[i] @ z[(i + n) % (2 * n)] / tau - denom)
    return total / (2 * n)


MAPS = {"benign": randn(16, 16, seed=10), "adversarial": randn(16, 16, seed=11)}


def E(x: torch.Tensor, branch: str) -> torch.Tensor:
    """A fixed per-branch linear map of a hand-made 16-pixel view (stands in for g(f_branch(x)))."""
    return x.flatten(1) @ MAPS[branch]


def images(n: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


HAND = [randn(4, 1, 4, 4, seed=k) for k in range(4)]


def weighted_loss(method: Dynacl, ctx: StepContext) -> torch.Tensor:
    """One real step (records its weights, moves the critic), then the weighted loss of HAND with z = E."""
    method.training_step(images(), ctx)
    method.embed = lambda x, branch: E(x, branch)  # type: ignore[method-assign]
    with torch.no_grad():
        return weighted_sum(method.loss_terms(*HAND), ctx.weights)


def test_loss_is_the_dynamically_weighted_acl_loss_at_the_scheduled_epoch():
    method, ctx = build(smoke("method.period=2"))
    method.on_epoch_start(5, 10.0, ctx)  # s = 1 - floor(5/2) 2/10 = 0.6, w = 2/3 * 0.4
    w = 2 / 3 * 0.4
    p, q, pa, qa = HAND
    expected = ((1 - w) / 2 * nt_xent_loop(E(p, "benign"), E(q, "benign"))
                + (1 + w) / 2 * nt_xent_loop(E(pa, "adversarial"), E(qa, "adversarial")))
    assert weighted_loss(method, ctx).item() == pytest.approx(expected.item(), rel=1e-6)
    assert ctx.weights["natural"] == pytest.approx(0.36666666666667)  # hand: (1 - 4/15) / 2


def test_anneal_off_is_acl_half_and_half_with_the_full_view_at_any_epoch():
    method, ctx = build(smoke("method.period=1", "method.anneal=false"))
    method.on_epoch_start(7, 10.0, ctx)
    p, q, pa, qa = HAND
    expected = 0.5 * (nt_xent_loop(E(p, "benign"), E(q, "benign")) + nt_xent_loop(E(pa, "adversarial"),
                                                                                  E(qa, "adversarial")))
    assert weighted_loss(method, ctx).item() == pytest.approx(expected.item(), rel=1e-6)
    assert ctx.strong == load_config("smoke").views.strong


def test_ours_adds_the_benign_term_and_the_critic_bound_over_both_views():
    method, ctx = build(smoke("method.benign_weight=0.5", "method.critic.enabled=true", "method.critic.weight=0.3",
                              "method.divergence=kl"))
    method.on_epoch_start(0, 10.0, ctx)
    p, q, pa, qa = HAND
    loss = weighted_loss(method, ctx)  # after the step: the critic has moved
    zb, za = torch.cat([E(p, "benign"), E(q, "benign")]), torch.cat([E(pa, "adversarial"), E(qa, "adversarial")])
    with torch.no_grad():
        bound = f_divergence_bound("kl", method.critic(zb), method.critic(za))
    nce_b = nt_xent_loop(E(p, "benign"), E(q, "benign"))
    expected = (0.5 + 0.5) * nce_b + 0.5 * nt_xent_loop(E(pa, "adversarial"), E(qa, "adversarial")) + 0.3 * bound
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    terms = method.loss_terms(*HAND, only=("benign",))  # SAM's second pass: the added benign term alone
    assert set(terms) == {"benign"}


def test_sam_on_the_benign_term_needs_a_benign_weight():
    with pytest.raises(ConfigError, match="benign_weight=0 removes"):
        smoke("method.sam.mode=asam")
    with pytest.raises(ConfigError, match="weight_lambda"):
        smoke("method.weight_lambda=1.5")


@pytest.mark.parametrize("preset", ["fmnist-dynacl", "fmnist-dynacl-ours"])
def test_two_steps_by_name_on_synthetic_data(preset):
    assert METHODS["dynacl"] is Dynacl
    cfg = load_config(preset, ["data.name=synthetic", "data.val_size=16", "data.synthetic.channels=1",
                               "data.synthetic.size=16", "data.synthetic.n_train=64", "model.arch=convnet",
                               "model.widths=[8,16,16,32]", "model.proj_dim=16", "method.attack.steps=1"])
    method, ctx = build(cfg)
    data = load_split(cfg, "train")
    before = [p.detach().clone() for p in method.encoder_parameters()]
    method.on_epoch_start(0, 0.466, ctx)
    for step in range(2):
        stats = method.training_step(data.images[:16], ctx)
        assert all(torch.isfinite(v).all() for v in stats.values()), stats
        method.on_step_end(step + 1, 200, ctx)
    assert any(not torch.equal(a, b) for a, b in zip(before, method.encoder_parameters()))
    assert method.epoch_metrics() == {"strength": 1.0, "adversarial_weight": 0.5}


def test_hooks_set_the_view_of_the_epoch_and_sub_epoch_periods_follow_the_steps():
    method, ctx = build(smoke("method.period=2"))
    full = ctx.strong
    method.on_epoch_start(4, 10.0, ctx)  # s = 0.6
    assert method.strength == pytest.approx(0.6) and ctx.strong == strong_view_at(method.strength, full)
    method.on_epoch_start(9, 10.0, ctx)  # the full view is remembered, not rescaled twice
    assert method.strength == pytest.approx(0.2) and ctx.strong == strong_view_at(method.strength, full)
    method.on_step_end(95, 100, ctx)  # period >= 1 epoch: steps change nothing between epoch starts
    assert ctx.strong == strong_view_at(augmentation_strength(9, 10, 2), full)
    sub, sctx = build(smoke("method.period=0.25"))
    sub.on_epoch_start(0, 1.0, sctx)  # 1 epoch of 8 steps, 4 stages of 2 steps
    seen = []
    for step in range(8):
        seen.append(sub.strength)
        sub.on_step_end(step + 1, 8, sctx)
    assert seen == pytest.approx([1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25])
    assert sub.strength == 0.0 and sctx.strong == strong_view_at(0.0, full)


# ------------------------------------------------------------------------------------- k-means
def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four well-separated Gaussian blobs in 5-d (centres 20 apart, unit spread), 30 points each, shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = 20.0 * torch.eye(4, 5)
    truth = torch.arange(4).repeat_interleave(30)
    x = centres[truth] + torch.randn(120, 5, generator=g)
    perm = torch.randperm(120, generator=g)
    return x[perm], truth[perm]


def test_kmeans_recovers_well_separated_clusters():
    x, truth = blobs()
    labels, centres = kmeans(x, 4, torch.Generator().manual_seed(1))
    pairs = {(int(t), int(c)) for t, c in zip(truth, labels)}
    assert len(pairs) == 4 and len({c for _, c in pairs}) == 4  # a bijection between true and found clusters
    for t, c in pairs:
        assert torch.allclose(centres[c], x[truth == t].mean(0), atol=1e-5)


def test_kmeans_is_deterministic_given_the_seed_and_seeds_with_kmeans_plus_plus():
    x, _ = blobs(seed=2)
    a, _ = kmeans(x, 4, torch.Generator().manual_seed(5))
    b, _ = kmeans(x, 4, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # k-means++ seeding never picks an existing centre again while other points are left: two points, k = 2
    two = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    for seed in range(5):
        labels, centres = kmeans(two, 2, torch.Generator().manual_seed(seed))
        assert sorted(labels.tolist()) == [0, 1] and not torch.equal(centres[0], centres[1])
    with pytest.raises(ValueError, match="1 <= k <= n"):
        kmeans(two, 3, torch.Generator())


# ----------------------------------------------------------------------------- DynACL++ (LP-AFF)
LP_AFF = ["finetune.postprocess.name=lp-aff", "finetune.postprocess.clusters=4", "finetune.postprocess.lp_epochs=1",
          "finetune.postprocess.aff.epochs=2", "finetune.postprocess.milestones=[1]",
          "finetune.postprocess.aff.batch_size=32", "finetune.postprocess.aff.attack.steps=2"]


def test_lp_aff_returns_a_new_encoder_from_deterministic_pseudo_labels(monkeypatch):
    cfg = smoke(*LP_AFF)
    method = build_method(cfg, 1, (0.5,), (0.25,))
    data = load_split(cfg, "train")
    encoder = method.encoder.eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    seen = []
    real = kmeans

    def spy(x, k, generator, iters=100):
        labels, centres = real(x, k, generator, iters)
        seen.append(labels)
        return labels, centres

    monkeypatch.setattr("robustcl.train.lp_aff.kmeans", spy)
    logged: list[dict] = []
    runs = [lp_aff(encoder, data.images[:128], "adversarial", cfg, torch.device("cpu"), contextlib.nullcontext,
                   logged.append) for _ in range(2)]
    assert torch.equal(seen[0], seen[1])  # the pseudo-labels depend on the features and the seed only
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # the input is left alone
    (new, record), (again, _) = runs
    assert any(not torch.equal(before[k], v) for k, v in new.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), again.state_dict().values()))
    assert record["clusters"] == 4 and sum(record["cluster_sizes"]) == 128 and record["branch"] == "adversarial"
    assert [(r["stage"], r["epoch"]) for r in logged[:3]] == [("lp", 1), ("aff", 1), ("aff", 2)]


def test_lp_aff_shows_its_two_stages_off_a_terminal_and_says_nothing_quiet(capsys):
    """DynACL++'s post-processing trains before every protocol: its probe and fine-tuning are progress lines too."""
    cfg = smoke(*LP_AFF)
    encoder = build_method(cfg, 1, (0.5,), (0.25,)).encoder.eval()
    images = load_split(cfg, "train").images[:128]
    for progress in (False, True):
        lp_aff(encoder, images, "adversarial", cfg, torch.device("cpu"), contextlib.nullcontext, lambda r: None,
               progress)
        err = capsys.readouterr().err
        if not progress:
            assert err == ""
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 2, err
    assert lines[0].startswith("robustcl finetune LP-AFF linear probe (adversarial): 1/1 epochs (100%), ")
    assert lines[1].startswith(f"robustcl finetune LP-AFF {cfg.finetune.postprocess.aff.loss} (adversarial): ")
    assert "loss=" in lines[0] and "loss=" in lines[1]


def test_finetune_post_processes_once_and_every_protocol_reads_the_new_encoder(tmp_path):
    from robustcl.evaluation.run_eval import protocol_model
    from robustcl.export import read_encoder
    from robustcl.train.finetune import finetune
    from robustcl.train.pretrain import pretrain
    from robustcl.runs import RunDir

    run = RunDir(tmp_path / "run")
    pretrain(smoke("train.max_steps=2"), run, progress=False)
    cfg = smoke("train.max_steps=2", "finetune.epochs=1", "finetune.aff.epochs=1", "finetune.aff.batch_size=32",
                "finetune.aff.attack.steps=1", *LP_AFF)
    records = finetune(cfg, run, ("slf", "alf", "aff"), progress=False)
    assert set(records) == {"slf", "alf", "aff"}
    assert records["slf"]["postprocess"] == records["aff"]["postprocess"]  # one post-processing for the call
    assert [r["stage"] for r in run.iter_metrics("postprocess")] == ["lp", "aff", "aff"]
    original, _ = read_encoder(run.encoder)
    models = {p: protocol_model(run, p, original, torch.device("cpu"))[0] for p in ("slf", "alf", "aff")}
    slf, alf, aff = (m.encoder.state_dict() for m in models.values())
    assert all(torch.equal(slf[k], alf[k]) for k in slf)  # SLF and ALF: the post-processed encoder
    changed = [k for k in slf if not torch.equal(slf[k], original.state_dict()[k])]
    assert changed
    assert any(not torch.equal(aff[k], slf[k]) for k in aff)  # AFF fine-tuned it further
    assert not math.isnan(records["alf"]["val_acc"])


# ------------------------------------------------------------------------------ through the trainer
def trained(tmp_path, name: str, overrides: list[str], monkeypatch, die_at: int | None = None):
    """Pretrain the smoke preset (8 steps an epoch) with dynacl, recording each step's jitter_p and weights;
    with `die_at`, the run is killed in that call and resumed."""
    from conftest import pretrain_recording
    from robustcl.runs import RunDir

    cfg = smoke("train.max_steps=16", "train.epochs=2", "train.checkpoint_every=4", "train.log_every=1",
                "diagnostics.every=0", *overrides)
    seen = pretrain_recording(Dynacl, lambda method, ctx: (ctx.strong.jitter_p, method.weights["adversarial"]), cfg,
                              tmp_path / name, monkeypatch, die_at)
    return RunDir(tmp_path / name), seen


def test_the_trainer_sets_each_steps_view_and_a_killed_run_resumes_exactly(tmp_path, monkeypatch):
    run, seen = trained(tmp_path, "straight", ["method.period=1"], monkeypatch)  # 2 epochs: s = 1, then 0.5
    assert [p for p, _ in seen] == pytest.approx([0.8] * 8 + [0.4] * 8)  # jitter_p = 0.8 s, from step 8 on
    assert [w for _, w in seen] == pytest.approx([0.5] * 8 + [(1 + 2 / 3 * 0.5) / 2] * 8)
    logged = [r["strength"] for r in run.iter_metrics("pretrain")]
    assert logged == pytest.approx([1.0] * 8 + [0.5] * 8)
    killed, again = trained(tmp_path, "killed", ["method.period=1"], monkeypatch, die_at=15)  # resumed at step 12
    assert again[:14] == seen[:14] and again[14:] == seen[12:]  # 14 steps, then steps 12-15 after the resume
    a, b = (torch.load(r.checkpoint, weights_only=True)["model"] for r in (run, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_period_under_an_epoch_anneals_step_by_step_in_the_trainer(tmp_path, monkeypatch):
    _, seen = trained(tmp_path, "sub", ["method.period=0.25"], monkeypatch)  # stages of 2 steps, s = 1 - stage/8
    assert [p for p, _ in seen] == pytest.approx([0.8 * (1 - (k // 2) / 8) for k in range(16)])
