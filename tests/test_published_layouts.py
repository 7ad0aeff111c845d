"""Every published layout read strictly: features equal the layout's own network's in every branch, and each
kind of damage (a corrupted key, a wrong shape, a missing BN copy, a file of another layout, a stray pickled
class) is a one-line EncoderError before anything is evaluated. The reference networks are in
tests/published_reference.py, written from the layouts' facts and independent of robustcl.models."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from published_reference import BN_COPIES, CIFAR10, IMAGENET, CifarResNet18, save_layout
from robustcl.data import dataset_info
from robustcl.encoders import LAYOUTS, EncoderError, Reading, load_external
from robustcl.encoders.evaluate import write_encoder_files
from robustcl.export import read_encoder
from robustcl.runs import RunDir

CIFAR = dataset_info("cifar10")
NAMES = list(BN_COPIES)
X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
BRANCH = {0: "benign", 1: "adversarial"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each layout's file, saved once as its training script saves it, with the network it came from."""
    root = tmp_path_factory.mktemp("published")
    return {name: save_layout(name, root / name, seed=i) for i, name in enumerate(NAMES)}


def their_features(model, copy: int) -> torch.Tensor:
    with torch.no_grad():
        return model(X, copy)


def ours(encoder, branch: str) -> torch.Tensor:
    with torch.no_grad():
        return encoder(X, branch)


@pytest.mark.parametrize("name", NAMES)
def test_each_layout_gives_its_own_networks_features_in_every_branch(files, name):
    path, model = files[name]
    raw = {"mean": (0.0,) * 3, "std": (1.0,) * 3} if name == "torchvision" else {}  # its file holds no normalisation
    encoder, meta = load_external(path, CIFAR, **raw)
    source = meta["source"]
    assert source["layout"] == name and source["layout_chosen"] == "detected from its keys"
    copies = min(BN_COPIES[name], 2)  # AdvCL's third copy is never evaluated: robustcl holds two branches
    assert meta["dual_bn"] == (copies == 2)
    assert meta["headline_branch"] == ("adversarial" if copies == 2 else "benign")
    for copy in range(copies):
        expected = F.normalize(their_features(model, copy), dim=1)  # equal up to L2 normalisation
        got = ours(encoder, BRANCH[copy])
        assert got.shape == (3, 512)
        assert torch.allclose(got, expected, atol=1e-5), (name, copy, (got - expected).abs().max())
    if copies == 2:  # the branches differ, so a copy mix-up cannot pass
        assert not torch.allclose(ours(encoder, "benign"), ours(encoder, "adversarial"), atol=1e-3)


def test_what_each_layout_drops_is_named_by_its_rules(files):
    dropped = {name: load_external(files[name][0], CIFAR)[1]["source"]["dropped"] for name in NAMES}
    assert dropped["acl"] == {"the projection head fc.* (3 linear layers with dual BatchNorm1d)": 4 + 2 * 3 * 5}
    keys = torch.load(files["dynacl"][0], weights_only=False)["state_dict"]
    assert dropped["dynacl"] == {
        "the online encoder encoder_q.* (DynACL evaluates the momentum encoder encoder_k)":
            sum(k.startswith("encoder_q.") for k in keys), "encoder_k's projection head fc.*": 4 + 2 * 3 * 5}
    assert dropped["advcl"]["BN copy 2 'pgd_ce' (AdvCL's pseudo-label adversarial branch, never evaluated)"] == 100
    assert dropped["advcl"]["the pseudo-label heads fc_{002,010,050,100,500}"] == 10
    assert dropped["advcl"]["the heads head_ce, head_proj, head_pred"] == 3 * 9
    assert dropped["deacl"] == {"the clean SimCLR teacher momentum_backbone.* (DeACL evaluates the student backbone.*)":
                                1 + 5 + 8 * 12 + 3 * 6 + 2, "the online linear classifiers classifier, classifier_adv": 4}
    assert dropped["rocl"] == {}
    assert dropped["gbrcl"] == {"the projector head.{0,2}": 4, "the linear head fc (robustcl fits its own)": 2}


