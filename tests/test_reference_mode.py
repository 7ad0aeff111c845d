"""Reference mode: each switch for the authors' code (config `reference`) does what defines it, and nothing when off.

docs/reproducing.md lists the switches; each test below checks the one property that the switch
exists for, on small inputs, against its formula or a direct transcription.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from robustcl.config import ConfigError, list_presets, load_config, reference_switches
from robustcl.methods.advcl import high_frequency
from robustcl.methods.step import StepContext
from robustcl.models.resnet import BasicBlock, Bottleneck
from robustcl.objectives import SAM, pgd
from robustcl.runs import RunDir
from robustcl.methods.factory import IMAGENET_MEAN, IMAGENET_STD, build_method, encoder_export_fields
from robustcl.train.pretrain import Pretrainer
from robustcl.train.schedule import reference_learning_rate

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
REFERENCE_PRESETS = ("cifar10-gbrcl-reference", "cifar100-gbrcl-reference", "cifar10-advcl-ours-reference")


def _context(method, cfg, reference) -> StepContext:
    opt = torch.optim.SGD(method.encoder_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    copt = torch.optim.SGD(method.critic.parameters(), lr=0.2) if method.critic is not None else None
    sam_cfg = method.sam_config()
    sam = SAM(method.encoder_parameters(), sam_cfg.rho, sam_cfg.mode == "asam") if sam_cfg.mode != "off" else None
    return StepContext(method, opt, copt, sam, sam_cfg.terms, torch.Generator().manual_seed(0), contextlib.nullcontext,
                       reference=reference)


def _smoke(*overrides: str):
    cfg = load_config("smoke", list(overrides))
    torch.manual_seed(0)
    method = build_method(cfg, 1, (0.5,), (0.25,))
    return method, _context(method, cfg, reference_switches(cfg))


# ----------------------------------------------------------------------------------- config
def test_every_switch_is_off_unless_a_reference_preset_turns_it_on():
    for name in list_presets():
        cfg = load_config(name)
        if name.endswith("-reference"):
            assert cfg.reference is not None and cfg.reference.evaluation, name
        else:
            assert cfg.reference is None, name
    assert not any(v for k, v in vars(reference_switches(load_config("smoke"))).items() if k != "test_attack")


def test_a_switch_that_cannot_act_on_the_config_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"reference.projection_only_shortcut=True applies to model.arch=resnet"):
        load_config("smoke", ["reference.projection_only_shortcut=true"])
    with pytest.raises(ConfigError, match=r"reference.advcl_supcon_scale=True applies to method.name=advcl only"):
        load_config("smoke", ["reference.advcl_supcon_scale=true"])
    with pytest.raises(ConfigError, match=r"unknown config key reference.schedul \(did you mean reference.schedule\?\)"):
        load_config("smoke", ["reference.schedul=true"])


def test_the_reference_presets_turn_on_every_switch_that_applies():
    gbrcl = reference_switches(load_config("cifar10-gbrcl-reference"))
    on = {k for k, v in vars(gbrcl).items() if v is True}
    assert on == {"projection_only_shortcut", "imagenet_normalisation", "sam_reached_only", "unclipped_start",
                  "schedule", "critic_schedule", "evaluation"}  # their gbrcl step freezes BN stats in SAM's pass
    assert reference_switches(load_config("cifar100-gbrcl-reference")) == gbrcl
    advcl = reference_switches(load_config("cifar10-advcl-ours-reference"))
    assert all(v for k, v in vars(advcl).items() if k != "test_attack")
    assert (gbrcl.test_attack.eps, gbrcl.test_attack.alpha, gbrcl.test_attack.steps) == (0.0314, 0.00314, 20)


SYNTHETIC_CIFAR = ["data.name=synthetic", "data.synthetic={num_classes: 10, channels: 3, size: 32, n_train: 40, n_test: 8}",
                   "data.val_size=8", "train.max_steps=2", "train.threads=1", "train.precision=fp32",
                   "train.channels_last=false", "diagnostics.every=0", "train.log_every=1"]


def _two_steps(tmp_path, name: str, *overrides: str) -> list[dict]:
    run = RunDir(tmp_path / name)
    trainer = Pretrainer(load_config(name, [*SYNTHETIC_CIFAR, *overrides]), run)
    run.prepare("reference preset\n", False, False)
    result = trainer.fit(progress=False)
    assert result.steps == 2 and all(math.isfinite(v) for v in result.last.values())
    return list(run.iter_metrics("pretrain"))


# cifar100-gbrcl-reference differs from cifar10-gbrcl-reference only in data.name (asserted above), which the
# synthetic data replaces: it runs in `make test-slow` only, to keep `make test` fast
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("cifar100") else n
                                  for n in REFERENCE_PRESETS])
def test_each_reference_preset_runs_two_steps_on_cifar_shaped_data(tmp_path, name):
    records = _two_steps(tmp_path, name, "train.batch_size=4", "method.attack.steps=1")
    assert [r["lr"] for r in records][0] == load_config(name).train.lr  # the authors' first step: the full rate


@pytest.mark.slow  # the presets' own PGD-7 on ResNet-18: ~1 min each on the shared 2-core CPU; `make test-slow`
@pytest.mark.parametrize("name", REFERENCE_PRESETS)
def test_each_reference_preset_runs_two_steps_with_its_own_attack(tmp_path, name):
    _two_steps(tmp_path, name, "train.batch_size=8")


# ----------------------------------------------------------------------------- the switches
@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_projection_only_shortcut_block_outputs_exactly_zero_when_its_last_conv_is_zeroed(block):
    torch.manual_seed(0)
    planes = 16
    x = torch.rand(4, planes * block.expansion, 8, 8) + 0.1
    outputs = {}
    for identity in (True, False):
        b = block(planes * block.expansion, planes, 1, dual_bn=True, identity_shortcut=identity)
        last = b.conv2 if block is BasicBlock else b.conv3
        torch.nn.init.zeros_(last.weight)
        for mode in ("train", "eval"):
            b.train(mode == "train")
            outputs[identity, mode] = b(x, "benign")
    assert torch.count_nonzero(outputs[False, "train"]) == 0 and torch.count_nonzero(outputs[False, "eval"]) == 0
    assert torch.equal(outputs[True, "eval"], torch.relu(x))  # the default keeps the identity path


def test_projection_only_resnet18_has_five_blocks_without_a_residual_path_and_survives_export(tmp_path):
    from robustcl.data import dataset_info
    from robustcl.export import export_encoder, read_encoder

    cfg = load_config("cifar10-gbrcl-reference")
    method = build_method(cfg, 3, CIFAR_MEAN, CIFAR_STD)
    blocks = [b for stage in (getattr(method.encoder.backbone, f"layer{i}") for i in range(1, 5)) for b in stage]
    assert sum(not b.downsample for b in blocks) == 5 and not any(b.identity_shortcut for b in blocks)
    encoder = method.encoder.eval()
    info = dataset_info("cifar10")
    export_encoder(encoder, tmp_path / "e.safetensors", info, cfg, **encoder_export_fields(cfg, info))
    again, meta = read_encoder(tmp_path / "e.safetensors")
    assert meta["identity_shortcut"] is False and tuple(meta["mean"]) == IMAGENET_MEAN
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(x, "adversarial"), encoder(x, "adversarial"))


def test_imagenet_normalisation_replaces_the_dataset_constants():
    default = build_method(load_config("cifar10-gbrcl"), 3, CIFAR_MEAN, CIFAR_STD).encoder
    reference = build_method(load_config("cifar10-gbrcl", ["reference.imagenet_normalisation=true"]), 3,
                             CIFAR_MEAN, CIFAR_STD).encoder
    assert torch.equal(default.mean.flatten(), torch.tensor(CIFAR_MEAN))
    assert torch.equal(reference.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.equal(reference.std.flatten(), torch.tensor(IMAGENET_STD))
    grey = build_method(load_config("smoke", ["reference.imagenet_normalisation=true"]), 1, (0.5,), (0.25,)).encoder
    assert torch.allclose(grey.mean.flatten(), torch.tensor([0.449]))
    assert torch.allclose(grey.std.flatten(), torch.tensor([0.226]))


def _adversarial_bn(method) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in method.named_parameters() if ".adversarial." in n}


@pytest.mark.parametrize("reached_only", [False, True])
def test_sam_reached_only_leaves_adversarial_bn_bitwise_unchanged(reached_only):
    method, ctx = _smoke(f"reference.sam_reached_only={str(reached_only).lower()}")
    before = _adversarial_bn(method)
    assert before
    benign_before = {n: p.detach().clone() for n, p in method.named_parameters() if ".benign." in n}
    method.training_step(torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8), ctx)
    after = _adversarial_bn(method)
    unchanged = all(torch.equal(before[n], after[n]) for n in before)
    assert unchanged == reached_only  # on: no step, no weight decay, no momentum; off: the adversarial term moves them
    if reached_only:
        state = ctx.optimizer.state
        assert all(p not in state for n, p in method.named_parameters() if ".adversarial." in n)
    assert any(not torch.equal(benign_before[n], p) for n, p in method.named_parameters() if ".benign." in n)


@pytest.mark.parametrize("updates", [False, True])
def test_sam_pass_updates_bn_lets_the_pass_at_theta_plus_e_move_the_running_statistics(updates):
    method, ctx = _smoke(f"reference.sam_pass_updates_bn={str(updates).lower()}", "method.critic.enabled=false")
    x = torch.rand(8, 1, 16, 16)
    bn = next(m for m in method.modules() if isinstance(m, torch.nn.BatchNorm2d))
    count = int(bn.num_batches_tracked)
    ctx.encoder_step(lambda only: method.loss_terms(x, x.flip(-1), x.flip(-2), only), {"benign": 2.0, "adversarial": 1.0})
    assert int(bn.num_batches_tracked) - count == (2 if updates else 1)  # benign branch: full pass (+ SAM's pass)


def test_unclipped_start_leaves_the_image_box_before_the_first_step_only():
    x = torch.zeros(64, 1, 4, 4)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    start = pgd(lambda z: z.sum(), x, 0.1, 0.05, 0, True, gen(), clip_start=False)
    clipped = pgd(lambda z: z.sum(), x, 0.1, 0.05, 0, True, gen())
    assert start.min() < -0.05 and start.abs().max() <= 0.1  # x + U(-eps, eps), half of it below 0
    assert torch.equal(clipped, start.clamp(0, 1))  # the default: the same start, clipped
    seen = []
    out = pgd(lambda z: seen.append(z.detach().min().item()) or -z.sum(), x, 0.1, 0.05, 1, True, gen(), clip_start=False)
    assert seen[0] < 0 and out.min() >= 0 and out.max() <= 0.1  # the step's projection clips


@pytest.mark.parametrize("unclipped", [False, True])
def test_the_training_attack_starts_unclipped_under_the_switch(unclipped):
    method, ctx = _smoke(f"reference.unclipped_start={str(unclipped).lower()}", "method.critic.enabled=false")
    inputs = []
    original = method.embed
    method.embed = lambda z, branch: (inputs.append(z.detach().min().item()) if branch == "adversarial" else None) \
        or original(z, branch)  # type: ignore[method-assign]
    method.attack(torch.rand(8, 1, 16, 16), torch.zeros(8, 1, 16, 16), ctx)
    assert (inputs[0] < 0) == unclipped


def _authors_schedule(n: int, epochs: int, warm: int, base: float, floor: float) -> list[float]:
    """Their training loop's learning rates, simulated literally: the optimiser starts at base; after each step the
    warm-up rate is set while epoch < warm; at each epoch's end the cosine of that epoch."""
    cos = lambda t: floor + (base - floor) * (1 + math.cos(math.pi * t / epochs)) / 2  # noqa: E731
    lr, used = base, []
    for epoch in range(1, epochs + 1):
        for i in range(n):
            used.append(lr)
            if epoch < warm:
                lr = floor + (i + (epoch - 1) * n) / (warm * n) * (cos(warm) - floor)
        lr = cos(epoch)
    return used


