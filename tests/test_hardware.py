"""precision: auto and threads: auto resolve from what the machine offers, once per run, kept on resume."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from robustcl import hardware
from robustcl.config import ConfigError, load_config
from robustcl.hardware import CpuCapability
from robustcl.runs import RunDir
from robustcl.runtime import resolve_runtime
from robustcl.train.pretrain import pretrain

CPU = torch.device("cpu")
AVX2 = CpuCapability("AVX2", avx512_bf16=False, amx=False)
AVX512_BF16 = CpuCapability("AVX512", avx512_bf16=True, amx=False)
AMX = CpuCapability("AVX512", avx512_bf16=True, amx=True)


@pytest.fixture
def fake_cpu(monkeypatch):
    """Pretend the CPU is `cap` (robustcl.hardware.cpu_capability is what every resolution asks)."""
    def use(cap: CpuCapability) -> None:
        monkeypatch.setattr(hardware, "cpu_capability", lambda: cap)
    return use


def test_capability_is_detected_from_torch_and_cpu_flags_unless_forced(monkeypatch):
    monkeypatch.delenv(hardware.CAPABILITY_ENV)
    cap = hardware.cpu_capability()
    assert cap.isa == torch.backends.cpu.get_cpu_capability()
    assert cap.avx512_bf16 == (torch.cpu._is_avx512_bf16_supported() or "avx512_bf16" in hardware._cpu_flags())
    monkeypatch.setenv(hardware.CAPABILITY_ENV, "AMX")
    assert hardware.cpu_capability() == AMX
    monkeypatch.setenv(hardware.CAPABILITY_ENV, "SSE")
    with pytest.raises(ValueError, match="ROBUSTCL_CPU_CAPABILITY"):
        hardware.cpu_capability()


def test_auto_is_fp32_without_native_bf16_and_bf16_with_it(fake_cpu):
    fake_cpu(AVX2)
    assert hardware.resolve_precision("auto", CPU) == "fp32"
    fake_cpu(AVX512_BF16)
    assert hardware.resolve_precision("auto", CPU) == "bf16"
    fake_cpu(AMX)
    assert hardware.resolve_precision("auto", CPU) == "bf16"
    assert (AVX2.describe(), AVX512_BF16.describe(), AMX.describe()) == ("AVX2", "AVX512-BF16", "AMX")
    assert CpuCapability("AVX512", False, False).describe() == "AVX-512"


def test_explicit_bf16_warns_where_emulated_and_not_where_native(fake_cpu):
    fake_cpu(AVX2)
    with pytest.warns(UserWarning, match="emulated"):
        assert hardware.resolve_precision("bf16", CPU) == "bf16"  # still runs as asked
    fake_cpu(AVX512_BF16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hardware.resolve_precision("bf16", CPU) == "bf16"
        assert hardware.resolve_precision("fp32", CPU) == "fp32"


def test_schema_and_every_preset_default_to_auto():
    from robustcl.config import list_presets

    for name in list_presets():
        cfg = load_config(name)
        assert cfg.train.precision == "auto", name
        assert cfg.train.threads in ("auto", 1, 2), name


def killed_after_first_checkpoint(monkeypatch):
    """Make the next pretrain stop (as if killed) right after its first checkpoint."""
    from robustcl.train.pretrain import Pretrainer

    original = Pretrainer.save_checkpoint

    def save_then_die(self):
        original(self)
        monkeypatch.setattr(Pretrainer, "save_checkpoint", original)
        raise KeyboardInterrupt

    monkeypatch.setattr(Pretrainer, "save_checkpoint", save_then_die)


def test_resolved_precision_is_stored_and_kept_on_resume(fake_cpu, tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    cfg = load_config("smoke", ["train.max_steps=4", "train.checkpoint_every=2"])
    fake_cpu(AVX512_BF16)  # the run starts where bf16 is native
    # what is tested is the resolved value and its keeping; bf16 arithmetic itself, emulated on an AVX2 CI
    # machine, would only make this test slow, so the step computes in fp32 here
    import robustcl.methods.factory as factory  # where the trainer's factory takes it from
    monkeypatch.setattr(factory, "autocast_factory", lambda device, precision: contextlib.nullcontext)
    killed_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, run, progress=False)
    stored = yaml.safe_load(run.config.read_text())
    assert stored["train"]["precision"] == "bf16" and stored["train"]["threads"] == 2
    assert torch.load(run.checkpoint, weights_only=True)["config"]["train"]["precision"] == "bf16"
    assert torch.load(run.checkpoint, weights_only=True)["step"] == 2
    fake_cpu(AVX2)  # ... resumed on a machine where auto would mean fp32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain(cfg, run, resume=True, progress=False)
    assert yaml.safe_load(run.config.read_text())["train"]["precision"] == "bf16"
    assert torch.load(run.checkpoint, weights_only=True)["step"] == 4
    fresh = RunDir(tmp_path / "fresh")  # a fresh start on the AVX2 machine resolves to fp32
    pretrain(load_config("smoke", ["train.max_steps=1"]), fresh, progress=False)
    assert yaml.safe_load(fresh.config.read_text())["train"]["precision"] == "fp32"


def test_explicit_precision_change_on_resume_is_refused(fake_cpu, tmp_path, monkeypatch):
    from robustcl.runs import RunError

    fake_cpu(AVX2)
    run = RunDir(tmp_path / "run")
    killed_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(load_config("smoke", ["train.max_steps=4", "train.checkpoint_every=2"]), run, progress=False)
    with pytest.raises(RunError, match="train.precision"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain(load_config("smoke", ["train.max_steps=4", "train.checkpoint_every=2", "train.precision=bf16"]),
                 run, resume=True, progress=False)


def test_results_and_report_state_the_hardware(fake_cpu, tmp_path):
    from robustcl.cli import main

    fake_cpu(AVX2)
    out = tmp_path / "run"
    assert main(["run", "--config", "smoke", "--out", str(out), "--quiet", "finetune.protocols=[slf]"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["hardware"]["device"] == "CPU AVX2"
    assert results["hardware"]["train_precision"] == "fp32" and results["hardware"]["eval_precision"] == "fp32"
    assert results["hardware"]["cpu"] == hardware.cpu_model() and results["hardware"]["torch"] == torch.__version__
    report = (out / "report.md").read_text()
    assert "CPU AVX2" in report and "fp32" in report


def test_threads_auto_honours_the_affinity_mask():
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux affinity and 2 cores")
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from robustcl.hardware import resolve_threads; print(resolve_threads('auto'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    assert hardware.resolve_threads("auto") == hardware.usable_cpus() == min(
        len(os.sched_getaffinity(0)), hardware.usable_cpus())


def test_threads_auto_divides_among_local_ranks_and_honours_a_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert hardware.resolve_threads("auto") == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert hardware.resolve_threads("auto") == 1
    assert hardware.resolve_threads(3) == 3 and hardware.resolve_threads(None) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert hardware._cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert hardware._cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert hardware._cgroup_cpu_limit(v1) == 1.0


def test_resolve_runtime_resolves_auto_precision_and_keeps_auto_threads(fake_cpu, monkeypatch):
    """`auto` threads stay `auto` (the count follows the machine's load while a command runs: test_threads.py)."""
    fake_cpu(AVX512_BF16)
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 3)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = resolve_runtime(load_config("smoke", ["train.threads=auto", "eval.precision=auto"]), CPU)
    assert (cfg.train.precision, cfg.train.threads, cfg.eval.precision) == ("bf16", "auto", "bf16")
    assert resolve_runtime(load_config("smoke"), CPU).eval.precision == "fp32"  # attacks stay fp32 by default


@pytest.mark.parametrize("value, ok", [("auto", True), ("3", True), ("null", True), ("-1", False), ("0", False),
                                       ("many", False), ("1.5", False)])
def test_threads_values(value, ok):
    if ok:
        load_config("smoke", [f"train.threads={value}"])
    else:
        with pytest.raises(ConfigError, match="train.threads"):
            load_config("smoke", [f"train.threads={value}"])


def test_cpu_model_names_family_model_and_stepping(tmp_path, monkeypatch):
    """Two EPYCs with the same flags can sum fp32 differently: results must say which one computed them."""
    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
             "model name\t: AMD EPYC 9R45\nstepping\t: 1\nflags\t\t: fpu avx512f avx512_bf16\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(block.format(n=0) + "\n" + block.format(n=1).replace("stepping\t: 1", "stepping\t: 9"))
    assert hardware.cpu_model(cpuinfo) == "AMD EPYC 9R45 (family 26, model 2, stepping 1)"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # an ARM block: no family or model name
    monkeypatch.setattr(hardware.platform, "processor", lambda: "")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "aarch64")
    assert hardware.cpu_model(cpuinfo) == "aarch64"