def test_normalisation_stem_and_shortcuts_come_from_each_layout(files):
    meta = {name: load_external(files[name][0], CIFAR)[1] for name in NAMES}
    assert meta["acl"]["mean"] == pytest.approx(IMAGENET[0]) and meta["gbrcl"]["std"] == pytest.approx(IMAGENET[1])
    assert meta["deacl"]["mean"] == pytest.approx(CIFAR10[0]) and meta["deacl"]["stem_padding"] == 2
    assert meta["advcl"]["mean"] == [0.0] * 3 and meta["advcl"]["std"] == [1.0] * 3
    assert meta["rocl"]["source"]["normalisation"]["from"] == "none: layout rocl takes raw [0, 1] inputs"
    assert meta["lpaft"]["source"]["normalisation"]["from"] == "the file's normalize.* buffers"
    assert meta["torchvision"]["mean"] == list(CIFAR.mean)  # no buffers: the dataset's statistics (--mean/--std)
    assert meta["gbrcl"]["identity_shortcut"] is False
    assert all(meta[n]["identity_shortcut"] for n in NAMES if n != "gbrcl")
    assert all(meta[n]["stem_padding"] == 1 for n in NAMES if n != "deacl")


def test_deacl_read_with_a_padding_1_stem_gives_other_features(files):
    """The RobustSSL benchmark's reading of DeACL (padding 1) is another network: --stem-padding 1 gives it."""
    path, student = files["deacl"]
    padded, _ = load_external(path, CIFAR)
    one, meta = load_external(path, CIFAR, reading=Reading(stem_padding=1))
    assert meta["source"]["stem"] == {"stem": "cifar", "padding": 1, "from": "--stem-padding"}
    assert not torch.allclose(ours(padded, "benign"), ours(one, "benign"), atol=1e-3)
    same = CifarResNet18("plain", 1, "downsample", padding=1, normalize=CIFAR10).eval()
    same.load_state_dict(student.state_dict())
    assert torch.allclose(ours(one, "benign"), F.normalize(their_features(same, 0), dim=1), atol=1e-5)


@pytest.mark.parametrize("name", ["acl", "advcl", "gbrcl"])
def test_bn_branch_picks_the_copy_read(files, name):
    path, model = files[name]
    benign, meta = load_external(path, CIFAR, reading=Reading(bn_branch="benign"))
    assert meta["headline_branch"] == "benign" and meta["source"]["bn_copies"]["benign"]["copy"] == 0
    by_index, meta = load_external(path, CIFAR, reading=Reading(bn_branch=1))
    assert meta["headline_branch"] == "adversarial"
    if name == "advcl":  # copy 2 only when asked for by index; it takes the adversarial branch's place
        third, meta = load_external(path, CIFAR, reading=Reading(bn_branch=2))
        assert meta["source"]["bn_copies"]["adversarial"] == {"copy": 2, "name": "pgd_ce"}
        expected = F.normalize(their_features(model, 2), dim=1)
        assert torch.allclose(ours(third, "adversarial"), expected, atol=1e-5)
        assert "BN copy 1 'pgd' (not read: robustcl reads copies [0, 2])" in meta["source"]["dropped"]
    with pytest.raises(EncoderError, match="has BN copies"):
        load_external(path, CIFAR, reading=Reading(bn_branch=BN_COPIES[name]))


def test_bn_branch_on_a_single_bn_layout_is_an_error(files):
    with pytest.raises(EncoderError, match="one set of BN statistics"):
        load_external(files["rocl"][0], CIFAR, reading=Reading(bn_branch="adversarial"))


def test_the_benchmark_reading_is_raw_pooled_features_of_copy_1(files):
    path, model = files["acl"]
    encoder, meta = load_external(path, CIFAR, reading=Reading(protocol_of="benchmark"))
    assert meta["features"] == "raw" and meta["source"]["protocol_of"] == "benchmark"
    assert torch.allclose(ours(encoder, "adversarial"), their_features(model, 1), atol=1e-4)
    with pytest.raises(EncoderError, match="the RobustSSL benchmark reads only"):
        load_external(files["rocl"][0], CIFAR, reading=Reading(protocol_of="benchmark"))


def resave(files, name, tmp_path, edit):
    """The layout's file with its state dict edited by `edit(state)`."""
    obj = torch.load(files[name][0], weights_only=False)
    state = obj["state_dict"] if "state_dict" in obj else obj["model"] if "model" in obj else obj
    edit(state)
    path = tmp_path / files[name][0].name
    torch.save(obj, path)
    return path


