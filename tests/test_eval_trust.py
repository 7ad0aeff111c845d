"""AutoAttack, restarts, TRADES/AFF, the steps curve, the mixed reading and the new integrity checks."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn

from robustcl.cli import main
from robustcl.config import AttackConfig, ConfigError, load_config, schedule_overrides
from robustcl.evaluation.autoattack import autoattack_accuracy
from robustcl.evaluation.integrity import (check_autoattack_below_pgd, check_square_vs_whitebox,
                                           square_survivors)
from robustcl.evaluation.robust import accuracy_under, pgd_accuracy, steps_curve
from robustcl.objectives.trades import kl_clean_adv, trades_attack, trades_loss

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from robustcl.runs import RunDir

    out = tmp_path_factory.mktemp("trust") / "run"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet"]) == 0
    assert main(["finetune", "--run", str(out), "--protocol", "slf", "--quiet"]) == 0
    return RunDir(out)


torch.manual_seed(0)
D, K = 16, 10
W, B = torch.randn(K, D), 0.1 * torch.randn(K)


class Linear10(nn.Module):
    """A 10-class linear classifier on 1x4x4 images, optionally rounding its input (masked gradient)."""

    def __init__(self, round_input: bool = False) -> None:
        super().__init__()
        self.w, self.b, self.round_input = nn.Parameter(W.clone()), nn.Parameter(B.clone()), round_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.round_input:  # zero gradient almost everywhere: PGD cannot move, a black-box attack can
            x = x + (torch.round(x * 5) / 5 - x).detach() * 0 + (torch.round(x * 5) / 5 - x)
        return x @ self.w.T + self.b


def points(n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    x = 0.3 + 0.4 * torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    return x, (x.flatten(1) @ W.T + B).argmax(1)


def exact_linf_accuracy(x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """Robust iff for every j != y the margin exceeds eps * ||w_y - w_j||_1 (no box constraint is active)."""
    logits = x.flatten(1) @ W.T + B
    margins = logits.gather(1, y[:, None]) - logits
    dual = (W[y][:, None, :] - W[None]).abs().sum(-1)
    slack = margins - eps * dual
    slack[torch.arange(len(y)), y] = float("inf")
    return (slack.min(1).values > 0).float().mean().item()


@pytest.mark.parametrize("eps", [0.01, 0.02])
def test_autoattack_reaches_the_exact_robust_accuracy_of_a_linear_classifier(eps, tmp_path):
    x, y = points(150)
    model = Linear10().eval()
    exact = exact_linf_accuracy(x, y, eps)
    assert 0.3 < exact < 0.95  # the test is informative: some points are robust, some are not
    result = autoattack_accuracy(model, x, y, eps, batch_size=150, seed=0, state_path=tmp_path / "aa.json")
    assert result.accuracy == pytest.approx(exact)
    assert result.clean == 1.0 and list(result.after) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(a >= b - 1e-4 for a, b in zip(result.after.values(), list(result.after.values())[1:]))
    pgd_acc = pgd_accuracy(model, x, y, AttackConfig(eps, eps / 4, 20), generator=torch.Generator().manual_seed(0))
    assert result.accuracy <= pgd_acc
    # resumable: a finished state is read back without attacking again, with the same numbers
    again = autoattack_accuracy(model, x, y, eps, batch_size=150, seed=0, state_path=tmp_path / "aa.json")
    assert again.accuracy == result.accuracy and again.after == result.after and again.seconds < result.seconds


def test_autoattack_resumes_after_an_interruption_with_the_same_result(tmp_path, monkeypatch):
    import pyautoattack.autopgd_base as library

    x, y = points(150)
    model = Linear10().eval()
    full = autoattack_accuracy(model, x, y, 0.01, batch_size=150, seed=0, state_path=tmp_path / "full.json")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(library.APGDAttack_targeted, "perturb", interrupted)
        with pytest.raises(KeyboardInterrupt):
            autoattack_accuracy(model, x, y, 0.01, batch_size=150, seed=0, state_path=tmp_path / "part.json")
    assert list(json.loads((tmp_path / "part.json").read_text())["after"]) == ["apgd-ce"]
    resumed = autoattack_accuracy(model, x, y, 0.01, batch_size=150, seed=0, state_path=tmp_path / "part.json")
    assert (resumed.accuracy, resumed.after) == (full.accuracy, full.after)
    with pytest.raises(ValueError, match="another AutoAttack evaluation"):
        autoattack_accuracy(model, x, y, 0.02, batch_size=150, seed=0, state_path=tmp_path / "part.json")


def test_autoattack_refuses_a_model_in_train_mode():
    with pytest.raises(RuntimeError, match="eval mode"):
        autoattack_accuracy(Linear10().train(), *points(10), 0.01)


def test_restarts_count_an_image_robust_only_if_it_survives_every_restart():
    x, y = points(40)
    model = Linear10().eval()
    calls: list[int] = []

    def perturb(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        calls.append(len(xb))
        if len(calls) == 2:  # the second restart breaks the first 10 of the survivors
            out = xb.clone()
            out[:10] = torch.flip(xb[:10], dims=[0])  # swapped images: another class for most
            return out
        return xb
    base = accuracy_under(model, x, y, perturb, batch_size=40, restarts=1)
    calls.clear()
    worst = accuracy_under(model, x, y, perturb, batch_size=40, restarts=3)
    assert base == 1.0 and calls == [40, 40, calls[2]] and calls[2] < 40  # only survivors are attacked again
    flipped = torch.flip(x[:10], dims=[0])
    expected = (40 - int(((flipped.flatten(1) @ W.T + B).argmax(1) != y[:10]).sum())) / 40
    assert worst == pytest.approx(expected) and worst < base


def test_restarts_never_raise_accuracy():
    x, y = points(120)
    model = Linear10().eval()
    one = pgd_accuracy(model, x, y, AttackConfig(0.02, 0.002, 3), generator=torch.Generator().manual_seed(0))
    five = pgd_accuracy(model, x, y, AttackConfig(0.02, 0.002, 3), generator=torch.Generator().manual_seed(0),
                        restarts=5)
    assert five <= one


def test_trades_loss_matches_its_formula():
    clean = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])
    p, q = clean.softmax(1), adv.softmax(1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    ce = -clean.log_softmax(1)[torch.arange(2), y].mean()
    assert kl_clean_adv(clean, adv).item() == pytest.approx(kl.item(), rel=1e-6)
    assert trades_loss(clean, adv, y, 6.0).item() == pytest.approx((ce + 6 * kl).item(), rel=1e-6)


def test_trades_attack_stays_in_the_ball_and_raises_the_kl():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    x = torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    x_adv = trades_attack(net, x, 0.1, 0.03, 5, torch.Generator().manual_seed(0), modules=[net])
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert kl_clean_adv(net(x), net(x_adv)).item() > 10 * kl_clean_adv(net(x), net(x + 0.001)).item()
    assert all(p.grad is None and p.requires_grad for p in net.parameters())


def test_steps_curve_reuses_known_points_and_is_seeded():
    x, y = points(60)
    model = Linear10().eval()
    attack = AttackConfig(0.02, 0.005, 10)
    a = steps_curve(model, x, y, attack, [1, 3, 10], seed=0, known={10: 0.123})
    b = steps_curve(model, x, y, attack, [1, 3, 10], seed=0)
    assert [c["steps"] for c in a] == [1, 3, 10] and a[2]["accuracy"] == 0.123
    assert a[:2] == b[:2] and b[0]["accuracy"] >= b[1]["accuracy"] >= b[2]["accuracy"]


def test_autoattack_above_pgd_and_square_beating_white_box_are_flagged():
    assert check_autoattack_below_pgd(0.40, 0.41, 500, 20).passed
    failed = check_autoattack_below_pgd(0.45, 0.41, 500, 20)
    assert not failed.passed and "AutoAttack 0.450 vs PGD-20 0.410" in failed.detail
    assert check_square_vs_whitebox({"apgd-ce": 0.5, "apgd-t": 0.45, "fab-t": 0.45, "square": 0.449}, 500).passed
    bad = check_square_vs_whitebox({"apgd-ce": 0.5, "apgd-t": 0.45, "fab-t": 0.45, "square": 0.30}, 500)
    assert not bad.passed and "0.150" in bad.detail


def test_square_cross_check_fails_on_a_masked_model_and_passes_on_an_honest_one():
    x, y = points(120)
    attack = AttackConfig(0.06, 0.015, 10)
    honest = square_survivors(Linear10().eval(), x, y, attack, 120, 0, _nullcontext)
    assert honest.passed, honest.detail
    masked_model = Linear10(round_input=True).eval()
    masked_model.forward = lambda z: (torch.round(z.flatten(1) * 5) / 5) @ masked_model.w.T + masked_model.b
    masked = square_survivors(masked_model, x, y, attack, 120, 0, _nullcontext)
    assert not masked.passed and "Square-1000 broke" in masked.detail


def _nullcontext():
    import contextlib
    return contextlib.nullcontext()


def test_eval_config_rejects_useless_restarts_and_bad_steps():
    with pytest.raises(ConfigError, match="random_start=true"):
        load_config("smoke", ["eval.restarts=3", "eval.attack.random_start=false"])
    with pytest.raises(ConfigError, match="eval.steps_curve"):
        load_config("smoke", ["eval.steps_curve=[0, 5]"])
    with pytest.raises(ConfigError, match="autoattack"):
        load_config("smoke", ["eval.attacks=[pgd, autoatack]"])


def test_schedule_presets_set_the_two_linear_protocols():
    ref = load_config("smoke", schedule_overrides("linear-reference")).finetune
    bench = load_config("smoke", schedule_overrides("linear-benchmark")).finetune
    assert (ref.epochs, ref.lr, bench.epochs, bench.lr) == (100, 0.1, 25, 0.01)
    with pytest.raises(ConfigError, match="known schedules: linear-benchmark, linear-reference"):
        schedule_overrides("linear")


def test_aff_fine_tunes_the_encoder_and_evaluation_uses_it(smoke_run, capsys):
    """AFF (TRADES) on the smoke run, then evaluate with AutoAttack, steps curve and the mixed reading."""
    root = str(smoke_run.root)
    common = ["finetune.aff.epochs=1", "finetune.aff.batch_size=32", "finetune.aff.train_limit=64",
              "finetune.aff.attack.steps=2", "finetune.val_limit=32"]
    assert main(["finetune", "--run", root, "--protocol", "aff", "--quiet", *common]) == 0
    saved = torch.load(smoke_run.head("aff"), weights_only=True)
    from robustcl.export import read_encoder
    frozen, _ = read_encoder(smoke_run.encoder)
    changed = [k for k, v in frozen.state_dict().items() if not torch.equal(v, saved["encoder"][k])]
    assert saved["aff"] == {"loss": "trades", "beta": 6.0} and changed  # the encoder itself was trained
    assert main(["evaluate", "--run", root, "--protocol", "aff", "slf", "--attacks", "autoattack", "--steps", "1", "2",
                 "--limit", "32", "--mixed-reading", "--quiet"]) == 0
    results = json.loads(smoke_run.results.read_text())
    aff = results["protocols"]["aff"]
    assert results["protocol"] == "slf" and set(results["protocols"]) == {"slf", "aff"} and results["n_eval"] == 32
    assert aff["aff"]["loss"] == "trades" and "autoattack-linf-0.1" in aff["robust"]
    assert aff["autoattack"]["implementation"].startswith("pyautoattack") and aff["autoattack"]["n"] == 32
    assert {"autoattack-at-most-pgd", "square-not-beating-white-box"} <= {c["name"] for c in aff["integrity"]["checks"]}
    assert [c["steps"] for c in aff["steps_curve"]] == [1, 2, 3]
    mixed = results["protocols"]["slf"]["mixed_reading"]
    assert mixed["label"].startswith("MIXED BRANCHES") and 0 <= mixed["clean_acc_benign_branch"] <= 1
    assert (smoke_run.root / "steps_curve.csv").read_text().startswith("protocol,steps,accuracy\n")
    assert "MIXED BRANCHES" in smoke_run.report.read_text()
    capsys.readouterr()
    assert main(["evaluate", "--run", root, "--protocol", "aff", "--limit", "0", "--quiet"]) == 2
    assert "eval.limit" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checks / AutoAttack on a subset
def test_part_index_is_a_seeded_sorted_subset_or_everything():
    from robustcl.evaluation.run_eval import part_index

    assert part_index(50, None, 0) is None and part_index(50, 50, 0) is None
    idx = part_index(1000, 100, 0)
    assert len(idx) == 100 == len(set(idx.tolist())) and bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(idx, part_index(1000, 100, 0)) and not torch.equal(idx, part_index(1000, 100, 1))
    assert idx.max() > 500  # spread over the images, not their first 100


@pytest.mark.parametrize("with_autoattack", [False, True])
def test_checks_and_autoattack_limits_shrink_only_their_part(with_autoattack, tmp_path):
    from robustcl.evaluation.run_eval import evaluate_model
    from robustcl.runs import RunDir

    x, y = points(300)
    for run in ("a", "b"):  # AutoAttack's resumable state is keyed by the head file
        (tmp_path / run / "heads").mkdir(parents=True)
        (tmp_path / run / "heads" / "slf.pt").write_bytes(b"linear10")
    attacks = "[pgd,autoattack]" if with_autoattack else "[pgd]"
    base = ["eval.attack.eps=0.05", "eval.attack.alpha=0.0125", "eval.attack.steps=5", f"eval.attacks={attacks}",
            "eval.batch_size=100"]
    full = evaluate_model(Linear10().eval(), x, y, K, load_config("smoke", overrides=base), contextlib.nullcontext,
                          RunDir(tmp_path / "a"), "slf", fingerprint="linear10")
    part = evaluate_model(Linear10().eval(), x, y, K,
                          load_config("smoke", overrides=base + ["eval.checks_limit=60", "eval.autoattack_limit=80"]),
                          contextlib.nullcontext, RunDir(tmp_path / "b"), "slf", fingerprint="linear10")
    assert part["clean_acc"] == full["clean_acc"] and part["robust"]["pgd5-linf-0.05"] == full["robust"]["pgd5-linf-0.05"]
    assert full["integrity"]["images"] == 300 and part["integrity"]["images"] == 60 and part["integrity"]["passed"]
    if with_autoattack:
        assert full["autoattack"]["images"] == 300 and part["autoattack"]["images"] == 80
        exact = exact_linf_accuracy(x, y, 0.05)
        assert full["autoattack"]["accuracy"] == pytest.approx(exact, abs=1e-9)


class ConfidentlyClassZero(nn.Module):
    """`k` logits that put class 0 far ahead whatever the (small) input change: every image of class 0 survives."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.scale = k, nn.Parameter(torch.tensor(0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.flatten(1)
        others = torch.arange(self.k, dtype=x.dtype) * 0.1 + self.scale * pixels[:, : self.k]
        return torch.cat([10.0 + self.scale * pixels.mean(1, keepdim=True), others[:, 1:]], dim=1)


@pytest.mark.parametrize("classes, attacks", [(3, ["apgd-ce", "fab-t", "square"]),
                                              (4, ["apgd-ce", "apgd-t", "fab-t", "square"]),
                                              (10, ["apgd-ce", "apgd-t", "fab-t", "square"])])
def test_autoattack_runs_on_fewer_than_ten_classes_and_says_how(classes, attacks):
    """Standard AutoAttack's 9 targets need 10 classes (the library raised IndexError on survivors otherwise)."""
    model = ConfidentlyClassZero(classes).eval()
    x, y = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(6, dtype=torch.long)
    result = autoattack_accuracy(model, x, y, eps=0.03, batch_size=6)
    assert result.accuracy == 1.0 and list(result.after) == attacks
    adapted = [w for w in result.warnings if w.startswith(f"{classes} classes:")]
    assert bool(adapted) == (classes < 10)
    assert any("APGD-T not run" in w for w in adapted) == (classes < 4)