def test_the_reference_schedule_is_the_authors_loop_step_by_step():
    n, epochs, warm, base, floor = 7, 9, 3, 0.5, 1e-8
    expected = _authors_schedule(n, epochs, warm, base, floor)
    mine = [reference_learning_rate(s, n, epochs, warm, base, floor) for s in range(n * epochs)]
    assert mine == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert mine[0] == base and mine[1] == floor  # first step at the full rate, the second at the floor
    assert mine[n] == pytest.approx(floor + (base - floor) * (1 + math.cos(math.pi / epochs)) / 2)  # each epoch's first step
    after = mine[warm * n:]
    for e in range(warm, epochs):  # after warm-up: constant within an epoch, the cosine of the epochs done
        assert len(set(after[(e - warm) * n:(e - warm + 1) * n])) == 1


def test_the_pretrainer_uses_the_reference_schedule_for_the_encoder_and_the_critic(tmp_path):
    overrides = ["train.log_every=1", "train.threads=1", "train.warmup_epochs=2", "reference.schedule=true",
                 "reference.critic_schedule=true"]
    run = RunDir(tmp_path / "r")
    trainer = Pretrainer(load_config("smoke", overrides), run)
    run.prepare("x\n", False, False)
    seen = []
    step = trainer.method.training_step
    trainer.method.training_step = lambda images, ctx: seen.append(  # type: ignore[method-assign]
        ctx.critic_optimizer.param_groups[0]["lr"]) or step(images, ctx)
    trainer.fit(progress=False)
    lrs = [r["lr"] for r in run.iter_metrics("pretrain")]
    assert lrs[0] == 0.1 and lrs[1] == pytest.approx(1e-8)  # smoke: train.lr 0.1, min_lr 1e-8
    assert seen[0] == 0.2 and seen[1] == pytest.approx(1e-8)  # critic.lr 0.2, the same shape
    default = RunDir(tmp_path / "d")
    plain = Pretrainer(load_config("smoke", ["train.log_every=1", "train.threads=1"]), default)
    default.prepare("x\n", False, False)
    plain.fit(progress=False)
    assert [r["lr"] for r in default.iter_metrics("pretrain")][0] < 0.1  # robustcl's warm-up starts low


