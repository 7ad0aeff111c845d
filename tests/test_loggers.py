"""train.loggers: metrics.jsonl always, TensorBoard and W&B (offline) read back from their own files, resume-aware."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustcl.cli import main
from robustcl.config import ConfigError, load_config
from robustcl.evaluation.run_eval import evaluate_run
from robustcl.methods.gbrcl import Gbrcl
from robustcl.runs import RunDir, RunError
from robustcl.runs.loggers import scalars, series
from robustcl.train.finetune import finetune
from robustcl.train.pretrain import pretrain

# log every step, checkpoint every 2: a kill during step 4 leaves step 3 logged past the checkpoint at 2
OVERRIDES = ["train.max_steps=6", "train.log_every=1", "train.checkpoint_every=2", "train.threads=1",
             "finetune.protocols=[slf]"]


def killed_and_resumed(root: Path, loggers: str, monkeypatch: pytest.MonkeyPatch) -> RunDir:
    """A smoke phase 1 killed during step 4 (checkpoint at 2, step 3 logged), resumed; then SLF fitted twice
    (a refit) and evaluated twice."""
    cfg = load_config("smoke", [*OVERRIDES, f"train.loggers={loggers}"])
    run = RunDir(root)
    original, calls = Gbrcl.training_step, {"n": 0}

    def dying(self, images, ctx):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, images, ctx)

    monkeypatch.setattr(Gbrcl, "training_step", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, run, progress=False)
    monkeypatch.setattr(Gbrcl, "training_step", original)
    pretrain(cfg, run, resume=True, progress=False)
    for _ in range(2):
        finetune(cfg, run, progress=False, overwrite=True)
        evaluate_run(cfg, run, progress=False)
    return run


def jsonl_values(run: RunDir, phase: str, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in run.iter_metrics(phase)}


def test_records_become_named_series_of_finite_scalars():
    record = {"phase": "finetune", "protocol": "alf", "epoch": 3, "loss": 0.5, "val_robust_acc": 0.25,
              "robust": {"pgd20-linf-0.1": 0.125}, "ok": True, "warnings": ["x"], "bad": float("nan")}
    assert series(record) == ("finetune/alf", "epoch", 3)
    assert scalars(record, "epoch") == {"loss": 0.5, "val_robust_acc": 0.25, "robust/pgd20-linf-0.1": 0.125}
    assert series({"phase": "pretrain", "step": 7, "epoch": 0.5})[1:] == ("step", 7)  # step wins over a float epoch
    assert series({"loss": 1.0}) is None


def test_a_missing_logger_library_is_a_one_line_error_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet", "train.loggers=[jsonl, wandb]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("robustcl: error: train.loggers includes wandb but the wandb package is not installed; "
                   "pip install 'robustcl[wandb]', or drop wandb from train.loggers")
    assert not out.exists()


def test_unknown_or_repeated_loggers_are_config_errors():
    with pytest.raises(ConfigError, match="train.loggers"):
        load_config("smoke", ["train.loggers=[jsonl, mlflow]"])
    with pytest.raises(ConfigError, match="must not repeat"):
        load_config("smoke", ["train.loggers=[tensorboard, tensorboard]"])


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one tag as TensorBoard shows it (its event reader, orphaned points purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_shows_each_step_once_after_a_resume_and_a_refit(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    run = killed_and_resumed(tmp_path / "run", "[jsonl, tensorboard]", monkeypatch)
    board = run.root / "tensorboard"
    assert len(list((board / "pretrain").glob("events.out.tfevents.*"))) == 2  # the killed process's file is kept
    logged = jsonl_values(run, "pretrain", "benign")
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    shown = tensorboard_scalars(board / "pretrain", "pretrain/benign")
    assert [s for s, _ in shown] == [1, 2, 3, 4, 5, 6]  # step 3 was logged twice: the killed copy is hidden
    assert [v for _, v in shown] == pytest.approx([logged[s] for s, _ in shown], rel=1e-6)
    lr = tensorboard_scalars(board / "pretrain", "pretrain/lr")
    assert [v for _, v in lr] == pytest.approx([jsonl_values(run, "pretrain", "lr")[s] for s, _ in lr], rel=1e-6)
    epochs = tensorboard_scalars(board / "finetune" / "slf", "finetune/slf/val_acc")
    assert [s for s, _ in epochs] == [1, 2]  # fitted twice, shown once
    last_fit = [r["val_acc"] for r in run.iter_metrics("finetune")][-2:]
    assert [v for _, v in epochs] == pytest.approx(last_fit, rel=1e-6)
    clean = tensorboard_scalars(board / "evaluate" / "slf", "evaluate/slf/clean_acc")
    results = run.read_results()
    assert clean == [(6, pytest.approx(results["protocols"]["slf"]["clean_acc"], rel=1e-6))]  # evaluated twice
    key = next(iter(results["robust"]))
    robust = tensorboard_scalars(board / "evaluate" / "slf", f"evaluate/slf/robust/{key}")
    assert robust == [(6, pytest.approx(results["robust"][key], abs=1e-6))]


def wandb_history(run_dir: Path) -> list[dict[str, float]]:
    """Every history row W&B wrote to the offline run files under run_dir/wandb (their record log, read
    with W&B's own protobuf definitions)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, block, pending = path.read_bytes(), 7, 32768, b""
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):  # LevelDB-style log: 7-byte chunk headers, 32 KiB blocks
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = wandb_internal_pb2.Record.FromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return rows


