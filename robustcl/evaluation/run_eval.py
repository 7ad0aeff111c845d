"""Evaluate a run's fitted models on the test set: clean and robust accuracy through one stated branch.

Every number in the headline comes from one model read through one BN branch. The reference
protocol's mixed reading (clean through the benign branch, robust through the adversarial one) is
computed only on request and stored apart, labelled as such; so is the authors' whole linear
evaluation (reference.evaluation: epochs picked on the test set, `reference_reading.py`).
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch

from robustcl.config import Config, reference_switches
from robustcl.evaluation.autoattack import autoattack_accuracy, state_key
from robustcl.evaluation.corrupted_sets import CorruptedSets, corrupted_sets
from robustcl.evaluation.corruptions import corruption_record, generation_record
from robustcl.evaluation.integrity import (SQUARE_MAX_IMAGES, check_autoattack_below_pgd, check_square_vs_whitebox,
                                           part_check, run_integrity_checks, square_survivors)
from robustcl.evaluation.per_image import PerImage, as_numpy, read_per_image, write_per_image
from robustcl.evaluation.reference_reading import reference_reading
from robustcl.evaluation.robust import (accuracy, accuracy_under, ce_objective, correct_under, curve_images,
                                       cw_margin_objective, fraction, pgd_accuracy, pgd_correct, robustness_curve,
                                       steps_curve)
from robustcl.export import check_run_encoder, read_encoder
from robustcl.models import BranchModel, Encoder, LinearHead
from robustcl.objectives import pgd, pgd_l2
from robustcl.runs import RunDir, RunError, atomic_write_text
from robustcl.hardware import cpu_model, device_description
from robustcl.runs.guard import writing
from robustcl.runs.loaders import head_fix, load_head, load_state_into
from robustcl.methods.factory import autocast_factory
from robustcl.runtime import open_runtime, paced, started_config
from robustcl.splits import load_split, train_val_indices
from robustcl.runs.loggers import open_logger
from robustcl.runs.progress import SILENT, Progress, Tick

MIXED_LABEL = ("MIXED BRANCHES (reference protocol): clean accuracy read through the benign BN branch, robust "
               "accuracy through the adversarial branch; these are two different models, not one model's trade-off")


def attack_name(steps: int, eps: float, kind: str = "pgd", norm: str = "linf", restarts: int = 1) -> str:
    """A stable key for results.json's `robust` map, e.g. pgd20-linf-0.1, cw20-linf-0.1, pgd20-l2-0.5-r5."""
    return f"{kind}{steps}-{norm}-{eps:.4g}" + (f"-r{restarts}" if restarts > 1 else "")


def autoattack_name(eps: float) -> str:
    """results.json key of standard AutoAttack in L-inf at `eps`."""
    return f"autoattack-linf-{eps:.4g}"


def extra_attack_name(kind: str, cfg: Config) -> str:
    """results.json key of the CW-margin L-inf attack ("cw") or PGD-L2 ("pgd-l2") under cfg.eval."""
    if kind == "cw":
        return attack_name(cfg.eval.attack.steps, cfg.eval.attack.eps, "cw", restarts=cfg.eval.restarts)
    return attack_name(cfg.eval.l2.steps, cfg.eval.l2.eps, "pgd", "l2", cfg.eval.restarts)


def extra_attack(kind: str, model, images, labels, cfg: Config, gen, autocast,
                 tick: Tick | None = None) -> tuple[str, float]:
    """Accuracy under the CW-margin L-inf attack or PGD-L2 (worst over eval.restarts), keyed like attack_name;
    `tick(n)` follows each batch of n images."""
    a, e = (cfg.eval.l2 if kind == "pgd-l2" else cfg.eval.attack), cfg.eval
    if kind == "cw":
        def perturb(x, y):
            return pgd(cw_margin_objective(model, y, autocast), x, a.eps, a.alpha, a.steps, a.random_start, gen,
                       modules=[model])
        return (extra_attack_name(kind, cfg),
                accuracy_under(model, images, labels, perturb, e.batch_size, autocast, e.restarts, tick))

    def perturb_l2(x, y):
        return pgd_l2(ce_objective(model, y, autocast), x, a.eps, a.alpha, a.steps, a.random_start, gen,
                      modules=[model])
    return (extra_attack_name(kind, cfg),
            accuracy_under(model, images, labels, perturb_l2, e.batch_size, autocast, e.restarts, tick))


