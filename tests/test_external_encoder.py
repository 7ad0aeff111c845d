"""Evaluate any encoder: torchvision-layout ResNet state dicts, robustcl encoder files, modules; BN-branch export."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustcl import load_encoder
from robustcl.cli import main
from robustcl.config import load_config
from robustcl.data import dataset_info
from robustcl.encoders import EncoderError, evaluate_encoder, load_external
from robustcl.export import export_encoder
from robustcl.methods.factory import encoder_export_fields
from robustcl.models import ResNet50, build_encoder
from robustcl.models.torchvision_layout import from_torchvision, to_torchvision
from robustcl.runs import RunDir

CIFAR = dataset_info("cifar10")  # 3 x 32 x 32, CIFAR-10 channel statistics (no file is read)
FAST = ["train.threads=1"]


def torchvision_resnet18_state(in_channels: int, stem: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ResNet-18 state dict written from torchvision's documented layout (names and shapes), random values,
    with its 1000-class fc; BN statistics far from their initial values so a mix-up shows."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        sd[name] = torch.randn(out, inp, k, k, generator=gen) * (2 / (inp * k * k)) ** 0.5

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(c, generator=gen)
        sd[f"{name}.bias"] = 0.2 * torch.randn(c, generator=gen)
        sd[f"{name}.running_mean"] = 0.2 * torch.randn(c, generator=gen)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=gen)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    conv("conv1.weight", 64, in_channels, 7 if stem == "imagenet" else 3)
    bn("bn1", 64)
    inp = 64
    for i, planes in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            p, cin = f"layer{i}.{j}", inp if j == 0 else planes
            conv(f"{p}.conv1.weight", planes, cin, 3)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2.weight", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            if j == 0 and i > 1:
                conv(f"{p}.downsample.0.weight", planes, cin, 1)
                bn(f"{p}.downsample.1", planes)
        inp = planes
    sd["fc.weight"] = torch.randn(1000, 512, generator=gen) * 0.01
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def reference_features(sd: dict[str, torch.Tensor], x: torch.Tensor, mean, std, stem: str) -> torch.Tensor:
    """torchvision's ResNet-18 forward written out by hand on the state dict (fc dropped), L2-normalised."""
    def bn(prefix: str, h: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(h, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                            sd[f"{prefix}.bias"], training=False, eps=1e-5)

    h = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    imagenet = stem == "imagenet"
    h = F.relu(bn("bn1", F.conv2d(h, sd["conv1.weight"], stride=2 if imagenet else 1, padding=3 if imagenet else 1)))
    if imagenet:
        h = F.max_pool2d(h, 3, 2, 1)
    for i in range(1, 5):
        for j in range(2):
            p, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
            out = F.relu(bn(f"{p}.bn1", F.conv2d(h, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
            out = bn(f"{p}.bn2", F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1))
            shortcut = (bn(f"{p}.downsample.1", F.conv2d(h, sd[f"{p}.downsample.0.weight"], stride=stride))
                        if f"{p}.downsample.0.weight" in sd else h)
            h = F.relu(out + shortcut)
    return F.normalize(h.mean(dim=(2, 3)), dim=1)


def test_the_generated_layout_has_torchvision_resnet18s_122_entries():
    sd = torchvision_resnet18_state(3, "imagenet")
    assert len(sd) == 122  # len(torchvision.models.resnet18().state_dict())
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1) and sd["layer4.1.bn2.running_var"].shape == (512,)


@pytest.mark.parametrize("stem,wrap", [("cifar", None), ("imagenet", "module."), ("cifar", "state_dict")])
def test_a_torchvision_layout_resnet18_loads_and_matches_a_hand_written_forward(tmp_path, stem, wrap):
    sd = torchvision_resnet18_state(3, stem)
    saved: object = {f"module.{k}": v for k, v in sd.items()} if wrap == "module." else sd
    if wrap == "state_dict":
        saved = {"state_dict": sd, "epoch": 90}
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)
    encoder, meta = load_external(path, CIFAR)
    assert meta["source"]["kind"] == "published" and meta["source"]["layout"] == "torchvision"
    assert meta["source"]["stem"]["stem"] == stem and meta["stem_padding"] == 1
    assert meta["source"]["normalisation"]["mean"] == list(CIFAR.mean)
    assert meta["source"]["normalisation"]["std"] == list(CIFAR.std)
    assert meta["source"]["dropped"] == {"the classifier fc (robustcl fits its own heads)": 2}
    side = 16 if stem == "cifar" else 32  # small images keep the test fast; the layout does not depend on them
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = encoder(x, "benign")
    expected = reference_features(sd, x, CIFAR.mean, CIFAR.std, stem)
    assert got.shape == (2, 512)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert got[0, 0].item() == pytest.approx(expected[0, 0].item(), abs=1e-5)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, given explicitly
    imagenet_norm, _ = load_external(path, CIFAR, mean=mean, std=std)
    with torch.no_grad():
        assert torch.allclose(imagenet_norm(x, "benign"), reference_features(sd, x, mean, std, stem), atol=1e-5)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("layer3.1.bn2.running_var"), "layer3.1.bn2.benign.running_var has no tensor in the file"),
    (lambda sd: sd.update({"layer1.0.extra.weight": torch.zeros(1)}), "match no rule of that layout: layer1.0.extra.weight"),
    (lambda sd: sd.update({"layer2.0.conv1.weight": torch.zeros(128, 64, 5, 5)}), "layer2.0.conv1.weight has shape"),
    (lambda sd: sd.update({"conv1.weight": torch.zeros(64, 3, 5, 5)}), "5x5 kernel"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("layer4.1.")], "neither ResNet-18"),
])
def test_a_state_dict_that_is_not_a_resnet18_is_a_one_line_error(tmp_path, edit, message):
    sd = torchvision_resnet18_state(3, "cifar")
    edit(sd)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(EncoderError, match=message) as err:
        load_external(tmp_path / "bad.pt", CIFAR)
    assert "\n" not in str(err.value)


