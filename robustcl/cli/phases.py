"""`robustcl pretrain | finetune | evaluate | run`: the three phases of a run, alone or in one go."""
from __future__ import annotations

import argparse
import os

from robustcl.cli.zoo import comparison_table

OVERRIDES_HELP = "config overrides, e.g. train.lr=0.1"


def add_common(p: argparse.ArgumentParser) -> None:
    """The overrides and --quiet every phase takes."""
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")


def on_rank_zero() -> bool:
    """False on the non-zero ranks of a torchrun job: they train, rank 0 alone reports."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from robustcl import api

    done = api.pretrain(args.config, args.out, args.overrides, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.quiet)
    if on_rank_zero():
        print_pretrained(done)
    return 0


def print_pretrained(done: object) -> None:
    """What phase 1 did, in one line."""
    if not done.trained:  # type: ignore[attr-defined]
        print(f"{done.run_dir}: phase 1 already finished; nothing to do")  # type: ignore[attr-defined]
    else:
        print(f"{done.run_dir}: {done.steps} steps, {done.images_per_second:.0f} images/s; "  # type: ignore[attr-defined]
              f"encoder at {done.encoder}")  # type: ignore[attr-defined]


def print_heads(run_dir: object, records: dict) -> None:
    """One line per fitted phase-2 model."""
    from robustcl.runs import RunDir

    run = RunDir(run_dir)  # type: ignore[arg-type]
    for protocol, record in records.items():
        print(f"{protocol.upper()} ({record['branch']} branch): best epoch {record['best_epoch']}, "
              f"{record['selected_on']} {100 * record['val_acc']:.2f}%; head at {run.head(protocol)}")


def cmd_finetune(args: argparse.Namespace) -> int:
    from robustcl import api

    records = api.finetune(args.run, args.protocol, args.overrides, schedule=getattr(args, "schedule", None),
                           overwrite=args.overwrite, progress=not args.quiet)
    print_heads(args.run, records)
    return 0


def print_results(name: str, results: dict, out: object) -> None:
    """The results table and where results.json and report.md are."""
    from pathlib import Path

    from robustcl.runs.report import results_table

    print(results_table([(name, results)]))
    for protocol, r in results.get("protocols", {}).items():
        c = r.get("corruptions")
        if c:
            print(f"{protocol.upper()} common corruptions: {'CA' if c.get('standard') else 'mean'} "
                  f"{100 * c['mean']:.2f}% over {len(c['names'])} corruption(s) x severities {c['severities']} "
                  f"({c['n']} images; clean on them {100 * c['clean_on_same_images']:.2f}%)")
    print(f"results: {Path(str(out)) / 'results.json'}\nreport: {Path(str(out)) / 'report.md'}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from robustcl import api
    from robustcl.config import ConfigError
    from robustcl.encoders import default_out

    overrides = [*evaluate_overrides(args), *args.overrides]
    if args.encoder is not None:
        if args.run is not None:
            raise ConfigError("evaluate takes --run DIR or --encoder SPEC, not both")
        if args.data is None:
            raise ConfigError("--encoder needs --data NAME (the dataset to fit heads on and evaluate, e.g. cifar10)")
        out = Path(args.out) if args.out else default_out(args.encoder, args.data)
        results = api.evaluate_encoder(args.encoder, args.data, out, config=args.config, overrides=overrides,
                                       protocols=args.protocol, mean=args.mean, std=args.std,
                                       overwrite=args.overwrite, progress=not args.quiet, **reading_options(args))
        print_results(out.name, results, out)
        if "comparison" in results:
            print(comparison_table(results["comparison"]))
        return 0
    if args.run is None:
        raise ConfigError("evaluate needs --run DIR (a robustcl run) or --encoder PATH|module:callable --data NAME")
    results = api.evaluate(args.run, overrides, protocols=args.protocol, progress=not args.quiet)
    print_results(Path(args.run).name, results, args.run)
    return 0


def reading_options(args: argparse.Namespace) -> dict:
    """How to read a published checkpoint (--format, --bn-branch, --stem-padding, --protocol-of, --compare)."""
    return {"layout": args.format, "bn_branch": args.bn_branch, "stem_padding": args.stem_padding,
            "protocol_of": args.protocol_of, "compare": args.compare, "announce": print}


def evaluate_overrides(args: argparse.Namespace) -> list[str]:
    """The `evaluate` options as eval.* overrides (explicit key=value overrides still win)."""
    out = []
    if args.attacks:
        out.append(f"eval.attacks=[{', '.join(dict.fromkeys(['pgd', *args.attacks]))}]")
    if args.eps:
        out.append(f"eval.eps_curve=[{', '.join(args.eps)}]")
    if args.steps:
        out.append(f"eval.steps_curve=[{', '.join(str(s) for s in args.steps)}]")
    if getattr(args, "corruptions", None):
        out.append(f"eval.corruptions=[{', '.join(args.corruptions)}]")
    if getattr(args, "severities", None):
        out.append(f"eval.corruption_severities=[{', '.join(str(s) for s in args.severities)}]")
    for flag, key in (("limit", "eval.limit"), ("batch_size", "eval.batch_size"), ("seed", "seed"),
                      ("restarts", "eval.restarts"), ("corruptions_limit", "eval.corruptions_limit")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={value}")
    if args.mixed_reading:
        out.append("eval.mixed_reading=true")
    return out


def cmd_run(args: argparse.Namespace) -> int:
    """pretrain -> finetune -> evaluate in one go (under torchrun: phase 1 on every rank, the rest on rank 0)."""
    from robustcl import api

    outcome = api.run(args.config, args.out, args.overrides, resume=args.resume, overwrite=args.overwrite,
                      progress=not args.quiet)
    if outcome is None:  # a non-zero torchrun rank: it trained, rank 0 fits and evaluates
        return 0
    print_pretrained(outcome.pretrained)
    print_heads(outcome.run_dir, outcome.heads)
    print_results(outcome.run_dir.name, outcome.results, outcome.run_dir)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add pretrain, run, finetune and evaluate."""
    for name, fn, text in (("pretrain", cmd_pretrain, "phase 1: contrastive pre-training"),
                           ("run", cmd_run, "pretrain, finetune and evaluate in one go")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="preset name or YAML path")
        p.add_argument("--out", help="run directory (default runs/<config name>)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
        add_common(p)
        p.set_defaults(fn=fn)
    register_finetune(sub)
    register_evaluate(sub)


def register_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="phase 2: fit SLF/ALF linear heads on a run's frozen encoder")
    p.add_argument("--run", required=True, help="run directory written by pretrain")
    p.add_argument("--protocol", nargs="+", choices=["slf", "alf", "aff"],
                   help="protocols (default: finetune.protocols); aff fine-tunes the encoder too (TRADES or PGD-AT)")
    p.add_argument("--schedule", help="a phase-2 schedule preset: linear-reference (100 epochs, lr 0.1) or "
                                      "linear-benchmark (25 epochs, lr 0.01)")
    p.add_argument("--overwrite", action="store_true", help="refit heads that already exist")
    add_common(p)
    p.set_defaults(fn=cmd_finetune)


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="clean and robust accuracy of a run's heads; results.json and report.md")
    p.add_argument("--run", help="run directory")
    p.add_argument("--encoder", help="instead of --run: an existing file (encoder.safetensors, or a published "
                                     "checkpoint of any layout, detected from its keys), else zoo:NAME (see "
                                     "`robustcl zoo`), else module:callable returning an nn.Module; heads are "
                                     "fitted (--protocol, default finetune.protocols) and evaluated")
    p.add_argument("--format", help="with a published --encoder: force its layout (acl, dynacl, advcl, deacl, rocl, "
                                    "gbrcl, lpaft, torchvision) instead of detecting it")
    p.add_argument("--bn-branch", help="with a published --encoder: the BN copy read, benign, adversarial or an "
                                       "index (default adversarial = copy 1 in every dual- or triple-BN layout, "
                                       "never AdvCL's copy 2)")
    p.add_argument("--stem-padding", type=int, choices=[1, 2], help="with a published --encoder: the 3x3 stem's "
                   "padding where the weights cannot tell (default: the layout's, DeACL 2, others 1)")
    p.add_argument("--protocol-of", choices=["robustcl", "benchmark"], help="with a published --encoder: robustcl's "
                   "reading (default) or the RobustSSL benchmark's (its branch, normalisation, stem and raw pooled "
                   "features, its per-method settings), labelled as such")
    p.add_argument("--compare", nargs="?", const=True, metavar="NAME", help="print our reading beside the "
                   "catalogue's published one (the entry with the file's sha256, the zoo:NAME one, or NAME)")
    p.add_argument("--data", help="with --encoder: the dataset to fit heads on and evaluate, e.g. cifar10")
    p.add_argument("--config", help="with --encoder: preset or YAML whose finetune/eval settings are used "
                                    "(default: the dataset's reference preset)")
    p.add_argument("--out", help="with --encoder: results directory (default runs/encoders/<name>-<data>)")
    p.add_argument("--mean", nargs="+", type=float, help="with a torchvision-layout --encoder without normalize.* "
                                                        "buffers: input normalisation mean per channel "
                                                        "(default: the dataset's)")
    p.add_argument("--std", nargs="+", type=float, help="with a torchvision-layout --encoder: input std per channel")
    p.add_argument("--overwrite", action="store_true", help="with --encoder: redo an earlier evaluation in --out")
    p.add_argument("--protocol", nargs="+", choices=["slf", "alf", "aff"], help="evaluate only these fitted models")
    p.add_argument("--attacks", nargs="+", choices=["pgd", "cw", "pgd-l2", "autoattack"],
                   help="attacks to report besides PGD (eval.attacks)")
    p.add_argument("--eps", nargs="+", help="eps values for the robustness curve, e.g. 2/255 4/255 (eval.eps_curve)")
    p.add_argument("--steps", nargs="+", type=int, help="PGD step counts for the steps curve (eval.steps_curve)")
    p.add_argument("--limit", type=int, help="evaluate on a seeded random subset of N test images (eval.limit)")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (eval.batch_size)")
    p.add_argument("--seed", type=int, help="seed of the attacks' random starts (the run's seed by default)")
    p.add_argument("--restarts", type=int, help="PGD/CW/L2 random restarts, worst case per image (eval.restarts)")
    p.add_argument("--corruptions", nargs="+", metavar="NAME|all",
                   help="common-corruption accuracy (CA): all (the benchmark's 15 CIFAR-10-C corruptions) or names, "
                        "e.g. fog snow speckle_noise (eval.corruptions; docs/corruptions.md)")
    p.add_argument("--severities", nargs="+", type=int, metavar="S",
                   help="corruption severities 1..5 (eval.corruption_severities; default all five)")
    p.add_argument("--corruptions-limit", type=int, metavar="N",
                   help="corrupted images per corruption and severity: a seeded subset of the evaluated images "
                        "(eval.corruptions_limit)")
    p.add_argument("--mixed-reading", action="store_true",
                   help="also report the reference protocol's mixed reading (clean via benign BN, robust via "
                        "adversarial BN), labelled as such")
    add_common(p)
    p.set_defaults(fn=cmd_evaluate)