def first_key(files, name, contains: str) -> str:
    obj = torch.load(files[name][0], weights_only=False)
    state = obj["state_dict"] if "state_dict" in obj else obj["model"] if "model" in obj else obj
    return next(k for k in state if contains in k and not k.startswith(("encoder_q.", "momentum_backbone.")))


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("name", NAMES)
def test_a_corrupted_key_a_wrong_shape_and_a_missing_bn_copy_are_one_line_errors(files, name, tmp_path):
    key = first_key(files, name, "layer2.0.conv2.weight")
    path = resave(files, name, tmp_path, lambda s: s.__setitem__(key.replace("conv2", "conv9"), s.pop(key)))
    with pytest.raises(EncoderError, match=f"read as layout {name} .*match no rule.*conv9") as err:
        load_external(path, CIFAR)
    one_line(err)
    path = resave(files, name, tmp_path, lambda s: s.__setitem__(key, torch.zeros(128, 128, 5, 5)))
    with pytest.raises(EncoderError, match=f"read as layout {name} .*has shape \\(128, 128, 5, 5\\) but robustcl") as err:
        load_external(path, CIFAR)
    one_line(err)
    bn = first_key(files, name, "layer3.0.bn2." + ("bn_list.1." if name in ("acl", "dynacl", "advcl") else
                                                   "1." if name == "gbrcl" else "") + "running_var")
    missing = "adversarial" if BN_COPIES[name] > 1 else "benign"
    path = resave(files, name, tmp_path, lambda s: s.pop(bn))
    with pytest.raises(EncoderError, match=f"layer3.0.bn2.{missing}.running_var has no tensor") as err:
        load_external(path, CIFAR)
    one_line(err)


@pytest.mark.parametrize("name", NAMES)
def test_a_file_of_another_layout_forced_is_a_one_line_error(files, name):
    other = NAMES[(NAMES.index(name) + 3) % len(NAMES)]
    with pytest.raises(EncoderError, match=f"read as layout {name} \\(--format\\)|layout {name}") as err:
        load_external(files[other][0], CIFAR, reading=Reading(format=name))
    one_line(err)


