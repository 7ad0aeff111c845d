"""Phase-1 diagnostics: k-NN probe, feature attack, warning rules, the training hook and the report."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from robustcl.config import ConfigError, DiagnosticsConfig, load_config
from robustcl.methods import METHODS
from robustcl.methods.gbrcl import Gbrcl
from robustcl.models import build_encoder
from robustcl.runs import RunDir, RunError
from robustcl.runs.report import write_report
from robustcl.train import diagnostics as dg
from robustcl.train.pretrain import pretrain

CHANCE = 0.1
KEYS = {"phase", "step", "knn_clean", "knn_robust", "critic_acc", "warnings"}


def _unit(degrees: list[float]) -> torch.Tensor:
    """2-D unit vectors at the given angles."""
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


# ------------------------------------------------------------------------------ k-NN
def test_knn_accuracy_on_hand_made_features():
    bank, labels = _unit([0, 10, 20, 90, 100, 180]), torch.tensor([0, 0, 0, 1, 1, 2])
    queries = _unit([5, 95, 178]) * 3.0  # any norm: cosine
    # k=3 neighbours: {0,10,20} -> 0; {90,100,20} -> 1 (two close votes beat one far); {180,100,90} -> 1 by
    # count but 2 by weight (cos 1.0 vs cos ~0.03 at T = 0.07)
    assert dg.knn_accuracy(bank, labels, queries, torch.tensor([0, 1, 2]), 3, k=3) == 1.0
    assert dg.knn_accuracy(bank, labels, queries, torch.tensor([0, 1, 1]), 3, k=3) == pytest.approx(2 / 3)


def test_knn_weighting_beats_majority_only_for_close_neighbours():
    bank, labels = _unit([0, 60, -60]), torch.tensor([1, 0, 0])
    query, truth = _unit([0]), torch.tensor([1])
    assert dg.knn_accuracy(bank, labels, query, truth, 2, k=3, temperature=0.07) == 1.0   # e^(1/T) > 2 e^(0.5/T)
    assert dg.knn_accuracy(bank, labels, query, truth, 2, k=3, temperature=1e4) == 0.0    # ~majority: 2 votes to 1
    assert dg.knn_accuracy(bank, labels, query, truth, 2, k=99) == 1.0                    # k clamped to the bank


def test_bank_and_queries_shrink_in_proportion_on_a_small_split():
    assert dg.split_sizes(5000, 2000, 500) == (2000, 500)
    assert dg.split_sizes(64, 2000, 500) == (51, 13)
    assert dg.split_sizes(2, 2000, 500) == (1, 1)
    with pytest.raises(RunError, match="data.val_size"):
        dg.split_sizes(1, 2000, 500)


# ------------------------------------------------------------------------------ feature attack
def test_feature_attack_stays_in_the_ball_and_lowers_cosine_similarity():
    torch.manual_seed(0)
    enc = build_encoder("convnet", 1, (0.5,), (0.25,), dual_bn=False, widths=(4, 8, 8, 16)).eval()
    x, eps = torch.rand(16, 1, 16, 16), 0.1
    x_adv = dg.feature_attack(lambda v: enc(v), x, eps, 3, torch.Generator().manual_seed(1), [enc])
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    noise = (x + (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) - 1) * eps).clamp(0, 1)
    with torch.no_grad():
        cos = lambda a: F.cosine_similarity(enc(a), enc(x)).mean().item()  # noqa: E731
        assert cos(x_adv) < cos(noise) - 0.01 and cos(x_adv) < 0.99
    assert all(p.grad is None and p.requires_grad for p in enc.parameters())  # frozen while attacking, restored


# ------------------------------------------------------------------------------ warning rules
def test_thresholds_default_to_the_documented_values():
    d = DiagnosticsConfig()
    assert (d.k, d.bank, d.queries, d.attack_batch, d.attack_steps, d.every) == (20, 2000, 500, 128, 3, 0)
    assert (d.critic_high, d.critic_high_checks, d.critic_chance, d.critic_chance_checks) == (0.95, 2, (0.45, 0.55), 3)
    assert (d.loss_rise, d.robust_drop, d.robust_floor, d.clean_floor) == (1.5, 0.5, 1.5, 3.0)


@pytest.mark.parametrize("acc, fires", [([0.7, 0.96, 0.97], True), ([0.95, 1.0], True), ([0.96, 0.9, 0.97], False),
                                        ([0.97], False), ([0.6, 0.7, 0.8, 0.9], False)])
def test_critic_overfitting_rule(acc, fires):
    message = dg.critic_overfitting(acc)
    assert bool(message) == fires
    if fires:
        assert message.startswith("critic-overfitting: ") and "lambda_D" in message and "\n" not in message


@pytest.mark.parametrize("acc, fires", [([0.5, 0.52, 0.48], True), ([0.5, 0.5, 0.46, 0.54, 0.5], True),
                                        ([0.5, 0.52, 0.48, 0.7], False), ([0.5, 0.6, 0.5], False),
                                        ([0.5, 0.5], False), ([0.6, 0.7, 0.8], False)])
def test_critic_not_learning_rule(acc, fires):
    assert bool(dg.critic_not_learning(acc)) == fires


@pytest.mark.parametrize("values, fires", [
    ([6.0, 5.0, 4.0, 3.5, 6.0], True),                       # 6 > 1.5 x 3.5
    ([5.0, 4.0, 4.1, 4.2, 4.3, 4.4, 4.5], True),             # non-decreasing and up over the last 6 checks
    ([6.0, 10.0, 9.0], False),                               # within the first 3 checks
    ([6.0, 5.5, 5.2, 5.0, 4.9, 4.95, 4.8, 4.85], False),     # healthy, noisy
    ([5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0], False),            # a plateau is not a rise
])
def test_loss_diverging_rule(values, fires):
    messages = dg.loss_diverging({"benign": values})
    assert bool(messages) == fires
    assert all(m.startswith("loss-diverging (benign): ") for m in messages)


def test_loss_rule_skips_game_terms_and_accuracies():
    records = [{"losses": {"benign": v, "divergence": -0.7 + 0.1 * i, "critic_acc": 0.5 + 0.1 * i,
                           "critic_loss": 0.1 * (i + 1)}} for i, v in enumerate([6.0, 5.0, 4.0, 3.9, 3.8, 3.7, 3.6])]
    series = dg.loss_series(records, DiagnosticsConfig().loss_ignore)
    assert set(series) == {"benign"} and dg.loss_diverging(series) == []


@pytest.mark.parametrize("robust, clean, fires", [
    ([0.2, 0.4, 0.45, 0.15], [0.5, 0.6, 0.7, 0.7], True),    # > 50% below its best
    ([0.2, 0.19, 0.16, 0.14], [0.5, 0.6, 0.7, 0.7], True),   # below 1.5x chance while clean > 3x chance
    ([0.2, 0.19, 0.16, 0.14], [0.5, 0.3, 0.3, 0.25], False),  # clean collapsed too: not this signature
    ([0.2, 0.3, 0.35, 0.33], [0.5, 0.6, 0.7, 0.7], False),   # healthy
    ([0.05, 0.02, 0.01], [0.5, 0.6, 0.7], False),             # never robust (SimCLR): nothing collapsed
])
def test_robust_collapse_rule(robust, clean, fires):
    message = dg.robust_collapse(robust, clean, CHANCE)
    assert bool(message) == fires
    if fires:
        assert message.startswith("robust-collapse: ") and "catastrophic overfitting" in message


def test_all_rules_silent_on_a_healthy_run_and_loud_on_a_sick_one():
    cfg = DiagnosticsConfig()
    healthy = [{"knn_clean": 0.4 + 0.05 * i, "knn_robust": 0.2 + 0.03 * i, "critic_acc": 0.6 + 0.03 * i,
                "losses": {"benign": 6.0 - 0.2 * i, "adversarial": 6.5 - 0.2 * i}} for i in range(8)]
    assert all(dg.warnings_for(healthy[:n], cfg, CHANCE) == [] for n in range(1, 9))
    sick = [{"knn_clean": 0.7, "knn_robust": r, "critic_acc": a, "losses": {"benign": b}}
            for r, a, b in [(0.3, 0.5, 6.0), (0.4, 0.97, 4.0), (0.4, 0.99, 4.0), (0.1, 0.99, 7.0)]]
    tags = {w.split(":")[0] for w in dg.warnings_for(sick, cfg, CHANCE)}
    assert tags == {"critic-overfitting", "loss-diverging (benign)", "robust-collapse"}


def test_diagnostics_config_is_validated():
    with pytest.raises(ConfigError, match="diagnostics.every"):
        load_config("smoke", ["diagnostics.every=-1"])
    with pytest.raises(ConfigError, match="diagnostics.critic_chance"):
        load_config("smoke", ["diagnostics.critic_chance=[0.6, 0.4]"])
    with pytest.raises(ConfigError, match="unknown config key diagnostics.evry"):
        load_config("smoke", ["diagnostics.evry=5"])
    cfg = load_config("smoke", ["diagnostics.every=5", "diagnostics.eps=8/255"])
    assert cfg.diagnostics.every == 5 and cfg.diagnostics.eps == pytest.approx(8 / 255)


# ------------------------------------------------------------------------------ the training hook
def _state(run: RunDir) -> dict:
    return torch.load(run.checkpoint, weights_only=True)


def _assert_same(a, b, where: str = "") -> None:
    """Nested state dicts equal bit for bit."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _drop_config(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "config"}