def test_missing_num_batches_tracked_loads_as_in_old_torchvision_checkpoints(tmp_path):
    sd = {k: v for k, v in torchvision_resnet18_state(3, "cifar").items() if not k.endswith("num_batches_tracked")}
    backbone, layout = from_torchvision(sd)
    assert layout == {"arch": "resnet18", "stem": "cifar", "in_channels": 3}
    assert torch.equal(backbone.state_dict()["layer1.0.bn1.benign.running_mean"], sd["layer1.0.bn1.running_mean"])


@pytest.mark.slow  # ~10 s on 2 busy cores: builds two ResNet-50s
def test_resnet50_layout_round_trips_through_torchvision_names():
    torch.manual_seed(0)
    original = ResNet50(in_channels=3, dual_bn=False, stem="imagenet").eval()
    sd = to_torchvision(original, "benign")
    assert {"layer1.0.conv3.weight", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var",
            "layer4.2.bn3.bias"} <= set(sd) and not any("shortcut" in k or "benign" in k for k in sd)
    rebuilt, layout = from_torchvision(sd)
    assert layout["arch"] == "resnet50" and layout["stem"] == "imagenet"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, "benign"), original(x, "benign"))


def test_one_bn_branch_exports_as_a_torchvision_state_dict_and_loads_back(tmp_path, capsys):
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 3, CIFAR.mean, CIFAR.std, dual_bn=True, stem="cifar").eval()
    with torch.no_grad():  # the two branches' statistics differ, as after adversarial training
        for name, buffer in encoder.named_buffers():
            if "adversarial.running_mean" in name:
                buffer.add_(0.3)
    cfg = load_config("cifar10-gbrcl")
    export_encoder(encoder, tmp_path / "encoder.safetensors", CIFAR, cfg, **encoder_export_fields(cfg, CIFAR))
    out = tmp_path / "adv.pth"
    assert main(["export", "--run", str(tmp_path / "encoder.safetensors"), "--branch", "adversarial",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "adversarial BN branch" in printed and f"mean={list(CIFAR.mean)}" in printed
    state = torch.load(out, weights_only=True)
    assert set(state) == set(torchvision_resnet18_state(3, "cifar")) - {"fc.weight", "fc.bias"}
    assert torch.equal(state["layer2.0.downsample.1.running_mean"],
                       encoder.state_dict()["backbone.layer2.0.shortcut_bn.adversarial.running_mean"])
    loaded, meta = load_external(out, CIFAR)  # default normalisation: the dataset's, which the encoder used
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        adversarial = load_encoder(tmp_path / "encoder.safetensors", branch="adversarial")(x)
        benign = load_encoder(tmp_path / "encoder.safetensors", branch="benign")(x)
        assert torch.allclose(loaded(x, "benign"), adversarial, atol=1e-6)
        assert not torch.allclose(loaded(x, "benign"), benign, atol=1e-3)
    assert main(["export", "--run", str(tmp_path / "encoder.safetensors")]) == 0  # default: headline branch, beside it
    assert (tmp_path / "resnet-adversarial.pth").is_file()


def test_export_of_a_convnet_encoder_is_a_one_line_error(tmp_path, capsys):
    encoder = build_encoder("convnet", 1, (0.5,), (0.5,), widths=(8, 16, 16, 32))
    cfg, info = load_config("smoke"), dataset_info("fashion-mnist")
    export_encoder(encoder, tmp_path / "encoder.safetensors", info, cfg, **encoder_export_fields(cfg, info))
    assert main(["export", "--run", str(tmp_path)]) == 2
    assert "only ResNet-18/50 encoders have a torchvision layout" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> RunDir:
    out = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet", *FAST, "finetune.protocols=[slf]"]) == 0
    assert main(["finetune", "--run", str(out), "--quiet", *FAST]) == 0
    assert main(["evaluate", "--run", str(out), "--quiet", *FAST]) == 0
    return RunDir(out)


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in ("seconds", "seconds_by_part", "encoder")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_a_robustcl_encoder_file_evaluates_exactly_as_its_run(smoke_run, tmp_path):
    out = tmp_path / "external"
    assert main(["evaluate", "--encoder", str(smoke_run.encoder), "--data", "synthetic", "--config",
                 str(smoke_run.config), "--out", str(out), "--quiet", *FAST]) == 0
    external = json.loads((out / "results.json").read_text())
    assert _without_timings(external) == _without_timings(smoke_run.read_results())
    assert external["encoder"]["kind"] == "robustcl" and external["branch"] == "adversarial"
    assert (out / "encoder.safetensors").read_bytes() == smoke_run.encoder.read_bytes()
    assert main(["evaluate", "--run", str(out), "--quiet", *FAST]) == 0  # the directory is a run: re-evaluate it


def test_a_published_file_evaluation_is_re_evaluated_as_a_run_and_keeps_its_own_encoder(tmp_path, capsys):
    """`evaluate --run` on an `evaluate --encoder` directory reads the encoder that directory evaluated (its
    config.yaml is the dataset preset's, of another architecture); another encoder file put there is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.save(torchvision_resnet18_state(1, "cifar"), tmp_path / "tv.pth")
    out = tmp_path / "out"
    small = [*FAST, "eval.limit=20", "finetune.epochs=1", "finetune.protocols=[slf]", "finetune.train_limit=64",
             "finetune.val_limit=32", "eval.corruptions=[]"]
    assert main(["evaluate", "--encoder", str(tmp_path / "tv.pth"), "--data", "synthetic", "--out", str(out),
                 "--quiet", *small]) == 0
    first = json.loads((out / "results.json").read_text())
    assert main(["evaluate", "--run", str(out), "--quiet", *FAST]) == 0
    assert _without_timings(json.loads((out / "results.json").read_text())) == _without_timings(first)
    with safe_open(str(out / "encoder.safetensors"), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(out / "encoder.safetensors"))
    tensors["backbone.conv1.weight"] = tensors["backbone.conv1.weight"] * 0.5  # another encoder, same layout
    save_file(tensors, str(out / "encoder.safetensors"), metadata=metadata)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--quiet", *FAST]) == 2
    assert "is not the encoder encoder.json says this directory evaluated" in _one_error_line(capsys)


def _same_structure(a: dict, b: dict) -> None:
    assert set(a) - {"encoder"} == set(b) - {"encoder"}
    reference = b["protocols"]["slf"]
    for protocol, record in a["protocols"].items():  # AFF records also say which loss ("aff")
        assert set(record) - {"aff"} == set(reference)
        assert [c["name"] for c in record["integrity"]["checks"]] == [c["name"] for c in reference["integrity"]["checks"]]


def test_module_callable_from_the_command_line(smoke_run, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_encoders.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def small():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
        "\n\ndef maps():\n    return nn.Conv2d(1, 4, 3)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_encoders", raising=False)
    out = tmp_path / "out"
    assert main(["evaluate", "--encoder", "my_encoders:small", "--data", "synthetic", "--config", "smoke",
                 "--out", str(out), "--protocol", "slf", "--quiet", *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    _same_structure(results, smoke_run.read_results())
    assert results["encoder"] == {"kind": "module", "spec": "my_encoders:small", "feature_dim": 8}
    assert results["method"] == "external" and results["n_eval"] == 64
    assert json.loads((out / "encoder.json").read_text())["fingerprint"]
    assert not (out / "encoder.safetensors").exists() and (out / "report.md").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--quiet"]) == 2  # no weights file to read back: says what to run
    assert "evaluated an encoder given as a module" in capsys.readouterr().err
    assert main(["evaluate", "--encoder", "my_encoders:maps", "--data", "synthetic", "--config", "smoke",
                 "--out", str(tmp_path / "maps"), "--quiet", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "returned (2, 4, 14, 14)" in err and "(N, D) features" in err and "\n" not in err
    assert not (tmp_path / "maps").exists()


def test_evaluate_encoder_takes_a_module_and_leaves_it_unchanged(smoke_run, tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten()).train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    results = evaluate_encoder(module, "synthetic", tmp_path / "out", config="smoke", protocols=["slf", "aff"],
                               overrides=[*FAST, "finetune.aff.epochs=1", "finetune.aff.attack.steps=1"])
    assert results == json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["protocols"]) == {"slf", "aff"}
    _same_structure(results, smoke_run.read_results())
    aff = torch.load(tmp_path / "out" / "heads" / "aff.pt", weights_only=True)
    assert set(aff["encoder"]) == {f"module.{k}" for k in before}  # AFF fine-tuned a copy of the module
    assert module.training and all(p.requires_grad for p in module.parameters())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_bad_encoder_arguments_are_one_line_errors_and_touch_nothing(smoke_run, tmp_path, capsys):
    heads = smoke_run.head("slf").read_bytes()
    cases = [
        (["--encoder", str(tmp_path / "nope.pt"), "--data", "synthetic"], "neither a file nor module:callable"),
        (["--encoder", str(smoke_run.encoder), "--data", "synthetic", "--config", "smoke", "--out",
          str(smoke_run.root)], "holds something other than an encoder evaluation"),
        (["--encoder", str(smoke_run.encoder), "--data", "synthetic", "--config", "smoke", "--mean", "0.5"],
         "normalises its inputs itself"),
        (["--encoder", str(smoke_run.encoder)], "--encoder needs --data NAME"),
        (["--encoder", str(smoke_run.encoder), "--data", "stl10"], "pass --config"),
        (["--encoder", str(smoke_run.encoder), "--data", "cifar10", "--out", str(tmp_path / "c")],
         "takes 1-channel images but cifar10 has 3"),
        ([], "evaluate needs --run DIR"),
    ]
    for args, message in cases:
        assert main(["evaluate", *args, "--quiet", *FAST]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (args, err)
    assert smoke_run.head("slf").read_bytes() == heads and not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------- your code
USER_CODE = '''\
import sys
import torch
from torch import nn


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def leaves():
    sys.exit(0)


def needs(width):
    return nn.Linear(width, width)


def raises():
    raise ValueError("the factory broke\\nsecond line")


def counted() -> int:
    raise AssertionError("robustcl called a function annotated as returning int")


def gives_a_string():
    return "not a module"


def nan_weights():
    module = small()
    with torch.no_grad():
        module[0].bias[1] = float("nan")
    return module


class Infinite(nn.Module):
    def forward(self, x):
        return torch.log(x.flatten(1) - 2)  # finite weights (none), NaN features


class Shouted(nn.Module):
    def __init__(self, volume):
        super().__init__()
'''


@pytest.fixture()
def user_code(tmp_path, monkeypatch):
    """The working directory holds user_encoders.py (above) and modules that misbehave on import."""
    (tmp_path / "user_encoders.py").write_text(USER_CODE)
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('no GPU here\\nsecond line')\n")
    (tmp_path / "bad_syntax.py").write_text("def build(:\n    pass\n")
    monkeypatch.chdir(tmp_path)
    for name in ("user_encoders", "exits_on_import", "raises_on_import", "bad_syntax"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("robustcl: error: "), err
    return err.strip()


@pytest.mark.parametrize("spec, message", [
    ("sys:exit", "your encoder sys:exit is a builtin function (sys.exit), not"),
    ("os:getcwd", "your encoder os:getcwd is a builtin function (os.getcwd), not"),
    ("os:system", "your encoder os:system needs an argument (command); robustcl calls it with none"),
    ("builtins:dict", "your encoder builtins:dict is a class that is not an nn.Module"),
    ("user_encoders:leaves", "your encoder user_encoders:leaves raised when robustcl called user_encoders.leaves(): SystemExit: 0"),
    ("exits_on_import:build", "your encoder exits_on_import:build raised while importing exits_on_import: SystemExit: 0"),
    ("raises_on_import:build",
     "your encoder raises_on_import:build raised while importing raises_on_import: RuntimeError: no GPU here"),
    ("bad_syntax:build", "your encoder bad_syntax:build raised while importing bad_syntax: SyntaxError: invalid syntax"),
    ("user_encoders:raises",
     "your encoder user_encoders:raises raised when robustcl called user_encoders.raises(): ValueError: the factory broke"),
    ("user_encoders:needs", "your encoder user_encoders:needs needs an argument (width); robustcl calls it with none"),
    ("user_encoders:Shouted", "your encoder user_encoders:Shouted needs an argument (volume)"),
    ("user_encoders:counted", "your encoder user_encoders:counted is annotated to return int, not an nn.Module"),
    ("user_encoders:gives_a_string", "your encoder user_encoders:gives_a_string returned a str, not an nn.Module"),
    ("user_encoders:missing", "your encoder user_encoders:missing: module user_encoders has no attribute missing"),
    ("no_such_module:build", "your encoder no_such_module:build: no module named no_such_module"),
])
def test_the_users_code_failing_or_not_building_a_module_is_one_line_naming_it(user_code, capsys, spec, message):
    """Whatever the named code does (exits, raises, needs arguments, is not a factory), the command says so in one
    line (exit 2) naming the user's code, evaluates nothing, and never calls what is not meant to build a module."""
    out = user_code / "out"
    assert main(["evaluate", "--encoder", spec, "--data", "synthetic", "--out", str(out), "--quiet", *FAST]) == 2
    err = _one_error_line(capsys)
    assert message in err, err
    assert not out.exists()


def _nan_resnet18(path: Path) -> Path:
    torch.save({k: v.float() * float("nan") if v.is_floating_point() else v
                for k, v in torchvision_resnet18_state(1, "cifar").items()}, path)
    return path


def test_non_finite_weights_or_features_are_one_line_errors_for_every_kind_of_encoder(smoke_run, user_code, capsys):
    """NaN or inf in the weights (a torchvision state dict, a robustcl encoder file, a module) or in the features
    of the first batch: one line naming the file or code and the first non-finite tensor, nothing evaluated."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(smoke_run.encoder), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(smoke_run.encoder))
    first = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1 and k != "mean")
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[1] = float("inf")
    save_file(tensors, str(user_code / "inf.safetensors"), metadata=metadata)
    cases = [
        (str(_nan_resnet18(user_code / "nan.pth")), f"{user_code / 'nan.pth'}: tensor conv1.weight holds non-finite"),
        (str(user_code / "inf.safetensors"), f"{user_code / 'inf.safetensors'}: tensor {first} holds non-finite"),
        ("user_encoders:nan_weights", "your encoder user_encoders:nan_weights: tensor 0.bias holds non-finite"),
        ("user_encoders:Infinite", "your encoder user_encoders:Infinite: its features on 2 random images of the dataset's shape are not finite"),
    ]
    for spec, message in cases:
        out = user_code / "out"
        assert main(["evaluate", "--encoder", spec, "--data", "synthetic", "--out", str(out), "--quiet", *FAST]) == 2
        err = _one_error_line(capsys)
        assert message in err, err
        assert not out.exists()
    module = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        module[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(EncoderError, match=r"torch\.nn\.modules\.container\.Sequential: tensor 0\.weight holds non-finite"):
        load_external(module, dataset_info("synthetic"))