# ------------------------------------------------------------------------------------ AdvCL's
def _advcl(*overrides: str):
    return _smoke("method.name=advcl", "method.attack.steps=1", "method.benign_weight=0.5", *overrides)


def test_advcl_separate_forwards_give_every_view_its_own_benign_forward():
    views = [torch.rand(6, 1, 16, 16) for _ in range(3)]
    x, clean = torch.rand(6, 1, 16, 16), torch.cat(views)
    for separate, expected in ((False, [18]), (True, [6, 6, 6])):
        method, ctx = _advcl(f"reference.advcl_separate_forwards={str(separate).lower()}", "method.critic.enabled=false")
        sizes = []
        original = method.embed
        method.embed = lambda z, branch: (sizes.append(len(z)) if branch == "benign" else None) \
            or original(z, branch)  # type: ignore[method-assign]
        terms = method.loss_terms(x, clean, x, None, ctx.reference)
        assert sizes == expected and set(terms) == {"contrastive", "benign"}
        if separate:  # SAM's benign-only pass: p and q alone, each its own forward
            sizes.clear()
            assert set(method.loss_terms(x, clean, x, ("benign",), ctx.reference)) == {"benign"} and sizes == [6, 6]


def test_advcl_supcon_scale_multiplies_both_contrastive_terms_by_tau_over_0_07():
    x = torch.rand(6, 1, 16, 16)
    clean, x_adv = torch.rand(18, 1, 16, 16), torch.rand(6, 1, 16, 16)
    plain, ctx = _advcl("method.critic.enabled=false")
    scaled_method, scaled_ctx = _advcl("method.critic.enabled=false", "reference.advcl_supcon_scale=true")
    scaled_method.load_state_dict(plain.state_dict())
    base = plain.loss_terms(x, clean, x_adv, None, ctx.reference)
    scaled = scaled_method.loss_terms(x, clean, x_adv, None, scaled_ctx.reference)
    for key in ("contrastive", "benign"):
        assert torch.allclose(scaled[key], base[key] * (0.5 / 0.07), rtol=1e-6), key


