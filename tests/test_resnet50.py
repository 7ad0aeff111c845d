"""Dual-BN ResNet-50, the cifar / imagenet / auto stem, encoder export of the stem, and the ImageFolder R50 preset."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save

from robustcl.cli import main
from robustcl.config import ConfigError, load_config
from robustcl.data import DatasetInfo
from robustcl.export import FORMAT, export_encoder, read_encoder
from robustcl.models import (
    Bottleneck, DualBatchNorm2d, ResNet18, ResNet50, build_encoder, resolve_stem,
)
from robustcl.presets import __file__ as presets_init
from robustcl.methods.factory import backbone_kwargs, build_method, encoder_export_fields

MEAN, STD = (0.48, 0.45, 0.40), (0.23, 0.22, 0.22)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: far faster than two when other processes share the cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def r50() -> ResNet50:
    """One dual-BN imagenet-stem ResNet-50 in eval mode, shared by the tests that only read it."""
    torch.manual_seed(0)
    return ResNet50(stem="imagenet").eval()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hand_count(bottleneck: bool, imagenet_stem: bool) -> tuple[int, int]:
    """(conv + single-BN affine params, BN channels) of a ResNet trunk, from the layer shapes alone."""
    stem_k = 7 if imagenet_stem else 3
    params, bn_channels = 3 * 64 * stem_k ** 2 + 2 * 64, 64
    blocks, expansion = ((3, 4, 6, 3), 4) if bottleneck else ((2, 2, 2, 2), 1)
    in_planes = 64
    for planes, stride, count in zip((64, 128, 256, 512), (1, 2, 2, 2), blocks):
        out = planes * expansion
        for i in range(count):
            if bottleneck:  # 1x1 in->p, 3x3 p->p, 1x1 p->4p
                convs, bns = in_planes * planes + 9 * planes * planes + planes * out, 2 * planes + out
            else:  # 3x3 in->p, 3x3 p->p
                convs, bns = 9 * in_planes * planes + 9 * planes * planes, 2 * planes
            if i == 0 and (in_planes != out or stride != 1):  # projection shortcut: 1x1 conv + BN
                convs, bns = convs + in_planes * out, bns + out
            params += convs + 2 * bns
            bn_channels += bns
            in_planes = out
    return params, bn_channels


def test_parameter_counts_match_torchvision_trunks() -> None:
    # torchvision resnet50 / resnet18 hold 25,557,032 / 11,689,512 parameters; minus fc (2048*1000+1000 /
    # 512*1000+1000) that is 23,508,032 / 11,176,512, which the hand count reproduces from the layer shapes.
    assert hand_count(True, True)[0] == 23_508_032 and hand_count(False, True)[0] == 11_176_512
    single = ResNet50(dual_bn=False, stem="imagenet")
    assert n_params(single) == 23_508_032
    assert n_params(ResNet18(dual_bn=False, stem="imagenet")) == 11_176_512
    assert n_params(ResNet18(dual_bn=False)) == hand_count(False, False)[0] == 11_168_832  # CIFAR stem
    _, bn_channels = hand_count(True, True)
    assert n_params(ResNet50(dual_bn=True, stem="imagenet")) - n_params(single) == 2 * bn_channels
    assert sum(isinstance(m, DualBatchNorm2d) for m in single.modules()) == 1 + 3 * 16 + 4  # stem, 3 per block, 4 shortcuts


def test_bottleneck_layout_is_torchvision_v1_5(r50) -> None:
    model = r50
    assert model.feature_dim == 2048 and [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [3, 4, 6, 3]
    for stage, stride in ((model.layer1, 1), (model.layer2, 2), (model.layer3, 2), (model.layer4, 2)):
        first = stage[0]
        assert isinstance(first, Bottleneck) and first.downsample
        assert first.conv1.stride == (1, 1) and first.conv2.stride == (stride, stride)  # stride on the 3x3
        assert first.shortcut_conv.stride == (stride, stride) and first.conv3.out_channels == 4 * first.conv1.out_channels
        assert all(not b.downsample for b in stage[1:])
    assert (model.conv1.kernel_size, model.conv1.stride) == ((7, 7), (2, 2))
    assert (ResNet18().conv1.kernel_size, ResNet18().conv1.stride) == ((3, 3), (1, 1))  # cifar stem (default)


@pytest.mark.parametrize("arch, stem, side, final", [
    (ResNet50, "imagenet", 224, 7), (ResNet50, "imagenet", 96, 3), (ResNet50, "cifar", 32, 4),
    (ResNet18, "imagenet", 64, 2), (ResNet18, "cifar", 64, 8)])
def test_stem_downsampling_and_output_shape(arch, stem, side, final, r50) -> None:
    model = r50 if (arch, stem) == (ResNet50, "imagenet") else arch(stem=stem).eval()
    x = torch.rand(1 if side == 224 else 2, 3, side, side)
    with torch.no_grad():
        fmap = model.feature_map(x, "benign")
        out = model(x, "adversarial")
    assert fmap.shape == (x.shape[0], model.feature_dim, final, final)
    assert out.shape == (x.shape[0], model.feature_dim) and torch.isfinite(out).all()


def test_resnet50_branches_differ_once_their_bn_stats_differ() -> None:
    model = ResNet50(stem="imagenet")
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, "benign"), model(x, "adversarial"), rtol=0, atol=0)  # same init
    model.train()
    adv_before = [bn.adversarial.running_mean.clone() for bn in model.modules() if isinstance(bn, DualBatchNorm2d)]
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64) * 2 + 0.5, "benign")  # moves only the benign statistics
    adv_after = [bn.adversarial.running_mean for bn in model.modules() if isinstance(bn, DualBatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(adv_before, adv_after))
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x, "benign"), model(x, "adversarial"))
    # every one of the 53 BNs reads the branch it is given: the forward calls exactly that branch's BNs
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    for branch in ("benign", "adversarial"):
        called: set[int] = set()
        hooks = [getattr(d, name).register_forward_hook(lambda mod, i, o: called.add(id(mod)))
                 for d in duals for name in ("benign", "adversarial")]
        with torch.no_grad():
            model(x[:1], branch)
        for h in hooks:
            h.remove()
        assert called == {id(getattr(d, branch)) for d in duals} and len(called) == 53


def test_zero_init_residual_is_off_by_default_and_makes_blocks_identities() -> None:
    plain, zeroed = ResNet50(), ResNet50(zero_init_residual=True)
    assert all(b.bn3.benign.weight.eq(1).all() and b.bn3.adversarial.weight.eq(1).all() for b in plain.layer1)
    assert all(b.bn3.benign.weight.eq(0).all() and b.bn3.adversarial.weight.eq(0).all()
               for s in (zeroed.layer1, zeroed.layer4) for b in s)
    assert zeroed.layer1[0].bn1.benign.weight.eq(1).all()  # only the last BN of each block
    block = zeroed.layer1[1].eval()  # identity shortcut: the block is relu(x) at init
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        for branch in ("benign", "adversarial"):
            torch.testing.assert_close(block(x, branch), torch.relu(x), rtol=0, atol=0)
            assert not torch.allclose(plain.layer1[1].eval()(x, branch), torch.relu(x))
    assert ResNet18(zero_init_residual=True).layer2[0].bn2.benign.weight.eq(0).all()


def test_resolve_stem_by_image_side_and_through_the_config() -> None:
    assert [resolve_stem(s, n) for s, n in ((None, 28), ("auto", 64), ("auto", 65), (None, 96))] == \
        ["cifar", "cifar", "imagenet", "imagenet"]
    assert resolve_stem("cifar", 224) == "cifar" and resolve_stem("imagenet", 32) == "imagenet"
    with pytest.raises(ValueError, match="image side"):
        resolve_stem("auto", None)
    r50 = ["data.root=/some/dir"]
    assert backbone_kwargs(load_config("imagefolder-gbrcl-r50", r50)) == {"stem": "imagenet"}  # 96 px
    assert backbone_kwargs(load_config("imagefolder-gbrcl-r50", [*r50, "data.options.size=64"])) == {"stem": "cifar"}
    assert backbone_kwargs(load_config("imagefolder-gbrcl-r50", [*r50, "model.stem=cifar"])) == {"stem": "cifar"}
    assert backbone_kwargs(load_config("cifar10-gbrcl")) == {"stem": "cifar"}  # 32 px, stem left unset (null)
    assert backbone_kwargs(load_config("cifar10-gbrcl", ["data.name=stl10"])) == {"stem": "imagenet"}  # 96 px
    assert backbone_kwargs(load_config("cifar10-gbrcl", ["data.name=synthetic", "data.synthetic.size=65"])) == \
        {"stem": "imagenet"}
    cfg = load_config("cifar10-gbrcl", ["data.name=stl10", "data.options.size=64", "model.proj_dim=8"])
    assert build_method(cfg, 3, MEAN, STD).encoder.backbone.stem == "cifar"


def test_bad_stem_settings_are_one_line_config_errors(capsys) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("cifar10-gbrcl", ["model.stem=vit"])
    assert str(err.value) == "config key model.stem must be one of auto, cifar, imagenet; got 'vit'"
    with pytest.raises(ConfigError, match="model.stem='imagenet' applies to resnet18/resnet50 only"):
        load_config("smoke", ["model.stem=imagenet"])
    assert load_config("smoke", ["model.stem=auto"]).model.stem == "auto"
    assert main(["pretrain", "--config", "cifar10-gbrcl", "model.stem=vit", "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustcl: error: config key model.stem")


def _perturbed(encoder: torch.nn.Module, side: int) -> torch.nn.Module:
    """The encoder after one train-mode forward per branch, so its BN statistics are not the initial ones."""
    with torch.no_grad():
        encoder.train()
        encoder(torch.rand(4, 3, side, side), "benign")
        encoder(torch.rand(4, 3, side, side) * 0.5, "adversarial")
    return encoder.eval()


def test_resnet50_export_round_trip_records_the_resolved_stem(tmp_path) -> None:
    cfg = load_config("imagefolder-gbrcl-r50", ["data.root=/some/dir"])
    info = DatasetInfo("imagefolder", 2, 3, 96, 96, MEAN, STD)
    encoder = _perturbed(build_encoder("resnet50", 3, MEAN, STD, stem=backbone_kwargs(cfg)["stem"]), 64)
    export_encoder(encoder, tmp_path / "enc.safetensors", info, cfg, **encoder_export_fields(cfg, info))
    loaded, meta = read_encoder(tmp_path / "enc.safetensors")
    assert (meta["arch"], meta["stem"], loaded.backbone.stem, loaded.feature_dim) == ("resnet50", "imagenet", "imagenet", 2048)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for branch in ("benign", "adversarial"):
            torch.testing.assert_close(loaded(x, branch), encoder(x, branch), rtol=0, atol=0)


def test_old_resnet18_encoder_file_without_stem_loads_with_the_cifar_stem(tmp_path) -> None:
    encoder = _perturbed(build_encoder("resnet18", 3, MEAN, STD), 32)
    meta = {"format": FORMAT, "arch": "resnet18", "in_channels": 3, "mean": list(MEAN), "std": list(STD),
            "dual_bn": True, "widths": None, "method": "gbrcl", "headline_branch": "adversarial", "dataset": "cifar10"}
    tensors = {k: v.contiguous().clone() for k, v in encoder.state_dict().items()}
    (tmp_path / "old.safetensors").write_bytes(save(tensors, metadata={"robustcl": json.dumps(meta)}))
    loaded, read_meta = read_encoder(tmp_path / "old.safetensors")
    assert "stem" not in read_meta and loaded.backbone.stem == "cifar"
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        for branch in ("benign", "adversarial"):
            torch.testing.assert_close(loaded(x, branch), encoder(x, branch), rtol=0, atol=0)


def test_preset_loads_and_says_how_to_pass_the_root() -> None:
    from pathlib import Path

    first = (Path(presets_init).parent / "imagefolder-gbrcl-r50.yaml").read_text().splitlines()[0]
    assert first.startswith("# The seed's larger-dataset check") and "data.root=DIR" in first
    cfg, base = load_config("imagefolder-gbrcl-r50", ["data.root=/some/dir"]), load_config("cifar10-gbrcl")
    assert (cfg.data.name, cfg.data.root, cfg.data.options) == ("imagefolder", "/some/dir", {"size": 96})
    assert (cfg.model.arch, cfg.model.stem) == ("resnet50", "auto")
    assert cfg.method == base.method and cfg.train == base.train  # the paper's gbrcl recipe, unchanged
    assert load_config("imagefolder-gbrcl-r50").data.root is None


def test_preset_without_root_is_a_one_line_error(tmp_path, capsys) -> None:
    assert main(["pretrain", "--config", "imagefolder-gbrcl-r50", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.root=DIR" in err[0]


def _image_folder(root, side: int, per_class: dict[str, int]) -> None:
    """root/{train,test}/{a,b}/*.png with random pixels (class b brighter)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, (name, low) in enumerate((("a", 0), ("b", 128))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(low, low + 128, size=(side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_preset_pretrains_one_step_end_to_end_on_an_image_folder(tmp_path) -> None:
    _image_folder(tmp_path / "data", 96, {"train": 8, "test": 2})
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "imagefolder-gbrcl-r50", "--out", str(out), "--quiet",
                 f"data.root={tmp_path / 'data'}", "train.batch_size=4", "train.max_steps=1", "data.val_size=4",
                 "diagnostics.every=0", "method.attack.steps=1", "train.threads=1"]) == 0
    encoder, meta = read_encoder(out)
    assert (meta["arch"], meta["stem"], meta["dataset"], meta["in_channels"]) == ("resnet50", "imagenet", "imagefolder", 3)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1 and all(np.isfinite(records[-1][k]) for k in ("benign", "adversarial"))
    with torch.no_grad():
        z = encoder(torch.rand(2, 3, 96, 96), "adversarial")
    assert z.shape == (2, 2048) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
