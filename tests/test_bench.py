"""`robustcl bench` and benchmarks/gpu.sh: the FLOP counter, the phase split, the step it times, output, errors."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo import list_backends, register_backend

from robustcl.bench import (RESULT_KEYS, SCHEMA, BenchOptions, build_step, count_flops,
                            count_flops_by_phase, exclusive_phase_times, measure_phases, run_bench)
from robustcl.cli import main
from robustcl.cli.tools import add_bench_arguments
from robustcl.config import load_config
from robustcl.methods.step import PHASES, phase
from robustcl.runs import RunDir
from robustcl.train.pretrain import Pretrainer

ROOT = Path(__file__).resolve().parents[1]
# The smoke preset shrunk further: 8x8 images, a two-layer ConvNet, PGD-1 (gbrcl with ASAM and the critic);
# one thread, as two threads on a shared 2-core machine spin-wait for each other.
TINY = ("data.synthetic.size=8", "model.widths=[4,4]", "method.attack.steps=1", "train.threads=1")
CPU = torch.device("cpu")


def _failing_backend(gm, example_inputs):  # noqa: ANN001, ANN202 - a torch.compile backend that always fails
    raise RuntimeError("no compiler on this test box")


if "robustcl_test_failing" not in list_backends(exclude_tags=()):
    register_backend(compiler_fn=_failing_backend, name="robustcl_test_failing")


@pytest.fixture(autouse=True)
def _keep_torch_threads():  # noqa: ANN202 - the bench and Pretrainer set torch's global thread count
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------- FLOP counter
def test_flop_counter_matches_hand_counts_for_matmul_conv_and_input_gradients() -> None:
    b, k, n = 5, 7, 3
    linear = nn.Linear(k, n, bias=False)
    x = torch.randn(b, k, requires_grad=True)
    # forward (B,k)x(k,n) = 2Bkn; backward: grad wrt input 2Bnk, grad wrt weight 2nBk
    assert count_flops(lambda: linear(x).sum().backward()) == 3 * 2 * b * k * n
    # the attack's pattern (autograd.grad wrt the input, weights frozen), where FlopCounterMode fails
    linear.weight.requires_grad_(False)
    assert count_flops(lambda: torch.autograd.grad(linear(x).sum(), x)) == 2 * 2 * b * k * n
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    with torch.no_grad():  # 2 * B * C_out * H * W * C_in * 3 * 3
        assert count_flops(lambda: conv(torch.randn(3, 2, 5, 5))) == 2 * 3 * 4 * 5 * 5 * 2 * 9


def test_flop_counter_calls_formulas_as_torch_does_raw_tensors_for_get_raw_ones() -> None:
    """torch registers some formulas (flash/efficient attention) with get_raw=True: they take tensors, not shapes."""
    from torch.utils.flop_counter import register_flop_formula

    @torch.library.custom_op("robustcl_test::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @register_flop_formula(torch.ops.robustcl_test.double, get_raw=True)
    def double_flops(x, *args, out_val=None, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
        assert isinstance(x, torch.Tensor) and isinstance(out_val, torch.Tensor)
        return x.numel() * (2 if x.dtype == torch.float64 else 1)

    assert count_flops(lambda: torch.ops.robustcl_test.double(torch.ones(3, 4, dtype=torch.float64))) == 24


def test_flops_go_to_the_innermost_phase_range() -> None:
    a, w = torch.randn(4, 6), torch.randn(6, 5)  # a @ w: 2 * 4 * 6 * 5 = 240 FLOPs; (a @ w) @ w.T: 240 more

    def step() -> None:
        with phase("attack"):
            a @ w
        with phase("encoder_step"):
            a @ w
            a @ w
            with phase("sam_second_pass"):
                (a @ w) @ w.T
        a @ w

    got = count_flops_by_phase(step)
    assert got == {"attack": 240, "encoder_step": 480, "sam_second_pass": 480, "other": 240}
    assert torch.profiler.record_function is torch.autograd.profiler.record_function  # restored


# ---------------------------------------------------------------------------------- phase split
def test_exclusive_phase_times_subtracts_nested_ranges_once() -> None:
    intervals = [("views", 0.0, 1.0), ("views", 1.0, 1.5), ("attack", 2.0, 5.0),
                 ("encoder_step", 6.0, 16.0), ("sam_second_pass", 9.0, 13.0), ("critic", 10.0, 11.0)]
    got = exclusive_phase_times(intervals)
    # critic nests in sam_second_pass, which nests in encoder_step: each loses only its direct children
    assert got == pytest.approx({"views": 1.5, "attack": 3.0, "encoder_step": 6.0, "sam_second_pass": 3.0,
                                 "critic": 1.0})


def _sleepy_step() -> None:
    with phase("views"):
        time.sleep(0.03)
    with phase("encoder_step"):
        time.sleep(0.02)
        with phase("sam_second_pass"):
            time.sleep(0.10)
    time.sleep(0.03)


@pytest.mark.parametrize("mode", ["profiler", "synced"])
def test_measure_phases_times_each_range_and_the_rest(mode: str) -> None:
    phases, wall = measure_phases(_sleepy_step, CPU, 1, mode)
    expected = {"views": 0.03, "encoder_step": 0.02, "sam_second_pass": 0.10, "other": 0.03}
    assert set(phases) == set(expected)
    for name, seconds in expected.items():  # sleeps overrun (a loaded machine), never fall short
        assert seconds - 0.002 <= phases[name] <= seconds + 0.05, (name, phases)
    assert sum(phases.values()) == pytest.approx(wall)
    assert torch.profiler.record_function is torch.autograd.profiler.record_function  # restored


# ---------------------------------------------------------------------------------- the step
def test_build_step_is_the_pretrainer_step(tmp_path: Path) -> None:
    """Same initial weights, and one step on the same batch gives bit-identical weights and optimiser state."""
    cfg = load_config("smoke", [*TINY, "diagnostics.every=0"])
    trainer = Pretrainer(cfg, RunDir(tmp_path / "run"))
    setup = build_step(cfg, CPU)
    assert setup.images.shape == (cfg.train.batch_size, 1, 8, 8) and setup.images.dtype == torch.uint8
    images = trainer.batch(0)
    trainer.method.training_step(images, trainer.ctx)
    setup.method.training_step(images, setup.ctx)
    ours, theirs = setup.method.state_dict(), trainer.method.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert setup.ctx.sam is not None and trainer.sam is not None
    assert (setup.ctx.sam.rho, setup.ctx.sam.adaptive) == (trainer.sam.rho, trainer.sam.adaptive)
    for a, b in ((setup.ctx.optimizer, trainer.optimizer), (setup.ctx.critic_optimizer, trainer.critic_optimizer)):
        assert [{k: v for k, v in g.items() if k != "params"} for g in a.param_groups] == \
               [{k: v for k, v in g.items() if k != "params"} for g in b.param_groups]


def test_build_step_honours_data_options_and_benches_the_imagefolder_preset() -> None:
    """The batch has the size data.options asks for; imagefolder (whose info needs its files) gets a stand-in."""
    fmnist = build_step(load_config("fmnist-gbrcl", [*TINY[1:], "data.options={size: 12}", "train.batch_size=4"]), CPU)
    assert fmnist.images.shape == (4, 1, 12, 12)
    cfg = load_config("imagefolder-gbrcl-r50", ["data.options={size: 12}", "model.arch=convnet", "model.widths=[4,4]",
                                                "model.proj_dim=8", "method.attack.steps=1", "train.batch_size=4",
                                                "train.threads=1"])
    setup = build_step(cfg, CPU)
    assert setup.images.shape == (4, 3, 12, 12)
    stats = setup.step()
    assert {"benign", "adversarial", "divergence"} <= set(stats) and all(torch.isfinite(v) for v in stats.values())
    r50 = build_step(load_config("imagefolder-gbrcl-r50", ["train.batch_size=2"]), CPU)
    assert r50.images.shape == (2, 3, 96, 96) and r50.method.encoder.backbone.stem == "imagenet"


def test_bench_reports_throughput_phase_split_and_flops() -> None:
    opts = BenchOptions(configs=("smoke",), overrides=TINY, batch_sizes=(4,), precisions=("fp32",), steps=3,
                        warmup=1, gemm_size=64)  # 3 timed steps: the median is the middle one
    report = run_bench(opts, log=lambda line: None)
    assert report["schema"] == SCHEMA and report["threads"] == 1  # train.threads of the config
    (r,) = report["results"]
    assert tuple(r) == RESULT_KEYS
    assert (r["batch"], r["precision"], r["method"], r["compiled"]) == (4, "fp32", "gbrcl", False)
    assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
    assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
    assert len(r["step_s"]) == 3 and r["step_s_median"] == statistics.median(r["step_s"])
    assert r["images_per_s"] == pytest.approx(4 / r["step_s_median"])
    assert set(r["phases_s"]) == {*PHASES, "other"}  # gbrcl with ASAM and a critic passes every phase
    named = [v for k, v in r["phases_s"].items() if k != "other"]
    assert all(v >= 0 for v in named)
    assert sum(named) <= r["profiled_step_s"] + 1e-3
    assert r["phase_timing"] == "profiler"
    cfg = load_config("smoke", [*TINY, "diagnostics.every=0", "train.batch_size=4"])
    assert r["gflop_per_image"] * 1e9 * 4 == pytest.approx(count_flops(build_step(cfg, CPU).step), rel=1e-12)
    assert sum(r["gflop_per_image_by_phase"].values()) == pytest.approx(r["gflop_per_image"], rel=1e-12)
    for name in ("attack", "encoder_step", "sam_second_pass", "critic"):  # each does convolutions
        assert r["gflop_per_image_by_phase"][name] > 0
        assert r["phase_gflops"][name] == pytest.approx(
            r["gflop_per_image_by_phase"][name] * 4 / r["phases_s"][name])
    assert r["achieved_gflops"] == pytest.approx(r["gflop_per_image"] * r["images_per_s"])
    assert r["native_precision"] is True  # fp32 is native everywhere
    assert r["fraction_of_peak"] == pytest.approx(r["achieved_gflops"] / r["gemm_peak_gflops"])
    assert r["peak_memory_mib"] > 0 and "RSS" in r["memory_kind"]


# ---------------------------------------------------------------------------------- the CLI
def test_cli_writes_the_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "out" / "bench.json"
    rc = main(["bench", *TINY, "--config", "smoke", "--batch-size", "4", "--precision", "bf16", "--channels-last",
               "--steps", "1", "--warmup", "0", "--gemm-size", "64", "--json", str(path)])
    assert rc == 0
    report = json.loads(path.read_text())
    assert {"schema", "torch", "threads", "flop_counter", "loadavg_before", "loadavg_after", "options",
            "results"} <= set(report)
    (r,) = report["results"]
    assert tuple(r) == RESULT_KEYS and (r["precision"], r["channels_last"]) == ("bf16", True)
    # the suite runs as an AVX2 CPU (tests/conftest.py): bf16 is emulated, its GEMM "peak" is no ceiling
    assert report["cpu_capability"] == "AVX2" and report["cpu_native_bf16"] is False
    assert r["native_precision"] is False and r["fraction_of_peak"] is None
    out = capsys.readouterr().out
    assert "images/s" in out and "emulated (" in out and "CPU capability AVX2" in out


def test_cli_json_to_stdout_and_a_failed_compile_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", *TINY, "--config", "smoke", "--batch-size", "4", "--precision", "fp32", "--steps", "1",
               "--warmup", "0", "--gemm-size", "64", "--compile", "--compile-backend", "robustcl_test_failing",
               "--json", "-"])
    assert rc == 0
    captured = capsys.readouterr()
    (r,) = json.loads(captured.out)["results"]
    assert r["compiled"] is False and "no compiler on this test box" in r["compile_error"]
    assert math.isfinite(r["images_per_s"])  # measured eager instead
    assert "torch.compile failed" in captured.err and "FAILED" in captured.err  # the table went to stderr


def test_step_throughput_script_keeps_its_one_line_json(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/step_throughput.py (the first step measurements, docs/performance.md) is a wrapper over the bench."""
    spec = importlib.util.spec_from_file_location("step_throughput", ROOT / "benchmarks" / "step_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--config", "smoke", "--steps", "1", "--warmup", "0", "--gemm-size", "64", *TINY,
                        "train.batch_size=4"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert {"config", "method", "batch", "precision", "channels_last", "threads", "step_s_median", "images_per_s",
            "gflop_per_image", "achieved_gflops", "gemm_peak_gflops", "fraction_of_peak", "phases_s"} == set(line)
    assert (line["config"], line["batch"], line["threads"]) == ("smoke", 4, 1)


@pytest.mark.parametrize("args, needle", [
    (["--config", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["--config", "smoke", "--batch-size", "8", "1"], "--batch-size 1 must be >= 2"),
    (["--config", "smoke", "--steps", "0"], "--steps 0 must be >= 1"),
    (["--config", "smoke", "--precision", "fp16"], "--precision 'fp16' is not one of fp32, bf16"),
    (["--config", "smoke", "train.lr=-1"], "train.lr=-1"),
    pytest.param(["--config", "smoke", "--device", "cuda"], "--device cuda but torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], needle: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustcl: error: ") and needle in err[0], err


def test_bench_needs_no_tqdm_safetensors_or_matplotlib() -> None:
    """The GPU box may lack them: the bench must plan and build the ResNet-18 step without."""
    code = ("import sys\n"
            "for m in ('tqdm', 'safetensors', 'matplotlib'): sys.modules[m] = None  # importing them now fails\n"
            "import torch\n"
            "from robustcl.bench import BenchOptions, build_step, plan_cases\n"
            "(name, cfg), = plan_cases(BenchOptions(('cifar10-gbrcl',), batch_sizes=(2,)))\n"
            "print(type(build_step(cfg, torch.device('cpu')).method).__name__)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "Gbrcl"


# ---------------------------------------------------------------------------------- gpu.sh
def _gpu_sh(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), **env}
    full.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=full, capture_output=True, text=True,
                          timeout=240)


def test_gpu_script_dry_run_prints_three_valid_bench_commands(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _gpu_sh(tmp_path, DRY_RUN="1", OUT=str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if "robustcl bench" in " ".join(shlex.split(line)[4:8])]
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    parsed = []
    for cmd in commands:
        assert cmd[:3] == ["timeout", "-k", "10"] and cmd[4:8] == [sys.executable, "-m", "robustcl", "bench"]
        args = parser.parse_args(cmd[8:])
        assert (args.config, args.batch_size, args.device) == (["cifar10-gbrcl"], [512], "cuda")
        parsed.append((int(cmd[3]), args.precision, args.channels_last, args.compile, Path(args.json).name))
    assert parsed == [(55, ["fp32"], False, False, "case_fp32.json"), (55, ["bf16"], True, False, "case_bf16_cl.json"),
                      (170, ["bf16"], True, True, "case_bf16_cl_compile.json")]  # < 5 minutes in all
    summary = json.loads((out / "gpu_bench.json").read_text())
    assert summary["status"] == dict.fromkeys(("fp32", "bf16_cl", "bf16_cl_compile"), "dry run")


def test_gpu_script_records_a_timed_out_case_and_still_writes_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _gpu_sh(tmp_path, DEVICE="cpu", SMALL="1", OUT=str(out), EAGER_TIMEOUT="1", COMPILE_TIMEOUT="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "gpu_bench.json").read_text())
    assert summary["status"] == dict.fromkeys(("fp32", "bf16_cl", "bf16_cl_compile"), "timed out after 1s")
    assert summary["cases"] == {} and "timed out after 1s" in proc.stdout


@pytest.mark.slow  # three fresh Python processes with torch (~25 s CPU on 2 cores); `make test-slow`
def test_gpu_script_flow_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _gpu_sh(tmp_path, DEVICE="cpu", SMALL="1", OUT=str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "gpu_bench.json").read_text())
    assert summary["status"] == {"fp32": "ok", "bf16_cl": "ok", "bf16_cl_compile": "ok"}
    cases = summary["cases"]
    assert [(c["precision"], c["channels_last"], c["compiled"]) for c in cases.values()] == \
           [("fp32", False, False), ("bf16", True, False), ("bf16", True, True)]
    for c in cases.values():
        assert c["batch"] == 8 and c["images_per_s"] > 0 and c["peak_memory_mib"] > 0
        assert c["epoch_s_projected"] == pytest.approx(50000 / c["images_per_s"])
    assert summary["speedup_vs_fp32"]["fp32"] == pytest.approx(1.0)
    assert "epoch s" in proc.stdout


def test_gpu_script_stops_with_one_line_when_a_module_is_missing(tmp_path: Path) -> None:
    proc = _gpu_sh(tmp_path, REQUIRED_MODULES="yaml robustcl_no_such_module", WHEELS=str(tmp_path / "none"))
    assert proc.returncode == 1
    assert "missing Python modules: robustcl_no_such_module; no wheels in" in proc.stderr


def _wheel(folder: Path, name: str) -> None:
    """A minimal pure-Python wheel holding module `name` (VALUE = 42)."""
    folder.mkdir()
    info = f"{name}-0.1.dist-info"
    files = {f"{name}.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-0.1-py3-none-any.whl", "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)


def test_gpu_script_installs_missing_modules_from_wheels(tmp_path: Path) -> None:
    _wheel(tmp_path / "wheels", "robustcl_fake_dep")
    proc = _gpu_sh(tmp_path, REQUIRED_MODULES="yaml robustcl_fake_dep", WHEELS=str(tmp_path / "wheels"),
                   CHECK_ONLY="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "installing robustcl_fake_dep from" in proc.stderr
    installed = list(tmp_path.glob("robustcl-deps.*/robustcl_fake_dep.py"))
    assert len(installed) == 1 and installed[0].read_text() == "VALUE = 42\n"