@pytest.mark.parametrize("raw", [False, True])
def test_advcl_raw_high_frequency_feeds_the_signed_high_pass(raw):
    x = torch.rand(4, 1, 16, 16)
    high = high_frequency(x, 4.0, rescale=False)
    assert high.min() < 0 and torch.allclose(high.mean(dim=(2, 3)), torch.zeros(4, 1), atol=1e-5)
    method, ctx = _advcl(f"reference.advcl_raw_high_frequency={str(raw).lower()}", "method.critic.enabled=false")
    fed = []
    original = method.embed
    method.embed = lambda z, branch: fed.append(z.detach()) or original(z, branch)  # type: ignore[method-assign]
    method.training_step(torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8), ctx)
    hf_view = fed[0].chunk(3)[2]  # the attack target z_b([p; q; HF(x)]) is the step's first forward
    assert (hf_view.min() < 0) == raw and hf_view.max() <= 1


# ------------------------------------------------------------------------- the evaluation reading
def test_the_reference_linear_rate_is_the_cosine_at_the_epoch_number():
    from robustcl.evaluation.reference_reading import epoch_learning_rate

    rates = [epoch_learning_rate(e, 100, 0.1) for e in range(1, 101)]
    assert rates[0] == pytest.approx(1e-8 + (0.1 - 1e-8) * (1 + math.cos(math.pi / 100)) / 2) and rates[0] < 0.1
    assert rates[-1] == pytest.approx(1e-8) and rates == sorted(rates, reverse=True)