def indexed_test_subset(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, str, torch.Tensor]:
    """test_subset plus each image's position in the full test split (what pairs two runs image by image)."""
    test = load_split(cfg, "test")
    if cfg.eval.limit is None or cfg.eval.limit >= len(test):
        return test.images, test.labels, f"full test set ({len(test)} images)", torch.arange(len(test))
    gen = torch.Generator().manual_seed(cfg.eval.subset_seed + 104_729)
    idx = torch.randperm(len(test), generator=gen)[: cfg.eval.limit]
    return (test.images[idx], test.labels[idx],
            f"random subset of {cfg.eval.limit} of {len(test)} test images (subset seed {cfg.eval.subset_seed})", idx)


def test_subset(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The test images to evaluate: all, or a seeded random subset of eval.limit (stated in results)."""
    images, labels, subset, _ = indexed_test_subset(cfg)
    return images, labels, subset


def protocol_model(run: RunDir, protocol: str, encoder: Encoder, device: torch.device,
                   branch: str | None = None) -> tuple[BranchModel, dict[str, Any]]:
    """The evaluated model of one protocol: the frozen encoder (or AFF's fine-tuned copy) + its head, eval mode."""
    path = run.head(protocol)
    saved = load_head(path, device)
    if "encoder" in saved:  # AFF fine-tuned the encoder too
        encoder = copy.deepcopy(encoder)
        load_state_into(encoder, saved["encoder"], path, head_fix(path))
        encoder.eval().requires_grad_(False)
    head = LinearHead(encoder.feature_dim, int(saved["head"]["weight"].shape[0])).to(device)
    load_state_into(head, saved["head"], path, head_fix(path))
    return BranchModel(encoder, head, branch or saved["branch"]).eval(), saved


def part_index(n: int, limit: int | None, subset_seed: int) -> torch.Tensor | None:
    """Positions of a seeded random `limit` of n evaluated images (for the checks or AutoAttack); None: all n."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(subset_seed + 7_919))[:limit].sort().values


def run_autoattack(model, images, labels, cfg: Config, run: RunDir, protocol: str,
                   fingerprint: str | None = None, parts: Progress = SILENT,
                   num_classes: int | None = None) -> dict[str, Any]:
    """Standard AutoAttack at eval.attack.eps, with its resumable state under the run's eval_state/, each
    attack a part of `parts`.

    The state is keyed by the head and encoder files, or by `fingerprint` for an encoder held in memory."""
    e = cfg.eval
    identity = (fingerprint,) if fingerprint is not None else ()
    key = state_key(protocol, e.attack.eps, len(images), e.limit, e.subset_seed, cfg.seed, e.precision, *identity,
                    files=(run.head(protocol),) if fingerprint is not None else (run.head(protocol), run.encoder))
    state = run.eval_state / f"autoattack-{protocol}-{key}.json"
    return autoattack_accuracy(model, images, labels, e.attack.eps, "Linf", e.batch_size, cfg.seed, state,
                               parts, num_classes).to_dict()


def evaluate_model(model: BranchModel, images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: Config,
                   autocast, run: RunDir, protocol: str, flags: dict[str, torch.Tensor] | None = None,
                   fingerprint: str | None = None, corrupted: CorruptedSets | None = None,
                   parts: Progress = SILENT) -> dict[str, Any]:
    """Clean accuracy, every configured attack, the eps and steps curves, the integrity checks and (given
    `corrupted`) the common-corruption accuracy of one model, each a part of `parts` (progress).

    `flags`, when given, receives the per-image correctness: "clean" and "robust" (the headline PGD);
    `fingerprint` identifies an encoder held in memory (AutoAttack's resumable state).
    """
    seconds: dict[str, float] = {}  # wall time of each part, so a slow evaluation says where its time went
    record, clean_flags, robust_flags = attacked_accuracy(model, images, labels, cfg, autocast, seconds, parts)
    if flags is not None:
        flags.update(clean=clean_flags, robust=robust_flags)
    if corrupted is not None:
        t0 = time.perf_counter()
        record["corruptions"] = corruption_record(model, corrupted, clean_flags, cfg, autocast, parts)
        seconds["corruptions"] = time.perf_counter() - t0
    aa_count = add_autoattack(record, model, images, labels, robust_flags, cfg, run, protocol, fingerprint, parts,
                              num_classes)
    add_curves(record, model, images, labels, cfg, autocast, seconds, parts)
    record["integrity"] = integrity_record(model, images, labels, clean_flags, robust_flags, record, num_classes, cfg,
                                           autocast, aa_count, parts)
    seconds.update({f"check {c['name']}": c["seconds"] for c in record["integrity"]["checks"]})
    record["seconds_by_part"] = seconds
    return record


def attacked_accuracy(model: BranchModel, images: torch.Tensor, labels: torch.Tensor, cfg: Config, autocast,
                      seconds: dict[str, float], parts: Progress = SILENT
                      ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Clean accuracy, the headline PGD and the extra white-box attacks (one generator, in this order, each a
    part of `parts`); returns the record and the per-image clean and PGD correctness."""
    a, e = cfg.eval.attack, cfg.eval
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    with parts.part("clean", len(images)) as part:
        clean_flags = correct_under(model, images, labels, None, e.batch_size, autocast, tick=part.update)
    seconds["clean"], t0 = time.perf_counter() - t0, time.perf_counter()
    pgd_key = attack_name(a.steps, a.eps, restarts=e.restarts)
    with parts.part(pgd_key, len(images)) as part:
        robust_flags = pgd_correct(model, images, labels, a, e.batch_size, gen, autocast, e.restarts, part.update)
    robust = {pgd_key: fraction(robust_flags)}
    seconds[pgd_key] = time.perf_counter() - t0
    for kind in e.attacks:
        if kind in ("cw", "pgd-l2"):
            with parts.part(extra_attack_name(kind, cfg), len(images)) as part:
                key, acc = extra_attack(kind, model, images, labels, cfg, gen, autocast, part.update)
            robust[key] = acc
    return {"clean_acc": fraction(clean_flags), "robust": robust}, clean_flags, robust_flags


def add_autoattack(record: dict[str, Any], model: BranchModel, images: torch.Tensor, labels: torch.Tensor,
                   robust_flags: torch.Tensor, cfg: Config, run: RunDir, protocol: str,
                   fingerprint: str | None, parts: Progress = SILENT, num_classes: int | None = None) -> int:
    """AutoAttack on its seeded subset (when configured) into `record`; returns how many images it attacks."""
    e = cfg.eval
    aa_index = part_index(len(images), e.autoattack_limit, e.subset_seed)
    aa_images, aa_labels = (images, labels) if aa_index is None else (images[aa_index], labels[aa_index])
    if "autoattack" in e.attacks:
        aa = run_autoattack(model, aa_images, aa_labels, cfg, run, protocol, fingerprint, parts, num_classes)
        aa["images"] = len(aa_images)
        aa["pgd_on_same_images"] = fraction(robust_flags if aa_index is None else robust_flags[aa_index])
        record["robust"][autoattack_name(e.attack.eps)] = aa["accuracy"]
        record["autoattack"] = aa
    return len(aa_images)


def add_curves(record: dict[str, Any], model: BranchModel, images: torch.Tensor, labels: torch.Tensor, cfg: Config,
               autocast, seconds: dict[str, float], parts: Progress = SILENT) -> None:
    """The eps curve (and the steps curve when configured) into `record`, reusing the points already measured;
    each curve a part of `parts`."""
    a, e = cfg.eval.attack, cfg.eval
    headline = record["robust"][attack_name(a.steps, a.eps, restarts=e.restarts)]
    eps_values = sorted(set([0.0, a.eps, *e.eps_curve]))
    known = {0.0: record["clean_acc"], a.eps: headline} if e.restarts == 1 else {0.0: record["clean_acc"]}
    t0 = time.perf_counter()
    with parts.part("eps_curve", curve_images(eps_values, known, len(images))) as part:
        record["eps_curve"] = robustness_curve(model, images, labels, a, eps_values, e.batch_size, cfg.seed, autocast,
                                               known, part.update)
    seconds["eps_curve"] = time.perf_counter() - t0
    if e.steps_curve:
        steps_known = {a.steps: headline} if e.restarts == 1 else {}
        steps_values = sorted(set([*e.steps_curve, a.steps]))
        with parts.part("steps_curve", curve_images(steps_values, steps_known, len(images))) as part:
            record["steps_curve"] = steps_curve(model, images, labels, a, steps_values, e.batch_size, cfg.seed,
                                                autocast, steps_known, part.update)


def integrity_record(model: BranchModel, images: torch.Tensor, labels: torch.Tensor, clean_flags: torch.Tensor,
                     robust_flags: torch.Tensor, record: dict[str, Any], num_classes: int, cfg: Config, autocast,
                     aa_count: int, parts: Progress = SILENT) -> dict[str, Any]:
    """The integrity checks on their images (all by default), AutoAttack's two or the Square cross-check; each
    attack they run a part of `parts`."""
    a, e = cfg.eval.attack, cfg.eval
    device = next(model.parameters()).device
    check_index = part_index(len(images), e.checks_limit, e.subset_seed)
    c_images, c_labels = (images, labels) if check_index is None else (images[check_index], labels[check_index])
    c_clean = record["clean_acc"] if check_index is None else fraction(clean_flags[check_index])

    def single_pgd(x: torch.Tensor, y: torch.Tensor, name: str) -> float:  # one restart, as the checks compare
        with parts.part(f"{attack_name(a.steps, a.eps)} one restart{name}", len(x)) as part:
            return pgd_accuracy(model, x, y, a, e.batch_size, torch.Generator(device=device).manual_seed(cfg.seed),
                                autocast, tick=part.update)
    headline = record["robust"][attack_name(a.steps, a.eps, restarts=e.restarts)]
    single_all = headline if e.restarts == 1 else single_pgd(images, labels, "")
    if check_index is None:
        single = single_all
    else:
        single = (fraction(robust_flags[check_index]) if e.restarts == 1
                  else single_pgd(c_images, c_labels, " (checked images)"))
    curve_single = [c if c["eps"] != a.eps else {"eps": a.eps, "accuracy": single_all} for c in record["eps_curve"]]
    integrity = run_integrity_checks(model, c_images, c_labels, a, c_clean, single, curve_single, num_classes,
                                     e.batch_size, cfg.seed, autocast, parts)
    integrity["images"] = len(c_images)
    if "autoattack" in record:
        extra = [check_autoattack_below_pgd(record["autoattack"]["accuracy"], record["autoattack"]["pgd_on_same_images"],
                                            aa_count, a.steps),
                 check_square_vs_whitebox(record["autoattack"]["after"], aa_count)]
    else:
        extra = [part_check(parts, "square-not-beating-white-box", min(len(c_images), SQUARE_MAX_IMAGES),
                            lambda tick: square_survivors(model, c_images, c_labels, a, e.batch_size, cfg.seed,
                                                          autocast))]
    for check in extra:
        integrity["checks"].append(check.__dict__)
        if not check.passed:
            integrity["failed"].append(check.name)
    integrity["passed"] = not integrity["failed"]
    return integrity


def write_curves_csv(run: RunDir, per_protocol: dict[str, Any]) -> None:
    """eps_curve.csv and steps_curve.csv (protocol, x, accuracy) beside results.json."""
    for name, x_key in (("eps_curve", "eps"), ("steps_curve", "steps")):
        rows = [f"{p},{c[x_key]:g},{c['accuracy']:.6f}" for p, r in per_protocol.items() for c in r.get(name, [])]
        if rows:
            atomic_write_text(run.root / f"{name}.csv", "\n".join([f"protocol,{x_key},accuracy", *rows]) + "\n")


def evaluate_run(cfg: Config, run: RunDir, progress: bool = True, protocols: tuple[str, ...] | None = None,
                 loaded: tuple[torch.nn.Module, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Evaluate every fitted model of `run` (or the given protocols); writes and returns results.json's content.

    `loaded`: an (encoder, metadata) pair in memory instead of the run's encoder.safetensors (as in `finetune`);
    its metadata's "fingerprint" identifies it and "source" is stored in the results."""
    runtime = open_runtime(cfg, started_config(run.config))
    cfg, device = runtime.cfg, runtime.device
    if loaded is None and not run.encoder.is_file():
        if run.encoder_description.is_file():  # an evaluation of a module: it has no file to read back
            raise RunError(f"{run.root} evaluated an encoder given as a module; evaluate it again with "
                           "`robustcl evaluate --encoder module:callable` (or robustcl.evaluation.evaluate_encoder)")
        raise RunError(f"{run.root} has no encoder.safetensors; run `robustcl pretrain` first")
    wanted = protocols or tuple(p for p in ("slf", "alf", "aff") if p in cfg.finetune.protocols or run.head(p).is_file())
    missing = [p for p in wanted if not run.head(p).is_file()]
    if protocols and missing:
        raise RunError(f"{run.root} has no fitted {', '.join(missing)} model; run `robustcl finetune --run {run.root} "
                       f"--protocol {' '.join(missing)}` first")
    chosen = [p for p in ("slf", "alf", "aff") if p in wanted and run.head(p).is_file()]  # headline: first
    if not chosen:
        raise RunError(f"{run.root} has no fitted heads; run `robustcl finetune --run {run.root}` first")
    with writing(run.root, "results.json, eval_state/ and the report"):  # before any work: writable, one writer
        return _evaluate(cfg, run, progress, protocols, chosen, device, loaded)


def _evaluate(cfg: Config, run: RunDir, progress: bool, protocols: tuple[str, ...] | None, chosen: list[str],
              device: torch.device, loaded: tuple[torch.nn.Module, dict[str, Any]] | None = None) -> dict[str, Any]:
    """`evaluate_run`'s work, once the run is known writable and locked."""
    encoder, meta = loaded if loaded is not None else run_encoder(cfg, run)
    encoder.to(device).eval().requires_grad_(False)
    if cfg.train.channels_last:
        encoder.to(memory_format=torch.channels_last)
    with paced(encoder):  # `train.threads: auto` re-decided between forwards, inside long attacks too
        return _evaluate_encoder(cfg, run, progress, protocols, chosen, device, encoder, meta, loaded is not None)


def _evaluate_encoder(cfg: Config, run: RunDir, progress: bool, protocols: tuple[str, ...] | None, chosen: list[str],
                      device: torch.device, encoder: Encoder, meta: dict[str, Any], loaded: bool) -> dict[str, Any]:
    """The evaluation of a loaded encoder's fitted heads: every protocol, the readings, the files."""
    images, labels, subset, index = indexed_test_subset(cfg)
    autocast = autocast_factory(device, cfg.eval.precision)
    a, e = cfg.eval.attack, cfg.eval
    per_protocol: dict[str, Any] = {}
    per_image = PerImage(index.numpy().astype("int64"), attack_name(a.steps, a.eps, restarts=e.restarts), {}, {})
    fingerprint = meta["fingerprint"] if loaded else None
    corrupted = corrupted_sets(cfg, images, labels, index)
    parts = Progress("evaluate", show=progress, run=run)  # a bar, a line or (quiet) only the metrics.jsonl record
    for protocol in chosen:
        per_protocol[protocol], num_classes = evaluate_protocol(run, protocol, encoder, meta, images, labels, cfg,
                                                                device, autocast, per_image, fingerprint, corrupted,
                                                                parts.scoped(protocol=protocol))
    attack_record = {"type": "PGD", "norm": "Linf", "eps": a.eps, "alpha": a.alpha, "steps": a.steps,
                     "random_start": a.random_start, "restarts": e.restarts, "loss": "cross-entropy",
                     "precision": e.precision}
    if protocols and run.results.is_file():  # keep the other protocols' results when they used the same evaluation
        earlier = run.read_results()
        if earlier.get("attack") == attack_record and earlier.get("eval_subset") == subset:
            per_protocol = {**{p: r for p, r in earlier.get("protocols", {}).items() if p not in per_protocol},
                            **per_protocol}
            per_protocol = {p: per_protocol[p] for p in ("slf", "alf", "aff") if p in per_protocol}
            per_image = _merge_earlier_flags(run, per_image, per_protocol)
    results = results_record(cfg, meta, per_protocol, attack_record, len(images), subset, device)
    if corrupted is not None:
        results["corruption_sets"] = generation_record(corrupted)
    if reference_switches(cfg).evaluation and meta["dual_bn"] and (protocols is None or {"slf", "alf"} & set(protocols)):
        results["reference_reading"] = reference_reading(cfg, encoder, training_images(cfg), (images, labels),
                                                         num_classes, device, autocast, parts)
    write_curves_csv(run, per_protocol)
    write_per_image(run, per_image)
    run.write_json(run.results, results)
    log_results(cfg, run, {p: per_protocol[p] for p in chosen})
    return results


def run_encoder(cfg: Config, run: RunDir) -> tuple[Encoder, dict[str, Any]]:
    """The run's encoder.safetensors, checked against the config it is evaluated with."""
    encoder, meta = read_encoder(run.encoder)
    check_run_encoder(encoder, meta, cfg, run)
    return encoder, meta


def evaluate_protocol(run: RunDir, protocol: str, encoder: torch.nn.Module, meta: dict[str, Any], images: torch.Tensor,
                      labels: torch.Tensor, cfg: Config, device: torch.device, autocast, per_image: PerImage,
                      fingerprint: str | None, corrupted: CorruptedSets | None = None,
                      parts: Progress = SILENT) -> tuple[dict[str, Any], int]:
    """One protocol's fitted model evaluated (its per-image flags into `per_image`; each part reported to
    `parts`); returns its record and the number of classes of its head."""
    e = cfg.eval
    t0 = time.perf_counter()
    model, saved = protocol_model(run, protocol, encoder, device)
    num_classes = model.head.out_features
    flags: dict[str, torch.Tensor] = {}
    record = evaluate_model(model, images, labels, num_classes, cfg, autocast, run, protocol, flags, fingerprint,
                            corrupted, parts)
    per_image.clean[protocol], per_image.robust[protocol] = as_numpy(flags["clean"]), as_numpy(flags["robust"])
    out = {"protocol": protocol, "branch": saved["branch"], **record,
           "best_epoch": saved["best_epoch"], "val_acc": saved["val_acc"], "selected_on": saved["selected_on"],
           **({"aff": saved["aff"]} if "aff" in saved else {})}
    if e.mixed_reading and meta["dual_bn"]:
        with parts.part("mixed reading", 2 * len(images)) as part:
            out["mixed_reading"] = mixed_reading(run, protocol, encoder, images, labels, cfg, device, autocast,
                                                 saved["branch"], part.update)
    out["seconds"] = time.perf_counter() - t0
    return out, num_classes


def mixed_reading(run: RunDir, protocol: str, encoder: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  cfg: Config, device: torch.device, autocast, trained_on: str,
                  tick: Tick | None = None) -> dict[str, Any]:
    """The reference protocol's mixed reading, labelled: clean via the benign BN, robust via the adversarial one
    (`tick(n)` after each batch of n images of either)."""
    a, e = cfg.eval.attack, cfg.eval
    benign_model, _ = protocol_model(run, protocol, encoder, device, branch="benign")
    adversarial_model, _ = protocol_model(run, protocol, encoder, device, branch="adversarial")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    return {"label": MIXED_LABEL,
            "clean_acc_benign_branch": accuracy(benign_model, images, labels, e.batch_size, autocast, tick),
            "robust_acc_adversarial_branch": pgd_accuracy(adversarial_model, images, labels, a, e.batch_size,
                                                          gen, autocast, e.restarts, tick),
            "head_trained_on": trained_on}


def results_record(cfg: Config, meta: dict[str, Any], per_protocol: dict[str, Any], attack_record: dict[str, Any],
                   n_eval: int, subset: str, device: torch.device) -> dict[str, Any]:
    """results.json: the headline protocol's numbers at the top, every protocol's under "protocols"."""
    headline = next(iter(per_protocol.values()))
    return {
        "method": meta["method"], "dataset": meta["dataset"],
        "protocol": headline["protocol"], "branch": headline["branch"],
        "clean_acc": headline["clean_acc"], "robust": headline["robust"],
        **({"corruption_acc": headline["corruptions"]["mean"]} if "corruptions" in headline else {}),
        "n_eval": int(n_eval), "eval_subset": subset,
        "attack": attack_record,
        "branch_note": "clean and robust accuracy are read through the same BN branch",
        "hardware": {"device": device_description(device), "train_precision": cfg.train.precision,
                     "eval_precision": cfg.eval.precision, "threads": torch.get_num_threads(),
                     "cpu": cpu_model(), "torch": torch.__version__},
        "suspect": {p: r["integrity"]["failed"] for p, r in per_protocol.items() if not r["integrity"]["passed"]},
        "protocols": per_protocol,
        **({"encoder": meta["source"]} if "source" in meta else {}),
    }


def training_images(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 2's training images and labels (the split without the held-out validation images)."""
    data = load_split(cfg, "train")
    train_idx, _ = train_val_indices(len(data), cfg.data.val_size, cfg.seed)
    if cfg.finetune.train_limit is not None:
        train_idx = train_idx[: cfg.finetune.train_limit]
    return data.images[train_idx], data.labels[train_idx]


def _merge_earlier_flags(run: RunDir, flags: PerImage, kept: dict[str, Any]) -> PerImage:
    """The kept earlier protocols' per-image flags added to this evaluation's (same images and attack only)."""
    earlier = read_per_image(run)
    if earlier is None or not earlier.matches(flags):
        return flags
    for protocol in kept:
        if protocol not in flags.clean and protocol in earlier.clean:
            flags.clean[protocol], flags.robust[protocol] = earlier.clean[protocol], earlier.robust[protocol]
    order = [p for p in ("slf", "alf", "aff") if p in flags.clean]
    return PerImage(flags.index, flags.attack, {p: flags.clean[p] for p in order}, {p: flags.robust[p] for p in order})


def log_results(cfg: Config, run: RunDir, per_protocol: dict[str, Any]) -> None:
    """One "evaluate" record per evaluated protocol (clean and robust accuracy) to metrics.jsonl and the
    train.loggers sinks, at the encoder's phase-1 step (0 without one): a re-evaluation replaces the points."""
    text = run.pretrain_done.read_text().strip() if run.pretrain_done.is_file() else ""
    step = int(text) if text.isdigit() else 0
    with open_logger(run, cfg, purge_from=step) as logger:
        for protocol, r in per_protocol.items():
            logger.log({"phase": "evaluate", "protocol": protocol, "step": step, "branch": r["branch"],
                        "clean_acc": r["clean_acc"], "robust": r["robust"]})


__all__ = ["MIXED_LABEL", "attack_name", "autoattack_name", "evaluate_model", "evaluate_run", "indexed_test_subset",
           "log_results",
           "protocol_model", "test_subset"]