def test_wandb_offline_writes_its_run_files_and_resumes_the_run_without_repeating_steps(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # never contact a server
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = killed_and_resumed(tmp_path / "run", "[jsonl, wandb]", monkeypatch)
    import wandb

    wandb.teardown()  # finish() can return before W&B's service process has written the last records to disk
    run_id = json.loads((run.root / "wandb-run.json").read_text())["id"]
    offline = sorted(run.root.glob(f"wandb/offline-run-*-{run_id}*"))
    assert len(offline) == 6  # one W&B process per phase-1 attempt, fit and evaluation, all under the same run id
    for folder in offline:
        assert (folder / f"run-{run_id}.wandb").is_file() and (folder / "files").is_dir()
    rows = wandb_history(run.root)
    pretrain_rows = [r for r in rows if "pretrain/step" in r]
    steps = [r["pretrain/step"] for r in pretrain_rows]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # step 3 reached W&B before the kill and is not sent again
    logged = jsonl_values(run, "pretrain", "benign")
    assert {r["pretrain/step"]: r["pretrain/benign"] for r in pretrain_rows} == pytest.approx(logged, rel=1e-6)
    evaluated = [r for r in rows if "evaluate/slf/step" in r]
    assert [r["evaluate/slf/step"] for r in evaluated] == [6, 6]  # W&B cannot hide points: both evaluations
    assert evaluated[-1]["evaluate/slf/clean_acc"] == pytest.approx(run.read_results()["protocols"]["slf"]["clean_acc"])
    fits = [r["finetune/slf/epoch"] for r in rows if "finetune/slf/epoch" in r]
    assert fits == [1, 2, 1, 2]


def test_overwrite_starts_a_new_wandb_run_and_clears_tensorboard(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare("name: x\n", resume=False, overwrite=False)
    (run.root / "wandb-run.json").write_text('{"id": "old"}\n')
    (run.root / "tensorboard" / "pretrain").mkdir(parents=True)
    (run.root / "wandb" / "offline-run-1-old").mkdir(parents=True)
    with pytest.raises(RunError):
        run.prepare("name: x\n", resume=False, overwrite=False)
    run.prepare("name: x\n", resume=False, overwrite=True)
    assert not (run.root / "wandb-run.json").exists() and not (run.root / "tensorboard").exists()
    assert (run.root / "wandb" / "offline-run-1-old").is_dir()  # unsynced offline files are not deleted


def test_a_new_event_file_waits_for_a_later_second_than_the_newest_one(tmp_path, monkeypatch):
    """TensorBoard reads event files in name order (creation second first): a writer opened within the
    second of an earlier file would sort before it and its purge would hide nothing."""
    from robustcl.runs import loggers

    (tmp_path / "events.out.tfevents.1000.host.1.0").write_bytes(b"")
    clock = {"now": 999.5}
    monkeypatch.setattr(loggers.time, "time", lambda: clock["now"])
    monkeypatch.setattr(loggers.time, "sleep", lambda s: clock.update(now=clock["now"] + s))
    loggers._after_existing_events(tmp_path)
    assert 1001 <= clock["now"] < 1001.1
