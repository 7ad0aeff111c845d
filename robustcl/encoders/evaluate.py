"""`robustcl evaluate --encoder`: robustcl's phase 2 (SLF/ALF/AFF), attacks and integrity checks on any encoder,
in a results directory of its own (a run directory plus encoder.json saying what was evaluated)."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save
from torch import nn

import robustcl.methods  # noqa: F401 - registers the methods configs are built with (pyflakes: used for its effect)
from robustcl.config import Config, ConfigError, dump_yaml, load_config
from robustcl.data import DataError, DatasetInfo, dataset_info
from robustcl.encoders import benchmark, zoo
from robustcl.encoders.errors import EncoderError
from robustcl.encoders.load import load_external
from robustcl.encoders.published import Reading
from robustcl.evaluation.run_eval import evaluate_run
from robustcl.models import Encoder
from robustcl.runs import RunDir, RunError, atomic_write_bytes, atomic_write_text, open_run
from robustcl.runs.guard import RunLock
from robustcl.runtime import open_runtime
from robustcl.runs.report import write_report
from robustcl.splits import load_split
from robustcl.train.finetune import finetune

# The preset whose finetune and eval sections are a dataset's standard protocol (--config overrides it).
PROTOCOL_PRESETS = {"cifar10": "cifar10-gbrcl", "cifar100": "cifar100-gbrcl", "fashion-mnist": "fmnist-gbrcl",
                    "synthetic": "smoke"}


def encoder_config(data: str, config: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """The phase-2 and evaluation settings: `config` (default: the dataset's reference preset) on `data`."""
    base = config or PROTOCOL_PRESETS.get(data)
    if base is None:
        raise ConfigError(f"no preset holds the phase-2 and evaluation protocol for {data!r}; pass --config NAME|PATH "
                          f"(its finetune and eval sections are used, e.g. cifar10-gbrcl)")
    return load_config(base, [f"data.name={data}", *overrides])


def data_info(cfg: Config) -> DatasetInfo:
    """Shape, channels and statistics of cfg's dataset (imagefolder reads its files for them)."""
    try:
        return dataset_info(cfg.data.name, **cfg.data.reader_options())
    except DataError:
        return load_split(cfg, "test").info


def default_out(encoder: nn.Module | str | Path, data: str) -> Path:
    """runs/encoders/<encoder name>-<data>."""
    if isinstance(encoder, nn.Module):
        name = type(encoder).__name__.lower()
    else:
        path = Path(encoder)
        name = (path.name if path.is_dir() else path.parent.name if path.stem == "encoder" else path.stem) \
            if path.exists() else str(encoder).replace(":", "-")
    return Path("runs") / "encoders" / f"{name}-{data}"


def refuse_other_contents(run: RunDir, overwrite: bool) -> None:
    """An existing results directory is replaced only if it is an encoder evaluation and `overwrite` is given
    (a training run is never touched)."""
    if run.root.exists() and any(run.root.iterdir()):
        if not run.encoder_description.is_file():
            raise RunError(f"{run.root} holds something other than an encoder evaluation; choose another --out")
        if not overwrite:
            raise RunError(f"{run.root} already holds an encoder evaluation; pass --overwrite to redo it "
                           "or choose another --out")


def write_encoder_files(run: RunDir, module: nn.Module, meta: dict[str, Any], data: str) -> None:
    """encoder.json (what was evaluated) and, for an encoder robustcl can read back, encoder.safetensors."""
    atomic_write_text(run.encoder_description, json.dumps({**meta["source"], "fingerprint": meta["fingerprint"],
                                                          "data": data}, indent=2) + "\n")
    if meta["source"]["kind"] == "robustcl":  # an encoder file here lets `robustcl evaluate --run` reuse the directory
        atomic_write_bytes(run.encoder, Path(meta["source"]["path"]).read_bytes())
    elif isinstance(module, Encoder):
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
        stored = {k: v for k, v in meta.items() if k not in ("source", "fingerprint")}
        atomic_write_bytes(run.encoder, save(tensors, metadata={"robustcl": json.dumps(stored)}))


def check_reading(meta: dict[str, Any], reading: Reading) -> None:
    """--format, --bn-branch, --stem-padding and --protocol-of read published checkpoints only."""
    given = [flag for flag, value in (("--format", reading.format), ("--bn-branch", reading.bn_branch),
                                      ("--stem-padding", reading.stem_padding), ("--protocol-of", reading.protocol_of))
             if value is not None and not (flag == "--protocol-of" and value == "robustcl")]
    if given and meta["source"]["kind"] != "published":
        raise EncoderError(f"{given[0]} applies to published checkpoints; this encoder is a {meta['source']['kind']} "
                           "one (for a robustcl encoder pick the branch with finetune.branch=benign|adversarial)")


def describe(meta: dict[str, Any]) -> str:
    """One line: how a published checkpoint was read (layout, branch, normalisation, stem, dropped keys)."""
    s = meta["source"]
    if s["kind"] != "published":
        return f"encoder: {s.get('path') or s.get('spec')} ({s['kind']})"
    copies = ", ".join(f"{b} = BN copy {c['copy']} '{c['name']}'" for b, c in s["bn_copies"].items())
    norm = s["normalisation"]
    dropped = "; ".join(f"{n} x {rule}" for rule, n in s["dropped"].items()) or "nothing"
    return (f"encoder: {s['path']} read as layout {s['layout']} ({s['layout_chosen']}); read through {s['branch']} "
            f"({copies}); normalisation mean {tuple(round(v, 4) for v in norm['mean'])} std "
            f"{tuple(round(v, 4) for v in norm['std'])} from {norm['from']}; stem {s['stem']['stem']} padding "
            f"{s['stem']['padding']} ({s['stem']['from']}); {s['features']} features; dropped: {dropped}")


def catalogue_entry(meta: dict[str, Any], item: dict[str, Any] | None, compare: str | bool | None) -> dict[str, Any]:
    """The catalogue entry --compare sets our reading against: the named one, the zoo:NAME one, or the one whose
    file has the encoder's sha256."""
    if isinstance(compare, str) and compare:
        return zoo.entry(compare)
    found = item or zoo.by_sha256(meta["source"].get("sha256", ""))
    if found is None:
        raise EncoderError("--compare: the file's sha256 is in no catalogue entry (few publish one); name the entry, "
                           "e.g. --compare acl-cifar10 (`robustcl zoo` lists them)")
    return found


def evaluate_encoder(encoder: nn.Module | str | Path, data: str, out: str | Path | None = None, *,
                     config: str | None = None, overrides: Sequence[str] = (), protocols: Sequence[str] | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     overwrite: bool = False, progress: bool = False, layout: str | None = None,
                     bn_branch: str | int | None = None, stem_padding: int | None = None,
                     protocol_of: str | None = None, compare: str | bool | None = None,
                     announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit SLF/ALF/AFF heads on `encoder`, run the attacks and integrity checks on `data`'s test set;
    returns results.json's content (the structure `robustcl evaluate --run` writes, plus "encoder").

    `encoder`: an nn.Module (inputs in [0, 1], returns (N, D) features), a file (robustcl encoder.safetensors
    or a published checkpoint of any layout, encoders/layouts.py; `mean`/`std` for a torchvision file without
    normalize.* buffers), "zoo:NAME" (fetched into the cache) or "package.module:callable". `config` (a preset
    or YAML) supplies the finetune and eval settings, `overrides` change them. `layout` forces a layout,
    `bn_branch` picks the BN copy (default the adversarial one, copy 1), `stem_padding` the 3x3 stem's padding,
    `protocol_of="benchmark"` reads as the RobustSSL benchmark does; `compare` (True or a catalogue name) adds
    the catalogue's published numbers beside ours. `announce` receives the one-line description of the reading.
    The caller's module is not modified.
    """
    cfg = encoder_config(data, config, overrides)
    unknown = [p for p in protocols or () if p not in ("slf", "alf", "aff")]
    if unknown:
        raise ConfigError(f"unknown protocol {unknown[0]!r}; valid: slf, alf, aff")
    open_runtime(cfg)  # device, threads, logger libraries: before anything is read or written
    source, item = zoo.resolve(encoder)  # an existing path, then zoo:NAME, then module:callable
    reading = Reading(layout, bn_branch, stem_padding, protocol_of, item["method"] if item else None)
    loaded = load_external(source, data_info(cfg), mean, std, reading)  # bad input fails before anything is written
    check_reading(loaded[1], reading)
    chosen_entry = catalogue_entry(loaded[1], item, compare) if compare else None
    chosen = tuple(protocols) if protocols else None
    per_protocol = protocol_configs(cfg, loaded[1], item or chosen_entry, reading, data, config, overrides,
                                    chosen or cfg.finetune.protocols)
    if announce is not None:
        announce(describe(loaded[1]))
    run = RunDir(out if out is not None else default_out(encoder, data))
    refuse_other_contents(run, overwrite)
    module, meta = loaded
    lock = RunLock(run.root)
    open_run(run, lock, dump_yaml(cfg), resume=False, overwrite=overwrite, why="the encoder evaluation")
    try:
        write_encoder_files(run, module, meta, data)
    finally:
        lock.release()
    for protocol, protocol_cfg in per_protocol.items():  # one config for all, or the benchmark's per protocol
        finetune(protocol_cfg, run, chosen if protocol == "*" else (protocol,), progress=progress, overwrite=True,
                 loaded=loaded)
    results = evaluate_run(cfg, run, progress=progress, protocols=chosen, loaded=loaded)
    if chosen_entry is not None:
        results["comparison"] = {"entry": chosen_entry["name"],
                                 "rows": zoo.comparison(results, chosen_entry, zoo.catalogue()["sources"])}
        run.write_json(run.results, results)
    write_report(run, title=f"{meta['source'].get('path') or meta['source'].get('spec')} on {data}")
    return results


def protocol_configs(cfg: Config, meta: dict[str, Any], item: dict[str, Any] | None, reading: Reading, data: str,
                     config: str | None, overrides: Sequence[str], protocols: Sequence[str]) -> dict[str, Config]:
    """{"*": `cfg`} for robustcl's protocol; under --protocol-of benchmark one config per protocol with the
    benchmark's settings for the file's method (the catalogue entry's, else its layout's), recorded in the
    encoder's description with what robustcl's phase 2 does differently. Explicit overrides still win."""
    if item is not None:
        meta["source"]["zoo"] = item["name"]
    if reading.protocol_of != "benchmark":
        return {"*": cfg}
    method = item["method"] if item else benchmark.LAYOUT_METHOD[meta["source"]["layout"]]
    configs = {p: encoder_config(data, config, [*benchmark.overrides(method, data, p), *overrides]) for p in protocols}
    meta["method"] = method
    meta["source"]["benchmark_settings"] = {p: benchmark.settings(method, data, p) for p in protocols}
    meta["source"]["benchmark_differences"] = list(benchmark.DIFFERENCES)
    meta["source"]["label"] = ("the RobustSSL benchmark's reading and per-method settings, on robustcl's phase 2 "
                               "(differences listed); not comparable with robustcl-protocol results")
    return configs