BASE = ["train.max_steps=6", "train.checkpoint_every=2"]
WITH = BASE + ["diagnostics.every=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The smoke preset for 6 steps with diagnostics every 3 steps, and without."""
    root = tmp_path_factory.mktemp("diag")
    with_d, without = RunDir(root / "with"), RunDir(root / "without")
    pretrain(load_config("smoke", WITH), with_d, progress=False)
    pretrain(load_config("smoke", BASE), without, progress=False)
    return with_d, without


def test_smoke_run_logs_diagnostics_at_the_expected_steps(runs):
    records = list(runs[0].iter_metrics("diagnostics"))
    assert [r["step"] for r in records] == [3, 6]  # every 3 steps (the last one is the end)
    for r in records:
        assert KEYS <= set(r) and isinstance(r["warnings"], list)
        assert all(0 <= r[k] <= 1 for k in ("knn_clean", "knn_robust", "critic_acc"))
        assert r["branch"] == "adversarial" and r["eps"] == pytest.approx(0.1)  # the method's own attack eps
        assert r["n_bank"] + r["n_queries"] <= 64 and r["n_attack"] <= r["n_queries"]  # the held-out split
    assert not list(runs[1].iter_metrics("diagnostics"))


def test_diagnostics_leave_training_bit_identical(runs):
    with_d, without = (_drop_config(_state(r)) for r in runs)
    _assert_same(with_d, without)
    strip = lambda run: [{k: v for k, v in r.items() if k != "images_per_s"}  # noqa: E731
                         for r in run.iter_metrics("pretrain")]
    assert strip(runs[0]) == strip(runs[1])


ATTACK_FREE_SINGLE_BN = sorted(name for name, cls in METHODS.items()
                               if not cls.dual_bn and cls.attack_free(cls.config_class())
                               and not cls.wants_critic(cls.config_class()))


@pytest.mark.parametrize("name", ATTACK_FREE_SINGLE_BN)
def test_an_attack_free_single_bn_method_reads_the_benign_branch_without_a_critic(tmp_path, name):
    run = RunDir(tmp_path / name)
    pretrain(load_config("smoke", [f"method.name={name}", "train.max_steps=2", "diagnostics.every=2"]), run,
             progress=False)
    (record,) = run.iter_metrics("diagnostics")
    assert record["branch"] == "benign" and "critic_acc" not in record
    assert record["eps"] == pytest.approx(DiagnosticsConfig().eps)  # no method attack: diagnostics.eps


def test_killed_run_with_diagnostics_resumes_exactly(runs, tmp_path, monkeypatch):
    cfg, straight, killed = load_config("smoke", WITH), runs[0], RunDir(tmp_path / "killed")
    original, calls = Gbrcl.training_step, {"n": 0}

    def dying(self, images, ctx):
        calls["n"] += 1
        if calls["n"] == 4:  # checkpoint at step 2, diagnostics at step 3 logged, killed in step 4
            raise KeyboardInterrupt
        return original(self, images, ctx)

    monkeypatch.setattr(Gbrcl, "training_step", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, killed, progress=False)
    assert [r["step"] for r in killed.iter_metrics("diagnostics")] == [3]
    monkeypatch.setattr(Gbrcl, "training_step", original)
    pretrain(cfg, killed, resume=True, progress=False)
    _assert_same(_drop_config(_state(straight)), _drop_config(_state(killed)))
    strip = lambda run: [{k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
                         for r in run.iter_metrics("diagnostics")]
    assert [r["step"] for r in strip(killed)] == [3, 6] and strip(killed) == strip(straight)


# ------------------------------------------------------------------------------ report
def test_report_gains_the_diagnostics_plot_and_section(runs):
    with_d, without = runs
    write_report(with_d)
    write_report(without)
    assert (with_d.plots / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Diagnostics" in with_d.report.read_text() and (with_d.plots / "loss_terms.png").is_file()
    assert not (without.plots / "diagnostics.png").exists() and "Diagnostics" not in without.report.read_text()


def test_report_lists_warnings_grouped_by_rule(tmp_path):
    run = RunDir(tmp_path / "r")
    run.root.mkdir()
    base = {"phase": "diagnostics", "knn_clean": 0.7, "knn_robust": 0.3, "chance": 0.1, "k": 20}
    for step, warnings in [(10, []), (20, ["critic-overfitting: a"]), (30, ["critic-overfitting: b", "robust-collapse: c"])]:
        run.log({**base, "step": step, "critic_acc": 0.97, "warnings": warnings})
    text = write_report(run).read_text()
    assert "- 2 check(s), steps 20-30; latest: critic-overfitting: b" in text
    assert "- 1 check(s), steps 30-30; latest: robust-collapse: c" in text and "No warnings" not in text
    assert (run.plots / "diagnostics.png").is_file()
    assert json.loads(run.metrics.read_text().splitlines()[0])["step"] == 10


def test_diagnostics_config_round_trips_through_the_run_config():
    cfg = load_config("smoke", ["diagnostics.every=7", "diagnostics.loss_ignore=[divergence]"])
    assert cfg.to_dict()["diagnostics"]["every"] == 7
    assert dataclasses.asdict(cfg.diagnostics)["loss_ignore"] == ("divergence",)
