"""Progress everywhere that takes time (issue 25.2): every part of an evaluation is a tqdm bar on a terminal, one
line on a stderr that is not one, nothing with --quiet, and a "progress" record of metrics.jsonl in every case;
the demo names each method and phase."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from robustcl.cli import main
from robustcl.config import load_config
from robustcl.evaluation.run_eval import evaluate_run
from robustcl.runs import RunDir
from robustcl.runs.progress import PHASE, Part, Progress, StepBar

LINE = re.compile(r"^robustcl evaluate (\w+)/(.+): (\d+) images? in \d+\.\d s \(\d+\.\d img/s\)$")
# 32 images in batches of 16; the smoke model (4 classes) evaluated through every part that takes time
EVAL = ["eval.limit=32", "eval.batch_size=16", "eval.l2.steps=2", "eval.steps_curve=[1]", "eval.mixed_reading=true"]
EVERY_PART = [*EVAL, "eval.attacks=[pgd,cw,pgd-l2]", "eval.corruptions=[gaussian_noise,fog]",
              "eval.corruption_severities=[1]", "eval.corruptions_limit=20", "reference.evaluation=true"]
EVERY_PART_NAMES = ["clean", "pgd3-linf-0.1", "cw3-linf-0.1", "pgd2-l2-0.5", "corruptions", "eps_curve", "steps_curve",
                    "check eval-mode-batch-independent", "check eps-zero-equals-clean", "check non-increasing-in-steps",
                    "check large-eps-to-chance", "check square-not-beating-white-box", "mixed reading",
                    "reference reading", "reference reading"]  # the authors' linear evaluation: SLF, then ALF


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run with its SLF head fitted (copied by `run_copy` for each test)."""
    out = tmp_path_factory.mktemp("progress") / "run"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet", "train.threads=1",
                 "train.max_steps=2"]) == 0
    assert main(["finetune", "--run", str(out), "--protocol", "slf", "--quiet"]) == 0
    return out


@pytest.fixture(autouse=True)
def corruption_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated corrupted sets go to the test's own cache, never the user's."""
    monkeypatch.setenv("ROBUSTCL_DATA", str(tmp_path / "cache"))


def part_records(run: Path) -> list[tuple[str, str, int]]:
    """(protocol, part, images) of each progress record of the run's metrics.jsonl."""
    return [(r["protocol"], r["part"], r["images"]) for r in RunDir(run).iter_metrics(PHASE)]


def evaluate(run: Path, overrides: list[str], progress: bool) -> None:
    """evaluate_run on `run`'s stored config with `overrides`, SLF only."""
    evaluate_run(load_config(str(run / "config.yaml"), overrides), RunDir(run), progress=progress, protocols=("slf",))


# ------------------------------------------------------------------------------------------- the module alone
def test_a_part_is_a_bar_on_a_terminal_a_line_elsewhere_and_nothing_when_quiet(tmp_path):
    run = RunDir(tmp_path)
    seen = {}
    for mode, show, stream in (("terminal", True, Terminal()), ("pipe", True, io.StringIO()),
                               ("quiet", False, io.StringIO()), ("quietterminal", False, Terminal())):
        with Progress("evaluate", show, run, stream).scoped(protocol=mode).part("pgd20", 100) as part:
            for _ in range(4):
                part.update(25)
        seen[mode] = stream.getvalue()
    bar = seen["terminal"]
    assert "\r" in bar and "evaluate terminal/pgd20" in bar and "100/100" in bar and "img/s" in bar
    assert "<" in bar  # elapsed<remaining: the ETA
    assert "robustcl evaluate" not in bar
    assert LINE.match(seen["pipe"].rstrip("\n")) and seen["pipe"].count("\n") == 1 and "\r" not in seen["pipe"]
    assert seen["quiet"] == seen["quietterminal"] == ""
    assert part_records(tmp_path) == [(m, "pgd20", 100) for m in ("terminal", "pipe", "quiet", "quietterminal")]