def test_the_reference_reading_is_reported_labelled_beside_unchanged_honest_numbers(tmp_path):
    import json

    from robustcl.cli import main
    from robustcl.evaluation.reference_reading import REFERENCE_LABEL

    out = tmp_path / "run"
    quiet = ["--quiet", "train.threads=1"]
    assert main(["pretrain", "--config", "smoke", "--out", str(out), *quiet]) == 0
    assert main(["finetune", "--run", str(out), *quiet]) == 0
    assert main(["evaluate", "--run", str(out), *quiet]) == 0
    honest = json.loads((out / "results.json").read_text())
    assert "reference_reading" not in honest
    assert main(["evaluate", "--run", str(out), *quiet, "reference.evaluation=true"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["protocols"]["slf"]["clean_acc"] == honest["protocols"]["slf"]["clean_acc"]
    assert results["protocols"]["alf"]["robust"] == honest["protocols"]["alf"]["robust"]
    reading = results["reference_reading"]
    assert reading["label"] == REFERENCE_LABEL and set(reading["protocols"]) == {"slf", "alf"}
    for protocol, r in reading["protocols"].items():
        robust = [h["robust_acc_adversarial_branch"] for h in r["history"]]
        assert len(robust) == 2 and r["epoch"] == robust.index(max(robust)) + 1  # picked on the test set
        assert r["robust_acc_adversarial_branch"] == max(robust)
        assert r["head_trained_on"] == ("benign" if protocol == "slf" else "adversarial")
    report = (out / "report.md").read_text()
    assert "## Reference reading (the authors' linear evaluation; not a headline number)" in report
    assert "picked on TEST robust accuracy" in report and "honest reading:" in report


def test_the_reference_reading_keeps_the_epoch_of_highest_test_robust_accuracy_and_its_clean_reading(monkeypatch):
    import robustcl.evaluation.reference_reading as rr

    cfg = load_config("smoke", ["finetune.epochs=4", "reference.evaluation=true"])
    encoder = build_method(cfg, 1, (0.5,), (0.25,)).encoder.eval().requires_grad_(False)
    robust, clean, branches = iter([0.2, 0.5, 0.5, 0.3]), iter([0.9, 0.7, 0.6, 0.8]), []
    monkeypatch.setattr(rr, "_unclipped_pgd_accuracy", lambda model, *a: branches.append(model.branch) or next(robust))
    monkeypatch.setattr(rr, "accuracy", lambda model, *a: branches.append(model.branch) or next(clean))
    images = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 4, (16,))
    out = rr.fit_and_select("slf", encoder, (images, labels), (images[:8], labels[:8]), 4, cfg, torch.device("cpu"),
                            contextlib.nullcontext)
    assert (out["epoch"], out["clean_acc_benign_branch"], out["robust_acc_adversarial_branch"]) == (2, 0.7, 0.5)
    assert branches == ["benign", "adversarial"] * 4  # clean through the benign branch, robust through the adversarial