def test_an_unknown_layout_names_the_known_ones(tmp_path):
    torch.save({"weights": {"encoder.stem.weight": torch.zeros(64, 3, 3, 3)}, "step": 1}, tmp_path / "x.pt")
    with pytest.raises(EncoderError, match="holds no state dict"):
        load_external(tmp_path / "x.pt", CIFAR)
    torch.save({"encoder.stem.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "y.pt")
    with pytest.raises(EncoderError, match="no published layout matches its keys .*known: dynacl, advcl, acl"):
        load_external(tmp_path / "y.pt", CIFAR)


class Foreign:
    pass


def test_a_pickled_class_beyond_the_layouts_needs_is_named(files, tmp_path):
    obj = torch.load(files["acl"][0], weights_only=False)
    torch.save({**obj, "args": argparse.Namespace(lr=0.5)}, tmp_path / "ns.pt")
    with pytest.raises(EncoderError, match="top-level entry 'args'"):  # ACL's checkpoints hold no args
        load_external(tmp_path / "ns.pt", CIFAR)
    torch.save({**obj, "acc": argparse.Namespace(lr=0.5)}, tmp_path / "acc.pt")
    with pytest.raises(EncoderError, match="holds the class argparse.Namespace, which layout acl"):
        load_external(tmp_path / "acc.pt", CIFAR)
    torch.save({**obj, "acc": Foreign()}, tmp_path / "foreign.pt")
    with pytest.raises(EncoderError, match=f"holds the class {__name__}.Foreign, which no published layout needs"):
        load_external(tmp_path / "foreign.pt", CIFAR)


def test_the_seed_papers_namespace_is_allowed_only_while_reading(files):
    load_external(files["gbrcl"][0], CIFAR)
    with pytest.raises(Exception, match="argparse.Namespace"):  # not allow-listed for anyone else afterwards
        torch.load(files["gbrcl"][0], weights_only=True)


def test_a_broken_mapping_is_caught_by_the_feature_comparison(files, monkeypatch):
    """A mapping that swaps ACL's BN copies loads without complaint: only the comparison with the network's own
    forward can see it, and it does."""
    from robustcl.encoders import published

    real = published.resolve_copy
    monkeypatch.setattr(published, "resolve_copy",
                        lambda key, copies, dropped: real(key, {i: copies[1 - i] for i in copies}, dropped))
    path, model = files["acl"]
    encoder, _ = load_external(path, CIFAR)
    expected = F.normalize(their_features(model, 1), dim=1)
    assert not torch.allclose(ours(encoder, "adversarial"), expected, atol=1e-3)


@pytest.mark.parametrize("name", ["deacl", "gbrcl", "advcl"])
def test_a_loaded_encoder_saved_into_a_run_keeps_stem_shortcuts_and_normalisation(files, name, tmp_path):
    encoder, meta = load_external(files[name][0], CIFAR)
    meta = {**meta, "dataset": "cifar10", "fingerprint": "x"}
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    write_encoder_files(run, encoder, meta, "cifar10")
    back, stored = read_encoder(run.encoder)
    assert stored["stem_padding"] == meta["stem_padding"] and back.backbone.conv1.padding == encoder.backbone.conv1.padding
    assert back.backbone.identity_shortcut == encoder.backbone.identity_shortcut
    assert stored["mean"] == meta["mean"] and stored["std"] == meta["std"]
    for branch in ("benign", "adversarial"):
        assert torch.equal(ours(back, branch), ours(encoder, branch))


TINY = ["--data", "synthetic", "--config", "smoke", "--protocol", "slf", "--quiet", "data.synthetic.channels=3",
        "data.synthetic.size=16", "eval.limit=8", "eval.eps_curve=[]", "finetune.train_limit=16",
        "finetune.val_limit=8", "finetune.epochs=1", "train.threads=2"]  # ResNet-18 on 16x16 images, 8 of them evaluated


@pytest.fixture
def quick_square(monkeypatch):
    """Square's cross-check with 5 queries instead of 1000 (a ResNet-18 on 2 busy CPU cores; its result is not
    what these tests look at)."""
    from robustcl.evaluation import integrity

    monkeypatch.setattr(integrity, "SQUARE_QUERIES", 5)


def test_evaluate_encoder_on_a_published_file_prints_and_stores_how_it_was_read(files, tmp_path, capsys, quick_square):
    from robustcl.cli import main

    path, _ = files["deacl"]
    out = tmp_path / "out"
    assert main(["evaluate", "--encoder", str(path), "--out", str(out), "--compare", "deacl-cifar10", *TINY]) == 0
    printed = capsys.readouterr().out
    assert f"encoder: {path} read as layout deacl (detected from its keys); read through benign" in printed
    assert "stem cifar padding 2 (layout deacl (DeACL's code; the weights cannot show it))" in printed
    assert "| SLF | published by benchmark | 79.94 | 43.27 | 73.06 | autoattack | | | |" in printed
    results = json.loads((out / "results.json").read_text())
    encoder = results["encoder"]
    assert encoder["layout"] == "deacl" and encoder["stem"]["padding"] == 2 and encoder["branch"] == "benign"
    assert encoder["normalisation"]["from"] == "the file's normalize.* buffers"
    assert sum(encoder["dropped"].values()) == 122 + 4 and len(encoder["sha256"]) == 64
    assert results["comparison"]["entry"] == "deacl-cifar10"
    back, stored = read_encoder(out / "encoder.safetensors")
    assert stored["stem_padding"] == 2 and back.backbone.conv1.padding == (2, 2)


def test_the_benchmark_reading_uses_its_per_method_settings_labelled(files, tmp_path, capsys, monkeypatch,
                                                                    quick_square):
    from robustcl.cli import main
    from robustcl.encoders import benchmark

    monkeypatch.setitem(benchmark.SETTINGS["ACL"]["slf"], "synthetic", (512, 0.01))  # the benchmark's CIFAR-10 row
    path, _ = files["acl"]
    out = tmp_path / "bench"
    assert main(["evaluate", "--encoder", str(path), "--out", str(out), "--protocol-of", "benchmark", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    encoder = results["encoder"]
    assert encoder["protocol_of"] == "benchmark" and "not comparable with robustcl-protocol" in encoder["label"]
    assert encoder["benchmark_settings"]["slf"] == {"method": "ACL", "protocol": "slf", "batch_size": 512, "lr": 0.01,
                                                    "epochs": 25, "momentum": 0.9, "weight_decay": 2e-4,
                                                    "milestones": [10, 20]}
    head = torch.load(out / "heads" / "slf.pt", weights_only=False)
    assert head["finetune"]["lr"] == 0.01 and head["finetune"]["weight_decay"] == 2e-4
    assert head["finetune"]["epochs"] == 1  # an explicit override still wins
    assert encoder["features"] == "raw pooled (the benchmark's)"
    assert main(["evaluate", "--encoder", str(files["rocl"][0]), "--protocol-of", "benchmark", *TINY]) == 2
    assert "the RobustSSL benchmark reads only acl, dynacl, advcl, deacl files" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["acl", "advcl", "gbrcl", "rocl"])
def test_load_encoder_gives_a_plain_module_of_any_layout(files, name):
    from robustcl import load_encoder

    path, model = files[name]
    default = load_encoder(path)  # the adversarial copy where there are two or three, else the only one
    copy = 1 if BN_COPIES[name] > 1 else 0
    with torch.no_grad():
        got = default(X)
    assert not default.training and torch.allclose(got, F.normalize(their_features(model, copy), dim=1), atol=1e-5)
    if BN_COPIES[name] > 1:
        with torch.no_grad():
            benign = load_encoder(path, branch=0)(X)
        assert torch.allclose(benign, F.normalize(their_features(model, 0), dim=1), atol=1e-5)


def test_load_encoder_of_a_torchvision_file_needs_its_normalisation(files):
    from robustcl import load_encoder

    path, model = files["torchvision"]
    with pytest.raises(EncoderError, match="holds no normalisation: give mean and std"):
        load_encoder(path)
    plain = load_encoder(path, mean=(0.0,) * 3, std=(1.0,) * 3)
    with torch.no_grad():
        assert torch.allclose(plain(X), F.normalize(their_features(model, 0), dim=1), atol=1e-5)
    assert load_encoder(path, data="cifar10").encoder.mean.flatten().tolist() == pytest.approx(list(CIFAR.mean))


def test_zoo_name_is_fetched_from_a_loopback_server_and_evaluated(files, tmp_path, monkeypatch, quick_square):
    """--encoder zoo:NAME downloads the catalogue's file into the cache and evaluates it; --compare finds the entry
    by the file's sha256."""
    import hashlib
    import http.server
    import threading

    from robustcl import evaluate_encoder
    from robustcl.encoders import zoo

    path, _ = files["acl"]
    body = path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/model.pt"
        known = {"sources": {"test": "a loopback server"}, "entries": {"tiny-acl": {
            "method": "ACL", "dataset": "synthetic", "arch": "resnet18", "layout": "acl", "file": "tiny-acl.pt",
            "url": url, "url_source": "test", "sha256": hashlib.sha256(body).hexdigest(),
            "published": {"benchmark": {"source": "test", "slf": {"clean": 50.0, "autoattack": 20.0}}}}}}
        monkeypatch.setattr(zoo, "catalogue", lambda: known)
        monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
        lines: list[str] = []
        results = evaluate_encoder("zoo:tiny-acl", "synthetic", tmp_path / "out", config="smoke", protocols=["slf"],
                                   overrides=[k for k in TINY if "=" in k], compare=True, announce=lines.append)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert (tmp_path / "cache" / "tiny-acl.pt").read_bytes() == body
    assert results["encoder"]["zoo"] == "tiny-acl" and results["method"] == "ACL"
    assert lines and lines[0].startswith(f"encoder: {tmp_path / 'cache' / 'tiny-acl.pt'} read as layout acl")
    row = results["comparison"]["rows"][0]
    assert results["comparison"]["entry"] == "tiny-acl" and row["published"] == {"clean": 50.0, "robust": 20.0, "corruptions": None}
    assert row["label"] == "ours (robustcl's protocol)"


def test_dynacls_other_saves_read_as_their_layouts(files, tmp_path):
    """model_encoder_k.pt (ACL keys, no prefix) is an ACL-family file giving encoder_k's features; the periodic
    model_N.pt adds acc, tacc, rtacc beside the weights."""
    path, encoder_k = files["dynacl"]
    whole = torch.load(path, weights_only=False)
    torch.save({"epoch": 100, "state_dict": encoder_k.state_dict()}, tmp_path / "model_encoder_k.pt")
    encoder, meta = load_external(tmp_path / "model_encoder_k.pt", CIFAR)
    assert meta["source"]["layout"] == "acl"
    assert torch.allclose(ours(encoder, "adversarial"), F.normalize(their_features(encoder_k, 1), dim=1), atol=1e-5)
    torch.save({**whole, "acc": 0.5, "tacc": 0.4, "rtacc": 0.3}, tmp_path / "model_100.pt")
    assert load_external(tmp_path / "model_100.pt", CIFAR)[1]["source"]["layout"] == "dynacl"