def test_a_part_with_nothing_to_do_or_ended_by_an_error_reports_nothing(tmp_path):
    stream = io.StringIO()
    parts = Progress("evaluate", True, RunDir(tmp_path), stream)
    with parts.part("empty", 0):
        pass
    with pytest.raises(KeyboardInterrupt), parts.part("stopped", 10) as part:
        part.update(5)
        raise KeyboardInterrupt
    with parts.part("one call", 7):  # counted at its end when it could not count as it went
        pass
    assert stream.getvalue().startswith("robustcl evaluate one call: 7 images in ") and stream.getvalue().count("\n") == 1
    assert [(r["part"], r["images"]) for r in RunDir(tmp_path).iter_metrics(PHASE)] == [("one call", 7)]


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_training_bar_is_a_line_a_minute_off_a_terminal_never_a_carriage_return():
    clock, stream = Clock(), io.StringIO()
    bar = StepBar(10, "pretrain gbrcl bf16", True, initial=2, every=60.0, stream=stream, clock=clock)
    for seconds in (25, 25, 25, 25, 25, 25, 10):  # a line once 60 s passed since the last: steps 5 and 8
        clock.now += seconds
        bar.update(1)
        bar.set_postfix({"benign": "4.100"})
    bar.close()  # and one for what was done since (step 9, stopped early)
    bar.close()  # once is enough
    assert "\r" not in stream.getvalue()
    assert stream.getvalue().splitlines() == [
        "robustcl pretrain gbrcl bf16: 5/10 steps (50%), 25.0 s/step, ETA 2:05, benign=4.100",
        "robustcl pretrain gbrcl bf16: 8/10 steps (80%), 25.0 s/step, ETA 0:50, benign=4.100",
        "robustcl pretrain gbrcl bf16: 9/10 steps (90%), 22.9 s/step, ETA 0:23, benign=4.100"]
    stream = io.StringIO()  # a value set after the step that printed a line (ALF's validation): said at the end
    bar = StepBar(2, "finetune ALF (adversarial)", True, every=60.0, stream=stream, clock=clock)
    for postfix in ("val_robust=0.400", "val_robust=0.450"):
        clock.now += 60
        bar.update(1)
        bar.set_postfix(dict([postfix.split("=")]))
    bar.close()
    assert stream.getvalue().splitlines() == [
        "robustcl finetune ALF (adversarial): 1/2 steps (50%), 60.0 s/step, ETA 1:00",
        "robustcl finetune ALF (adversarial): 2/2 steps (100%), 60.0 s/step, val_robust=0.400",
        "robustcl finetune ALF (adversarial): 2/2 steps (100%), 60.0 s/step, val_robust=0.450"]  # the last value
    terminal, quiet = Terminal(), io.StringIO()
    for stream_, show in ((terminal, True), (quiet, False)):
        bar = StepBar(4, "finetune ALF (adversarial)", show, stream=stream_)
        for _ in range(4):
            bar.update(1)
        bar.close()
    assert "\r" in terminal.getvalue() and "4/4" in terminal.getvalue() and "robustcl" not in terminal.getvalue()
    assert quiet.getvalue() == ""


def test_training_and_fine_tuning_say_lines_on_a_stderr_that_is_not_a_terminal(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "train.threads=1", "train.max_steps=2"]) == 0
    assert main(["finetune", "--run", str(out), "finetune.epochs=2", "finetune.alf_train_limit=16",
                 "--protocol", "slf", "alf"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err, err
    assert re.search(r"^robustcl pretrain gbrcl \w+: 2/2 steps \(100%\), [\d.]+ step/s, .*benign=", err, re.M), err
    assert re.search(r"^robustcl finetune SLF \(adversarial\): 2/2 epochs \(100%\), .*val=", err, re.M), err
    assert re.search(r"^robustcl finetune ALF \(adversarial\): (\d+)/\1 steps \(100%\)", err, re.M), err


# --------------------------------------------------------------------------------------------- an evaluation
def test_an_evaluation_says_one_line_per_part_off_a_terminal_and_records_it(run_copy, capsys, monkeypatch):
    updates: list[int] = []
    real = Part.update

    def counting(self: Part, n: int) -> None:  # each update's size: a batch
        updates.append(n)
        real(self, n)

    monkeypatch.setattr(Part, "update", counting)
    evaluate(run_copy, EVERY_PART, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    found = [LINE.match(line) for line in err.splitlines()]
    assert all(found), err
    assert [m.group(2) for m in found] == EVERY_PART_NAMES
    assert [m.group(1) for m in found] == ["slf"] * (len(found) - 1) + ["alf"]
    images = {m.group(2): int(m.group(3)) for m in found}
    assert images["clean"] == images["pgd3-linf-0.1"] == 32 and images["corruptions"] == 2 * 20
    assert images["eps_curve"] == 2 * 32 and images["mixed reading"] == 2 * 32
    assert updates[:4] == [16, 16, 16, 16]  # bar.update(batch size): the clean part's two batches, then PGD's
    assert updates.count(32) == 1  # only the Square cross-check counts all its images at its end
    assert part_records(run_copy) == [(m.group(1), m.group(2), int(m.group(3))) for m in found]
    records = list(RunDir(run_copy).iter_metrics(PHASE))
    assert all(r["command"] == "evaluate" and r["seconds"] >= 0 and r["images_per_s"] >= 0 for r in records)


def test_autoattack_is_a_part_through_the_command_line_and_quiet_says_nothing(run_copy, capsys):
    aa = ["eval.limit=32", "eval.batch_size=16", "eval.attacks=[pgd,autoattack]", "eval.autoattack_limit=20", "eval.attack.eps=0.3",
          "eval.attack.alpha=0.1"]  # no image survives APGD-CE: the three other attacks have nothing to do
    assert main(["evaluate", "--run", str(run_copy), *aa, "--protocol", "slf"]) == 0
    err = capsys.readouterr().err
    names = [m.group(2) for m in map(LINE.match, err.splitlines()) if m]
    assert names == ["clean", "pgd3-linf-0.3", "autoattack apgd-ce", "eps_curve", "check eval-mode-batch-independent",
                     "check eps-zero-equals-clean", "check non-increasing-in-steps", "check large-eps-to-chance"], err
    first = part_records(run_copy)
    assert [p for _, p, _ in first] == names
    assert main(["evaluate", "--run", str(run_copy), *aa, "--quiet", "--protocol", "slf"]) == 0
    assert capsys.readouterr().err == ""
    again = [r for r in first if r[1] != "autoattack apgd-ce"]  # AutoAttack's finished state is read back: no work
    assert part_records(run_copy) == first + again  # recorded all the same


def test_an_evaluation_on_a_terminal_draws_bars_not_lines(run_copy, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    evaluate(run_copy, EVAL, progress=True)
    out = terminal.getvalue()
    assert "\r" in out and "evaluate slf/clean" in out and "evaluate slf/check large-eps-to-chance" in out
    assert "32/32" in out and "img/s" in out
    assert "robustcl evaluate" not in out
    assert len(part_records(run_copy)) == 10


def test_autoattack_reports_each_of_its_four_attacks_batch_by_batch(tmp_path, monkeypatch, one_thread):
    """The library's per-batch lines tick the bar: 6 robust images in batches of 4 are updates of 4 and 2. (The
    attacks themselves are made no-ops here, for speed: the library's own loop over the batches still runs.)"""
    import pyautoattack.autopgd_base as apgd
    import pyautoattack.fab_pt as fab
    import pyautoattack.square as square
    from test_eval_trust import Linear10, points

    from robustcl.evaluation.autoattack import autoattack_accuracy

    for cls in (apgd.APGDAttack, apgd.APGDAttack_targeted, fab.FABAttack_PT, square.SquareAttack):
        monkeypatch.setattr(cls, "perturb", lambda self, x, y, *args, **kwargs: x)
    updates: list[int] = []
    real = Part.update
    monkeypatch.setattr(Part, "update", lambda self, n: (updates.append(n), real(self, n)))
    x, y = points(6)
    stream = io.StringIO()
    result = autoattack_accuracy(Linear10().eval(), x, y, 0.01, batch_size=4, seed=0,
                                 parts=Progress("evaluate", True, RunDir(tmp_path), stream))
    assert result.accuracy == 1.0  # every image stays robust: each attack attacks all six
    attacks = ("apgd-ce", "apgd-t", "fab-t", "square")
    lines = stream.getvalue().splitlines()
    assert [line.split(": ")[0] for line in lines] == [f"robustcl evaluate autoattack {a}" for a in attacks]
    assert all(": 6 images in " in line for line in lines)
    assert updates == [4, 2] * 4  # not one update of 6 at each attack's end
    assert [r["part"] for r in RunDir(tmp_path).iter_metrics(PHASE)] == [f"autoattack {a}" for a in attacks]


def test_the_numbers_do_not_depend_on_progress(run_copy, tmp_path, monkeypatch):
    """Quiet or with bars, the same results (timings aside): reporting touches no generator."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    evaluate(run_copy, EVAL, progress=False)
    monkeypatch.setattr("sys.stderr", Terminal())
    evaluate(other, EVAL, progress=True)
    a, b = RunDir(run_copy).read_results(), RunDir(other).read_results()
    for r in (a, b):
        r["protocols"]["slf"].pop("seconds"), r["protocols"]["slf"].pop("seconds_by_part")
        for check in r["protocols"]["slf"]["integrity"]["checks"]:
            check.pop("seconds")
    assert a == b


# ----------------------------------------------------------------------------------------------------- the demo
def test_the_demo_names_each_method_and_phase_unless_quiet(tmp_path, monkeypatch, capsys):
    from robustcl import demo

    def evaluated(cfg, run, **kwargs):  # noqa: ANN001, ANN003, ANN202 - a finished run, as the demo checks it
        run.results.write_text("{}")
        run.heads.mkdir(parents=True, exist_ok=True)
        for protocol in cfg.finetune.protocols:
            run.head(protocol).write_bytes(b"")

    monkeypatch.setattr(demo, "pretrain", lambda cfg, run, **kwargs: run.root.mkdir(parents=True, exist_ok=True))
    monkeypatch.setattr(demo, "finetune", lambda cfg, run, **kwargs: {p: {"seconds": 0.0}
                                                                      for p in cfg.finetune.protocols})
    monkeypatch.setattr(demo, "evaluate_run", evaluated)
    monkeypatch.setattr(demo, "write_demo_report", lambda out, *args: out / "report.md")
    out = tmp_path / "demo"
    demo.run_demo(out, progress=True)
    assert capsys.readouterr().err.splitlines() == [
        "demo: gbrcl — pretrain", "demo: gbrcl — fine-tune (SLF, ALF)", "demo: gbrcl — evaluate",
        "demo: simclr — pretrain", "demo: simclr — fine-tune (SLF, ALF)", "demo: simclr — evaluate", "demo: report"]
    demo.run_demo(out, progress=True)
    assert capsys.readouterr().err.splitlines() == [f"demo: {m} — finished run reused ({out / m})"
                                                    for m in ("gbrcl", "simclr")] + ["demo: report"]
    demo.run_demo(out, progress=False)
    assert capsys.readouterr().err == ""
